"""Clause 2 of the loading contract: a failed load changes nothing (the cases fault injection does not draw).

Failures injected inside the loaders themselves (memory running out while merging, an error of peft's own after the
layers were built), on every loader: afterwards the model is exactly what it was, a user's base carries no wrapper and
saves every tensor it had, and the error is an `AdapterFormatError` naming the file, with the original as its cause.
The CLI reports a bad adapter in one line and exit status 2. The fault-injection run is in test_fault_injection.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from peft_childtuning import AdapterFormatError, ChildTuningLayer
from peft_childtuning.cli import main as cli_main

from conftest import LOADERS, loader_target, rewrite_weights, run_loader
from model_state import ModelState


def _fail_on_merge(monkeypatch, error: BaseException) -> None:
    """The next merge fails (once: restoring the model merges again what was merged before)."""
    original_merge = ChildTuningLayer.merge
    failed = []

    def merge(self, *args, **kwargs):
        if not failed:
            failed.append(True)
            raise error
        return original_merge(self, *args, **kwargs)

    monkeypatch.setattr(ChildTuningLayer, "merge", merge)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("error", [MemoryError("out of memory (injected)"), RuntimeError("injected failure")])
def test_a_failure_while_merging_at_load_changes_nothing(saved_adapters, monkeypatch, loader, error):
    target = loader_target(loader, saved_adapters)
    before = ModelState.capture(target)
    with torch.no_grad():
        outputs_before = target(**saved_adapters.batch).logits
    _fail_on_merge(monkeypatch, error)
    with pytest.raises(AdapterFormatError, match="injected") as caught:
        run_loader(loader, target, saved_adapters.adapters["d"])
    assert caught.value.__cause__ is error
    assert saved_adapters.adapters["d"] in str(caught.value)
    monkeypatch.undo()
    before.assert_unchanged(ModelState.capture(target))
    with torch.no_grad():
        assert torch.equal(target(**saved_adapters.batch).logits, outputs_before)


def test_a_failure_reloading_an_existing_merged_adapter_keeps_it_merged_and_exact(saved_adapters, monkeypatch):
    from peft import PeftModel

    model = PeftModel.from_pretrained(saved_adapters.load_base(), saved_adapters.adapters["d"])
    before = ModelState.capture(model)
    original_merge = ChildTuningLayer.merge
    calls = {"count": 0}

    def merge_then_fail(self, *args, **kwargs):  # the layers unmerge, load, and the third merge fails
        calls["count"] += 1
        if calls["count"] == 3:
            raise MemoryError("out of memory (injected)")
        return original_merge(self, *args, **kwargs)

    monkeypatch.setattr(ChildTuningLayer, "merge", merge_then_fail)
    with pytest.raises(AdapterFormatError, match="injected"):
        model.load_adapter(saved_adapters.adapters["d"], adapter_name="default")
    monkeypatch.undo()
    before.assert_unchanged(ModelState.capture(model))
    with torch.no_grad():
        assert torch.equal(model(**saved_adapters.batch).logits, saved_adapters.outputs["d"])


def test_a_users_base_after_a_failed_load_saves_every_tensor(saved_adapters, tmp_path):
    adapter_dir = saved_adapters.copy_adapter("d", str(tmp_path / "adapter"))
    rewrite_weights(adapter_dir, lambda tensors: tensors.pop("base_model.model.classifier.weight"))
    base = saved_adapters.load_base()
    with pytest.raises(AdapterFormatError, match="classifier.weight"):
        run_loader("from_pretrained", base, adapter_dir)
    assert not [name for name in base.state_dict() if "base_layer" in name or "modules_to_save" in name]
    base.save_pretrained(str(tmp_path / "resaved"))
    resaved = load_file(os.path.join(tmp_path, "resaved", "model.safetensors"))
    original = load_file(os.path.join(saved_adapters.base, "model.safetensors"))
    assert set(resaved) == set(original)
    assert all(torch.equal(resaved[key], original[key]) for key in original)


@pytest.mark.parametrize("command", ["merge", "inspect"])
def test_the_cli_reports_a_bad_adapter_in_one_line(saved_adapters, tmp_path, capsys, command):
    adapter_dir = saved_adapters.copy_adapter("d", str(tmp_path / "adapter"))
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    with open(weights, "r+b") as handle:
        handle.truncate(os.path.getsize(weights) // 2)
    argv = (["merge", "--base", saved_adapters.base, "--adapter", adapter_dir, "--out", str(tmp_path / "out")]
            if command == "merge" else ["inspect", adapter_dir])
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("peft-childtuning: error:")]) == 1
    assert not (tmp_path / "out").exists()
