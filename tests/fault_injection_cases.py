"""Fault injection for saved Child-Tuning adapters: the mutations, the loaders, and the contract they are held to.

Shared by `tests/test_fault_injection.py` (hypothesis, in CI) and `scripts/fault_injection.py` (long runs).

The contract ("a failed load changes nothing"): whatever is wrong with an adapter directory, every loader either

(a) loads exactly the adapter that was saved: the loaded model's outputs are bit-identical (fp32) to the trained
    model's, or
(b) raises `peft_childtuning.sparse_format.AdapterFormatError` whose message names the file by its path (the adapter
    directory's path, or a file path inside it: a bare "adapter_config.json" does not say which of several checkpoints
    was bad), chained (``__cause__``) to the original exception where there was one, and the user's model
    is afterwards exactly what it was (`model_state.ModelState`: module tree, state-dict keys and values, every
    parameter and buffer, ``peft_config``, merged / active adapters of every tuner layer, requires_grad and training
    flags) and still computes the same outputs.

A case = a source (a real saved adapter), a loader, and 1-3 mutations applied in order of their stage (config,
tensors, safetensors header, raw bytes, files). Mutations are drawn through a `Draw` (hypothesis or `random.Random`),
and applied while they are drawn, so later draws can depend on the file as it is then (its length, its tensors).
Where tensors are rewritten and the package stores checksums in the safetensors metadata, the case also draws what
happens to them (`SIGNINGS`: kept stale, dropped, or recomputed), so that both the checksums and the checks of the
contents behind them are exercised.

Outcome (a) is judged on a probe batch: bit-identical logits. A mutation that leaves a self-consistent, valid adapter
would be indistinguishable from one saved that way; the generator avoids producing those (see `SIGNINGS`).
"""

from __future__ import annotations

import builtins
import copy
import io
import json
import math
import os
import pickle
import random
import shutil
import string
import struct
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
for _path in (TESTS_DIR, REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
from safetensors.torch import load as safetensors_load  # noqa: E402
from safetensors.torch import save as safetensors_save  # noqa: E402

import conftest  # noqa: E402  (tiny models; also imports peft_childtuning, which registers the tuner)
from model_state import ModelState  # noqa: E402
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftModel  # noqa: E402
from peft_childtuning.sparse_format import AdapterFormatError  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PICKLE = "adapter_model.bin"
ADAPTER_FILES = (CONFIG, WEIGHTS, PICKLE)
PREFIX = "base_model.model."
VALUES, POSITIONS = "childtuning_values", "childtuning_positions"
PICKLE_FLAG = "_childtuning_fault_injection_pickle_ran"
ARCHS = {**conftest.ARCHS, conftest.WIDE_BERT.name: conftest.WIDE_BERT}
# source -> (reserve_p, an edit of the child network its Fisher pass chose); the others: (0.3, None). The wide BERT's
# gets a few gaps too wide for 16 bits in one tensor, stored as gap16x.
SOURCE_SETTINGS = {"bertwide_d": (0.01, conftest.give_wide_gaps)}


# ================================================================================================ sources
@dataclass
class Source:
    """A real saved adapter, with everything a case needs to check a load of (a mutation of) it."""

    name: str
    arch: str  # "bert" / "gpt2" / "bertwide"
    mode: str
    base_dir: str
    adapter_dir: str  # trained 2 steps: the adapter every mutation starts from
    step1_dir: str  # the same run after 1 step: the adapter loaded before, in the eval-loop loader
    host_dir: str  # another adapter of the same base (merged for inference before load_adapter(..., "new"))
    batch: dict[str, torch.Tensor]
    trained_out: torch.Tensor  # the trained model's outputs: outcome (a) must reproduce them bit for bit
    config: dict[str, Any]  # adapter_config.json, parsed
    weights_bytes: bytes  # adapter_model.safetensors as saved
    tensors: dict[str, torch.Tensor]  # its tensors
    metadata: Optional[dict[str, str]]  # its safetensors __metadata__ (with the package's checksums, if it writes any)
    base_keys: dict[str, list[tuple[str, tuple[int, ...], torch.dtype]]]  # added-tensor candidates by kind
    base: torch.nn.Module = None  # the user's base model (eval); every loader gets a deep copy
    host_new: torch.nn.Module = None  # PeftModel with host_dir merged (adapter "default")
    host_same: torch.nn.Module = None  # PeftModel with step1_dir merged (adapter "default")

    @property
    def classifies(self) -> bool:
        return ARCHS[self.arch].task_type == "SEQ_CLS"

    @property
    def auto_class(self):
        return AutoPeftModelForSequenceClassification if self.classifies else AutoPeftModelForCausalLM

    def load_base(self) -> torch.nn.Module:
        auto = AutoModelForSequenceClassification if self.classifies else AutoModelForCausalLM
        return auto.from_pretrained(self.base_dir, dtype=torch.float32).eval()


@torch.no_grad()
def outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits (no grad, and without touching its training flags)."""
    return model(**batch).logits.detach().clone()


def _train(model, arch: conftest.TinyArch, steps: int, seed: int, save_after: Optional[dict[int, str]] = None):
    config = model.peft_config[model.active_adapter]
    if config.mode == "d" and config.selection == "fisher" and not config.child_sizes:
        model.detect_child_network(arch.batches(2, seed=20), progress=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, eps=1e-6)
    for step, batch in enumerate(arch.batches(steps, seed=seed), start=1):
        model.train()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        if save_after and step in save_after:
            model.save_pretrained(save_after[step])
    return model


def _candidate_keys(base: torch.nn.Module, peft_model) -> dict[str, list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """Names a hostile file could add, as they would appear in an adapter file, with their real shapes."""
    tuned = {module.module_key for module in peft_model.modules() if hasattr(module, "module_key")}
    result: dict[str, list] = defaultdict(list)
    for name, tensor in base.state_dict().items():
        module, _, leaf = name.rpartition(".")
        entry = (tuple(tensor.shape), tensor.dtype)
        if module in tuned:
            result["tuned_base_layer"].append((f"{PREFIX}{module}.base_layer.{leaf}", *entry))
            result["tuned_plain_weight"].append((f"{PREFIX}{name}", *entry))
        elif "LayerNorm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
            result["layernorm"].append((f"{PREFIX}{name}", *entry))
        elif "embeddings" in name or ".wte." in name or ".wpe." in name:
            result["embedding"].append((f"{PREFIX}{name}", *entry))
        else:
            result["other_base_weight"].append((f"{PREFIX}{name}", *entry))
    return dict(result)


def _saved_keys(adapter_dir: str) -> set[str]:
    with open(os.path.join(adapter_dir, WEIGHTS), "rb") as handle:
        return set(safetensors_load(handle.read()))


def prepare_sources(
    root: str, names: tuple[str, ...] = ("bert_d", "bert_f", "gpt2_d", "bertwide_d")
) -> dict[str, Source]:
    """Build the tiny bases, train and save the adapters, and load the prepared models every case copies."""
    os.makedirs(root, exist_ok=True)
    sources = {}
    bases = {}
    for name in names:
        arch_name, mode = name.split("_")
        arch = ARCHS[arch_name]
        if arch_name not in bases:
            base_dir = os.path.join(root, f"{arch_name}_base")
            arch.build(seed=0).save_pretrained(base_dir)
            bases[arch_name] = base_dir
        base_dir = bases[arch_name]
        src = Source(name=name, arch=arch_name, mode=mode, base_dir=base_dir, adapter_dir=os.path.join(root, name),
                     step1_dir=os.path.join(root, f"{name}_step1"), host_dir=os.path.join(root, f"{arch_name}_host"),
                     batch={}, trained_out=None, config={}, weights_bytes=b"", tensors={}, metadata=None,
                     base_keys={})
        batch = {k: v for k, v in arch.batches(1, seed=40)[0].items() if k != "labels"}
        batch["attention_mask"][1, 5:] = 0  # some padding, so masked positions are exercised too
        src.batch = batch
        reserve_p, edit_child_network = SOURCE_SETTINGS.get(name, (0.3, None))
        model = conftest.peft_model(src.load_base(), mode=mode, reserve_p=reserve_p, seed=3, task_type=arch.task_type)
        if edit_child_network is not None:
            model.detect_child_network(arch.batches(2, seed=20), progress=False)
            edit_child_network(model)
        trained = _train(model, arch, steps=2, seed=21, save_after={1: src.step1_dir, 2: src.adapter_dir})
        src.trained_out = outputs(trained, batch)
        saved_keys = _saved_keys(src.adapter_dir)  # adding one of those would only replace its values
        src.base_keys = {kind: [entry for entry in entries if entry[0] not in saved_keys]
                         for kind, entries in _candidate_keys(src.load_base(), trained).items()}
        src.base_keys = {kind: entries for kind, entries in src.base_keys.items() if entries}
        if not os.path.exists(src.host_dir):
            host = conftest.peft_model(src.load_base(), mode="d", reserve_p=0.2, selection="random", seed=7,
                                       task_type=arch.task_type)
            _train(host, arch, steps=1, seed=22)
            host.save_pretrained(src.host_dir)
        with open(os.path.join(src.adapter_dir, CONFIG)) as handle:
            src.config = json.load(handle)
        if edit_child_network is not None:
            assert "gap16x" in src.config["child_encodings"].values(), src.config["child_encodings"]
        with open(os.path.join(src.adapter_dir, WEIGHTS), "rb") as handle:
            src.weights_bytes = handle.read()
        src.tensors = safetensors_load(src.weights_bytes)
        src.metadata = parse_header(src.weights_bytes)[0].get("__metadata__")
        src.base = src.load_base()
        src.host_new = PeftModel.from_pretrained(src.load_base(), src.host_dir)
        src.host_same = PeftModel.from_pretrained(src.load_base(), src.step1_dir)
        for model in (src.base, src.host_new, src.host_same):  # a deep copy is a faithful fresh copy
            ModelState.capture(model).assert_unchanged(ModelState.capture(copy.deepcopy(model)), "by deepcopy")
            assert torch.equal(outputs(copy.deepcopy(model), batch), outputs(model, batch))
        host_out = outputs(src.host_new, batch)
        assert not torch.equal(host_out, src.trained_out) and not torch.equal(outputs(src.base, batch), src.trained_out)
        sources[name] = src
    return sources


# ================================================================================================ drawing
class Draw:
    """Where a case's choices come from: hypothesis (`HypothesisDraw`) or a seeded `random.Random` (`RandomDraw`)."""

    def integer(self, low: int, high: int) -> int:  # inclusive
        raise NotImplementedError

    def choice(self, options):
        options = list(options)
        return options[self.integer(0, len(options) - 1)]


class RandomDraw(Draw):
    def __init__(self, rng: random.Random):
        self.rng = rng

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)


