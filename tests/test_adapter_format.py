"""The sparse adapter format on disk: what save_pretrained writes, how big it is, and how safely it is decoded.

Covers the file layout (safetensors + adapter_config.json only; mode "d" = child positions in the smallest encoding
plus child values in the weight's own dtype, no base weights, modules_to_save whole; mode "f" = tuned tensors whole),
the size bound, property-based tests of `sparse_format.decode_positions`, the base fingerprint, and loading bad files
(a clear error, base weights untouched).

Models are built from configs and saved into tmp dirs, so no hub access is needed (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from peft_childtuning import ChildTuningConfig
from peft_childtuning.fingerprint import base_fingerprint, fingerprint_mismatch
from peft_childtuning.sparse_format import (
    ENCODINGS,
    AdapterFormatError,
    choose_encoding,
    decode_positions,
    encode_positions,
    encoded_bytes,
    expand_positions,
    placeholder,
    save_with_checksums,
)

from conftest import (
    ARCHS,
    WIDE_GAP_KEY,
    WIDE_INTERMEDIATE,
    child_layers,
    give_wide_gaps,
    peft_model,
    positions_of,
    tiny_bert,
    train_steps,
    trainable_parameters,
    wide_bert,
    wide_gap_positions,
)

BERT = ARCHS["bert"]
SAVED_PREFIX = "base_model.model."
VALUES, POSITIONS = "childtuning_values", "childtuning_positions"
ENCODED_DTYPES = {"bitmap": torch.uint8, "int32": torch.int32, "gap16": torch.uint16, "gap16x": torch.uint16}
GAP16_MAX = (1 << 16) - 1
BYTES_PER_VALUE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@pytest.fixture(scope="module", autouse=True)
def hub_offline():
    """Everything here loads from local directories: no Hub access (without leaking the setting to other modules)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


# ------------------------------------------------------------------------------------------------ helpers
def load_base(base_dir: str, dtype: torch.dtype = torch.float32) -> BertForSequenceClassification:
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, dtype=dtype)
    model.eval()
    return model


def train_adapter(
    base: torch.nn.Module,
    out_dir: Optional[str] = None,
    mode: str = "d",
    reserve_p: float = 0.3,
    selection: str = "fisher",
    steps: int = 2,
    **config_kwargs,
):
    """A Child-Tuning adapter on `base`, child network chosen (Fisher or random), trained a few AdamW steps."""
    model = peft_model(base, mode=mode, reserve_p=reserve_p, selection=selection, seed=3, task_type="SEQ_CLS",
                       **config_kwargs)
    if model.peft_config["default"].needs_fisher_pass:
        model.detect_child_network(BERT.batches(2, seed=20), progress=False)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model.train()
    for batch in BERT.batches(steps, seed=21):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


def safetensors_layout(path: str) -> tuple[dict, int]:
    """(the header's tensor entries, the header size incl. its 8-byte length) of a safetensors file."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def data_bytes(entry: dict) -> int:
    return entry["data_offsets"][1] - entry["data_offsets"][0]


def gaps_of(positions: torch.Tensor) -> torch.Tensor:
    return torch.diff(positions, prepend=positions.new_full((1,), -1))


def valid_encodings(positions: torch.Tensor, numel: int) -> list[str]:
    """Every encoding that can represent these sorted positions (gap16 only where each gap fits in 16 bits)."""
    candidates = ["bitmap", "int32", "gap16x"]
    if positions.numel() and int(gaps_of(positions).max()) <= GAP16_MAX:
        candidates.append("gap16")
    return candidates


def gap16x_length(positions: torch.Tensor) -> int:
    """The words of a gap16x stream, counted apart from the encoder: one per position, and three per gap wider than
    16 bits."""
    return positions.numel() + 3 * int((gaps_of(positions) > GAP16_MAX).sum())


def recorded_length(positions: torch.Tensor, encoding: str) -> Optional[int]:
    """What the config records of an encoding's length: a gap16x stream's, nothing for the others."""
    return gap16x_length(positions) if encoding == "gap16x" else None


def encoded_size(positions: torch.Tensor, numel: int, encoding: str) -> int:
    return encoded_bytes(numel, positions.numel(), encoding, recorded_length(positions, encoding))


def file_key(tensor_key: str, container: str) -> str:
    """'bert.encoder.layer.0.output.dense.weight' -> its saved key of that container."""
    module = tensor_key.rsplit(".", 1)[0]
    return f"{SAVED_PREFIX}{module}.{container}"


def medium_bert(seed: int = 0) -> BertForSequenceClassification:
    """A BERT big enough that the size bound is not swamped by the 64 KiB slack (about 0.4 M tuned entries)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=512, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(config).eval()


def assert_valid_positions(positions: torch.Tensor, numel: int, size: int) -> None:
    assert positions.dtype == torch.int64  # as index_copy_ takes them; layers hold the compact `held_positions`
    assert tuple(positions.shape) == (size,)
    if size:
        assert int(positions.min()) >= 0 and int(positions.max()) < numel
        assert bool((positions[1:] > positions[:-1]).all())


