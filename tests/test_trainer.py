"""Child-Tuning in the transformers Trainer: ChildTuningCallback, prepare_child_network, checkpoints and resuming.

Tiny BERT (hidden 32, 2 layers, dropout 0) on a synthetic `datasets.Dataset` with a text column the model does not
take, batched by a padding collator: the Trainer's column removal and collator must be what the Fisher pass sees.
"""

from __future__ import annotations

import json
import logging

import datasets
import pytest
import torch
from transformers import Trainer, TrainingArguments

import peft_childtuning.model as ct_model
import peft_childtuning.trainer as ct_trainer
from peft_childtuning.trainer import ChildTuningCallback, prepare_child_network

from conftest import (
    VOCAB,
    base_weights,
    child_layers,
    composed_weights,
    peft_model,
    positions_of,
    tiny_bert,
    trainer_settings,
)

P = 0.3
N_EXAMPLES = 24
BATCH = 4


# ------------------------------------------------------------------------------------------------ data, trainer
def make_dataset(n: int = N_EXAMPLES, seed: int = 0) -> datasets.Dataset:
    """Variable-length sequences with labels, plus a 'text' column the model does not accept."""
    generator = torch.Generator().manual_seed(seed)
    rows = {"text": [], "input_ids": [], "label": []}
    for i in range(n):
        length = int(torch.randint(4, 10, (1,), generator=generator))
        rows["text"].append(f"example {i}")
        rows["input_ids"].append(torch.randint(2, VOCAB, (length,), generator=generator).tolist())
        rows["label"].append(int(torch.randint(0, 2, (1,), generator=generator)))
    return datasets.Dataset.from_dict(rows)


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """Pads input_ids with 0 and builds the attention mask; fails on columns the Trainer should have removed."""
    assert all(set(feature) == {"input_ids", "label"} for feature in features), [set(f) for f in features]
    width = max(len(feature["input_ids"]) for feature in features)
    input_ids = torch.zeros(len(features), width, dtype=torch.long)
    attention_mask = torch.zeros(len(features), width, dtype=torch.long)
    for row, feature in enumerate(features):
        input_ids[row, : len(feature["input_ids"])] = torch.tensor(feature["input_ids"])
        attention_mask[row, : len(feature["input_ids"])] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.tensor([feature["label"] for feature in features]),
    }


def make_model(mode: str):
    return peft_model(tiny_bert(), mode=mode, reserve_p=P, seed=7, task_type="SEQ_CLS")


def make_trainer(model, output_dir, callbacks=None, train_dataset=None, eval_dataset=None, **overrides) -> Trainer:
    settings = trainer_settings(
        output_dir, BATCH, per_device_eval_batch_size=8, max_steps=6, logging_steps=1, data_seed=0
    )
    settings.update(overrides)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**settings),
        train_dataset=train_dataset if train_dataset is not None else make_dataset(),
        eval_dataset=eval_dataset,
        data_collator=collate,
        callbacks=[ChildTuningCallback()] if callbacks is None else callbacks,
    )
    # transformers 5.24 passes num_items_in_batch to any forward with **kwargs and then skips dividing the loss by
    # the accumulation steps, but the sequence-classification loss ignores it and returns a mean: with gradient
    # accumulation the gradient would be `gradient_accumulation_steps` times too large. Make the Trainer divide.
    trainer.model_accepts_loss_kwargs = False
    return trainer


def trained_tensors(model) -> dict[str, torch.Tensor]:
    """Every trainable tensor (child values, classifier head) and the child positions, by name."""
    state = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    for layer in child_layers(model).values():
        if "default" in layer.childtuning_positions:
            state[f"{layer.module_key}.positions"] = positions_of(layer).clone()
    return state


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs (max {float((a[name] - b[name]).abs().max()):.3g})"


def callback_of(trainer: Trainer) -> ChildTuningCallback:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ChildTuningCallback))


def step_counter(model):
    return model.base_model.mask_step_counter


