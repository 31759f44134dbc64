"""`ChildTuningModel`: the peft tuner that wraps the targeted modules and chooses the child network."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .config import ChildTuningConfig
from .constants import TRANSFORMERS_MODELS_TO_CHILDTUNING_TARGET_MODULES_MAPPING
from .fisher import LossFunction, child_size, estimate_fisher, proportional_child_sizes, top_k_threshold
from .gradient_mask import MaskStepCounter
from .layer import TUNED_TENSOR_CONTAINERS, ChildTuningLayer, ChildTuningModule, validate_child_tensors
from .sparse_format import (
    AdapterFormatError,
    all_finite,
    base_fingerprint,
    decode_positions,
    encoding_of,
    fingerprint_matches,
)

logger = logging.getLogger(__name__)


def tuned_tensors(model: nn.Module, adapter_name: str) -> Iterator[tuple[ChildTuningLayer, str, str, torch.Tensor]]:
    """(layer, tensor name, tensor key, base tensor) for every tensor the adapter tunes, in model order."""
    for module in model.modules():
        if isinstance(module, ChildTuningLayer) and adapter_name in module.childtuning_spec:
            for tensor_name in module.tuned_tensor_names(adapter_name):
                yield module, tensor_name, module.tensor_key(tensor_name), getattr(module.get_base_layer(), tensor_name)


def discard_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter that failed its checks from every layer, so the model computes what its base does."""
    for module in model.modules():
        if isinstance(module, ChildTuningLayer) and adapter_name in module.childtuning_spec:
            if adapter_name in module.merged_adapters:
                module.unmerge()
            module.delete_adapter(adapter_name)


def record_child_network(model: nn.Module, config: ChildTuningConfig, adapter_name: str) -> None:
    """Write the child sizes and position encodings of the model's layers into the adapter's config."""
    tuned = list(tuned_tensors(model, adapter_name))
    config.child_sizes = {key: layer.child_size(adapter_name, name) for layer, name, key, _ in tuned}
    config.child_encodings = {key: layer.childtuning_spec[adapter_name].encodings[name] for layer, name, key, _ in tuned}


