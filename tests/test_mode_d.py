"""Child-Tuning-D: Fisher estimation, exact top-k child selection, and training that touches only the child entries."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.optimization import Adafactor

from peft_childtuning import ChildTuningLayer
from peft_childtuning.fisher import estimate_fisher, select_top_k

from conftest import (
    ARCHS,
    base_weights,
    child_layers,
    composed_weights,
    peft_model,
    positions_of,
    tiny_bert,
    train_steps,
    trainable_parameters,
)
from float_tolerance import FLOAT32_EPS, ROUNDING_EPS, normwise_atol


# ------------------------------------------------------------------------------------------------ reference
def reference_fisher(base: torch.nn.Module, keys: list[str], batches, max_grad_norm: float | None = 1.0):
    """Brute force, in float64: per batch, each tensor's gradient clipped to norm 1 on its own, squared, averaged.

    The float32 weights are exact in float64, so this is the Fisher information of the float32 model to ~1e-16,
    which the float32 estimate must match to within its rounding error (`fisher_error_bound`).
    """
    model = copy.deepcopy(base).double()
    model.train()
    params = dict(model.named_parameters())
    fisher = {key: torch.zeros_like(params[key]) for key in keys}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for key in keys:
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([params[key]], max_grad_norm)
            fisher[key] += params[key].grad.square()
    return {key: value / len(batches) for key, value in fisher.items()}


def fisher_error_bound(reference: torch.Tensor, num_batches: int) -> torch.Tensor:
    """Per entry, how far a float32 estimate of one tensor's Fisher scores may lie from the float64 `reference`.

    A float32 gradient is accurate normwise, not entrywise (`float_tolerance`; entrywise relative errors of 2e-5 are
    common): each batch's clipped gradient c_b errs by |dc_b| <= eps * ||c_b|| per entry, eps = ROUNDING_EPS. With
    F = mean_b c_b**2, Cauchy-Schwarz and sum(F) = mean_b ||c_b||**2 give |dF| <= 2 eps sqrt(F * sum(F)) +
    eps**2 sum(F); squaring, summing the batches and dividing add (num_batches + 2) roundings of F itself.
    """
    total = reference.sum()
    return (
        2 * ROUNDING_EPS * (reference * total).sqrt()
        + ROUNDING_EPS**2 * total
        + (num_batches + 2) * FLOAT32_EPS * reference
    )


def assert_fisher_close(
    actual: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], num_batches: int
) -> None:
    for key, expected in reference.items():
        error = (actual[key].double() - expected).abs()
        bound = fisher_error_bound(expected, num_batches)
        assert bool((error <= bound).all()), f"{key}: error {float((error / bound).max()):.3g} x the float32 bound"


def assert_top_k_within_bound(
    chosen: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], k: int, num_batches: int
) -> None:
    """`chosen` (positions per tensor) is exactly k entries that are a top k of scores within the float32 error bound
    of `reference`: no entry left out lies clearly above one chosen. Which of two entries that close a rounding decides
    differs between machines; the exact tie-breaking is tested on given scores (test_select_top_k_*)."""
    is_chosen, upper, lower = [], [], []  # the highest and the lowest each float32 score can be
    for key, expected in reference.items():
        mask = torch.zeros(expected.numel(), dtype=torch.bool)
        mask[chosen[key].long()] = True
        bound = fisher_error_bound(expected, num_batches).reshape(-1)
        is_chosen.append(mask)
        upper.append(expected.reshape(-1) + bound)
        lower.append(expected.reshape(-1) - bound)
    is_chosen, upper, lower = torch.cat(is_chosen), torch.cat(upper), torch.cat(lower)
    assert int(is_chosen.sum()) == k
    assert float(upper[is_chosen].min()) >= float(lower[~is_chosen].max())


def reference_top_k(scores: list[torch.Tensor], k: int) -> list[list[int]]:
    """Global top-k; ties go to the earlier tensor, then the lower position. Sorted positions per tensor."""
    flat = [(float(value), t, i) for t, score in enumerate(scores) for i, value in enumerate(score.reshape(-1).tolist())]
    chosen = sorted(flat, key=lambda entry: (-entry[0], entry[1], entry[2]))[:k]
    result = [[] for _ in scores]
    for _, t, i in chosen:
        result[t].append(i)
    return [sorted(positions) for positions in result]


def child_positions(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    return {
        layer.tensor_key("weight"): positions_of(layer, adapter).clone()
        for layer in child_layers(model).values()
    }


def total_entries(model) -> int:
    return sum(layer.get_base_layer().weight.numel() for layer in child_layers(model).values())


def head_parameter_count(model) -> int:
    return sum(
        parameter.numel() for name, parameter in model.named_parameters() if ".modules_to_save.default." in name
    )


def fisher_model(arch, reserve_p=0.3, batches=None, **kwargs):
    base = arch.build()
    model = peft_model(base, mode="d", reserve_p=reserve_p, task_type=arch.task_type, **kwargs)
    model.detect_child_network(batches if batches is not None else arch.batches(3), progress=False)
    return model


# ------------------------------------------------------------------------------------------------ Fisher selection
@pytest.mark.parametrize("reserve_p", [0.3, 0.05, 1.0])
def test_fisher_picks_exactly_k(tiny_models, reserve_p):
    model = fisher_model(tiny_models, reserve_p=reserve_p)
    n = total_entries(model)
    k = round(reserve_p * n)
    config = model.peft_config["default"]
    assert sum(config.child_sizes.values()) == k
    assert config.needs_fisher_pass is False
    chosen = 0
    for key, layer in child_layers(model).items():
        positions = positions_of(layer)
        if not positions.numel():  # an empty child network: the tensor is not tuned at all
            assert "default" not in layer.childtuning_values and "default" not in layer.childtuning_positions
            assert layer.tensor_key("weight") not in config.child_sizes
            continue
        values = layer.childtuning_values["default"]
        weight = layer.get_base_layer().weight
        encoding = layer.childtuning_spec["default"].encodings["weight"]
        assert config.child_encodings[layer.tensor_key("weight")] == encoding
        assert encoding in ("bitmap", "int32", "gap16", "gap16x")
        assert positions.dtype == torch.int32  # decoded positions held for training: half the bytes of int64
        assert positions.dim() == 1 and values.dim() == 1
        assert positions.numel() == values.numel() == config.child_sizes[layer.tensor_key("weight")]
        assert values.dtype == torch.float32 and values.requires_grad
        assert bool((positions[1:] > positions[:-1]).all()), "positions must be sorted and unique"
        assert 0 <= int(positions.min()) and int(positions.max()) < weight.numel()
        # the child values start at the base values
        assert torch.equal(values.detach(), weight.detach().reshape(-1)[positions.long()])
        chosen += positions.numel()
    assert chosen == k


def test_fisher_detection_is_deterministic(tiny_models):
    batches = tiny_models.batches(3)
    first = child_positions(fisher_model(tiny_models, batches=batches))
    other = child_positions(fisher_model(tiny_models, batches=batches))
    assert other.keys() == first.keys()
    for key, positions in other.items():
        assert torch.equal(positions, first[key]), key


def test_fisher_detection_with_dropout_is_reproducible_under_a_seed():
    arch = ARCHS["bert"]
    batches = arch.batches(3)
    results = []
    for _ in range(2):
        model = peft_model(tiny_bert(dropout=0.1), mode="d", task_type="SEQ_CLS")
        torch.manual_seed(1234)
        model.detect_child_network(batches, progress=False)
        results.append(child_positions(model))
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key])


def test_fisher_matches_brute_force_reference(tiny_models):
    batches = tiny_models.batches(4, seed=3)
    base = tiny_models.build()
    reference_base = copy.deepcopy(base)
    model = peft_model(base, mode="d", reserve_p=0.3, task_type=tiny_models.task_type)
    keys = [layer.tensor_key("weight") for layer in child_layers(model).values()]
    expected_fisher = reference_fisher(reference_base, keys, batches)

    # the Fisher scores themselves, on a copy of the bare base
    estimate_base = copy.deepcopy(reference_base)
    params = dict(estimate_base.named_parameters())
    fisher = estimate_fisher(estimate_base, {key: params[key] for key in keys}, batches, progress=False)
    assert_fisher_close(fisher, expected_fisher, len(batches))

    # the selection: a global top-k of the brute-force scores
    model.detect_child_network(batches, progress=False)
    k = round(0.3 * sum(expected_fisher[key].numel() for key in keys))
    assert_top_k_within_bound(child_positions(model), expected_fisher, k, len(batches))


def test_fisher_without_clipping_matches_reference():
    arch = ARCHS["bert"]
    batches = arch.batches(3, seed=4)
    base = arch.build()
    reference_base = copy.deepcopy(base)
    model = peft_model(base, mode="d", reserve_p=0.2, task_type="SEQ_CLS")
    keys = [layer.tensor_key("weight") for layer in child_layers(model).values()]
    model.detect_child_network(batches, max_grad_norm=None, progress=False)
    expected_fisher = reference_fisher(reference_base, keys, batches, max_grad_norm=None)
    k = round(0.2 * sum(value.numel() for value in expected_fisher.values()))
    got = child_positions(model)
    assert_top_k_within_bound(got, expected_fisher, k, len(batches))
    # and clipping matters: with clipping the child network differs
    clipped_model = peft_model(arch.build(), mode="d", reserve_p=0.2, task_type="SEQ_CLS")
    clipped_model.detect_child_network(batches, max_grad_norm=1e-3, progress=False)
    clipped = child_positions(clipped_model)
    assert any(not torch.equal(clipped[key], got[key]) for key in keys)


def test_num_batches_is_honoured():
    arch = ARCHS["bert"]
    batches = arch.batches(5, seed=5)
    calls = []

    def counting_loss(model, batch):
        calls.append(1)
        return model(**batch).loss

    on_two = child_positions(fisher_model(arch, batches=batches[:2]))
    model = peft_model(arch.build(), mode="d", task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="num_batches"):
        model.detect_child_network(batches, num_batches=0, progress=False)
    model.detect_child_network(batches, num_batches=2, loss_fn=counting_loss, progress=False)
    assert len(calls) == 2
    for key, positions in child_positions(model).items():
        assert torch.equal(positions, on_two[key])
    on_all = child_positions(fisher_model(arch, batches=batches))
    assert any(not torch.equal(on_all[key], on_two[key]) for key in on_all)


def test_custom_loss_fn_with_non_dict_batches():
    arch = ARCHS["bert"]
    batches = arch.batches(3, seed=6)
    tuple_batches = [(batch["input_ids"], batch["labels"]) for batch in batches]

    def loss_fn(model, batch):
        input_ids, labels = batch
        return F.cross_entropy(model(input_ids=input_ids).logits, labels)

    with_dicts = fisher_model(arch, batches=batches)
    with_loss_fn = peft_model(arch.build(), mode="d", task_type="SEQ_CLS")
    with_loss_fn.detect_child_network(tuple_batches, loss_fn=loss_fn, progress=False)
    expected = child_positions(with_dicts)
    for key, positions in child_positions(with_loss_fn).items():
        assert torch.equal(positions, expected[key]), key
    # a different loss gives a different child network
    other = peft_model(arch.build(), mode="d", task_type="SEQ_CLS")
    other.detect_child_network(
        tuple_batches, loss_fn=lambda model, batch: model(input_ids=batch[0]).logits[:, 0].square().mean(),
        progress=False,
    )
    assert any(not torch.equal(positions, expected[key]) for key, positions in child_positions(other).items())


def test_dataloader_is_accepted():
    arch = ARCHS["bert"]
    batches = arch.batches(2, batch_size=4, seed=7)
    examples = [{key: value[i] for key, value in batch.items()} for batch in batches for i in range(4)]
    loader = torch.utils.data.DataLoader(examples, batch_size=4, shuffle=False)
    from_list = fisher_model(arch, batches=batches)
    from_loader = fisher_model(arch, batches=loader)
    expected = child_positions(from_list)
    for key, positions in child_positions(from_loader).items():
        assert torch.equal(positions, expected[key])


def test_detection_restores_requires_grad_and_mode():
    arch = ARCHS["bert"]
    model = peft_model(arch.build(), mode="d", task_type="SEQ_CLS")
    model.eval()
    before = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    model.detect_child_network(arch.batches(2), progress=False)
    assert not model.training
    after = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    assert after == {name: before[name] for name in after}
    assert all(".childtuning_values." in name for name in set(before) - set(after))  # the empty children
    assert all(parameter.grad is None for parameter in model.parameters())


def test_trainable_parameter_count_is_k_plus_head(tiny_models):
    model = fisher_model(tiny_models, reserve_p=0.3)
    k = round(0.3 * total_entries(model))
    head = head_parameter_count(model)
    if tiny_models.task_type == "SEQ_CLS":
        assert head > 0
    else:
        assert head == 0
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == k + head
    assert sum(parameter.numel() for parameter in trainable_parameters(model)) == k + head


def test_training_before_detection_raises():
    arch = ARCHS["bert"]
    model = peft_model(arch.build(), mode="d", task_type="SEQ_CLS")
    batch = arch.batches(1)[0]
    model.train()
    with pytest.raises(RuntimeError, match="detect_child_network"):
        model(**batch)
    # inference is fine, and the untouched adapter is the identity
    reference = arch.build().eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)
    # after detection, training works
    model.detect_child_network(arch.batches(2), progress=False)
    model.train()
    model(**batch).loss.backward()
    assert all(
        layer.childtuning_values["default"].grad is not None
        for layer in child_layers(model).values()
        if "weight" in layer.tuned_tensor_names("default")
    )


def test_optimizer_created_before_detection_still_trains_the_child():
    arch = ARCHS["bert"]
    model = peft_model(arch.build(), mode="d", task_type="SEQ_CLS")
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model.detect_child_network(arch.batches(2), progress=False)
    before = composed_weights(model)
    train_steps(model, optimizer, arch.batches(2, seed=8))
    after = composed_weights(model)
    assert any(not torch.equal(after[key], before[key]) for key in after)


# ------------------------------------------------------------------------------------------------ training
def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def _adafactor(params):
    return Adafactor(params, lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)


def _fused_adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)


@pytest.mark.parametrize("make_optimizer", [_adamw, _sgd, _adafactor, _fused_adamw], ids=["adamw", "sgd", "adafactor", "fused_adamw"])
def test_only_child_entries_change(make_optimizer):
    arch = ARCHS["bert"]
    model = fisher_model(arch, batches=arch.batches(3))
    base_before = base_weights(model)
    positions = child_positions(model)
    optimizer = make_optimizer(trainable_parameters(model))
    head = model.get_base_model().classifier.modules_to_save["default"]
    head_before = head.weight.detach().clone()
    train_steps(model, optimizer, arch.batches(5, seed=9))

    after = composed_weights(model)
    changed_children = 0
    for layer in child_layers(model).values():
        key = layer.tensor_key("weight")
        base = layer.get_base_layer().weight
        assert torch.equal(base, base_before[key]), f"base weight {key} changed while unmerged"
        assert not base.requires_grad
        non_child = torch.ones(base.numel(), dtype=torch.bool)
        non_child[positions[key].long()] = False
        assert torch.equal(after[key].reshape(-1)[non_child], base_before[key].reshape(-1)[non_child]), key
        child = positions[key].long()
        moved = after[key].reshape(-1)[child] != base_before[key].reshape(-1)[child]
        changed_children += int(moved.sum())
        # the child values are what the composed weight holds at the child positions
        if child.numel():
            assert torch.equal(after[key].reshape(-1)[child], layer.childtuning_values["default"].detach())
    k = sum(p.numel() for p in positions.values())
    assert changed_children > 0.9 * k, f"only {changed_children} of {k} child entries moved"
    assert not torch.equal(head.weight.detach(), head_before)


def test_child_gradients_equal_dense_gradients_at_child_positions(tiny_models):
    """The gradient of the child values is the gradient of the (unwrapped) model's weight at the child positions."""
    base = tiny_models.build()
    reference = copy.deepcopy(base)
    model = peft_model(base, mode="d", selection="random", reserve_p=0.4, task_type=tiny_models.task_type, seed=3)
    batch = tiny_models.batches(1, seed=10)[0]
    model.train()
    reference.train()
    model(**batch).loss.backward()
    reference(**batch).loss.backward()
    params = dict(reference.named_parameters())
    for layer in child_layers(model).values():
        key = layer.tensor_key("weight")
        positions = positions_of(layer)
        grad = layer.childtuning_values["default"].grad
        assert grad is not None and grad.shape == positions.shape
        # two computations of the gradient: as close as float32 rounding of the whole tensor's gradient allows
        dense = params[key].grad
        torch.testing.assert_close(grad, dense.reshape(-1)[positions], rtol=0, atol=normwise_atol(dense))
        assert layer.get_base_layer().weight.grad is None


