"""examples/decoder.py's work on a tiny Gemma 3 (random weights, a word-level tokenizer), offline, in seconds: every
method trains and is scored, the Child-Tuning-D adapter reloaded onto a fresh base and merged generates exactly what
the trained model generates, and the placement of the child network adds up. The run on the real Gemma 3 270M is
in the README."""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOOD, BAD, NEUTRAL = ["good", "great", "fine"], ["bad", "awful", "dull"], ["film", "plot", "the", "a", "was", "cast"]


@pytest.fixture(scope="module")
def decoder():
    spec = importlib.util.spec_from_file_location("peft_childtuning_examples_decoder", ROOT / "examples" / "decoder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_checkpoint(folder: pathlib.Path) -> pathlib.Path:
    """A 2-layer Gemma 3 and a word-level tokenizer in which each answer is one token."""
    words = ["<pad>", "<unk>", "<eos>", "Review", "Sentiment", ":", "positive", "negative", *GOOD, *BAD, *NEUTRAL]
    backend = Tokenizer(models.WordLevel(vocab={word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=128, sliding_window=16,
        pad_token_id=0, eos_token_id=2, bos_token_id=2,
    )
    Gemma3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sentences(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        label = rng.randrange(2)
        words = [rng.choice(NEUTRAL) for _ in range(rng.randrange(2, 6))] + [rng.choice(GOOD if label else BAD)]
        rng.shuffle(words)
        examples.append({"text": " ".join(words), "label": label})
    return examples


def test_every_method_trains_and_the_merged_adapter_generates_the_same(decoder, tmp_path: pathlib.Path) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "tiny")
    args = argparse.Namespace(
        methods=list(decoder.METHODS), batch_size=4, eval_batch_size=8, max_length=16, reserve_p=0.1,
        fisher_batches=2, lr_ct_d=1e-2, lr_lora=1e-2, lr_full=1e-3, lora_r=4, warmup_ratio=0.0, forgetting_length=12,
        check_prompts=6, check_new_tokens=5, seed=0,
    )
    tests = {"reviews": sentences(10, seed=1), "twitter": sentences(6, seed=2)}
    passages = [" ".join(random.Random(i).choices(NEUTRAL + GOOD, k=10)) for i in range(3)]
    results = decoder.run_methods(checkpoint, sentences(16, seed=0), tests, passages, args, tmp_path / "out")

    assert set(results) == {"base", *decoder.METHODS}
    for method in decoder.METHODS:
        record = results[method]
        assert record["steps"] == 4 and len(record["losses"]) == 4
        for test in tests:
            assert 0.0 <= record[test]["accuracy"] <= record[test]["answered"] <= 1.0
        assert record["forgetting"] == pytest.approx(record["cross_entropy"] - results["base"]["cross_entropy"])
        assert record["adapter_bytes"] > 0
    # the answer-only loss moves the model: the trained model names a label where the random one rarely does
    assert results["full"]["reviews"]["answered"] == 1.0
    assert results["ct_d"]["adapter_weights_bytes"] < results["full"]["adapter_bytes"]

    check = results["ct_d"]["generate_check"]
    assert check["prompts"] == 6 and check["reloaded_merged_at_load"]
    assert check["reloaded_identical"] and check["merge_and_unload_identical"]

    placement = results["ct_d"]["placement"]
    assert placement["types"] == list(decoder.TENSOR_TYPES) and placement["layers"] == [0, 1]
    assert placement["child_entries"] == round(0.1 * placement["targeted_entries"])
    assert sum(sum(row) for row in placement["share"].values()) == pytest.approx(1.0)
    assert sum(placement["share_by_type"].values()) == pytest.approx(1.0)
    assert sum(placement["share_by_layer"]) == pytest.approx(1.0)
    # the densities, weighted by the tensors' sizes, give back reserve_p
    weighted = sum(placement["density_by_type"][t] * placement["entries_by_type"][t] for t in placement["types"])
    assert weighted == pytest.approx(placement["child_entries"] / placement["targeted_entries"])

    markdown = decoder.placement_markdown(placement)
    assert "| q_proj |" in markdown and "| down_proj |" in markdown
    if importlib.util.find_spec("matplotlib") is not None:
        assert decoder.plot_placement(placement, tmp_path / "placement.png", "tiny") is None
        assert (tmp_path / "placement.png").stat().st_size > 0
    metrics = {"results": results, "settings": {"methods": args.methods}}
    table = decoder.summary_markdown(json.loads(json.dumps(metrics)))
    assert table.count("\n") == 2 + 1 + len(decoder.METHODS)
    assert len({line.count("|") for line in table.splitlines()}) == 1  # every row has the header's columns


def test_answers_are_parsed_and_prompts_cut_to_fit(decoder, tmp_path: pathlib.Path) -> None:
    assert decoder.parse_answer(" Positive.") == 1 and decoder.parse_answer("negative") == 0
    assert decoder.parse_answer(" 10") is None
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_checkpoint(tmp_path / "tiny"))
    assert decoder.answer_token_ids(tokenizer) == (7, 6)
    long_text = " ".join(["film"] * 40)
    ids = decoder.prompt_ids(tokenizer, long_text, 10)
    assert len(ids) == 10 and tokenizer.decode(ids[-2:]) == "Sentiment :"
    batch = decoder.left_padded([[5, 6], [3, 4, 5, 6]], pad_id=0)
    assert batch["input_ids"].tolist() == [[0, 0, 5, 6], [3, 4, 5, 6]]
    assert batch["position_ids"].tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_cross_entropy_on_other_text_does_not_depend_on_padding(decoder, tmp_path: pathlib.Path) -> None:
    """The forgetting measure: a text scored beside a longer one (so left-padded) counts the same tokens, with the
    same losses, as scored alone."""
    checkpoint = tiny_checkpoint(tmp_path / "tiny")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    model = Gemma3ForCausalLM.from_pretrained(checkpoint)
    short, long = "the film was good", "a plot the cast was dull and the film was fine"
    alone = [decoder.mean_token_cross_entropy(model, tokenizer, [text], 32, batch_size=1) for text in (short, long)]
    together = decoder.mean_token_cross_entropy(model, tokenizer, [short, long], 32, batch_size=2)
    # each text of n tokens has n - 1 predicted tokens: 3 and 10
    assert together == pytest.approx((3 * alone[0] + 10 * alone[1]) / 13, rel=1e-5)
