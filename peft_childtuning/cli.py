"""`peft-childtuning`: inspect a saved Child-Tuning adapter, or merge it into its base model.

    peft-childtuning inspect ADAPTER_DIR [--json]
    peft-childtuning merge --base MODEL_DIR --adapter ADAPTER_DIR --out DIR [--dtype auto] [--overwrite]
                           [--ignore-base-mismatch]

`inspect` reads only adapter_config.json and the safetensors header (no tensors, no model): the mode, reserve_p,
selection, the child size, position encoding and bytes of every tuned tensor, the bytes of modules_to_save, the
totals, the bytes per child entry and the base fingerprint.

`merge` loads the base with the transformers Auto class the adapter's task type calls for (as AutoPeftModel does),
loads the adapter onto it with `PeftModel.from_pretrained` (which checks the file and the base fingerprint, and merges
at load), calls `merge_and_unload` and saves a plain transformers model directory, with the tokenizer files of the
adapter (or else of the base) directory when there are any. Its last line names that directory. Tensors that the
base checkpoint lacks but the adapter supplies (a classifier head in modules_to_save) are not reported as missing;
those that neither has are, in a warning.

User errors (a missing directory, a directory that is not a Child-Tuning adapter, a bad adapter file, a base it was
not tuned from) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import struct
import sys
import warnings
from collections.abc import Iterator
from typing import Any, Optional, Sequence

PROG = "peft-childtuning"
EXIT_USER_ERROR = 2
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_TYPE = "CHILDTUNING"
# peft's prefix of the keys of a saved adapter, and the Child-Tuning containers (see layer.TUNED_TENSOR_CONTAINERS)
_SAVED_PREFIX = "base_model.model."
_CONTAINERS = {
    "childtuning_values": ("weight", "values"),
    "childtuning_positions": ("weight", "positions"),
    "childtuning_bias_values": ("bias", "values"),
    "childtuning_bias_positions": ("bias", "positions"),
}
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
# the Auto class of each peft task type (AutoPeftModelFor... load the base with these)
_TASK_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CLIError(Exception):
    """A user error: reported as one line on stderr, exit status 2, no traceback."""


# ------------------------------------------------------------------------------------------------ reading an adapter
def read_adapter_config(adapter_dir: str) -> dict[str, Any]:
    """The adapter's config as a dict, after checking that the directory holds a Child-Tuning adapter."""
    if not os.path.exists(adapter_dir):
        raise CLIError(f"adapter directory {adapter_dir!r} does not exist")
    if not os.path.isdir(adapter_dir):
        raise CLIError(f"{adapter_dir!r} is not a directory; pass the directory that save_pretrained wrote")
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise CLIError(f"{adapter_dir!r} is not a PEFT adapter directory: it has no {ADAPTER_CONFIG}")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CLIError(f"cannot read {config_path}: {exc}") from None
    if not isinstance(config, dict):
        raise CLIError(f"{config_path} is not a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != PEFT_TYPE:
        raise CLIError(f"{adapter_dir!r} is not a Child-Tuning adapter (its peft_type is {peft_type!r})")
    return config


def read_safetensors_header(path: str) -> tuple[dict[str, Any], int]:
    """(the tensors' header entries by name, the header's size in bytes), checked against the file's size."""
    if not os.path.isfile(path):
        raise CLIError(f"{path} is missing: a Child-Tuning adapter is saved as {ADAPTER_WEIGHTS}")
    file_size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle:
            raw_length = handle.read(8)
            if len(raw_length) < 8:
                raise CLIError(f"{path} is truncated ({file_size} bytes): not a safetensors file")
            (header_length,) = struct.unpack("<Q", raw_length)
            if header_length > min(file_size - 8, _MAX_HEADER_BYTES):
                raise CLIError(f"{path} is truncated or corrupted: its header claims {header_length} bytes")
            header = json.loads(handle.read(header_length).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CLIError(f"{path} is corrupted: its safetensors header cannot be read ({exc})") from None
    if not isinstance(header, dict):
        raise CLIError(f"{path} is corrupted: its safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = file_size - 8 - header_length
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(offset, int) for offset in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
            or not isinstance(entry.get("shape"), list)
            or not isinstance(entry.get("dtype"), str)
        ):
            raise CLIError(f"{path} is truncated or corrupted: the entry of {name!r} does not fit the file")
    return header, 8 + header_length


def _entry_bytes(entry: dict[str, Any]) -> int:
    return entry["data_offsets"][1] - entry["data_offsets"][0]


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def _split_key(file_key: str) -> tuple[Optional[str], Optional[str], str]:
    """(tuned tensor key such as 'bert....query.weight', 'values'/'positions', module path) of a saved key, or
    (None, None, key without peft's prefix) for a key that is not a Child-Tuning container."""
    key = file_key[len(_SAVED_PREFIX):] if file_key.startswith(_SAVED_PREFIX) else file_key
    module, _, container = key.rpartition(".")
    if container in _CONTAINERS and module:
        tensor_name, part = _CONTAINERS[container]
        return f"{module}.{tensor_name}", part, module
    return None, None, key


def inspect_adapter(adapter_dir: str) -> dict[str, Any]:
    """Everything `inspect` reports, as a JSON-serialisable dict (reads no tensor data)."""
    config = read_adapter_config(adapter_dir)
    weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    header, header_bytes = read_safetensors_header(weights_path)
    mode = config.get("mode", "d")
    child_sizes = config.get("child_sizes") or {}
    child_encodings = config.get("child_encodings") or {}
    child_lengths = config.get("child_encoded_lengths") or {}  # gap16x streams' lengths (variable)

    tuned: dict[str, dict[str, Any]] = {}
    modules_to_save = []
    for file_key, entry in header.items():
        tensor_key, part, stripped = _split_key(file_key)
        if tensor_key is None:
            modules_to_save.append(
                {
                    "name": stripped,
                    "dtype": _DTYPE_NAMES.get(entry["dtype"], entry["dtype"]),
                    "shape": entry["shape"],
                    "bytes": _entry_bytes(entry),
                }
            )
            continue
        record = tuned.setdefault(tensor_key, {"name": tensor_key})
        record[f"{part}_key"] = file_key
        record[f"{part}_dtype"] = _DTYPE_NAMES.get(entry["dtype"], entry["dtype"])
        record[f"{part}_shape"] = entry["shape"]
        record[f"{part}_bytes"] = _entry_bytes(entry)

    problems = []
    if mode == "d":
        for tensor_key in child_sizes:
            if tensor_key not in tuned:
                problems.append(f"{tensor_key}: in the config's child_sizes, but the file has no tensor for it")
        for tensor_key in tuned:
            if tensor_key not in child_sizes:
                problems.append(f"{tensor_key}: in the file, but not in the config's child_sizes")
    tensors = []
    for tensor_key, record in tuned.items():
        values_shape = record.get("values_shape")
        if values_shape is None:
            problems.append(f"{tensor_key}: the file has positions but no child values")
        if mode == "d":
            size = child_sizes.get(tensor_key)
            encoding = child_encodings.get(tensor_key, "int32")
            if "positions_shape" not in record:
                problems.append(f"{tensor_key}: the file has child values but no positions")
            elif (encoding == "gap16x" or tensor_key in child_lengths) and (
                child_lengths.get(tensor_key) != _numel(record["positions_shape"])
            ):
                problems.append(
                    f"{tensor_key}: the file's {encoding} positions have {_numel(record['positions_shape'])} words, "
                    f"the config's child_encoded_lengths records {child_lengths.get(tensor_key)}"
                )
            if size is not None and values_shape is not None and _numel(values_shape) != size:
                problems.append(
                    f"{tensor_key}: the file has {_numel(values_shape)} child values, the config says {size}"
                )
        else:
            size = _numel(values_shape) if values_shape is not None else 0
            encoding = "dense"
        value_bytes = record.get("values_bytes", 0)
        position_bytes = record.get("positions_bytes", 0)
        tensors.append(
            {
                "name": tensor_key,
                "child_size": int(size) if size is not None else None,
                "encoding": encoding,
                "values_dtype": record.get("values_dtype"),
                "value_bytes": value_bytes,
                "position_bytes": position_bytes,
                "bytes": value_bytes + position_bytes,
            }
        )
    tensors.sort(key=lambda record: record["name"])
    modules_to_save.sort(key=lambda record: record["name"])

    file_bytes = os.path.getsize(weights_path)
    child_entries = sum(record["child_size"] or 0 for record in tensors)
    value_bytes = sum(record["value_bytes"] for record in tensors)
    position_bytes = sum(record["position_bytes"] for record in tensors)
    return {
        "adapter_dir": os.path.abspath(adapter_dir),
        "peft_type": config.get("peft_type"),
        "mode": mode,
        "reserve_p": config.get("reserve_p"),
        "selection": config.get("selection"),
        "seed": config.get("seed"),
        "task_type": config.get("task_type"),
        "tune_bias": config.get("tune_bias", False),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "base_fingerprint": config.get("base_fingerprint"),
        "child_network_chosen": mode == "f" or config.get("child_sizes") is not None,
        "tensors": tensors,
        "modules_to_save": modules_to_save,
        "totals": {
            "tuned_tensors": len(tensors),
            "child_entries": child_entries,
            "value_bytes": value_bytes,
            "position_bytes": position_bytes,
            "child_bytes": value_bytes + position_bytes,
            "modules_to_save_bytes": sum(record["bytes"] for record in modules_to_save),
            "header_bytes": header_bytes,
            "file_bytes": file_bytes,
        },
        "total_bytes": file_bytes,
        # the sparse diff's own cost per child entry (values + positions), and the whole file's
        "bytes_per_child_entry": (value_bytes + position_bytes) / child_entries if child_entries else None,
        "file_bytes_per_child_entry": file_bytes / child_entries if child_entries else None,
        "problems": problems,
    }


def _format_report(report: dict[str, Any]) -> str:
    mode_words = {"d": "task-driven child network", "f": "task-free, tuned tensors stored whole"}
    totals = report["totals"]
    lines = [
        f"Child-Tuning adapter: {report['adapter_dir']}",
        f"  mode:                   {report['mode']} ({mode_words.get(report['mode'], 'unknown')})",
        f"  reserve_p:              {report['reserve_p']}",
        f"  selection:              {report['selection'] if report['mode'] == 'd' else 'n/a (mode f)'}",
        f"  seed:                   {report['seed']}",
        f"  task_type:              {report['task_type']}",
        f"  base model:             {report['base_model_name_or_path']}",
    ]
    fingerprint = report["base_fingerprint"]
    if isinstance(fingerprint, dict) and fingerprint.get("version") == 2:
        architecture = fingerprint.get("architecture") or {}
        lines.append(
            f"  base fingerprint:       {architecture.get('model_class', '?')}, {fingerprint.get('count', '?')} "
            f"tensors ({fingerprint.get('tensors', '?')})"
        )
    elif isinstance(fingerprint, dict):
        lines.append(f"  base fingerprint:       tuned in {fingerprint.get('tuned_dtype', '?')} (before version 2)")
    else:
        lines.append("  base fingerprint:       none recorded")
    if not report["child_network_chosen"]:
        lines.append("  child network:          not chosen yet (saved before detect_child_network)")
    name_width = max([len(record["name"]) for record in report["tensors"]] + [len("tensor")])
    lines += ["", f"  {'tensor':<{name_width}}  {'child':>9}  {'encoding':<8}  {'values':>10}  {'positions':>10}  "
              f"{'bytes':>10}"]
    for record in report["tensors"]:
        size = "?" if record["child_size"] is None else record["child_size"]
        lines.append(
            f"  {record['name']:<{name_width}}  {size:>9}  {record['encoding']:<8}  {record['value_bytes']:>10}  "
            f"{record['position_bytes']:>10}  {record['bytes']:>10}"
        )
    if report["modules_to_save"]:
        lines += ["", "  modules_to_save (stored whole):"]
        for record in report["modules_to_save"]:
            shape = "x".join(map(str, record["shape"])) or "scalar"
            lines.append(f"    {record['name']:<{name_width}}  {record['dtype']:<9} {shape:<12} {record['bytes']:>10}")
    dtypes = sorted({record["values_dtype"] for record in report["tensors"] if record["values_dtype"]})
    per_entry = report["bytes_per_child_entry"]
    per_entry_file = report["file_bytes_per_child_entry"]
    lines += [
        "",
        f"  tuned tensors:          {totals['tuned_tensors']}",
        f"  child entries (k):      {totals['child_entries']}",
        f"  child values:           {totals['value_bytes']} bytes ({', '.join(dtypes) or 'none'})",
        f"  child positions:        {totals['position_bytes']} bytes",
        f"  modules_to_save:        {totals['modules_to_save_bytes']} bytes",
        f"  safetensors header:     {totals['header_bytes']} bytes",
        f"  total bytes (file):     {totals['file_bytes']}",
        "  bytes per child entry:  "
        + ("n/a (no child entries)" if per_entry is None else f"{per_entry:.3f} (values + positions); "
           f"{per_entry_file:.3f} for the whole file"),
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ merging
def _auto_class_name(config: dict[str, Any], base_dir: str) -> tuple[str, str]:
    """(transformers class name, why) for loading the base: the task type's Auto class, as AutoPeftModel picks it;
    without a task type, the auto_mapping peft recorded, else the base's own architecture, else AutoModel."""
    task_type = config.get("task_type")
    if task_type:
        if task_type not in _TASK_AUTO_CLASSES:
            raise CLIError(
                f"unknown task_type {task_type!r} in the adapter config; known: {sorted(_TASK_AUTO_CLASSES)}"
            )
        return _TASK_AUTO_CLASSES[task_type], f"task_type {task_type}"
    auto_mapping = config.get("auto_mapping") or {}
    parent = str(auto_mapping.get("parent_library", ""))
    if auto_mapping.get("base_model_class") and (parent == "transformers" or parent.startswith("transformers.")):
        return str(auto_mapping["base_model_class"]), "the adapter's auto_mapping"
    try:
        with open(os.path.join(base_dir, "config.json"), encoding="utf-8") as handle:
            architectures = json.load(handle).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        architectures = []
    if architectures:
        return str(architectures[0]), "the base model's config.json"
    return "AutoModel", "no task type recorded"


def _copy_tokenizer(adapter_dir: str, base_dir: str, out_dir: str) -> Optional[str]:
    """Copy the tokenizer files of the adapter directory, or else of the base directory; returns the source."""
    for source in (adapter_dir, base_dir):
        present = [name for name in _TOKENIZER_FILES if os.path.isfile(os.path.join(source, name))]
        if present:
            for name in present:
                shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
            return source
    return None


def _keys_the_adapter_supplies(adapter_dir: str) -> set[str]:
    """The base's state-dict keys that the adapter file stores whole (its modules_to_save, e.g. the classifier head):
    a base checkpoint without them is complete once the adapter is loaded."""
    header, _ = read_safetensors_header(os.path.join(adapter_dir, ADAPTER_WEIGHTS))
    return {stripped for tensor_key, _, stripped in map(_split_key, header) if tensor_key is None}


class _HeldLoadReport(logging.Filter):
    """Holds back transformers' load report of the base (it calls the head the adapter brings 'MISSING, newly
    initialized'); `merge_adapter` reports only what the adapter does not supply, or shows the report when the load
    fails, since the error then refers to it."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True

    def show(self) -> None:
        for record in self.held:
            print(record.getMessage(), file=sys.stderr)


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No progress bars of loading and saving weights, and none of the warnings that a merge at load makes
    misleading: peft's 'All adapters are already merged' (the adapter merged while loading, as designed) and the
    deprecation that peft 0.21 triggers in transformers 5 (`is_gradient_checkpointing`)."""
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="All adapters are already merged", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            yield
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


def merge_adapter(
    base_dir: str,
    adapter_dir: str,
    out_dir: str,
    dtype: str = "auto",
    overwrite: bool = False,
    ignore_base_mismatch: bool = False,
) -> dict[str, Any]:
    """Merge a Child-Tuning adapter into its base and save a plain transformers model to `out_dir`."""
    config_dict = read_adapter_config(adapter_dir)
    if not os.path.isdir(base_dir):
        raise CLIError(f"base model directory {base_dir!r} does not exist")
    if not os.path.isfile(os.path.join(base_dir, "config.json")):
        raise CLIError(f"{base_dir!r} is not a transformers model directory: it has no config.json")
    if not os.path.isfile(os.path.join(adapter_dir, ADAPTER_WEIGHTS)):
        raise CLIError(f"{adapter_dir!r} has no {ADAPTER_WEIGHTS}")
    real_out = os.path.realpath(out_dir)
    if real_out in {os.path.realpath(base_dir), os.path.realpath(adapter_dir)}:
        raise CLIError("--out must be a new directory, not the base model or the adapter directory")
    if os.path.isfile(out_dir):
        raise CLIError(f"--out {out_dir!r} is a file")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise CLIError(f"--out {out_dir!r} exists and is not empty (pass --overwrite to write into it)")

    import torch
    import transformers
    from peft import PeftModel

    from .config import ChildTuningConfig
    from .layer import ChildTuningLayer
    from .sparse_format import AdapterFormatError

    class_name, reason = _auto_class_name(config_dict, base_dir)
    model_class = getattr(transformers, class_name, None)
    if model_class is None or not hasattr(model_class, "from_pretrained"):
        raise CLIError(f"transformers has no model class {class_name!r} (picked from {reason})")
    torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        config = ChildTuningConfig.from_pretrained(adapter_dir)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"the adapter config in {adapter_dir!r} is invalid: {exc}") from None
    if ignore_base_mismatch:
        config.ignore_base_mismatch = True
    supplied = _keys_the_adapter_supplies(adapter_dir)
    report = _HeldLoadReport()
    modeling_logger = logging.getLogger("transformers.modeling_utils")
    with _quiet_loading():
        modeling_logger.addFilter(report)
        try:
            base, loading_info = model_class.from_pretrained(base_dir, dtype=torch_dtype, output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as exc:
            report.show()
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CLIError(f"cannot load the base model from {base_dir!r} as {class_name}: {message}") from None
        finally:
            modeling_logger.removeFilter(report)
        missing = sorted(set(loading_info["missing_keys"]) - supplied)
        if missing:
            print(
                f"{PROG}: warning: the base checkpoint lacks {', '.join(missing)}, and the adapter does not supply "
                "them: they are newly initialized (random) in the merged model",
                file=sys.stderr,
            )
        try:
            model = PeftModel.from_pretrained(base, adapter_dir, config=config, is_trainable=False)
        except AdapterFormatError as exc:
            raise CLIError(f"cannot load the adapter {adapter_dir!r}: {exc}") from None
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CLIError(f"cannot load the adapter {adapter_dir!r} onto {base_dir!r}: {message}") from None
        merged = model.merge_and_unload()
        if any(isinstance(module, ChildTuningLayer) for module in merged.modules()):  # pragma: no cover - a bug
            raise RuntimeError("merge_and_unload left Child-Tuning layers in the model")
        os.makedirs(out_dir, exist_ok=True)
        merged.save_pretrained(out_dir)
    tokenizer_source = _copy_tokenizer(adapter_dir, base_dir, out_dir)
    return {
        "newly_initialized": missing,
        "out_dir": os.path.abspath(out_dir),
        "model_class": type(merged).__name__,
        "loaded_with": class_name,
        "class_picked_from": reason,
        "dtype": str(next(merged.parameters()).dtype).removeprefix("torch."),
        "tokenizer_copied_from": tokenizer_source,
    }


# ------------------------------------------------------------------------------------------------ the command line
def _cmd_inspect(args: argparse.Namespace) -> int:
    report = inspect_adapter(args.adapter_dir)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=False))
    else:
        print(_format_report(report))
    if report["problems"]:
        for problem in report["problems"]:
            print(f"{PROG}: error: {problem}", file=sys.stderr)
        print(f"{PROG}: error: the adapter file does not match its adapter_config.json", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    result = merge_adapter(
        args.base,
        args.adapter,
        args.out,
        dtype=args.dtype,
        overwrite=args.overwrite,
        ignore_base_mismatch=args.ignore_base_mismatch,
    )
    print(
        f"merged {args.adapter} into {args.base} ({result['loaded_with']}, picked from {result['class_picked_from']}; "
        f"{result['dtype']})"
    )
    if result["tokenizer_copied_from"]:
        print(f"tokenizer copied from {result['tokenizer_copied_from']}")
    else:
        print("no tokenizer files in the adapter or the base directory: none copied")
    print(f"saved the merged {result['model_class']} to {result['out_dir']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect or merge Child-Tuning (peft_childtuning) adapters."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    inspect_parser = commands.add_parser(
        "inspect", help="describe a saved adapter: mode, child sizes, encodings, bytes, fingerprint"
    )
    inspect_parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="directory written by save_pretrained")
    inspect_parser.add_argument("--json", action="store_true", help="machine-readable output")
    inspect_parser.set_defaults(func=_cmd_inspect)

    merge_parser = commands.add_parser(
        "merge", help="merge an adapter into its base and save a plain transformers model directory"
    )
    merge_parser.add_argument("--base", required=True, metavar="MODEL_DIR", help="the base model directory")
    merge_parser.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="the adapter directory")
    merge_parser.add_argument("--out", required=True, metavar="DIR", help="where to save the merged model")
    merge_parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype to load the base in (default: the dtype it was saved in)",
    )
    merge_parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out directory")
    merge_parser.add_argument(
        "--ignore-base-mismatch",
        action="store_true",
        help="merge even onto a base whose fingerprint differs from the adapter's (at your own risk)",
    )
    merge_parser.set_defaults(func=_cmd_merge)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `peft-childtuning`; returns the exit status (0, or 2 for user errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors (status 2), --help (status 0)
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # output piped into a program that stopped reading (e.g. `| head`)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
