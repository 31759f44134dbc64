"""Child-Tuning-F: full-shape adapter values, a fresh Bernoulli(p)/p gradient mask per optimizer step."""

from __future__ import annotations

import copy

import pytest
import torch

from peft_childtuning.gradient_mask import bernoulli_keep_mask, mask_seed, masked_gradient

from conftest import ARCHS, base_weights, child_layers, composed_weights, peft_model, train_steps, trainable_parameters
from float_tolerance import FLOAT32_EPS, normwise_atol

P = 0.3


def f_model(arch=None, base=None, **kwargs):
    arch = arch or ARCHS["bert"]
    base = base if base is not None else arch.build()
    kwargs.setdefault("reserve_p", P)
    kwargs.setdefault("seed", 11)
    return peft_model(base, mode="f", task_type=arch.task_type, **kwargs)


def dense_grads(reference, batch):
    """Gradients of the unwrapped model (same weights), by parameter name."""
    reference.train()
    reference.zero_grad(set_to_none=True)
    reference(**batch).loss.backward()
    return {name: parameter.grad.clone() for name, parameter in reference.named_parameters() if parameter.grad is not None}


def counter(model):
    return model.base_model.mask_step_counter


def test_trainable_tensors_are_the_adapter_values(tiny_models):
    model = f_model(tiny_models)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    for name in trainable:
        assert ".childtuning_values.default" in name or ".modules_to_save.default." in name, name
    for layer in child_layers(model).values():
        weight = layer.get_base_layer().weight
        values = layer.childtuning_values["default"]
        assert not weight.requires_grad
        assert values.requires_grad
        assert values is not weight
        assert values.shape == weight.shape
        assert values.dtype == torch.float32
        assert values.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
        assert torch.equal(values.detach(), weight.detach())
        assert len(layer.childtuning_positions) == 0
    n_values = sum(layer.get_base_layer().weight.numel() for layer in child_layers(model).values())
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "childtuning_values" in n) == n_values


def test_base_weight_never_changes_and_effective_weight_is_values():
    arch = ARCHS["bert"]
    model = f_model(arch)
    before = base_weights(model)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    train_steps(model, optimizer, arch.batches(4))
    composed = composed_weights(model)
    for layer in child_layers(model).values():
        key = layer.tensor_key("weight")
        assert torch.equal(layer.get_base_layer().weight, before[key])
        assert torch.equal(composed[key], layer.childtuning_values["default"].detach())
        assert not torch.equal(composed[key], before[key])


def test_gradient_is_bernoulli_masked_and_rescaled(tiny_models):
    base = tiny_models.build()
    reference = copy.deepcopy(base)
    model = f_model(tiny_models, base=base)
    batch = tiny_models.batches(1, seed=1)[0]
    expected = dense_grads(reference, batch)
    model.train()
    model(**batch).loss.backward()
    assert counter(model).step == 0
    kept_total = entries = 0
    for layer in child_layers(model).values():
        key = layer.tensor_key("weight")
        grad = layer.childtuning_values["default"].grad
        keep = bernoulli_keep_mask(grad.shape, P, 11, 0, key, grad.device)
        # the model's gradient and the reference's lie float32 rounding apart; masking and scaling round 3 times
        atol = normwise_atol(expected[key]) / P
        torch.testing.assert_close(grad, expected[key] * (keep / P), rtol=3 * FLOAT32_EPS, atol=atol)
        assert bool((grad[keep == 0] == 0).all())
        kept_total += int(keep.sum())
        entries += keep.numel()
    assert abs(kept_total / entries - P) < 0.03


def test_mask_function_is_a_pure_function_of_seed_step_key():
    shape = torch.Size([64, 32])
    key = "bert.encoder.layer.0.attention.self.query.weight"
    a = bernoulli_keep_mask(shape, P, 1, 5, key, torch.device("cpu"))
    b = bernoulli_keep_mask(shape, P, 1, 5, key, torch.device("cpu"))
    assert torch.equal(a, b)
    assert a.dtype == torch.bool and a.shape == shape
    assert not torch.equal(a, bernoulli_keep_mask(shape, P, 2, 5, key, torch.device("cpu")))
    assert not torch.equal(a, bernoulli_keep_mask(shape, P, 1, 6, key, torch.device("cpu")))
    assert not torch.equal(a, bernoulli_keep_mask(shape, P, 1, 5, key.replace("query", "key"), torch.device("cpu")))
    assert mask_seed(1, 5, key) == mask_seed(1, 5, key) != mask_seed(1, 6, key)
    assert abs(float(a.float().mean()) - P) < 0.05


@pytest.mark.parametrize("reserve_p", [0.1, 0.3, 0.5, 0.9])
def test_mask_keeps_each_entry_with_probability_p(reserve_p):
    """Four entries share one 64-bit draw: every lane (position mod 4) must keep at rate p, not only their mean."""
    keep = bernoulli_keep_mask(torch.Size([1 << 20]), reserve_p, 3, 0, "t", torch.device("cpu"))
    tolerance = 5 * (reserve_p * (1 - reserve_p) / (1 << 18)) ** 0.5  # 5 standard errors of a lane's rate
    for lane in range(4):
        assert abs(float(keep[lane::4].float().mean()) - reserve_p) < tolerance, lane
    assert bool(bernoulli_keep_mask(torch.Size([1000]), 1.0, 3, 0, "t", torch.device("cpu")).all())