class HypothesisDraw(Draw):
    def __init__(self, draw):
        from hypothesis import strategies as st

        self._draw, self._st = draw, st

    def integer(self, low: int, high: int) -> int:
        return self._draw(self._st.integers(low, high))

    def choice(self, options):
        return self._draw(self._st.sampled_from(list(options)))


@dataclass
class Mutation:
    kind: str
    variant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.variant}({self.detail})"


@dataclass
class Case:
    source: str
    loader: str
    mutations: list[Mutation]
    files: dict[str, Optional[bytes]]  # file name -> contents (None: absent)
    signing: str = ""  # how the checksums of re-written tensors were written (see `SIGNINGS`), "" if none were

    def describe(self) -> str:
        signing = f" [checksums {self.signing}]" if self.signing else ""
        return f"[{self.source} / {self.loader}] " + " + ".join(map(str, self.mutations)) + signing


# When tensors are rewritten (stage 1), the file's checksums (if the package stores any in the safetensors metadata)
# are either kept as they were (now stale: a corruption the checksums should catch), dropped (an unchecked file, as
# written before checksums existed), or recomputed for the new tensors (a consistent file with bad contents, as a
# buggy or hostile writer would produce: only the package's own checks of the contents can catch it).
# A rewrite that leaves a self-consistent adapter (a finite value of the tensor's own dtype, two tensors of the same
# shape and dtype swapped) is a valid adapter once re-signed: nothing could tell it from one saved that way, so such
# rewrites always keep the stale checksums (the checksums are what must catch them).
SIGNINGS = ("stale", "dropped", "resigned")


def _checksum_support() -> tuple[Optional[str], Optional[Callable[[dict[str, torch.Tensor]], dict[str, str]]]]:
    """(metadata key, checksum function) of the package's tensor checksums, if it has them."""
    from peft_childtuning import sparse_format

    return getattr(sparse_format, "CHECKSUMS_METADATA_KEY", None), getattr(sparse_format, "tensor_checksums", None)


class Workspace:
    """An adapter directory being mutated: the config (dict, then maybe raw text), the tensors (dict, then bytes)."""

    def __init__(self, source: Source):
        self.source = source
        self.config: Any = copy.deepcopy(source.config)
        self.config_text: Optional[bytes] = None  # set once the file itself is mutated (then authoritative)
        self.config_present = True
        self.tensors = dict(source.tensors)
        self.metadata: Optional[dict[str, str]] = copy.deepcopy(source.metadata)
        self.metadata_modified = False
        self.signing = "stale"
        self.tensors_modified = False
        self.weights: Optional[bytes] = None  # set once the bytes are mutated (then authoritative)
        self.weights_present = True
        self.pickle: Optional[bytes] = None

    # -------------------------------------------------------------------------------------------- tensors
    def set_tensor(self, key: str, tensor: torch.Tensor) -> None:
        self.tensors[key] = tensor.contiguous().clone()
        self.tensors_modified = True

    def delete_tensor(self, key: str) -> None:
        del self.tensors[key]
        self.tensors_modified = True

    def keys_by_role(self) -> dict[str, list[str]]:
        roles: dict[str, list[str]] = defaultdict(list)
        for key in sorted(self.tensors):
            if VALUES in key or "childtuning_bias_values" in key:
                roles["values"].append(key)
            elif "positions" in key:
                roles["positions"].append(key)
            elif key.startswith(f"{PREFIX}classifier") or key.startswith(f"{PREFIX}score"):
                roles["head"].append(key)
            else:
                roles["other"].append(key)
        return dict(roles)

    def pick_key(self, draw: Draw) -> Optional[str]:
        roles = self.keys_by_role()
        if not roles:
            return None
        return draw.choice(roles[draw.choice(sorted(roles))])

    # -------------------------------------------------------------------------------------------- bytes
    def weights_bytes(self) -> bytes:
        if self.weights is None:
            if not self.tensors_modified and not self.metadata_modified:
                self.weights = self.source.weights_bytes
            else:
                self.weights = safetensors_save(self.tensors, metadata=self._metadata_to_write())
        return self.weights

    def _metadata_to_write(self) -> Optional[dict[str, str]]:
        metadata = self.metadata
        key, checksums = _checksum_support()
        if self.metadata_modified or not metadata or key is None or key not in metadata:
            return metadata
        if self.signing == "dropped":
            return {name: value for name, value in metadata.items() if name != key}
        if self.signing == "resigned" and checksums is not None:
            return {**metadata, key: json.dumps(checksums(self.tensors), sort_keys=True)}
        return metadata

    def config_bytes(self) -> bytes:
        if self.config_text is None:
            self.config_text = json.dumps(self.config, indent=2, sort_keys=True).encode()
        return self.config_text

    def files(self) -> dict[str, Optional[bytes]]:
        return {
            CONFIG: self.config_bytes() if self.config_present else None,
            WEIGHTS: self.weights_bytes() if self.weights_present else None,
            PICKLE: self.pickle,
        }


