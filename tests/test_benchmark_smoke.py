"""The benchmark script runs end to end on a tiny model and writes its JSON and table (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
