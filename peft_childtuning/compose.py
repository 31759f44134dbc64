"""Composing child networks: ``add_weighted_adapter`` for Child-Tuning adapters (task arithmetic on sparse deltas).

Each input adapter is a change against the base: at its child entries (every entry in mode "f"), value - base. The
changes are combined entry by entry with peft's own merge functions (`peft.utils.merge_utils`), in float32 and against
the true unmerged base (`ChildTuningLayer.unmerged_base_tensor`, so adapters merged at load combine like any other),
and the result becomes an ordinary adapter: child values = base + combined change, rounded once into the base dtype,
at the union of the inputs' child entries (less those every input's trimming dropped). It saves, loads, merges and
unmerges like an adapter that was trained.

Exactness: an entry that only one input changes, and whose change passes through the combination unscaled (weight
1, not rescaled by DARE), takes that input's own value, rounded once into the base dtype: what merging the input
alone writes there. So with weight 1 on adapters whose child networks are disjoint, the combined adapter is
bit-identical to applying both, in every dtype (base + (value - base) in float32 would not always give the value
back: not when the value is far smaller than the base entry).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Optional

import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge, prune, task_arithmetic
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from .config import ChildTuningConfig
from .fingerprint import base_fingerprint
from .gradient_mask import mask_seed
from .layer import TUNED_TENSOR_CONTAINERS, ChildTuningLayer
from .sparse_format import choose_encoding, encode_positions

# combination type -> (how each input's change is trimmed first, whether signs are elected (TIES) before summing)
COMBINATION_TYPES: dict[str, tuple[Optional[str], bool]] = {
    "linear": (None, False),
    "ties": ("magnitude", True),
    "dare_linear": ("random", False),
    "dare_ties": ("random", True),
    "magnitude_prune": ("magnitude", False),
}
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class Combination:
    """How the inputs' changes combine (see `COMBINATION_TYPES`)."""

    combination_type: str
    weights: tuple[float, ...]
    density: Optional[float]
    majority_sign_method: str
    seed: int

    def trimmed(self, change: torch.Tensor, index: int, key: str) -> torch.Tensor:
        """Input `index`'s change of tensor `key`, trimmed to `density` of its entries (peft's `prune`); DARE's random
        drop is drawn from a generator seeded by (seed, input, tensor), so a combination can be repeated exactly."""
        method = COMBINATION_TYPES[self.combination_type][0]
        if method is None or self.density is None or self.density >= 1:
            return change
        if method == "magnitude":
            return prune(change, self.density, method)
        devices = [change.device] if change.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(mask_seed(self.seed, index, key))
            return prune(change, self.density, method, rescale=True)

    def combined(self, changes: list[torch.Tensor]) -> torch.Tensor:
        """The combined change of each entry, from the inputs' (trimmed) changes, one row per input."""
        weights = torch.tensor(self.weights, dtype=torch.float32, device=changes[0].device)
        if not COMBINATION_TYPES[self.combination_type][1]:
            return task_arithmetic(changes, weights)
        stacked = torch.stack(changes)
        signs = calculate_majority_sign_mask(stacked, method=self.majority_sign_method)
        return disjoint_merge(stacked * weights[:, None], signs)


