"""peft 0.21.2's own test suite, run against the tuner by ../shared/tools/peft-suite (modes "d" random and "f")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO.parent / "shared" / "tools" / "peft-suite" / "run.sh"
VARIANTS = [{"mode": "d", "reserve_p": 0.3, "selection": "random"}, {"mode": "f", "reserve_p": 0.3}]


@pytest.mark.skipif(not RUN_SH.exists(), reason=f"peft-suite harness not found at {RUN_SH}")
@pytest.mark.parametrize("hf_target_modules", ["default", "null"], ids=["q_v_targets", "our_default_targets"])
def test_peft_own_test_suite_passes(tmp_path_factory: pytest.TempPathFactory, hf_target_modules: str) -> None:
    work = Path(os.environ.get("PEFT_SUITE_WORK", tmp_path_factory.getbasetemp() / "peft_suite_work"))
    env = {
        **os.environ,
        "PLUGIN_MODULE": "peft_childtuning",
        "PLUGIN_CONFIG": "ChildTuningConfig",
        "PLUGIN_PATH": str(REPO),
        "PLUGIN_CONFIG_KWARGS": json.dumps(VARIANTS),
        "PEFT_SUITE_PYTHON": sys.executable,
        # Child-Tuning refuses to save a pickle (save_pretrained(safe_serialization=False) raises, by design: a
        # pickle can run code when it is loaded); peft's tests of pickled saving therefore do not apply
        "PEFT_SUITE_K": "not save_pretrained_pickle and not save_pretrained_selected_adapters_pickle",
    }
    if hf_target_modules == "null":  # the tuner's own target_module_mapping, as upstream does for built-in methods
        env["PLUGIN_HF_TARGET_MODULES"] = "null"
    result = subprocess.run(["bash", str(RUN_SH), str(work)], env=env, capture_output=True, text=True, timeout=1800)
    verdict = [line for line in result.stdout.splitlines() if "verdict:" in line]
    assert result.returncode == 0, "\n".join(result.stdout.splitlines()[-60:]) + result.stderr[-3000:]
    assert verdict and "PASS" in verdict[-1] and "failed=0" in verdict[-1]
