"""Loading a saved Child-Tuning adapter everywhere: peft's loaders, AutoPeftModel, transformers' load_adapter.

An adapter loaded for inference is merged at load and is bit-identical (fp32) to the trained model; merging is exact in
fp32, bf16 and fp16 and undone exactly; several adapters can be loaded, switched, disabled and deleted with the base
restored bit for bit; the base fingerprint rejects another base unless ignore_base_mismatch is set.

Bases are built from configs and saved into tmp dirs (base_model_name_or_path is a local path; HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os

import pytest
import torch
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertForSequenceClassification

from peft_childtuning import ChildTuningConfig, ChildTuningLayer
from peft_childtuning.sparse_format import AdapterFormatError

from conftest import ARCHS, child_layers, composed_weights, peft_model, positions_of, tiny_bert, tiny_gpt2

BERT, GPT2 = ARCHS["bert"], ARCHS["gpt2"]
HEAD_KEYS = ("classifier.weight", "classifier.bias")


@pytest.fixture(scope="module", autouse=True)
def hub_offline():
    """Everything here loads from local directories: no Hub access (without leaking the setting to other modules)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


# ------------------------------------------------------------------------------------------------ helpers
def load_bert(base_dir: str, dtype: torch.dtype = torch.float32) -> BertForSequenceClassification:
    return AutoModelForSequenceClassification.from_pretrained(base_dir, dtype=dtype).eval()


def train(model, arch, steps: int = 2, seed: int = 21, lr: float = 1e-2):
    if model.peft_config[model.active_adapter].needs_fisher_pass:
        model.detect_child_network(arch.batches(2, seed=20), progress=False)
    # eps=1e-6: AdamW's default 1e-8 underflows to 0 in an fp16 head, and 0/0 would put NaN in it
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, eps=1e-6)
    model.train()
    for batch in arch.batches(steps, seed=seed):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


def inputs(arch, seed: int = 40) -> dict[str, torch.Tensor]:
    return {k: v for k, v in arch.batches(1, seed=seed)[0].items() if k != "labels"}


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(**batch).logits


def params(model) -> dict[str, torch.Tensor]:
    """Parameters by their name in the base model (peft's wrappers' `base_layer.` removed)."""
    return {
        name.replace("base_model.model.", "").replace(".base_layer", ""): p.detach()
        for name, p in model.named_parameters()
        if "childtuning_" not in name and "modules_to_save" not in name and "original_module" not in name
    }


