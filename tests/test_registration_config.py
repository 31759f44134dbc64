"""Registration with peft, the config's validation and serialisation, and which modules/parameters get tuned."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_childtuning
from peft_childtuning import ChildTuningConfig, ChildTuningLayer, ChildTuningModel

from conftest import child_layers, peft_model, positions_of, tiny_bert, tiny_gpt2


# ------------------------------------------------------------------------------------------------ registration
def test_import_registers_peft_type_and_mappings():
    assert "CHILDTUNING" in PeftType.__members__
    member = PeftType.CHILDTUNING
    assert member is PeftType["CHILDTUNING"] is PeftType("CHILDTUNING")
    assert member.value == "CHILDTUNING"
    assert isinstance(member, PeftType)
    assert member in list(PeftType)
    assert peft_childtuning.CHILDTUNING_PEFT_TYPE is member
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is ChildTuningConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is ChildTuningModel


def test_get_peft_model_builds_a_childtuning_model():
    model = get_peft_model(tiny_bert(), ChildTuningConfig(selection="random", task_type="SEQ_CLS"))
    assert isinstance(model, PeftModel)
    assert isinstance(model.base_model, ChildTuningModel)
    assert model.peft_config["default"].peft_type is PeftType.CHILDTUNING
    assert len(child_layers(model)) == 12
    # the adapter starts as the identity: outputs equal the base model's
    base = tiny_bert()
    ids = torch.randint(2, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    model.eval()
    base.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


# ------------------------------------------------------------------------------------------------ config
def test_config_defaults():
    config = ChildTuningConfig()
    assert config.peft_type is PeftType.CHILDTUNING
    assert config.mode == "d"
    assert config.reserve_p == 0.3
    assert config.selection == "fisher"
    assert config.seed == 0
    assert config.tune_bias is False
    assert config.target_modules is None
    assert config.modules_to_save is None
    assert config.init_weights is True
    assert config.child_sizes is None
    assert config.needs_fisher_pass is True
    assert ChildTuningConfig(mode="f").needs_fisher_pass is False
    assert ChildTuningConfig(selection="random").needs_fisher_pass is False


@pytest.mark.parametrize("reserve_p", [0, 0.0, -0.1, 1.5, 1.0000001, "x", None, float("nan"), True])
def test_invalid_reserve_p_raises(reserve_p):
    with pytest.raises(ValueError, match="reserve_p"):
        ChildTuningConfig(reserve_p=reserve_p)


@pytest.mark.parametrize("reserve_p", [1e-6, 0.3, 1, 1.0])
def test_valid_reserve_p_accepted(reserve_p):
    config = ChildTuningConfig(reserve_p=reserve_p)
    assert config.reserve_p == float(reserve_p)
    assert isinstance(config.reserve_p, float)


@pytest.mark.parametrize("mode", ["D", "x", "", "fisher", None])
def test_unknown_mode_raises(mode):
    with pytest.raises(ValueError, match="mode"):
        ChildTuningConfig(mode=mode)


@pytest.mark.parametrize("selection", ["top", "Fisher", "", None])
def test_unknown_selection_raises(selection):
    with pytest.raises(ValueError, match="selection"):
        ChildTuningConfig(selection=selection)


def test_config_to_dict_and_from_pretrained_round_trip(tmp_path):
    config = ChildTuningConfig(
        mode="d",
        reserve_p=0.25,
        selection="random",
        seed=123,
        target_modules=["query", "value"],
        exclude_modules=["layer.1.attention.self.value"],
        tune_bias=True,
        modules_to_save=["classifier"],
        init_weights=False,
        child_sizes={"bert.encoder.layer.0.attention.self.query.weight": 7},
        task_type="SEQ_CLS",
    )
    as_dict = config.to_dict()
    assert as_dict["peft_type"] == PeftType.CHILDTUNING
    assert as_dict["mode"] == "d" and as_dict["reserve_p"] == 0.25 and as_dict["seed"] == 123
    assert as_dict["child_sizes"] == {"bert.encoder.layer.0.attention.self.query.weight": 7}

    config.save_pretrained(str(tmp_path))
    with open(os.path.join(tmp_path, "adapter_config.json")) as handle:
        on_disk = json.load(handle)
    assert on_disk["peft_type"] == "CHILDTUNING"
    assert on_disk["mode"] == "d"

    for loader in (ChildTuningConfig, PeftConfig):
        loaded = loader.from_pretrained(str(tmp_path))
        assert isinstance(loaded, ChildTuningConfig)
        assert loaded.peft_type is PeftType.CHILDTUNING
        for field in (
            "mode", "reserve_p", "selection", "seed", "tune_bias", "modules_to_save", "init_weights", "child_sizes",
            "task_type",
        ):
            assert getattr(loaded, field) == getattr(config, field), field
        assert set(loaded.target_modules) == {"query", "value"}
        assert set(loaded.exclude_modules) == {"layer.1.attention.self.value"}

    # and straight from the dict
    rebuilt = ChildTuningConfig(**{k: v for k, v in as_dict.items() if k in ChildTuningConfig.__dataclass_fields__})
    assert rebuilt.to_dict() == as_dict


def test_target_modules_matching_nothing_raises():
    with pytest.raises(ValueError):
        get_peft_model(tiny_bert(), ChildTuningConfig(target_modules=["no_such_module"], selection="random"))


# ------------------------------------------------------------------------------------------------ what is tuned
def test_default_targets_are_block_weight_matrices(tiny_models):
    base = tiny_models.build()
    expected = tiny_models.expected_default_targets(base)
    assert len(expected) == tiny_models.expected_num_targets
    model = peft_model(base, selection="random", task_type=tiny_models.task_type)
    wrapped = set(child_layers(model))
    assert wrapped == expected
    for name in tiny_models.never_wrapped:
        assert not any(key == name or key.startswith(name + ".") for key in wrapped), name
    # embeddings, norms, heads are never wrapped
    for key in wrapped:
        assert "embed" not in key and "norm" not in key and "ln_" not in key and "lm_head" not in key
    # every wrapped layer's base is a weight matrix, and the tensor key names the base model's parameter
    base_param_names = {name for name, _ in model.get_base_model().named_parameters()}
    for layer in child_layers(model).values():
        assert isinstance(layer.get_base_layer(), tiny_models.matrix_type)
        # the base model parameter as it is named inside peft's wrapper
        assert f"{layer.module_key}.base_layer.weight" in base_param_names


def test_gpt2_conv1d_modules_are_wrapped():
    model = peft_model(tiny_gpt2(), selection="random", task_type="CAUSAL_LM")
    wrapped = set(child_layers(model))
    for i in range(2):
        for suffix in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            assert f"transformer.h.{i}.{suffix}" in wrapped


def test_bert_pooler_and_classifier_not_wrapped():
    model = peft_model(tiny_bert(), selection="random", task_type="SEQ_CLS")
    inner = model.get_base_model()
    assert not isinstance(inner.bert.pooler.dense, ChildTuningLayer)
    assert "bert.pooler.dense" not in child_layers(model)
    assert not any(isinstance(m, ChildTuningLayer) for m in inner.classifier.modules())
    assert isinstance(inner.bert.encoder.layer[0].attention.self.query, ChildTuningLayer)
    assert isinstance(inner.bert.encoder.layer[1].output.dense, ChildTuningLayer)


@pytest.mark.parametrize("mode", ["d", "f"])
def test_only_weights_tuned_by_default(tiny_models, mode):
    kwargs = {"selection": "random"} if mode == "d" else {}
    model = peft_model(tiny_models.build(), mode=mode, task_type=tiny_models.task_type, **kwargs)
    for layer in child_layers(model).values():
        assert "default" in layer.childtuning_values
        assert len(layer.childtuning_bias_values) == 0
        assert len(layer.childtuning_bias_positions) == 0
        assert layer.tuned_tensor_names("default") == ["weight"]


@pytest.mark.parametrize("mode", ["d", "f"])
def test_tune_bias_adds_bias_values(tiny_models, mode):
    kwargs = {"selection": "random"} if mode == "d" else {}
    model = peft_model(tiny_models.build(), mode=mode, tune_bias=True, task_type=tiny_models.task_type, **kwargs)
    layers = child_layers(model)
    with_bias = 0
    for layer in layers.values():
        bias = layer.get_base_layer().bias
        if bias is None:
            assert "default" not in layer.childtuning_bias_values
            continue
        with_bias += 1
        values = layer.childtuning_bias_values["default"]
        assert values.requires_grad
        assert layer.tuned_tensor_names("default") == ["weight", "bias"]
        if mode == "f":
            assert values.shape == bias.shape
        else:
            positions = positions_of(layer, "default", "bias")
            assert values.shape == positions.shape
            assert torch.equal(values.detach(), bias.detach().reshape(-1)[positions.long()])
        assert not bias.requires_grad
    if tiny_models.name in ("bert", "roberta", "gpt2"):
        assert with_bias == len(layers)
    elif tiny_models.name in ("llama", "t5"):
        assert with_bias == 0  # these families have no biases in their projections
    if mode == "d":
        config = model.peft_config["default"]
        total = sum(
            layer.get_base_layer().weight.numel() + (layer.get_base_layer().bias.numel() if layer.get_base_layer().bias is not None else 0)
            for layer in layers.values()
        )
        assert sum(config.child_sizes.values()) == round(0.3 * total)
        assert any(key.endswith(".bias") for key in config.child_sizes) == (with_bias > 0)


@pytest.mark.parametrize("mode", ["d", "f"])
def test_non_targeted_parameters_frozen_except_modules_to_save(tiny_models, mode):
    kwargs = {"selection": "random"} if mode == "d" else {}
    model = peft_model(tiny_models.build(), mode=mode, task_type=tiny_models.task_type, **kwargs)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable, "nothing trainable"
    for name in trainable:
        assert ".childtuning_values.default" in name or ".modules_to_save.default." in name, name
    adapter_names = {name for name in trainable if "childtuning_values" in name}
    assert len(adapter_names) == tiny_models.expected_num_targets
    # the base weights of tuned layers are frozen
    for layer in child_layers(model).values():
        assert not layer.get_base_layer().weight.requires_grad
    saved = {name for name in trainable if "modules_to_save" in name}
    if tiny_models.task_type == "SEQ_CLS":
        assert saved and all(".classifier." in name for name in saved)
        # the whole classifier head trains
        head = model.get_base_model().classifier.modules_to_save["default"]
        assert all(parameter.requires_grad for parameter in head.parameters())
        # its original copy does not
        assert not any(p.requires_grad for p in model.get_base_model().classifier.original_module.parameters())
    else:
        assert not saved
