"""The wheel built from the repository works on its own: installed into a fresh virtual environment, away from the
source tree, it imports, carries the model card template and writes a card."""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

WRITE_CARD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import hf_aligned
    from hf_aligned import AlignedConfig, AlignedForSequenceClassification, AlignedModelCardData, write_model_card
    from transformers import BertConfig

    assert Path(hf_aligned.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), hf_aligned.__file__
    base = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37)
    model = AlignedForSequenceClassification(AlignedConfig(base_config=base, num_labels=2))
    metrics = {"eval_layer_1_accuracy": 0.5, "eval_layer_2_accuracy": 0.75, "eval_layer_3_accuracy": 0.8}
    path = write_model_card(sys.argv[1], model, AlignedModelCardData(eval_metrics=metrics))
    print(path)
    """
)


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv_and_writes_a_card(tmp_path):
    # Built from a copy of what the wheel is made of, so the build leaves nothing in the working tree.
    source = tmp_path / "source"
    shutil.copytree(REPO / "hf_aligned", source / "hf_aligned", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheel_dir = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheel_dir, source],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheel_dir.glob("hf_aligned-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"hf_aligned/model_cards/aligned_model_card.md", "hf_aligned/model_cards/causal_lm_model_card.md"} <= set(
        names
    )
    assert not [name for name in names if name.startswith(("tests/", "benchmarks/", "examples/"))]

    venv = tmp_path / "venv"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # the venv sees only its own path
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    # The dependencies come from this environment (no network); hf_aligned itself only from the wheel.
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], check=True, env=env)

    card_dir = tmp_path / "card"
    card_dir.mkdir()
    script = tmp_path / "write_card.py"
    script.write_text(WRITE_CARD)
    result = subprocess.run([python, script, card_dir], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    card = (card_dir / "README.md").read_text()
    assert "library_name: hf-aligned" in card
    assert "| 2 | 0.7500 |" in card