def parse_header(data: bytes) -> tuple[dict, int]:
    """(header dict, data start) of safetensors bytes; raises on a malformed header."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), 8 + length


def with_header(data: bytes, header: dict) -> bytes:
    """The same data region under another header (padded to 8 bytes with spaces, as safetensors writes it)."""
    _, start = parse_header(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[start:]


def _region_of(data: bytes, offset: int) -> str:
    """Which part of a safetensors file a byte offset falls in: prefix, header, or the data of which tensor role."""
    if offset < 8:
        return "prefix"
    try:
        header, start = parse_header(data)
    except Exception:  # noqa: BLE001
        return "header?"
    if offset < start:
        return "header"
    relative = offset - start
    for key, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if key == "__metadata__" or not (isinstance(offsets, list) and len(offsets) == 2):
            continue
        begin, end = offsets
        if isinstance(begin, int) and isinstance(end, int) and begin <= relative < end:
            if VALUES in key:
                return "data:values"
            if "positions" in key:
                return "data:positions"
            return "data:head" if ".classifier." in key or ".score." in key else "data:other"
    return "data:none"


def _random_tensor(draw: Draw, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(draw.integer(0, 2**31 - 1))
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    return torch.randint(0, 100, shape, generator=generator).to(dtype)


# ------------------------------------------------------------------------------------------------ stage 0: config
CONFIG_FIELD_VALUES: dict[str, list[Any]] = {
    "mode": ["d", "f", "x", None, 1],
    "tune_bias": [True, None, "yes"],
    "target_modules": [["query"], ["dense"], ["query", "key", "value"], ["c_attn"], ".*", "all-linear", [],
                       None, ["no_such_module"], r".*layer\.0\..*(query|key|value|dense)", r".*h\.0\..*c_attn"],
    "exclude_modules": [["query"], ["c_attn"], r".*layer\.1\..*", "no_such_module"],
    "modules_to_save": [None, [], ["classifier", "bert.pooler.dense"], ["no_such_module"], "classifier",
                        ["lm_head"]],
    "peft_type": ["LORA", "childtuning", "GARBAGE", None],
    "task_type": ["CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", None, "garbage"],
    "ignore_base_mismatch": [True, "yes", None],
    "reserve_p": [0.0, 1.5, -0.1, "0.3", None, 0.5, 1.0],
    "selection": ["random", "x", None],
    "seed": [1, -1, None, "s"],
    "init_weights": [False, None],
    "inference_mode": [False, True],
    "base_model_name_or_path": ["/no/such/base", None, ""],
    "revision": ["no-such-revision"],
    "unknown_field": [1, "x"],
}


def mutate_child_sizes(draw: Draw, ws: Workspace) -> tuple[str, str]:
    sizes = ws.config.get("child_sizes")
    tuned_keys = sorted(ws.source.config.get("child_sizes") or _tuned_tensor_keys(ws.source))
    if isinstance(sizes, dict) and sizes:
        variant = draw.choice(["scale", "plus_one", "minus_one", "huge", "negative", "float", "string", "null_entry",
                               "delete_entry", "add_entry", "all_null", "all_empty"])
        key = draw.choice(sorted(sizes))
        old = sizes[key]
        if variant == "scale":
            sizes[key] = int(old * draw.choice([0, 0.5, 2, 10])) if isinstance(old, int) else 0
        elif variant == "plus_one":
            sizes[key] = (old if isinstance(old, int) else 0) + 1
        elif variant == "minus_one":
            sizes[key] = (old if isinstance(old, int) else 0) - 1
        elif variant == "huge":
            sizes[key] = draw.choice([10**12, 2**62, 2**64])
        elif variant == "negative":
            sizes[key] = draw.choice([-1, -1000])
        elif variant == "float":
            sizes[key] = (old if isinstance(old, (int, float)) else 0) + 0.5
        elif variant == "string":
            sizes[key] = draw.choice(["many", str(old)])
        elif variant == "null_entry":
            sizes[key] = None
        elif variant == "delete_entry":
            del sizes[key]
        elif variant == "add_entry":
            key = draw.choice(["bert.pooler.dense.weight", "transformer.h.0.mlp.c_proj.bias", "no.such.tensor"])
            sizes[key] = draw.choice([0, 5, 100])
        elif variant == "all_null":
            ws.config["child_sizes"] = None
        else:
            ws.config["child_sizes"] = {}
        new = ws.config["child_sizes"] if variant.startswith("all") else sizes.get(key, "<deleted>")
        return variant, f"{key}: {old!r} -> {new!r}"
    variant = draw.choice(["set_fake", "set_empty", "set_string"])
    if variant == "set_fake":
        ws.config["child_sizes"] = {key: draw.choice([0, 5, 10**12]) for key in tuned_keys}
    elif variant == "set_empty":
        ws.config["child_sizes"] = {}
    else:
        ws.config["child_sizes"] = "many"
    return variant, f"child_sizes {sizes!r} -> {_short(ws.config['child_sizes'])}"


def _tuned_tensor_keys(source: Source) -> list[str]:
    return [key[len(PREFIX):].replace(VALUES, "weight") for key in source.tensors if key.endswith(VALUES)]


def mutate_child_encodings(draw: Draw, ws: Workspace) -> tuple[str, str]:
    encodings = ws.config.get("child_encodings")
    if isinstance(encodings, dict) and encodings:
        variant = draw.choice(["other_encoding", "unknown_encoding", "null_entry", "delete_entry", "all_null",
                               "all_empty"])
        key = draw.choice(sorted(encodings))
        old = encodings[key]
        if variant == "other_encoding":
            encodings[key] = draw.choice([name for name in ("bitmap", "int32", "gap16", "gap16x") if name != old])
        elif variant == "unknown_encoding":
            encodings[key] = draw.choice(["zip", "", "BITMAP"])
        elif variant == "null_entry":
            encodings[key] = None
        elif variant == "delete_entry":
            del encodings[key]
        elif variant == "all_null":
            ws.config["child_encodings"] = None
        else:
            ws.config["child_encodings"] = {}
        new = ws.config["child_encodings"] if variant.startswith("all") else encodings.get(key, "<deleted>")
        return variant, f"{key}: {old!r} -> {new!r}"
    variant = draw.choice(["set_fake", "set_unknown"])
    keys = sorted(ws.source.config.get("child_sizes") or _tuned_tensor_keys(ws.source))
    ws.config["child_encodings"] = {key: "int32" if variant == "set_fake" else "zip" for key in keys}
    return variant, f"child_encodings {encodings!r} -> {{...: {'int32' if variant == 'set_fake' else 'zip'}}}"


def mutate_child_encoded_lengths(draw: Draw, ws: Workspace) -> tuple[str, str]:
    """The lengths of gap16x streams (only the sources that have one record any)."""
    lengths = ws.config.get("child_encoded_lengths")
    if isinstance(lengths, dict) and lengths:
        variant = draw.choice(["plus_one", "minus_one", "huge", "negative", "float", "string", "null_entry",
                               "delete_entry", "add_entry", "all_null", "all_empty"])
        key = draw.choice(sorted(lengths))
        old = lengths[key]
        number = old if isinstance(old, int) else 0
        if variant in ("plus_one", "minus_one"):
            lengths[key] = number + (1 if variant == "plus_one" else -1)
        elif variant == "huge":
            lengths[key] = draw.choice([10**12, 2**64])
        elif variant == "negative":
            lengths[key] = -1
        elif variant == "float":
            lengths[key] = number + 0.5
        elif variant == "string":
            lengths[key] = str(old)
        elif variant == "null_entry":
            lengths[key] = None
        elif variant == "delete_entry":
            del lengths[key]
        elif variant == "add_entry":  # a length for a tensor of a fixed-length encoding
            key = draw.choice(sorted(set(ws.source.config.get("child_sizes") or {}) - set(lengths)) or ["no.such"])
            lengths[key] = 5
        else:
            ws.config["child_encoded_lengths"] = None if variant == "all_null" else {}
        new = ws.config["child_encoded_lengths"] if variant.startswith("all") else lengths.get(key, "<deleted>")
        return variant, f"{key}: {old!r} -> {new!r}"
    keys = sorted(ws.source.config.get("child_sizes") or _tuned_tensor_keys(ws.source))
    variant = draw.choice(["set_for_one", "set_string"])
    ws.config["child_encoded_lengths"] = {keys[0]: 5} if variant == "set_for_one" and keys else "many"
    return variant, f"child_encoded_lengths {lengths!r} -> {_short(ws.config['child_encoded_lengths'])}"


def mutate_base_fingerprint(draw: Draw, ws: Workspace) -> tuple[str, str]:
    fingerprint = ws.config.get("base_fingerprint")
    variant = draw.choice(["flip_hex", "tuned_dtype", "delete_hash", "null", "empty", "string", "extra_key"])
    if variant in ("flip_hex", "tuned_dtype", "delete_hash", "extra_key") and not (
        isinstance(fingerprint, dict) and (fingerprint or variant != "delete_hash")
    ):
        variant = "null"
    if variant == "flip_hex":
        hashes = sorted(key for key, value in fingerprint.items() if key != "tuned_dtype" and isinstance(value, str))
        if not hashes:
            variant = "null"
        else:
            key = draw.choice(hashes)
            value = fingerprint[key]
            index = draw.integer(0, max(0, len(value) - 1))
            new_char = draw.choice([c for c in "0123456789abcdef" if c != (value[index:index + 1] or "x")])
            fingerprint[key] = value[:index] + new_char + value[index + 1:]
            return variant, f"{key}[{index}] -> {new_char}"
    if variant == "tuned_dtype":
        fingerprint["tuned_dtype"] = draw.choice(["bfloat16", "float16", "float64", "garbage", None])
        return variant, f"tuned_dtype -> {fingerprint['tuned_dtype']!r}"
    if variant == "delete_hash":
        key = draw.choice(sorted(fingerprint))
        del fingerprint[key]
        return variant, f"deleted {key}"
    if variant == "extra_key":
        fingerprint["float64"] = "0" * 32
        return variant, "added float64"
    ws.config["base_fingerprint"] = {"null": None, "empty": {}, "string": "abc"}[variant]
    return variant, f"base_fingerprint -> {ws.config['base_fingerprint']!r}"


def mutate_config_field(draw: Draw, ws: Workspace) -> tuple[str, str]:
    name = draw.choice(sorted(CONFIG_FIELD_VALUES))
    options = [value for value in CONFIG_FIELD_VALUES[name] if value != ws.config.get(name, object())]
    value = draw.choice(options or CONFIG_FIELD_VALUES[name])
    old = ws.config.get(name, "<absent>")
    ws.config[name] = copy.deepcopy(value)
    return name, f"{name}: {_short(old)} -> {value!r}"


def delete_config_field(draw: Draw, ws: Workspace) -> tuple[str, str]:
    if not isinstance(ws.config, dict) or not ws.config:
        return "nothing", "no field left"
    name = draw.choice(sorted(ws.config))
    del ws.config[name]
    return name, f"deleted {name}"


def mutate_config_file(draw: Draw, ws: Workspace) -> tuple[str, str]:
    variant = draw.choice(["truncate", "garbage", "empty", "json_list", "json_null", "delete", "utf16", "bom"])
    text = ws.config_bytes()
    if variant == "truncate":
        cut = draw.integer(0, max(0, len(text) - 1))
        ws.config_text = text[:cut]
        return variant, f"kept {cut} of {len(text)} bytes"
    if variant == "garbage":
        generator = random.Random(draw.integer(0, 2**31 - 1))
        ws.config_text = bytes(generator.randrange(256) for _ in range(draw.integer(1, 64)))
        return variant, f"{len(ws.config_text)} random bytes"
    if variant == "delete":
        ws.config_present = False
        return variant, "adapter_config.json removed"
    ws.config_text = {"empty": b"", "json_list": b"[]", "json_null": b"null",
                      "utf16": text.decode("utf-8", "replace").encode("utf-16"),
                      "bom": b"\xef\xbb\xbf" + text}[variant]
    return variant, variant


# ------------------------------------------------------------------------------------------------ stage 1: tensors
FLOAT_SPECIALS = ["nan", "inf", "-inf", "1e300", "-1e300", "huge_finite"]
RETYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.int8, torch.uint8,
           torch.int16, torch.int32, torch.int64, torch.uint16]


def add_tensor(draw: Draw, ws: Workspace) -> tuple[str, str]:
    candidates = dict(ws.source.base_keys)
    variant = draw.choice(sorted(candidates) + ["random_name", "other_adapter", "modules_to_save_key"])
    if variant in candidates:
        key, shape, dtype = draw.choice(candidates[variant])
    elif variant == "random_name":
        rng = random.Random(draw.integer(0, 2**31 - 1))
        key = draw.choice(["", PREFIX]) + "".join(rng.choice(string.ascii_lowercase + "._") for _ in range(12))
        shape, dtype = (draw.integer(0, 16),), torch.float32
    elif variant == "other_adapter":
        values = [key for key in ws.source.tensors if VALUES in key]
        key = draw.choice(values) + ".other"
        shape, dtype = tuple(ws.source.tensors[key[:-6]].shape), ws.source.tensors[key[:-6]].dtype
    else:
        heads = [key for key in ws.source.tensors if ".classifier." in key or ".score." in key] or [
            f"{PREFIX}lm_head.weight"]
        head = draw.choice(heads)
        module, _, leaf = head.rpartition(".")
        key = f"{module}.{draw.choice(['modules_to_save.default', 'original_module'])}.{leaf}"
        shape, dtype = tuple(ws.source.tensors.get(head, torch.zeros(conftest.VOCAB, conftest.HIDDEN)).shape), \
            torch.float32
    shape_variant = draw.choice(["exact", "exact", "wrong"])
    if shape_variant == "wrong":
        shape = (shape[0] + 1, *shape[1:]) if shape else (2,)
    ws.set_tensor(key, _random_tensor(draw, shape, dtype))
    return f"{variant}:{shape_variant}", f"{key} {str(dtype).removeprefix('torch.')}{list(shape)}"


def remove_tensor(draw: Draw, ws: Workspace) -> tuple[str, str]:
    key = ws.pick_key(draw)
    if key is None:
        return "nothing", "no tensor left"
    ws.delete_tensor(key)
    return _role(key), key


def _role(key: str) -> str:
    if VALUES in key or "bias_values" in key:
        return "values"
    if "positions" in key:
        return "positions"
    if ".classifier." in key or ".score." in key:
        return "head"
    return "other"


def rename_tensor(draw: Draw, ws: Workspace) -> tuple[str, str]:
    key = ws.pick_key(draw)
    if key is None:
        return "nothing", "no tensor left"
    variant = draw.choice(["suffix", "strip_prefix", "other_layer", "swap", "upper_leaf", "with_adapter_name"])
    tensor = ws.tensors[key]
    if variant == "swap":
        same_role = [other for other in sorted(ws.tensors) if other != key and _role(other) == _role(key)]
        if same_role:
            other = draw.choice(same_role)
            if ws.tensors[other].shape == tensor.shape and ws.tensors[other].dtype == tensor.dtype:
                ws.signing = "stale"  # re-signed, this would be a valid (other) adapter: see SIGNINGS
            ws.set_tensor(key, ws.tensors[other])
            ws.set_tensor(other, tensor)
            return f"swap:{_role(key)}", f"{key} <-> {other}"
        variant = "suffix"
    if variant == "suffix":
        new = key + draw.choice(["_x", ".x", "s"])
    elif variant == "strip_prefix":
        new = key.removeprefix(PREFIX) if key.startswith(PREFIX) else PREFIX + key
    elif variant == "other_layer":
        new = key.replace(".0.", ".1.", 1) if ".0." in key else key.replace(".1.", ".0.", 1)
    elif variant == "upper_leaf":
        module, _, leaf = key.rpartition(".")
        new = f"{module}.{leaf.upper()}"
    else:
        new = key + ".default"
    ws.delete_tensor(key)
    replaced = new in ws.tensors
    ws.set_tensor(new, tensor)
    return f"{variant}:{_role(key)}", f"{key} -> {new}{' (replacing it)' if replaced else ''}"


def retype_tensor(draw: Draw, ws: Workspace) -> tuple[str, str]:
    key = ws.pick_key(draw)
    if key is None:
        return "nothing", "no tensor left"
    dtype = draw.choice(RETYPES)
    old = ws.tensors[key].dtype
    ws.set_tensor(key, ws.tensors[key].to(dtype))
    if dtype.is_floating_point and old.is_floating_point:
        ws.signing = "stale"  # re-signed, values cast to another float dtype are a valid adapter (see SIGNINGS)
    name = str(dtype).removeprefix("torch.")
    return f"{_role(key)}->{name}", f"{key}: {str(old).removeprefix('torch.')} -> {name}"


def resize_tensor(draw: Draw, ws: Workspace) -> tuple[str, str]:
    key = ws.pick_key(draw)
    if key is None:
        return "nothing", "no tensor left"
    tensor = ws.tensors[key]
    flat = tensor.reshape(-1)
    variant = draw.choice(["append", "drop", "reshape", "empty", "scalar", "tile", "flatten"])
    if variant == "append":
        count = draw.integer(1, 3)
        extra = flat[:1].repeat(count) if flat.numel() else torch.zeros(count, dtype=tensor.dtype)
        new = torch.cat([flat, extra]) if tensor.dim() <= 1 else torch.cat([tensor, tensor[:1]])
    elif variant == "drop" and flat.numel():
        count = draw.integer(1, min(3, flat.numel()))
        new = flat[:-count] if tensor.dim() <= 1 else tensor[:-1]
    elif variant == "reshape" and flat.numel() >= 2:
        new = flat.reshape(2, -1) if flat.numel() % 2 == 0 else flat.reshape(1, -1)
    elif variant == "empty":
        new = flat[:0]
    elif variant == "scalar" and flat.numel():
        new = flat[0].clone()
    elif variant == "tile":
        new = torch.cat([tensor, tensor]) if tensor.dim() else flat.repeat(2)
    else:
        variant = "flatten" if tensor.dim() > 1 else "unsqueeze"
        new = flat if tensor.dim() > 1 else tensor.unsqueeze(0)
    ws.set_tensor(key, new)
    return f"{variant}:{_role(key)}", f"{key}: {list(tensor.shape)} -> {list(new.shape)}"


def set_values(draw: Draw, ws: Workspace) -> tuple[str, str]:
    key = ws.pick_key(draw)
    if key is None or ws.tensors[key].numel() == 0:
        others = [k for k in sorted(ws.tensors) if ws.tensors[k].numel()]
        if not others:
            return "nothing", "no non-empty tensor"
        key = draw.choice(others)
    tensor = ws.tensors[key].clone()
    flat = tensor.reshape(-1)
    how_many = draw.choice(["one", "one", "all"])
    index = draw.integer(0, flat.numel() - 1)
    if tensor.is_floating_point():
        special = draw.choice(FLOAT_SPECIALS)
        if special in ("1e300", "-1e300"):
            flat = flat.to(torch.float64)  # finite in the file, infinite once cast to the model's fp32
            value = float(special)
        elif special == "huge_finite":
            value = 3.0e38 if tensor.dtype == torch.float32 else float(torch.finfo(tensor.dtype).max)
        else:
            value = float(special)
    elif tensor.dtype == torch.bool:
        special, value = "toggle", None
    else:
        special = draw.choice(["zero", "minus_one", "max", "min", "255"])
        info = torch.iinfo(tensor.dtype)
        value = {"zero": 0, "minus_one": max(-1, info.min), "max": info.max, "min": info.min,
                 "255": min(255, info.max)}[special]
    if value is None:
        flat = ~flat if how_many == "all" else torch.cat([flat[:index], ~flat[index:index + 1], flat[index + 1:]])
    elif how_many == "all":
        flat = torch.full_like(flat, value)
    else:
        flat = flat.clone()
        flat[index] = value
    if flat.dtype == tensor.dtype and (value is None or math.isfinite(value)):
        ws.signing = "stale"  # a finite value of the tensor's own dtype: re-signed, a valid adapter (see SIGNINGS)
    ws.set_tensor(key, flat.reshape(tensor.shape))
    where = "[all]" if how_many == "all" else f"[{index}]"
    return f"{_role(key)}:{special}", f"{key}{where} = {special}"


def mutate_gap_stream(draw: Draw, ws: Workspace) -> tuple[str, str]:
    """Edit a stream of 16-bit gaps (gap16, or gap16x: the gaps, then a triple (index high, index low, count) per
    wide gap; one of those where there is one) as a writer with a bug could."""
    streams = {key: tensor for key, tensor in sorted(ws.tensors.items())
               if "positions" in key and tensor.dtype == torch.uint16 and tensor.dim() == 1 and tensor.numel()}
    if not streams:
        return "nothing", "no 16-bit gap stream"
    sizes = {key: ws.tensors[key.replace("positions", "values")].numel()
             if key.replace("positions", "values") in ws.tensors else streams[key].numel() for key in streams}
    key = draw.choice([key for key in streams if streams[key].numel() > sizes[key]] or list(streams))
    words, size = streams[key].to(torch.int32), min(sizes[key], streams[key].numel())
    wide = (words.numel() - size) // 3
    variant = draw.choice(["zero_gap", "drop_last_word", "append_triple", "swap_adjacent", "widen_last_gap"]
                          + (["zero_count", "bump_count"] if wide else []))
    index = draw.integer(0, size - 1)
    if variant == "zero_gap":  # a duplicated position: never a valid stream
        words = words.index_fill(0, torch.tensor([index]), 0)
    elif variant == "zero_count":  # a wide gap of count 0: never a valid stream
        words = words.index_fill(0, torch.tensor([size + 3 * draw.integer(0, wide - 1) + 2]), 0)
    else:  # may leave a valid stream of another child network: re-signed, a valid adapter (see SIGNINGS)
        ws.signing = "stale"
        if variant == "drop_last_word":
            words = words[:-1]
        elif variant == "append_triple":
            words = torch.cat([words, torch.tensor([index >> 16, index & 0xFFFF, 1], dtype=words.dtype)])
        elif variant == "swap_adjacent" and words.numel() > 1:
            index = min(index, words.numel() - 2)
            words = torch.cat([words[:index], words[index + 1:index + 2], words[index:index + 1], words[index + 2:]])
        elif variant == "widen_last_gap":
            words = words.index_fill(0, torch.tensor([size - 1]), (1 << 16) - 1)
        elif variant == "bump_count":
            where = size + 3 * draw.integer(0, wide - 1) + 2
            words = words.index_fill(0, torch.tensor([where]), min(int(words[where]) + 1, (1 << 16) - 1))
    ws.set_tensor(key, words.to(torch.uint16))
    return variant, f"{key}[{index}] ({size} gaps, {wide} wide)"


def mutate_metadata(draw: Draw, ws: Workspace) -> tuple[str, str]:
    """Edit the safetensors __metadata__ (the tensors stay as they are, so any checksums in it still match them)."""
    key, _ = _checksum_support()
    base = dict(ws.metadata or {})
    variants = ["drop", "format_tf", "format_garbage", "extra_key"]
    if key is not None and key in base:
        variants += ["drop_checksums", "checksums_garbage", "checksums_not_object", "checksum_flipped",
                     "checksum_missing_entry", "checksum_extra_entry"]
    variant = draw.choice(variants)
    if variant == "drop":
        metadata = None
    elif variant == "format_tf":
        metadata = {**base, "format": "tf"}
    elif variant == "format_garbage":
        metadata = {**base, "format": "\u00ff\u0000x"}
    elif variant == "extra_key":
        metadata = {**base, "childtuning": "1"}
    elif variant == "drop_checksums":
        metadata = {name: value for name, value in base.items() if name != key}
    elif variant == "checksums_garbage":
        metadata = {**base, key: "{not json"}
    elif variant == "checksums_not_object":
        metadata = {**base, key: "[1, 2]"}
    else:
        recorded = json.loads(base[key])
        name = draw.choice(sorted(recorded))
        if variant == "checksum_flipped":
            recorded[name] = f"{int(recorded[name], 16) ^ 1:08x}"
        elif variant == "checksum_missing_entry":
            del recorded[name]
        else:
            recorded[f"{name}.extra"] = recorded[name]
        metadata = {**base, key: json.dumps(recorded, sort_keys=True)}
    ws.metadata = metadata
    ws.metadata_modified = True
    shown = {name: (value if name != key else f"<{len(value)} chars>") for name, value in (metadata or {}).items()}
    return variant, f"__metadata__ -> {shown if metadata is not None else None!r}"


# ------------------------------------------------------------------------------------------------ stage 2: header
SAME_ITEMSIZE = [["F64", "I64", "U64"], ["F32", "I32", "U32"], ["F16", "BF16", "I16", "U16"],
                 ["U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2"]]


def _header_entries(ws: Workspace) -> Optional[tuple[bytes, dict]]:
    data = ws.weights_bytes()
    try:
        header, _ = parse_header(data)
    except Exception:  # noqa: BLE001
        return None
    return data, header


def header_dtype(draw: Draw, ws: Workspace) -> tuple[str, str]:
    parsed = _header_entries(ws)
    if parsed is None:
        return "unparsable", "header already broken"
    data, header = parsed
    if len(header) <= ("__metadata__" in header):
        return "no_tensors", "the file holds no tensors"
    key = draw.choice(sorted(k for k in header if k != "__metadata__"))
    old = header[key]["dtype"]
    group = next((g for g in SAME_ITEMSIZE if old in g), [old])
    new = draw.choice([d for d in group if d != old] or [old])
    header[key]["dtype"] = new
    ws.weights = with_header(data, header)
    return f"{_role(key)}:{old}->{new}", f"{key}: {old} -> {new} (same bytes)"


def header_shape(draw: Draw, ws: Workspace) -> tuple[str, str]:
    parsed = _header_entries(ws)
    if parsed is None:
        return "unparsable", "header already broken"
    data, header = parsed
    if len(header) <= ("__metadata__" in header):
        return "no_tensors", "the file holds no tensors"
    key = draw.choice(sorted(k for k in header if k != "__metadata__"))
    shape = list(header[key]["shape"])
    numel = 1
    for dim in shape:
        numel *= dim
    variant = draw.choice(["same_numel", "changed_numel"])
    if variant == "same_numel":
        new = [2, numel // 2] if numel % 2 == 0 and numel else [1, numel]
    else:
        new = [numel + draw.choice([-1, 1, 8])] if numel else [1]
    header[key]["shape"] = new
    ws.weights = with_header(data, header)
    return f"{variant}:{_role(key)}", f"{key}: {shape} -> {new}"


def header_offsets(draw: Draw, ws: Workspace) -> tuple[str, str]:
    parsed = _header_entries(ws)
    if parsed is None:
        return "unparsable", "header already broken"
    data, header = parsed
    keys = sorted(k for k in header if k != "__metadata__")
    if not keys:
        return "no_tensors", "the file holds no tensors"
    key = draw.choice(keys)
    begin, end = header[key]["data_offsets"]
    same_size = [k for k in keys if k != key and
                 header[k]["data_offsets"][1] - header[k]["data_offsets"][0] == end - begin and end > begin]
    variant = draw.choice(["swap", "alias", "shift"])
    if variant in ("swap", "alias") and same_size:
        other = draw.choice(same_size)
        if variant == "swap":
            header[key]["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], [begin, end]
        else:
            header[key]["data_offsets"] = list(header[other]["data_offsets"])
        ws.weights = with_header(data, header)
        return f"{variant}:{_role(key)}", f"{key} {variant} {other}"
    delta = draw.choice([-4, -1, 1, 4])
    header[key]["data_offsets"] = [max(0, begin + delta), max(0, end + delta)]
    ws.weights = with_header(data, header)
    return f"shift:{_role(key)}", f"{key}: offsets {[begin, end]} -> {header[key]['data_offsets']}"


# ------------------------------------------------------------------------------------------------ stage 3: bytes
def _pick_offset(draw: Draw, data: bytes) -> int:
    try:
        _, start = parse_header(data)
        start = min(start, len(data))
    except Exception:  # noqa: BLE001
        start = min(len(data), 8)
    region = draw.choice(["prefix", "header", "header", "data", "data", "data"])
    if region == "prefix" or len(data) <= 8:
        return draw.integer(0, min(7, len(data) - 1))
    if region == "header" or start >= len(data):
        return draw.integer(8, max(8, start - 1))
    return draw.integer(start, len(data) - 1)


def truncate_bytes(draw: Draw, ws: Workspace) -> tuple[str, str]:
    data = ws.weights_bytes()
    if not data:
        return "already_empty", "no bytes"
    variant = draw.choice(["anywhere", "in_region", "last_byte", "empty"])
    if variant == "anywhere":
        cut = draw.integer(0, len(data) - 1)
    elif variant == "in_region":
        cut = _pick_offset(draw, data)
    elif variant == "last_byte":
        cut = len(data) - 1
    else:
        cut = 0
    region = _region_of(data, cut) if cut < len(data) else "end"
    ws.weights = data[:cut]
    return f"{variant}:{region.split(':')[0]}", f"kept {cut} of {len(data)} bytes (cut in {region})"


def set_byte(draw: Draw, ws: Workspace) -> tuple[str, str]:
    data = bytearray(ws.weights_bytes())
    if not data:
        return "empty", "no bytes"
    offset = _pick_offset(draw, bytes(data))
    region = _region_of(bytes(data), offset)
    old = data[offset]
    data[offset] = draw.choice([value for value in (0, 1, 0x20, 0x22, 0x30, 0x7B, 0x7F, 0x80, 0xFF,
                                                    draw.integer(0, 255)) if value != old] or [old ^ 1])
    ws.weights = bytes(data)
    return region, f"byte {offset}: {old:#04x} -> {data[offset]:#04x} ({region})"


def flip_bit(draw: Draw, ws: Workspace) -> tuple[str, str]:
    data = bytearray(ws.weights_bytes())
    if not data:
        return "empty", "no bytes"
    offset = _pick_offset(draw, bytes(data))
    bit = draw.integer(0, 7)
    region = _region_of(bytes(data), offset)
    data[offset] ^= 1 << bit
    ws.weights = bytes(data)
    return region, f"byte {offset} bit {bit} ({region})"


def append_bytes(draw: Draw, ws: Workspace) -> tuple[str, str]:
    variant = draw.choice(["zeros", "random", "copy_of_file"])
    data = ws.weights_bytes()
    if variant == "zeros":
        extra = b"\0" * draw.integer(1, 16)
    elif variant == "random":
        rng = random.Random(draw.integer(0, 2**31 - 1))
        extra = bytes(rng.randrange(256) for _ in range(draw.integer(1, 16)))
    else:
        extra = data
    ws.weights = data + extra
    return variant, f"{len(extra)} bytes appended"


# ------------------------------------------------------------------------------------------------ stage 4: files
class _PickleProbe:
    """Unpickling this runs code (a harmless flag on `builtins`): a loader that does so has executed the pickle."""

    def __reduce__(self):
        return (exec, (f"import builtins; builtins.{PICKLE_FLAG} = True",))


def pickle_file(draw: Draw, ws: Workspace) -> tuple[str, str]:
    variant = draw.choice(["instead_benign", "instead_malicious_torch", "instead_malicious_raw", "instead_garbage",
                           "also_different", "also_malicious"])
    buffer = io.BytesIO()
    if variant == "instead_benign":
        torch.save(dict(ws.tensors), buffer)
    elif variant in ("instead_malicious_torch", "also_malicious"):
        torch.save({**ws.tensors, "probe": _PickleProbe()}, buffer)
    elif variant == "instead_malicious_raw":
        buffer.write(pickle.dumps({"probe": _PickleProbe()}, protocol=2))
    elif variant == "instead_garbage":
        rng = random.Random(draw.integer(0, 2**31 - 1))
        buffer.write(b"\x80\x02" + bytes(rng.randrange(256) for _ in range(64)))
    else:  # a valid pickle of other values, next to the safetensors file: the loader must not prefer it
        generator = torch.Generator().manual_seed(1)
        torch.save({key: (t + torch.randn(t.shape, generator=generator).to(t.dtype)) if t.is_floating_point() else t
                    for key, t in ws.tensors.items()}, buffer)
    ws.pickle = buffer.getvalue()
    if variant.startswith("instead"):
        ws.weights_present = False
    where = "instead of" if variant.startswith("instead") else "next to"
    return variant, f"{PICKLE} ({len(ws.pickle)} bytes) {where} {WEIGHTS}"


def remove_weights(draw: Draw, ws: Workspace) -> tuple[str, str]:
    ws.weights_present = False
    return "safetensors", f"{WEIGHTS} removed"


@dataclass(frozen=True)
class Kind:
    name: str
    stage: int
    apply: Callable[[Draw, Workspace], tuple[str, str]]
    weight: int = 1
    applies_to: Callable[[Source], bool] = lambda source: True


KINDS = [
    Kind("cfg_child_sizes", 0, mutate_child_sizes, 2),
    Kind("cfg_child_encodings", 0, mutate_child_encodings),
    Kind("cfg_child_encoded_lengths", 0, mutate_child_encoded_lengths),
    Kind("cfg_base_fingerprint", 0, mutate_base_fingerprint),
    Kind("cfg_field_edit", 0, mutate_config_field, 3),
    Kind("cfg_field_delete", 0, delete_config_field, 2),
    Kind("cfg_file", 0, mutate_config_file),
    Kind("t_add", 1, add_tensor, 2),
    Kind("t_remove", 1, remove_tensor),
    Kind("t_rename", 1, rename_tensor),
    Kind("t_retype", 1, retype_tensor, 2),
    Kind("t_resize", 1, resize_tensor),
    Kind("t_values", 1, set_values, 2),
    Kind("t_gap_stream", 1, mutate_gap_stream, 2,
         lambda source: any(tensor.dtype == torch.uint16 for tensor in source.tensors.values())),
    Kind("t_metadata", 1, mutate_metadata),
    Kind("h_dtype", 2, header_dtype),
    Kind("h_shape", 2, header_shape),
    Kind("h_offsets", 2, header_offsets),
    Kind("b_truncate", 3, truncate_bytes, 2),
    Kind("b_byte", 3, set_byte, 2),
    Kind("b_bitflip", 3, flip_bit, 3),
    Kind("b_append", 3, append_bytes),
    Kind("f_pickle", 4, pickle_file, 2),
    Kind("f_remove_weights", 4, remove_weights),
]
KINDS_BY_NAME = {kind.name: kind for kind in KINDS}
_WEIGHTED_KINDS = [kind.name for kind in KINDS for _ in range(kind.weight)]


def draw_case(draw: Draw, source: Source, loaders: list[str], min_mutations: int = 1, max_mutations: int = 3,
              kinds: Optional[list[str]] = None) -> Case:
    """Draw a loader and 1-3 mutations, and apply them (in stage order) to a copy of the source's files."""
    loader = draw.choice(loaders)
    count = draw.integer(min_mutations, max_mutations)
    pool = [name for name in kinds or _WEIGHTED_KINDS if KINDS_BY_NAME[name].applies_to(source)] or kinds
    names = sorted((draw.choice(pool) for _ in range(count)), key=lambda name: (KINDS_BY_NAME[name].stage, name))
    ws = Workspace(source)
    rewrites_tensors = any(KINDS_BY_NAME[name].stage == 1 and name != "t_metadata" for name in names)
    if rewrites_tensors:
        ws.signing = draw.choice(SIGNINGS)
    mutations = []
    for name in names:
        kind = KINDS_BY_NAME[name]
        if kind.stage == 0 and not isinstance(ws.config, dict):
            variant, detail = "skipped", "config is not a dict"
        else:
            variant, detail = kind.apply(draw, ws)
        mutations.append(Mutation(name, variant, detail))
    key, _ = _checksum_support()
    signed = rewrites_tensors and key is not None and key in (source.metadata or {})
    return Case(source.name, loader, mutations, ws.files(), ws.signing if signed else "")


