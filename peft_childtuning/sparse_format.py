"""The sparse adapter format: how a child network's positions are encoded, checked, and fingerprinted.

A mode-"d" adapter stores, per tuned tensor, the child values in the weight's own dtype and the child positions in
whichever encoding is smallest for that tensor:

- ``"bitmap"``: a packed bitmap of the tensor's n entries, uint8[ceil(n / 8)] (little-endian bit order);
- ``"int32"``: the sorted flat positions, int32[k];
- ``"gap16"``: the gaps between successive sorted positions (the first one counted from -1), uint16[k], when every
  gap fits in 16 bits;
- ``"gap16x"``: the same gaps where some do not fit, uint16[k + 3w] for w wide gaps: first each gap g as its
  remainder g - 65535 c, 1 to 65,535, where c = (g - 1) // 65535 (0 for a gap that fits); then, for each wide gap
  in order, the triple (its index // 65536, its index % 65536, c). A wide gap costs three words instead of turning
  the whole tensor into int32, and the stream decodes on the device with static shapes (a scatter-add of the few
  triples, then gap16's prefix sum): no sequential parse, as escapes inline in the gaps would need, and no
  compaction (inline zero words dropped by `nonzero_static`, measured on CPU for 1M positions with 10 wide gaps:
  16 ms per expansion, against 1.6 ms this way and 1.0 ms for gap16). Its length varies, so the config records it
  (``child_encoded_lengths``).

The layers hold positions in this encoded form too, so a checkpoint's tensors have the shapes the layers already
have (from the config's ``child_sizes``, ``child_encodings`` and ``child_encoded_lengths``) and every loader,
transformers' included, can load them as they are. Decoding validates: a corrupted file gives an
`AdapterFormatError`, never a wrong model.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import struct
import zlib
from typing import Any, Optional

import numpy as np
import safetensors
import safetensors.torch
import torch

ENCODINGS = ("bitmap", "int32", "gap16", "gap16x")
# encodings whose length depends on the positions, not only on the tensor's and child's sizes: recorded in the config
VARIABLE_LENGTH_ENCODINGS = ("gap16x",)
_ENCODING_DTYPES = {"bitmap": torch.uint8, "int32": torch.int32, "gap16": torch.uint16, "gap16x": torch.uint16}
_GAP16_MAX = (1 << 16) - 1  # the widest 16-bit gap, and what a gap16x wide gap's count multiplies
_GAP16X_MAX = _GAP16_MAX * (_GAP16_MAX + 1)  # the widest gap16x gap: remainder and count both 65,535
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)
# `flat_nonzero` takes numpy's path on CPU; tests turn this off to check the torch path that runs on accelerators
_NUMPY_ON_CPU = True  # bit i of a bitmap byte marks its entry i (little-endian)
# the safetensors metadata entry holding a CRC-32 of every stored tensor's bytes (JSON: tensor name -> 8 hex digits)
CHECKSUMS_METADATA_KEY = "childtuning_crc32"
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class AdapterFormatError(ValueError):
    """A Child-Tuning adapter (file, tensors or config) that cannot be loaded as it is; the model was left unchanged.

    The message names the file or tensor and the fix; the exception that revealed the problem is the ``__cause__``.
    """


def encoded_length(
    numel: int, size: int, encoding: str, recorded: Optional[int] = None, name: str = "positions"
) -> int:
    """The number of elements of the encoded positions of `size` child entries in a tensor of `numel`.

    A gap16x stream's length is `recorded` (the config's ``child_encoded_lengths``), checked against what such a
    child can need (its size, plus three words per wide gap, each of which spans over 65,535 entries), before a few
    bytes of JSON allocate gigabytes.
    """
    if encoding == "bitmap":
        return (numel + 7) // 8
    if encoding in ("int32", "gap16"):
        return size
    if encoding == "gap16x":
        most = size + 3 * min(size, max(numel - size, 0) // _GAP16_MAX)
        if type(recorded) is not int or not size <= recorded <= most:
            raise AdapterFormatError(
                f"{name}: a gap16x stream of {size} positions in a tensor of {numel} entries has {size} to {most} "
                f"words, the config's child_encoded_lengths records {recorded!r}; the adapter_config.json is "
                "corrupted or does not belong to this model. Save the adapter again."
            )
        return recorded
    raise AdapterFormatError(f"{name}: unknown position encoding {encoding!r}; expected one of {ENCODINGS}")


def encoded_bytes(numel: int, size: int, encoding: str, recorded: Optional[int] = None) -> int:
    return encoded_length(numel, size, encoding, recorded) * _ENCODING_DTYPES[encoding].itemsize


def placeholder(
    numel: int, size: int, encoding: str, device: torch.device | str = "cpu", recorded: Optional[int] = None
) -> torch.Tensor:
    """An encoded-positions tensor of the right shape and dtype, to be filled by a loader (`recorded`: a gap16x
    stream's length, see `encoded_length`).

    Unless the child is empty it does not decode (no bit set, position -1, zero gaps), so a loader that skips it is
    caught at first use.
    """
    length = encoded_length(numel, size, encoding, recorded)
    if encoding == "int32":
        return torch.full((length,), -1, dtype=torch.int32, device=device)
    return torch.zeros(length, dtype=_ENCODING_DTYPES[encoding], device=device)


def choose_encoding(positions: torch.Tensor, numel: int) -> str:
    """The smallest encoding of these sorted positions (ties favour the bitmap, then int32).

    Gaps are written as gap16 where all fit in 16 bits, else as gap16x (three more words per wide gap), unless a gap
    is wider than gap16x holds.
    """
    size = positions.numel()
    candidates = {encoding: encoded_bytes(numel, size, encoding) for encoding in ("bitmap", "int32")}
    if size:
        gaps = _gaps(positions.long())
        wide, widest = (int(value) for value in torch.stack([(gaps > _GAP16_MAX).sum(), gaps.max()]).tolist())
        if widest <= _GAP16X_MAX:
            candidates["gap16x" if wide else "gap16"] = 2 * (size + 3 * wide)
    return min(candidates, key=candidates.__getitem__)


def _gaps(positions: torch.Tensor) -> torch.Tensor:
    return torch.diff(positions, prepend=positions.new_full((1,), -1))


def _wide_counts(gaps: torch.Tensor) -> torch.Tensor:
    """How many times 65,535 each gap holds beyond its 16-bit remainder (1 to 65,535): 0 for a gap that fits."""
    return torch.div(gaps - 1, _GAP16_MAX, rounding_mode="floor")


def encoding_of(encoded: torch.Tensor, size: int) -> str:
    """The encoding of the encoded positions of `size` child entries, told by its dtype, and for 16-bit words by
    its length: a stream longer than the child has gap16x's wide gaps (one as long is gap16, with or without)."""
    if encoded.dtype == torch.uint16:
        return "gap16" if encoded.numel() == size else "gap16x"
    for encoding, dtype in _ENCODING_DTYPES.items():
        if encoded.dtype == dtype:
            return encoding
    raise AdapterFormatError(f"child positions of dtype {encoded.dtype} match no encoding of {ENCODINGS}")


def encode_positions(positions: torch.Tensor, numel: int, encoding: str) -> torch.Tensor:
    """Encode sorted, distinct flat positions (any integer dtype) of a tensor of `numel` entries, on their device."""
    positions = positions.long()
    if encoding == "bitmap":
        if positions.device.type == "cpu":  # numpy packs bits several times faster than torch can
            bits = np.zeros(numel, dtype=bool)
            bits[positions.numpy()] = True
            return torch.from_numpy(np.packbits(bits, bitorder="little"))
        bits = torch.zeros(-(-numel // 8) * 8, dtype=torch.uint8, device=positions.device)
        bits[positions] = 1
        return (bits.view(-1, 8) << _BIT_SHIFTS.to(positions.device)).sum(1, dtype=torch.uint8)
    if encoding == "int32":
        return positions.to(torch.int32)
    if encoding == "gap16":
        return _gaps(positions).to(torch.uint16)
    if encoding == "gap16x":
        return _gap_stream(positions)
    raise AdapterFormatError(f"unknown position encoding {encoding!r}; expected one of {ENCODINGS}")


def _gap_stream(positions: torch.Tensor) -> torch.Tensor:
    """The gap16x stream of sorted int64 positions, on their device: the gaps' 16-bit remainders, then a triple
    (index high, index low, count) per wide gap (gap16's gaps where no gap is wide). Finding the wide gaps syncs."""
    gaps = _gaps(positions)
    if gaps.numel() and int(gaps.max()) > _GAP16X_MAX:
        raise AdapterFormatError(
            f"a gap of {int(gaps.max())} entries is wider than gap16x holds ({_GAP16X_MAX}); encode these positions "
            "as int32 or a bitmap."
        )
    counts = _wide_counts(gaps)
    wide = flat_nonzero(counts > 0)
    table = torch.stack([wide >> 16, wide & _GAP16_MAX, counts.index_select(0, wide)], 1)
    return torch.cat([gaps.sub_(counts * _GAP16_MAX), table.reshape(-1)]).to(torch.uint16)


def _unpack_bits(encoded: torch.Tensor) -> torch.Tensor:
    """The bool bits of a little-endian packed bitmap, on its device (numpy's unpackbits on CPU, the faster)."""
    if encoded.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(encoded.numpy(), bitorder="little")).view(torch.bool)
    return ((encoded.unsqueeze(1) >> _BIT_SHIFTS.to(encoded.device)) & 1).view(-1).bool()


def decode_positions(
    encoded: torch.Tensor, numel: int, size: int, encoding: str, name: str, recorded: Optional[int] = None
) -> torch.Tensor:
    """Sorted flat int64 positions from their encoding, checked against the tensor's size, the child size and, for
    gap16x, the stream length the config records (`recorded`).

    int64, as decoding gives them and as index_copy_ takes them (index_select too is twice as fast with int64 as with
    int32 on CPU): merging at load uses them as they are, and a layer keeps only their `held_positions`.
    Runs on the encoded tensor's device; its checks sync with it there, once.
    """
    expected_dtype = _ENCODING_DTYPES.get(encoding)
    if expected_dtype is None:
        raise AdapterFormatError(f"{name}: unknown position encoding {encoding!r}; expected one of {ENCODINGS}")
    expected_length = encoded_length(numel, size, encoding, recorded, name)
    if encoded.dtype != expected_dtype or tuple(encoded.shape) != (expected_length,):
        raise AdapterFormatError(
            f"{name}: {encoding} positions should be {expected_dtype}[{expected_length}], the file has "
            f"{encoded.dtype}[{', '.join(map(str, encoded.shape))}]; the file does not match its adapter_config.json."
        )
    if encoding == "bitmap":
        bits = _unpack_bits(encoded)
        if bits[numel:].any():
            raise AdapterFormatError(f"{name}: the bitmap marks positions beyond the tensor's {numel} entries.")
        positions = flat_nonzero(bits[:numel])
        if positions.numel() != size:
            raise AdapterFormatError(
                f"{name}: the bitmap marks {positions.numel()} entries, the config says the child has {size}."
            )
        return positions
    if encoding == "int32":
        positions = encoded.long()
    else:
        words = encoded.to(torch.int64)
        if size and bool((words[:size] == 0).any()):
            raise AdapterFormatError(f"{name}: a zero gap encodes a duplicated position.")
        _check_wide_gaps(words[size:], size, name)
        positions = expand_positions(encoded, size)
    if size:
        if int(positions[0]) < 0 or int(positions[-1]) >= numel:
            raise AdapterFormatError(f"{name}: positions out of range for a tensor of {numel} entries.")
        if size > 1 and not bool((positions[1:] > positions[:-1]).all()):
            raise AdapterFormatError(f"{name}: positions are not sorted and distinct (unsorted or duplicated).")
    return positions


def _check_wide_gaps(table: torch.Tensor, size: int, name: str) -> None:
    """Refuse a gap16x table of wide gaps (int64 words after the gaps) that is not whole triples, in order, of
    gaps there are, each at least 65,535 wider than its remainder."""
    if table.numel() % 3:
        raise AdapterFormatError(
            f"{name}: the gap16x stream ends inside a wide gap's three words (truncated escape); the file does not "
            "match its adapter_config.json."
        )
    if not table.numel():
        return
    table = table.view(-1, 3)
    indices = table[:, 0] * (_GAP16_MAX + 1) + table[:, 1]
    if bool((table[:, 2] == 0).any()):
        raise AdapterFormatError(f"{name}: a gap16x wide gap of count 0 (it would not be wide).")
    if int(indices[-1]) >= size or not bool((indices[1:] > indices[:-1]).all()):
        raise AdapterFormatError(
            f"{name}: the gap16x wide gaps name gaps out of order, twice, or beyond the child's {size}."
        )


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no entry is NaN or infinite: the extremes carry any NaN or inf, and finding them is an order of
    magnitude faster than a bool tensor from isfinite (this runs over every loaded child value)."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    smallest, largest = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(smallest)) and bool(torch.isfinite(largest))


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """The flat positions (int64, sorted, on the mask's device) of a bool tensor's True entries: on CPU numpy's
    flatnonzero, several times faster than torch.nonzero there (selecting and decoding child networks); torch's
    elsewhere, so that an accelerator's tensors never travel to the host."""
    if mask.device.type == "cpu" and _NUMPY_ON_CPU:
        return torch.from_numpy(np.flatnonzero(mask.detach().numpy()))
    return torch.nonzero(mask.detach().reshape(-1)).squeeze(1)


def held_positions(encoded: torch.Tensor, positions: torch.Tensor, encoding: str) -> torch.Tensor:
    """What a layer keeps of decoded `positions` next to their encoding, for `expand_positions` at every use.

    int32 positions and 16-bit gaps serve as they are: the encoded tensor itself, nothing held twice. A bitmap
    (chosen only where it is smaller than the gaps) is kept with its gap16x stream: a bitmap is smallest only for
    at least one child entry in 32, so the stream's wide gaps (one per 65,535 entries at most) add under 0.1% to its
    2 bytes per child entry, beyond the encoding the checkpoint needs. Its wide gaps are found once, here (on a GPU
    that syncs once, at decoding, never per step).
    """
    if encoding != "bitmap":
        return encoded
    if positions.numel() and int(positions[-1]) >= _GAP16X_MAX:  # a gap may be too wide: the positions as they are
        # int32 where the tensor allows: held for good, so 4 bytes per child entry rather than int64's 8
        return positions.to(index_dtype(int(positions[-1]) + 1))
    return _gap_stream(positions.long())


def expand_positions(held: torch.Tensor, size: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The `size` sorted flat positions of `dtype` from what `held_positions` kept, or from a checked encoded
    tensor, on its device, with no host sync: a prefix sum for 16-bit gaps (the first counted from -1), after a
    gap16x stream's wide gaps (the triples after its `size` gaps) are added to theirs; a bitmap's set bits (an
    inference merge keeps the bitmap for `unmerge`: decoding it there is rare, holding gaps beside it is not)."""
    if held.dtype == torch.uint16:
        words = held.to(torch.int64)
        gaps, table = words[:size], words[size:].view(-1, 3)
        if table.numel():
            gaps = gaps.index_add(0, table[:, 0] * (_GAP16_MAX + 1) + table[:, 1], table[:, 2] * _GAP16_MAX)
        return gaps.cumsum_(0).sub_(1).to(dtype)
    if held.dtype == torch.uint8:
        return flat_nonzero(_unpack_bits(held)).to(dtype)
    return held.to(dtype)


def index_dtype(numel: int) -> torch.dtype:
    """The smallest integer dtype torch indexes with that holds every flat position of a tensor of `numel` entries."""
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


# ------------------------------------------------------------------------------------------------ integrity
def _crc32(data: Any) -> str:
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def tensor_checksums(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """A CRC-32 of each tensor's bytes as safetensors stores them (little-endian, row-major)."""
    return {
        name: _crc32(tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
        for name, tensor in tensors.items()
    }


def save_with_checksums(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file with a checksum of every tensor in the metadata, written byte-for-byte reproducibly.

    safetensors writes metadata keys in hash-map order, which changes from one process to the next; the header is
    rewritten here with them sorted (same length), so the same adapter always gives the same file (the Hub then
    sees an unchanged file as unchanged).
    """
    metadata = {**(metadata or {}), CHECKSUMS_METADATA_KEY: json.dumps(tensor_checksums(tensors), sort_keys=True)}
    data = bytearray(safetensors.torch.save(tensors, metadata=metadata))
    (header_length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    ordered = json.dumps(header, separators=(",", ":")).encode()
    if len(ordered) <= header_length:
        data[8 : 8 + header_length] = ordered.ljust(header_length, b" ")
    with open(path, "wb") as handle:
        handle.write(data)


# safetensors' dtype names -> torch dtypes (the ones torch has)
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def read_adapter_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], bool]:
    """(tensors, whether checksums were stored) of a safetensors file, read into memory once and checked against
    their stored checksums.

    Read with ``read()`` rather than mapped: the bytes checked are the bytes loaded, even if the file is being
    rewritten meanwhile (a mapped file shrinking under a reader kills it with SIGBUS). Each tensor is read straight
    into memory of its own (safetensors' own `load` would copy every byte once more, which doubled the cost of
    reading an adapter), so a loader can make it the adapter's Parameter as it is, and nothing shares storage
    (which `safetensors.save_file`, e.g. in accelerate's `save_state`, refuses). The header is checked here as
    safetensors checks it: known dtypes, shapes that fit their byte ranges, ranges that tile the data exactly, no
    name twice. Files written before checksums were stored load unchecked; in a file with checksums, every tensor
    must have one and match it.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            head = handle.read(8)
            if len(head) < 8:
                raise AdapterFormatError(f"{path}: {len(head)} bytes is too short for a safetensors file (truncated?).")
            (header_length,) = struct.unpack("<Q", head)
            if header_length > min(file_size - 8, _MAX_HEADER_BYTES):
                raise AdapterFormatError(f"{path}: the safetensors header claims {header_length} bytes (truncated?).")
            header_bytes = handle.read(header_length)
            try:
                header = json.loads(header_bytes, object_pairs_hook=_refuse_repeated_names)
                metadata, entries = _check_header(header, file_size - 8 - header_length)
            except ValueError as error:  # JSONDecodeError, UnicodeDecodeError included
                raise AdapterFormatError(
                    f"{path}: not a valid safetensors file ({error}); save the adapter again."
                ) from error
            ordered = sorted(entries, key=lambda name: entries[name][2])  # the ranges tile the data in this order
            # not zero-filled: read into directly
            raw = {name: torch.empty(entries[name][3] - entries[name][2], dtype=torch.uint8) for name in ordered}
            _read_into(handle, 8 + header_length, [raw[name] for name in ordered], path)
    except OSError as error:
        raise AdapterFormatError(f"{path}: cannot be read ({error}).") from error
    if CHECKSUMS_METADATA_KEY in metadata:
        _check_checksums(path, raw, metadata[CHECKSUMS_METADATA_KEY])
    tensors = {name: raw[name].view(dtype).reshape(shape) for name, (dtype, shape, _, _) in entries.items()}
    return tensors, CHECKSUMS_METADATA_KEY in metadata


def _read_into(handle: Any, offset: int, buffers: list[torch.Tensor], path: str) -> None:
    """Fill `buffers` with the file's consecutive bytes from `offset`: with one vectored read (``os.preadv``) where
    the system has it, so that reading on a thread costs the interpreter lock a few hand-overs rather than one per
    tensor; a short read is completed tensor by tensor."""
    views = [memoryview(buffer.numpy()) for buffer in buffers if buffer.numel()]
    done = 0
    if hasattr(os, "preadv"):
        for first in range(0, len(views), 1024):  # IOV_MAX
            batch = views[first : first + 1024]
            read = os.preadv(handle.fileno(), batch, offset + done)
            done += read
            if read < sum(len(view) for view in batch):
                break
    handle.seek(offset + done)
    for view in views:
        skip = min(done, len(view))
        done -= skip
        if skip < len(view) and handle.readinto(view[skip:]) != len(view) - skip:
            raise AdapterFormatError(f"{path}: the file ends inside a tensor's data (truncated while read?).")


def _refuse_repeated_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"a name appears twice in the header: {sorted({n for n in names if names.count(n) > 1})}")
    return dict(pairs)


def _check_header(header: Any, data_length: int) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, list, int, int]]]:
    """(metadata, {name: (dtype, shape, start, end)}) of a safetensors header, or ValueError saying what is wrong."""
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ is not a map of strings")
    entries = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"the entry of {name!r} is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name!r} has the unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(size) is int and size >= 0 for size in shape):
            raise ValueError(f"{name!r} has the shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise ValueError(f"{name!r} has the data offsets {offsets!r}")
        numel = 1
        for size in shape:
            numel *= size
        torch_dtype = _SAFETENSORS_DTYPES[dtype]
        if not 0 <= offsets[0] <= offsets[1] or offsets[1] - offsets[0] != numel * torch_dtype.itemsize:
            raise ValueError(f"{name!r}: data offsets {offsets} do not hold {numel} {dtype} entries")
        entries[name] = (torch_dtype, shape, offsets[0], offsets[1])
    covered = 0
    for _, _, start, end in sorted(entries.values(), key=lambda entry: (entry[2], entry[3])):
        if start != covered:
            raise ValueError("the tensors' byte ranges overlap or leave a gap")
        covered = end
    if covered != data_length:
        raise ValueError(f"the tensors hold {covered} bytes, the file {data_length} after its header")
    return metadata, entries


def _check_checksums(path: str, raw: dict[str, torch.Tensor], recorded_json: str) -> None:
    try:
        recorded = json.loads(recorded_json)
        if not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
    except ValueError as error:
        raise AdapterFormatError(f"{path}: its tensor checksums cannot be read ({error}).") from error
    if set(recorded) != set(raw):
        added, missing = sorted(set(raw) - set(recorded)), sorted(set(recorded) - set(raw))
        raise AdapterFormatError(
            f"{path}: the file's tensors are not the ones it was saved with (added: {added or 'none'}, "
            f"missing: {missing or 'none'}); save the adapter again."
        )
    names = list(raw)

    def checksum(name: str) -> str:
        return _crc32(raw[name].numpy())

    # zlib computes CRCs without the GIL: the tensors' checksums in parallel
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        actual = dict(zip(names, pool.map(checksum, names)))
    for name in names:
        if actual[name] != recorded[name]:
            raise AdapterFormatError(
                f"{path}: tensor {name} does not match its checksum (the file is corrupted); download or save the "
                "adapter again."
            )
