"""The base fingerprint: which base model an adapter was tuned from, checked whenever a child network is loaded.

A sparse diff is only the trained model on the base it was taken against, and everything the outputs depend on counts:
the tuned tensors, the untuned ones (embeddings, norms, biases...) and the architecture fields that change the
computation (model class and head, activation, norm epsilons, attention heads). The fingerprint records

- ``architecture``: the model class and those config fields, compared exactly;
- ``tensors``: a digest of every base tensor's name and shape (modules saved whole with the adapter, such as a
  freshly initialised classifier head, are left out), compared exactly;
- ``signatures``: six statistics per tensor of a fixed sample of its entries (eight runs of 128 contiguous entries
  spread over it: mean, mean |x|, root mean square and three fixed random-sign projections), compared with a
  tolerance of 2**-7 of the sample's mean |x|.

The tolerance makes one checkpoint match itself loaded in fp32, bf16 or fp16 (rounding moves each statistic by at
most 2**-8 of mean |x|), while a different checkpoint misses it on almost every tensor (its projections differ by
about 4% of the root mean square). Adapters saved before the fingerprint had a ``version`` carry hashes of the tuned
tensors only; they are still checked that way.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

FINGERPRINT_VERSION = 2
# entries of each tensor sampled into the fingerprint (evenly spaced): cheap for any model size
SAMPLES = 1024
# |recorded - loaded| allowed per statistic, relative to the sample's mean |x|, and an absolute floor (fp16 subnormals)
RELATIVE_TOLERANCE = 2.0**-7
ABSOLUTE_TOLERANCE = 1e-7
_PROJECTIONS = 3
_CHUNKS = 8  # runs of contiguous entries a large tensor's sample is made of
# config fields that change what a model computes, beyond the tensors' names and shapes
ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_act",
    "hidden_activation",
    "activation_function",
    "feed_forward_proj",
    "dense_act_fn",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "rms_norm_eps",
    "norm_eps",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "position_embedding_type",
    "rope_theta",
    "tie_word_embeddings",
)


def _signs() -> np.ndarray:
    """Fixed random signs of the projections (the same for every tensor and every process)."""
    return np.random.default_rng(20211107).choice([-1.0, 1.0], size=(_PROJECTIONS, SAMPLES))


_SIGNS = _signs()


@functools.lru_cache(maxsize=1024)
def _sample_positions(numel: int) -> Optional[torch.Tensor]:
    """The flat positions of a tensor's sample: None for all of a small one, else `_CHUNKS` runs of contiguous
    entries spread evenly over it. Runs, not a stride: a stride over a freshly loaded (memory-mapped) embedding
    matrix would read in most of its pages, which a forward over a few tokens never touches."""
    if numel <= SAMPLES:
        return None
    run = SAMPLES // _CHUNKS
    starts = np.linspace(0, numel - run, _CHUNKS).astype(np.int64)
    return torch.from_numpy((starts[:, None] + np.arange(run)).reshape(-1))


def _signatures(tensors: list[torch.Tensor]) -> np.ndarray:
    """Six statistics per tensor (mean, mean |x|, root mean square, three random-sign projections) of its sample.

    The samples are gathered into one zero-padded float64 matrix and reduced together: one pass for every tensor,
    rather than a dozen small operations per tensor (what made the fingerprint a tenth of loading a small model).
    """
    samples = np.zeros((len(tensors), SAMPLES))
    sizes = np.ones(len(tensors))
    for row, tensor in enumerate(tensors):
        flat = tensor.detach().reshape(-1)
        positions = _sample_positions(flat.numel())
        sample = flat if positions is None else flat.index_select(0, positions.to(flat.device))
        samples[row, : sample.numel()] = sample.to("cpu", torch.float64).numpy()
        sizes[row] = max(sample.numel(), 1)  # an empty tensor: all six statistics 0
    means = np.stack([samples.sum(1), np.abs(samples).sum(1), (samples**2).sum(1)], axis=1) / sizes[:, None]
    means[:, 2] = np.sqrt(means[:, 2])
    projections = samples @ _SIGNS.T / sizes[:, None]  # zero padding adds nothing to a projection
    return np.concatenate([means, projections], axis=1)


def fingerprinted_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name in the base model, tensor) of every floating-point base tensor the outputs depend on.

    Works on a plain model and on one with peft's layers in it: peft's ``base_model.model.`` prefix and
    ``base_layer.`` are removed from the names, adapter tensors are skipped, and so are the modules saved whole with
    an adapter (peft's ``ModulesToSaveWrapper``), whose trained copies come with it. Tied tensors are counted once.
    """
    from peft.utils.other import AuxiliaryTrainingWrapper

    from .layer import ChildTuningLayer

    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    skipped, unmerged = [], {}
    for name, module in root.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            skipped.append(name)
        elif isinstance(module, ChildTuningLayer):
            # merged adapters have written into their base tensors: those are read as they are unmerged
            for _, tensor_name in module._merge_originals:
                unmerged[id(getattr(module.get_base_layer(), tensor_name))] = (module, tensor_name)
    seen: set[int] = set()
    for name, tensor in [*root.named_parameters(), *root.named_buffers()]:
        if not tensor.is_floating_point() or tensor.is_meta or id(tensor) in seen:
            continue
        # adapter tensors: every container of a tuner layer carries the tuner's prefix (peft requires it)
        if ".childtuning_" in f".{name}" or any(name.startswith(f"{prefix}.") for prefix in skipped):
            continue
        seen.add(id(tensor))
        if id(tensor) in unmerged:
            layer, tensor_name = unmerged[id(tensor)]
            tensor = layer.unmerged_base_tensor(tensor_name)
        yield name.replace(".base_layer.", "."), tensor