def case_strategy(source: Source, loaders: list[str], min_mutations: int = 1, max_mutations: int = 3):
    """The hypothesis strategy of cases for one source."""
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        return draw_case(HypothesisDraw(draw), source, loaders, min_mutations, max_mutations)

    return cases()


def materialize(case: Case, directory: str) -> str:
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)
    for name, content in case.files.items():
        if content is not None:
            with open(os.path.join(directory, name), "wb") as handle:
                handle.write(content)
    return directory


# ================================================================================================ loaders
@dataclass(frozen=True)
class Loader:
    name: str
    subject: Callable[[Source], Optional[torch.nn.Module]]  # a fresh copy of the user's model, or None
    load: Callable[[Source, Optional[torch.nn.Module], str], torch.nn.Module]  # the model to check outputs of
    after_success: Optional[Callable[[Source, torch.nn.Module], list[tuple[str, str]]]] = None


def _host_new_check(source: Source, model) -> list[tuple[str, str]]:
    """After load_adapter(..., "new") succeeded: the host adapter still computes what it did."""
    model.set_adapter("default")
    expected = outputs(source.host_new, source.batch)
    actual = outputs(model, source.batch)
    if not torch.equal(actual, expected):
        return [("host_adapter_disturbed", f"max |diff| {_max_diff(actual, expected)}")]
    return []


