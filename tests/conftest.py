import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if importlib.util.find_spec("deepspeed") is not None:
    # DeepSpeed logs its accelerator choice to stdout the first time anything imports it (Trainer does, when it is
    # installed); do that once here, so the line never lands in the captured output of whichever test came first.
    from deepspeed.accelerator import get_accelerator

    get_accelerator()