def snapshot(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor object, copy of its values) for every parameter and buffer: survives the module being wrapped."""
    return [(tensor, tensor.detach().clone()) for tensor in model.state_dict(keep_vars=True).values()]


def assert_untouched(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    changed = sum(not torch.equal(tensor.detach(), copy_) for tensor, copy_ in saved)
    assert changed == 0, f"{changed} base tensors were modified by a load that failed"


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    """A tiny BERT saved to disk, and a Fisher mode-"d" adapter (reserve_p 0.3) trained from it."""
    root = tmp_path_factory.mktemp("format")
    base_dir = str(root / "base")
    tiny_bert(seed=0).save_pretrained(base_dir)
    adapter_dir = str(root / "adapter_d")
    model = train_adapter(load_base(base_dir), adapter_dir)
    batch = {k: v for k, v in BERT.batches(1, seed=30)[0].items() if k != "labels"}
    with torch.no_grad():
        expected = model(**batch).logits
    f_dir = str(root / "adapter_f")
    train_adapter(load_base(base_dir), f_dir, mode="f", steps=1)
    return {"root": root, "base": base_dir, "d": adapter_dir, "f": f_dir, "batch": batch, "expected": expected}


# ------------------------------------------------------------------------------------------------ 1. what is saved
@pytest.mark.parametrize("mode", ["d", "f"])
def test_save_writes_only_safetensors_and_config(bert_dirs, mode):
    adapter_dir = bert_dirs[mode]
    files = set(os.listdir(adapter_dir))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not [name for name in files if name.endswith(PICKLE_SUFFIXES)], f"pickle files written: {files}"
    assert files <= {"adapter_config.json", "adapter_model.safetensors", "README.md"}, files
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    with open(path, "rb") as handle:
        head = handle.read(16)
    assert not head.startswith((b"\x80", b"PK")), "a pickle / torch zip file, not safetensors"
    with safe_open(path, framework="pt") as handle:
        assert len(list(handle.keys())) > 0
    with open(os.path.join(adapter_dir, "adapter_config.json")) as handle:
        config = json.load(handle)
    assert config["peft_type"] == "CHILDTUNING" and config["mode"] == mode
    assert config["base_fingerprint"]["version"] == 2 and config["base_fingerprint"]["count"] > 0
    # every stored tensor carries a checksum in the file's metadata
    with safe_open(path, framework="pt") as handle:
        checksums = json.loads(handle.metadata()["childtuning_crc32"])
        assert set(checksums) == set(handle.keys())


@pytest.mark.parametrize(
    "selection, dtype, reserve_p",
    [
        ("fisher", torch.float32, 0.3),
        ("fisher", torch.float32, 0.03),
        ("random", torch.bfloat16, 0.3),
        ("random", torch.float16, 0.1),
    ],
    ids=["fisher-fp32-0.3", "fisher-fp32-0.03", "random-bf16-0.3", "random-fp16-0.1"],
)
def test_mode_d_file_holds_positions_and_values_in_weight_dtype(bert_dirs, tmp_path, selection, dtype, reserve_p):
    base = load_base(bert_dirs["base"], dtype=dtype)
    if selection == "random":  # no Fisher pass in low precision: a seeded random child network, perturbed values
        model = peft_model(base, mode="d", reserve_p=reserve_p, selection="random", seed=5, init_weights=False,
                           task_type="SEQ_CLS")
        model.save_pretrained(str(tmp_path))
    else:
        model = train_adapter(base, str(tmp_path), reserve_p=reserve_p)
    config = model.peft_config["default"]
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    # the weights whose child network came out empty are not tuned, and not in the file
    layers = {
        layer.tensor_key("weight"): layer
        for layer in child_layers(model).values()
        if "weight" in layer.tuned_tensor_names("default")
    }
    assert set(config.child_sizes) == set(layers) and all(config.child_sizes.values())

    expected_keys = set()
    for tensor_key, layer in layers.items():
        weight = layer.get_base_layer().weight
        size, encoding = config.child_sizes[tensor_key], config.child_encodings[tensor_key]
        values, encoded = saved[file_key(tensor_key, VALUES)], saved[file_key(tensor_key, POSITIONS)]
        expected_keys |= {file_key(tensor_key, VALUES), file_key(tensor_key, POSITIONS)}
        # values: 1-D, k_t entries, in the weight's own dtype, equal to the trained values
        assert values.dtype == weight.dtype == dtype, tensor_key
        assert tuple(values.shape) == (size,), tensor_key
        assert torch.equal(values, layer.childtuning_values["default"].detach().to(dtype)), tensor_key
        # positions: in the declared encoding, decoding to the layer's child network
        assert encoded.dtype == ENCODED_DTYPES[encoding], tensor_key
        recorded = (config.child_encoded_lengths or {}).get(tensor_key)
        positions = decode_positions(encoded, weight.numel(), size, encoding, tensor_key, recorded)
        assert torch.equal(positions, positions_of(layer)), tensor_key
        # the smallest encoding that can hold them
        numel = weight.numel()
        smallest = min(encoded_size(positions, numel, name) for name in valid_encodings(positions, numel))
        assert encoded.numel() * encoded.element_size() == smallest, (tensor_key, encoding)
        assert encoded.numel() * encoded.element_size() <= min((weight.numel() + 7) // 8, 4 * size)
    # modules_to_save (the classifier) whole; nothing else: no base weights
    head = {f"{SAVED_PREFIX}classifier.weight", f"{SAVED_PREFIX}classifier.bias"}
    assert set(saved) == expected_keys | head
    trained_head = dict(model.base_model.model.classifier.modules_to_save["default"].named_parameters())
    for name in ("weight", "bias"):
        assert torch.equal(saved[f"{SAVED_PREFIX}classifier.{name}"], trained_head[name].detach())
    assert not any("base_layer" in key or "original_module" in key for key in saved)
    used = set(config.child_encodings.values())
    if reserve_p == 0.03:
        assert "gap16" in used, used  # a sparse child network exercises the 16-bit gaps
    if reserve_p == 0.3:
        assert "bitmap" in used, used


def test_mode_f_file_holds_tuned_tensors_whole(bert_dirs):
    saved = load_file(os.path.join(bert_dirs["f"], "adapter_model.safetensors"))
    base = dict(load_base(bert_dirs["base"]).named_parameters())
    value_keys = [key for key in saved if key.endswith(VALUES)]
    assert len(value_keys) == BERT.expected_num_targets
    assert not [key for key in saved if POSITIONS in key]
    for key in value_keys:
        weight = base[key[len(SAVED_PREFIX):].replace(VALUES, "weight")]
        assert saved[key].shape == weight.shape and saved[key].dtype == weight.dtype, key
        assert not torch.equal(saved[key], weight), f"{key}: mode-f values did not train"
    assert not any("base_layer" in key for key in saved)


# ------------------------------------------------------------------------------------------------ 2. size
def size_budget(saved_path: str, config: ChildTuningConfig, numels: dict[str, int], bytes_per_value: int):
    """(file bytes, the issue's bound, the bound's inner sum) for a mode-"d" adapter file."""
    header, _ = safetensors_layout(saved_path)
    k = sum(config.child_sizes.values())
    positions_bound = sum(min((numels[key] + 7) // 8, 4 * size) for key, size in config.child_sizes.items())
    modules_to_save = sum(
        data_bytes(entry) for key, entry in header.items() if VALUES not in key and POSITIONS not in key
    )
    inner = k * bytes_per_value + positions_bound + modules_to_save
    return os.path.getsize(saved_path), 1.10 * inner + 64 * 1024, inner, header


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reserve_p", [0.3, 0.1, 0.01, 0.001])
def test_file_size_bound(tmp_path, reserve_p, dtype):
    base = medium_bert().to(dtype)
    model = peft_model(base, mode="d", reserve_p=reserve_p, selection="random", seed=11, task_type="SEQ_CLS")
    model.save_pretrained(str(tmp_path))
    config = model.peft_config["default"]
    numels = {
        layer.tensor_key("weight"): layer.get_base_layer().weight.numel() for layer in child_layers(model).values()
    }
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    size, bound, inner, header = size_budget(path, config, numels, BYTES_PER_VALUE[dtype])
    assert size <= bound, f"{size} bytes > bound {bound:.0f}"
    # exact accounting: the tensors hold the values, the chosen encodings and modules_to_save, nothing more
    k = sum(config.child_sizes.values())
    lengths = config.child_encoded_lengths or {}
    chosen = sum(
        encoded_bytes(numels[key], config.child_sizes[key], config.child_encodings[key], lengths.get(key))
        for key in numels
    )
    modules_to_save = sum(
        data_bytes(entry) for key, entry in header.items() if VALUES not in key and POSITIONS not in key
    )
    assert sum(data_bytes(entry) for entry in header.values()) == k * BYTES_PER_VALUE[dtype] + chosen + modules_to_save
    assert chosen <= sum(min((numels[key] + 7) // 8, 4 * config.child_sizes[key]) for key in numels)
    if reserve_p == 0.3:  # large enough that the 1.10 factor, not the 64 KiB slack, is what is tested
        assert inner > 64 * 1024 * 4


def bytes_per_child_entry(adapter_dir: str) -> dict[str, float]:
    header, header_bytes = safetensors_layout(os.path.join(adapter_dir, "adapter_model.safetensors"))
    with open(os.path.join(adapter_dir, "adapter_config.json")) as handle:
        k = sum(json.load(handle)["child_sizes"].values())
    values = sum(data_bytes(entry) for key, entry in header.items() if key.endswith(VALUES))
    positions = sum(data_bytes(entry) for key, entry in header.items() if key.endswith(POSITIONS))
    file_size = os.path.getsize(os.path.join(adapter_dir, "adapter_model.safetensors"))
    return {"k": k, "values": values / k, "positions": positions / k, "child": (values + positions) / k,
            "file": file_size / k}


@pytest.mark.parametrize("reserve_p", [0.3, 0.1])
def test_bytes_per_child_entry_tiny_bert(bert_dirs, tmp_path, reserve_p):
    """Measured cost per child entry (values + positions) of a Fisher adapter of the tiny BERT, vs the peers
    (SHiRA about 12 B, composable-sft about 6 B per entry). Printed for the report (pytest -s)."""
    train_adapter(load_base(bert_dirs["base"]), str(tmp_path), reserve_p=reserve_p)
    measured = bytes_per_child_entry(str(tmp_path))
    print(f"\n[bytes per child entry] tiny BERT fp32 reserve_p={reserve_p}: k={measured['k']}, "
          f"values {measured['values']:.3f} + positions {measured['positions']:.3f} = {measured['child']:.3f} B; "
          f"whole file {measured['file']:.3f} B (SHiRA ~12 B, composable-sft ~6 B)")
    assert measured["values"] == 4.0
    # positions never cost more than a bitmap spread over the child, 1 / (8 p) bytes per entry
    assert measured["positions"] <= 1.0 / (8 * reserve_p) * 1.01
    assert measured["child"] < 6.0


# ------------------------------------------------------------------------------------------------ 3. decoding
def _sorted_positions(draw, numel: int, max_size: int) -> torch.Tensor:
    chosen = draw(st.sets(st.integers(0, numel - 1), max_size=min(numel, max_size)))
    return torch.tensor(sorted(chosen), dtype=torch.int64)


@st.composite
def child_networks(draw, max_numel: int = 3000, max_size: int = 400):
    numel = draw(st.integers(1, max_numel))
    return numel, _sorted_positions(draw, numel, max_size)


@st.composite
def sparse_child_networks(draw):
    """Big tensors with few entries: gaps that may not fit in 16 bits, some many times over."""
    numel = draw(st.sampled_from([400_000, 3_000_000]))
    numel = draw(st.integers(1, numel))
    return numel, _sorted_positions(draw, numel, 40)


@st.composite
def clustered_child_networks(draw):
    """Clusters of nearby entries far apart: a few wide gaps among many narrow ones (where gap16x is smallest)."""
    clusters = draw(st.lists(st.tuples(st.integers(0, 2_000_000), st.integers(1, 50), st.integers(1, 40)),
                             min_size=1, max_size=5))
    chosen = sorted({start + step * i for start, count, step in clusters for i in range(count)})
    return chosen[-1] + draw(st.integers(1, 70_000)), torch.tensor(chosen, dtype=torch.int64)


@settings(max_examples=200, deadline=None)
@given(network=st.one_of(child_networks(), sparse_child_networks(), clustered_child_networks()))
def test_decode_round_trips_every_encoding(network):
    numel, positions = network
    size = positions.numel()
    valid = valid_encodings(positions, numel)
    for encoding in valid:
        encoded = encode_positions(positions, numel, encoding)
        recorded = recorded_length(positions, encoding)
        assert encoded.dtype == ENCODED_DTYPES[encoding]
        assert encoded.numel() * encoded.element_size() == encoded_bytes(numel, size, encoding, recorded)
        decoded = decode_positions(encoded, numel, size, encoding, "t", recorded)
        assert decoded.dtype == torch.int64 and torch.equal(decoded, positions), encoding
        # what an inference merge keeps for unmerge: the encoded tensor itself, expanded when unmerging
        assert torch.equal(expand_positions(encoded, size), positions), encoding
    # a stream without wide gaps is gap16's, word for word
    if "gap16" in valid:
        assert torch.equal(encode_positions(positions, numel, "gap16x"), encode_positions(positions, numel, "gap16"))
    chosen = choose_encoding(positions, numel)
    assert chosen in valid
    assert encoded_size(positions, numel, chosen) == min(encoded_size(positions, numel, name) for name in valid)
    assert chosen != "gap16x" or "gap16" not in valid  # gap16x only where a gap is wide: old files' encodings kept
    # the placeholder a loader fills has the shape and dtype of the real encoding
    holder = placeholder(numel, size, chosen, recorded=recorded_length(positions, chosen))
    real = encode_positions(positions, numel, chosen)
    assert holder.dtype == real.dtype and holder.shape == real.shape


def test_decoded_positions_are_int32_until_a_tensor_outgrows_it():
    from peft_childtuning.sparse_format import index_dtype

    assert index_dtype(2**31 - 1) == torch.int32
    assert index_dtype(2**31) == torch.int64


def test_a_gap_over_16_bits_costs_three_words_not_the_whole_tensor():
    positions = torch.tensor([0, 70_000, 70_001, 70_002])
    assert choose_encoding(positions, 400_000) == "gap16x"
    encoded = encode_positions(positions, 400_000, "gap16x")
    # gap 1 (70,000) = 4,465 + 1 x 65,535: its remainder in place, then (index 1 // 65536, 1 % 65536, count 1);
    # 14 bytes where int32 takes 16
    assert encoded.tolist() == [1, 70_000 - GAP16_MAX, 1, 1, 0, 1, 1]
    assert decode_positions(encoded, 400_000, 4, "gap16x", "t", 7).tolist() == [0, 70_000, 70_001, 70_002]
    # the widest gap a remainder holds alone, the narrowest that is wide (remainder 1), a wide gap past index 65,535
    positions = torch.tensor([GAP16_MAX - 1, 2 * GAP16_MAX - 1, 3 * GAP16_MAX])
    assert encode_positions(positions, 300_000, "gap16x").tolist() == [GAP16_MAX, GAP16_MAX, 1, 0, 2, 1]
    positions = torch.cat([torch.arange(70_000), torch.tensor([70_000 + 5 * GAP16_MAX])])
    encoded = encode_positions(positions, 500_000, "gap16x")
    assert encoded[-3:].tolist() == [1, 70_000 - (1 << 16), 5] and encoded[70_000] == 1
    assert torch.equal(decode_positions(encoded, 500_000, 70_001, "gap16x", "t", 70_004), positions)
    # one wide gap among two positions costs more than int32 positions: int32
    assert choose_encoding(torch.tensor([0, 300_000]), 400_000) == "int32"
    # the widest gap gap16x holds (remainder and count 65,535), and one wider, which it refuses to encode
    widest = GAP16_MAX * (GAP16_MAX + 1)
    assert encode_positions(torch.tensor([widest - 1]), widest, "gap16x").tolist() == [GAP16_MAX, 0, 0, GAP16_MAX]
    with pytest.raises(AdapterFormatError, match="wider than gap16x holds"):
        encode_positions(torch.tensor([widest]), widest + 1, "gap16x")
    # a dense child: the bitmap
    assert choose_encoding(torch.arange(0, 400_000, 4), 400_000) == "bitmap"


def test_bitmap_bit_order_is_little_endian():
    encoded = encode_positions(torch.tensor([0, 7, 8, 17]), 20, "bitmap")
    assert encoded.tolist() == [0b10000001, 0b00000001, 0b00000010]


def _corrupt(encoded: torch.Tensor, flips: list[tuple[int, int]]) -> torch.Tensor:
    raw = encoded.contiguous().view(torch.uint8).clone()
    for index, mask in flips:
        raw[index % raw.numel()] ^= mask
    return raw.view(encoded.dtype)


def _decode_is_safe(
    encoded: torch.Tensor, numel: int, size: int, encoding: str, recorded: Optional[int] = None
) -> bool:
    """decode_positions either raises AdapterFormatError or returns a valid child network; True if it raised."""
    try:
        positions = decode_positions(encoded, numel, size, encoding, "t", recorded)
    except AdapterFormatError:
        return True
    assert_valid_positions(positions, numel, size)
    return False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    network=st.one_of(child_networks(max_numel=600, max_size=120), sparse_child_networks(), clustered_child_networks()),
    encoding=st.sampled_from(ENCODINGS),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_corrupted_encoding_raises_or_decodes_to_a_valid_set(network, encoding, flips):
    numel, positions = network
    if encoding not in valid_encodings(positions, numel):
        return
    encoded = encode_positions(positions, numel, encoding)
    if encoded.numel() == 0:
        return
    _decode_is_safe(_corrupt(encoded, flips), numel, positions.numel(), encoding, encoded.numel())


@settings(max_examples=300, deadline=None)
@given(data=st.data(), numel=st.integers(1, 5000), size=st.integers(0, 300), encoding=st.sampled_from(ENCODINGS))
def test_arbitrary_bytes_raise_or_decode_to_a_valid_set(data, numel, size, encoding):
    """Any bytes of the declared shape, for any declared child size (even one larger than the tensor)."""
    length = (numel + 7) // 8 if encoding == "bitmap" else size
    itemsize = ENCODED_DTYPES[encoding].itemsize
    raw = data.draw(st.binary(min_size=length * itemsize, max_size=length * itemsize))
    encoded = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(ENCODED_DTYPES[encoding]) if raw else (
        torch.empty(0, dtype=ENCODED_DTYPES[encoding]))
    raised = _decode_is_safe(encoded, numel, size, encoding, length)
    if size > numel:
        assert raised, "more child entries than tensor entries cannot be a valid child network"


@settings(max_examples=300, deadline=None)
@given(
    numel=st.integers(1, 1_000_000),
    size=st.integers(0, 40),
    words=st.lists(st.one_of(st.just(0), st.integers(1, GAP16_MAX), st.just(GAP16_MAX)), max_size=60),
    recorded_offset=st.sampled_from([0, 0, 0, -1, 1]),
)
def test_arbitrary_gap16x_streams_raise_or_decode_to_a_valid_set(numel, size, words, recorded_offset):
    """Any 16-bit words, zeros often, for any declared size and a recorded length that may disagree."""
    encoded = torch.tensor(words, dtype=torch.int32).to(torch.uint16)
    raised = _decode_is_safe(encoded, numel, size, "gap16x", len(words) + recorded_offset)
    if recorded_offset or len(words) < size or (len(words) - size) % 3 or 0 in words[:size]:
        assert raised, "a stream of the wrong length, with a zero gap, or a wide gap cut short cannot decode"


@settings(max_examples=100, deadline=None)
@given(network=child_networks(max_numel=400, max_size=60), encoding=st.sampled_from(ENCODINGS),
       delta=st.sampled_from([-2, -1, 1, 3]))
def test_wrong_declared_size_is_rejected(network, encoding, delta):
    numel, positions = network
    size = positions.numel()
    if encoding not in valid_encodings(positions, numel) or size + delta < 0:
        return
    encoded = encode_positions(positions, numel, encoding)
    with pytest.raises(AdapterFormatError):
        decode_positions(encoded, numel, size + delta, encoding, "t", encoded.numel())


@pytest.mark.parametrize(
    "encoded, encoding, size",
    [
        (torch.zeros(2, dtype=torch.int8), "bitmap", 3),  # signed bytes
        (torch.zeros(3, dtype=torch.uint8), "bitmap", 0),  # one byte too many for 16 entries
        (torch.arange(3, dtype=torch.int64), "int32", 3),  # 64-bit positions
        (torch.arange(3, dtype=torch.float32), "int32", 3),
        (torch.arange(3, dtype=torch.int32).view(3, 1), "int32", 3),  # not 1-D
        (torch.ones(3, dtype=torch.int16), "gap16", 3),  # signed gaps
        (torch.ones(3, dtype=torch.uint16), "gap16", 4),  # shorter than the child
        (torch.ones(3, dtype=torch.uint16), "delta8", 3),  # unknown encoding
    ],
)
def test_decode_rejects_wrong_dtype_shape_or_encoding(encoded, encoding, size):
    with pytest.raises(AdapterFormatError, match="t:"):
        decode_positions(encoded, 16, size, encoding, "t")


@pytest.mark.parametrize(
    "values, encoding, message",
    [
        ([3, 9, 16], "int32", "out of range"),
        ([-1, 3, 9], "int32", "out of range"),
        ([3, 9, 5], "int32", "not sorted"),
        ([3, 9, 9], "int32", "not sorted"),
        ([4, 0, 2], "gap16", "duplicated"),
        ([4, 3, 20], "gap16", "out of range"),
    ],
)
def test_decode_rejects_bad_positions(values, encoding, message):
    encoded = torch.tensor(values, dtype=ENCODED_DTYPES[encoding])
    with pytest.raises(AdapterFormatError, match=message):
        decode_positions(encoded, 16, 3, encoding, "t")


VALID_GAP16X = [1, 70_000 - GAP16_MAX, 1, 1, 0, 1, 1]  # [0, 70_000, 70_001, 70_002]


@pytest.mark.parametrize(
    "words, numel, recorded, message",
    [
        (VALID_GAP16X, 400_000, None, "records None"),  # no length recorded
        (VALID_GAP16X, 400_000, 10, "uint16\\[10\\]"),  # the config's length is not the stream's
        (VALID_GAP16X, 100_000, 10, "4 to 7 words"),  # a length no child of 4 in 100,000 entries can need
        (VALID_GAP16X, 400_000, 3, "4 to 16 words"),  # shorter than one word per position
        ([1, 0, 1, 1, 0, 1, 1], 400_000, 7, "duplicated"),  # a zero gap
        ([1, 4465, 1, 1, 0, 1], 400_000, 6, "truncated escape"),  # a wide gap's triple cut short
        ([1, 4465, 1, 1, 0, 1, 0], 400_000, 7, "count 0"),  # a zero wide gap
        ([1, 4465, 1, 1, 0, 4, 1], 400_000, 7, "beyond"),  # a wide gap past the last gap
        ([1, 4465, 1, 1, 0, 1, 1, 0, 1, 1], 400_000, 10, "twice"),  # one gap made wide twice
        ([1, 4465, 1, 1, 0, 2, 1, 0, 1, 1], 400_000, 10, "out of order"),  # wide gaps unsorted
        ([1, 4465, 1, 1, 0, 1, 2], 135_000, 7, "out of range"),  # a count carrying it past the end
        (VALID_GAP16X, 70_002, 7, "out of range"),  # the last position is the tensor's size
    ],
)
def test_decode_rejects_bad_gap16x_streams(words, numel, recorded, message):
    encoded = torch.tensor(words, dtype=torch.int32).to(torch.uint16)
    with pytest.raises(AdapterFormatError, match=message) as caught:
        decode_positions(encoded, numel, 4, "gap16x", "the.tensor", recorded)
    assert str(caught.value).startswith("the.tensor: ")


def test_decode_rejects_bitmap_padding_bits_and_wrong_popcount():
    encoded = encode_positions(torch.tensor([1, 5, 9]), 12, "bitmap")
    assert decode_positions(encoded, 12, 3, "bitmap", "t").tolist() == [1, 5, 9]
    padded = encoded.clone()
    padded[1] |= 0b10000000  # entry 15 of a tensor of 12
    with pytest.raises(AdapterFormatError, match="beyond"):
        decode_positions(padded, 12, 3, "bitmap", "t")
    with pytest.raises(AdapterFormatError, match="marks 3 entries"):
        decode_positions(encoded, 12, 4, "bitmap", "t")


# ------------------------------------------------------------------------------------------------ 4. fingerprint
def test_fingerprint_matches_same_weights_in_any_dtype_and_rejects_others():
    first, other = tiny_bert(seed=0), tiny_bert(seed=1)
    recorded = base_fingerprint(first)
    assert recorded["version"] == 2 and recorded["architecture"]["model_class"] == "BertForSequenceClassification"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert fingerprint_mismatch(recorded, copy.deepcopy(first).to(dtype), "default") is None, dtype
        assert "hold other values" in fingerprint_mismatch(recorded, copy.deepcopy(other).to(dtype), "default")
    # tuned in bf16, loaded in fp16 (and the other way round): the same checkpoint
    recorded_bf16 = base_fingerprint(copy.deepcopy(first).to(torch.bfloat16))
    assert fingerprint_mismatch(recorded_bf16, copy.deepcopy(first).to(torch.float16), "default") is None
    recorded_fp16 = base_fingerprint(copy.deepcopy(first).to(torch.float16))
    assert fingerprint_mismatch(recorded_fp16, copy.deepcopy(first).to(torch.bfloat16), "default") is None
    # an untuned tensor the outputs depend on (a LayerNorm, an embedding row) is part of it
    changed = copy.deepcopy(first)
    with torch.no_grad():
        changed.bert.embeddings.LayerNorm.weight.mul_(1.1)
    assert "LayerNorm" in fingerprint_mismatch(recorded, changed, "default")
    # and so are the architecture fields that change the computation, and the model class (its head)
    gelu_new = copy.deepcopy(first)
    gelu_new.config.hidden_act = "gelu_new"
    assert "hidden_act" in fingerprint_mismatch(recorded, gelu_new, "default")
    from transformers import BertModel

    bare = BertModel(first.config)
    bare.load_state_dict({k.removeprefix("bert."): v for k, v in first.state_dict().items()}, strict=False)
    assert "model_class" in fingerprint_mismatch(recorded, bare, "default")


# ------------------------------------------------------------------------------------------------ 5. bad files
TKEY = "bert.encoder.layer.0.output.dense.weight"  # 64 x 32 entries; a bitmap at reserve_p 0.3
TNUMEL = 64 * 32
FV, FP = file_key(TKEY, VALUES), file_key(TKEY, POSITIONS)
HEAD = f"{SAVED_PREFIX}classifier.weight"


def reencode(sd: dict, cfg: dict, encoding: str, key: str = TKEY, numel: int = TNUMEL) -> torch.Tensor:
    """Re-encode one tensor's positions (tensor and config together): a valid file in another encoding."""
    positions_key = file_key(key, POSITIONS)
    lengths = cfg.get("child_encoded_lengths") or {}
    positions = decode_positions(
        sd[positions_key], numel, cfg["child_sizes"][key], cfg["child_encodings"][key], key, lengths.get(key)
    )
    sd[positions_key] = encode_positions(positions, numel, encoding)
    cfg["child_encodings"][key] = encoding
    lengths = {name: length for name, length in lengths.items() if name != key}
    if encoding == "gap16x":
        lengths[key] = sd[positions_key].numel()
    cfg["child_encoded_lengths"] = lengths or None
    return sd[positions_key]


