"""Child-Tuning and its peers at LLM shape: a randomly initialised Llama, causal-LM loss, gradient checkpointing.

Methods, each in its own process (bench.py's workers and helpers): full fine-tuning (fp32 master weights + AdamW,
bf16 autocast when --dtypes has bf16: the Trainer's usual mixed precision), LoRA r=16 on every linear layer of the
decoder layers, SHiRA on the same layers at LoRA's trainable count, Child-Tuning-D at each of --reserve-ps (``lora``:
LoRA's trainable count; selection "fisher" on the benchmark batches) and Child-Tuning-F.

    python3 benchmarks/llm_bench.py --shapes tinyllama-1.1b --dtypes bf16,fp32 --steps 3
    python3 benchmarks/llm_bench.py --device cuda --shapes tinyllama-1.1b,llama3-8b --dtypes bf16

Memory on CPU is the process's RSS (peak: VmHWM) as in bench.py; on CUDA, torch.cuda.max_memory_allocated (peak)
and memory_allocated (held), i.e. tensors only, without the caching allocator's reserve. "Peak" is the absolute
peak over the steps (for full FT it includes the fp32 master weights); "setup peak" covers creating the adapter and,
for D, the Fisher pass and selection. On a CPU without native bf16, bf16 matmuls are slow: read memory from the
bf16 rows and step-time ratios from the fp32 rows.

Writes benchmarks/results/<name>.json and .md (--append adds to an existing <name>.json, e.g. one call per shape).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import bench

HERE = Path(__file__).resolve().parent
# (hidden, layers, intermediate, attention heads, key-value heads, vocab)
SHAPES = {
    "llama-tiny": (64, 2, 176, 4, 2, 1000),
    "tinyllama-1.1b": (2048, 22, 5632, 32, 4, 32000),
    "llama3-8b": (4096, 32, 14336, 32, 8, 128256),
}
METHODS = ["full_ft", "lora", "shira", "childtuning_d", "childtuning_f"]
LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK = 16
DRIVER_ONLY = ("worker", "shapes", "methods", "dtypes", "reserve_ps", "out", "name", "append", "budget_s")
MEMORY_FIELDS = ("peak_bytes", "peak_training_bytes", "setup_peak_bytes", "held_between_steps_bytes")
# part 5 of issue 14: D's step and peak against LoRA's, and the 8B Fisher pass + selection
GOAL_STEP_RATIO, GOAL_PEAK_RATIO, GOAL_FISHER_SECONDS = 1.10, 1.05, 120.0


# ------------------------------------------------------------------------------------------------- worker side
class _Memory:
    """Bytes in use: CUDA's allocator counters on a GPU, the process's RSS on CPU (bench.py's helpers)."""

    def __init__(self, device) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def current(self) -> int:
        """In use now, after what was freed is given back (so earlier phases' temporaries do not count)."""
        self.sync()
        if self.cuda:
            return self.torch.cuda.memory_allocated()
        bench._return_freed_memory()
        return bench._rss_bytes("VmRSS")

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:
            bench._reset_peak_rss()

    def peak(self) -> int:
        self.sync()
        return self.torch.cuda.max_memory_allocated() if self.cuda else bench._rss_bytes("VmHWM")


def _build(shape: str, layers: int | None, dtype, device):
    """A random-init Llama of `shape`, created on `device` in `dtype` directly (no fp32 copy of an 8B model first)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, num_layers, intermediate, heads, kv_heads, vocab = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers or num_layers,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def _batch(vocab: int, batch_size: int, seq_len: int, device) -> dict:
    """Random tokens; the labels are the inputs (the model shifts them for next-token prediction)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}


def _decoder_linears(model) -> list:
    """The Linear layers LoRA, SHiRA and Child-Tuning tune: every projection of the decoder layers."""
    return [module for name, module in model.named_modules() if name.split(".")[-1] in LINEAR_NAMES]


def _reserve_p(value: str, linears: list) -> float:
    """A fraction, or "lora": the fraction of the tuned entries that LoRA r=16 trains (r * (in + out) per Linear)."""
    if value != "lora":
        return float(value)
    lora = sum(LORA_RANK * (linear.in_features + linear.out_features) for linear in linears)
    return lora / sum(linear.in_features * linear.out_features for linear in linears)