def _load_new(source: Source, subject, path: str):
    subject.load_adapter(path, adapter_name="new")
    subject.set_adapter("new")
    return subject


def _load_transformers(source: Source, subject, path: str):
    subject.load_adapter(path, adapter_name="ct")
    return subject


LOADERS: dict[str, Loader] = {
    loader.name: loader
    for loader in [
        Loader("from_pretrained", lambda s: copy.deepcopy(s.base),
               lambda s, m, p: PeftModel.from_pretrained(m, p, low_cpu_mem_usage=False)),
        Loader("from_pretrained_low_cpu_mem", lambda s: copy.deepcopy(s.base),
               lambda s, m, p: PeftModel.from_pretrained(m, p, low_cpu_mem_usage=True)),
        Loader("from_pretrained_trainable", lambda s: copy.deepcopy(s.base),
               lambda s, m, p: PeftModel.from_pretrained(m, p, is_trainable=True)),
        Loader("load_adapter_new", lambda s: copy.deepcopy(s.host_new), _load_new, _host_new_check),
        Loader("load_adapter_same_name", lambda s: copy.deepcopy(s.host_same),
               lambda s, m, p: (m.load_adapter(p, adapter_name="default"), m)[1]),
        Loader("auto_peft_model", lambda s: None, lambda s, m, p: s.auto_class.from_pretrained(p)),
        Loader("transformers_load_adapter", lambda s: copy.deepcopy(s.base), _load_transformers),
    ]
}
LOADER_NAMES = list(LOADERS)


