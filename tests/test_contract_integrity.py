"""Clause 5 of the loading contract: integrity.

save_pretrained stores a CRC-32 of every tensor in the safetensors metadata; a flipped bit anywhere in positions or
values is refused, never another model. Files saved before checksums existed still load.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from peft import PeftModel

from peft_childtuning import AdapterFormatError, ChildTuningConfig

from conftest import rewrite_weights

POSITIONS_SUFFIX = "childtuning_positions"


def _layout(path: str) -> tuple[bytes, dict, int]:
    with open(path, "rb") as handle:
        data = handle.read()
    (length,) = struct.unpack("<Q", data[:8])
    return data, json.loads(data[8 : 8 + length]), 8 + length


def _gap16_adapter(saved_adapters, tmp_path) -> str:
    """A mode-d adapter whose positions are 16-bit gaps (the encoding where a flipped bit decodes validly most often)."""
    from peft import get_peft_model

    from conftest import ARCHS

    model = get_peft_model(saved_adapters.load_base(), ChildTuningConfig(mode="d", reserve_p=0.01, task_type="SEQ_CLS"))
    model.detect_child_network(ARCHS["bert"].batches(2, seed=20), progress=False)
    path = str(tmp_path / "gap16")
    model.save_pretrained(path)
    assert "gap16" in set(model.peft_config["default"].child_encodings.values())
    return path


def test_every_single_bit_flip_of_gap16_positions_is_refused(saved_adapters, tmp_path):
    adapter_dir = _gap16_adapter(saved_adapters, tmp_path)
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    data, header, start = _layout(path)
    gap16 = [key for key, entry in header.items() if key.endswith(POSITIONS_SUFFIX) and entry["dtype"] == "U16"]
    name = max(gap16, key=lambda key: header[key]["data_offsets"][1] - header[key]["data_offsets"][0])
    begin, end = header[name]["data_offsets"]
    assert end - begin >= 15
    flips = [(byte, bit) for byte in range(begin, min(end, begin + 15)) for bit in range(8)]
    assert len(flips) == 120
    base = saved_adapters.load_base()
    for byte, bit in flips:
        corrupted = bytearray(data)
        corrupted[start + byte] ^= 1 << bit
        with open(path, "wb") as handle:
            handle.write(bytes(corrupted))
        with pytest.raises(AdapterFormatError, match="checksum"):
            PeftModel.from_pretrained(base, adapter_dir)


@pytest.mark.parametrize("mode", ["d", "f"])
def test_a_flipped_value_bit_is_refused(saved_adapters, tmp_path, mode):
    adapter_dir = saved_adapters.copy_adapter(mode, str(tmp_path / "adapter"))
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    data, header, start = _layout(path)
    name = next(key for key in header if key.endswith("childtuning_values"))
    corrupted = bytearray(data)
    corrupted[start + header[name]["data_offsets"][0] + 1] ^= 0x01  # a low mantissa bit: still a finite value
    with open(path, "wb") as handle:
        handle.write(bytes(corrupted))
    with pytest.raises(AdapterFormatError, match="checksum"):
        PeftModel.from_pretrained(saved_adapters.load_base(), adapter_dir)


LEGACY_ADAPTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "empty_child_adapter_0.1.0")


def test_an_adapter_saved_before_checksums_still_loads():
    """Saved by peft_childtuning 0.1.0 (no checksums, the fingerprint of that version): it loads, exactly."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from conftest import ARCHS, tiny_bert, written_by_hand

    with safe_open(os.path.join(LEGACY_ADAPTER, "adapter_model.safetensors"), framework="pt") as handle:
        assert "childtuning_crc32" not in (handle.metadata() or {})
    loaded = PeftModel.from_pretrained(tiny_bert(), LEGACY_ADAPTER)
    inputs = {key: value for key, value in ARCHS["bert"].batches(1, seed=42)[0].items() if key != "labels"}
    with torch.no_grad():
        logits = loaded(**inputs).logits
        assert torch.equal(logits, written_by_hand(tiny_bert(), LEGACY_ADAPTER).eval()(**inputs).logits)
    # recorded when the file was written (transformers 5.24): another transformers version may round BERT's
    # float32 forward differently, by float32 rounding (tests/float_tolerance.py), never more
    from float_tolerance import normwise_atol

    recorded = load_file(os.path.join(LEGACY_ADAPTER, "expected_logits.safetensors"))["logits"]
    torch.testing.assert_close(logits, recorded, rtol=0, atol=normwise_atol(recorded))


@pytest.mark.parametrize("mode", ["d", "f"])
def test_a_file_of_this_version_with_its_checksums_removed_is_refused(saved_adapters, tmp_path, mode):
    adapter_dir = saved_adapters.copy_adapter(mode, str(tmp_path / "adapter"))
    rewrite_weights(adapter_dir, lambda tensors: None, checksums=False)
    with pytest.raises(AdapterFormatError, match="altered"):
        PeftModel.from_pretrained(saved_adapters.load_base(), adapter_dir)


def test_checksums_name_every_tensor_and_no_other(saved_adapters, tmp_path):
    adapter_dir = saved_adapters.copy_adapter("d", str(tmp_path / "adapter"))
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    _, header, _ = _layout(path)
    metadata = header.pop("__metadata__")
    assert set(json.loads(metadata["childtuning_crc32"])) == set(header)
    # a tensor added or removed in a file that still carries the old checksums is refused
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors.pop(next(iter(tensors)))
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(AdapterFormatError, match="not the ones it was saved with"):
        PeftModel.from_pretrained(saved_adapters.load_base(), adapter_dir)
