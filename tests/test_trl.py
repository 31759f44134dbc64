"""Child-Tuning-D in TRL's `SFTTrainer`: `peft_config=ChildTuningConfig(...)` and `ChildTuningCallback`.

`SFTTrainer` calls `get_peft_model` itself, tokenizes the text rows, batches them with its own collator, and
trains with its own loss (a fused LM head); the callback must run the Fisher pass on those batches. Tiny Llama and
Qwen2 causal LMs (hidden 32, 2 layers, dropout 0) built from configs, and a word-level tokenizer built in memory:
nothing is downloaded. SFTConfig's defaults stay on (bf16 autocast, gradient checkpointing).
"""

from __future__ import annotations

import json
import logging

import datasets
import pytest
import torch
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

import peft_childtuning
import peft_childtuning.model as ct_model
from peft_childtuning import ChildTuningCallback, ChildTuningConfig

from conftest import VOCAB, child_layers, positions_of, tiny_llama, tiny_qwen2, trainer_settings

P = 0.3
BATCH = 4
N_EXAMPLES = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = (
    "the a cat dog bird fish sat ran flew swam on under over near mat log tree pond and then slept ate sang "
    "quickly slowly"
).split()


BASES = {"llama": tiny_llama, "qwen2": tiny_qwen2}


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS (pad id 0, as the tiny models' configs have it)."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_dataset(seed: int = 0) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(N_EXAMPLES):
        length = int(torch.randint(4, 10, (1,), generator=generator))
        texts.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=generator)))
    return datasets.Dataset.from_dict({"text": texts})


def make_trainer(base: str, output_dir, **overrides) -> SFTTrainer:
    settings = trainer_settings(output_dir, BATCH, max_steps=4, logging_steps=1, data_seed=0)
    settings.update(overrides)
    return SFTTrainer(
        BASES[base](),
        args=SFTConfig(**settings),
        train_dataset=make_dataset(),
        processing_class=tokenizer(),
        peft_config=ChildTuningConfig(mode="d", reserve_p=P, seed=7, target_modules=TARGETS),
        callbacks=[ChildTuningCallback()],
    )


def callback_of(trainer: SFTTrainer) -> ChildTuningCallback:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ChildTuningCallback))


def trained_tensors(model) -> dict[str, torch.Tensor]:
    """Every trainable tensor (the child values) and the child positions, by name."""
    state = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    for layer in child_layers(model).values():
        for tensor_name in layer.tuned_tensor_names("default"):
            state[f"{layer.tensor_key(tensor_name)}.positions"] = positions_of(layer, "default", tensor_name).clone()
    return state


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs (max {float((a[name] - b[name]).abs().max()):.3g})"


@pytest.mark.parametrize("base", list(BASES))
def test_sft_trainer_runs_the_fisher_pass_on_its_data_and_saves_an_exact_adapter(base, tmp_path, caplog):
    trainer = make_trainer(base, tmp_path / "run", train_sampling_strategy="sequential")
    model = trainer.model
    assert isinstance(model, PeftModel)  # SFTTrainer wrapped the base with get_peft_model
    assert trainer.args.bf16 and trainer.args.gradient_checkpointing  # SFTConfig's defaults
    with caplog.at_level(logging.INFO, logger="peft_childtuning"):
        trainer.train()
    callback = callback_of(trainer)
    assert callback.fisher_passes == 1
    config = model.peft_config["default"]
    tuned = sum(layer.get_base_layer().weight.numel() for layer in child_layers(model).values())
    child = sum(config.child_sizes.values())
    assert child == round(P * tuned)
    assert callback.summary["default"]["child_entries"] == child
    assert any(f"child network of {child} / {tuned} entries" in record.getMessage() for record in caplog.records)

    # the pass ran on SFTTrainer's own batches (its tokenization, EOS, collator): the same child network as the
    # public function on the batches of an identical SFTTrainer's train dataloader
    twin = make_trainer(base, tmp_path / "twin", train_sampling_strategy="sequential")
    peft_childtuning.detect_child_network(twin.model, list(twin.get_train_dataloader()), progress=False)
    for key, layer in child_layers(twin.model).items():
        assert torch.equal(positions_of(layer), positions_of(child_layers(model)[key])), key
    selected, after = trained_tensors(twin.model), trained_tensors(model)
    assert any(not torch.equal(after[name], selected[name]) for name in selected), "the child values did not train"

    # the saved adapter reloads onto a fresh base, merged, with the trained model's logits bit for bit
    trainer.save_model(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["child_sizes"] == config.child_sizes
    loaded = PeftModel.from_pretrained(BASES[base](), str(tmp_path / "adapter")).eval()
    assert all(layer.merged for layer in child_layers(loaded).values() if layer.tuned_tensor_names("default"))
    # the Trainer left the bf16 autocast wrapper on the trained model's forward; compare in full precision
    trained = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
    inputs = {key: value for key, value in next(iter(twin.get_train_dataloader())).items() if key != "labels"}
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, trained(**inputs).logits)


def test_sft_trainer_resumes_identically(tmp_path, monkeypatch):
    """4 steps straight vs. 2 steps, checkpoint, then a fresh model and SFTTrainer resuming to 4."""
    uninterrupted = make_trainer("llama", tmp_path / "a", save_strategy="steps", save_steps=2)
    uninterrupted.train()
    expected = trained_tensors(uninterrupted.model)
    checkpoint = tmp_path / "a" / "checkpoint-2"
    saved = json.loads((checkpoint / "adapter_config.json").read_text())
    assert saved["child_sizes"] == uninterrupted.model.peft_config["default"].child_sizes

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run must take the child network from the checkpoint, not a Fisher pass")

    monkeypatch.setattr(ct_model, "select_child_network", refuse)
    resumed = make_trainer("llama", tmp_path / "a", save_strategy="steps", save_steps=2)
    assert resumed.model.peft_config["default"].needs_fisher_pass
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert callback_of(resumed).fisher_passes == 0
    assert resumed.state.global_step == 4
    assert_identical(expected, trained_tensors(resumed.model))