def test_gradient_accumulation_equals_concatenated_batch_sgd():
    arch = ARCHS["bert"]
    base = arch.build()
    half_a, half_b = arch.batches(2, batch_size=4, seed=11)
    full = {key: torch.cat([half_a[key], half_b[key]]) for key in half_a}
    models = [
        peft_model(copy.deepcopy(base), mode="d", selection="random", seed=1, task_type="SEQ_CLS") for _ in range(2)
    ]
    accumulated, single = models
    opt_accumulated = torch.optim.SGD(trainable_parameters(accumulated), lr=1.0)
    opt_single = torch.optim.SGD(trainable_parameters(single), lr=1.0)
    initial = composed_weights(single)
    for model in models:
        model.train()
    for micro in (half_a, half_b):
        (accumulated(**micro).loss / 2).backward()
    single(**full).loss.backward()
    # the same gradients summed in another order: within float32 rounding of each gradient, and after the SGD step
    # (lr 1) also one rounding of each value, in each model
    atols = [normwise_atol(p_single.grad) for p_single in trainable_parameters(single)]
    for p_acc, p_single, atol in zip(trainable_parameters(accumulated), trainable_parameters(single), atols):
        torch.testing.assert_close(p_acc.grad, p_single.grad, rtol=0, atol=atol)
    opt_accumulated.step()
    opt_single.step()
    for p_acc, p_single, atol in zip(trainable_parameters(accumulated), trainable_parameters(single), atols):
        torch.testing.assert_close(p_acc, p_single, rtol=2 * FLOAT32_EPS, atol=atol)
    after_acc, after_single = composed_weights(accumulated), composed_weights(single)
    for key in after_acc:
        torch.testing.assert_close(after_acc[key], after_single[key], rtol=2 * FLOAT32_EPS, atol=max(atols))
    assert any(not torch.equal(after_single[key], initial[key]) for key in initial)


