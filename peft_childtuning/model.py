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
from .fisher import FisherChunks, LossFunction, proportional_child_sizes
from .gradient_mask import MaskStepCounter
from .fingerprint import base_fingerprint
from .layer import TUNED_TENSOR_CONTAINERS, ChildTuningLayer, ChildTuningModule
from .loading import attach_load_hooks, check_checkpoint, pending_checkpoint
from .resizing import gradient_accumulator_is_held
from .selection import select_child_network
from .sparse_format import VARIABLE_LENGTH_ENCODINGS, AdapterFormatError, encoded_length
from .tied_weights import refuse_tied_targets

logger = logging.getLogger(__name__)


def tuned_tensors(model: nn.Module, adapter_name: str) -> Iterator[tuple[ChildTuningLayer, str, str, torch.Tensor]]:
    """(layer, tensor name, tensor key, base tensor) for every tensor the adapter's config targets, in model order.

    Targeted, not only tuned: a mode-"d" tensor whose child network came out empty is not tuned (no values, see
    `record_child_network`) but still counts among the entries the child network was chosen from.
    """
    for module in model.modules():
        if isinstance(module, ChildTuningLayer) and adapter_name in module.childtuning_spec:
            for tensor_name in module.targeted_tensor_names(adapter_name):
                yield module, tensor_name, module.tensor_key(tensor_name), getattr(module.get_base_layer(), tensor_name)


def record_child_network(model: nn.Module, config: ChildTuningConfig, adapter_name: str) -> None:
    """Write the child sizes and position encodings (with gap16x streams' lengths) of the model's layers into the
    adapter's config.

    Called once the child network is chosen. A tensor whose child came out empty stops being tuned here and is left
    out of child_sizes: a 0-element values Parameter, with nothing to train, would reach optimizers (torch's
    Adafactor divides by its size) and checkpoints (accelerate's save_state / load_state lose it).
    """
    sizes, encodings, lengths = {}, {}, {}
    for layer, tensor_name, key, _ in list(tuned_tensors(model, adapter_name)):
        if tensor_name not in layer.tuned_tensor_names(adapter_name):
            continue
        if layer.child_size(adapter_name, tensor_name) == 0:
            layer.untune(adapter_name, tensor_name)
            continue
        sizes[key] = layer.child_size(adapter_name, tensor_name)
        spec = layer.childtuning_spec[adapter_name]
        encodings[key] = spec.encodings[tensor_name]
        if tensor_name in spec.encoded_lengths:
            lengths[key] = spec.encoded_lengths[tensor_name]
    config.child_sizes = sizes
    config.child_encodings = encodings
    config.child_encoded_lengths = lengths or None  # recorded only where an encoding needs it


def child_tuning_adapters(model: nn.Module) -> dict[str, ChildTuningConfig]:
    """The Child-Tuning adapters that have layers in `model`, with their configs, however they were added.

    The configs live in a ``peft_config`` dict. ``get_peft_model``'s tuner keeps one and puts the same dict on the
    model it wraps; peft's ``inject_adapter_in_model`` and transformers' ``add_adapter`` leave only the dict on the
    model itself. The layers' specs hold too little to save the adapter, so the child network must be recorded in
    this config (`record_child_network`), the one ``save_pretrained`` writes.
    """
    in_layers = {
        name for module in model.modules() if isinstance(module, ChildTuningLayer) for name in module.childtuning_spec
    }
    adapters: dict[str, ChildTuningConfig] = {}
    for module in model.modules():
        configs = module.__dict__.get("peft_config")  # not PeftModel's property, nor BaseTuner's forwarding
        if not isinstance(configs, dict):
            continue
        for name, config in configs.items():
            if isinstance(config, ChildTuningConfig) and name in in_layers:
                if adapters.setdefault(name, config) is not config:
                    raise ValueError(
                        f"The model holds two different configs for Child-Tuning adapter '{name}' (in two "
                        "`peft_config` dicts), so it is unclear which one to save; add each adapter once, through "
                        "one entry point (get_peft_model, add_adapter or inject_adapter_in_model)."
                    )
    return adapters


def active_child_tuning_adapters(model: nn.Module) -> list[str]:
    """The names of the Child-Tuning adapters active in `model`'s layers, in model order."""
    active: list[str] = []
    for module in model.modules():
        if isinstance(module, ChildTuningLayer):
            for name in module.active_adapters:
                if name in module.childtuning_spec and name not in active:
                    active.append(name)
    return active


