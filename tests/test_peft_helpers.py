"""peft's helpers and status functions on Child-Tuning models, beside LoRA: disable_input_dtype_casting works,
get_layer_status / get_model_status report every state consistently, rescale_adapter_scale and PeftMixedModel are
refused with our reason."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftMixedModel, PeftModel, get_layer_status, get_model_status, get_peft_model
from peft.helpers import disable_input_dtype_casting, rescale_adapter_scale

from peft_childtuning import AdapterFormatError, ChildTuningConfig, ChildTuningLayer
from peft_childtuning.helpers import MIXED_REFUSAL, RESCALE_REFUSAL

from conftest import ARCHS, child_layers, tiny_bert

BATCH = {key: value for key, value in ARCHS["bert"].batches(1, seed=5)[0].items() if key != "labels"}


def childtuning_config(**kwargs) -> ChildTuningConfig:
    """A random mode-"d" child network, perturbed so that the adapter changes the outputs."""
    return ChildTuningConfig(
        mode="d", selection="random", reserve_p=kwargs.pop("reserve_p", 0.3), task_type="SEQ_CLS", init_weights=False,
        **kwargs,
    )


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False)


def fresh(config) -> PeftModel:
    return get_peft_model(tiny_bert(), config).eval()


def loaded(config, tmp_path) -> PeftModel:
    """Saved, then loaded for inference with PeftModel.from_pretrained (which merges a Child-Tuning adapter)."""
    fresh(config).save_pretrained(str(tmp_path))
    return PeftModel.from_pretrained(tiny_bert(), str(tmp_path)).eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(**BATCH).logits


# ------------------------------------------------------------------------------------ disable_input_dtype_casting
@pytest.mark.parametrize("origin", ["fresh", "loaded"])
def test_disable_input_dtype_casting_is_honoured_and_changes_nothing(origin, tmp_path):
    model = fresh(childtuning_config()) if origin == "fresh" else loaded(childtuning_config(), tmp_path)
    layers = list(child_layers(model).values())
    expected = logits(model)
    with disable_input_dtype_casting(model):
        assert all(layer.cast_input_dtype_enabled is False for layer in layers)
        inside = logits(model)
    assert all(layer.cast_input_dtype_enabled is True for layer in layers)
    # Child-Tuning never casts the input, so the flag has nothing to change
    assert torch.equal(inside, expected)
    assert not torch.equal(expected, logits(tiny_bert().eval()))  # the adapter is in the outputs


def test_disable_input_dtype_casting_in_bf16_beside_lora():
    """A bf16 base with fp32 adapter values: LoRA needs the input cast to its fp32 weights, Child-Tuning casts its
    values to the bf16 weight instead and never the input, so switching casting off changes nothing."""
    childtuning = get_peft_model(tiny_bert().to(torch.bfloat16), childtuning_config()).eval()
    assert {layer.child_values("default", "weight").dtype for layer in child_layers(childtuning).values()} == {
        torch.float32
    }
    expected = logits(childtuning)
    with disable_input_dtype_casting(childtuning):
        assert torch.equal(logits(childtuning), expected)
    lora = get_peft_model(tiny_bert().to(torch.bfloat16), lora_config()).eval()
    logits(lora)
    with disable_input_dtype_casting(lora), pytest.raises(RuntimeError, match="dtype"):
        logits(lora)


# ------------------------------------------------------------------------------------ get_layer_status / model_status
def assert_status(model, merged: list[str], requires_grad: bool, enabled: bool = True) -> None:
    """The model's status, and every layer's, say the same: one adapter, `merged` merged, nothing irregular."""
    status = model.get_model_status()
    assert status.merged_adapters == merged
    assert status.active_adapters == ["default"]
    assert status.available_adapters == ["default"]
    assert status.enabled is enabled
    assert status.requires_grad == {"default": requires_grad}
    assert status.devices == {"default": ["cpu"]}
    assert get_model_status(model) == status
    layers = model.get_layer_status()
    assert get_layer_status(model) == layers
    assert {layer.name.rpartition(".")[2] for layer in layers} >= {"query", "classifier"}
    for layer in layers:
        assert layer.merged_adapters == merged, layer.name
        assert (layer.active_adapters, layer.available_adapters) == (["default"], ["default"]), layer.name
        assert layer.enabled is enabled and layer.requires_grad == {"default": requires_grad}, layer.name


def test_status_of_a_fresh_model_matches_lora():
    childtuning, lora = fresh(childtuning_config()), fresh(lora_config())
    assert_status(childtuning, merged=[], requires_grad=True)
    assert_status(lora, merged=[], requires_grad=True)


def test_status_merged_and_unmerged():
    model = fresh(childtuning_config())
    model.merge_adapter()
    assert_status(model, merged=["default"], requires_grad=True)
    model.unmerge_adapter()
    assert_status(model, merged=[], requires_grad=True)


def test_status_of_a_model_loaded_for_inference(tmp_path):
    model = loaded(childtuning_config(), tmp_path)
    assert all(layer.merged for layer in child_layers(model).values())  # loading merged it
    assert_status(model, merged=["default"], requires_grad=False)
    with model.disable_adapter():
        assert_status(model, merged=["default"], requires_grad=False, enabled=False)
        base_logits = logits(model)  # runs the base: the layers unmerge
        assert_status(model, merged=[], requires_grad=False, enabled=False)
    assert torch.equal(base_logits, logits(tiny_bert().eval()))
    # peft's enable_adapters makes the active adapter trainable again on leaving, LoRA's as well
    assert_status(model, merged=[], requires_grad=True)
    model.merge_adapter()
    assert_status(model, merged=["default"], requires_grad=True)


def test_status_with_a_layer_whose_child_network_is_empty():
    """A layer left without child entries still holds the adapter, and merges it (as a no-op) with the others."""
    model = fresh(childtuning_config(reserve_p=0.0005))
    assert any(not layer.tuned_tensor_names("default") for layer in child_layers(model).values())
    model.merge_adapter()
    status = model.get_model_status()
    assert status.merged_adapters == ["default"]
    assert all(layer.available_adapters == layer.merged_adapters == ["default"] for layer in model.get_layer_status())


def test_status_of_a_model_loaded_by_transformers(tmp_path):
    fresh(childtuning_config()).save_pretrained(str(tmp_path))
    model = tiny_bert()
    model.load_adapter(str(tmp_path), adapter_name="default")
    assert get_model_status(model).merged_adapters == ["default"]
    assert {tuple(layer.merged_adapters) for layer in get_layer_status(model)} == {("default",)}


def test_status_of_lora_is_peft_own():
    """The modules_to_save copies follow the Child-Tuning layers only: a LoRA model gets peft's report as it is."""
    import peft.peft_model
    from peft_childtuning import helpers

    model = fresh(lora_config())
    model.merge_adapter()
    assert peft.peft_model.get_layer_status is helpers._get_layer_status
    assert model.get_layer_status() == helpers._ORIGINALS["get_layer_status"](model)