def combine_tensor(
    base: torch.Tensor,
    inputs: Sequence[tuple[Optional[torch.Tensor], torch.Tensor]],
    combination: Combination,
    key: str,
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """Combine the inputs' changes to one base tensor: (sorted int64 positions, values in the base dtype).

    `inputs`: per input adapter, (its sorted flat child positions, or None where it sets every entry; its values
    there), or (empty positions, empty values) where it does not tune the tensor. The positions returned are None
    (every entry) when an input sets every entry.
    """
    base32 = base.detach().reshape(-1).float()
    dense = any(positions is None for positions, _ in inputs)
    union = None if dense else torch.unique(torch.cat([positions.long() for positions, _ in inputs]))
    size = base32.numel() if union is None else union.numel()
    on_union = base32 if union is None else base32[union]
    linear_membership = COMBINATION_TYPES[combination.combination_type][0] is None
    changes, members, slots, untrimmed = [], [], [], []
    for index, (positions, values) in enumerate(inputs):
        if positions is None:
            slot = torch.arange(size, device=base32.device)
        else:
            slot = positions.long() if union is None else torch.searchsorted(union, positions.long())
        untrimmed.append(values.detach().reshape(-1).float() - on_union[slot])
        change = combination.trimmed(untrimmed[-1], index, key)
        row = torch.zeros(size, device=base32.device)
        row[slot] = change
        member = torch.zeros(size, dtype=torch.bool, device=base32.device)
        member[slot] = True if linear_membership else change != 0  # trimmed entries leave the child network
        changes.append(row)
        members.append(member)
        slots.append(slot)
    combined = combination.combined(changes)
    result = (on_union + combined).to(base.dtype)
    sole = torch.stack(members).sum(0) == 1
    for (_, values), member, slot, change in zip(inputs, members, slots, untrimmed):
        exact = (sole & member)[slot] & (combined[slot] == change)  # its change alone, unscaled: its own value
        result[slot[exact]] = values.detach().reshape(-1)[exact].to(base.dtype)
    if union is None:
        return None, result
    kept = torch.stack(members).any(0)
    return union[kept], result[kept]


def add_weighted_adapter(
    tuner: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "linear",
    density: Optional[float] = None,
    majority_sign_method: str = "total",
    seed: int = 0,
) -> None:
    """Add adapter `adapter_name`, the weighted combination of the Child-Tuning `adapters`; see
    `ChildTuningModel.add_weighted_adapter`."""
    combination = _checked_combination(
        tuner, adapters, weights, adapter_name, combination_type, density, majority_sign_method, seed
    )
    configs = [tuner.peft_config[name] for name in adapters]
    dense = any(config.mode == "f" for config in configs)
    combined: dict[tuple[ChildTuningLayer, str], tuple[Optional[torch.Tensor], torch.Tensor]] = {}
    for layer, tensor_name in _tuned_by_any(tuner.model, adapters):
        inputs = [_input_of(layer, name, tensor_name) for name in adapters]
        combined[(layer, tensor_name)] = combine_tensor(
            layer.unmerged_base_tensor(tensor_name), inputs, combination, layer.tensor_key(tensor_name)
        )
    heads = _combined_heads(tuner.model, adapters, combination)
    config = _combined_config(tuner, configs, combined, dense)
    tuner.peft_config[adapter_name] = config
    # peft unmerges the model to inject an adapter: adapters merged at load are merged again afterwards
    merged = {layer: list(layer.merged_adapters) for layer in _layers(tuner.model) if layer.merged}
    tuner.inject_adapter(tuner.model, adapter_name)
    for layer, names in merged.items():
        if not layer.merged:
            layer.merge(adapter_names=names)
    with torch.no_grad():
        for layer, tensor_name in _tuned_by_any(tuner.model, [adapter_name]):
            # a whole tensor that no input tunes (mode "f") is the base's; an empty child network is not tuned
            positions, values = combined.get((layer, tensor_name), (None, layer.unmerged_base_tensor(tensor_name)))
            if positions is not None:
                numel = getattr(layer.get_base_layer(), tensor_name).numel()
                encoding = config.child_encodings[layer.tensor_key(tensor_name)]
                container = getattr(layer, TUNED_TENSOR_CONTAINERS[tensor_name][1])
                container[adapter_name] = encode_positions(positions, numel, encoding).to(values.device)
            target = layer.child_values(adapter_name, tensor_name)
            target.copy_(values.reshape(target.shape))
        for wrapper, parameters in heads.items():
            copy = wrapper.modules_to_save[adapter_name]
            for name, value in parameters.items():
                target = copy.get_parameter(name)
                target.copy_(value.reshape(target.shape))


def _checked_combination(
    tuner: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str,
    density: Optional[float],
    majority_sign_method: str,
    seed: int,
) -> Combination:
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"add_weighted_adapter: combination_type={combination_type!r} is not supported for Child-Tuning "
            f"adapters; supported: {sorted(COMBINATION_TYPES)} (LoRA's 'svd' and 'cat' rebuild low-rank factors, "
            "which a child network has not)."
        )
    if not adapters or len(weights) != len(adapters):
        raise ValueError(
            f"add_weighted_adapter: {len(adapters)} adapters and {len(weights)} weights; give one weight per adapter."
        )
    missing = [name for name in adapters if name not in tuner.peft_config]
    if missing:
        raise ValueError(f"add_weighted_adapter: no adapter {missing} (adapters: {sorted(tuner.peft_config)}).")
    foreign = [name for name in adapters if not isinstance(tuner.peft_config[name], ChildTuningConfig)]
    if foreign:
        raise ValueError(f"add_weighted_adapter: {foreign} are not Child-Tuning adapters; combine those separately.")
    waiting = [name for name in adapters if tuner.peft_config[name].needs_fisher_pass]
    if waiting:
        raise ValueError(
            f"add_weighted_adapter: adapter(s) {waiting} have no child network yet; run detect_child_network first."
        )
    if adapter_name in tuner.peft_config:
        raise ValueError(f"add_weighted_adapter: an adapter named {adapter_name!r} exists; choose another name.")
    trims = COMBINATION_TYPES[combination_type][0] is not None
    if trims and (density is None or not 0.0 <= density <= 1.0):
        raise ValueError(
            f"add_weighted_adapter: combination_type={combination_type!r} needs density in [0, 1] (the fraction of "
            f"each adapter's child entries kept), got {density!r}."
        )
    if not trims and density is not None:
        raise ValueError(
            f"add_weighted_adapter: density applies to "
            f"{[name for name, (trim, _) in COMBINATION_TYPES.items() if trim]}, not to {combination_type!r}; leave it out."
        )
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"add_weighted_adapter: majority_sign_method must be one of {SIGN_METHODS}.")
    return Combination(combination_type, tuple(float(w) for w in weights), density, majority_sign_method, seed)


