"""The benchmark scripts run end to end on a tiny model and writes its JSON and table (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def test_benchmark_script_writes_results(tmp_path: Path) -> None:
    command = [
        sys.executable, str(BENCH), "--models", "tiny", "--methods", "vanilla,childtuning_d",
        "--batch-size", "2", "--seq-len", "8", "--steps", "1", "--warmup", "0", "--rounds", "1",
        "--fisher-batches", "1", "--load-repeats", "1", "--inference-repeats", "1", "--topk", "1e5",
        "--out", str(tmp_path), "--name", "smoke",
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    results = json.loads((tmp_path / "smoke.json").read_text())
    vanilla, child = results["models"]["tiny"]["vanilla"], results["models"]["tiny"]["childtuning_d"]
    assert child["trainable_entries"] < vanilla["trainable_entries"]
    assert child["grad_plus_optimizer_state_bytes"] < vanilla["grad_plus_optimizer_state_bytes"]
    assert child["adapter_bytes"] > 0 and "fisher_seconds_per_batch" in child
    # the training peak covers the Fisher pass as well as the steps
    assert child["peak_training_rss_bytes"] == max(child["peak_setup_rss_bytes"], child["peak_steps_rss_bytes"])
    ours, released = results["topk"]
    assert ours["chosen"] == ours["k"] == round(0.3 * 1e5)  # exact; the percentile may be off by a tie
    assert abs(released["chosen"] - ours["k"]) <= 1
    assert "| childtuning_d |" in (tmp_path / "smoke.md").read_text()


def test_benchmark_load_only_times_loading_against_the_base(tmp_path: Path) -> None:
    command = [
        sys.executable, str(BENCH), "--models", "tiny", "--methods", "childtuning_d", "--load-only",
        "--batch-size", "2", "--seq-len", "8", "--rounds", "1", "--fisher-batches", "1", "--load-repeats", "1",
        "--inference-repeats", "1", "--out", str(tmp_path), "--name", "load",
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    child = json.loads((tmp_path / "load.json").read_text())["models"]["tiny"]["childtuning_d"]
    assert "step_seconds" not in child  # no training steps
    assert child["load_seconds_with_adapter"] > 0 and child["load_seconds_base"] > 0 and child["adapter_bytes"] > 0
    assert "| childtuning_d |" in (tmp_path / "load.md").read_text()


LLM_BENCH = BENCH.parent / "llm_bench.py"


def _llm_worker(method: str, device: str, reserve_p: str | None = None) -> dict:
    """One llm_bench.py worker at the llama-tiny shape, one step, no warmup; its JSON line."""
    command = [
        sys.executable, str(LLM_BENCH), "--worker", method, "--shape", "llama-tiny", "--dtype", "bf16",
        "--device", device, "--batch-size", "1", "--seq-len", "16", "--steps", "1", "--warmup", "0",
    ] + (["--reserve-p", reserve_p] if reserve_p else [])
    completed = subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _check_llm_figures(lora: dict, child: dict) -> None:
    for run in (lora, child):
        assert run["peak_bytes"] >= run["model_bytes"] > 0
        assert run["median_step_seconds"] > 0 and run["tokens_per_second"] > 0
        assert run["adapter_bytes"] > 0 and run["adapter_bytes_per_entry"] > 0 and run["held_bytes_per_entry"] > 0
    # D at LoRA's count trains as many entries as LoRA r=16 on the same seven projections
    assert child["trainable_entries"] == lora["trainable_entries"]
    assert child["fisher_pass_seconds"] > 0 and child["selection_seconds"] >= 0
    assert 0 < child["reserve_p"] < 1


def test_llm_benchmark_worker_figures() -> None:
    _check_llm_figures(_llm_worker("lora", "cpu"), _llm_worker("childtuning_d", "cpu", "lora"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_llm_benchmark_worker_cuda() -> None:
    _check_llm_figures(_llm_worker("lora", "cuda"), _llm_worker("childtuning_d", "cuda", "lora"))


def test_switch_benchmark_checks_outputs_after_each_switch(tmp_path: Path) -> None:
    script = BENCH.parent / "switch.py"
    command = [
        sys.executable, str(script), "--models", "tiny", "--reserve-ps", "0.3", "--rounds", "1", "--switches", "2",
        "--out", str(tmp_path), "--name", "switch",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    runs = json.loads((tmp_path / "switch.json").read_text())["models"]["tiny"]
    child = runs["childtuning_d p=0.3"]
    assert child["switches"] == 2 and child["child_entries"] > 0
    assert child["largest_output_difference"] == 0.0  # switching merged Child-Tuning adapters is exact
    assert runs["lora"]["largest_output_difference"] < 1e-4
    assert "| childtuning_d p=0.3 |" in (tmp_path / "switch.md").read_text()
