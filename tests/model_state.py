"""`ModelState`: a complete, cheap snapshot of a model, to prove that something (a failed load) changed nothing.

`ModelState.capture(model)` records

- the module tree: (qualified name, class) of every module, in order;
- the state-dict keys, and a hash of every state-dict value (the state dict of a merged Child-Tuning model reports
  the unmerged base tensors, so this also covers what `unmerge` would restore);
- a hash of the bytes, dtype and shape of every parameter and buffer as it is in memory (merged weights included),
  by every name it is reachable under (tied weights twice);
- the ``requires_grad`` flag of every parameter and the ``training`` flag of every module;
- ``peft_config`` as ``{adapter: config.to_dict()}`` where the model has one (a ``PeftModel``, or a transformers model
  an adapter was loaded into), and peft's / transformers' adapter bookkeeping (active adapter, whether a peft config
  was loaded);
- for every peft tuner layer and auxiliary wrapper (``ModulesToSaveWrapper``): its merged adapters, active adapters,
  whether adapters are disabled, and the adapters it holds; for Child-Tuning layers also a hash of the base values that
  merging overwrote (what ``unmerge`` copies back).

`state.assert_unchanged(other)` raises an `AssertionError` listing, field by field, what differs; `state.diff(other)`
returns the same as a list of `(field, description)` pairs. Capturing a tiny test model takes a few milliseconds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
from torch import nn

_MAX_LISTED = 8  # differences listed per field before "... and N more"


def tensor_digest(tensor: Any) -> str:
    """A hash of a tensor's dtype, shape and bytes ("meta" tensors and non-tensors are described instead)."""
    if not isinstance(tensor, torch.Tensor):
        return f"<{type(tensor).__name__}: {tensor!r}>"[:200]
    tensor = tensor.detach()
    head = f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}"
    if tensor.is_meta:
        return f"{head}:meta"
    digest = hashlib.blake2b(head.encode(), digest_size=12)
    if tensor.numel():
        flat = tensor.reshape(-1)
        if flat.device.type != "cpu":
            flat = flat.cpu()
        flat = flat.contiguous()
        if flat.dtype != torch.uint8:
            flat = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
        digest.update(memoryview(flat.numpy()))
    return f"{head}:{digest.hexdigest()}"


