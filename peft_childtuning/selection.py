"""The Fisher selection as a utility of its own: which entries of which tensors a task's data marks as important.

`select_child_network` works on any model (plain transformers, or peft-wrapped with any tuner) and returns sorted
flat positions per tensor; `detect_child_network` chooses Child-Tuning-D child networks with it, and
`shira_mask_fn` hands the positions to peft's SHiRA as its ``mask_fn``, so that any sparse tuner can train them.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from .constants import TRANSFORMERS_MODELS_TO_CHILDTUNING_TARGET_MODULES_MAPPING
from .fisher import (
    FisherChunks,
    LossFunction,
    child_size,
    estimate_fisher,
    fisher_child_network,
    select_top_k,
)
from .sparse_format import flat_nonzero

# "global": one budget over all tensors (the paper); "per_tensor": each tensor its own share; or a function giving
# each tensor's count from its key and tensor (e.g. `shira_budget`)
Budget = Union[Literal["global", "per_tensor"], Callable[[str, torch.Tensor], int]]
TrainStep = Callable[[], Any]
# parts of a parameter name that peft's wrapping adds: removed, so that keys name the base model's tensors
_PEFT_NAME_PARTS = re.compile(r"^base_model\.model\.|(?<=\.)base_layer\.")


def base_tensor_key(name: str) -> str:
    """The name of a parameter in the base model: peft's ``base_model.model.`` and ``base_layer.`` removed."""
    return _PEFT_NAME_PARTS.sub("", name)


