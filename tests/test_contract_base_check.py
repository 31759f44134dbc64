"""Clause 6 of the loading contract: the base check cannot be switched off by editing the config.

An adapter whose file carries a child network must match the base: a config with ``base_fingerprint: null``,
``child_sizes: null`` or ``ignore_base_mismatch: true`` written into it is no way around the check. Only an
``ignore_base_mismatch=True`` given when loading is (ChildTuningConfig.from_pretrained, PeftModel.from_pretrained).
The fingerprint covers untuned tensors (embeddings, norms) and matches the same checkpoint in bf16 and fp16.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from peft_childtuning import AdapterFormatError, ChildTuningConfig

from conftest import LOADERS, rewrite_config, run_loader, tiny_bert
from model_state import ModelState


@pytest.fixture(scope="module")
def other_base(saved_adapters, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("other") / "base")
    tiny_bert(seed=1).save_pretrained(path)
    return path


def _load_other(other_base: str):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(other_base).eval()


EDITS = {
    "fingerprint_null": lambda config: config.update(base_fingerprint=None),
    "fingerprint_deleted": lambda config: config.pop("base_fingerprint"),
    "child_sizes_null": lambda config: config.update(child_sizes=None, child_encodings=None),
    "ignore_in_file": lambda config: config.update(ignore_base_mismatch=True),
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("mode", ["d", "f"])
def test_editing_the_config_does_not_switch_the_check_off(saved_adapters, other_base, tmp_path, loader, edit, mode):
    if mode == "f" and edit == "child_sizes_null":
        pytest.skip("mode f has no child_sizes")
    adapter_dir = saved_adapters.copy_adapter(mode, str(tmp_path / "adapter"))
    rewrite_config(adapter_dir, EDITS[edit])
    target = _load_other(other_base)
    if loader == "load_adapter":
        target = PeftModel.from_pretrained(target, saved_adapters.adapters["f"], ignore_base_mismatch=True)
    before = ModelState.capture(target)
    with pytest.raises(AdapterFormatError, match="fingerprint"):
        run_loader(loader, target, adapter_dir)
    before.assert_unchanged(ModelState.capture(target))


@pytest.mark.parametrize("edit", ["child_sizes_null", "ignore_in_file"])
def test_the_same_edits_on_the_right_base_still_load_exactly(saved_adapters, tmp_path, edit):
    adapter_dir = saved_adapters.copy_adapter("d", str(tmp_path / "adapter"))
    rewrite_config(adapter_dir, EDITS[edit])
    model = PeftModel.from_pretrained(saved_adapters.load_base(), adapter_dir)
    with torch.no_grad():
        assert torch.equal(model(**saved_adapters.batch).logits, saved_adapters.outputs["d"])


def test_ignore_base_mismatch_given_when_loading_takes_effect(saved_adapters, other_base):
    config = ChildTuningConfig.from_pretrained(saved_adapters.adapters["d"], ignore_base_mismatch=True)
    assert config.ignore_base_mismatch
    PeftModel.from_pretrained(_load_other(other_base), saved_adapters.adapters["d"], config=config)
    PeftModel.from_pretrained(_load_other(other_base), saved_adapters.adapters["d"], ignore_base_mismatch=True)
    assert not ChildTuningConfig.from_pretrained(saved_adapters.adapters["d"]).ignore_base_mismatch


def test_an_untuned_tensor_of_another_checkpoint_is_caught(saved_adapters):
    base = saved_adapters.load_base()
    with torch.no_grad():
        base.bert.embeddings.word_embeddings.weight.add_(0.05)  # not tuned, but the outputs depend on it
    with pytest.raises(AdapterFormatError, match="word_embeddings"):
        PeftModel.from_pretrained(base, saved_adapters.adapters["d"])


@pytest.mark.parametrize("tuned_in, loaded_in", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_an_adapter_tuned_in_one_half_precision_loads_in_the_other(saved_adapters, tmp_path, tuned_in, loaded_in):
    from peft import get_peft_model

    from conftest import ARCHS

    model = get_peft_model(saved_adapters.load_base(dtype=tuned_in),
                           ChildTuningConfig(mode="d", selection="random", reserve_p=0.2, task_type="SEQ_CLS"))
    path = str(tmp_path / "half")
    model.save_pretrained(path)
    loaded = PeftModel.from_pretrained(saved_adapters.load_base(dtype=loaded_in), path)
    with torch.no_grad():
        assert torch.isfinite(loaded(**saved_adapters.batch).logits).all()
    assert ARCHS  # the shared batches' architecture is the one loaded