def _normalise(value: Any) -> Any:
    """Config values in a comparable, printable form (sets sorted, enums by value)."""
    if isinstance(value, dict):
        return {str(key): _normalise(item) for key, item in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((_normalise(item) for item in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [_normalise(item) for item in value]
    if hasattr(value, "value") and type(value).__module__.startswith("peft"):  # PeftType, TaskType
        return value.value
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _peft_configs(model: nn.Module) -> Optional[dict[str, Any]]:
    configs = getattr(model, "peft_config", None)
    if configs is None:
        return None
    if not isinstance(configs, dict):
        return {"<not a dict>": repr(configs)}
    result = {}
    for name, config in configs.items():
        try:
            result[name] = _normalise(config.to_dict())
        except Exception as error:  # noqa: BLE001 - a broken config is a state too
            result[name] = f"<to_dict failed: {type(error).__name__}: {error}>"
    return result


def _adapter_layer_state(module: nn.Module) -> Optional[dict[str, Any]]:
    """Merged / active / disabled adapters and the adapters held, for peft tuner layers and auxiliary wrappers."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if isinstance(module, BaseTunerLayer):
        state: dict[str, Any] = {
            "merged_adapters": tuple(getattr(module, "merged_adapters", ())),
            "active_adapters": tuple(_safe(lambda: module.active_adapters) or ()),
            "disable_adapters": bool(getattr(module, "_disable_adapters", False)),
        }
        for attr in tuple(getattr(module, "adapter_layer_names", ())) + tuple(getattr(module, "other_param_names", ())):
            container = getattr(module, attr, None)
            if hasattr(container, "keys"):
                state[f"{attr} adapters"] = tuple(sorted(map(str, container.keys())))
        originals = getattr(module, "_merge_originals", None)  # Child-Tuning: the base values unmerge copies back
        if isinstance(originals, dict):
            state["merge originals"] = tuple(
                sorted(
                    (repr(key), tuple(tensor_digest(part) for part in value) if isinstance(value, tuple) else
                     tensor_digest(value))
                    for key, value in originals.items()
                )
            )
        return state
    if isinstance(module, AuxiliaryTrainingWrapper):
        state = {
            "active_adapters": tuple(_safe(lambda: module.active_adapters) or ()),
            "disable_adapters": bool(getattr(module, "disable_adapters", False)),
        }
        for attr in ("modules_to_save", "trainable_tokens_delta_tokens"):
            container = getattr(module, attr, None)
            if hasattr(container, "keys"):
                state[f"{attr} adapters"] = tuple(sorted(map(str, container.keys())))
        return state
    return None


def _read(obj: Any, attr: str) -> Any:
    value = getattr(obj, attr)
    return value() if callable(value) else value


def _safe(function):
    try:
        return function()
    except Exception as error:  # noqa: BLE001
        return (f"<{type(error).__name__}: {error}>",)


@dataclass(frozen=True)
class ModelState:
    """A snapshot of a model (see the module docstring); compare two with `diff` / `assert_unchanged`."""

    model_class: str
    module_tree: tuple[tuple[str, str], ...]
    state_dict_keys: tuple[str, ...]
    state_dict_values: tuple[tuple[str, str], ...]
    tensors: tuple[tuple[str, str], ...]
    requires_grad: tuple[tuple[str, bool], ...]
    training: tuple[tuple[str, bool], ...]
    peft_config: Optional[dict[str, Any]]
    adapter_attributes: tuple[tuple[str, Any], ...]
    adapter_layers: tuple[tuple[str, Any], ...]

    @classmethod
    def capture(cls, model: nn.Module) -> "ModelState":
        modules = list(model.named_modules(remove_duplicate=False))
        try:
            state = model.state_dict(keep_vars=True)
            keys = tuple(state)
            values = tuple((key, tensor_digest(value)) for key, value in state.items())
        except Exception as error:  # noqa: BLE001 - a model whose state dict fails is a (broken) state
            keys = (f"<state_dict() failed: {type(error).__name__}: {error}>",)
            values = ()
        parameters = list(model.named_parameters(remove_duplicate=False))
        tensors = [(f"param {name}", tensor_digest(p)) for name, p in parameters]
        tensors += [(f"buffer {name}", tensor_digest(b)) for name, b in model.named_buffers(remove_duplicate=False)]
        attributes = []
        for attr in ("active_adapter", "active_adapters", "_hf_peft_config_loaded"):
            if hasattr(type(model), attr) or attr in model.__dict__:
                attributes.append((attr, _normalise(_safe(lambda: _read(model, attr)))))
        base_model = model.__dict__.get("base_model") or model._modules.get("base_model")
        if isinstance(base_model, nn.Module) and base_model is not model:
            for attr in ("active_adapter", "merged"):
                if hasattr(type(base_model), attr) or attr in base_model.__dict__:
                    attributes.append((f"base_model.{attr}", _normalise(_safe(lambda: _read(base_model, attr)))))
        layers = []
        for name, module in modules:
            layer_state = _adapter_layer_state(module)
            if layer_state is not None:
                kind = "tuner layer" if "merged_adapters" in layer_state else "wrapper"
                layers += [(f"{kind} {name}: {key}", value) for key, value in layer_state.items()]
        return cls(
            model_class=f"{type(model).__module__}.{type(model).__qualname__}",
            module_tree=tuple((name, f"{type(m).__module__}.{type(m).__qualname__}") for name, m in modules),
            state_dict_keys=keys,
            state_dict_values=values,
            tensors=tuple(tensors),
            requires_grad=tuple((name, bool(p.requires_grad)) for name, p in parameters),
            training=tuple((name, bool(m.training)) for name, m in modules),
            peft_config=_peft_configs(model),
            adapter_attributes=tuple(attributes),
            adapter_layers=tuple(layers),
        )

    # ------------------------------------------------------------------------------------------------ comparing
    def diff(self, other: "ModelState") -> list[tuple[str, str]]:
        """(field, what differs) for every field in which `other` (usually the later state) differs from this one."""
        differences = []
        for spec in fields(self):
            mine, theirs = getattr(self, spec.name), getattr(other, spec.name)
            if mine == theirs:
                continue
            differences.append((spec.name, _describe(spec.name, mine, theirs)))
        return differences

    def assert_unchanged(self, other: "ModelState", context: str = "") -> None:
        differences = self.diff(other)
        if differences:
            lines = [f"the model changed{(' ' + context) if context else ''}:"]
            lines += [f"  - {name}: {description}" for name, description in differences]
            raise AssertionError("\n".join(lines))


def _describe(name: str, before: Any, after: Any) -> str:
    if name == "state_dict_keys" or name == "module_tree":
        return _sequence_diff(before, after)
    if isinstance(before, tuple) and isinstance(after, tuple) and all(
        isinstance(item, tuple) and len(item) == 2 for item in before + after
    ):
        return _mapping_diff(dict(before), dict(after))
    if isinstance(before, dict) and isinstance(after, dict):
        return _mapping_diff(before, after)
    return f"{_short(before)} -> {_short(after)}"


def _sequence_diff(before: tuple, after: tuple) -> str:
    before_set, after_set = set(before), set(after)
    added = [item for item in after if item not in before_set]
    removed = [item for item in before if item not in after_set]
    parts = []
    if added:
        parts.append(f"{len(added)} added {_listing(added)}")
    if removed:
        parts.append(f"{len(removed)} removed {_listing(removed)}")
    if not parts:
        parts.append("same entries, another order")
    return "; ".join(parts)


def _mapping_diff(before: dict, after: dict) -> str:
    added = [key for key in after if key not in before]
    removed = [key for key in before if key not in after]
    changed = [key for key in before if key in after and before[key] != after[key]]
    parts = []
    if changed:
        shown = [
            f"{key}: {{{_mapping_diff(before[key], after[key])}}}"
            if isinstance(before[key], dict) and isinstance(after[key], dict)
            else f"{key}: {_short(before[key])} -> {_short(after[key])}"
            for key in changed[:_MAX_LISTED]
        ]
        more = f" ... and {len(changed) - _MAX_LISTED} more" if len(changed) > _MAX_LISTED else ""
        parts.append(f"{len(changed)} changed [{'; '.join(shown)}{more}]")
    if added:
        parts.append(f"{len(added)} added {_listing(added)}")
    if removed:
        parts.append(f"{len(removed)} removed {_listing(removed)}")
    return "; ".join(parts) or "differs"


def _listing(items: list) -> str:
    shown = ", ".join(str(item) for item in items[:_MAX_LISTED])
    more = f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def _short(value: Any, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