def test_clip_grad_norm():
    arch = ARCHS["bert"]
    model = fisher_model(arch)
    base_before = base_weights(model)
    positions = child_positions(model)
    params = trainable_parameters(model)
    optimizer = torch.optim.SGD(params, lr=1.0)
    model.train()
    model(**arch.batches(1, seed=12)[0]).loss.backward()
    expected_norm = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in params]))
    total = torch.nn.utils.clip_grad_norm_(params, max_norm=1e-3)
    assert torch.isfinite(total)
    # norms of the same n entries summed in another order: a sum of n non-negative terms errs by < n * u in any order
    num_entries = sum(p.numel() for p in params)
    torch.testing.assert_close(total, expected_norm, rtol=num_entries * FLOAT32_EPS, atol=0)
    assert float(total) > 1e-3
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in params]))
    # torch scales by max_norm / (norm + 1e-6)
    expected_clipped = 1e-3 * total / (total + 1e-6)
    torch.testing.assert_close(clipped, expected_clipped, rtol=2 * num_entries * FLOAT32_EPS, atol=0)
    values_before = [p.detach().clone() for p in params]
    optimizer.step()
    # SGD with lr 1 moves each entry by its (clipped) gradient: before - grad rounded once, then the difference
    # taken once more, so |(before - after) - grad| <= u (|before| + 2 |grad|) (+ O(u**2))
    for p, before in zip(params, values_before):
        error = (before - p.detach() - p.grad).abs()
        assert bool((error <= 2 * FLOAT32_EPS * (before.abs() + p.grad.abs())).all())
    after = composed_weights(model)
    for key, weight in after.items():
        non_child = torch.ones(weight.numel(), dtype=torch.bool)
        non_child[positions[key].long()] = False
        assert torch.equal(weight.reshape(-1)[non_child], base_before[key].reshape(-1)[non_child])