def _device_random_mask(base_layer, r: int, **kwargs):
    """SHiRA's random mask (r * (in + out) entries) drawn on the weight's device: peft's random_mask draws a CPU
    randperm over every weight, minutes of setup at 8B that are no part of what is compared here."""
    import torch

    weight = base_layer.weight
    generator = torch.Generator(device=weight.device).manual_seed(0)
    count = r * (weight.shape[0] + weight.shape[1])
    chosen = torch.randperm(weight.numel(), generator=generator, device=weight.device)[:count]
    mask = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
    return mask.index_fill_(0, chosen, 1).view(weight.shape)


def _adapter_config(method: str, reserve_p: float):
    from peft import LoraConfig, ShiraConfig

    from peft_childtuning import ChildTuningConfig

    if method == "lora":
        return LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=LINEAR_NAMES, task_type="CAUSAL_LM")
    if method == "shira":  # r gives SHiRA r * (in + out) entries per Linear: LoRA's count at the same r
        config = ShiraConfig(r=LORA_RANK, target_modules=LINEAR_NAMES, task_type="CAUSAL_LM")
        config.mask_fn = _device_random_mask
        return config
    if method == "childtuning_d":  # the default targets for llama: the same seven projections
        return ChildTuningConfig(mode="d", reserve_p=reserve_p, task_type="CAUSAL_LM")
    return ChildTuningConfig(mode="f", reserve_p=reserve_p, task_type="CAUSAL_LM")


@contextlib.contextmanager
def _timed_fisher_pass(meter: _Memory, record: dict):
    """Time the Fisher passes inside detect_child_network (fisher._fisher_pass, private: one call per chunk), so the
    pass and the selection are reported apart."""
    import importlib

    fisher = importlib.import_module("peft_childtuning.fisher")
    fisher_pass = fisher._fisher_pass
    record["fisher_pass_seconds"] = 0.0

    def timed(*args, **kwargs):
        start = time.perf_counter()
        scores = fisher_pass(*args, **kwargs)
        meter.sync()
        record["fisher_pass_seconds"] += time.perf_counter() - start
        return scores

    fisher._fisher_pass = timed
    try:
        yield
    finally:
        fisher._fisher_pass = fisher_pass


def run_worker(args: argparse.Namespace) -> dict:
    """One method's figures on one shape and dtype."""
    import torch

    import peft_childtuning  # noqa: F401  (registers the tuner)
    from peft import get_peft_model

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    method = args.worker
    mixed_precision = method == "full_ft" and dtype == torch.bfloat16
    meter = _Memory(device)
    model = _build(args.shape, args.layers, torch.float32 if method == "full_ft" else dtype, device)
    batch = _batch(model.config.vocab_size, args.batch_size, args.seq_len, device)
    linears = _decoder_linears(model)
    result: dict = {
        "method": method,
        "shape": args.shape,
        "layers": model.config.num_hidden_layers,
        "dtype": args.dtype + (" autocast, fp32 master" if mixed_precision else ""),
        "device": args.device,
        "tokens_per_step": args.batch_size * args.seq_len,
        "model_entries": sum(parameter.numel() for parameter in model.parameters()),
    }
    model_bytes = meter.current()
    meter.reset_peak()
    start = time.perf_counter()
    if method != "full_ft":
        reserve_p = _reserve_p(args.reserve_p, linears) if method == "childtuning_d" else args.reserve_p_f
        model = get_peft_model(model, _adapter_config(method, reserve_p))
        result["reserve_p"] = reserve_p
        if method == "childtuning_d":
            with _timed_fisher_pass(meter, result):
                detect_start = time.perf_counter()
                model.detect_child_network([batch] * args.fisher_batches, progress=False)
                meter.sync()
            result["selection_seconds"] = time.perf_counter() - detect_start - result["fisher_pass_seconds"]
    model.train()
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, weight_decay=0.0)
    meter.sync()
    result["setup_seconds"] = time.perf_counter() - start
    result["setup_peak_bytes"] = meter.peak()
    meter.current()
    meter.reset_peak()
    step_times = []
    for step in range(args.warmup + args.steps):
        meter.sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.sync()
        if step >= args.warmup:
            step_times.append(time.perf_counter() - start)
    trainable = sum(parameter.numel() for parameter in parameters)
    result["loss"] = float(loss)
    result["peak_bytes"] = meter.peak()
    result["model_bytes"] = model_bytes
    result["peak_training_bytes"] = result["peak_bytes"] - model_bytes
    # what stays between steps: trainable tensors, optimizer state, child positions (gradients are freed)
    result["held_between_steps_bytes"] = meter.current() - model_bytes
    result["trainable_entries"] = trainable
    result["held_bytes_per_entry"] = result["held_between_steps_bytes"] / trainable
    result["step_seconds"] = step_times
    result["median_step_seconds"] = statistics.median(step_times)
    result["tokens_per_second"] = result["tokens_per_step"] / result["median_step_seconds"]
    if method != "full_ft":
        with tempfile.TemporaryDirectory(prefix="ctllm_") as adapter_dir:
            model.save_pretrained(adapter_dir)
            result["adapter_bytes"] = sum(path.stat().st_size for path in Path(adapter_dir).glob("*.safetensors"))
        result["adapter_bytes_per_entry"] = result["adapter_bytes"] / trainable
    return result