def _layers(model: nn.Module) -> Iterator[ChildTuningLayer]:
    return (module for module in model.modules() if isinstance(module, ChildTuningLayer))


def _tuned_by_any(model: nn.Module, adapters: Sequence[str]) -> Iterator[tuple[ChildTuningLayer, str]]:
    for layer in _layers(model):
        for tensor_name in TUNED_TENSOR_CONTAINERS:
            if any(tensor_name in layer.tuned_tensor_names(name) for name in adapters):
                yield layer, tensor_name


def _input_of(
    layer: ChildTuningLayer, adapter_name: str, tensor_name: str
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """One input adapter's (positions, values) for one tensor; empty where it does not tune the tensor."""
    if tensor_name not in layer.tuned_tensor_names(adapter_name):
        return _untouched(getattr(layer.get_base_layer(), tensor_name))
    return layer._positions(adapter_name, tensor_name), layer.child_values(adapter_name, tensor_name)


def _untouched(base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of an adapter that leaves a tensor alone: no positions, no values."""
    return torch.zeros(0, dtype=torch.int64, device=base.device), torch.zeros(0, device=base.device)


def _combined_heads(
    model: nn.Module, adapters: Sequence[str], combination: Combination
) -> dict[ModulesToSaveWrapper, dict[str, torch.Tensor]]:
    """The modules saved whole (classifier heads): each parameter combined like a whole tensor (mode "f"), its
    changes against the original module; an input without its own copy changes nothing there."""
    heads = {}
    for name, wrapper in model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        copies = [wrapper.modules_to_save[a] if a in wrapper.modules_to_save else None for a in adapters]
        if all(copy is None for copy in copies):
            continue
        parameters = {}
        for parameter_name, base in wrapper.original_module.named_parameters():
            inputs = [
                (None, copy.get_parameter(parameter_name)) if copy is not None else _untouched(base)
                for copy in copies
            ]
            _, parameters[parameter_name] = combine_tensor(base, inputs, combination, f"{name}.{parameter_name}")
        heads[wrapper] = parameters
    return heads


def _combined_config(
    tuner: nn.Module,
    configs: list[ChildTuningConfig],
    combined: dict[tuple[ChildTuningLayer, str], tuple[Optional[torch.Tensor], torch.Tensor]],
    dense: bool,
) -> ChildTuningConfig:
    """The new adapter's config: the first input's, targeting what any input targets, with the combined child
    network (mode "d"), or mode "f" when an input sets whole tensors."""
    first = next((config for config in configs if config.mode == "f"), configs[0]) if dense else configs[0]
    targets = [config.target_modules for config in configs]
    if all(isinstance(target, str) for target in targets):
        target_modules = "|".join(f"({target})" for target in dict.fromkeys(targets))
    elif all(isinstance(target, (set, list)) for target in targets):
        target_modules = set().union(*targets)
    else:
        raise ValueError(
            "add_weighted_adapter: the adapters give target_modules of different kinds (a regex and a list); "
            "combine adapters whose configs both use lists, or both regexes."
        )
    excludes = [config.exclude_modules for config in configs]
    modules_to_save = sorted(set().union(*(config.modules_to_save or () for config in configs))) or None
    changes = dict(
        target_modules=target_modules,
        exclude_modules=excludes[0] if all(exclude == excludes[0] for exclude in excludes) else None,
        tune_bias=any(config.tune_bias for config in configs),
        modules_to_save=modules_to_save,
        init_weights=True,
        base_fingerprint=base_fingerprint(tuner.model),
        child_sizes=None,
        child_encodings=None,
    )
    if dense:
        return replace(first, **changes)
    sizes, encodings, total = {}, {}, 0
    for (layer, tensor_name), (positions, _) in combined.items():
        numel = getattr(layer.get_base_layer(), tensor_name).numel()
        total += numel
        if positions.numel():
            key = layer.tensor_key(tensor_name)
            sizes[key] = positions.numel()
            encodings[key] = choose_encoding(positions, numel)
    if not sizes:
        raise ValueError(
            "add_weighted_adapter: the combination keeps no child entry (density trims every change away); "
            "raise density."
        )
    reserve_p = sum(sizes.values()) / total
    changes.update(mode="d", selection="fisher", reserve_p=reserve_p, child_sizes=sizes, child_encodings=encodings)
    return replace(first, **changes)
