"""Loading an adapter is one transaction with one owner: check everything, then change the model, or change nothing.

Every loader of a saved adapter goes through `load_transaction`: ``PeftModel.from_pretrained`` (and with it
``AutoPeftModelFor*``, whose own errors reading the config become `AdapterFormatError` too, and the CLI),
``PeftModel.load_adapter`` (and with it a Trainer resuming) and transformers' ``PreTrainedModel.load_adapter``,
which ``import peft_childtuning`` wraps (`install`). The transaction

1. finds the adapter's folder (a Hub repo is downloaded first: config and weights of one commit, safetensors only),
2. reads ``adapter_model.safetensors`` into memory once and checks every tensor against its stored checksum,
3. snapshots the model (`ModelState`), lets peft or transformers build the layers and load the tensors it read,
   which `check_checkpoint` checks against the model before anything is written, and merges an adapter loaded for
   inference into the base weights,
4. on any failure restores the snapshot (module tree, attributes, configs, tensors, merged adapters) and raises an
   `AdapterFormatError` naming the file, with the original exception as its cause.

A loaded model is never stale: the layers unmerge before any ``load_state_dict`` and merge again after it
(`attach_load_hooks`), so ``set_peft_model_state_dict``, ``model.load_state_dict(other.state_dict())`` or
accelerate's ``load_state`` change what the model computes exactly as they change its adapter.
"""

from __future__ import annotations

import concurrent.futures
import copy
import inspect
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft.config import PeftConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from torch import nn

from .config import ChildTuningConfig
from .fingerprint import fingerprint_mismatch
from .layer import TUNED_TENSOR_CONTAINERS, ChildTuningLayer
from .registration import PEFT_TYPE_NAME
from .sparse_format import (
    VARIABLE_LENGTH_ENCODINGS,
    AdapterFormatError,
    all_finite,
    decode_positions,
    encoding_of,
    read_adapter_weights,
    save_with_checksums,
)

PEFT_PREFIX = "base_model.model."
_CONTAINER_NAMES = {attr for pair in TUNED_TENSOR_CONTAINERS.values() for attr in pair}
_POSITIONS_NAMES = {positions for _, positions in TUNED_TENSOR_CONTAINERS.values()}
_HUB_ARGUMENTS = ("subfolder", "revision", "cache_dir", "token", "force_download", "local_files_only")


# ------------------------------------------------------------------------------------------------ the snapshot
class ModelState:
    """What loading may change in a model, captured so that `restore` can put it back exactly.

    Captured: every module's attributes (children, parameters, buffers, hooks, flags: a failed load leaves no
    wrapper behind), the contents of the containers among them (peft_config and the lists and dicts of the layers),
    the configs in them, every tensor's ``requires_grad``, the values of the adapter being loaded if it exists
    (loading may write into them), and which adapters each layer has merged. Base tensors are not copied: nothing
    but merging writes into them, and merging is undone exactly.
    """

    def __init__(self, root: nn.Module, adapter_name: Optional[str]) -> None:
        self.root = root
        self.module_attributes = [(module, dict(module.__dict__)) for module in root.modules()]
        self.containers: dict[int, tuple[Any, Any]] = {}
        self.configs: dict[int, tuple[PeftConfig, dict[str, Any]]] = {}
        for _, attributes in self.module_attributes:
            for value in attributes.values():
                self._capture_container(value)
        self.requires_grad = [(tensor, tensor.requires_grad) for tensor in _tensors(root)]
        self.merged = [
            (layer, list(layer.merged_adapters)) for layer in root.modules() if isinstance(layer, ChildTuningLayer)
        ]
        self.adapter_values = [
            (tensor, tensor.detach().clone())
            for name, tensor in [*root.named_parameters(), *root.named_buffers()]
            if adapter_name is not None and f".{adapter_name}." in f".{name}."
        ]

    def _capture_container(self, value: Any) -> None:
        if isinstance(value, (dict, list, set)) and id(value) not in self.containers:
            self.containers[id(value)] = (value, value.copy())
            for item in value.values() if isinstance(value, dict) else value:
                if isinstance(item, PeftConfig) and id(item) not in self.configs:
                    self.configs[id(item)] = (item, copy.deepcopy(item.__dict__))

    def restore(self) -> None:
        # 1. undo every merge, so each base tensor holds its own values again (unmerging is exact)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for module in self.root.modules():
                if isinstance(module, ChildTuningLayer) and module.merged:
                    module.unmerge()
        # 2. the modules' attributes, containers, configs and flags, and the values of the adapter being loaded
        for module, attributes in self.module_attributes:
            module.__dict__.clear()
            module.__dict__.update(attributes)
        for container, contents in self.containers.values():
            if isinstance(container, list):
                container[:] = contents
            else:  # a dict or a set
                container.clear()
                container.update(contents)
        for config, attributes in self.configs.values():
            config.__dict__.clear()
            config.__dict__.update(attributes)
        for tensor, flag in self.requires_grad:
            tensor.requires_grad_(flag)
        for tensor, values in self.adapter_values:
            tensor.data = values
        # 3. the merges that were in place, in their order (deterministic: the same bits as before)
        for layer, merged in self.merged:
            layer.merged_adapters.clear()
            layer._merge_originals.clear()
            if merged:
                layer.merge(adapter_names=merged)