def child_weight(base_weight: torch.Tensor, layer: ChildTuningLayer, adapter: str) -> torch.Tensor:
    """The base weight with the adapter's child values written in (in the base dtype): the merged weight."""
    flat = base_weight.detach().clone().reshape(-1)
    if "weight" in layer.tuned_tensor_names(adapter):  # else its child network came out empty
        flat[positions_of(layer, adapter)] = layer.childtuning_values[adapter].detach().to(flat.dtype)
    return flat.view_as(base_weight)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT on disk; adapter A (Fisher, reserve_p 0.3) and B (random child network, 0.2) trained from it."""
    root = tmp_path_factory.mktemp("loading")
    base_dir = str(root / "base")
    tiny_bert(seed=0).save_pretrained(base_dir)
    batch = inputs(BERT)
    setup = {"base": base_dir, "batch": batch, "base_out": logits(load_bert(base_dir), batch),
             "base_params": params(load_bert(base_dir))}
    adapters = {"A": dict(reserve_p=0.3, seed=3), "B": dict(reserve_p=0.2, selection="random", seed=7)}
    for name, kwargs in adapters.items():
        model = train(peft_model(load_bert(base_dir), mode="d", task_type="SEQ_CLS", **kwargs), BERT,
                      seed=21 if name == "A" else 22)
        path = str(root / name)
        model.save_pretrained(path)
        setup[name] = path
        setup[f"{name}_out"] = logits(model, batch)
        setup[f"{name}_composed"] = composed_weights(model)
        setup[f"{name}_head"] = {
            key: p.detach().clone()
            for key, p in model.base_model.model.classifier.modules_to_save["default"].named_parameters()
        }
    assert not torch.allclose(setup["A_out"], setup["B_out"])
    assert not torch.allclose(setup["A_out"], setup["base_out"])
    return setup


def assert_base_tensors_equal(model, base_params: dict[str, torch.Tensor], skip_heads: bool = True) -> None:
    current = params(model)
    for key, value in base_params.items():
        if skip_heads and key in HEAD_KEYS:
            continue
        assert torch.equal(current[key], value), f"{key} differs from the base"


# ------------------------------------------------------------------------------------------------ 3/4. loaders
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_from_pretrained_merges_at_load_and_is_bit_identical(bert, low_cpu_mem_usage):
    model = PeftModel.from_pretrained(load_bert(bert["base"]), bert["A"], low_cpu_mem_usage=low_cpu_mem_usage)
    layers = child_layers(model)
    assert layers and all(layer.merged and layer.merged_adapters == ["default"] for layer in layers.values())
    for layer in layers.values():
        key = layer.tensor_key("weight")
        assert torch.equal(layer.get_base_layer().weight.detach(), bert["A_composed"][key]), key
    assert torch.equal(logits(model, bert["batch"]), bert["A_out"])
    assert not any(p.requires_grad for p in model.parameters())
    # the state dict still shows the unmerged base tensors
    state = model.state_dict()
    for key in bert["A_composed"]:
        module = key.rsplit(".", 1)[0]
        assert torch.equal(state[f"base_model.model.{module}.base_layer.weight"], bert["base_params"][key]), key


def test_resaving_a_merged_adapter_gives_the_same_tensors(bert, tmp_path):
    model = PeftModel.from_pretrained(load_bert(bert["base"]), bert["A"])
    model.save_pretrained(str(tmp_path))
    original = load_file(os.path.join(bert["A"], "adapter_model.safetensors"))
    resaved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert set(original) == set(resaved)
    for key, value in original.items():
        assert resaved[key].dtype == value.dtype and torch.equal(resaved[key], value), key


def test_is_trainable_loads_unmerged_and_trainable(bert):
    model = PeftModel.from_pretrained(load_bert(bert["base"]), bert["A"], is_trainable=True)
    assert not any(layer.merged for layer in child_layers(model).values())
    assert torch.equal(logits(model, bert["batch"]), bert["A_out"])
    values = [values for layer in child_layers(model).values() for values in layer.childtuning_values.values()]
    assert len(values) == len(model.peft_config["default"].child_sizes)
    assert all(parameter.requires_grad for parameter in values)
    assert_base_tensors_equal(model, bert["base_params"])


def test_peft_model_load_adapter(bert):
    model = PeftModel.from_pretrained(load_bert(bert["base"]), bert["B"], adapter_name="b")
    model.load_adapter(bert["A"], adapter_name="a")
    assert torch.equal(logits(model, bert["batch"]), bert["B_out"])
    model.set_adapter("a")
    assert torch.equal(logits(model, bert["batch"]), bert["A_out"])


def test_auto_peft_model_for_sequence_classification(bert):
    model = AutoPeftModelForSequenceClassification.from_pretrained(bert["A"])
    assert isinstance(model.base_model.model, BertForSequenceClassification)
    assert all(layer.merged for layer in child_layers(model).values())
    assert torch.equal(logits(model, bert["batch"]), bert["A_out"])


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    base_dir = str(root / "base")
    tiny_gpt2(seed=0).save_pretrained(base_dir)
    model = train(peft_model(AutoModelForCausalLM.from_pretrained(base_dir), mode="d", reserve_p=0.3,
                             task_type="CAUSAL_LM"), GPT2)
    path = str(root / "adapter")
    model.save_pretrained(path)
    batch = inputs(GPT2)
    return {"base": base_dir, "adapter": path, "batch": batch, "out": logits(model, batch),
            "composed": composed_weights(model)}


def test_auto_peft_model_for_causal_lm(gpt2):
    model = AutoPeftModelForCausalLM.from_pretrained(gpt2["adapter"])
    layers = child_layers(model)
    assert layers and all(layer.merged for layer in layers.values())
    for layer in layers.values():  # GPT-2's Conv1D weights
        assert torch.equal(layer.get_base_layer().weight.detach(), gpt2["composed"][layer.tensor_key("weight")])
    assert torch.equal(logits(model, gpt2["batch"]), gpt2["out"])


def test_transformers_load_adapter(bert):
    base = load_bert(bert["base"])
    base.load_adapter(bert["A"])
    assert any(isinstance(module, ChildTuningLayer) for module in base.modules())
    assert torch.equal(logits(base, bert["batch"]), bert["A_out"])
    for layer in child_layers(base).values():  # the base tensors themselves are never written
        key = layer.tensor_key("weight")
        assert torch.equal(layer.unmerged_base_tensor("weight"), bert["base_params"][key]), key


def test_merge_and_unload_returns_a_plain_transformers_model(bert):
    model = PeftModel.from_pretrained(load_bert(bert["base"]), bert["A"])
    merged = model.merge_and_unload()
    assert type(merged) is BertForSequenceClassification
    assert not any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in merged.modules())
    assert set(merged.state_dict()) == set(load_bert(bert["base"]).state_dict())
    current = dict(merged.named_parameters())
    for key, weight in bert["A_composed"].items():
        assert torch.equal(current[key].detach(), weight), key
    for name in ("weight", "bias"):
        assert torch.equal(current[f"classifier.{name}"].detach(), bert["A_head"][name])
    assert torch.equal(logits(merged, bert["batch"]), bert["A_out"])


def test_unload_returns_the_base_bit_identical(bert):
    model = PeftModel.from_pretrained(load_bert(bert["base"]), bert["A"])  # merged at load
    unloaded = model.unload()
    assert type(unloaded) is BertForSequenceClassification
    assert not any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in unloaded.modules())
    # every base tensor bit-identical; peft's unload keeps the adapter's copy of modules_to_save (the head)
    current = dict(unloaded.named_parameters())
    for key, value in bert["base_params"].items():
        expected = bert["A_head"][key.split(".")[-1]] if key in HEAD_KEYS else value
        assert torch.equal(current[key].detach(), expected), key
    # with the head put back, the outputs are the base's, bit for bit
    with torch.no_grad():
        for key in HEAD_KEYS:
            current[key].copy_(bert["base_params"][key])
    assert torch.equal(logits(unloaded, bert["batch"]), bert["base_out"])


# ------------------------------------------------------------------------------------------------ 5. exactness
@pytest.mark.parametrize("mode", ["d", "f"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_merge_is_exact_in_every_dtype(bert, tmp_path, dtype, mode):
    base = load_bert(bert["base"], dtype=dtype)
    config = dict(mode=mode, reserve_p=0.3, seed=4, init_weights=False, task_type="SEQ_CLS")
    if mode == "d":
        config["selection"] = "random"
    trained = train(peft_model(base, **config), BERT, steps=1, lr=1e-3)
    effective = composed_weights(trained)  # layer.compose("weight", [adapter]) before saving
    trained.save_pretrained(str(tmp_path))

    original = {key: p.clone() for key, p in params(load_bert(bert["base"], dtype=dtype)).items()}
    model = PeftModel.from_pretrained(load_bert(bert["base"], dtype=dtype), str(tmp_path))
    layers = list(child_layers(model).values())
    assert all(layer.merged for layer in layers)
    changed = 0
    for layer in layers:
        key = layer.tensor_key("weight")
        weight = layer.get_base_layer().weight
        assert weight.dtype == dtype
        assert torch.equal(weight.detach(), effective[key]), f"{key}: merged != trained effective weight"
        changed += int(not torch.equal(effective[key], original[key]))
    assert changed, "the adapter did not change any weight"

    model.unmerge_adapter()
    assert_base_tensors_equal(model, original)
    for _ in range(10):  # through peft's API
        model.merge_adapter()
        model.unmerge_adapter()
    for _ in range(1000):  # the layers' own merge / unmerge (what merge_adapter calls), without peft's overhead
        for layer in layers:
            layer.merge()
            layer.unmerge()
    assert not any(layer.merged for layer in layers)
    assert_base_tensors_equal(model, original)
    model.merge_adapter()
    for layer in layers:
        assert torch.equal(layer.get_base_layer().weight.detach(), effective[layer.tensor_key("weight")])


def test_fp32_adapter_loads_onto_a_bf16_base(bert):
    """The fingerprint accepts the same base in another dtype; the child values are rounded to it."""
    model = PeftModel.from_pretrained(load_bert(bert["base"], dtype=torch.bfloat16), bert["A"])
    base_bf16 = params(load_bert(bert["base"], dtype=torch.bfloat16))
    for layer in child_layers(model).values():
        key = layer.tensor_key("weight")
        expected = child_weight(base_bf16[key], layer, "default")
        assert torch.equal(layer.get_base_layer().weight.detach(), expected), key
        assert torch.equal(expected, bert["A_composed"][key].to(torch.bfloat16)), key


# ------------------------------------------------------------------------------------------------ 6. several adapters
def test_several_adapters_switch_disable_delete(bert):
    base_params = bert["base_params"]
    model = PeftModel.from_pretrained(load_bert(bert["base"]), bert["A"], adapter_name="a")
    model.load_adapter(bert["B"], adapter_name="b")
    layers = list(child_layers(model).values())
    # merging may give a weight new storage (as peft's safe_merge does), never a new Parameter: optimizers and tied
    # modules hold the Parameter
    parameters = {id(layer): layer.get_base_layer().weight for layer in layers}

    def check_active(adapter: str, expected_out: torch.Tensor) -> None:
        """`adapter` alone in effect, merged or not; only its child entries differ from the base."""
        other = "b" if adapter == "a" else "a"
        for layer in layers:
            key = layer.tensor_key("weight")
            weight = layer.get_base_layer().weight.detach()
            assert layer.active_adapters == [adapter] and other not in layer.merged_adapters, key
            assert layer.get_base_layer().weight is parameters[id(layer)], f"{key}: the Parameter was replaced"
            if layer.merged:
                assert layer.merged_adapters == [adapter], key
                assert torch.equal(weight, child_weight(base_params[key], layer, adapter)), key
                differs = set((weight != base_params[key]).reshape(-1).nonzero().squeeze(1).tolist())
                assert differs <= set(positions_of(layer, adapter).tolist()), f"{key}: non-child entries written"
            else:
                assert torch.equal(weight, base_params[key]), f"{key}: unmerged, but the weight is not the base"
            assert torch.equal(layer.unmerged_base_tensor("weight"), base_params[key]), key
        assert torch.equal(logits(model, bert["batch"]), expected_out)

    check_active("a", bert["A_out"])
    model.set_adapter("b")
    check_active("b", bert["B_out"])
    model.set_adapter("a")
    check_active("a", bert["A_out"])

    with model.disable_adapter():
        # the shared head is switched off too, so the outputs are the base model's, and its weights are the base's
        assert torch.equal(logits(model, bert["batch"]), bert["base_out"])
        assert_base_tensors_equal(model, base_params)
    assert torch.equal(logits(model, bert["batch"]), bert["A_out"])
    if not any(layer.merged for layer in layers):  # disabling unmerged the layers: merge again
        assert_base_tensors_equal(model, base_params)
        model.merge_adapter()
    check_active("a", bert["A_out"])

    model.delete_adapter("b")  # inactive
    assert all("b" not in layer.childtuning_values and "b" not in layer.childtuning_positions for layer in layers)
    assert "b" not in model.peft_config
    assert torch.equal(logits(model, bert["batch"]), bert["A_out"])
    for layer in layers:
        assert torch.equal(layer.unmerged_base_tensor("weight"), base_params[layer.tensor_key("weight")])

    # deleting the active adapter that was merged at load: either it works, or it refuses clearly and the model is
    # intact; after unmerging it works
    model.load_adapter(bert["B"], adapter_name="b")
    model.set_adapter("b")
    try:
        model.delete_adapter("b")
    except ValueError as error:
        assert "merged" in str(error)
        assert torch.equal(logits(model, bert["batch"]), bert["B_out"])
        model.unmerge_adapter()
        model.delete_adapter("b")
    assert all("b" not in layer.childtuning_values for layer in layers)
    assert not any("b" in layer.merged_adapters for layer in layers)
    for layer in layers:
        assert torch.equal(layer.unmerged_base_tensor("weight"), base_params[layer.tensor_key("weight")])
    model.set_adapter("a")
    assert torch.equal(logits(model, bert["batch"]), bert["A_out"])

    unloaded = model.unload()
    current = dict(unloaded.named_parameters())
    for key, value in base_params.items():
        if key not in HEAD_KEYS:
            assert torch.equal(current[key].detach(), value), key


def test_layer_switch_while_merged_writes_only_child_entries(bert):
    """ChildTuningLayer.set_adapter on a merged layer writes back the old child entries and writes in the new ones."""
    model = PeftModel.from_pretrained(load_bert(bert["base"]), bert["A"], adapter_name="a")
    model.load_adapter(bert["B"], adapter_name="b")
    for layer in child_layers(model).values():
        key = layer.tensor_key("weight")
        base = bert["base_params"][key]
        for adapter, other in (("b", "a"), ("a", "b")):
            layer.set_adapter(adapter)
            weight = layer.get_base_layer().weight.detach()
            assert layer.merged_adapters == [adapter], key
            assert torch.equal(weight, child_weight(base, layer, adapter)), key
            assert torch.equal(layer.unmerged_base_tensor("weight"), base), key
        layer.unmerge()
        assert torch.equal(layer.get_base_layer().weight.detach(), base), key


# ------------------------------------------------------------------------------------------------ 7. fingerprint
@pytest.fixture(scope="module")
def other_base_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("other") / "base")
    tiny_bert(seed=1).save_pretrained(path)  # same architecture, another random init
    return path


@pytest.mark.parametrize("loader", ["from_pretrained", "low_cpu_mem_usage", "load_adapter", "transformers"])
def test_other_base_is_rejected_by_the_fingerprint(bert, other_base_dir, loader):
    base = load_bert(other_base_dir)
    with torch.no_grad():
        before_out = base(**bert["batch"]).logits
    saved = [(t, t.detach().clone()) for t in base.state_dict(keep_vars=True).values()]
    with pytest.raises(AdapterFormatError, match="fingerprint") as caught:
        if loader == "from_pretrained":
            PeftModel.from_pretrained(base, bert["A"])
        elif loader == "low_cpu_mem_usage":
            PeftModel.from_pretrained(base, bert["A"], low_cpu_mem_usage=True)
        elif loader == "load_adapter":
            model = PeftModel(base, ChildTuningConfig(mode="d", selection="random", reserve_p=0.1,
                                                      task_type="SEQ_CLS"))
            model.load_adapter(bert["A"], adapter_name="a")
        else:
            base.load_adapter(bert["A"])
    assert "ignore_base_mismatch" in str(caught.value)
    assert all(torch.equal(t.detach(), c) for t, c in saved), "the base weights changed"
    if loader != "load_adapter":
        with torch.no_grad():
            assert torch.equal(base(**bert["batch"]).logits, before_out)


def test_ignore_base_mismatch_overrides_the_fingerprint(bert, other_base_dir):
    config = ChildTuningConfig.from_pretrained(bert["A"])
    config.ignore_base_mismatch = True
    model = PeftModel.from_pretrained(load_bert(other_base_dir), bert["A"], config=config)
    other = params(load_bert(other_base_dir))
    layers = child_layers(model)
    assert all(layer.merged for layer in layers.values())
    for layer in layers.values():
        key = layer.tensor_key("weight")
        weight = layer.get_base_layer().weight.detach()
        assert torch.equal(weight, child_weight(other[key], layer, "default")), key
        # the child entries are the adapter's, the rest the other base's
        positions = positions_of(layer)
        assert torch.equal(weight.reshape(-1)[positions], bert["A_composed"][key].reshape(-1)[positions])
    assert not torch.equal(logits(model, bert["batch"]), bert["A_out"])