# ================================================================================================ running a case
@dataclass
class Result:
    case: Case
    outcome: str  # "loaded_exactly" / "refused_cleanly" / "violation"
    violations: list[tuple[str, str]] = field(default_factory=list)  # (code, detail)
    error: Optional[str] = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # not violations, but worth counting (e.g. a pickle loaded)
    seconds: float = 0.0

    def report(self) -> str:
        lines = [self.case.describe(), f"  outcome: {self.outcome}"]
        if self.error:
            lines.append(f"  error: {self.error}")
        lines += [f"  VIOLATION {code}: {detail}" for code, detail in self.violations]
        return "\n".join(lines)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    difference = (a.double() - b.double()).abs()
    return f"{difference.nan_to_num(float('inf')).max().item():.3g}" + (" (NaN)" if bool(a.isnan().any()) else "")


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 400 else text[:397] + "..."


def _names_file(message: str, path: str) -> bool:
    """Whether an error message names the adapter's location: its directory, or a file in it, by path (a bare
    "adapter_config.json" does not tell which of several checkpoints was bad)."""
    return any(candidate in message for candidate in {path, os.path.realpath(path), os.path.abspath(path)})


def _chain_problem(error: BaseException) -> Optional[str]:
    """What is wrong with the chaining of an AdapterFormatError (None: fine)."""
    context = error.__context__
    if context is not None and error.__cause__ is None:
        how = "raised `from None`" if error.__suppress_context__ else "raised without `from`"
        return f"{how} while handling {type(context).__name__}: {str(context)[:160]}"
    return None