# ------------------------------------------------------------------------------------------------ mode "d"
def test_callback_runs_the_fisher_pass_on_the_trainers_dataloader(tmp_path, caplog):
    dataset = make_dataset()
    model = make_model("d")
    before = base_weights(model)
    trainer = make_trainer(model, tmp_path, train_dataset=dataset, train_sampling_strategy="sequential")
    with caplog.at_level(logging.INFO, logger="peft_childtuning"):
        trainer.train()
    callback = callback_of(trainer)
    assert callback.fisher_passes == 1

    # the same selection as detect_child_network on the same batches (the Trainer's collator, 'text' removed)
    reference = make_model("d")
    features = dataset.remove_columns("text")
    batches = [collate([features[j] for j in range(i, i + BATCH)]) for i in range(0, N_EXAMPLES, BATCH)]
    reference.detect_child_network(batches, progress=False)
    expected = {key: positions_of(layer) for key, layer in child_layers(reference).items()}
    for key, layer in child_layers(model).items():
        assert torch.equal(positions_of(layer), expected[key]), key

    # logged, and summarised on the callback
    child = sum(model.peft_config["default"].child_sizes.values())
    assert child == round(P * sum(t.numel() for t in before.values()))
    assert callback.summary["default"]["child_entries"] == child
    assert any("child network of %d / " % child in record.getMessage() for record in caplog.records)

    # the optimizer created before on_train_begin trained the resized Parameters: only child entries moved; it
    # holds exactly the model's trainable Parameters (the placeholders of the tensors left empty were dropped)
    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(p.numel() for p in optimized)
    after = composed_weights(model)
    moved = 0
    for key, layer in child_layers(model).items():
        if expected[key].numel():
            assert layer.childtuning_values["default"].numel() == len(expected[key])
        tensor_key = layer.tensor_key("weight")
        changed = (after[tensor_key] != before[tensor_key]).reshape(-1)
        outside = torch.ones_like(changed)
        outside[expected[key]] = False
        assert not changed[outside].any(), f"{key}: an entry outside the child network moved"
        moved += int(changed.sum())
        assert torch.equal(layer.get_base_layer().weight, before[tensor_key]), "the base weight must stay untouched"
    assert moved > 0.5 * child


def test_prepare_child_network_before_train_equals_the_callback_path(tmp_path):
    via_callback = make_model("d")
    make_trainer(via_callback, tmp_path / "a").train()

    prepared = make_model("d")
    trainer = make_trainer(prepared, tmp_path / "b")
    summary = prepare_child_network(trainer)
    assert summary["default"]["child_entries"] == sum(prepared.peft_config["default"].child_sizes.values())
    assert not prepared.peft_config["default"].needs_fisher_pass
    trainer.train()
    assert callback_of(trainer).fisher_passes == 1  # prepare_child_network's pass; on_train_begin ran none
    # running the pass in on_train_begin (on the Trainer's own dataloader) changed neither the child network
    # nor the data order of training
    assert_identical(trained_tensors(via_callback), trained_tensors(prepared))


def test_fisher_chunks_through_the_callback_and_prepare_child_network(tmp_path, monkeypatch):
    """The chunked Fisher pass (less memory, the same child network) is reachable from the Trainer's entry points."""
    import peft_childtuning.fisher as fisher

    passes = []
    original = fisher._fisher_pass
    monkeypatch.setattr(fisher, "_fisher_pass", lambda *a, **k: passes.append(1) or original(*a, **k))
    one_pass = make_model("d")
    make_trainer(one_pass, tmp_path / "a", max_steps=1).train()
    assert len(passes) == 1
    expected = {key: positions_of(layer) for key, layer in child_layers(one_pass).items()}

    chunked = make_model("d")
    make_trainer(chunked, tmp_path / "b", callbacks=[ChildTuningCallback(fisher_chunks=3)], max_steps=1).train()
    assert len(passes) == 1 + 3  # one pass over the same batches per chunk
    prepared = make_model("d")
    prepare_child_network(make_trainer(prepared, tmp_path / "c"), fisher_chunks=2)
    assert len(passes) == 1 + 3 + 2
    for model in (chunked, prepared):
        for key, layer in child_layers(model).items():
            assert torch.equal(positions_of(layer), expected[key]), key


def test_callback_refuses_a_pending_adapter_in_a_multi_process_run(tmp_path, monkeypatch):
    monkeypatch.setattr(ct_trainer, "_is_distributed", lambda: True)
    trainer = make_trainer(make_model("d"), tmp_path)
    with pytest.raises(RuntimeError, match=r"prepare_child_network\(trainer\)"):
        trainer.train()


def test_callback_needs_a_child_tuning_model(tmp_path):
    trainer = make_trainer(tiny_bert(), tmp_path)
    with pytest.raises(ValueError, match="no Child-Tuning adapter"):
        trainer.train()