def default_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight matrices that Child-Tuning targets by default (attention and MLP inside the blocks), by key."""
    config = getattr(model, "config", None)
    pattern = TRANSFORMERS_MODELS_TO_CHILDTUNING_TARGET_MODULES_MAPPING.get(getattr(config, "model_type", None))
    if pattern is None:
        raise ValueError(
            f"select_child_network: no default tensors for model type {getattr(config, 'model_type', None)!r}; pass "
            "tensors=[...] (parameter names, e.g. 'encoder.layer.0.attention.self.query.weight')."
        )
    chosen = {}
    for name, parameter in model.named_parameters():
        module_key, _, tensor_name = base_tensor_key(name).rpartition(".")
        if tensor_name == "weight" and parameter.is_floating_point() and re.fullmatch(pattern, module_key):
            chosen[f"{module_key}.weight"] = parameter
    return chosen


Tensors = Union[None, Mapping[str, torch.Tensor], Iterable[str]]


def _named_tensors(model: nn.Module, tensors: Tensors) -> dict[str, torch.Tensor]:
    if tensors is None:
        return default_tensors(model)
    if isinstance(tensors, Mapping):
        return dict(tensors)
    by_key = {base_tensor_key(name): parameter for name, parameter in model.named_parameters()}
    missing = [key for key in tensors if base_tensor_key(key) not in by_key]
    if missing:
        raise ValueError(f"select_child_network: the model has no parameter {missing[:3]}; name its parameters.")
    return {base_tensor_key(key): by_key[base_tensor_key(key)] for key in tensors}


def _as_batches(
    data: Union[Iterable[Any], TrainStep], num_batches: Optional[int], loss_fn: Optional[LossFunction]
) -> tuple[Iterable[Any], Optional[LossFunction], Optional[int]]:
    """(batches, loss function, number of batches) for the Fisher pass; a `train_step` callable (which runs its own
    forward and backward passes, as peft's LoRA-GA preprocessing takes it) is called `num_batches` times (once by
    default), each call one batch, with a loss that adds nothing."""
    if not callable(data) or isinstance(data, Iterable):
        return data, loss_fn, num_batches
    if loss_fn is not None:
        raise ValueError("select_child_network: a train_step computes its own loss; leave loss_fn out.")
    train_step = data
    calls = 1 if num_batches is None else num_batches

    def run_train_step(model: nn.Module, batch: Any) -> torch.Tensor:
        train_step()
        return torch.zeros((), requires_grad=True)  # its backward reaches no tensor: train_step's own did

    return itertools.repeat(None, calls), run_train_step, calls


def select_child_network(
    model: nn.Module,
    data: Union[Iterable[Any], TrainStep],
    reserve_p: Optional[float] = None,
    budget: Budget = "global",
    largest: bool = True,
    tensors: Tensors = None,
    num_batches: Optional[int] = None,
    loss_fn: Optional[LossFunction] = None,
    max_grad_norm: Optional[float] = 1.0,
    progress: bool = True,
    fisher_chunks: FisherChunks = 1,
) -> dict[str, torch.Tensor]:
    """Score entries by their empirical Fisher information on the task data and choose a budget of them.

    The estimate is the paper's (`fisher`): dropout on, each batch's gradient of each tensor clipped to
    `max_grad_norm` on its own, squared, averaged over the batches. Nothing of the model is changed.

    Args:
        model: a transformers model, or one wrapped by peft (any tuner: the base tensors are scored as the model
            computes, its adapters active).
        data: batches (a DataLoader, a list: ``model(**batch).loss``, or `loss_fn(model, batch)`), or a
            ``train_step()`` callable that runs forward and backward itself (as peft's LoRA-GA preprocessing takes
            it), called `num_batches` times (default once); each backward it runs is folded in as a batch, and the
            sum is divided by the number of calls (the same ranking as an average over its backward passes).
        reserve_p: the fraction of entries chosen, for budget "global" or "per_tensor".
        budget: "global": exactly round(reserve_p * N) entries over all tensors together (the paper's
            Child-Tuning-D); "per_tensor": round(reserve_p * N_t) in each tensor; or a function (key, tensor) ->
            count (e.g. `shira_budget(r)`).
        largest: True: the highest scores (ties go to the earlier tensor, then the lower position). False: the
            lowest (the paper's ablation; TaLoS-style deltas), the complement of the highest of the rest.
        tensors: the tensors to score: parameter names, or {key: tensor}; default: the weight matrices that
            Child-Tuning targets by default for the architecture.
        num_batches, loss_fn, max_grad_norm, progress: as for `detect_child_network`.
        fisher_chunks: budget "global" only: score the entries in chunks to save memory (see
            `detect_child_network`); the same positions bit for bit.

    Returns:
        {key: sorted int64 flat positions}, keys as in the base model (peft's prefixes removed).
    """
    named = _named_tensors(model, tensors)
    if not named:
        raise ValueError("select_child_network: no tensors to score; pass tensors=[...].")
    if not callable(budget) and (reserve_p is None or not 0.0 < reserve_p <= 1.0):
        raise ValueError(f"select_child_network: budget {budget!r} needs reserve_p in (0, 1], got {reserve_p!r}.")
    if budget not in ("global", "per_tensor") and not callable(budget):
        raise ValueError(f"select_child_network: budget={budget!r}; use 'global', 'per_tensor' or a function.")
    batches, loss_fn, num_batches = _as_batches(data, num_batches, loss_fn)
    pass_args = dict(num_batches=num_batches, loss_fn=loss_fn, max_grad_norm=max_grad_norm, progress=progress)
    if budget == "global":
        total = sum(tensor.numel() for tensor in named.values())
        k = child_size(reserve_p, total)
        chosen = fisher_child_network(
            model, named, k if largest else total - k, batches, fisher_chunks=fisher_chunks, **pass_args
        )
        return {key: _kept(positions, tensor, largest) for (key, tensor), positions in zip(named.items(), chosen)}
    if fisher_chunks != 1:
        raise ValueError("select_child_network: fisher_chunks applies to budget 'global' only; leave it at 1.")
    scores = estimate_fisher(model, named, batches, **pass_args)
    selected = {}
    for key, tensor in named.items():
        count = budget(key, tensor) if callable(budget) else child_size(reserve_p, tensor.numel())
        if not 0 <= count <= tensor.numel():
            raise ValueError(f"select_child_network: budget gives {count} entries for {key} of {tensor.numel()}.")
        score = scores.pop(key)
        (top,) = select_top_k([score], count if largest else tensor.numel() - count)
        selected[key] = _kept(top, tensor, largest)
    return selected


def _kept(top: torch.Tensor, tensor: torch.Tensor, largest: bool) -> torch.Tensor:
    """The chosen positions: `top` itself, or (for the lowest scores) every position not in it."""
    if largest:
        return top.long()
    outside = torch.ones(tensor.numel(), dtype=torch.bool, device=top.device)
    outside[top.long()] = False
    return flat_nonzero(outside).long()


def shira_budget(r: int) -> Callable[[str, torch.Tensor], int]:
    """The budget SHiRA requires: r * (m + n) entries in an m x n weight (as many as a rank-r LoRA has)."""
    return lambda key, tensor: r * (tensor.shape[0] + tensor.shape[1])


def shira_mask_fn(model: nn.Module, positions: Mapping[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    """peft's SHiRA ``mask_fn`` that trains exactly `positions` (from `select_child_network` on `model`).

    SHiRA calls ``mask_fn(base_layer, r)`` for each module it wraps; the base layer is found among `model`'s
    tensors by its weight, so build the SHiRA model from the same `model`::

        positions = select_child_network(model, loader, budget=shira_budget(32), tensors=[...])
        config = ShiraConfig(r=32, target_modules=[...])
        config.mask_fn = shira_mask_fn(model, positions)
        shira_model = get_peft_model(model, config)

    SHiRA requires r * (m + n) entries per layer: select with ``budget=shira_budget(r)``.
    """
    weights = [(parameter, key) for key, parameter in _named_tensors(model, positions.keys()).items()]

    def mask_fn(base_layer: nn.Module, r: int, **kwargs: Any) -> torch.Tensor:
        weight = base_layer.weight
        key = next((key for parameter, key in weights if parameter is weight), None)
        if key is None:
            raise ValueError(
                f"shira_mask_fn: no positions for SHiRA's layer {base_layer} (positions name {len(weights)} tensors); "
                "select over every module SHiRA targets, and build the SHiRA model from the same model."
            )
        chosen = positions[key]
        needed = shira_budget(r)(key, weight)
        if chosen.numel() != needed:
            raise ValueError(
                f"shira_mask_fn: {key} has {chosen.numel()} positions, SHiRA with r={r} needs {needed} (r * (m + n)); "
                f"select them with budget=shira_budget({r})."
            )
        mask = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
        mask[chosen.to(weight.device)] = 1
        return mask.view_as(weight)

    return mask_fn