def _claims_other_method(files: dict[str, Optional[bytes]]) -> bool:
    """Whether the files now claim another peft method (a config of a known other peft_type) and no weights file
    names a Child-Tuning tensor: then nothing identifies them as a Child-Tuning adapter any more."""
    from peft.utils import PeftType

    try:
        peft_type = json.loads(files.get(CONFIG) or b"").get("peft_type")
    except (ValueError, AttributeError):
        return False
    if not isinstance(peft_type, str) or peft_type not in PeftType.__members__ or peft_type == "CHILDTUNING":
        return False
    return b"childtuning_" not in (files.get(WEIGHTS) or b"")


def run_case(sources: dict[str, Source], case: Case, directory: str) -> Result:
    """Load the case's directory with its loader and check the contract; never raises for a violation."""
    source = sources[case.source]
    loader = LOADERS[case.loader]
    path = materialize(case, directory)
    started = time.perf_counter()
    result = Result(case=case, outcome="violation")
    subject = loader.subject(source)
    before_out = outputs(subject, source.batch) if subject is not None else None
    before = ModelState.capture(subject) if subject is not None else None
    setattr(builtins, PICKLE_FLAG, False)
    loaded, error = None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            loaded = loader.load(source, subject, path)
        except Exception as exc:  # noqa: BLE001 - every exception is judged below
            error = exc
        result.warnings = sorted({str(w.message)[:200] for w in caught
                                  if not issubclass(w.category, (FutureWarning, DeprecationWarning))})
        violations = result.violations
        if getattr(builtins, PICKLE_FLAG, False):
            violations.append(("pickle_executed", "the loader unpickled adapter_model.bin and ran its code"))
        if error is None:
            try:
                actual = outputs(loaded, source.batch)
            except Exception as exc:  # noqa: BLE001
                violations.append((f"accepted_then_forward_fails:{type(exc).__name__}", _error_text(exc)))
            else:
                if not torch.equal(actual, source.trained_out):
                    warned = f"; warnings: {result.warnings[:2]}" if result.warnings else ""
                    violations.append(("wrong_model_loaded",
                                       f"outputs differ from the trained model's (max |diff| "
                                       f"{_max_diff(actual, source.trained_out)}){warned}"))
                elif loader.after_success is not None:
                    try:
                        violations.extend(loader.after_success(source, loaded))
                    except Exception as exc:  # noqa: BLE001
                        violations.append((f"host_adapter_disturbed:{type(exc).__name__}", _error_text(exc)))
            if not violations:
                result.outcome = "loaded_exactly"
                if case.files.get(WEIGHTS) is None and case.files.get(PICKLE) is not None:
                    result.notes.append("loaded_exactly_from_pickle")
        else:
            result.error = _error_text(error)
            if not isinstance(error, AdapterFormatError) and _claims_other_method(case.files):
                # nothing left in the files says Child-Tuning: another method's loader refused it, its own way
                result.notes.append("refused_as_another_method")
            elif not isinstance(error, AdapterFormatError):
                where = traceback.extract_tb(error.__traceback__)[-1]
                violations.append((f"wrong_exception:{type(error).__name__}",
                                   f"{_error_text(error)} [at {os.path.basename(where.filename)}:{where.lineno}]"))
            else:
                if not _names_file(str(error), path):
                    violations.append(("message_does_not_name_file", _error_text(error)))
                problem = _chain_problem(error)
                if problem:
                    violations.append(("cause_not_chained", problem))
            if subject is not None:
                after = ModelState.capture(subject)
                for field_name, description in before.diff(after):
                    violations.append((f"model_changed:{field_name}", description))
                try:
                    after_out = outputs(subject, source.batch)
                except Exception as exc:  # noqa: BLE001
                    violations.append((f"model_broken_after_refusal:{type(exc).__name__}", _error_text(exc)))
                else:
                    if not torch.equal(after_out, before_out):
                        violations.append(("outputs_changed_after_refusal",
                                           f"max |diff| {_max_diff(after_out, before_out)}"))
            if not violations:
                result.outcome = "refused_cleanly"
    result.seconds = time.perf_counter() - started
    shutil.rmtree(directory, ignore_errors=True)
    return result