@pytest.mark.parametrize("checkpointing_kwargs", [None, {"use_reentrant": False}, {"use_reentrant": True}], ids=["default", "non_reentrant", "reentrant"])
def test_gradient_checkpointing_gives_same_grads(checkpointing_kwargs):
    arch = ARCHS["bert"]
    batch = arch.batches(1, seed=13)[0]
    plain_base = arch.build()
    checkpointed_base = arch.build()
    if checkpointing_kwargs is None:
        checkpointed_base.gradient_checkpointing_enable()
    else:
        checkpointed_base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    grads, forward_calls = [], []
    for base in (plain_base, checkpointed_base):
        model = peft_model(base, mode="d", selection="random", seed=2, task_type="SEQ_CLS")
        calls = []
        layer = child_layers(model)["bert.encoder.layer.0.intermediate.dense"]
        handle = layer.register_forward_hook(lambda module, args, output: calls.append(1))
        model.train()
        model(**batch).loss.backward()
        handle.remove()
        forward_calls.append(len(calls))
        grads.append({layer.tensor_key("weight"): layer.childtuning_values["default"].grad for layer in child_layers(model).values()})
    # checkpointing is really on: the block's forward is recomputed in the backward
    assert forward_calls == [1, 2]
    for key, grad in grads[0].items():
        assert grads[1][key] is not None, key
        torch.testing.assert_close(grads[1][key], grad, rtol=0, atol=normwise_atol(grad))  # recomputed, re-summed
        assert grad.abs().sum() > 0


