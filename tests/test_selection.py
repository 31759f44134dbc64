"""select_child_network as a utility of its own, and its bridge to peft's SHiRA."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, ShiraConfig, get_peft_model

from peft_childtuning import select_child_network, shira_budget, shira_mask_fn
from peft_childtuning.fisher import child_size, estimate_fisher
from peft_childtuning.selection import default_tensors

from conftest import ARCHS, child_layers, peft_model, positions_of, trainable_parameters, train_steps

torch.set_num_threads(1)


def test_detect_child_network_chooses_what_select_child_network_returns():
    arch = ARCHS["bert"]
    base = arch.build()
    selected = select_child_network(copy.deepcopy(base), arch.batches(3, seed=5), 0.2, progress=False)
    model = peft_model(base, mode="d", reserve_p=0.2, task_type="SEQ_CLS")
    model.detect_child_network(arch.batches(3, seed=5), progress=False)
    for layer in child_layers(model).values():
        assert torch.equal(positions_of(layer).long(), selected[layer.tensor_key("weight")])


def test_budgets_bottom_and_train_step():
    arch = ARCHS["bert"]
    base = arch.build()
    batches = arch.batches(3, seed=6)
    tensors = default_tensors(base)
    scores = estimate_fisher(base, tensors, batches, progress=False)
    per_tensor = select_child_network(base, batches, 0.25, budget="per_tensor", progress=False)
    for key, positions in per_tensor.items():
        flat = scores[key].reshape(-1)
        assert len(positions) == child_size(0.25, flat.numel())
        rest = torch.ones_like(flat, dtype=torch.bool)
        rest[positions] = False
        assert flat[positions].min() >= flat[rest].max()
    top = select_child_network(base, batches, 0.25, progress=False)
    bottom = select_child_network(base, batches, 0.25, largest=False, progress=False)
    total = sum(t.numel() for t in tensors.values())
    assert sum(len(p) for p in bottom.values()) == child_size(0.25, total)
    highest_bottom = max(scores[key].reshape(-1)[p].max() for key, p in bottom.items() if len(p))
    lowest_top = min(scores[key].reshape(-1)[p].min() for key, p in top.items() if len(p))
    assert highest_bottom <= lowest_top
    calls = iter(batches)

    def train_step():
        base(**next(calls)).loss.backward()

    from_step = select_child_network(base, train_step, 0.25, num_batches=3, progress=False)
    assert all(torch.equal(from_step[key], top[key]) for key in top)


def test_peft_wrapped_model_keys_name_the_base_tensors():
    arch = ARCHS["bert"]
    lora = get_peft_model(arch.build(), LoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS"))
    selected = select_child_network(lora, arch.batches(2, seed=7), 0.1, budget="per_tensor", progress=False)
    assert "bert.encoder.layer.0.attention.self.query.weight" in selected
    assert not any("base_layer" in key or key.startswith("base_model") for key in selected)


def test_shira_trains_exactly_the_selected_entries():
    arch = ARCHS["bert"]
    base = arch.build()
    keys = [f"bert.encoder.layer.{i}.attention.self.{m}.weight" for i in range(2) for m in ("query", "value")]
    positions = select_child_network(base, arch.batches(2, seed=8), budget=shira_budget(2), tensors=keys, progress=False)
    original = {key: tensor.detach().clone() for key, tensor in base.named_parameters() if key in positions}
    config = ShiraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    config.mask_fn = shira_mask_fn(base, positions)
    model = get_peft_model(base, config)
    train_steps(model, torch.optim.AdamW(trainable_parameters(model), lr=1e-2), arch.batches(2, seed=9))
    merged = model.merge_and_unload()
    for key, before in original.items():
        changed = torch.nonzero((merged.get_parameter(key).detach() != before).reshape(-1)).reshape(-1)
        assert torch.isin(changed, positions[key]).all(), key
        assert len(changed) > 0.9 * len(positions[key]), key


def test_shira_bridge_refuses_a_budget_shira_cannot_take():
    arch = ARCHS["bert"]
    base = arch.build()
    keys = ["bert.encoder.layer.0.attention.self.query.weight"]
    positions = select_child_network(base, arch.batches(1), 0.3, budget="per_tensor", tensors=keys, progress=False)
    config = ShiraConfig(r=2, target_modules=r"bert\.encoder\.layer\.0\.attention\.self\.query")
    config.mask_fn = shira_mask_fn(base, positions)
    with pytest.raises(ValueError, match=r"budget=shira_budget\(2\)"):
        get_peft_model(base, config)
