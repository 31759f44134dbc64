"""Clause 4 of the loading contract: validate what will be used, before anything is allocated or written.

Child sizes in adapter_config.json are bounded by the tensors they name before any placeholder is allocated; values
are checked finite after the cast to the dtype they are merged into; values must be floating point on every loader.
"""

from __future__ import annotations

import resource

import pytest
import torch

from peft_childtuning import AdapterFormatError

from conftest import LOADERS, loader_target, rewrite_config, rewrite_weights, run_loader
from model_state import ModelState

VALUES = "base_model.model.bert.encoder.layer.0.output.dense.childtuning_values"
TENSOR_KEY = "bert.encoder.layer.0.output.dense.weight"


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize("loader", LOADERS)
def test_huge_child_sizes_are_refused_before_allocating(saved_adapters, tmp_path, loader):
    adapter_dir = saved_adapters.copy_adapter("d", str(tmp_path / "adapter"))
    rewrite_config(adapter_dir, lambda config: config["child_sizes"].__setitem__(TENSOR_KEY, 500_000_000))
    target = loader_target(loader, saved_adapters)
    before, rss_before = ModelState.capture(target), _max_rss_bytes()
    with pytest.raises(AdapterFormatError, match="does not fit"):
        run_loader(loader, target, adapter_dir)
    assert _max_rss_bytes() - rss_before < 500 * 2**20  # a 500M-entry placeholder would take 1-2 GB
    before.assert_unchanged(ModelState.capture(target))


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("size", [-1, 10**30])
def test_child_sizes_out_of_range_are_refused(saved_adapters, tmp_path, loader, size):
    adapter_dir = saved_adapters.copy_adapter("d", str(tmp_path / "adapter"))
    rewrite_config(adapter_dir, lambda config: config["child_sizes"].__setitem__(TENSOR_KEY, size))
    target = loader_target(loader, saved_adapters)
    before = ModelState.capture(target)
    with pytest.raises(AdapterFormatError):
        run_loader(loader, target, adapter_dir)
    before.assert_unchanged(ModelState.capture(target))


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(
    "case",
    ["float64_1e300", "fp32_7e4_onto_fp16", "bool", "int32", "mode_f_float64_1e300"],
)
def test_values_checked_in_the_dtype_they_are_merged_into(saved_adapters, tmp_path, loader, case):
    mode = "f" if case.startswith("mode_f") else "d"
    adapter_dir = saved_adapters.copy_adapter(mode, str(tmp_path / "adapter"))
    key = VALUES if mode == "d" else "base_model.model.bert.encoder.layer.0.output.dense.childtuning_values"

    def edit(tensors):
        values = tensors[key]
        if case.endswith("float64_1e300"):
            values = values.double()
            values.reshape(-1)[0] = 1e300
        elif case == "fp32_7e4_onto_fp16":
            values = values.float()
            values.reshape(-1)[0] = 7e4  # finite in fp32, inf in fp16
        elif case == "bool":
            values = values != 0
        else:
            values = values.to(torch.int32)
        tensors[key] = values

    rewrite_weights(adapter_dir, edit)
    target = loader_target(loader, saved_adapters, torch.float16 if case == "fp32_7e4_onto_fp16" else torch.float32)
    before = ModelState.capture(target)
    with pytest.raises(AdapterFormatError, match="NaN or inf|floating point"):
        run_loader(loader, target, adapter_dir)
    before.assert_unchanged(ModelState.capture(target))
