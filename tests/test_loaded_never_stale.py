"""Clause 1 of the loading contract: a loaded model is never stale.

A model loaded for inference is merged; whatever changes an adapter's values (loading another checkpoint under the
same name, set_peft_model_state_dict, load_state_dict from another loaded model, accelerate's save_state/load_state)
changes what the model computes exactly, and a training step on merged weights is refused rather than silently
training nothing. delete_adapter works on a merged adapter and restores the base bit for bit.
"""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForSequenceClassification

from conftest import ARCHS, child_layers, peft_model, tiny_bert

BERT = ARCHS["bert"]


@pytest.fixture(scope="module", autouse=True)
def hub_offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


def load_base(base_dir: str) -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(base_dir).eval()


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(**batch).logits


def train(model, seed: int, steps: int = 2) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for batch in BERT.batches(steps, seed=seed):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoints of one training run (the same child network), and the outputs of each."""
    root = tmp_path_factory.mktemp("stale")
    base_dir = str(root / "base")
    tiny_bert(seed=0).save_pretrained(base_dir)
    batch = {k: v for k, v in BERT.batches(1, seed=40)[0].items() if k != "labels"}
    model = peft_model(load_base(base_dir), mode="d", reserve_p=0.3, task_type="SEQ_CLS")
    model.detect_child_network(BERT.batches(2, seed=20), progress=False)
    result = {"base": base_dir, "batch": batch, "base_out": logits(load_base(base_dir), batch)}
    for index, seed in enumerate((21, 22)):
        train(model, seed)
        path = str(root / f"checkpoint-{index}")
        model.save_pretrained(path)
        result[index] = path
        result[f"out{index}"] = logits(model, batch)
    assert not torch.equal(result["out0"], result["out1"])
    return result


def loaded(checkpoints, index: int) -> PeftModel:
    return PeftModel.from_pretrained(load_base(checkpoints["base"]), checkpoints[index])


def assert_merged(model) -> None:
    assert all(layer.merged for layer in child_layers(model).values())


def test_load_adapter_into_the_existing_merged_name(checkpoints):
    """An eval loop over checkpoints: each load_adapter under the same name is what the model computes."""
    model = loaded(checkpoints, 0)
    assert torch.equal(logits(model, checkpoints["batch"]), checkpoints["out0"])
    for index in (1, 0, 1):
        model.load_adapter(checkpoints[index], adapter_name="default")
        assert_merged(model)
        assert torch.equal(logits(model, checkpoints["batch"]), checkpoints[f"out{index}"]), index


def test_set_peft_model_state_dict_on_a_loaded_model(checkpoints):
    model, other = loaded(checkpoints, 0), loaded(checkpoints, 1)
    set_peft_model_state_dict(model, get_peft_model_state_dict(other))
    assert_merged(model)
    assert torch.equal(logits(model, checkpoints["batch"]), checkpoints["out1"])


def test_load_state_dict_between_two_loaded_models(checkpoints):
    model, other = loaded(checkpoints, 0), loaded(checkpoints, 1)
    model.load_state_dict(other.state_dict())
    assert_merged(model)
    assert torch.equal(logits(model, checkpoints["batch"]), checkpoints["out1"])


def test_state_dict_round_trips(checkpoints):
    model = loaded(checkpoints, 1)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    model.load_state_dict(state)
    assert_merged(model)
    assert torch.equal(logits(model, checkpoints["batch"]), checkpoints["out1"])
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())


def test_accelerate_save_state_load_state_on_loaded_models(checkpoints, tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    source = accelerator.prepare(loaded(checkpoints, 1))
    accelerator.save_state(str(tmp_path / "state"))
    target_accelerator = Accelerator(cpu=True)
    target = target_accelerator.prepare(loaded(checkpoints, 0))
    target_accelerator.load_state(str(tmp_path / "state"))
    assert_merged(target)
    assert torch.equal(logits(target, checkpoints["batch"]), checkpoints["out1"])
    assert torch.equal(logits(source, checkpoints["batch"]), checkpoints["out1"])


def test_training_step_after_merge_adapter_is_refused(checkpoints):
    model = PeftModel.from_pretrained(load_base(checkpoints["base"]), checkpoints[0], is_trainable=True)
    model.merge_adapter()
    model.train()
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        model(**BERT.batches(1, seed=5)[0])
    with torch.no_grad():  # inference on the merged weights is fine
        model(**BERT.batches(1, seed=5)[0])
    model.unmerge_adapter()
    model(**BERT.batches(1, seed=5)[0]).loss.backward()  # and training after unmerging
    assert any(p.grad is not None for n, p in model.named_parameters() if "childtuning_values" in n)


def test_delete_adapter_loaded_for_inference(checkpoints):
    model = loaded(checkpoints, 0)
    model.load_adapter(checkpoints[1], adapter_name="second")
    model.set_adapter("second")
    assert torch.equal(logits(model, checkpoints["batch"]), checkpoints["out1"])
    model.delete_adapter("second")
    assert "second" not in model.peft_config
    model.set_adapter("default")
    assert torch.equal(logits(model, checkpoints["batch"]), checkpoints["out0"])
    model.delete_adapter("default")
    base = load_base(checkpoints["base"])
    for layer in child_layers(model).values():
        key = layer.tensor_key("weight")
        assert not layer.merged
        assert torch.equal(layer.get_base_layer().weight, base.get_parameter(key)), key
    assert os.path.isdir(checkpoints[0])