def _set(sd, key, index, value):
    tensor = sd[key].clone()
    tensor[index] = value
    sd[key] = tensor


def _flip_first_free_bit(sd, cfg):
    bits = sd[FP].clone()
    byte = int((bits != 255).nonzero()[0])
    free = next(bit for bit in range(8) if not bits[byte] & (1 << bit))
    bits[byte] |= 1 << free
    sd[FP] = bits


def _clear_first_set_bit(sd, cfg):
    bits = sd[FP].clone()
    byte = int(bits.nonzero()[0])
    bits[byte] &= bits[byte] - 1
    sd[FP] = bits


def _int32(mutate):
    def apply(sd, cfg):
        encoded = reencode(sd, cfg, "int32").clone()
        mutate(encoded)
        sd[FP] = encoded
    return apply


def _gap16(mutate):
    def apply(sd, cfg):
        encoded = reencode(sd, cfg, "gap16").clone()
        mutate(encoded)
        sd[FP] = encoded
    return apply


def _unsort(p):
    p[1], p[2] = p[2].clone(), p[1].clone()


def _raw_position_bit_flip(data: bytearray, header: dict, header_bytes: int) -> None:
    start = header_bytes + header[FP]["data_offsets"][0]
    data[start] ^= 0b00010000


def _raw_value_nan(data: bytearray, header: dict, header_bytes: int) -> None:
    start = header_bytes + header[FV]["data_offsets"][0]
    data[start:start + 4] = struct.pack("<f", float("nan"))