def _tensors(root: nn.Module) -> Iterator[torch.Tensor]:
    seen: set[int] = set()
    for tensor in [*root.parameters(), *root.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


# ------------------------------------------------------------------------------------------------ checking
def _strip(key: str) -> str:
    return key.removeprefix(PEFT_PREFIX)


def _module_name(name: str) -> str:
    return _strip(name.replace("_fsdp_wrapped_module.", ""))


@dataclass
class _ExpectedChildTensor:
    layer: ChildTuningLayer
    tensor_name: str
    values_key: str
    positions_key: Optional[str]


def check_checkpoint(
    model: nn.Module, config: ChildTuningConfig, adapter_name: str, checkpoint: dict[str, torch.Tensor]
) -> None:
    """Raise `AdapterFormatError` unless `checkpoint` holds exactly adapter `adapter_name`'s tensors, fitting the model.

    `model` already has the adapter's layers (empty). Checked before anything is written: the checkpoint holds no
    tensor but the child values and positions of the adapter's tuned tensors and its modules saved whole (no base
    weight can be overwritten), none is missing; shapes and dtypes fit (values floating point, finite once cast to
    the dtype of the base tensor they are merged into); positions decode; and, when it carries a child network, the
    base matches the adapter's fingerprint. An adapter still waiting for its Fisher pass adopts the checkpoint's
    child network (a Trainer resuming), after every check has passed.
    """
    from peft.utils.other import ModulesToSaveWrapper

    adopt = config.needs_fisher_pass and config.mode == "d"
    expected: dict[str, _ExpectedChildTensor] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, ChildTuningLayer) and adapter_name in layer.childtuning_spec:
            prefix = f"{_module_name(name)}." if _module_name(name) else ""
            for tensor_name in layer.tuned_tensor_names(adapter_name):
                values_attr, positions_attr = TUNED_TENSOR_CONTAINERS[tensor_name]
                entry = _ExpectedChildTensor(
                    layer,
                    tensor_name,
                    f"{prefix}{values_attr}",
                    f"{prefix}{positions_attr}" if config.mode == "d" else None,
                )
                expected[entry.values_key] = entry
                if entry.positions_key:
                    expected[entry.positions_key] = entry
    # modules saved whole: each tensor under its own name in a file, renamed into the copy by peft before this check
    saved_whole: dict[str, torch.Tensor] = {}
    saved_whole_names: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for key, tensor in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                plain = f"{_module_name(name)}.{key}"
                renamed = f"{_module_name(name)}.modules_to_save.{adapter_name}.{key}"
                saved_whole[plain] = saved_whole[renamed] = tensor
                saved_whole_names.append((plain, renamed))
    given = {_strip(key): tensor for key, tensor in checkpoint.items()}
    # a file names child tensors with peft's prefix; a model that is no PeftModel (layers injected directly into
    # it) also loads them without it, as peft does; the name under which no loader loads a tensor is refused
    pending = _PENDING.get()
    prefix_optional = not any(name.startswith(PEFT_PREFIX) for name, _ in model.named_modules()) and not (
        pending is not None and pending.check_when_injected
    )

    for key, tensor in given.items():
        if key in expected:
            if f"{PEFT_PREFIX}{key}" not in checkpoint and not prefix_optional:
                raise AdapterFormatError(
                    f"the file holds {key} without peft's prefix {PEFT_PREFIX!r}, so no loader would load it into "
                    "the adapter; the file was not written by save_pretrained. Save the adapter again."
                )
            continue
        if key in saved_whole:
            _check_saved_whole(key, tensor, saved_whole[key])
        elif not (tensor.numel() == 0 and key.rpartition(".")[2] in _CONTAINER_NAMES):  # an empty child: nothing
            raise AdapterFormatError(
                f"the file holds {PEFT_PREFIX}{key}, which is not a tensor of adapter '{adapter_name}' (its child "
                "values and positions, and the modules it saves whole); a file may hold only its own adapter's "
                "tensors, never a base weight. Save the adapter again with save_pretrained."
            )
    for plain, renamed in saved_whole_names:
        if plain not in given and renamed not in given:
            raise AdapterFormatError(
                f"the file has no tensor {PEFT_PREFIX}{plain}, of a module the adapter saves whole (modules_to_save): "
                "it is incomplete. Save the adapter again."
            )

    adopted: list[tuple[_ExpectedChildTensor, torch.Tensor, str]] = []
    emptied: list[_ExpectedChildTensor] = []
    carries_child_network = False
    for entry in {id(entry): entry for entry in expected.values()}.values():
        tensor_key = entry.layer.tensor_key(entry.tensor_name)
        values = given.get(entry.values_key)
        encoded = given.get(entry.positions_key) if entry.positions_key else None
        if adopt and values is None and encoded is None:  # the checkpoint's child network leaves it empty
            emptied.append(entry)
            continue
        for key, tensor in ((entry.values_key, values), (entry.positions_key, encoded)):
            if key is not None and tensor is None:
                raise AdapterFormatError(
                    f"the file has no tensor {PEFT_PREFIX}{key} (for {tensor_key}): it is incomplete, or it does not "
                    "match its adapter_config.json. Save the adapter again."
                )
        carries_child_network = carries_child_network or values.numel() > 0
        base_tensor = getattr(entry.layer.get_base_layer(), entry.tensor_name)
        _check_values(tensor_key, values, entry, adapter_name, base_tensor, adopt)
        if encoded is None:
            continue
        if adopt:
            if values.numel():
                encoding = encoding_of(encoded, values.numel())
                positions = decode_positions(
                    encoded, base_tensor.numel(), values.numel(), encoding, tensor_key, encoded.numel()
                )
                adopted.append((entry, positions, encoding))
            else:
                emptied.append(entry)
        else:
            spec = entry.layer.childtuning_spec[adapter_name]
            positions = decode_positions(
                encoded,
                base_tensor.numel(),
                values.numel(),
                spec.encodings[entry.tensor_name],
                tensor_key,
                spec.encoded_lengths.get(entry.tensor_name),
            )
            entry.layer._validated_positions[(adapter_name, entry.tensor_name)] = (encoded, positions)

    if carries_child_network and not config.ignore_base_mismatch:
        check_base(model, config, adapter_name)
    for entry, positions, encoding in adopted:
        entry.layer.set_child_network(adapter_name, entry.tensor_name, positions, encoding)
    if adopted:  # a checkpoint saved before its Fisher pass (every child empty) adopts nothing: still waiting
        for entry in emptied:
            entry.layer.untune(adapter_name, entry.tensor_name)
        from .model import record_child_network

        record_child_network(model, config, adapter_name)