def test_gradient_checkpointing_with_fisher_detection():
    arch = ARCHS["bert"]
    batches = arch.batches(3, seed=14)
    plain = fisher_model(arch, batches=batches)
    base = arch.build()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = peft_model(base, mode="d", task_type="SEQ_CLS")
    checkpointed.detect_child_network(batches, progress=False)
    expected = child_positions(plain)
    for key, positions in child_positions(checkpointed).items():
        assert torch.equal(positions, expected[key])


# ------------------------------------------------------------------------------------------------ memory
def _record_saved_tensors(fn):
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = fn()
    return output, saved


def _dense_weight_copies(saved, weight):
    shapes = {tuple(weight.shape), tuple(weight.shape[::-1])}
    storage = weight.untyped_storage().data_ptr()
    return [t for t in saved if tuple(t.shape) in shapes and t.untyped_storage().data_ptr() != storage]


@pytest.mark.parametrize("arch_name,module_path", [("bert", "bert.encoder.layer.0.intermediate.dense"), ("gpt2", "transformer.h.0.mlp.c_fc")])
def test_no_dense_weight_copy_saved_for_backward(arch_name, module_path):
    arch = ARCHS[arch_name]
    model = peft_model(arch.build(), mode="d", selection="random", reserve_p=0.3, task_type=arch.task_type)
    model.train()
    layer = child_layers(model)[module_path]
    assert isinstance(layer, ChildTuningLayer)
    weight = layer.get_base_layer().weight
    assert weight.shape[0] != weight.shape[1]
    x = torch.randn(2, 5, 32, requires_grad=True)
    output, saved = _record_saved_tensors(lambda: layer(x))
    assert saved, "the hook saw no saved tensor (the check would be vacuous)"
    assert _dense_weight_copies(saved, weight) == [], "a dense copy of the weight is kept from forward to backward"
    output.square().sum().backward()
    assert layer.childtuning_values["default"].grad is not None and x.grad is not None

    # the detector does catch a composed dense weight saved by a naive implementation
    def naive():
        composed = layer.compose("weight", ["default"])
        return F.linear(x, composed.t() if arch_name == "gpt2" else composed)

    _, naive_saved = _record_saved_tensors(naive)
    assert _dense_weight_copies(naive_saved, weight), "control: the naive composed forward should be detected"