@contextmanager
def _layers_disabled(model: nn.Module) -> Iterator[None]:
    """Every Child-Tuning layer of `model` computes with its base tensors only, for the duration."""
    layers = [module for module in model.modules() if isinstance(module, ChildTuningLayer)]
    saved = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = True
        yield
    finally:
        for layer, disabled in zip(layers, saved):
            layer._disable_adapters = disabled


def detect_child_network(
    model: nn.Module,
    dataloader: Iterable[Any],
    num_batches: Optional[int] = None,
    loss_fn: Optional[LossFunction] = None,
    max_grad_norm: Optional[float] = 1.0,
    adapter_name: Optional[str] = None,
    progress: bool = True,
    fisher_chunks: FisherChunks = 1,
) -> dict[str, int]:
    """Estimate the Fisher information on the task data and make the top `reserve_p` fraction the child network.

    Works on any model holding Child-Tuning-D layers that wait for their Fisher pass, however they were added: a
    PeftModel (``get_peft_model``), a transformers model after ``model.add_adapter(ChildTuningConfig(...))``, any
    module after ``peft.inject_adapter_in_model(config, module)``. The child network is recorded in the adapter's
    config (``child_sizes``, ``child_encodings``), so the adapter saves and reloads with it.

    Args:
        model: the model; ``model(**batch)`` (or ``loss_fn(model, batch)``) computes the loss.
        dataloader: any iterable of batches (a DataLoader, a list); each batch a dict for `model(**batch)` that
            returns `.loss`, unless `loss_fn` is given.
        num_batches: use only the first `num_batches` batches (default: all of them).
        loss_fn: `loss_fn(model, batch) -> scalar loss`, for batches or losses of another form.
        max_grad_norm: each batch's gradient of each tensor is clipped to this norm on its own, as the released
            code does (None: no clipping).
        adapter_name: the mode-"d" adapter (default: the active one).
        progress: show a progress bar.
        fisher_chunks: 1 (the fastest): one pass, holding a float32 score for every tuned entry. N > 1: the entries
            are scored in N chunks, one pass over the same batches each (kept in memory and replayed with the same
            random state), keeping only the best k between chunks: the same child network, bit for bit, with the
            scores' memory divided by N, for N times the passes. "auto": chunks of 2k entries, so that the pass
            holds no more for its scores than training does for its child entries (about 1 / reserve_p / 2 passes).

    Returns:
        The number of child entries of each tuned tensor (also stored as the config's `child_sizes`); a tensor
        whose child network came out empty is not tuned, and not listed.

    Raises:
        RuntimeError: the adapter already has its child network (a second call), or the model was wrapped in
            DistributedDataParallel before this call (call it before wrapping).
    """
    adapters = child_tuning_adapters(model)
    if adapter_name is None:
        active = active_child_tuning_adapters(model)
        if len(active) != 1:
            raise ValueError(
                f"detect_child_network: {len(active)} Child-Tuning adapters are active ({active}); pass adapter_name=."
                if active
                else "detect_child_network: the model has no active Child-Tuning adapter. Add one first: "
                "get_peft_model(base, ChildTuningConfig(...)), base.add_adapter(ChildTuningConfig(...)) or "
                "peft.inject_adapter_in_model(ChildTuningConfig(...), base)."
            )
        adapter_name = active[0]
    if adapter_name not in adapters:
        raise ValueError(
            f"detect_child_network: the model has no Child-Tuning adapter '{adapter_name}' with its config (adapters: "
            f"{sorted(adapters)}); its config must be in the model's `peft_config`, as every entry point puts it."
        )
    config = adapters[adapter_name]
    if config.mode != "d":
        raise ValueError(
            f"Adapter '{adapter_name}' is in mode 'f', which draws a fresh random mask every step and has no child "
            "network to detect; detect_child_network is for mode 'd'."
        )
    if any(module.merged for module in model.modules() if isinstance(module, ChildTuningLayer)):
        raise RuntimeError("detect_child_network needs the adapters unmerged: call model.unmerge_adapter() first.")
    if not config.needs_fisher_pass:
        origin = (
            "selection='random' chose it when the adapter was created"
            if config.selection == "random"
            else "chosen by an earlier detect_child_network, or loaded with the adapter"
        )
        raise RuntimeError(
            f"Adapter '{adapter_name}' already has its child network ({origin}); detect_child_network chooses it "
            "once, before training. Choosing it again would restart the trained values from the base and leave "
            "optimizers with state for the old child network. For a new child network, add a fresh adapter "
            "(model.add_adapter(name, ChildTuningConfig(...))) or wrap a fresh base model."
        )
    tuned = list(tuned_tensors(model, adapter_name))
    held = [
        key
        for layer, tensor_name, key, _ in tuned
        if gradient_accumulator_is_held(layer.child_values(adapter_name, tensor_name))
    ]
    if held:
        raise RuntimeError(
            f"detect_child_network: autograd already holds the values of adapter '{adapter_name}' (e.g. for "
            f"{held[0]}) with their empty placeholder shapes: the model is wrapped in DistributedDataParallel, "
            "whose gradient buckets cannot follow the child network (or a graph of an earlier forward pass is "
            "still alive), and the first backward would fail. Call detect_child_network(...) before "
            "wrapping the model (before DistributedDataParallel(model) or accelerator.prepare(model)); with the "
            "transformers Trainer, call peft_childtuning.prepare_child_network(trainer) before trainer.train(). "
            "Without a wrapper, let go of the outputs of earlier forward passes (or run them under "
            "torch.no_grad()) first."
        )
    total = sum(tensor.numel() for _, _, _, tensor in tuned)
    with _layers_disabled(model):  # the base tensors take the gradient; the adapter must not hide entries
        positions = select_child_network(
            model,
            dataloader,
            config.reserve_p,
            tensors={key: tensor for _, _, key, tensor in tuned},
            num_batches=num_batches,
            loss_fn=loss_fn,
            max_grad_norm=max_grad_norm,
            progress=progress,
            fisher_chunks=fisher_chunks,
        )
    for layer, tensor_name, key, _ in tuned:  # popped: the layer holds them in its own encoding
        layer.set_child_network(adapter_name, tensor_name, positions.pop(key))
    record_child_network(model, config, adapter_name)
    chosen_total = sum(config.child_sizes.values())
    logger.info(
        "Child-Tuning-D: child network of %d / %d entries (%.2f%%) in %d tensors",
        chosen_total,
        total,
        100.0 * chosen_total / max(total, 1),
        len(tuned),
    )
    return dict(config.child_sizes)


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
        self._values_on_meta = False  # set while injecting for a loader that assigns the file's tensors
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
        values_on_meta = self._values_on_meta
        if isinstance(target, ChildTuningLayer):
            target.update_layer(adapter_name, config, values_on_meta=values_on_meta)
            return
        weight = getattr(target, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(
                f"Child-Tuning cannot tune {current_key} ({type(target).__name__}): it has no floating-point weight. "
                "Target modules with a weight (Linear, Conv1D, Embedding, LayerNorm, ...)."
            )
        new_module = ChildTuningModule(
            target,
            adapter_name,
            config,
            module_key=current_key,
            step_counter=self.mask_step_counter,
            values_on_meta=values_on_meta,
        )
        attach_load_hooks(new_module)
        new_module.train(target.training)  # a module added later follows the model's mode (train or eval)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, *args: Any, low_cpu_mem_usage: bool = False, **kwargs: Any
    ) -> None:
        config = self.peft_config[adapter_name]
        _check_child_sizes_fit(model, config)  # before any layer allocates its placeholders
        # low_cpu_mem_usage: the loader assigns the file's tensors, so the values' placeholders are never allocated
        self._values_on_meta = low_cpu_mem_usage
        try:
            super().inject_adapter(model, adapter_name, *args, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)
        finally:
            self._values_on_meta = False
        tensors = list(self._tuned_tensors(adapter_name))
        if config.child_sizes is not None:
            untuned = sorted(set(key for key, size in config.child_sizes.items() if size) - {t[2] for t in tensors})
            if untuned:
                raise AdapterFormatError(
                    f"Adapter '{adapter_name}': its child_sizes name {untuned[:3]}, which its target_modules do not "
                    "tune in this model; the adapter_config.json does not match the model (or was edited)."
                )
        if config.mode == "d" and config.selection == "random" and config.child_sizes is None:
            # a random child network of exactly round(p * N) entries, spread over the tensors by their sizes
            sizes = proportional_child_sizes(config.reserve_p, [tensor.numel() for _, _, _, tensor in tensors])
            config.child_sizes = {key: size for (_, _, key, _), size in zip(tensors, sizes)}
            for layer in {id(layer): layer for layer, _, _, _ in tensors}.values():
                layer.update_layer(adapter_name, config)
            record_child_network(self.model, config, adapter_name)
        pending = pending_checkpoint()
        if pending is not None and pending.check_when_injected and pending.adapter_name == adapter_name:
            check_checkpoint(self.model, config, adapter_name, pending.tensors())

    def _prepare_model(self, peft_config: ChildTuningConfig, model: nn.Module) -> None:
        """Refuse tied targets (`tied_weights`) before peft wraps any module: a refusal leaves the model as it was."""
        super()._prepare_model(peft_config, model)
        targets = [
            (key, module)
            for key, module in model.named_modules()
            if key and self._check_target_module_exists(peft_config, key)
        ]
        refuse_tied_targets(model, targets, peft_config.tune_bias)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Put `new_module` in the place of `child`, and nothing else (as LoRA's override does).

        peft's version also copies `child.weight` and `.bias` onto a new module without a `base_layer`. Unloading
        replaces a ModulesToSaveWrapper by its trained copy that way, and the wrapper has no weight of its own but
        forwards the lookup to the copy: a no-op for a Linear head, an AttributeError for a head without a `weight`
        (RoBERTa's classifier). Its device placement is not needed either: `update_layer` puts the adapter's
        tensors on the base layer's device.
        """
        setattr(parent, child_name, new_module)

    def _tuned_tensors(self, adapter_name: str) -> Iterator[tuple[ChildTuningLayer, str, str, torch.Tensor]]:
        return tuned_tensors(self.model, adapter_name)

    def _trainable_adapter_parameters(self) -> list[nn.Parameter]:
        return [parameter for name, parameter in self.model.named_parameters() if self.prefix in name]

    # ----------------------------------------------------------------------------------------------- mode "d"
    def detect_child_network(
        self,
        dataloader: Iterable[Any],
        num_batches: Optional[int] = None,
        loss_fn: Optional[LossFunction] = None,
        max_grad_norm: Optional[float] = 1.0,
        adapter_name: Optional[str] = None,
        progress: bool = True,
        fisher_chunks: FisherChunks = 1,
    ) -> dict[str, int]:
        """Estimate the Fisher information on the task data and make the top `reserve_p` fraction the child network.

        `peft_childtuning.detect_child_network(model, ...)` on the model this tuner wraps; see there. The loss is
        that of the wrapped transformers model (``loss_fn`` receives it).
        """
        return detect_child_network(
            self.model,
            dataloader,
            num_batches=num_batches,
            loss_fn=loss_fn,
            max_grad_norm=max_grad_norm,
            adapter_name=adapter_name,
            progress=progress,
            fisher_chunks=fisher_chunks,
        )

    # ----------------------------------------------------------------------------------------------- composing
    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "linear",
        density: Optional[float] = None,
        majority_sign_method: str = "total",
        seed: int = 0,
    ) -> None:
        """Add `adapter_name`, the weighted combination of Child-Tuning `adapters` (task arithmetic on their changes
        against the base; negative weights subtract). Reached as ``peft_model.add_weighted_adapter(...)``.

        combination_type: "linear" (weighted sum of the changes; child network = the union of the inputs'),
            "magnitude_prune" / "dare_linear" (each input's changes first trimmed to `density` of its child entries, by
            magnitude / at random with the kept ones rescaled by 1 / density), "ties" / "dare_ties" (trimmed the same
            ways, then per entry the sign of the summed changes elected and the agreeing weighted changes averaged),
            peft's `merge_utils` in every case. Mode-"f" adapters (whole tensors) combine the same way, into a
            mode-"f" adapter. Modules saved whole (heads) are combined as whole tensors.
        density: the fraction of each input's child entries kept by the trimming types.
        seed: seeds DARE's random drop (per input and tensor), so a combination can be repeated exactly.

        The new adapter is an ordinary one (see `compose`): it is neither active nor trainable until
        ``set_adapter(adapter_name)``.
        """
        from .compose import add_weighted_adapter

        add_weighted_adapter(
            self, adapters, weights, adapter_name, combination_type, density, majority_sign_method, seed
        )

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """Buffers DistributedDataParallel must not broadcast: the encoded child positions.

        DDP broadcasts buffers from process 0, but gloo and NCCL have no 16-bit integer type for the "gap16" and
        "gap16x" encodings; and every process holds the same positions anyway (Fisher summed over processes, a seeded
        random child, or the same checkpoint). DDP looks this attribute up on the module it wraps, which reaches the
        tuner through PeftModel's attribute forwarding; the names are given relative to each possible root.
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
        """The adapter's tensors, with the child values in the base tensor's own dtype (merging is then a scatter).

        The base fingerprint is recorded here, the first time the adapter is saved, rather than at creation: only
        now are the modules it saves whole (a head a task model adds after creating the tuner) known, and left out.
        """
        if config.base_fingerprint is None:
            config.base_fingerprint = base_fingerprint(model)
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
        """Check the checkpoint (`loading.check_checkpoint`) before peft writes anything of it into the model.

        Tensors of the modules saved whole are cast to the dtype of the model's copy: loading with
        low_cpu_mem_usage assigns the file's tensors as they are, and a head in another dtype would break the forward.
        """
        check_checkpoint(model, config, adapter_name, state_dict)
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        for key, tensor in remapped.items():
            if f".modules_to_save.{adapter_name}." in key:
                target = _model_tensor(model, key)
                if target is None:
                    target = _model_tensor(model, key.removeprefix("base_model.model."))
                if target is not None and tensor.dtype != target.dtype:
                    remapped[key] = tensor.to(target.dtype)
        return remapped

    # ----------------------------------------------------------------------------------------------- unloading
    def unload(self) -> nn.Module:
        """Return the base model without Child-Tuning layers, its weights restored exactly (merged adapters too)."""
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer) and module.merged:
                module.unmerge()
        return super().unload()

    def delete_adapter(self, adapter_name: str) -> None:
        """peft's delete_adapter, also for an adapter merged when it was loaded for inference: unmerged first, the
        others merged again. One merged by the user (merge_adapter) is refused, as peft refuses it."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if not self.peft_config[adapter_name].inference_mode:
            return super().delete_adapter(adapter_name)
        remerge = {}
        for module in self.model.modules():
            if isinstance(module, ChildTuningLayer) and adapter_name in module.merged_adapters:
                remerge[module] = [name for name in module.merged_adapters if name != adapter_name]
                module.unmerge()
        super().delete_adapter(adapter_name)
        for module, names in remerge.items():
            if names:
                module.merge(adapter_names=names)


def _model_tensor(model: nn.Module, key: str) -> Optional[torch.Tensor]:
    """The parameter or buffer `key` (a state-dict name) of `model`, or None."""
    module_name, _, tensor_name = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    tensor = getattr(module, tensor_name, None)
    return tensor if isinstance(tensor, torch.Tensor) else None


def _check_child_sizes_fit(model: nn.Module, config: ChildTuningConfig) -> None:
    """Refuse child sizes (and gap16x stream lengths) that do not fit the tensors they name, before a few bytes of
    JSON allocate gigabytes."""
    for key, size in (config.child_sizes or {}).items():
        module_name, _, tensor_name = key.rpartition(".")
        try:
            module = model.get_submodule(module_name)
            if isinstance(module, ChildTuningLayer):
                module = module.get_base_layer()
            tensor = getattr(module, tensor_name)
        except AttributeError:
            tensor = None
        if not isinstance(tensor, torch.Tensor):
            raise AdapterFormatError(
                f"child_sizes names {key}, which is not a tensor of this model: the adapter_config.json does not "
                "belong to this base model (or was edited)."
            )
        if not 0 <= size <= tensor.numel():
            raise AdapterFormatError(
                f"child_sizes[{key!r}] = {size} does not fit a tensor of {tensor.numel()} entries: the "
                "adapter_config.json is corrupted."
            )
        encoding = (config.child_encodings or {}).get(key)
        if size and encoding in VARIABLE_LENGTH_ENCODINGS:
            encoded_length(tensor.numel(), size, encoding, (config.child_encoded_lengths or {}).get(key), key)