def _raw_header_garbage(data: bytearray, header: dict, header_bytes: int) -> None:
    data[8:40] = b"\xff" * 32


def _raw_header_length(data: bytearray, header: dict, header_bytes: int) -> None:
    data[:8] = struct.pack("<Q", 1 << 40)


@dataclass(frozen=True)
class BadFile:
    name: str
    tensors: Optional[Callable[[dict, dict], None]] = None  # edits (state dict, config dict)
    raw: Optional[Callable[[bytearray, dict, int], None]] = None  # edits the file's bytes
    truncate: Optional[int] = None  # keep this many bytes (negative: drop that many)
    error: type = AdapterFormatError
    match: Optional[str] = None
    names_tensor: bool = True  # the message names the tensor at fault
    source: str = "d"


BAD_FILES = [
    # truncated / corrupted bytes
    BadFile("truncated_half", truncate=-1, error=Exception, names_tensor=False),
    BadFile("truncated_in_header", truncate=20, error=Exception, names_tensor=False),
    BadFile("empty_file", truncate=0, error=Exception, names_tensor=False),
    BadFile("header_garbage", raw=_raw_header_garbage, error=Exception, names_tensor=False),
    BadFile("header_length_huge", raw=_raw_header_length, error=Exception, names_tensor=False),
    BadFile("position_byte_bit_flip", raw=_raw_position_bit_flip, match="checksum"),
    BadFile("value_bytes_nan", raw=_raw_value_nan, match="checksum"),
    # wrong dtypes
    BadFile("values_int32", lambda sd, cfg: sd.update({FV: sd[FV].to(torch.int32)}), match="floating point"),
    BadFile("bitmap_as_int8", lambda sd, cfg: sd.update({FP: sd[FP].view(torch.int8)})),
    BadFile("int32_positions_as_int64", lambda sd, cfg: sd.update({FP: reencode(sd, cfg, "int32").to(torch.int64)})),
    BadFile("gap16_as_int16", lambda sd, cfg: sd.update({FP: reencode(sd, cfg, "gap16").view(torch.int16)})),
    # positions out of range / unsorted / duplicated
    BadFile("int32_out_of_range", _int32(lambda p: p.__setitem__(-1, TNUMEL)), match="out of range"),
    BadFile("int32_far_out_of_range", _int32(lambda p: p.__setitem__(-1, 2**31 - 1)), match="out of range"),
    BadFile("int32_negative", _int32(lambda p: p.__setitem__(0, -1)), match="out of range"),
    BadFile("int32_unsorted", _int32(_unsort), match="not sorted"),
    BadFile("int32_duplicated", _int32(lambda p: p.__setitem__(2, p[1].clone())), match="not sorted|duplicated"),
    BadFile("gap16_zero_gap", _gap16(lambda g: g.__setitem__(5, 0)), match="duplicated"),
    BadFile("gap16_past_the_end", _gap16(lambda g: g.__setitem__(-1, GAP16_MAX)), match="out of range"),
    # bitmap popcount
    BadFile("bitmap_extra_bit", _flip_first_free_bit, match="bitmap marks"),
    BadFile("bitmap_missing_bit", _clear_first_set_bit, match="bitmap marks"),
    # shapes
    BadFile("bitmap_one_byte_longer", lambda sd, cfg: sd.update({FP: torch.cat([sd[FP], sd[FP][:1]])})),
    BadFile("values_one_more", lambda sd, cfg: sd.update({FV: torch.cat([sd[FV], sd[FV][:1]])})),
    BadFile("values_one_fewer", lambda sd, cfg: sd.update({FV: sd[FV][:-1].clone()})),
    BadFile("values_2d", lambda sd, cfg: sd.update({FV: sd[FV].reshape(-1, 1).clone()})),
    BadFile("module_to_save_wrong_shape", lambda sd, cfg: sd.update({HEAD: torch.zeros(3, 32)}), error=Exception,
            names_tensor=False),
    # NaN / inf
    BadFile("value_nan", lambda sd, cfg: _set(sd, FV, 3, float("nan")), match="NaN or inf"),
    BadFile("value_inf", lambda sd, cfg: _set(sd, FV, 0, float("inf")), match="NaN or inf"),
    BadFile("value_neg_inf", lambda sd, cfg: _set(sd, FV, -1, float("-inf")), match="NaN or inf"),
    BadFile("module_to_save_nan", lambda sd, cfg: _set(sd, HEAD, (0, 0), float("nan")), error=Exception,
            match="(?i)nan|inf|finite", names_tensor=False),
    # config disagreeing with the tensors
    BadFile("config_size_plus_one", lambda sd, cfg: cfg["child_sizes"].__setitem__(TKEY, cfg["child_sizes"][TKEY] + 1)),
    BadFile("config_size_minus_one",
            lambda sd, cfg: cfg["child_sizes"].__setitem__(TKEY, cfg["child_sizes"][TKEY] - 1)),
    BadFile("config_size_missing", lambda sd, cfg: cfg["child_sizes"].pop(TKEY)),
    BadFile("config_encoding_disagrees", lambda sd, cfg: cfg["child_encodings"].__setitem__(TKEY, "int32")),
    BadFile("config_mode_f_for_a_d_file", lambda sd, cfg: cfg.update(mode="f"), names_tensor=False),
    BadFile("config_mode_d_for_an_f_file",
            lambda sd, cfg: cfg.update(mode="d", child_sizes={key[len(SAVED_PREFIX):].replace(VALUES, "weight"): 5
                                                              for key in sd if key.endswith(VALUES)}),
            names_tensor=False, source="f"),
    # missing tensors
    BadFile("missing_values", lambda sd, cfg: sd.pop(FV), match="no tensor"),
    BadFile("missing_positions", lambda sd, cfg: sd.pop(FP), match="no tensor"),
    BadFile("missing_module_to_save", lambda sd, cfg: sd.pop(HEAD), error=Exception, match="classifier",
            names_tensor=False),
]
BAD_BY_NAME = {bad.name: bad for bad in BAD_FILES}