def test_single_layer_forward_and_grads_match_dense_linear():
    arch = ARCHS["bert"]
    model = peft_model(arch.build(), mode="d", selection="random", reserve_p=0.3, task_type="SEQ_CLS", init_weights=False)
    model.train()
    layer = child_layers(model)["bert.encoder.layer.0.intermediate.dense"]
    base = layer.get_base_layer()
    x = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(0))
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    values = layer.childtuning_values["default"]
    positions = positions_of(layer)
    out = layer(x1)
    dense = base.weight.detach().clone().reshape(-1)
    assert not torch.equal(dense[positions], values.detach()), "init_weights=False must perturb the child values"
    dense[positions] = values.detach()
    dense = dense.view_as(base.weight).requires_grad_(True)
    expected = F.linear(x2, dense, base.bias)
    assert torch.equal(out, expected)  # the same linear of the same weight
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected.backward(upstream)
    # the layer's own backward against autograd's: other products, float32 rounding apart
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=normwise_atol(x2.grad))
    torch.testing.assert_close(values.grad, dense.grad.reshape(-1)[positions], rtol=0, atol=normwise_atol(dense.grad))


@pytest.mark.parametrize("block_entries", [1 << 20, 1, 10], ids=["one-block", "line-blocks", "two-line-blocks"])
@pytest.mark.parametrize("weight_is_in_by_out", [False, True], ids=["linear", "conv1d"])
def test_child_linear_function_gradients_including_a_trainable_base(weight_is_in_by_out, block_entries):
    """Every input's gradient (x, the base weight outside the child, the child values, the bias) against finite
    differences, with int32 positions as the layers hold them, the backward working through the weight whole or by
    blocks of one or two rows and columns."""
    from peft_childtuning.layer import _ChildLinearFunction, block_plan

    generator = torch.Generator().manual_seed(0)
    shape = (4, 5) if weight_is_in_by_out else (5, 4)
    x = torch.randn(3, 4, dtype=torch.double, generator=generator).requires_grad_(True)
    weight = torch.randn(shape, dtype=torch.double, generator=generator).requires_grad_(True)
    values = torch.randn(6, dtype=torch.double, generator=generator).requires_grad_(True)
    bias = torch.randn(5, dtype=torch.double, generator=generator).requires_grad_(True)
    positions = torch.tensor([0, 3, 7, 8, 12, 19], dtype=torch.int32)
    blocks = block_plan(positions, weight.shape, block_entries)

    def child_linear(x, weight, values, bias):
        return _ChildLinearFunction.apply(x, weight, values, positions, bias, weight_is_in_by_out, blocks)

    assert torch.autograd.gradcheck(child_linear, (x, weight, values, bias))
    weight_grad = torch.autograd.grad(child_linear(x, weight, values, bias).sum(), weight)[0]
    assert not weight_grad.reshape(-1)[positions].any(), "child entries are the values' to train, not the base's"


