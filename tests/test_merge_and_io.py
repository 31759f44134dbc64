"""Merging, unmerging, saving, loading and combining Child-Tuning adapters."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from peft_childtuning import ChildTuningConfig, ChildTuningLayer

from conftest import ARCHS, base_weights, child_layers, composed_weights, peft_model, positions_of, trainable_parameters
from float_tolerance import FLOAT32_EPS, normwise_atol


def trained_model(arch, mode, base=None, steps=2, **kwargs):
    """A mode-"d" (after the Fisher pass) or mode-"f" adapter, trained a few AdamW steps so it differs from the base."""
    base = base if base is not None else arch.build()
    model = peft_model(base, mode=mode, reserve_p=0.3, seed=3, task_type=arch.task_type, **kwargs)
    if mode == "d" and model.peft_config["default"].needs_fisher_pass:
        model.detect_child_network(arch.batches(2, seed=20), progress=False)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model.train()
    for batch in arch.batches(steps, seed=21):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


@torch.no_grad()
def logits(model, batch):
    model.eval()
    return model(**batch).logits


def assert_no_merged_layers(model):
    assert not any(layer.merged for layer in child_layers(model).values())


# ------------------------------------------------------------------------------------------------ merge / unmerge
@pytest.mark.parametrize("mode", ["d", "f"])
def test_merge_unmerge_outputs_and_exact_restore(tiny_models, mode):
    arch = tiny_models
    original = arch.build()
    model = trained_model(arch, mode, base=copy.deepcopy(original))
    batch = arch.batches(1, seed=22)[0]
    before = base_weights(model)
    for key, weight in before.items():
        assert torch.equal(weight, dict(original.named_parameters())[key])
    effective = composed_weights(model)
    assert any(not torch.equal(effective[key], before[key]) for key in before), "adapter did not train"
    with torch.no_grad(), model.disable_adapter():
        base_out = logits(model, batch)
    torch.testing.assert_close(base_out, logits(original, batch), rtol=0, atol=0)

    unmerged_out = logits(model, batch)
    assert not torch.allclose(unmerged_out, base_out)

    model.merge_adapter()
    assert all(layer.merged for layer in child_layers(model).values())
    for layer in child_layers(model).values():
        key = layer.tensor_key("weight")
        assert torch.equal(layer.get_base_layer().weight.detach(), effective[key]), key
    assert torch.equal(logits(model, batch), unmerged_out)  # the same linear maps of the same weights

    model.unmerge_adapter()
    assert_no_merged_layers(model)
    for key, weight in base_weights(model).items():
        assert torch.equal(weight, before[key]), f"unmerge did not restore {key} bit-identically"
    assert torch.equal(logits(model, batch), unmerged_out)

    # merge twice / unmerge twice round trips as well
    for _ in range(2):
        model.merge_adapter()
        model.unmerge_adapter()
    for key, weight in base_weights(model).items():
        assert torch.equal(weight, before[key])


@pytest.mark.parametrize("mode", ["d", "f"])
def test_merge_and_unload_and_unload(mode):
    arch = ARCHS["bert"]
    original = arch.build()
    batch = arch.batches(1, seed=23)[0]

    model = trained_model(arch, mode, base=copy.deepcopy(original))
    effective = composed_weights(model)
    expected = logits(model, batch)
    merged = model.merge_and_unload()
    assert not any(isinstance(module, ChildTuningLayer) for module in merged.modules())
    params = dict(merged.named_parameters())
    for key, weight in effective.items():
        assert torch.equal(params[key].detach(), weight)
    assert torch.equal(logits(merged, batch), expected)

    model = trained_model(arch, mode, base=copy.deepcopy(original))
    model.merge_adapter()
    unloaded = model.unload()
    assert not any(isinstance(module, ChildTuningLayer) for module in unloaded.modules())
    params = dict(unloaded.named_parameters())
    for key, weight in original.named_parameters():
        if key in effective:
            assert torch.equal(params[key].detach(), weight.detach()), key


# ------------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("mode", ["d", "f"])
def test_save_and_load_reproduces_outputs(tiny_models, mode, tmp_path):
    arch = tiny_models
    original = arch.build()
    model = trained_model(arch, mode, base=copy.deepcopy(original))
    batch = arch.batches(1, seed=24)[0]
    expected = logits(model, batch)
    effective = composed_weights(model)

    model.save_pretrained(str(tmp_path))
    files = set(os.listdir(tmp_path))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert "adapter_model.bin" not in files

    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    value_keys = [key for key in saved if "childtuning_values" in key]
    assert all("base_layer" not in key for key in saved), "base weights must not be saved"
    position_keys = [key for key in saved if "childtuning_positions" in key]
    if mode == "d":
        # a tensor whose child network came out empty is not tuned, and not saved
        tuned = len(model.peft_config["default"].child_sizes)
        assert 0 < tuned <= arch.expected_num_targets
        assert len(value_keys) == len(position_keys) == tuned
        assert all(saved[key].numel() for key in value_keys + position_keys)
        k = sum(model.peft_config["default"].child_sizes.values())
        assert sum(saved[key].numel() for key in value_keys) == k
    else:
        assert len(value_keys) == arch.expected_num_targets
        assert not position_keys
    if arch.task_type == "SEQ_CLS":
        assert any("classifier" in key for key in saved)

    for is_trainable in (False, True):
        loaded = PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path), is_trainable=is_trainable)
        config = loaded.peft_config["default"]
        assert isinstance(config, ChildTuningConfig) and config.mode == mode
        assert config.child_sizes == model.peft_config["default"].child_sizes
        out = logits(loaded, batch)
        assert torch.equal(out, expected), "loaded adapter gives different outputs"
        if is_trainable:
            assert_no_merged_layers(loaded)
        for key, weight in composed_weights(loaded).items():
            assert torch.equal(weight, effective[key]), key
        if mode == "d":
            original_layers = child_layers(model)
            for key, layer in child_layers(loaded).items():
                assert torch.equal(positions_of(layer), positions_of(original_layers[key]))
        # the trainable flag is honoured
        assert any(p.requires_grad for p in loaded.parameters()) == is_trainable


def test_loaded_fisher_adapter_trains_further(tmp_path):
    arch = ARCHS["bert"]
    original = arch.build()
    model = trained_model(arch, "d", base=copy.deepcopy(original))
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path), is_trainable=True)
    assert not loaded.peft_config["default"].needs_fisher_pass
    loaded.train()
    loaded(**arch.batches(1)[0]).loss.backward()  # no "detect_child_network first" error
    tuned = [layer for layer in child_layers(loaded).values() if "weight" in layer.tuned_tensor_names("default")]
    assert len(tuned) == len(loaded.peft_config["default"].child_sizes)
    assert all(layer.childtuning_values["default"].grad is not None for layer in tuned)


# ------------------------------------------------------------------------------------------------ several adapters
def test_multiple_adapters_combine():
    arch = ARCHS["bert"]
    original = arch.build()
    base = copy.deepcopy(original)
    model = peft_model(base, mode="d", selection="random", reserve_p=0.3, seed=1, init_weights=False)
    model.add_adapter("second", ChildTuningConfig(mode="d", selection="random", reserve_p=0.3, seed=2, init_weights=False))
    model.add_adapter("third", ChildTuningConfig(mode="f", reserve_p=0.5, seed=3, init_weights=False))
    batch = {key: value for key, value in arch.batches(1, seed=25)[0].items() if key != "labels"}
    before = base_weights(model)

    # expected combined weights: base + the sum of each adapter's change. Summed in another order, they may differ
    # in rounding: each order rounds at most twice per adapter (a change, a sum), every partial result at most
    # `magnitude` = |base| + the sum of |values| + |base| over the adapters, so two orders lie within 2 * 2 * 3 u of it
    expected, bound = {}, {}
    for layer in child_layers(model).values():
        key = layer.tensor_key("weight")
        weight = before[key].clone().reshape(-1)
        magnitude = before[key].abs().reshape(-1)
        for adapter in ("default", "second"):
            positions = positions_of(layer, adapter)
            values, at_positions = layer.childtuning_values[adapter].detach(), before[key].reshape(-1)[positions]
            weight.index_add_(0, positions, values - at_positions)
            magnitude = magnitude.index_add(0, positions, values.abs() + at_positions.abs())
        third = layer.childtuning_values["third"].detach()
        weight += (third - before[key]).reshape(-1)
        magnitude = magnitude + (third.abs() + before[key].abs()).reshape(-1)
        expected[key] = weight.view_as(before[key])
        bound[key] = (2 * 2 * 3 * FLOAT32_EPS * magnitude).view_as(before[key])
    overlap = sum(
        len(set(positions_of(layer, "default").tolist()) & set(positions_of(layer, "second").tolist()))
        for layer in child_layers(model).values()
    )
    assert overlap > 0, "the test needs overlapping child networks"

    model.base_model.set_adapter(["default", "second", "third"])
    combined = {}
    for layer in child_layers(model).values():
        key = layer.tensor_key("weight")
        with torch.no_grad():
            combined[key] = layer.compose("weight", ["default", "second", "third"])
        assert bool(((combined[key] - expected[key]).abs() <= bound[key]).all()), key

    # the forward runs the combined weights
    reference = copy.deepcopy(original)
    with torch.no_grad():
        params = dict(reference.named_parameters())
        for key, weight in combined.items():
            params[key].copy_(weight)
    combined_out = logits(model, batch)
    assert torch.equal(combined_out, logits(reference, batch))

    # one adapter alone differs from the combination
    model.base_model.set_adapter("default")
    assert not torch.allclose(logits(model, batch), combined_out, atol=1e-5)

    # merging all three gives the same outputs, and unmerging restores the base exactly
    model.base_model.set_adapter(["default", "second", "third"])
    model.merge_adapter(["default", "second", "third"])
    for layer in child_layers(model).values():
        key = layer.tensor_key("weight")
        assert bool(((layer.get_base_layer().weight.detach() - expected[key]).abs() <= bound[key]).all()), key
    # merged weights are summed in another order than the combined ones: outputs within float32 rounding
    torch.testing.assert_close(logits(model, batch), combined_out, rtol=0, atol=normwise_atol(combined_out))
    model.unmerge_adapter()
    for key, weight in base_weights(model).items():
        assert torch.equal(weight, before[key]), key


def test_switching_adapters_and_deleting():
    arch = ARCHS["bert"]
    model = peft_model(arch.build(), mode="d", selection="random", seed=1, init_weights=False)
    model.add_adapter("other", ChildTuningConfig(mode="d", selection="random", seed=2, init_weights=False))
    batch = {key: value for key, value in arch.batches(1, seed=26)[0].items() if key != "labels"}
    out_default = logits(model, batch)
    model.set_adapter("other")
    out_other = logits(model, batch)
    assert not torch.allclose(out_default, out_other)
    # trainable parameters follow the active adapter
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".other" in name for name in trainable)
    model.set_adapter("default")
    assert torch.equal(logits(model, batch), out_default)
    model.delete_adapter("other")
    assert all("other" not in layer.childtuning_values for layer in child_layers(model).values())
    assert torch.equal(logits(model, batch), out_default)


def test_switching_merged_adapters_writes_in_place_and_exactly(tmp_path):
    """A merged model switches adapters by writing the child entries back and in, in the copy its first merge made:
    no new storage per switch (the cost follows the child entries, not the model), the same outputs as unmerged."""
    arch = ARCHS["bert"]
    model = peft_model(arch.build(), mode="d", selection="random", seed=1, init_weights=False)
    model.add_adapter("other", ChildTuningConfig(mode="d", selection="random", seed=2, init_weights=False))
    batch = {key: value for key, value in arch.batches(1, seed=27)[0].items() if key != "labels"}
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = logits(model, batch)
    before = base_weights(model)
    model.set_adapter("default")
    model.merge_adapter(safe_merge=True)
    storage = {key: layer.get_base_layer().weight.data_ptr() for key, layer in child_layers(model).items()}
    for name in ("other", "default", "other"):
        model.set_adapter(name)
        assert torch.equal(logits(model, batch), expected[name]), name
        for key, layer in child_layers(model).items():
            assert layer.get_base_layer().weight.data_ptr() == storage[key], f"{key}: switching copied the tensor"
    model.unmerge_adapter()
    for key, weight in base_weights(model).items():
        assert torch.equal(weight, before[key]), key