# ================================================================================================ tallying
class Tally:
    """Outcome counts per mutation kind / variant / loader, and examples of each violation (fewest mutations first)."""

    def __init__(self, examples_per_violation: int = 3):
        self.cases = 0
        self.mutations = 0
        self.seconds = 0.0
        self.outcomes: Counter = Counter()
        self.by_loader: dict[str, Counter] = defaultdict(Counter)
        self.by_kind: dict[str, Counter] = defaultdict(Counter)
        self.by_variant: dict[str, Counter] = defaultdict(Counter)
        self.by_source: dict[str, Counter] = defaultdict(Counter)
        self.by_signing: dict[str, Counter] = defaultdict(Counter)
        self.violation_codes: dict[str, Counter] = defaultdict(Counter)  # code -> loader -> count
        self.violation_kinds: dict[str, Counter] = defaultdict(Counter)  # code -> kind (single-mutation cases)
        self.examples: dict[tuple[str, str], list[Result]] = defaultdict(list)
        self.examples_per_violation = examples_per_violation
        self.notes: dict[str, Counter] = defaultdict(Counter)  # note -> loader -> count
        # single-mutation cases: (variant, loader) -> outcome / violation code -> count
        self.single: dict[tuple[str, str], Counter] = defaultdict(Counter)

    def add(self, result: Result) -> None:
        case = result.case
        self.cases += 1
        self.mutations += len(case.mutations)
        self.seconds += result.seconds
        self.outcomes[result.outcome] += 1
        self.by_loader[case.loader][result.outcome] += 1
        self.by_source[case.source][result.outcome] += 1
        self.by_signing[case.signing or "(no tensor rewritten, or no checksums)"][result.outcome] += 1
        for mutation in case.mutations:
            self.by_kind[mutation.kind][result.outcome] += 1
            self.by_variant[f"{mutation.kind}:{mutation.variant}"][result.outcome] += 1
        for note in result.notes:
            self.notes[note][case.loader] += 1
        if len(case.mutations) == 1:
            cell = self.single[(f"{case.mutations[0].kind}:{case.mutations[0].variant}", case.loader)]
            cell[f"<{result.outcome}>"] += 1
            cell.update({code for code, _ in result.violations})
        for code in sorted({code for code, _ in result.violations}):
            self.violation_codes[code][case.loader] += 1
            if len(case.mutations) == 1:
                self.violation_kinds[code][f"{case.mutations[0].kind}:{case.mutations[0].variant}"] += 1
            examples = self.examples[(code, case.loader)]
            examples.append(result)
            examples.sort(key=lambda r: len(r.case.mutations))
            del examples[self.examples_per_violation:]

    def merge(self, other: "Tally") -> None:
        self.cases += other.cases
        self.mutations += other.mutations
        self.seconds += other.seconds
        self.outcomes.update(other.outcomes)
        for mine, theirs in ((self.by_loader, other.by_loader), (self.by_kind, other.by_kind),
                             (self.by_variant, other.by_variant), (self.by_source, other.by_source),
                             (self.by_signing, other.by_signing),
                             (self.violation_codes, other.violation_codes),
                             (self.violation_kinds, other.violation_kinds), (self.notes, other.notes),
                             (self.single, other.single)):
            for key, counter in theirs.items():
                mine[key].update(counter)
        for key, results in other.examples.items():
            merged = sorted(self.examples[key] + results, key=lambda r: len(r.case.mutations))
            self.examples[key] = merged[: self.examples_per_violation]

    @staticmethod
    def _table(title: str, rows: dict[str, Counter]) -> list[str]:
        columns = ("loaded_exactly", "refused_cleanly", "violation")
        width = max([len(title)] + [len(key) for key in rows]) + 2
        lines = [f"{title:<{width}}" + "".join(f"{c:>17}" for c in columns)]
        for key in sorted(rows):
            lines.append(f"{key:<{width}}" + "".join(f"{rows[key][c]:>17}" for c in columns))
        return lines

    def summary(self, details: bool = True, variants: bool = False, examples_shown: int = 2) -> str:
        lines = [
            f"fault injection: {self.cases} cases, {self.mutations} mutations, {self.seconds:.1f} s in loads/checks",
            "  " + ", ".join(f"{name}: {self.outcomes[name]}" for name in ("loaded_exactly", "refused_cleanly",
                                                                          "violation")),
            "",
        ]
        lines += self._table("per loader", self.by_loader) + [""]
        lines += self._table("per source", self.by_source) + [""]
        lines += self._table("checksums of rewritten tensors", self.by_signing) + [""]
        lines += self._table("per mutation kind (cases containing it)", self.by_kind) + [""]
        if variants:
            lines += self._table("per mutation variant", self.by_variant) + [""]
        for note, counter in sorted(self.notes.items()):
            per_loader = ", ".join(f"{loader}={count}" for loader, count in sorted(counter.items()))
            lines.append(f"note {note}: {sum(counter.values())}  [{per_loader}]")
        if self.violation_codes:
            lines.append("violations (cases per code and loader):")
            for code in sorted(self.violation_codes):
                per_loader = ", ".join(f"{loader}={n}" for loader, n in sorted(self.violation_codes[code].items()))
                lines.append(f"  {code}: {sum(self.violation_codes[code].values())}  [{per_loader}]")
                if self.violation_kinds.get(code):
                    top = ", ".join(f"{kind}={n}" for kind, n in self.violation_kinds[code].most_common(12))
                    lines.append(f"      single-mutation cases by variant: {top}")
            if details:
                lines.append("")
                lines.append("examples (fewest mutations first):")
                for (code, loader), results in sorted(self.examples.items()):
                    for result in results[:examples_shown]:
                        detail = next(d for c, d in result.violations if c == code)
                        lines.append(f"  {code} <- {result.case.describe()}")
                        lines.append(f"      {detail[:300]}")
        return "\n".join(lines)

    def matrix(self) -> str:
        """Per single-mutation variant and loader: how many cases, how they ended, which violation codes (the
        model_changed:* fields folded into one entry)."""
        lines = ["single-mutation cases: variant | loader: cases (exact/refused/violating) codes"]
        for variant in sorted({variant for variant, _ in self.single}):
            lines.append(variant)
            for loader in LOADER_NAMES:
                cell = self.single.get((variant, loader))
                if not cell:
                    continue
                changed = sorted(code.split(":", 1)[1] for code in cell if code.startswith("model_changed:"))
                codes = [f"{code}={n}" if n != cell["<violation>"] else code
                         for code, n in sorted(cell.items()) if not code.startswith(("<", "model_changed:"))]
                if changed:
                    codes.append(f"model_changed[{','.join(changed)}]")
                total = sum(cell[f"<{name}>"] for name in ("loaded_exactly", "refused_cleanly", "violation"))
                lines.append(f"    {loader:<28} {total:>4} ({cell['<loaded_exactly>']}/{cell['<refused_cleanly>']}/"
                             f"{cell['<violation>']}) {' '.join(codes)}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "cases": self.cases, "mutations": self.mutations, "outcomes": dict(self.outcomes),
            "by_loader": {k: dict(v) for k, v in self.by_loader.items()},
            "by_kind": {k: dict(v) for k, v in self.by_kind.items()},
            "by_signing": {k: dict(v) for k, v in self.by_signing.items()},
            "by_variant": {k: dict(v) for k, v in self.by_variant.items()},
            "violations": {k: dict(v) for k, v in self.violation_codes.items()},
            "notes": {k: dict(v) for k, v in self.notes.items()},
            "single_mutation_matrix": {f"{variant} | {loader}": dict(cell)
                                       for (variant, loader), cell in self.single.items()},
            "violations_by_variant": {k: dict(v) for k, v in self.violation_kinds.items()},
            "examples": {f"{code} | {loader}": [r.report() for r in results]
                         for (code, loader), results in self.examples.items()},
        }


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