# ------------------------------------------------------------------------------------------------ errors
def test_empty_dataloader_raises():
    arch = ARCHS["bert"]
    model = peft_model(arch.build(), mode="d", task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="batch|dataloader"):
        model.detect_child_network([], progress=False)
    assert model.peft_config["default"].needs_fisher_pass


def test_batch_without_labels_raises():
    arch = ARCHS["bert"]
    model = peft_model(arch.build(), mode="d", task_type="SEQ_CLS")
    before = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    batches = [{key: value for key, value in batch.items() if key != "labels"} for batch in arch.batches(2)]
    with pytest.raises(ValueError, match="loss"):
        model.detect_child_network(batches, progress=False)
    # the failed pass leaves the model as it was
    assert {name: parameter.requires_grad for name, parameter in model.named_parameters()} == before
    assert all(parameter.grad is None for parameter in model.parameters())


def test_non_finite_loss_raises():
    arch = ARCHS["bert"]
    model = peft_model(arch.build(), mode="d", task_type="SEQ_CLS")
    with pytest.raises((FloatingPointError, ValueError), match="non-finite"):
        model.detect_child_network(
            arch.batches(2), loss_fn=lambda model, batch: model(**batch).loss * float("nan"), progress=False
        )
    assert model.peft_config["default"].needs_fisher_pass


def test_detect_on_mode_f_raises():
    arch = ARCHS["bert"]
    model = peft_model(arch.build(), mode="f", task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="mode"):
        model.detect_child_network(arch.batches(1), progress=False)


