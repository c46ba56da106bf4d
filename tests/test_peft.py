"""LoRA on the base model with the shared classifier trained and saved (peft's `modules_to_save`)."""

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tests.testing_utils import tiny_inputs, tiny_model


def lora_model():
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    return get_peft_model(tiny_model("bert"), config)


def test_lora_trains_adapters_and_the_shared_classifier_only():
    model = lora_model()
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable, "nothing is trainable"
    assert all("lora_" in name or ".classifier." in name for name in trainable)
    # The whole shared head (pooler and classification layer) is trained, not just the last linear layer.
    assert any("classifier.modules_to_save.default.heads.0.out_proj.weight" in name for name in trainable)
    assert any("classifier.modules_to_save.default.heads.0.pooler.dense.weight" in name for name in trainable)
    assert not any("encoder.layer.0.attention.self.query.base_layer" in name for name in trainable)


def test_lora_adapter_round_trip_gives_identical_logits(tmp_path):
    model = lora_model().train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs, labels = tiny_inputs("bert"), torch.tensor([0, 1, 2])
    for _ in range(3):
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model("bert"), tmp_path).eval()
    untrained = tiny_model("bert")
    with torch.no_grad():
        trained_logits = model(**inputs, output_layer_logits=True).layer_logits
        assert torch.equal(trained_logits, reloaded(**inputs, output_layer_logits=True).layer_logits)
        assert not torch.allclose(trained_logits, untrained(**inputs, output_layer_logits=True).layer_logits)