def craft(bert_dirs, bad: BadFile, out_dir: str) -> str:
    shutil.copytree(bert_dirs[bad.source], out_dir)
    weights = os.path.join(out_dir, "adapter_model.safetensors")
    config_path = os.path.join(out_dir, "adapter_config.json")
    if bad.tensors is not None:
        sd = load_file(weights)
        with open(config_path) as handle:
            cfg = json.load(handle)
        bad.tensors(sd, cfg)
        save_with_checksums(sd, weights, metadata={"format": "pt"})  # a consistent file: the checks must catch it
        with open(config_path, "w") as handle:
            json.dump(cfg, handle)
    if bad.raw is not None or bad.truncate is not None:
        with open(weights, "rb") as handle:
            data = bytearray(handle.read())
        if bad.raw is not None:
            header, header_bytes = safetensors_layout(weights)
            bad.raw(data, header, header_bytes)
        if bad.truncate is not None:
            data = data[: (len(data) // 2 if bad.truncate == -1 else bad.truncate)]
        with open(weights, "wb") as handle:
            handle.write(bytes(data))
    return out_dir


def check_error(bad: BadFile, error: BaseException) -> None:
    message = str(error)
    assert message.strip(), f"{bad.name}: an error without a message"
    if bad.match is not None:
        assert re.search(bad.match, message), f"{bad.name}: unclear message {message!r}"
    if bad.names_tensor:
        assert "layer.0.output.dense" in message, f"{bad.name}: the message does not name the tensor: {message!r}"


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_reencoded_file_is_a_valid_control(bert_dirs, tmp_path, encoding):
    """The crafting itself is sound: a file re-encoded (tensor + config) loads and gives the same outputs."""
    control = BadFile(f"control_{encoding}", lambda sd, cfg: reencode(sd, cfg, encoding))
    path = craft(bert_dirs, control, str(tmp_path / "control"))
    loaded = PeftModel.from_pretrained(load_base(bert_dirs["base"]), path)
    with torch.no_grad():
        assert torch.equal(loaded(**bert_dirs["batch"]).logits, bert_dirs["expected"])


@pytest.mark.parametrize("bad", BAD_FILES, ids=[bad.name for bad in BAD_FILES])
def test_bad_file_clear_error_and_base_untouched(bert_dirs, tmp_path, bad):
    path = craft(bert_dirs, bad, str(tmp_path / bad.name))
    base = load_base(bert_dirs["base"])
    saved = snapshot(base)
    with pytest.raises(bad.error) as caught:
        PeftModel.from_pretrained(base, path)
    check_error(bad, caught.value)
    assert_untouched(saved)


SUBSET = ["value_bytes_nan", "values_int32", "int32_unsorted", "gap16_zero_gap", "bitmap_extra_bit",
          "values_one_more", "config_size_plus_one", "missing_values", "missing_positions"]


@pytest.mark.parametrize("name", SUBSET)
def test_bad_file_low_cpu_mem_usage(bert_dirs, tmp_path, name):
    bad = BAD_BY_NAME[name]
    path = craft(bert_dirs, bad, str(tmp_path / name))
    base = load_base(bert_dirs["base"])
    saved = snapshot(base)
    with pytest.raises(bad.error) as caught:
        PeftModel.from_pretrained(base, path, low_cpu_mem_usage=True)
    check_error(bad, caught.value)
    assert_untouched(saved)


@pytest.mark.parametrize("name", SUBSET + ["module_to_save_wrong_shape"])
def test_bad_file_via_load_adapter_leaves_the_loaded_adapter_intact(bert_dirs, tmp_path, name):
    bad = BAD_BY_NAME[name]
    path = craft(bert_dirs, bad, str(tmp_path / name))
    model = PeftModel.from_pretrained(load_base(bert_dirs["base"]), bert_dirs["d"])  # merged at load
    saved = snapshot(model)
    with pytest.raises(bad.error) as caught:
        model.load_adapter(path, adapter_name="bad")
    check_error(bad, caught.value)
    assert_untouched(saved)
    with torch.no_grad():
        assert torch.equal(model(**bert_dirs["batch"]).logits, bert_dirs["expected"])


# transformers' loader casts every tensor to the dtype of the model's placeholder before any code of ours runs, so
# integer-typed child values arrive as floats there: that one case is only caught by peft's loaders (README, limits).
TRANSFORMERS_PATH_SUBSET = [name for name in SUBSET if name != "values_int32"]


@pytest.mark.parametrize("name", TRANSFORMERS_PATH_SUBSET)
def test_bad_file_via_transformers_load_adapter(bert_dirs, tmp_path, name):
    """transformers' PreTrainedModel.load_adapter loads the tensors itself: a bad file must still give an
    AdapterFormatError (at load, or at the latest at the first forward), never a model with wrong outputs."""
    bad = BAD_BY_NAME[name]
    path = craft(bert_dirs, bad, str(tmp_path / name))
    base = load_base(bert_dirs["base"])
    saved = snapshot(base)
    try:
        base.load_adapter(path)
    except AdapterFormatError as error:
        assert "layer.0.output.dense" in str(error), str(error)
    except Exception as error:  # noqa: BLE001 - transformers' own loading error (e.g. a size mismatch) is fine
        assert str(error).strip()
    else:
        try:
            with torch.no_grad():
                outputs = base(**bert_dirs["batch"]).logits
        except AdapterFormatError as error:  # rejected at the first forward: late, but never a wrong model
            assert "layer.0.output.dense" in str(error), str(error)
        else:
            pytest.fail(f"{name}: transformers' load_adapter accepted a bad file without any error; the model runs "
                        f"and returns {outputs[0].tolist()} (trained adapter: {bert_dirs['expected'][0].tolist()})")
    assert_untouched(saved)


@pytest.mark.parametrize("name", ["value_nan", "missing_positions"])
@pytest.mark.parametrize("source", ["d", "gap16_only"])
def test_rejected_file_leaves_the_base_model_working(bert_dirs, tmp_path, name, source):
    """After PeftModel.from_pretrained(base, bad_dir) fails, `base` must still compute what it computed before
    (the docstring of sparse_format: "a corrupted file gives an AdapterFormatError, never a wrong model")."""
    if source == "gap16_only":  # child networks stored as 16-bit gaps: the placeholders decode without an error
        src = str(tmp_path / "gap16_src")
        train_adapter(load_base(bert_dirs["base"]), src, reserve_p=0.02, target_modules=["intermediate.dense"])
        bert_dirs = {**bert_dirs, "gap16_only": src}
        with open(os.path.join(src, "adapter_config.json")) as handle:
            encodings = json.load(handle)["child_encodings"]
        assert set(encodings.values()) == {"gap16"}, encodings
        key = "bert.encoder.layer.1.intermediate.dense.weight"
        fv = file_key(key, VALUES)
        bad = BadFile(name, {
            "value_nan": lambda sd, cfg: _set(sd, fv, 0, float("nan")),
            "values_one_more": lambda sd, cfg: sd.update({fv: torch.cat([sd[fv], sd[fv][:1]])}),
            "missing_positions": lambda sd, cfg: sd.pop(file_key(key, POSITIONS)),
            "config_encoding_disagrees": lambda sd, cfg: cfg["child_encodings"].__setitem__(key, "int32"),
        }[name], source="gap16_only")
    else:
        bad = BAD_BY_NAME[name]
    path = craft(bert_dirs, bad, str(tmp_path / name))
    base = load_base(bert_dirs["base"])
    with torch.no_grad():
        before = base(**bert_dirs["batch"]).logits
    with pytest.raises(AdapterFormatError):
        PeftModel.from_pretrained(base, path)
    try:
        with torch.no_grad():
            after = base(**bert_dirs["batch"]).logits
    except Exception as error:  # noqa: BLE001
        pytest.fail(f"the base model no longer runs after a rejected adapter file: {type(error).__name__}: {error}")
    assert torch.equal(after, before), (
        f"the base model computes different outputs after a rejected adapter file "
        f"(max diff {(after - before).abs().max().item():.3g})"
    )


# ------------------------------------------------------------------------------------------------ 6. wide gaps
WKEY = WIDE_GAP_KEY
WNUMEL = WIDE_INTERMEDIATE * 32
WV, WP = file_key(WKEY, VALUES), file_key(WKEY, POSITIONS)
WSIZE, WWORDS = 256, 256 + 3 * 3  # wide_gap_positions: 256 entries, three wide gaps (a triple each)


def wide_adapter(base: torch.nn.Module, encoding: Optional[str] = None, out_dir: Optional[str] = None):
    """A Fisher mode-"d" adapter of the wide BERT (reserve_p 0.01) whose WKEY child is then `wide_gap_positions`,
    in `encoding` (the smallest, gap16x, by default), trained three AdamW steps."""
    torch.manual_seed(0)
    model = peft_model(base, mode="d", reserve_p=0.01, seed=3, task_type="SEQ_CLS")
    model.detect_child_network(BERT.batches(2, seed=20), progress=False)
    give_wide_gaps(model, encoding)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    train_steps(model, optimizer, BERT.batches(3, seed=21))
    model.eval()
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="module")
def wide_dirs(bert_dirs):
    """The wide BERT saved to disk, and the adapter with a few wide gaps (gap16x) and its int32 twin."""
    root = bert_dirs["root"]
    base_dir = str(root / "wide_base")
    wide_bert(seed=0).save_pretrained(base_dir)
    dirs = {"base": base_dir, "gap16x": str(root / "wide_gap16x"), "int32": str(root / "wide_int32")}
    expected = {}
    for encoding in ("gap16x", "int32"):
        model = wide_adapter(load_base(base_dir), None if encoding == "gap16x" else encoding, dirs[encoding])
        with torch.no_grad():
            expected[encoding] = model(**bert_dirs["batch"]).logits
    assert torch.equal(expected["gap16x"], expected["int32"])
    return {**dirs, "batch": bert_dirs["batch"], "expected": expected["gap16x"]}


def test_wide_gaps_cost_words_not_the_whole_tensor(wide_dirs):
    """A tensor whose child has three gaps over 16 bits is stored as 16-bit gaps and three triples: about half its
    int32 size (before, one wide gap turned the whole tensor into int32), and the file smaller by as much."""
    with open(os.path.join(wide_dirs["gap16x"], "adapter_config.json")) as handle:
        config = json.load(handle)
    positions = wide_gap_positions()
    size = positions.numel()
    assert size == WSIZE and config["child_encodings"][WKEY] == "gap16x"
    assert config["child_encoded_lengths"] == {WKEY: WWORDS}  # only the variable-length encoding records one
    saved = load_file(os.path.join(wide_dirs["gap16x"], "adapter_model.safetensors"))
    twin = load_file(os.path.join(wide_dirs["int32"], "adapter_model.safetensors"))
    assert saved[WP].dtype == torch.uint16 and saved[WP].numel() == WWORDS == gap16x_length(positions)
    gap16x_bytes, int32_bytes = 2 * WWORDS, 4 * size
    assert twin[WP].numel() * 4 == int32_bytes and gap16x_bytes < int32_bytes < (WNUMEL + 7) // 8
    sizes = {name: os.path.getsize(os.path.join(wide_dirs[name], "adapter_model.safetensors"))
             for name in ("gap16x", "int32")}
    # the same tensors otherwise; the header's dtype names and checksums differ by a few bytes at most
    assert abs((sizes["int32"] - sizes["gap16x"]) - (int32_bytes - gap16x_bytes)) <= 16, sizes
    print(f"\n[gap16x] {size} child entries in {WNUMEL} with 3 wide gaps: positions {gap16x_bytes} B as gap16x, "
          f"{int32_bytes} B as int32, {(WNUMEL + 7) // 8} B as a bitmap; files {sizes['gap16x']} / {sizes['int32']} B")


@pytest.mark.parametrize("loader", ["from_pretrained", "low_cpu_mem_usage", "load_adapter", "transformers"])
def test_wide_gaps_load_bit_identically_with_every_loader(wide_dirs, loader):
    base = load_base(wide_dirs["base"])
    if loader == "from_pretrained":
        model = PeftModel.from_pretrained(base, wide_dirs["gap16x"])
    elif loader == "low_cpu_mem_usage":
        model = PeftModel.from_pretrained(base, wide_dirs["gap16x"], low_cpu_mem_usage=True)
    elif loader == "load_adapter":  # beside an adapter already loaded and merged, then switched to
        model = PeftModel.from_pretrained(base, wide_dirs["int32"])
        model.load_adapter(wide_dirs["gap16x"], adapter_name="wide")
        model.set_adapter("wide")
    else:
        base.load_adapter(wide_dirs["gap16x"])
        model = base
    with torch.no_grad():
        assert torch.equal(model(**wide_dirs["batch"]).logits, wide_dirs["expected"])
    layer = next(layer for layer in child_layers(model).values() if layer.tensor_key("weight") == WKEY)
    adapter = "wide" if loader == "load_adapter" else "default"
    assert torch.equal(positions_of(layer, adapter).long(), wide_gap_positions())


def test_an_adapter_awaiting_its_fisher_pass_adopts_a_gap16x_checkpoint(wide_dirs, tmp_path):
    """A Trainer resuming loads its checkpoint into an adapter without a child network: the stream is adopted as it
    is (told from gap16 by its length), its length recorded, and the adapter saves the same file again."""
    model = peft_model(load_base(wide_dirs["base"]), mode="d", reserve_p=0.01, seed=3, task_type="SEQ_CLS")
    model.load_adapter(wide_dirs["gap16x"], adapter_name="default", is_trainable=True)
    config = model.peft_config["default"]
    assert config.child_encodings[WKEY] == "gap16x" and config.child_encoded_lengths == {WKEY: WWORDS}
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**wide_dirs["batch"]).logits, wide_dirs["expected"])
    model.save_pretrained(str(tmp_path))
    assert load_file(os.path.join(tmp_path, "adapter_model.safetensors"))[WP].tolist() == load_file(
        os.path.join(wide_dirs["gap16x"], "adapter_model.safetensors"))[WP].tolist()


