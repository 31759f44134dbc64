"""peft's helpers and status functions on Child-Tuning models: what works, and what is refused and why.

- ``peft.helpers.disable_input_dtype_casting`` works: it switches the layers' ``cast_input_dtype_enabled`` flag,
  which changes nothing for Child-Tuning (its forward never casts the input, see `ChildTuningLayer.__init__`).
- ``get_layer_status`` / ``get_model_status``: a ``modules_to_save`` copy (e.g. the classifier head) has no merged
  state of its own (it runs the same, merged or not), so in a Child-Tuning model it reports the adapters merged in
  the Child-Tuning layers. peft reports it unmerged, which makes every merged model, including one loaded for
  inference (loading merges), "irregular", the state peft's docs call likely to give wrong results.
- ``peft.helpers.rescale_adapter_scale`` and ``PeftMixedModel`` are refused with the reason (below).

`install` puts these in place of peft's functions; ``import peft_childtuning`` calls it, so a name imported from
peft before that (``from peft.helpers import rescale_adapter_scale``) keeps peft's own function.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, Union

from torch import nn

from .config import ChildTuningConfig
from .layer import ChildTuningLayer

RESCALE_REFUSAL = (
    "rescale_adapter_scale does not support Child-Tuning: a Child-Tuning adapter has no scale to multiply. It is the "
    "trained values of its child entries themselves, not an update weighted by a scale as LoRA's is (alpha / r), "
    "and a model loaded for inference has them written into its weights. To interpolate between the base and the "
    "fine-tuned weights (WiSE-FT), blend them yourself: base + m * (model.merge_and_unload() - base), per tensor."
)
MIXED_REFUSAL = (
    "PeftMixedModel does not support Child-Tuning: peft's MixedModel creates, merges and unloads adapter layers "
    "only through the code of the tuner types it lists (peft.tuners.mixed.COMPATIBLE_TUNER_TYPES: LoRA, LoHa, LoKr, "
    "AdaLoRA, OFT, SHiRA) and cannot take in a tuner that a plugin registers. Use a PeftModel: "
    "get_peft_model(model, config) without mixed=True, or PeftModel.from_pretrained."
)

_ORIGINALS: dict[str, Callable[..., Any]] = {}


def _rescale_adapter_scale(model: nn.Module, multiplier: Union[float, int]) -> AbstractContextManager[None]:
    """peft's rescale_adapter_scale, refused for a model with Child-Tuning layers: scaling only its LoRA layers
    (a model may hold both kinds) would leave the Child-Tuning adapters as they are, silently."""
    if any(isinstance(module, ChildTuningLayer) for module in model.modules()):
        raise ValueError(RESCALE_REFUSAL)
    return _ORIGINALS["rescale_adapter_scale"](model, multiplier)


def _check_mixed_config_compatible(peft_config: Any) -> None:
    """peft's check of a config given to PeftMixedModel (creation, add_adapter, load_adapter), with our reason."""
    if isinstance(peft_config, ChildTuningConfig):
        raise ValueError(MIXED_REFUSAL)
    _ORIGINALS["check_mixed_config"](peft_config)


def _get_layer_status(model: nn.Module) -> list[Any]:
    """peft's get_layer_status, with each modules_to_save copy reporting the adapters merged in the Child-Tuning
    layers (it has no merged state of its own); for a model without Child-Tuning layers, peft's report as it is."""
    from peft import PeftModel
    from peft.utils.other import ModulesToSaveWrapper

    statuses = _ORIGINALS["get_layer_status"](model)
    root = model.base_model if isinstance(model, PeftModel) else model
    modules = dict(root.named_modules())
    layers = [module for module in modules.values() if isinstance(module, ChildTuningLayer)]
    merged = {name for layer in layers for name in layer.merged_adapters}
    for status in statuses:
        if merged and isinstance(modules.get(status.name), ModulesToSaveWrapper):
            status.merged_adapters = sorted(merged & set(status.available_adapters))
    return statuses


def install() -> None:
    """Put the functions above in place of peft's. Idempotent."""
    if _ORIGINALS:
        return
    import peft
    import peft.helpers
    import peft.mixed_model
    import peft.peft_model

    _ORIGINALS.update(
        rescale_adapter_scale=peft.helpers.rescale_adapter_scale,
        check_mixed_config=peft.mixed_model._check_config_compatible,
        get_layer_status=peft.peft_model.get_layer_status,
    )
    peft.helpers.rescale_adapter_scale = _rescale_adapter_scale
    peft.mixed_model._check_config_compatible = _check_mixed_config_compatible
    # PeftModel.get_layer_status / get_model_status and peft.get_model_status look it up in peft.peft_model
    peft.peft_model.get_layer_status = _get_layer_status
    peft.get_layer_status = _get_layer_status
