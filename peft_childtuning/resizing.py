"""Resizing the values Parameters once a child network is chosen, without breaking what already holds them.

A mode-"d" adapter waiting for its Fisher pass holds empty placeholders; choosing the child network resizes them in
place (``parameter.data = ...``), so that an optimizer created earlier (the transformers Trainer creates it before
its callbacks run the Fisher pass) still holds the very Parameters that train. Two things can hold state built for
the old size:

- an optimizer that created its state eagerly (``torch.optim.Adagrad`` does in its constructor): a global
  optimizer-step pre-hook rebuilds the state of every resized Parameter whose state still has the old shape, by
  constructing a throw-away optimizer of the same class with the Parameter's group settings, so the new state is
  exactly what that optimizer would have built for a Parameter of the new size;
- autograd's gradient accumulator of the Parameter, when something keeps it alive (DistributedDataParallel's
  reducer, a graph of an earlier forward): it would expect gradients of the old shape.
  `gradient_accumulator_is_held` tells, so the resize can be refused before anything changes.

A tensor whose child network comes out empty is not tuned at all: its placeholder is dropped from the model and
`retire`d, and the same pre-hook takes it out of every optimizer created earlier. The optimizer then holds exactly
the Parameters one created afterwards would, so its state dict fits a run resumed from a checkpoint.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

# every Parameter resized here -> its shape before (weakly keyed: an entry goes with its Parameter)
_RESIZED: WeakIdKeyDictionary = WeakIdKeyDictionary()
# the Parameters retired (dropped from their model), and how many retirements each optimizer has been pruned of
_RETIRED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_retirements = 0
_PRUNED_AT: "weakref.WeakKeyDictionary[torch.optim.Optimizer, int]" = weakref.WeakKeyDictionary()


def resize_in_place(parameter: nn.Parameter, data: torch.Tensor) -> None:
    """Give `parameter` new data of another shape, keeping the Parameter object (and its optimizers) the same."""
    old_shape = parameter.shape
    parameter.data = data
    parameter.grad = None
    if data.shape != old_shape:
        _RESIZED[parameter] = old_shape


def gradient_accumulator_is_held(parameter: nn.Parameter) -> bool:
    """Whether something keeps `parameter`'s gradient accumulator alive (DDP's reducer, a live autograd graph).

    Such an accumulator keeps the shape the Parameter had when it was made and refuses gradients of another shape
    after a resize. Tested by growing the data by one entry for a moment: a fresh accumulator takes the new shape,
    a held one still has the old.
    """
    if not parameter.requires_grad:
        return False
    data = parameter.data
    parameter.data = data.new_empty((data.numel() + 1,))
    try:
        node = torch.autograd.graph.get_gradient_edge(parameter).node
        # `_input_metadata` is private to torch (2.13 has it); without it the question cannot be answered here
        metadata = getattr(node, "_input_metadata", None)
        return bool(metadata) and tuple(metadata[0].shape) != tuple(parameter.shape)
    finally:
        parameter.data = data


def _state_built_for(state: dict[str, Any], shape: torch.Size) -> bool:
    return any(isinstance(value, torch.Tensor) and value.shape == shape for value in state.values())


def _fresh_state(optimizer: torch.optim.Optimizer, parameter: nn.Parameter) -> dict[str, Any]:
    """The state `type(optimizer)` builds at construction for `parameter` alone, with its group's settings."""
    group = next(group for group in optimizer.param_groups if any(p is parameter for p in group["params"]))
    settings = {key: value for key, value in group.items() if key not in ("params", "param_names")}
    try:
        throwaway = type(optimizer)([{**settings, "params": [parameter]}])
    except Exception as error:
        raise RuntimeError(
            f"Child-Tuning resized a values Parameter after the {type(optimizer).__name__} optimizer built state for "
            f"it, and cannot rebuild that state (constructing {type(optimizer).__name__} over the Parameter failed: "
            f"{error}). Create the optimizer after model.detect_child_network(...)."
        ) from error
    return dict(throwaway.state.get(parameter, {}))


def retire(parameter: nn.Parameter) -> None:
    """Mark a values Parameter the model no longer holds, for the optimizers created earlier to drop it."""
    global _retirements
    _RETIRED[parameter] = True
    _retirements += 1


def _drop_retired(optimizer: torch.optim.Optimizer) -> None:
    if _PRUNED_AT.get(optimizer) == _retirements:
        return
    for group in optimizer.param_groups:
        keep = [parameter not in _RETIRED for parameter in group["params"]]
        if not all(keep):
            for parameter, kept in zip(group["params"], keep):
                if not kept:
                    optimizer.state.pop(parameter, None)
            for key in ("params", "param_names"):
                if key in group:
                    group[key] = [item for item, kept in zip(group[key], keep) if kept]
    _PRUNED_AT[optimizer] = _retirements


def _rebuild_stale_state(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Before any optimizer step: drop retired Parameters; replace state built for a resized Parameter's old size."""
    _drop_retired(optimizer)
    for parameter, old_shape in list(_RESIZED.items()):
        state = optimizer.state.get(parameter)
        if state and _state_built_for(state, old_shape):
            fresh = _fresh_state(optimizer, parameter)
            if fresh:
                optimizer.state[parameter] = fresh
            else:  # an optimizer that builds its state at the first step will do so
                del optimizer.state[parameter]


register_optimizer_step_pre_hook(_rebuild_stale_state)
