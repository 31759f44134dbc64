"""torch.compile of a training step: graphs, graph breaks, and compiled against eager step time, per method.

For each method (LoRA, Child-Tuning-D, Child-Tuning-F) on a BERT built from a config, in one process:

1. the training forward (train mode, gradients on) is traced by ``torch._dynamo.explain``: graphs and graph breaks;
2. an eager model and a compiled copy of it (``torch.compile(model, backend=...)``) train side by side on the same
   batches, steps alternating between them (forward, backward, AdamW step), so the machine's noise spreads over both.
   The first compiled steps compile (their time is reported as the compile time); the step times are medians over
   the steps after `--warmup`, and any graph compiled after the warmup is counted as a recompile.

Each model gets one eager forward first (no gradients): Child-Tuning-D decodes its child positions at first use, and
BERT sets ``config.problem_type`` at its first loss; traced cold, each would be traced once and then recompiled.

    python3 benchmarks/compile.py                        # BERT hidden 256, 4 layers, batch 16 x 64, inductor
    python3 benchmarks/compile.py --backend aot_eager    # no C++ compiler needed; bit-exact against eager
    python3 benchmarks/compile.py --no-compile-cache     # the warmup then includes a compilation from scratch

Writes benchmarks/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
METHODS = ["lora", "childtuning_d", "childtuning_f"]
LABELS = {"lora": "LoRA", "childtuning_d": "Child-Tuning-D", "childtuning_f": "Child-Tuning-F"}


def _build(method: str, args: argparse.Namespace) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    from peft_childtuning import ChildTuningConfig

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden,
        hidden_dropout_prob=0.0,  # the eager and compiled models draw no dropout masks: their losses compare
        attention_probs_dropout_prob=0.0,
    )
    base = BertForSequenceClassification(config)
    if method == "lora":
        adapter = LoraConfig(task_type="SEQ_CLS", r=8, target_modules=["query", "key", "value", "dense"])
    else:
        adapter = ChildTuningConfig(
            mode=method[-1], selection="random", reserve_p=args.reserve_p, task_type="SEQ_CLS"
        )
    return get_peft_model(base, adapter).train()


def _batches(vocab: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    generator = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator),
            "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long),
            "labels": torch.randint(0, 2, (args.batch_size,), generator=generator),
        }
        for _ in range(4)
    ]


def _train_step(model: Any, optimizer: Any, batch: dict[str, Any]) -> tuple[float, float]:
    """(seconds, loss) of one training step."""
    started = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started, float(loss.detach())


def measure(method: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch._dynamo
    import torch._dynamo.testing

    eager = _build(method, args)
    batches = _batches(eager.config.vocab_size, args)
    with torch.no_grad():
        eager(**batches[0])
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(eager)(**batches[0])
    reasons = sorted({reason.reason.splitlines()[0] for reason in explanation.break_reasons})

    compiled_model = copy.deepcopy(eager)
    counter = torch._dynamo.testing.CompileCounterWithBackend(args.backend)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend=counter)
    trainable = [[p for p in m.parameters() if p.requires_grad] for m in (eager, compiled_model)]
    optimizers = [torch.optim.AdamW(parameters, lr=1e-4) for parameters in trainable]
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    losses: dict[str, list[float]] = {"eager": [], "compiled": []}
    compile_seconds = 0.0
    frames_after_warmup = 0
    for step in range(args.warmup + args.steps):
        batch = batches[step % len(batches)]
        for name, model, optimizer in (("eager", eager, optimizers[0]), ("compiled", compiled, optimizers[1])):
            seconds, loss = _train_step(model, optimizer, batch)
            losses[name].append(loss)
            if step >= args.warmup:
                times[name].append(seconds)
            elif name == "compiled":
                compile_seconds += seconds
        if step == args.warmup - 1:
            frames_after_warmup = counter.frame_count
    eager_ms = 1e3 * statistics.median(times["eager"])
    compiled_ms = 1e3 * statistics.median(times["compiled"])
    return {
        "graphs": explanation.graph_count,
        "graph_breaks": explanation.graph_break_count,
        "break_reasons": reasons,
        "graphs_compiled": counter.frame_count,
        "recompiles_after_warmup": counter.frame_count - frames_after_warmup,
        "warmup_seconds": compile_seconds,
        "eager_step_ms": eager_ms,
        "compiled_step_ms": compiled_ms,
        "compiled_over_eager": compiled_ms / eager_ms,
        "max_loss_difference": max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"])),
    }


def _markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lines = [
        f"# torch.compile of a training step ({settings['backend']})",
        "",
        f"BERT hidden {settings['hidden']}, {settings['layers']} layers, batch {settings['batch_size']} x "
        f"{settings['seq_len']}, AdamW; {results['machine']}, {settings['threads']} thread(s), torch "
        f"{results['torch']}. Graphs and breaks: `torch._dynamo.explain` of the training forward. Step times: "
        f"median of {settings['steps']} steps after {settings['warmup']} warmup steps, eager and compiled "
        "alternating; the warmup column is the compiled model's warmup steps (compilation included"
        f"{', caches off' if settings['no_compile_cache'] else ', inductor caches on'}).",
        "",
        "| method | graphs | graph breaks | eager step ms | compiled step ms | compiled / eager | warmup s | "
        "recompiles after warmup | max abs loss difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, run in results["methods"].items():
        lines.append(
            f"| {LABELS[method]} | {run['graphs']} | {run['graph_breaks']} | {run['eager_step_ms']:.1f} | "
            f"{run['compiled_step_ms']:.1f} | {run['compiled_over_eager']:.2f} | {run['warmup_seconds']:.1f} | "
            f"{run['recompiles_after_warmup']} | {run['max_loss_difference']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--reserve-p", type=float, default=0.3)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager needs no compiler)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-compile-cache", action="store_true", help="compile from scratch (inductor's on-disk caches off)"
    )
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--name", default="compile")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")

    import torch
    from transformers.utils import logging as hf_logging

    import peft_childtuning  # noqa: F401  (registers the tuner)

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    if args.no_compile_cache:
        import torch._inductor.config

        torch._inductor.config.force_disable_caches = True
    settings = {key: value for key, value in vars(args).items() if key not in ("out", "name")}
    results = {
        "settings": settings,
        "machine": f"{os.cpu_count()} CPU cores",
        "torch": torch.__version__,
        "methods": {},
    }
    for method in methods:
        results["methods"][method] = measure(method, args)
        print(json.dumps({method: results["methods"][method]}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    markdown = _markdown(results)
    (out / f"{args.name}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
