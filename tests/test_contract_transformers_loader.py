"""Clause 9 of the loading contract: transformers' own ``PreTrainedModel.load_adapter``.

It runs none of peft's checks, so ``import peft_childtuning`` routes it through the same transaction: the same faults
are caught at load in modes d and f (bool values, a NaN or missing head, NaN or missing mode-f values...), the
adapter is merged for inference, and after an error of transformers' own the model is exactly what it was.
"""

from __future__ import annotations

import pytest
import torch

from peft_childtuning import AdapterFormatError

from conftest import child_layers, rewrite_weights
from model_state import ModelState

PREFIX = "base_model.model."
D_VALUES = PREFIX + "bert.encoder.layer.0.output.dense.childtuning_values"
F_VALUES = PREFIX + "bert.encoder.layer.1.attention.self.key.childtuning_values"
HEAD = PREFIX + "classifier.weight"


def _nan(key):
    def edit(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key].reshape(-1)[0] = float("nan")
    return edit


FAULTS = {
    "d_bool_values": ("d", lambda t: t.update({D_VALUES: t[D_VALUES] != 0}), "floating point"),
    "d_nan_values": ("d", _nan(D_VALUES), "NaN or inf"),
    "d_missing_values": ("d", lambda t: t.pop(D_VALUES), "no tensor"),
    "d_nan_head": ("d", _nan(HEAD), "NaN or inf"),
    "d_missing_head": ("d", lambda t: t.pop(HEAD), "no tensor"),
    "f_nan_values": ("f", _nan(F_VALUES), "NaN or inf"),
    "f_missing_values": ("f", lambda t: t.pop(F_VALUES), "no tensor"),
    "f_bool_values": ("f", lambda t: t.update({F_VALUES: t[F_VALUES] != 0}), "floating point"),
    "f_missing_head": ("f", lambda t: t.pop(HEAD), "no tensor"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_faults_are_caught_at_load(saved_adapters, tmp_path, fault):
    mode, edit, message = FAULTS[fault]
    adapter_dir = saved_adapters.copy_adapter(mode, str(tmp_path / "adapter"))
    rewrite_weights(adapter_dir, edit)
    base = saved_adapters.load_base()
    before = ModelState.capture(base)
    with pytest.raises(AdapterFormatError, match=message):
        base.load_adapter(adapter_dir, adapter_name="default")
    before.assert_unchanged(ModelState.capture(base))
    with torch.no_grad():
        assert torch.equal(base(**saved_adapters.batch).logits, saved_adapters.outputs["base"])


@pytest.mark.parametrize("mode", ["d", "f"])
def test_loads_merged_and_exact(saved_adapters, mode):
    base = saved_adapters.load_base()
    base.load_adapter(saved_adapters.adapters[mode], adapter_name="default")
    assert all(layer.merged for layer in child_layers(base).values())
    with torch.no_grad():
        assert torch.equal(base(**saved_adapters.batch).logits, saved_adapters.outputs[mode])


def test_after_an_error_of_transformers_own_the_model_is_usable(saved_adapters, monkeypatch):
    from transformers import PreTrainedModel

    def failing_load(*args, **kwargs):
        raise RuntimeError("simulated failure inside transformers' loader")

    base = saved_adapters.load_base()
    before = ModelState.capture(base)
    monkeypatch.setattr(PreTrainedModel, "_load_pretrained_model", staticmethod(failing_load))
    with pytest.raises(AdapterFormatError, match="simulated failure") as caught:
        base.load_adapter(saved_adapters.adapters["d"], adapter_name="default")
    assert isinstance(caught.value.__cause__, RuntimeError)
    before.assert_unchanged(ModelState.capture(base))
    monkeypatch.undo()
    base.load_adapter(saved_adapters.adapters["d"], adapter_name="default")  # and a later load works
    with torch.no_grad():
        assert torch.equal(base(**saved_adapters.batch).logits, saved_adapters.outputs["d"])