def test_wide_gaps_train_exactly_as_int32_positions(wide_dirs):
    """Forward and backward with gap16x positions (expanded from the stream the layer holds, nothing else) are those
    with int32 positions: the same values and outputs, bit for bit, after training."""
    models = {encoding: wide_adapter(load_base(wide_dirs["base"]), encoding) for encoding in ("gap16x", "int32")}
    layers = {name: next(layer for layer in child_layers(model).values() if layer.tensor_key("weight") == WKEY)
              for name, model in models.items()}
    assert layers["gap16x"].childtuning_spec["default"].encodings["weight"] == "gap16x"
    # what the layer holds for training forwards is the encoded stream itself: about 2 bytes per child entry
    held = layers["gap16x"]._held_positions("default", "weight")
    assert held is layers["gap16x"].childtuning_positions["default"] and held.dtype == torch.uint16
    trained = {name: trainable_parameters(model) for name, model in models.items()}
    assert len(trained["gap16x"]) == len(trained["int32"])
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(trained["gap16x"], trained["int32"]))
    with torch.no_grad():
        assert torch.equal(models["gap16x"](**wide_dirs["batch"]).logits, models["int32"](**wide_dirs["batch"]).logits)


def _wide_stream(edit: Callable[[torch.Tensor], torch.Tensor], record: bool = False):
    """Edit WKEY's gap16x stream; `record`: and its length in the config, so that only the stream's own checks
    can catch it."""
    def apply(sd, cfg):
        sd[WP] = edit(sd[WP].to(torch.int32)).to(torch.uint16)
        if record:
            cfg["child_encoded_lengths"][WKEY] = sd[WP].numel()
    return apply


