"""add_weighted_adapter for Child-Tuning adapters: the combination rules, exactness, and the result as an adapter."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

from peft_childtuning import ChildTuningConfig
from peft_childtuning.compose import COMBINATION_TYPES, Combination, combine_tensor
from peft_childtuning.model import record_child_network

from conftest import ARCHS, child_layers, peft_model, positions_of, trainable_parameters, train_steps

torch.set_num_threads(1)


def two_adapters(base, mode="d", **kwargs):
    """Adapters 'a' and 'b' (random child networks of different seeds, or mode "f"), values perturbed from the base."""
    settings = dict(mode=mode, reserve_p=0.2, selection="random", init_weights=False, task_type="SEQ_CLS", **kwargs)
    model = peft_model(base, seed=1, **settings)
    model.add_adapter("b", ChildTuningConfig(seed=2, **settings))
    model.base_model.set_adapter("default")
    return model


def trained(model, adapter, seed):
    """A few AdamW steps of one adapter (its head too), so that it differs from the base like a trained one."""
    model.base_model.set_adapter(adapter)
    train_steps(model, torch.optim.AdamW(trainable_parameters(model), lr=1e-2), ARCHS["bert"].batches(2, seed=seed))
    model.eval()


def merged_weights(model, adapter):
    """Every Child-Tuning layer's weight with `adapter` alone merged (then unmerged again)."""
    model.base_model.set_adapter(adapter)
    model.merge_adapter()
    weights = {key: layer.get_base_layer().weight.detach().clone() for key, layer in child_layers(model).items()}
    model.unmerge_adapter()
    return weights


def bits(tensor):
    return tensor.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[tensor.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_disjoint_adapters_with_weight_one_equal_applying_both_bit_for_bit(dtype):
    model = two_adapters(ARCHS["bert"].build().to(dtype))
    naive_misses = 0
    for layer in child_layers(model).values():  # make b's child network disjoint from a's
        a = positions_of(layer, "default").long()
        b = positions_of(layer, "b").long()
        layer.set_child_network("b", "weight", b[~torch.isin(b, a)])
        with torch.no_grad():
            base = layer.get_base_layer().weight.reshape(-1)
            for adapter, positions in (("default", a), ("b", positions_of(layer, "b").long())):
                values = layer.child_values(adapter, "weight")
                values.copy_(base[positions].float() + 0.05 * torch.randn(values.shape))
                # values far smaller than their base entry: base + (value - base) does not give them back
                values[:4] = base[positions[:4]].float() * 1e-7
            b32, v32 = base[a[:4]].float(), layer.child_values("default", "weight")[:4].float()
            naive_misses += int((bits((b32 + (v32 - b32)).to(dtype)) != bits(v32.to(dtype))).sum())
    record_child_network(model.base_model.model, model.peft_config["b"], "b")
    # (in fp16 the base entries' float32 rounding error falls below half a subnormal step: no miss to provoke)
    assert naive_misses > 0 or dtype == torch.float16, "the test needs entries that the naive arithmetic gets wrong"

    separate = {adapter: merged_weights(model, adapter) for adapter in ("default", "b")}
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "ab")
    combined = merged_weights(model, "ab")
    for key, layer in child_layers(model).items():
        expected = layer.get_base_layer().weight.detach().clone().reshape(-1)
        for adapter in ("default", "b"):
            positions = positions_of(layer, adapter).long()
            expected[positions] = separate[adapter][key].reshape(-1)[positions]
        assert torch.equal(bits(combined[key].reshape(-1)), bits(expected)), key
        assert torch.equal(
            positions_of(layer, "ab"), torch.cat([positions_of(layer, "default"), positions_of(layer, "b")]).sort().values
        )


def test_overlapping_linear_rule_and_negation():
    model = two_adapters(ARCHS["bert"].build())
    weights = (0.7, -1.3)
    model.add_weighted_adapter(["default", "b"], list(weights), "mix")
    model.add_weighted_adapter(["default"], [-1.0], "negated")
    overlap = 0
    for layer in child_layers(model).values():
        base = layer.get_base_layer().weight.detach().reshape(-1)
        changes = []
        for adapter in ("default", "b"):
            change = torch.zeros_like(base)
            positions = positions_of(layer, adapter).long()
            change[positions] = layer.child_values(adapter, "weight").detach() - base[positions]
            changes.append(change)
        union = torch.unique(torch.cat([positions_of(layer, a).long() for a in ("default", "b")]))
        overlap += len(positions_of(layer, "default")) + len(positions_of(layer, "b")) - len(union)
        assert torch.equal(positions_of(layer, "mix").long(), union)
        expected = base + (weights[0] * changes[0] + weights[1] * changes[1])  # the changes summed, then added
        assert torch.equal(layer.child_values("mix", "weight").detach(), expected[union])
        a = positions_of(layer, "default").long()
        assert torch.equal(positions_of(layer, "negated").long(), a)
        assert torch.equal(layer.child_values("negated", "weight").detach(), (base - changes[0])[a])
    assert overlap > 0, "the test needs overlapping child networks"
    # the heads, saved whole, combine by the same rule
    head = model.base_model.model.classifier
    original = head.original_module.weight.detach()
    expected = original + (
        weights[0] * (head.modules_to_save["default"].weight.detach() - original)
        + weights[1] * (head.modules_to_save["b"].weight.detach() - original)
    )
    assert torch.equal(head.modules_to_save["mix"].weight.detach(), expected)