# ------------------------------------------------------------------------------------------------- driver side
def _label(method: str, reserve_p: str | None) -> str:
    return f"{method}@{reserve_p}" if reserve_p is not None else method


def _planned(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(method, reserve_p) in the order run: D once per --reserve-ps entry."""
    plan = []
    for method in [name for name in args.methods.split(",") if name]:
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r}; known: {METHODS}")
        reserve_ps = args.reserve_ps.split(",") if method == "childtuning_d" else [None]
        plan += [(method, reserve_p) for reserve_p in reserve_ps]
    return plan


def _run_shape(args: argparse.Namespace, shape: str, dtype: str, deadline: float | None) -> dict:
    """Each planned method in its own worker; a worker that fails or outlives the budget is recorded, not fatal."""
    plan = {_label(method, reserve_p): (method, reserve_p) for method, reserve_p in _planned(args)}

    def spawn(label: str) -> dict:
        method, reserve_p = plan[label]
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout < 1:
            return {"method": method, "error": "skipped: time budget spent"}
        try:
            return bench._spawn(
                args, method, script=Path(__file__).resolve(), driver_only=DRIVER_ONLY, timeout=timeout,
                shape=shape, dtype=dtype, reserve_p=reserve_p,
            )
        except subprocess.TimeoutExpired:
            return {"method": method, "error": f"timed out (time budget {args.budget_s} s)"}
        except RuntimeError as error:
            return {"method": method, "error": str(error)[-2000:]}

    runs = bench.interleaved_rounds(list(plan), args.rounds, spawn, f"{shape} {dtype}")
    return {label: bench.merge_rounds(label_runs, MEMORY_FIELDS) for label, label_runs in runs.items()}


def _goals(runs: dict, shape: str) -> list[dict]:
    """Part 5's goals: every D's step within 1.10x LoRA's, D at LoRA's count within 1.05x LoRA's peak, and (8B)
    the Fisher pass + selection within 2 minutes."""
    lora = runs.get("lora", {})
    goals = []
    for label, run in runs.items():
        if not label.startswith("childtuning_d@") or "median_step_seconds" not in run:
            continue
        if "median_step_seconds" in lora:
            ratio = run["median_step_seconds"] / lora["median_step_seconds"]
            goals.append({"goal": f"{label} step <= {GOAL_STEP_RATIO}x LoRA's", "value": ratio, "met": ratio <= GOAL_STEP_RATIO})
        if label == "childtuning_d@lora" and "peak_bytes" in lora:
            ratio = run["peak_bytes"] / lora["peak_bytes"]
            goals.append({"goal": f"{label} peak <= {GOAL_PEAK_RATIO}x LoRA's", "value": ratio, "met": ratio <= GOAL_PEAK_RATIO})
        if shape == "llama3-8b":
            seconds = run["fisher_pass_seconds"] + run["selection_seconds"]
            goals.append({"goal": f"{label} Fisher pass + selection <= {GOAL_FISHER_SECONDS:.0f} s", "value": seconds, "met": seconds <= GOAL_FISHER_SECONDS})
    return goals


def _mib(value: float | None) -> str:
    return "" if value is None else f"{value / 2**20:,.0f}"


def _markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}", ""]
    for key, entry in results["runs"].items():
        runs = entry["methods"]
        lora = runs.get("lora", {})
        first = next((run for run in runs.values() if "layers" in run), {})
        lines += [
            f"### {key} ({first.get('layers', '?')} layers, {first.get('tokens_per_step', '?')} tokens per step)",
            "",
            f"Settings: {json.dumps(entry['settings'])}",
            "",
            "| method | step s | vs LoRA | tokens/s | peak MiB | vs LoRA | training peak MiB | held between steps MiB"
            " | trainable entries | held bytes/entry | adapter bytes/entry | setup peak MiB | Fisher pass s | selection s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, run in runs.items():
            if "median_step_seconds" not in run:
                error = run.get("error", "failed").strip().splitlines()[-1][:160].replace("|", "/")
                lines.append(f"| {label} | {error} |" + " |" * 12)
                continue
            cells = [
                label,
                f"{run['median_step_seconds']:.3f}",
                bench._ratio(run["median_step_seconds"], lora.get("median_step_seconds")),
                f"{run['tokens_per_second']:,.0f}",
                _mib(run["peak_bytes"]),
                bench._ratio(run["peak_bytes"], lora.get("peak_bytes")),
                _mib(run["peak_training_bytes"]),
                _mib(run["held_between_steps_bytes"]),
                f"{run['trainable_entries']:,}",
                f"{run['held_bytes_per_entry']:.2f}",
                f"{run['adapter_bytes_per_entry']:.2f}" if "adapter_bytes_per_entry" in run else "",
                _mib(run["setup_peak_bytes"]),
                f"{run['fisher_pass_seconds']:.2f}" if "fisher_pass_seconds" in run else "",
                f"{run['selection_seconds']:.2f}" if "selection_seconds" in run else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if entry["goals"]:
            note = "" if entry["device"] == "cuda" else " (set for CUDA: on CPU only a check that the script computes them)"
            lines += ["", f"Goals{note}:", ""]
            lines += [f"- {goal['goal']}: {goal['value']:.2f} — {'met' if goal['met'] else 'NOT met'}" for goal in entry["goals"]]
        lines.append("")
    return "\n".join(lines)


def _machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    return f"{os.cpu_count()} CPU cores"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tinyllama-1.1b", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--reserve-ps", default="0.01,0.05,0.3,lora", help="Child-Tuning-D's; 'lora': LoRA's count")
    parser.add_argument("--reserve-p-f", type=float, default=0.3, help="Child-Tuning-F's")
    parser.add_argument("--dtypes", default="bf16", help="fp32 and/or bf16 (full FT: fp32 master + bf16 autocast)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--layers", type=int, help="override the shape's number of layers (smaller checks)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--fisher-batches", type=int, default=1)
    parser.add_argument("--budget-s", type=float, help="wall-clock limit of this call; later methods are skipped")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--name", default="llm_bench")
    parser.add_argument("--append", action="store_true", help="add to an existing <name>.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--reserve-p", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return

    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    out = Path(args.out)
    path = out / f"{args.name}.json"
    settings = {key: value for key, value in vars(args).items() if key not in ("worker", "shape", "dtype", "reserve_p", "out")}
    results = json.loads(path.read_text()) if args.append and path.exists() else {"runs": {}}
    results["machine"] = _machine(args.device)
    for shape in [name for name in args.shapes.split(",") if name]:
        for dtype in [name for name in args.dtypes.split(",") if name]:
            runs = _run_shape(args, shape, dtype, deadline)
            results["runs"][f"{shape} {dtype} {args.device}"] = {
                "shape": shape, "dtype": dtype, "device": args.device, "settings": settings, "methods": runs,
                "goals": _goals(runs, shape),
            }
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    markdown = _markdown(results)
    (out / f"{args.name}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