# ------------------------------------------------------------------------------------------------ random selection
@pytest.mark.parametrize("reserve_p", [0.3, 0.01, 0.77])
def test_random_selection_exact_size_and_seeded(tiny_models, reserve_p):
    def build(seed):
        return peft_model(
            tiny_models.build(), mode="d", selection="random", reserve_p=reserve_p, seed=seed,
            task_type=tiny_models.task_type,
        )

    first, same, other = build(7), build(7), build(8)
    k = round(reserve_p * total_entries(first))
    assert sum(first.peft_config["default"].child_sizes.values()) == k
    assert sum(p.numel() for p in child_positions(first).values()) == k
    for key, positions in child_positions(first).items():
        assert torch.equal(positions, child_positions(same)[key])
        assert positions.unique().numel() == positions.numel()
        assert bool((positions[1:] > positions[:-1]).all())
    assert any(
        not torch.equal(positions, child_positions(other)[key]) for key, positions in child_positions(first).items()
    )
    # usable without data
    first.train()
    first(**tiny_models.batches(1)[0]).loss.backward()


# ------------------------------------------------------------------------------------------------ select_top_k
_TIE_VALUES = [0.0, 1e-40, 1e-20, 0.5, 1.0, 1.0000001192092896, 1.0000002384185791, 2.0, 3.0, 1e10, 3e38]
_score = st.one_of(
    st.sampled_from(_TIE_VALUES),
    st.floats(min_value=1.0, max_value=1.0010000467300415, width=32),  # same high 16 bits, different low bits
    st.floats(min_value=0.0, max_value=1.0000000150474662e30, width=32, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    data=st.data(),
    tensors=st.lists(st.lists(_score, min_size=0, max_size=40), min_size=1, max_size=5),
)
def test_select_top_k_matches_brute_force(data, tensors):
    scores = [torch.tensor(values, dtype=torch.float32) for values in tensors]
    total = sum(len(values) for values in tensors)
    k = data.draw(st.integers(min_value=0, max_value=total), label="k")
    result = select_top_k(scores, k)
    assert len(result) == len(scores)
    assert [positions.tolist() for positions in result] == reference_top_k(scores, k)
    assert sum(positions.numel() for positions in result) == k
    for positions in result:
        assert positions.dtype == torch.int64


@settings(max_examples=50, deadline=None, database=None)
@given(
    data=st.data(),
    shapes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4),
)
def test_select_top_k_many_ties_2d(data, shapes):
    scores = [
        torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.0]), min_size=r * c, max_size=r * c)),
                     dtype=torch.float32).view(r, c)
        for r, c in shapes
    ]
    total = sum(score.numel() for score in scores)
    k = data.draw(st.integers(min_value=0, max_value=total))
    assert [p.tolist() for p in select_top_k(scores, k)] == reference_top_k(scores, k)


@pytest.mark.parametrize("crowded", [False, True], ids=["sparse-bucket", "crowded-bucket"])
def test_select_top_k_ties_in_large_tensors(crowded):
    """Ties at the threshold spread over large tensors, a few or a crowd of them, choose the same entries as the
    brute force."""
    generator = torch.Generator().manual_seed(0)
    scores = [torch.rand(size, generator=generator) for size in (5000, 3000, 4000)]
    tie = 0.75
    for score in scores:  # the same value planted in every tensor, a few times or a crowd
        count = 400 if crowded else 3
        score[torch.randperm(score.numel(), generator=generator)[:count]] = tie
    k = sum(int((score > tie).sum()) for score in scores) + (500 if crowded else 4)
    assert [p.tolist() for p in select_top_k(scores, k)] == reference_top_k(scores, k)


def test_select_top_k_rejects_bad_input():
    scores = [torch.tensor([0.0, 1.0, 2.0])]
    with pytest.raises(ValueError):
        select_top_k(scores, 4)
    with pytest.raises(ValueError):
        select_top_k(scores, -1)
    with pytest.raises(ValueError):
        select_top_k([torch.tensor([1.0, -1.0])], 1)
    with pytest.raises(ValueError):
        select_top_k([torch.tensor([1.0, float("nan")])], 1)
    with pytest.raises(ValueError):
        select_top_k([torch.tensor([1.0, float("inf")])], 1)


def test_select_top_k_negative_zero():
    """-0.0 is a non-negative score (it equals 0.0): treat it as zero, or reject it with a ValueError."""
    scores = [torch.tensor([-0.0, 0.5, 0.0, 0.25])]
    try:
        result = select_top_k(scores, 3)
    except ValueError:
        return
    assert result[0].tolist() == [0, 1, 3]  # 0.5, 0.25, then the zero tie at the lowest position