def combine(positions_values, weights, combination_type, density=None, seed=0, base=None):
    base = torch.zeros(6) if base is None else base
    inputs = [(torch.tensor(p), torch.tensor(v, dtype=torch.float32)) for p, v in positions_values]
    combination = Combination(combination_type, tuple(weights), density, "total", seed)
    positions, values = combine_tensor(base, inputs, combination, "t")
    return positions.tolist(), values.tolist()


def test_ties_and_magnitude_prune_rules():
    a = ([0, 1, 2], [2.0, -3.0, 1.0])
    b = ([1, 2, 3], [1.0, 4.0, 2.0])
    # ties: per entry the sign of the summed changes is elected; the agreeing weighted changes are averaged
    assert combine([a, b], [1.0, 0.5], "ties", density=1.0) == ([0, 1, 2, 3], [2.0, -3.0, 1.5, 1.0])
    # magnitude_prune: each input keeps int(density * its child entries) largest changes; trimmed entries leave
    assert combine([a, b], [1.0, 0.5], "magnitude_prune", density=0.5) == ([1, 2], [-3.0, 2.0])
    # linear keeps the union, entries whose combined change is 0 included
    assert combine([a, b], [1.0, -1.0], "linear")[0] == [0, 1, 2, 3]


def test_dare_is_seeded_and_rescales():
    generator = torch.Generator().manual_seed(0)
    positions = list(range(0, 2000, 2))
    values = torch.randn(len(positions), generator=generator).tolist()
    first = combine([(positions, values)], [1.0], "dare_linear", density=0.25, seed=5, base=torch.zeros(2000))
    assert first == combine([(positions, values)], [1.0], "dare_linear", density=0.25, seed=5, base=torch.zeros(2000))
    assert first != combine([(positions, values)], [1.0], "dare_linear", density=0.25, seed=6, base=torch.zeros(2000))
    kept = dict(zip(*first))
    assert 150 < len(kept) < 350
    by_position = dict(zip(positions, values))
    assert all(value == torch.tensor(by_position[p] / 0.25).item() for p, value in kept.items())
    ties = combine([(positions, values)], [1.0], "dare_ties", density=0.25, seed=5, base=torch.zeros(2000))
    assert ties == first  # one input: the elected sign is its own


def test_unsupported_type_and_bad_arguments_raise():
    model = two_adapters(ARCHS["bert"].build())
    with pytest.raises(ValueError, match="supported: .*'dare_linear'.*'dare_ties'.*'linear'.*'magnitude_prune'.*'ties'"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="svd")
    with pytest.raises(ValueError, match="needs density"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="ties")
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["default", "b"], [1.0], "x")
    with pytest.raises(ValueError, match="exists"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "b")
    assert set(COMBINATION_TYPES) == {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"}


@pytest.mark.parametrize("mode", ["d", "f"])
def test_combined_adapter_saves_loads_merges_and_unmerges(tmp_path, mode):
    arch = ARCHS["bert"]
    original = arch.build()
    model = two_adapters(copy.deepcopy(original), mode=mode)
    trained(model, "default", seed=30)
    trained(model, "b", seed=31)
    model.save_pretrained(str(tmp_path / "inputs"))
    model.add_weighted_adapter(["default", "b"], [0.6, 0.6], "ab")
    assert model.peft_config["ab"].mode == mode
    fingerprint = json.load(open(tmp_path / "inputs" / "adapter_config.json"))["base_fingerprint"]
    assert model.peft_config["ab"].base_fingerprint == fingerprint
    batch = {k: v for k, v in arch.batches(1, seed=32)[0].items() if k != "labels"}
    model.base_model.set_adapter("ab")
    with torch.no_grad():
        expected = model(**batch).logits
        model.merge_adapter()
        assert torch.equal(model(**batch).logits, expected)
        model.unmerge_adapter()
    model.save_pretrained(str(tmp_path / "out"), selected_adapters=["ab"])
    saved = json.load(open(tmp_path / "out" / "ab" / "adapter_config.json"))
    if mode == "d":
        assert saved["child_sizes"] == model.peft_config["ab"].child_sizes
    loaded = PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / "out" / "ab"))
    assert all(layer.merged for layer in child_layers(loaded).values())  # merged at load, as any adapter
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
    restored = loaded.unload()
    for name, tensor in original.state_dict().items():
        if "classifier" not in name:
            assert torch.equal(restored.state_dict()[name], tensor), name


def test_adapters_loaded_for_inference_combine_against_the_unmerged_base(tmp_path):
    original = ARCHS["bert"].build()
    model = two_adapters(copy.deepcopy(original))
    trained(model, "default", seed=33)
    trained(model, "b", seed=34)
    model.save_pretrained(str(tmp_path))
    model.add_weighted_adapter(["default", "b"], [0.5, 1.0], "ab", combination_type="dare_ties", density=0.5, seed=1)
    loaded = PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "b"), "b")
    assert any(layer.merged for layer in child_layers(loaded).values())
    merged = {key: list(layer.merged_adapters) for key, layer in child_layers(loaded).items()}
    loaded.add_weighted_adapter(["default", "b"], [0.5, 1.0], "ab", combination_type="dare_ties", density=0.5, seed=1)
    assert {key: list(layer.merged_adapters) for key, layer in child_layers(loaded).items()} == merged  # still merged
    for key, layer in child_layers(model).items():
        other = child_layers(loaded)[key]
        assert torch.equal(positions_of(other, "ab"), positions_of(layer, "ab"))
        assert torch.equal(
            other.child_values("ab", "weight").detach().float(), layer.child_values("ab", "weight").detach().float()
        )