# ------------------------------------------------------------------------------------ rescale_adapter_scale
@pytest.mark.parametrize("origin", ["fresh", "loaded"])
def test_rescale_adapter_scale_is_refused_with_the_reason(origin, tmp_path):
    model = fresh(childtuning_config()) if origin == "fresh" else loaded(childtuning_config(), tmp_path)
    expected = logits(model)
    with pytest.raises(ValueError, match="rescale_adapter_scale does not support Child-Tuning") as refused:
        with rescale_adapter_scale(model, 0.5):
            pass
    assert str(refused.value) == RESCALE_REFUSAL and "no scale" in RESCALE_REFUSAL
    assert torch.equal(logits(model), expected)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_rescale_adapter_scale_is_refused_for_lora_beside_childtuning():
    """transformers lets one model hold both kinds: peft's helper would scale the LoRA layers only, silently."""
    model = tiny_bert()
    model.add_adapter(LoraConfig(r=4, target_modules=["query"]), adapter_name="lora")
    model.add_adapter(childtuning_config(target_modules=["key"]), adapter_name="childtuning")
    with pytest.raises(ValueError, match="rescale_adapter_scale does not support Child-Tuning"):
        rescale_adapter_scale(model, 0.5)


def test_rescale_adapter_scale_still_works_for_lora():
    model = fresh(lora_config())
    expected = logits(model)
    with rescale_adapter_scale(model, 0.5):
        assert not torch.allclose(logits(model), expected)
    assert torch.equal(logits(model), expected)


# ------------------------------------------------------------------------------------ PeftMixedModel
def test_mixed_model_creation_is_refused_with_the_reason():
    base = tiny_bert()
    with pytest.raises(ValueError, match="PeftMixedModel does not support Child-Tuning") as refused:
        get_peft_model(base, childtuning_config(), mixed=True)
    assert str(refused.value) == MIXED_REFUSAL and "COMPATIBLE_TUNER_TYPES" in MIXED_REFUSAL
    with pytest.raises(ValueError, match="PeftMixedModel does not support Child-Tuning"):
        PeftMixedModel(base, childtuning_config())
    assert not any(isinstance(module, ChildTuningLayer) for module in base.modules())


def test_adding_childtuning_to_a_mixed_lora_model_is_refused(tmp_path):
    mixed = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query"]), mixed=True)
    with pytest.raises(ValueError, match="PeftMixedModel does not support Child-Tuning"):
        mixed.add_adapter("childtuning", childtuning_config())
    fresh(childtuning_config()).save_pretrained(str(tmp_path))
    with pytest.raises(AdapterFormatError) as refused:
        mixed.load_adapter(str(tmp_path), "childtuning")
    assert str(refused.value.__cause__) == MIXED_REFUSAL
    assert list(mixed.peft_config) == ["default"]
    assert not any(isinstance(module, ChildTuningLayer) for module in mixed.modules())


def test_mixed_from_pretrained_is_refused_by_peft(tmp_path):
    """peft checks the adapter type before the config reaches the check above: its own refusal, nothing loaded."""
    fresh(childtuning_config()).save_pretrained(str(tmp_path))
    base = tiny_bert()
    with pytest.raises(ValueError, match="CHILDTUNING is not supported for mixed models"):
        PeftMixedModel.from_pretrained(base, str(tmp_path))
    assert not any(isinstance(module, ChildTuningLayer) for module in base.modules())