def test_masks_differ_between_steps():
    arch = ARCHS["bert"]
    model = f_model(arch)
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    batch = arch.batches(1, seed=2)[0]
    model.train()
    patterns = []
    for step in range(3):
        assert counter(model).step == step
        model(**batch).loss.backward()
        zero_patterns = {}
        for layer in child_layers(model).values():
            key = layer.tensor_key("weight")
            grad = layer.childtuning_values["default"].grad
            keep = bernoulli_keep_mask(grad.shape, P, 11, step, key, grad.device)
            assert bool((grad[keep == 0] == 0).all()), f"step {step}: gradient outside the step's mask"
            assert float((grad[keep == 1] != 0).float().mean()) > 0.9
            zero_patterns[key] = grad == 0
        patterns.append(zero_patterns)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert counter(model).step == 3
    for key in patterns[0]:
        assert not torch.equal(patterns[0][key], patterns[1][key])
        assert not torch.equal(patterns[1][key], patterns[2][key])


def _run(seed, steps=4, optimizer_cls=torch.optim.AdamW):
    arch = ARCHS["bert"]
    model = f_model(arch, seed=seed)
    optimizer = optimizer_cls(trainable_parameters(model), lr=1e-2)
    train_steps(model, optimizer, arch.batches(steps, seed=3))
    return model


def test_two_identical_runs_are_bit_identical():
    first, second, other_seed = _run(5), _run(5), _run(6)
    a, b, c = composed_weights(first), composed_weights(second), composed_weights(other_seed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    head_a = first.get_base_model().classifier.modules_to_save["default"].weight
    head_b = second.get_base_model().classifier.modules_to_save["default"].weight
    assert torch.equal(head_a, head_b)
    assert any(not torch.equal(a[key], c[key]) for key in a), "the seed must change the masks"
    assert counter(first).step == counter(second).step == 4


def test_gradient_accumulation_draws_one_mask_per_optimizer_step():
    arch = ARCHS["bert"]
    base = arch.build()
    reference = copy.deepcopy(base)
    model = f_model(arch, base=base)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    micro_a, micro_b = arch.batches(2, seed=4)
    grads_a, grads_b = dense_grads(reference, micro_a), dense_grads(reference, micro_b)
    model.train()
    (model(**micro_a).loss / 2).backward()
    assert counter(model).step == 0
    (model(**micro_b).loss / 2).backward()
    assert counter(model).step == 0, "backward must not advance the mask step"
    for layer in child_layers(model).values():
        key = layer.tensor_key("weight")
        grad = layer.childtuning_values["default"].grad
        keep = bernoulli_keep_mask(grad.shape, P, 11, 0, key, grad.device)
        # both micro-batches were masked by the same mask: zero exactly outside it
        assert bool((grad[keep == 0] == 0).all())
        expected = (grads_a[key] / 2 + grads_b[key] / 2) * (keep / P)
        # each micro-batch's gradient lies float32 rounding apart; masking, scaling and summing round 6 times
        atol = normwise_atol(grads_a[key] / 2, grads_b[key] / 2) / P
        torch.testing.assert_close(grad, expected, rtol=6 * FLOAT32_EPS, atol=atol)
    optimizer.step()
    assert counter(model).step == 1
    optimizer.zero_grad()
    # the next accumulated step uses mask 1
    for micro in (micro_a, micro_b):
        (model(**micro).loss / 2).backward()
    assert counter(model).step == 1
    for layer in child_layers(model).values():
        key = layer.tensor_key("weight")
        grad = layer.childtuning_values["default"].grad
        keep = bernoulli_keep_mask(grad.shape, P, 11, 1, key, grad.device)
        assert bool((grad[keep == 0] == 0).all())
    optimizer.step()
    assert counter(model).step == 2


def test_step_counter_ignores_unrelated_optimizers():
    model = f_model()
    other = torch.nn.Linear(3, 3)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    other(torch.ones(1, 3)).sum().backward()
    other_optimizer.step()
    assert counter(model).step == 0
    head_only = torch.optim.SGD(model.get_base_model().classifier.modules_to_save.parameters(), lr=0.1)
    head_only.step()
    assert counter(model).step == 0
    ours = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    ours.step()
    assert counter(model).step == 1


@pytest.mark.parametrize("fused", [False, True])
def test_counter_counts_fused_adamw_steps(fused):
    arch = ARCHS["bert"]
    model = f_model(arch)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-3, fused=fused)
    train_steps(model, optimizer, arch.batches(3, seed=5))
    assert counter(model).step == 3


def test_reserve_p_one_is_plain_fine_tuning():
    arch = ARCHS["bert"]
    base = arch.build()
    reference = copy.deepcopy(base)
    model = f_model(arch, base=base, reserve_p=1.0)
    batches = arch.batches(3, seed=6)
    train_steps(model, torch.optim.SGD(trainable_parameters(model), lr=0.1), batches)
    keys = set(composed_weights(model))
    for name, parameter in reference.named_parameters():
        parameter.requires_grad_(name in keys or name.startswith("classifier."))
    train_steps(reference, torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1), batches)
    params = dict(reference.named_parameters())
    # the same linear maps of the same weights, and a mask of ones scaling by 1: bit for bit the same training
    for key, weight in composed_weights(model).items():
        assert torch.equal(weight, params[key].detach()), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["grad", "double_backward"])
def test_masked_gradient_is_grad_times_mask_over_p(dtype, requires_grad):
    """The numpy fast path (CPU floats numpy knows) and torch's path (bf16, a gradient in a graph) agree exactly."""
    grad = torch.randn(33, 17, dtype=dtype).requires_grad_(requires_grad)
    masked = masked_gradient(grad, P, 4, 2, "k")
    keep = bernoulli_keep_mask(grad.shape, P, 4, 2, "k", grad.device)
    assert masked.dtype == dtype and masked.requires_grad == requires_grad
    assert torch.equal(masked.detach(), grad.detach().mul(keep).div_(P))
    assert 0 < int(keep.sum()) < keep.numel()