class ChildTuningModel(BaseTuner):
    """Child-Tuning (Xu et al., EMNLP 2021) as a peft tuner.

    Example:
        ```py
        >>> import peft_childtuning  # registers the tuner with peft
        >>> from peft import get_peft_model
        >>> from peft_childtuning import ChildTuningConfig

        >>> model = get_peft_model(base, ChildTuningConfig(mode="d", reserve_p=0.3, task_type="SEQ_CLS"))
        >>> model.detect_child_network(train_dataloader)  # Fisher pass and selection
        ```
    """

    prefix: str = "childtuning_"
    tuner_layer_cls = ChildTuningLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_CHILDTUNING_TARGET_MODULES_MAPPING

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, **kwargs: Any) -> None:
        # created before injection: every layer shares it, and mode "f" masks are seeded by its step
        self.mask_step_counter = MaskStepCounter(self._trainable_adapter_parameters)
        super().__init__(model, config, adapter_name, **kwargs)

    # ----------------------------------------------------------------------------------------------- injection
    def _create_and_replace(
        self,
        config: ChildTuningConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        if isinstance(target, ChildTuningLayer):
            target.update_layer(adapter_name, config)
            return
        weight = getattr(target, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(
                f"Child-Tuning cannot tune {current_key} ({type(target).__name__}): it has no floating-point weight. "
                "Target modules with a weight (Linear, Conv1D, Embedding, LayerNorm, ...)."
            )
        new_module = ChildTuningModule(
            target, adapter_name, config, module_key=current_key, step_counter=self.mask_step_counter
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        tensors = list(self._tuned_tensors(adapter_name))
        # an adapter still waiting for its Fisher pass holds no values of the base: any base will do
        if config.base_fingerprint is None:
            config.base_fingerprint = base_fingerprint((key, tensor) for _, _, key, tensor in tensors)
        elif not (config.ignore_base_mismatch or config.needs_fisher_pass) and not fingerprint_matches(
            config.base_fingerprint, ((key, tensor) for _, _, key, tensor in tensors)
        ):
            discard_adapter(self.model, adapter_name)
            raise AdapterFormatError(
                f"Adapter '{adapter_name}' was tuned from other base weights than this model's "
                f"(base_model_name_or_path={config.base_model_name_or_path!r}): its base fingerprint does not match. "
                "Load it onto the base it was trained from, or set ignore_base_mismatch=True in its config to "
                "load it anyway."
            )
        if config.mode == "d" and config.selection == "random" and config.child_sizes is None:
            # a random child network of exactly round(p * N) entries, spread over the tensors by their sizes
            sizes = proportional_child_sizes(config.reserve_p, [tensor.numel() for _, _, _, tensor in tensors])
            config.child_sizes = {key: size for (_, _, key, _), size in zip(tensors, sizes)}
            for layer in {id(layer): layer for layer, _, _, _ in tensors}.values():
                layer.update_layer(adapter_name, config)
            record_child_network(self.model, config, adapter_name)

    def _tuned_tensors(self, adapter_name: str) -> Iterator[tuple[ChildTuningLayer, str, str, torch.Tensor]]:
        return tuned_tensors(self.model, adapter_name)

    def _trainable_adapter_parameters(self) -> list[nn.Parameter]:
        return [parameter for name, parameter in self.model.named_parameters() if self.prefix in name]

    @contextmanager
    def _tuner_layers_disabled(self) -> Iterator[None]:
        layers = [module for module in self.model.modules() if isinstance(module, ChildTuningLayer)]
        saved = [layer._disable_adapters for layer in layers]
        try:
            for layer in layers:
                layer._disable_adapters = True
            yield
        finally:
            for layer, disabled in zip(layers, saved):
                layer._disable_adapters = disabled

    # ----------------------------------------------------------------------------------------------- mode "d"
    def detect_child_network(
        self,
        dataloader: Iterable[Any],
        num_batches: Optional[int] = None,
        loss_fn: Optional[LossFunction] = None,
        max_grad_norm: Optional[float] = 1.0,
        adapter_name: Optional[str] = None,
        progress: bool = True,
    ) -> dict[str, int]:
        """Estimate the Fisher information on the task data and make the top `reserve_p` fraction the child network.

        Args:
            dataloader: any iterable of batches (a DataLoader, a list); each batch a dict for `model(**batch)` that
                returns `.loss`, unless `loss_fn` is given.
            num_batches: use only the first `num_batches` batches (default: all of them).
            loss_fn: `loss_fn(model, batch) -> scalar loss`, for batches or losses of another form.
            max_grad_norm: each batch's gradient of each tensor is clipped to this norm on its own, as the released
                code does (None: no clipping).
            adapter_name: the mode-"d" adapter (default: the active one).
            progress: show a progress bar.

        Returns:
            The number of child entries of each tuned tensor (also stored as the config's `child_sizes`).
        """
        adapter_name = adapter_name or self._single_active_adapter()
        config = self.peft_config[adapter_name]
        if config.mode != "d":
            raise ValueError(
                f"Adapter '{adapter_name}' is in mode 'f', which draws a fresh random mask every step and has no child "
                "network to detect; detect_child_network is for mode 'd'."
            )
        if any(module.merged for module in self.model.modules() if isinstance(module, ChildTuningLayer)):
            raise RuntimeError("detect_child_network needs the adapters unmerged: call model.unmerge_adapter() first.")
        tuned = list(self._tuned_tensors(adapter_name))
        with self._tuner_layers_disabled():  # the base tensors take the gradient; the adapter must not hide entries
            fisher = estimate_fisher(
                self.model,
                {key: tensor for _, _, key, tensor in tuned},
                dataloader,
                num_batches=num_batches,
                loss_fn=loss_fn,
                max_grad_norm=max_grad_norm,
                progress=progress,
            )
        scores = [fisher.pop(key) for _, _, key, _ in tuned]
        total = sum(score.numel() for score in scores)
        threshold = top_k_threshold(scores, child_size(config.reserve_p, total))
        for index, (layer, tensor_name, _, _) in enumerate(tuned):
            # one tensor's positions at a time, and its scores freed once they are installed
            layer.set_child_network(adapter_name, tensor_name, threshold.positions(index, scores[index]))
            scores[index] = None
        record_child_network(self.model, config, adapter_name)
        chosen_total = sum(config.child_sizes.values())
        logger.info(
            "Child-Tuning-D: child network of %d / %d entries (%.2f%%) in %d tensors",
            chosen_total,
            total,
            100.0 * chosen_total / max(total, 1),
            len(tuned),
        )
        return dict(config.child_sizes)

    def _single_active_adapter(self) -> str:
        if len(self.active_adapters) != 1:
            raise ValueError(f"Several adapters are active ({self.active_adapters}); pass adapter_name=.")
        return self.active_adapters[0]

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """Buffers DistributedDataParallel must not broadcast: the encoded child positions.

        DDP broadcasts buffers from process 0, but gloo and NCCL have no 16-bit integer type for the "gap16"
        encoding; and every process holds the same positions anyway (Fisher summed over processes, a seeded random
        child, or the same checkpoint). DDP looks this attribute up on the module it wraps, which reaches the tuner
        through PeftModel's attribute forwarding; the names are given relative to each possible root.
        """
        names = [
            name
            for name, _ in self.model.named_buffers()
            if any(f".{positions_attr}." in f".{name}" for _, positions_attr in TUNED_TENSOR_CONTAINERS.values())
        ]
        return [f"{root}{name}" for name in names for root in ("", "model.", "base_model.model.")]

    # ----------------------------------------------------------------------------------------------- saving, loading
    @staticmethod
    def _layers_by_state_dict_prefix(model: nn.Module) -> dict[str, ChildTuningLayer]:
        """Child-Tuning layers by the prefix of their keys in a state dict ("" for none, FSDP's wrapper removed)."""
        layers = {}
        for name, module in model.named_modules():
            if isinstance(module, ChildTuningLayer):
                name = name.replace("_fsdp_wrapped_module.", "")
                layers[f"{name}." if name else ""] = module
        return layers

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: ChildTuningConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """The adapter's tensors, with the child values in the base tensor's own dtype (merging is then a scatter)."""
        to_save = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for prefix, layer in cls._layers_by_state_dict_prefix(model).items():
            for tensor_name in layer.tuned_tensor_names(adapter_name):
                key = f"{prefix}{TUNED_TENSOR_CONTAINERS[tensor_name][0]}.{adapter_name}"
                if key in to_save:
                    to_save[key] = to_save[key].to(getattr(layer.get_base_layer(), tensor_name).dtype)
        return to_save

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: ChildTuningConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Check the checkpoint before anything is loaded, so a bad file changes nothing.

        Every tensor must fit the model's (shape) and be finite; each tuned tensor's child values and positions must
        agree with each other and with the config. On a bad file the adapter is removed again, so the model keeps
        computing what its base does. An adapter still waiting for its Fisher pass takes the checkpoint's child
        network instead (e.g. a Trainer resuming from a checkpoint), so resuming never recomputes the Fisher pass.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        try:
            cls._check_checkpoint(model, config, adapter_name, remapped)
        except AdapterFormatError:
            discard_adapter(model, adapter_name)
            raise
        return remapped

    @classmethod
    def _check_checkpoint(
        cls, model: nn.Module, config: ChildTuningConfig, adapter_name: str, checkpoint: dict[str, torch.Tensor]
    ) -> None:
        model_tensors = model.state_dict(keep_vars=True)
        adopt_child_network = config.needs_fisher_pass
        for key, tensor in checkpoint.items():
            if not all_finite(tensor):
                raise AdapterFormatError(f"{key}: the adapter file holds NaN or inf values.")
            expected = model_tensors.get(key, model_tensors.get(key.removeprefix("base_model.model.")))
            is_child_tensor = any(attr in key for pair in TUNED_TENSOR_CONTAINERS.values() for attr in pair)
            if expected is not None and not is_child_tensor and expected.shape != tensor.shape:
                raise AdapterFormatError(
                    f"{key}: the file has shape {tuple(tensor.shape)}, the model {tuple(expected.shape)}; the adapter "
                    "was saved from another model."
                )
        for prefix, layer in cls._layers_by_state_dict_prefix(model).items():
            for tensor_name in layer.tuned_tensor_names(adapter_name):
                values_attr, positions_attr = TUNED_TENSOR_CONTAINERS[tensor_name]
                keys = [f"{prefix}{values_attr}.{adapter_name}"]
                if config.mode == "d":
                    keys.append(f"{prefix}{positions_attr}.{adapter_name}")
                tensors = [checkpoint.get(key, checkpoint.get(f"base_model.model.{key}")) for key in keys]
                for key, tensor in zip(keys, tensors):
                    if tensor is None:
                        raise AdapterFormatError(f"The adapter file has no tensor for {key}: it is incomplete.")
                if adopt_child_network:
                    values, encoded = tensors
                    encoding = encoding_of(encoded)
                    base_tensor = getattr(layer.get_base_layer(), tensor_name)
                    positions = decode_positions(
                        encoded, base_tensor.numel(), values.numel(), encoding, layer.tensor_key(tensor_name)
                    )
                    layer.set_child_network(adapter_name, tensor_name, positions, encoding)
                validate_child_tensors(layer, adapter_name, tensor_name, *tensors)
        if adopt_child_network:
            record_child_network(model, config, adapter_name)

    # ----------------------------------------------------------------------------------------------- unloading
    def unload(self) -> nn.Module:
        """Return the base model without Child-Tuning layers, its weights restored exactly (merged adapters too)."""
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer) and module.merged:
                module.unmerge()
        return super().unload()
