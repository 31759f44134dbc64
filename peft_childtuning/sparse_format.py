"""The sparse adapter format: how a child network's positions are encoded, checked, and fingerprinted.

A mode-"d" adapter stores, per tuned tensor, the child values in the weight's own dtype and the child positions in
whichever encoding is smallest for that tensor:

- ``"bitmap"``: a packed bitmap of the tensor's n entries, uint8[ceil(n / 8)] (little-endian bit order);
- ``"int32"``: the sorted flat positions, int32[k];
- ``"gap16"``: the gaps between successive sorted positions (the first one counted from -1), uint16[k], when every
  gap fits in 16 bits.

The layers hold positions in this encoded form too, so a checkpoint's tensors have the shapes the layers already
have (from the config's ``child_sizes`` and ``child_encodings``) and every loader, transformers' included, can load
them as they are. Decoding validates: a corrupted file gives an `AdapterFormatError`, never a wrong model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

import torch

ENCODINGS = ("bitmap", "int32", "gap16")
_ENCODING_DTYPES = {"bitmap": torch.uint8, "int32": torch.int32, "gap16": torch.uint16}
_GAP16_MAX = (1 << 16) - 1
# entries of each tuned tensor hashed into the base fingerprint
_FINGERPRINT_SAMPLES = 1024


class AdapterFormatError(ValueError):
    """A Child-Tuning adapter file whose tensors or config are inconsistent."""


def encoded_bytes(numel: int, size: int, encoding: str) -> int:
    return {"bitmap": (numel + 7) // 8, "int32": 4 * size, "gap16": 2 * size}[encoding]


def placeholder(numel: int, size: int, encoding: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """An encoded-positions tensor of the right shape and dtype, to be filled by a loader.

    Unless the child is empty it does not decode (no bit set, position -1, zero gaps), so a loader that skips it
    is caught at first use.
    """
    if encoding == "bitmap":
        return torch.zeros((numel + 7) // 8, dtype=torch.uint8, device=device)
    if encoding == "int32":
        return torch.full((size,), -1, dtype=torch.int32, device=device)
    if encoding == "gap16":
        return torch.zeros(size, dtype=torch.uint16, device=device)
    raise AdapterFormatError(f"unknown position encoding {encoding!r}; expected one of {ENCODINGS}")


def choose_encoding(positions: torch.Tensor, numel: int) -> str:
    """The smallest encoding of these sorted positions (ties favour the bitmap, then int32)."""
    size = positions.numel()
    candidates = ["bitmap", "int32"]
    if size and int(_gaps(positions.long()).max()) <= _GAP16_MAX:
        candidates.append("gap16")
    return min(candidates, key=lambda encoding: encoded_bytes(numel, size, encoding))


def _gaps(positions: torch.Tensor) -> torch.Tensor:
    return torch.diff(positions, prepend=positions.new_full((1,), -1))


def encoding_of(encoded: torch.Tensor) -> str:
    """The encoding of an encoded-positions tensor, told by its dtype (each encoding has its own)."""
    for encoding, dtype in _ENCODING_DTYPES.items():
        if encoded.dtype == dtype:
            return encoding
    raise AdapterFormatError(f"child positions of dtype {encoded.dtype} match no encoding of {ENCODINGS}")


def encode_positions(positions: torch.Tensor, numel: int, encoding: str) -> torch.Tensor:
    """Encode sorted, distinct flat positions (any integer dtype) of a tensor of `numel` entries."""
    positions = positions.long()
    if encoding == "bitmap":  # numpy packs bits several times faster than torch can
        bits = np.zeros(numel, dtype=bool)
        bits[positions.cpu().numpy()] = True
        return torch.from_numpy(np.packbits(bits, bitorder="little")).to(positions.device)
    if encoding == "int32":
        return positions.to(torch.int32)
    if encoding == "gap16":
        return _gaps(positions).to(torch.uint16)
    raise AdapterFormatError(f"unknown position encoding {encoding!r}; expected one of {ENCODINGS}")


def decode_positions(encoded: torch.Tensor, numel: int, size: int, encoding: str, name: str) -> torch.Tensor:
    """Sorted flat positions from their encoding, checked against the tensor's size and the child size.

    int32 where the tensor has fewer than 2**31 entries: decoded positions stay in memory for training and merging,
    and torch indexes with int32 as with int64 at half the bytes.
    """
    expected_dtype = _ENCODING_DTYPES.get(encoding)
    if expected_dtype is None:
        raise AdapterFormatError(f"{name}: unknown position encoding {encoding!r}; expected one of {ENCODINGS}")
    expected_length = (numel + 7) // 8 if encoding == "bitmap" else size
    if encoded.dtype != expected_dtype or tuple(encoded.shape) != (expected_length,):
        raise AdapterFormatError(
            f"{name}: {encoding} positions should be {expected_dtype}[{expected_length}], the file has "
            f"{encoded.dtype}[{', '.join(map(str, encoded.shape))}]; the file does not match its adapter_config.json."
        )
    if encoding == "bitmap":
        bits = torch.from_numpy(np.unpackbits(encoded.cpu().numpy(), bitorder="little")).view(torch.bool)
        if bits[numel:].any():
            raise AdapterFormatError(f"{name}: the bitmap marks positions beyond the tensor's {numel} entries.")
        positions = flat_nonzero(bits[:numel])
        if positions.numel() != size:
            raise AdapterFormatError(
                f"{name}: the bitmap marks {positions.numel()} entries, the config says the child has {size}."
            )
        return positions.to(encoded.device, index_dtype(numel))
    if encoding == "int32":
        positions = encoded.long()
    else:
        gaps = encoded.to(torch.int64)
        if size and bool((gaps == 0).any()):
            raise AdapterFormatError(f"{name}: a zero gap encodes a duplicated position.")
        positions = gaps.cumsum(0) - 1
    if size:
        if int(positions[0]) < 0 or int(positions[-1]) >= numel:
            raise AdapterFormatError(f"{name}: positions out of range for a tensor of {numel} entries.")
        if size > 1 and not bool((positions[1:] > positions[:-1]).all()):
            raise AdapterFormatError(f"{name}: positions are not sorted and distinct (unsorted or duplicated).")
    return positions.to(index_dtype(numel))


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no entry is NaN or infinite: the extremes carry any NaN or inf, and finding them is an order of
    magnitude faster than a bool tensor from isfinite (this runs over every loaded child value)."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    smallest, largest = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(smallest)) and bool(torch.isfinite(largest))


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """The flat positions (int64, on CPU) of a bool tensor's True entries: numpy's flatnonzero, several times faster
    than torch.nonzero on CPU, which this is for (selecting and decoding child networks)."""
    return torch.from_numpy(np.flatnonzero(mask.detach().cpu().numpy()))


def index_dtype(numel: int) -> torch.dtype:
    """The smallest integer dtype torch indexes with that holds every flat position of a tensor of `numel` entries."""
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


FINGERPRINT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
    return flat[::step][:_FINGERPRINT_SAMPLES].cpu()


def _hash(tensors: list[tuple[str, torch.Tensor]], dtype: torch.dtype) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in tensors:
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(_sample(tensor).to(dtype).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """Hashes of the tuned base tensors' names, shapes and a fixed sample of their values, in each float dtype.

    One hash per dtype (the sample cast to it), plus the dtype the adapter was tuned in: the same checkpoint loaded
    in fp32, bf16 or fp16 matches, a different one (different weights almost everywhere) does not. Sampling keeps it
    cheap for any model size.
    """
    tensors = list(tensors)
    tuned_dtype = str(tensors[0][1].dtype).removeprefix("torch.") if tensors else "float32"
    hashes = {name: _hash(tensors, dtype) for name, dtype in FINGERPRINT_DTYPES.items()}
    return {"tuned_dtype": tuned_dtype, **hashes}


def fingerprint_matches(recorded: dict[str, str], tensors: Iterable[tuple[str, torch.Tensor]]) -> bool:
    """Whether these base tensors are the ones the adapter was tuned from (up to the dtype they were loaded in)."""
    tensors = list(tensors)
    if not tensors:
        return True
    loaded_dtype = str(tensors[0][1].dtype).removeprefix("torch.")
    tuned_dtype = recorded.get("tuned_dtype", "float32")
    # a base at least as precise as the tuned one: round it to the tuned dtype; a less precise one: compare as loaded
    for dtype_name in (tuned_dtype, loaded_dtype):
        if dtype_name in FINGERPRINT_DTYPES and recorded.get(dtype_name) == _hash(
            tensors, FINGERPRINT_DTYPES[dtype_name]
        ):
            return True
    return False