# ------------------------------------------------------------------------------------------------ training features
@pytest.mark.parametrize("mode", ["d", "f"])
def test_gradient_accumulation_bf16_checkpointing_and_evaluation(tmp_path, mode):
    plain = make_model(mode)
    make_trainer(plain, tmp_path / "plain", max_steps=4).train()

    model = make_model(mode)
    before = base_weights(model)
    trainer = make_trainer(
        model,
        tmp_path / "all",
        eval_dataset=make_dataset(8, seed=1),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        bf16=True,
        gradient_checkpointing=True,
        eval_strategy="steps",
        eval_steps=2,
    )
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [2, 4]
    assert all(torch.isfinite(torch.tensor(entry["eval_loss"])) for entry in evals)
    assert trainer.state.global_step == 4
    if mode == "f":
        # one mask per optimizer step, not per micro-batch or checkpoint recomputation
        assert step_counter(model).step == 4
    else:
        # the Fisher pass ran in float32 on the full-precision weights: same child network as without bf16,
        # gradient checkpointing or accumulation (the batches' composition differs, so compare with a fp32 run on
        # batches of the same size)
        reference = make_model("d")
        prepare_child_network(make_trainer(reference, tmp_path / "ref", per_device_train_batch_size=2))
        for key, layer in child_layers(model).items():
            assert torch.equal(positions_of(layer), positions_of(child_layers(reference)[key])), key
    after = composed_weights(model)
    assert any(not torch.equal(after[key], before[key]) for key in before), "the adapter did not train"
    for layer in child_layers(model).values():
        assert torch.equal(layer.get_base_layer().weight, before[layer.tensor_key("weight")])
        assert all(values.dtype == torch.float32 for values in layer.childtuning_values.values())


def test_mode_f_gradient_accumulation_draws_one_mask_per_optimizer_step(tmp_path):
    """2 micro-batches of 2 accumulated = one batch of 4, only if both micro-batches share the step's mask."""
    common = dict(train_sampling_strategy="sequential", max_grad_norm=0.0, max_steps=3, optim="sgd", learning_rate=0.5)
    large = make_model("f")
    make_trainer(large, tmp_path / "large", per_device_train_batch_size=4, **common).train()
    accumulated = make_model("f")
    make_trainer(
        accumulated, tmp_path / "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2, **common
    ).train()
    a, b = trained_tensors(large), trained_tensors(accumulated)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert step_counter(large).step == step_counter(accumulated).step == 3


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("mode", ["d", "f"])
def test_resumed_runs_end_identical_to_an_uninterrupted_run(tmp_path, mode, monkeypatch):
    """6 steps straight vs. (3 steps, checkpoint, fresh model and Trainer resume) vs. (max_steps 3, then 6)."""
    uninterrupted = make_model(mode)
    make_trainer(uninterrupted, tmp_path / "a", save_strategy="steps", save_steps=3).train()
    expected = trained_tensors(uninterrupted)
    checkpoint = tmp_path / "a" / "checkpoint-3"
    saved_config = json.loads((checkpoint / "adapter_config.json").read_text())
    if mode == "d":
        assert saved_config["child_sizes"] == uninterrupted.peft_config["default"].child_sizes
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "rng_state.pth").is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run must take the child network from the checkpoint, not a Fisher pass")

    monkeypatch.setattr(ct_model, "select_child_network", refuse)

    # a fresh model (mode "d": still waiting for its Fisher pass) and a fresh Trainer resume from checkpoint-3
    fresh = make_model(mode)
    assert fresh.peft_config["default"].needs_fisher_pass == (mode == "d")
    trainer = make_trainer(fresh, tmp_path / "a")
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert callback_of(trainer).fisher_passes == 0
    assert trainer.state.global_step == 6 and step_counter(fresh).step == 6
    assert_identical(expected, trained_tensors(fresh))

    # max_steps=3, then the same Trainer continues to 6 from its last checkpoint
    monkeypatch.undo()
    stopped = make_model(mode)
    trainer = make_trainer(stopped, tmp_path / "b", max_steps=3, save_strategy="steps", save_steps=3)
    trainer.train()
    monkeypatch.setattr(ct_model, "select_child_network", refuse)
    trainer.args.max_steps = 6
    trainer.train(resume_from_checkpoint=True)
    assert_identical(expected, trained_tensors(stopped))


def test_prepare_child_network_adopts_a_checkpoints_child_network(tmp_path, monkeypatch):
    first = make_model("d")
    make_trainer(first, tmp_path, max_steps=3, save_strategy="steps", save_steps=3).train()
    expected = {key: positions_of(layer) for key, layer in child_layers(first).items()}

    def refuse(*args, **kwargs):
        raise AssertionError("prepare_child_network must adopt the checkpoint's child network, not run a Fisher pass")

    monkeypatch.setattr(ct_model, "select_child_network", refuse)
    fresh = make_model("d")
    trainer = make_trainer(fresh, tmp_path)
    summary = prepare_child_network(trainer, resume_from_checkpoint=True)  # the last checkpoint in output_dir
    assert summary["default"]["child_entries"] == sum(first.peft_config["default"].child_sizes.values())
    assert fresh.peft_config["default"].child_sizes == first.peft_config["default"].child_sizes
    for key, layer in child_layers(fresh).items():
        assert torch.equal(positions_of(layer), expected[key]), key
    assert_identical(trained_tensors(first), trained_tensors(fresh))  # the checkpoint's values came along
    trainer.train(resume_from_checkpoint=True)
    assert callback_of(trainer).fisher_passes == 0 and trainer.state.global_step == 6