def _wide_lengths(edit: Callable[[dict], None]):
    def apply(sd, cfg):
        edit(cfg.setdefault("child_encoded_lengths", {}) if cfg.get("child_encoded_lengths") is not None else cfg)
    return apply


def _triple(index: int, count: int) -> torch.Tensor:
    return torch.tensor([index >> 16, index & GAP16_MAX, count], dtype=torch.int32)


WIDE_BAD_FILES = [
    BadFile("stream_wide_remainder_zeroed", _wide_stream(lambda s: s.index_fill(0, torch.tensor([64]), 0)),
            match="duplicated"),
    BadFile("stream_wide_gap_dropped", _wide_stream(lambda s: s[:-3]), match="child_encoded_lengths records"),
    BadFile("stream_wide_gap_added", _wide_stream(lambda s: torch.cat([s, _triple(5, 1)])),
            match="child_encoded_lengths records"),
    BadFile("stream_truncated_escape", _wide_stream(lambda s: s[:-1], record=True), match="truncated escape"),
    BadFile("stream_zero_wide_gap", _wide_stream(lambda s: s.index_fill(0, torch.tensor([s.numel() - 1]), 0)),
            match="count 0"),
    BadFile("stream_wide_gaps_unsorted", _wide_stream(lambda s: torch.cat([s[:WSIZE], s[WSIZE + 3:], s[WSIZE:][:3]])),
            match="out of order"),
    BadFile("stream_wide_gap_beyond", _wide_stream(lambda s: torch.cat([s[:-3], _triple(WSIZE, 1)])),
            match="beyond"),
    BadFile("stream_past_the_end", _wide_stream(lambda s: s.index_fill(0, torch.tensor([WSIZE - 1]), GAP16_MAX)),
            match="out of range"),
    BadFile("stream_longer_than_any_child", _wide_stream(lambda s: torch.cat([s, _triple(7, 1)]), record=True),
            match=f"{WSIZE} to {WWORDS} words"),
    BadFile("config_length_plus_one", _wide_lengths(lambda lengths: lengths.__setitem__(WKEY, lengths[WKEY] + 1)),
            match="child_encoded_lengths records"),
    BadFile("config_length_minus_one", _wide_lengths(lambda lengths: lengths.__setitem__(WKEY, lengths[WKEY] - 1)),
            match="child_encoded_lengths records"),
    BadFile("config_length_huge", _wide_lengths(lambda lengths: lengths.__setitem__(WKEY, 10**12)),
            match="child_encoded_lengths records"),
    BadFile("config_length_missing", _wide_lengths(lambda lengths: lengths.pop(WKEY)), names_tensor=False,
            match="child_encoded_lengths"),
    BadFile("config_encoding_int32", lambda sd, cfg: cfg["child_encodings"].__setitem__(WKEY, "int32"),
            names_tensor=False, match="child_encoded_lengths"),
    BadFile("stream_as_int16", lambda sd, cfg: sd.update({WP: sd[WP].view(torch.int16)})),
]
WIDE_BAD_BY_NAME = {bad.name: bad for bad in WIDE_BAD_FILES}


