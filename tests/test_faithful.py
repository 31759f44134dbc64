"""Faithfulness to the released code (alibaba/AliceMind ChildTuning): its optimizer-side gradient masking, re-done in
a few lines on a plain copy of the model, must give the same weights as the plugin.

Released code, in short: before each AdamW step, D multiplies each masked tensor's gradient by a fixed 0/1 mask (the
child network, no rescale); F multiplies it by a fresh Bernoulli(p) mask divided by p. Here the mask of D is the
plugin's own child network, and the masks of F are `bernoulli_keep_mask` for the same (seed, step, tensor key).
The classifier head (modules_to_save) trains fully in both. Dropout is off, so both forwards are deterministic.
"""

from __future__ import annotations

import copy

import pytest
import torch

from peft_childtuning.gradient_mask import bernoulli_keep_mask

from conftest import ARCHS, child_layers, composed_weights, peft_model, positions_of, trainable_parameters

STEPS = 20
LR = 1e-3
RESERVE_P = 0.3
SEED = 42
TOLERANCE = 1e-5


def _effective_plugin_weights(model) -> dict[str, torch.Tensor]:
    weights = composed_weights(model)
    head = model.get_base_model().classifier.modules_to_save["default"]
    weights["classifier.weight"] = head.weight.detach().clone()
    weights["classifier.bias"] = head.bias.detach().clone()
    return weights


def _train_reference(reference, keys, masks_for_step, batches):
    """Plain fine-tuning of the targeted weights + classifier with the released code's gradient masking."""
    for name, parameter in reference.named_parameters():
        parameter.requires_grad_(name in keys or name.startswith("classifier."))
    params = dict(reference.named_parameters())
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    reference.train()
    for step, batch in enumerate(batches):
        reference(**batch).loss.backward()
        if masks_for_step is not None:
            for key in keys:
                params[key].grad *= masks_for_step(step, key, params[key])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: parameter.detach().clone() for name, parameter in reference.named_parameters()}


def _train_plugin(model, batches):
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=LR, weight_decay=0.0)
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _max_diff(plugin_weights, reference_weights):
    return max(float((weight - reference_weights[name]).abs().max()) for name, weight in plugin_weights.items())


@pytest.mark.parametrize("mode", ["d", "f"])
def test_plugin_matches_released_code_masking(mode):
    arch = ARCHS["bert"]
    batches = arch.batches(STEPS, batch_size=4, seed=1)
    base = arch.build(dropout=0.0)
    reference = copy.deepcopy(base)
    unmasked_reference = copy.deepcopy(base)
    initial = {name: parameter.detach().clone() for name, parameter in base.named_parameters()}

    model = peft_model(base, mode=mode, reserve_p=RESERVE_P, seed=SEED, task_type="SEQ_CLS")
    layers = list(child_layers(model).values())
    keys = [layer.tensor_key("weight") for layer in layers]
    if mode == "d":
        model.detect_child_network(batches, progress=False)
        child_masks = {}
        for layer in layers:
            weight = layer.get_base_layer().weight
            mask = torch.zeros(weight.numel())
            mask[positions_of(layer)] = 1.0
            child_masks[layer.tensor_key("weight")] = mask.view_as(weight)

        def masks_for_step(step, key, parameter):
            return child_masks[key]  # D: fixed 0/1 mask, no rescale
    else:

        def masks_for_step(step, key, parameter):
            # F: a fresh Bernoulli(p) mask per step, kept gradients scaled by 1/p
            return bernoulli_keep_mask(parameter.shape, RESERVE_P, SEED, step, key, parameter.device) / RESERVE_P

    _train_plugin(model, batches)
    plugin_weights = _effective_plugin_weights(model)
    reference_weights = _train_reference(reference, keys, masks_for_step, batches)

    assert set(plugin_weights) == set(keys) | {"classifier.weight", "classifier.bias"}
    diff = _max_diff(plugin_weights, reference_weights)
    assert diff <= TOLERANCE, f"mode {mode}: plugin and released-code masking differ by {diff}"

    # not vacuous: the weights moved well beyond the tolerance, and unmasked fine-tuning ends elsewhere
    moved = max(float((plugin_weights[key] - initial[key]).abs().max()) for key in keys)
    assert moved > 100 * TOLERANCE
    head_moved = float((plugin_weights["classifier.weight"] - initial["classifier.weight"]).abs().max())
    assert head_moved > 100 * TOLERANCE
    unmasked = _train_reference(unmasked_reference, keys, None, batches)
    assert _max_diff(plugin_weights, unmasked) > 100 * TOLERANCE

    if mode == "d":
        # with weight decay 0 the non-child entries keep their exact base values in both
        for key in keys:
            non_child = child_masks[key] == 0
            assert torch.equal(reference_weights[key][non_child], initial[key][non_child])
            assert torch.equal(plugin_weights[key][non_child], initial[key][non_child])
    else:
        # F: Adam momentum moves entries a step's mask dropped; over 20 steps the change is dense in both
        for key in keys:
            assert float((plugin_weights[key] != initial[key]).float().mean()) > 0.95