def _architecture(model: nn.Module) -> dict[str, Any]:
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(root, "config", None)
    fields = {"model_class": type(root).__name__}
    if config is not None:
        for field in ARCHITECTURE_FIELDS:
            value = getattr(config, field, None)
            if isinstance(value, (str, int, float, bool)):
                fields[field] = value
    return fields


def _names_digest(tensors: list[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
    return digest.hexdigest()


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The fingerprint of the model's base (see the module docstring), JSON-serialisable."""
    tensors = sorted(fingerprinted_tensors(model), key=lambda item: item[0])
    signatures = _signatures([tensor for _, tensor in tensors])
    return {
        "version": FINGERPRINT_VERSION,
        "architecture": _architecture(model),
        "tensors": _names_digest(tensors),
        "count": len(tensors),
        "signatures": base64.b64encode(signatures.astype("<f8").tobytes()).decode("ascii"),
    }


def fingerprint_mismatch(recorded: Any, model: nn.Module, adapter_name: str) -> Optional[str]:
    """Why the model's base is not the one `recorded` (adapter `adapter_name`'s) describes, or None when it is."""
    if not isinstance(recorded, dict):
        return f"the recorded base fingerprint is not a JSON object ({type(recorded).__name__})"
    if "version" not in recorded:
        return _legacy_mismatch(recorded, model, adapter_name)
    if recorded.get("version") != FINGERPRINT_VERSION:
        return f"unknown base fingerprint version {recorded.get('version')!r}"
    current = base_fingerprint(model)
    if recorded.get("architecture") != current["architecture"]:
        changed = sorted(
            key
            for key in set(recorded.get("architecture") or {}) | set(current["architecture"])
            if (recorded.get("architecture") or {}).get(key) != current["architecture"].get(key)
        )
        return f"the architecture differs ({', '.join(changed)})"
    if recorded.get("tensors") != current["tensors"] or recorded.get("count") != current["count"]:
        return "the base tensors' names or shapes differ"
    try:
        expected = np.frombuffer(base64.b64decode(recorded["signatures"], validate=True), dtype="<f8")
        expected = expected.reshape(current["count"], 3 + _PROJECTIONS)
    except (KeyError, TypeError, ValueError) as error:
        return f"the recorded tensor signatures cannot be read ({error})"
    actual = np.frombuffer(base64.b64decode(current["signatures"]), dtype="<f8").reshape(expected.shape)
    tolerance = RELATIVE_TOLERANCE * np.abs(expected[:, 1:2]) + ABSOLUTE_TOLERANCE
    differs = ~(np.abs(actual - expected) <= tolerance).all(axis=1)  # NaN in either differs
    if differs.any():
        names = [name for name, _ in sorted(fingerprinted_tensors(model), key=lambda item: item[0])]
        first = [names[index] for index in np.flatnonzero(differs)[:3]]
        return f"{int(differs.sum())} of {len(names)} base tensors hold other values (e.g. {', '.join(first)})"
    return None


# ------------------------------------------------------------------------------------------------ before version 2
_LEGACY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _legacy_hash(tensors: list[tuple[str, torch.Tensor]], dtype: torch.dtype) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in tensors:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLES)
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(flat[::step][:SAMPLES].cpu().to(dtype).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _legacy_mismatch(recorded: dict[str, Any], model: nn.Module, adapter_name: str) -> Optional[str]:
    """Fingerprints written before version 2: hashes of the adapter's tuned tensors' samples, one per dtype."""
    from .layer import ChildTuningLayer

    tensors = [
        (module.tensor_key(name), module.unmerged_base_tensor(name))
        for module in model.modules()
        if isinstance(module, ChildTuningLayer) and adapter_name in module.childtuning_spec
        for name in module.targeted_tensor_names(adapter_name)  # empty children too, as they were hashed
    ]
    if not tensors:
        return None
    loaded_dtype = str(tensors[0][1].dtype).removeprefix("torch.")
    for dtype_name in (recorded.get("tuned_dtype", "float32"), loaded_dtype):
        if dtype_name in _LEGACY_DTYPES and recorded.get(dtype_name) == _legacy_hash(tensors, _LEGACY_DTYPES[dtype_name]):
            return None
    return "the tuned base tensors hold other values"