def _check_values(
    tensor_key: str,
    values: torch.Tensor,
    entry: _ExpectedChildTensor,
    adapter_name: str,
    base_tensor: torch.Tensor,
    adopt: bool,
) -> None:
    if not values.is_floating_point():
        raise AdapterFormatError(
            f"{tensor_key}: child values of dtype {values.dtype}; they must be floating point. Save the adapter again."
        )
    expected_shape = tuple(entry.layer.child_values(adapter_name, entry.tensor_name).shape)
    if adopt:
        expected_shape = (values.numel(),) if values.dim() == 1 else expected_shape
    if tuple(values.shape) != expected_shape:
        raise AdapterFormatError(
            f"{tensor_key}: the file has {tuple(values.shape)} child values, the config and model expect "
            f"{expected_shape}; the adapter does not match this model or its adapter_config.json."
        )
    if not all_finite(values.to(base_tensor.dtype)):
        dtype = str(base_tensor.dtype).removeprefix("torch.")
        raise AdapterFormatError(
            f"{tensor_key}: the child values contain NaN or inf once cast to {dtype}, the dtype of the base weight "
            "they are merged into; the adapter file is corrupted, or load the base in a dtype that holds them "
            "(e.g. float32)."
        )


def _check_saved_whole(key: str, tensor: torch.Tensor, model_tensor: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(model_tensor.shape):
        raise AdapterFormatError(
            f"{PEFT_PREFIX}{key}: the file has shape {tuple(tensor.shape)}, the model {tuple(model_tensor.shape)}; "
            "the adapter was saved from another model (e.g. another num_labels)."
        )
    if tensor.is_floating_point() != model_tensor.is_floating_point() or tensor.dtype == torch.bool != (
        model_tensor.dtype == torch.bool
    ):
        raise AdapterFormatError(
            f"{PEFT_PREFIX}{key}: the file holds {tensor.dtype}, the model {model_tensor.dtype}; the file is corrupted."
        )
    if tensor.is_floating_point() and not all_finite(tensor.to(model_tensor.dtype)):
        raise AdapterFormatError(
            f"{PEFT_PREFIX}{key}: NaN or inf (once cast to {model_tensor.dtype}); the adapter file is corrupted."
        )


def check_base(model: nn.Module, config: ChildTuningConfig, adapter_name: str) -> None:
    """Raise `AdapterFormatError` unless the model's base is the one the adapter was tuned from.

    An adapter never saved has no fingerprint yet (it is recorded at the first save): its tensors come from memory,
    not from a file. A file without one is refused before this (`_check_against_saved_config`).
    """
    if config.base_fingerprint is None:
        return
    reason = fingerprint_mismatch(config.base_fingerprint, model, adapter_name)
    if reason is not None:
        raise AdapterFormatError(
            f"Adapter '{adapter_name}' was tuned from other base weights than this model's "
            f"(base_model_name_or_path={config.base_model_name_or_path!r}): its base fingerprint does not match: "
            f"{reason}. Load it onto the base it was trained from, or pass ignore_base_mismatch=True to load it "
            "anyway, at your own risk."
        )


# ------------------------------------------------------------------------------------------------ merged while loaded
def attach_load_hooks(layer: ChildTuningLayer) -> None:
    """Keep a layer's merged weights true to its adapters across any ``load_state_dict``.

    Before: merged adapters are unmerged (the state dict reports the unmerged base tensors, and the values may
    change). After: they are merged again, and so are active adapters loaded for inference (peft has no
    merge-on-load), so forwards cost the base's.
    """
    layer._register_load_state_dict_pre_hook(_unmerge_before_load, with_module=True)
    layer.register_load_state_dict_post_hook(_merge_after_load)
    layer.register_state_dict_post_hook(_report_unmerged_base_tensors)


def _unmerge_before_load(layer: ChildTuningLayer, *args: Any) -> None:
    if layer.merged:
        layer._merged_before_load = list(layer.merged_adapters)
        layer.unmerge()


def _merge_after_load(layer: ChildTuningLayer, incompatible_keys: Any) -> None:
    merge_for_inference(layer, layer.__dict__.pop("_merged_before_load", []))


def merge_for_inference(layer: ChildTuningLayer, also: list[str] = ()) -> None:
    """Merge `also` and every active adapter loaded for inference that is not merged yet."""
    to_merge = [name for name in also if name in layer.childtuning_spec]
    to_merge += [
        name
        for name in layer.active_adapters
        if name in layer.childtuning_spec
        and layer.childtuning_spec[name].inference_mode
        and name not in layer.merged_adapters
        and name not in to_merge
        and not layer.disable_adapters
    ]
    if to_merge and not any(tensor.is_meta for name in to_merge for tensor in layer._adapter_parameters(name)):
        layer.merge(adapter_names=to_merge)


def _report_unmerged_base_tensors(
    layer: ChildTuningLayer, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """Put the original base tensors in the state dict while adapters are merged into them."""
    for tensor_name in {name for (_, name) in layer._merge_originals}:
        key = f"{prefix}base_layer.{tensor_name}"
        if key in state_dict:
            state_dict[key] = layer.unmerged_base_tensor(tensor_name)


# ------------------------------------------------------------------------------------------------ the transaction
_READER: Optional[concurrent.futures.ThreadPoolExecutor] = None


def _read_in_background(path: str) -> concurrent.futures.Future:
    """Start reading and checksumming the adapter file: it overlaps peft building the layers, which needs it not."""
    global _READER
    if _READER is None:
        _READER = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="childtuning-read")
    return _READER.submit(read_adapter_weights, path)


@dataclass
class PendingCheckpoint:
    """The adapter being loaded: its file (read on a thread), handed checked to peft's or transformers' loader."""

    weights_path: str
    adapter_name: str
    reading: concurrent.futures.Future
    saved_config: Optional[dict[str, Any]]  # None: tensors given in memory (no file, no saved config)
    ignore_base_mismatch: bool
    check_when_injected: bool  # transformers' loader: checked when its layers are built, as it loads no other way
    _tensors: Optional[dict[str, torch.Tensor]] = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file's tensors, once read, checksummed and checked against the saved config."""
        if self._tensors is None:
            tensors, has_checksums = self.reading.result()
            if self.saved_config is not None:
                _check_against_saved_config(
                    self.weights_path, self.saved_config, tensors, has_checksums, self.ignore_base_mismatch
                )
            self._tensors = tensors
        return self._tensors


_PENDING: ContextVar[Optional[PendingCheckpoint]] = ContextVar("childtuning_pending_checkpoint", default=None)


def pending_checkpoint() -> Optional[PendingCheckpoint]:
    return _PENDING.get()


@contextmanager
def load_transaction(model: nn.Module, pending: PendingCheckpoint) -> Iterator[None]:
    """Load the pending checkpoint into `model` as its adapter, or leave the model as it was."""
    state = ModelState(model, pending.adapter_name)
    token = _PENDING.set(pending)
    try:
        yield
    except BaseException as error:
        state.restore()
        if not isinstance(error, Exception):
            raise
        message = str(error) if isinstance(error, AdapterFormatError) else f"{type(error).__name__}: {error}"
        if isinstance(error, KeyError):
            message = f"the file has no tensor {error}: it is incomplete. Save the adapter again"
        raise AdapterFormatError(
            f"Could not load the Child-Tuning adapter {pending.weights_path} as '{pending.adapter_name}': {message} "
            "(the model was left unchanged)"
        ) from error
    finally:
        _PENDING.reset(token)


@contextmanager
def restoring(model: nn.Module) -> Iterator[None]:
    """Another peft method's load: the model as it was if the load fails (peft itself leaves the layers it injected
    on the user's model), the exception as it was."""
    state = ModelState(model, adapter_name=None)  # no Child-Tuning adapter's values to keep
    try:
        yield
    except BaseException:
        state.restore()
        raise


def _saved_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise AdapterFormatError(f"{path}: cannot be read as JSON ({error}); save the adapter again.") from error
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: not a JSON object; save the adapter again.")
    return config


def weights_path(folder: str) -> str:
    """The adapter file in `folder`: safetensors only, never a pickle."""
    path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
            raise AdapterFormatError(
                f"{os.path.join(folder, WEIGHTS_NAME)}: Child-Tuning loads adapters from safetensors only, never "
                "from a pickle (which can run code). Convert it where you trust the file: `import torch; from "
                "safetensors.torch import save_file; save_file(torch.load('adapter_model.bin', weights_only=True), "
                "'adapter_model.safetensors')`."
            )
        raise AdapterFormatError(f"{folder}: has no {SAFETENSORS_WEIGHTS_NAME}; save the adapter again.")
    return path


def _check_against_saved_config(
    path: str, saved: dict[str, Any], tensors: dict[str, torch.Tensor], has_checksums: bool, ignore_base_mismatch: bool
) -> None:
    """Refuse a saved config that could hide a problem the tensors reveal."""
    config_path = os.path.join(os.path.dirname(path), CONFIG_NAME)
    fingerprint = saved.get("base_fingerprint")
    if isinstance(fingerprint, dict) and "version" in fingerprint and not has_checksums:
        raise AdapterFormatError(
            f"{path}: saved by a version of peft_childtuning that stores a checksum of every tensor, but the file "
            "has none: it was altered after it was saved. Save it again."
        )
    carries_child_network = any(
        key.rpartition(".")[2] in _CONTAINER_NAMES and tensor.numel() for key, tensor in tensors.items()
    )
    if saved.get("peft_type") != PEFT_TYPE_NAME:
        raise AdapterFormatError(
            f"{config_path}: peft_type {saved.get('peft_type')!r}, but the weights are a Child-Tuning adapter's; the "
            "config does not belong to these weights. Save the adapter again."
        )
    if carries_child_network and fingerprint is None and not ignore_base_mismatch:
        raise AdapterFormatError(
            f"{config_path}: the adapter carries a child network but its config records no base_fingerprint, so "
            "nothing shows it matches this base (the check cannot be switched off by editing the config). Save it "
            "again from the model it was trained on, or pass ignore_base_mismatch=True to load it anyway, at your "
            "own risk."
        )
    _check_recorded_lengths(config_path, saved, tensors)


def _check_recorded_lengths(config_path: str, saved: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a config whose recorded length of a variable-length positions tensor (gap16x) is not the file's: its
    layers would be built for another stream (even an adapter that adopts the file's child network checks it)."""
    encodings, lengths = saved.get("child_encodings") or {}, saved.get("child_encoded_lengths") or {}
    if not isinstance(encodings, dict) or not isinstance(lengths, dict):
        raise AdapterFormatError(
            f"{config_path}: child_encodings and child_encoded_lengths must be JSON objects; the config is "
            "corrupted. Save the adapter again."
        )
    for key, encoding in encodings.items():
        module, _, tensor_name = str(key).rpartition(".")
        if encoding not in VARIABLE_LENGTH_ENCODINGS or tensor_name not in TUNED_TENSOR_CONTAINERS:
            continue
        name = f"{module}.{TUNED_TENSOR_CONTAINERS[tensor_name][1]}"
        encoded = tensors.get(f"{PEFT_PREFIX}{name}", tensors.get(name))
        if encoded is not None and lengths.get(key) != encoded.numel():
            raise AdapterFormatError(
                f"{config_path}: child_encoded_lengths records {lengths.get(key)!r} words for the {encoding} "
                f"positions of {key}, the file holds {encoded.numel()}; the config does not belong to these weights. "
                "Save the adapter again."
            )


def _is_childtuning_folder(folder: str) -> bool:
    try:
        return _saved_config(folder).get("peft_type") == PEFT_TYPE_NAME
    except AdapterFormatError:
        return False


def _is_other_method(folder: str) -> bool:
    """Whether the folder holds another peft method's adapter: a readable config of another known type, and no
    Child-Tuning tensors. Anything else in a folder (ours, or a config missing, unreadable or of no known type) is
    loaded, or refused with an `AdapterFormatError`, here."""
    from peft.utils import PeftType

    try:
        peft_type = _saved_config(folder).get("peft_type")
    except AdapterFormatError:
        return False
    known = isinstance(peft_type, str) and peft_type in PeftType.__members__
    return known and peft_type != PEFT_TYPE_NAME and not _holds_childtuning_weights(folder)


def _holds_childtuning_weights(folder: str) -> bool:
    """Whether the folder's safetensors header names Child-Tuning tensors (read as bytes: even a corrupted header
    that names them makes the folder ours to refuse)."""
    path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            header = handle.read(min(length, 100 * 1024 * 1024))
    except OSError:
        return False
    return any(name.encode() in header for name in _CONTAINER_NAMES)


def adapter_folder(model_id: str | os.PathLike, config: Any, hub_kwargs: dict[str, Any]) -> Optional[str]:
    """The local folder of a Child-Tuning adapter at `model_id` (a Hub repo is downloaded first), or None if it is
    not a Child-Tuning adapter (then peft's own loader handles it)."""
    model_id = os.fspath(model_id)
    local = os.path.join(model_id, hub_kwargs.get("subfolder") or "")
    if os.path.isdir(local):
        if isinstance(config, ChildTuningConfig) or not _is_other_method(local):
            return local
        return None
    if os.path.isdir(model_id) or (config is not None and not isinstance(config, ChildTuningConfig)):
        return None
    from huggingface_hub import hf_hub_download

    from .hub import download_adapter

    download_kwargs = {key: hub_kwargs[key] for key in _HUB_ARGUMENTS if hub_kwargs.get(key) is not None}
    if not isinstance(config, ChildTuningConfig):
        try:
            config_path = hf_hub_download(model_id, CONFIG_NAME, **download_kwargs)
        except Exception:  # peft's own loader reports a missing or unreachable repo
            return None
        if not _is_childtuning_folder(os.path.dirname(config_path)):
            return None
    return download_adapter(model_id, **download_kwargs)


# ------------------------------------------------------------------------------------------------ the loaders
_ORIGINALS: dict[str, Any] = {}


def _runtime_ignore(config: Any, kwargs: dict[str, Any]) -> bool:
    return bool(kwargs.get("ignore_base_mismatch")) or bool(getattr(config, "ignore_base_mismatch", False))


def _open_checkpoint(folder: str, adapter_name: str, config: Any, hub_kwargs: dict[str, Any], **flags: bool) -> tuple[
    PendingCheckpoint, dict[str, Any]
]:
    """(the pending checkpoint, its saved config) of the Child-Tuning adapter in `folder`; the file is read and
    checked on a thread meanwhile."""
    path = weights_path(folder)
    saved = _saved_config(folder)
    pending = PendingCheckpoint(
        path, adapter_name, _read_in_background(path), saved, _runtime_ignore(config, hub_kwargs), **flags
    )
    return pending, saved


def _call_arguments(bound: dict[str, Any], bound_apart: tuple[str, ...]) -> dict[str, Any]:
    """The keyword arguments to call the original loader with, on a local folder: the Hub's are spent."""
    call = {key: value for key, value in bound.items() if key not in (*bound_apart, "kwargs")}
    call.update({key: value for key, value in bound.get("kwargs", {}).items() if key not in _HUB_ARGUMENTS})
    return call


def _assigning(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], call: dict[str, Any], saved: dict[str, Any]
) -> dict[str, Any]:
    """`call` loading with low_cpu_mem_usage unless the caller chose: a fresh adapter's Parameters then take the
    checked tensors read from the file as they are, with no placeholders allocated, filled and copied over. Not for
    a config without its child network (it adopts the file's, resizing real placeholders)."""
    passed = inspect.signature(_ORIGINALS[name]).bind_partial(*args, **kwargs).arguments
    if "low_cpu_mem_usage" in passed or (saved.get("mode") == "d" and saved.get("child_sizes") is None):
        return call
    return {**call, "low_cpu_mem_usage": True}


def _peft_from_pretrained(cls: type, model: nn.Module, model_id: Any, *args: Any, **kwargs: Any) -> Any:
    bound = _bind("from_pretrained", (cls, model, model_id, *args), kwargs)
    config, adapter_name = bound.get("config"), bound.get("adapter_name", "default")
    folder = adapter_folder(model_id, config, bound.get("kwargs", {}))
    if folder is None:
        with restoring(model):
            return _ORIGINALS["from_pretrained"](cls, model, model_id, *args, **kwargs)
    pending, saved = _open_checkpoint(folder, adapter_name, config, bound.get("kwargs", {}), check_when_injected=False)
    call = _call_arguments(bound, ("cls", "model", "model_id"))
    call = _assigning("from_pretrained", (cls, model, model_id, *args), kwargs, call, saved)
    with load_transaction(model, pending):
        return _ORIGINALS["from_pretrained"](cls, model, folder, **call)


def _peft_load_adapter(self: Any, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
    bound = _bind("load_adapter", (self, model_id, adapter_name, *args), kwargs)
    existing = self.peft_config.get(adapter_name)
    pending = _PENDING.get()
    if (existing is not None and not isinstance(existing, ChildTuningConfig)) or (
        pending is not None and pending.adapter_name == adapter_name  # from_pretrained's own call: in its transaction
    ):
        return _ORIGINALS["load_adapter"](self, model_id, adapter_name, *args, **kwargs)
    folder = adapter_folder(model_id, existing, bound.get("kwargs", {}))
    if folder is None:
        with restoring(self):
            return _ORIGINALS["load_adapter"](self, model_id, adapter_name, *args, **kwargs)
    pending, saved = _open_checkpoint(folder, adapter_name, existing, bound.get("kwargs", {}), check_when_injected=False)
    call = _call_arguments(bound, ("self", "model_id", "adapter_name"))
    if existing is None:
        call = _assigning("load_adapter", (self, model_id, adapter_name, *args), kwargs, call, saved)
    with load_transaction(self, pending):
        if existing is not None:
            _check_same_adapter(self, existing, saved, adapter_name, folder)
            if existing.base_fingerprint is None:  # never saved: it takes the checked one of its checkpoint
                existing.base_fingerprint = saved.get("base_fingerprint")
        return _ORIGINALS["load_adapter"](self, folder, adapter_name, **call)


def _auto_from_pretrained(cls: type, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
    """AutoPeftModelFor*.from_pretrained: it reads the adapter's config before any loader of ours runs; for a local
    Child-Tuning adapter, whatever goes wrong there is an `AdapterFormatError` too (the base it builds is its own,
    so there is nothing of the caller's to restore)."""
    original = _ORIGINALS["auto_from_pretrained"]
    folder = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
    if not os.path.isdir(folder) or _is_other_method(folder):
        return original(cls, pretrained_model_name_or_path, *args, **kwargs)
    try:
        return original(cls, pretrained_model_name_or_path, *args, **kwargs)
    except AdapterFormatError:
        raise
    except Exception as error:
        raise AdapterFormatError(
            f"Could not load the Child-Tuning adapter in {folder}: {type(error).__name__}: {error}"
        ) from error


def _check_same_adapter(
    model: nn.Module, existing: ChildTuningConfig, saved: dict[str, Any], name: str, folder: str
) -> None:
    """Loading into an existing adapter (an eval loop over checkpoints): the file must be a checkpoint of it."""
    for field in ("mode", "tune_bias", "child_sizes", "child_encodings", "child_encoded_lengths"):
        mine = getattr(existing, field)
        if field.startswith("child_") and existing.child_sizes is None:
            continue  # waiting for its Fisher pass: it adopts the checkpoint's child network
        if saved.get(field, mine) != mine:
            raise AdapterFormatError(
                f"{folder}: its {field} differs from adapter '{name}''s, so it is not a checkpoint of that adapter; "
                "load it under a new adapter_name."
            )
    # the same fingerprint as the adapter's own is checked with the checkpoint's tensors (`check_checkpoint`)
    fingerprint = saved.get("base_fingerprint")
    if fingerprint is not None and fingerprint != existing.base_fingerprint and not existing.ignore_base_mismatch:
        reason = fingerprint_mismatch(fingerprint, model, name)
        if reason is not None:
            raise AdapterFormatError(
                f"{folder}: its base fingerprint does not match this model's base (tuned from other base weights): "
                f"{reason}. Load it onto the base it was trained from."
            )


def _transformers_load_adapter(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    bound = _bind("transformers_load_adapter", (self, *args), kwargs)
    original = _ORIGINALS["transformers_load_adapter"]
    peft_config, state_dict = bound.get("peft_config"), bound.get("adapter_state_dict")
    model_id, adapter_name = bound.get("peft_model_id"), bound.get("adapter_name") or "default"
    if isinstance(peft_config, dict):
        if peft_config.get("peft_type") != PEFT_TYPE_NAME:
            return original(self, *args, **kwargs)
        peft_config = ChildTuningConfig(**{k: v for k, v in peft_config.items() if k != "peft_type"})
    hub_kwargs = {**(bound.get("adapter_kwargs") or {}), **bound.get("kwargs", {})}
    if state_dict is None:
        folder = None if model_id is None else adapter_folder(model_id, peft_config, hub_kwargs)
        if folder is None:
            with restoring(self):
                return original(self, *args, **kwargs)
        pending, _ = _open_checkpoint(folder, adapter_name, peft_config, hub_kwargs, check_when_injected=True)
        if peft_config is None:
            try:
                peft_config = ChildTuningConfig.from_pretrained(folder)
            except Exception as error:
                raise AdapterFormatError(
                    f"{os.path.join(folder, CONFIG_NAME)}: not a valid Child-Tuning config ({type(error).__name__}: "
                    f"{error}); save the adapter again."
                ) from error
    elif not isinstance(peft_config, ChildTuningConfig):
        return original(self, *args, **kwargs)
    else:  # tensors given in memory
        given: concurrent.futures.Future = concurrent.futures.Future()
        given.set_result((state_dict, False))
        pending = PendingCheckpoint("adapter_state_dict", adapter_name, given, None, False, True)
    call = _call_arguments(bound, ("self", "adapter_kwargs"))
    call.update(peft_model_id=None, adapter_name=adapter_name, peft_config=peft_config)
    with load_transaction(self, pending):
        call["adapter_state_dict"] = pending.tensors()  # transformers loads these, and reads nothing itself
        result = original(self, **call)
        for module in self.modules():
            if isinstance(module, ChildTuningLayer) and adapter_name in module.childtuning_spec:
                for tensor_name in module.tuned_tensor_names(adapter_name):
                    _check_loaded(module, adapter_name, tensor_name)
                merge_for_inference(module)
        return result


def _check_loaded(layer: ChildTuningLayer, adapter_name: str, tensor_name: str) -> None:
    """After a loader that is not peft's: the layer holds finite values and positions that decode."""
    values = layer.child_values(adapter_name, tensor_name)
    if not all_finite(values):
        raise AdapterFormatError(f"{layer.tensor_key(tensor_name)}: the loaded child values are NaN or inf.")
    layer._positions(adapter_name, tensor_name)


def _bind(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a call to the original function `name`, by parameter name (extra keywords under 'kwargs')."""
    signature = inspect.signature(_ORIGINALS[name])
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


# ------------------------------------------------------------------------------------------------ saving
def _save_with_checksums(tensors: dict[str, torch.Tensor], filename: str, metadata: Optional[dict] = None) -> None:
    """safetensors' save_file for peft; a Child-Tuning adapter's file gets a checksum of every tensor."""
    if any(key.rpartition(".")[2] in _CONTAINER_NAMES for key in tensors):
        return save_with_checksums(tensors, filename, metadata)
    return _ORIGINALS["safe_save_file"](tensors, filename, metadata=metadata)


def _load_checked(filename: str, device: Any = "cpu") -> dict[str, torch.Tensor]:
    """safetensors' load_file for peft: the tensors the transaction already read and checked, when it is that file."""
    pending = _PENDING.get()
    if pending is not None and os.path.realpath(filename) == os.path.realpath(pending.weights_path):
        return {key: tensor.to(device) for key, tensor in pending.tensors().items()}
    return _ORIGINALS["safe_load_file"](filename, device=device)


def _save_pretrained(self: Any, save_directory: str, *args: Any, **kwargs: Any) -> Any:
    bound = _bind("save_pretrained", (self, save_directory, *args), kwargs)
    selected = bound.get("selected_adapters") or list(self.peft_config)
    if not bound.get("safe_serialization", True) and any(
        isinstance(self.peft_config.get(name), ChildTuningConfig) for name in selected
    ):
        raise ValueError(
            "Child-Tuning adapters are saved as safetensors only (a pickle can run code when it is loaded): call "
            "save_pretrained without safe_serialization=False."
        )
    return _ORIGINALS["save_pretrained"](self, save_directory, *args, **kwargs)


def install() -> None:
    """Route peft's and transformers' adapter loaders (and peft's saving) through this module. Idempotent."""
    if _ORIGINALS:
        return
    import peft.peft_model as peft_model_module
    import peft.utils.save_and_load as save_and_load
    import transformers.modeling_utils as transformers_modeling
    from peft import PeftModel
    from peft.auto import _BaseAutoPeftModel
    from transformers.integrations.peft import PeftAdapterMixin

    _ORIGINALS.update(
        from_pretrained=PeftModel.from_pretrained.__func__,
        auto_from_pretrained=_BaseAutoPeftModel.from_pretrained.__func__,
        load_adapter=PeftModel.load_adapter,
        save_pretrained=PeftModel.save_pretrained,
        transformers_load_adapter=PeftAdapterMixin.load_adapter,
        safe_save_file=peft_model_module.safe_save_file,
        transformers_safe_save_file=transformers_modeling.safe_save_file,
        safe_load_file=save_and_load.safe_load_file,
    )
    PeftModel.from_pretrained = classmethod(_peft_from_pretrained)
    _BaseAutoPeftModel.from_pretrained = classmethod(_auto_from_pretrained)
    PeftModel.load_adapter = _peft_load_adapter
    PeftModel.save_pretrained = _save_pretrained
    PeftAdapterMixin.load_adapter = _transformers_load_adapter
    peft_model_module.safe_save_file = _save_with_checksums
    transformers_modeling.safe_save_file = _save_with_checksums  # PreTrainedModel.save_pretrained of an adapter
    save_and_load.safe_load_file = _load_checked