def check_wide_error(bad: BadFile, error: BaseException) -> None:
    message = str(error)
    assert isinstance(error, AdapterFormatError) and "(the model was left unchanged)" in message, message
    if bad.match is not None:
        assert re.search(bad.match, message), f"{bad.name}: unclear message {message!r}"
    if bad.names_tensor:
        assert WKEY.removesuffix(".weight") in message, f"{bad.name}: the message does not name the tensor: {message!r}"


@pytest.mark.parametrize("bad", WIDE_BAD_FILES, ids=[bad.name for bad in WIDE_BAD_FILES])
def test_bad_wide_gap_file_refused_and_base_untouched(wide_dirs, tmp_path, bad):
    path = craft({"d": wide_dirs["gap16x"]}, bad, str(tmp_path / bad.name))
    base = load_base(wide_dirs["base"])
    saved = snapshot(base)
    with pytest.raises(AdapterFormatError) as caught:
        PeftModel.from_pretrained(base, path)
    check_wide_error(bad, caught.value)
    assert_untouched(saved)


@pytest.mark.parametrize("name", ["stream_wide_remainder_zeroed", "stream_wide_gap_dropped", "config_length_plus_one"])
@pytest.mark.parametrize("loader", ["low_cpu_mem_usage", "load_adapter", "transformers"])
def test_bad_wide_gap_file_refused_by_every_loader(wide_dirs, tmp_path, name, loader):
    bad = WIDE_BAD_BY_NAME[name]
    path = craft({"d": wide_dirs["gap16x"]}, bad, str(tmp_path / name))
    if loader == "load_adapter":
        model = PeftModel.from_pretrained(load_base(wide_dirs["base"]), wide_dirs["gap16x"])  # merged at load
    else:
        model = load_base(wide_dirs["base"])
    saved = snapshot(model)
    with pytest.raises(AdapterFormatError) as caught:
        if loader == "low_cpu_mem_usage":
            PeftModel.from_pretrained(model, path, low_cpu_mem_usage=True)
        elif loader == "load_adapter":
            model.load_adapter(path, adapter_name="bad")
        else:
            model.load_adapter(path)
    check_wide_error(bad, caught.value)
    assert_untouched(saved)
    if loader == "load_adapter":
        with torch.no_grad():
            assert torch.equal(model(**wide_dirs["batch"]).logits, wide_dirs["expected"])
