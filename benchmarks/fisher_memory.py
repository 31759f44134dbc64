"""Peak memory of Child-Tuning-D's Fisher pass (with its selection) against a training step's, on one model (issue #14).

The model is a LlamaForCausalLM of TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 32 heads, 4 kv heads)
with `--layers` decoder layers, in float32 on CPU; every linear layer of the decoder layers is tuned; a batch is
`--batch-size` x `--seq-len` random tokens. Each configuration runs in its own process:

- ``fisher``: ``get_peft_model`` (selection "fisher") + ``detect_child_network`` over `--fisher-batches` batches,
  with ``fisher_chunks`` = `--chunks` (a comma-separated list; "1" is the single pass, "auto" the default);
- ``train``: ``get_peft_model`` (selection "random", the same reserve_p) + AdamW steps on the same batch.

Memory is the process's peak RSS above what it held once the base model was built (``VmHWM`` reset through
``/proc/self/clear_refs``, freed memory given back with ``malloc_trim`` first; the helpers of bench.py).

    python3 benchmarks/fisher_memory.py --reserve-p 0.013,0.05 --chunks 1,auto

Writes benchmarks/results/fisher_memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import _reset_peak_rss, _return_freed_memory, _rss_bytes  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _build(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_attention_heads=32,
        num_key_value_heads=4,
        num_hidden_layers=layers,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(config).float()


def _worker(args: argparse.Namespace) -> dict:
    import torch
    from peft import get_peft_model

    import peft_childtuning  # noqa: F401  (registers the tuner)
    from peft_childtuning import ChildTuningConfig

    base = _build(args.layers)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    batch = {"input_ids": tokens, "labels": tokens}
    _return_freed_memory()
    rss_after_build = _rss_bytes("VmRSS")
    _reset_peak_rss()
    selection = "fisher" if args.worker == "fisher" else "random"
    config = ChildTuningConfig(
        mode="d", selection=selection, reserve_p=args.reserve_p, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    model.train()
    result: dict = {"worker": args.worker, "reserve_p": args.reserve_p}
    started = time.perf_counter()
    if args.worker == "fisher":
        kwargs = {}  # "legacy": the call without the option, for measuring a revision before it
        if args.chunk != "legacy":
            kwargs["fisher_chunks"] = args.chunk if args.chunk == "auto" else int(args.chunk)
        model.detect_child_network([batch] * args.fisher_batches, progress=False, **kwargs)
        result["chunks"] = args.chunk
    else:
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=1e-5, weight_decay=0.0)
        for _ in range(args.steps):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_bytes"] = _rss_bytes("VmHWM") - rss_after_build
    result["child_entries"] = sum(model.peft_config["default"].child_sizes.values())
    return result


def _spawn(args: argparse.Namespace, worker: str, reserve_p: float, chunk: str = "") -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--reserve-p", str(reserve_p)]
    command += ["--chunk", chunk] if chunk else []
    for option in ("layers", "batch_size", "seq_len", "fisher_batches", "steps"):
        command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"worker {worker} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _markdown(runs: list[dict], settings: dict) -> str:
    lines = [
        f"Settings: {json.dumps(settings)}",
        "",
        "| reserve_p | configuration | peak RSS above the built model MiB | vs training | seconds |",
        "|---|---|---|---|---|",
    ]
    training = {run["reserve_p"]: run["peak_rss_bytes"] for run in runs if run["worker"] == "train"}
    for run in runs:
        name = "training steps" if run["worker"] == "train" else f"Fisher pass, fisher_chunks={run['chunks']}"
        ratio = run["peak_rss_bytes"] / training[run["reserve_p"]]
        lines.append(
            f"| {run['reserve_p']} | {name} | {run['peak_rss_bytes'] / 2**20:.0f} | {ratio:.2f}x "
            f"| {run['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reserve-p", default="0.013,0.05")
    parser.add_argument("--chunks", default="1,auto", help="fisher_chunks values; 'legacy' passes none")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--fisher-batches", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--name", default="fisher_memory")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.reserve_p = float(args.reserve_p)
        print(json.dumps(_worker(args)))
        return
    settings = {key: value for key, value in vars(args).items() if key not in ("worker", "chunk", "out", "name")}
    runs = []
    for reserve_p in [float(value) for value in args.reserve_p.split(",")]:
        for worker, chunk in [("train", "")] + [("fisher", chunk) for chunk in args.chunks.split(",")]:
            run = _spawn(args, worker, reserve_p, chunk)
            runs.append(run)
            print(f"[reserve_p {reserve_p}] {worker} {chunk}: {run['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    results = {"settings": settings, "machine": f"{os.cpu_count()} CPU cores", "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    markdown = _markdown(runs, settings)
    (out / f"{args.name}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
