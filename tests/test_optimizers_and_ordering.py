"""Optimizers and the order of calls around the Fisher pass (issue #12, clause 10).

(a) An optimizer created before `detect_child_network` (the transformers Trainer creates it before its callbacks run
    the Fisher pass) holds the empty placeholders, which are resized in place; every torch optimizer must then train
    the child values, those that build their state in the constructor (Adagrad) included.
(b) A tensor whose child network comes out empty is not tuned at all: no 0-element Parameter (torch's Adafactor
    divides by its size), nothing in child_sizes or in the file; such adapters save and load with identical outputs
    (PeftModel, and accelerate's save_state / load_state), and adapters written by 0.1.0 (0 entries in child_sizes,
    0-element tensors in the file) still load.
(c) A second `detect_child_network` on an adapter that has its child network is refused.
(d) `detect_child_network` after wrapping the model in DistributedDataParallel is refused with what to do instead
    (real DDP, on a one-process gloo group).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from peft import PeftModel
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from peft_childtuning.model import tuned_tensors

from conftest import (
    ARCHS,
    base_weights,
    child_layers,
    peft_model,
    positions_of,
    tiny_bert,
    train_steps,
    trainable_parameters,
    written_by_hand,
)

BERT = ARCHS["bert"]
# tiny BERT has 12 targeted matrices of 16384 entries: 8 child entries leave several matrices with none
TINY_P = 0.0005
LEGACY_ADAPTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "empty_child_adapter_0.1.0")

# every optimizer class torch.optim has; those that cannot train child values on their own say why
SKIPPED = {
    "LBFGS": "needs a closure that re-evaluates the loss at every step (not a plain step() after backward)",
    "SparseAdam": "takes sparse gradients only; the child values get dense ones",
    "Muon": "orthogonalises 2-D weight matrices only; the child values are 1-D",
}
OPTIMIZERS = sorted(
    name
    for name, cls in vars(torch.optim).items()
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
)
EXPECTED_TO_TRAIN = {
    "SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "Adamax", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop", "Adafactor"
}  # fmt: skip


def make_model(**overrides):
    settings = dict(mode="d", reserve_p=0.05, seed=2, task_type="SEQ_CLS")
    return peft_model(tiny_bert(), **{**settings, **overrides})


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    return model(**{key: value for key, value in BERT.batches(1, seed=12)[0].items() if key != "labels"}).logits


def child_values(model) -> dict[str, torch.Tensor]:
    return {
        key: layer.child_values("default", name).detach().clone()
        for layer, name, key, _ in tuned_tensors(model, "default")
        if name in layer.tuned_tensor_names("default")
    }


def assert_only_child_entries_moved(model, base: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> None:
    """Every tuned tensor's child values trained; every other entry of the effective weight is the base's, exactly."""
    after = child_values(model)
    assert after.keys() == before.keys() and after
    for key, values in after.items():
        assert torch.isfinite(values).all(), key
        assert not torch.equal(values, before[key]), f"{key}: the child values did not train"
    for layer in child_layers(model).values():
        key = layer.tensor_key("weight")
        assert torch.equal(layer.get_base_layer().weight, base[key]), f"{key}: the base tensor was written"
        with torch.no_grad():
            effective = layer.compose("weight", ["default"]).reshape(-1)
        outside = torch.ones_like(effective, dtype=torch.bool)
        if key in after:
            outside[positions_of(layer).long()] = False
        assert torch.equal(effective[outside], base[key].reshape(-1)[outside]), key


# ------------------------------------------------------------------------------------------------ (a) optimizers
def test_every_expected_optimizer_is_tested():
    assert EXPECTED_TO_TRAIN <= set(OPTIMIZERS) - set(SKIPPED)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_created_before_the_fisher_pass_trains_the_child_values(name):
    if name in SKIPPED:
        pytest.skip(SKIPPED[name])
    model = make_model()
    optimizer = getattr(torch.optim, name)(trainable_parameters(model), lr=1e-2)  # as the Trainer: before the pass
    assert any(parameter.numel() == 0 for parameter in trainable_parameters(model))  # the placeholders
    model.detect_child_network(BERT.batches(2, seed=10), progress=False)
    assert len(model.peft_config["default"].child_sizes) < 12, "expected some tensors without child entries"
    base, before = base_weights(model), child_values(model)
    train_steps(model, optimizer, BERT.batches(3, seed=11))
    assert_only_child_entries_moved(model, base, before)
    # the placeholders of the tensors left empty have left the optimizer: it holds what one created now would
    held = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    assert [id(parameter) for parameter in held] == [id(parameter) for parameter in trainable_parameters(model)]
    for parameter in trainable_parameters(model):  # the state the optimizer keeps fits the resized Parameters
        for value in optimizer.state[parameter].values():
            if isinstance(value, torch.Tensor) and value.dim() == 1:
                assert value.shape == parameter.shape


def test_the_trainers_adagrad_created_before_the_callbacks_fisher_pass_trains(tmp_path):
    """The Trainer path itself: its optimizer (Adagrad, wrapped by accelerate) exists before on_train_begin."""
    from transformers import Trainer, TrainingArguments

    from peft_childtuning import ChildTuningCallback

    model = make_model()
    examples = [{key: value[i] for key, value in batch.items()} for batch in BERT.batches(3, seed=15) for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, optim="adagrad",
        use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=examples, callbacks=[ChildTuningCallback()])
    base = base_weights(model)
    trainer.train()
    assert trainer.state.global_step == 3 and len(model.peft_config["default"].child_sizes) < 12
    started_at = {  # each tuned tensor's child values started at the base's entries
        layer.tensor_key("weight"): base[layer.tensor_key("weight")].reshape(-1)[positions_of(layer).long()]
        for layer in child_layers(model).values()
        if "weight" in layer.tuned_tensor_names("default")
    }
    assert_only_child_entries_moved(model, base, started_at)


def test_state_that_fits_the_resized_parameters_is_left_alone():
    """Only state built for the placeholder's size is rebuilt: Adam's step counts run on, before and after."""
    model = make_model()
    early = torch.optim.Adam(trainable_parameters(model), lr=1e-2)
    model.detect_child_network(BERT.batches(2, seed=10), progress=False)
    late = torch.optim.Adagrad(trainable_parameters(model), lr=1e-2)
    late_sums = {id(p): late.state[p]["sum"] for p in trainable_parameters(model)}
    train_steps(model, early, BERT.batches(3, seed=11))
    train_steps(model, late, BERT.batches(2, seed=11))
    for parameter in trainable_parameters(model):
        assert int(early.state[parameter]["step"]) == 3
        assert late.state[parameter]["sum"] is late_sums[id(parameter)]  # built after the resize: kept
        assert int(late.state[parameter]["step"]) == 2


class EagerNeedsModel(torch.optim.Optimizer):
    """An optimizer that builds its state in the constructor and cannot be constructed from param groups alone."""

    def __init__(self, params, model: torch.nn.Module) -> None:
        super().__init__(params, {"lr": 1e-2})
        self.model = model
        for group in self.param_groups:
            for parameter in group["params"]:
                self.state[parameter]["momentum"] = torch.zeros_like(parameter)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    momentum = self.state[parameter]["momentum"].mul_(0.9).add_(parameter.grad)
                    parameter.sub_(group["lr"] * momentum)


def test_an_optimizer_whose_state_cannot_be_rebuilt_says_what_to_do():
    model = make_model()
    optimizer = EagerNeedsModel(trainable_parameters(model), model)
    model.detect_child_network(BERT.batches(2, seed=10), progress=False)
    model.train()
    model(**BERT.batches(1, seed=11)[0]).loss.backward()
    with pytest.raises(RuntimeError, match=r"EagerNeedsModel.*Create the optimizer after model\.detect_child_network"):
        optimizer.step()


# ------------------------------------------------------------------------------------------------ (b) empty children
def empty_child_model(selection: str):
    model = make_model(reserve_p=TINY_P, selection=selection)
    if selection == "fisher":
        model.detect_child_network(BERT.batches(2, seed=10), progress=False)
    return model


@pytest.mark.parametrize("selection", ["fisher", "random"])
def test_a_tensor_with_an_empty_child_is_not_tuned(selection):
    model = empty_child_model(selection)
    config = model.peft_config["default"]
    targeted = {key: tensor.numel() for _, _, key, tensor in tuned_tensors(model, "default")}
    assert len(targeted) == 12
    empty = set(targeted) - set(config.child_sizes)
    assert empty and config.child_sizes, "expected some tensors with and some without child entries"
    assert sum(config.child_sizes.values()) == round(TINY_P * sum(targeted.values()))  # exactly k, all of it tuned
    assert all(size > 0 for size in config.child_sizes.values())
    assert set(config.child_encodings) == set(config.child_sizes)
    assert not [name for name, parameter in model.named_parameters() if parameter.numel() == 0]
    assert not [name for name, buffer in model.named_buffers() if buffer.numel() == 0]
    for layer in child_layers(model).values():
        tuned = layer.tensor_key("weight") not in empty
        assert ("default" in layer.childtuning_values) == tuned
        assert ("default" in layer.childtuning_positions) == tuned
        assert layer.targeted_tensor_names("default") == ["weight"]


@pytest.mark.parametrize("selection", ["fisher", "random"])
def test_an_adapter_with_empty_children_trains_with_adafactor_saves_and_loads(selection, tmp_path):
    model = empty_child_model(selection)
    base, before = base_weights(model), child_values(model)
    optimizer = torch.optim.Adafactor(trainable_parameters(model), lr=1e-2)
    train_steps(model, optimizer, BERT.batches(2, seed=11))
    assert_only_child_entries_moved(model, base, before)
    expected = logits(model)
    assert torch.isfinite(expected).all()

    model.save_pretrained(tmp_path)
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert not [key for key, tensor in saved.items() if tensor.numel() == 0]
    child_modules = {key.rsplit(".", 1)[0] for key in model.peft_config["default"].child_sizes}
    saved_modules = {key.split(".childtuning_")[0] for key in saved if "childtuning_" in key}
    assert {name.removeprefix("base_model.model.") for name in saved_modules} == child_modules
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert loaded.peft_config["default"].child_sizes == model.peft_config["default"].child_sizes
    assert torch.equal(logits(loaded), expected)
    assert not [name for name, parameter in loaded.named_parameters() if parameter.numel() == 0]


def test_accelerate_save_state_and_load_state_round_trip_with_empty_children(tmp_path):
    """accelerate's checkpoints (safetensors) lost the 0-element tensors, and load_state then missed their keys."""
    from accelerate import Accelerator

    def prepared():
        model = empty_child_model("fisher")
        optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
        accelerator = Accelerator(cpu=True)
        return accelerator, *accelerator.prepare(model, optimizer)

    accelerator, model, optimizer = prepared()
    train_steps(model, optimizer, BERT.batches(2, seed=11))
    expected = logits(model)
    accelerator.save_state(str(tmp_path))
    accelerator, restored, _ = prepared()
    assert not torch.equal(logits(restored), expected)
    accelerator.load_state(str(tmp_path))
    assert torch.equal(logits(restored), expected)


def test_an_adapter_saved_by_0_1_0_with_zero_child_sizes_still_loads():
    """Written by peft_childtuning 0.1.0: 0 entries in child_sizes and 0-element child tensors in the file."""
    with open(os.path.join(LEGACY_ADAPTER, "adapter_config.json")) as handle:
        assert '": 0,' in handle.read()
    legacy_file = load_file(os.path.join(LEGACY_ADAPTER, "adapter_model.safetensors"))
    assert any(tensor.numel() == 0 for tensor in legacy_file.values())
    loaded = PeftModel.from_pretrained(tiny_bert(), LEGACY_ADAPTER)
    inputs = {key: value for key, value in BERT.batches(1, seed=42)[0].items() if key != "labels"}
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, written_by_hand(tiny_bert(), LEGACY_ADAPTER).eval()(**inputs).logits)
    assert not [name for name, parameter in loaded.named_parameters() if parameter.numel() == 0]


# ------------------------------------------------------------------------------------------------ (c) twice
@pytest.mark.parametrize("selection", ["fisher", "random"])
def test_a_second_detect_child_network_is_refused(selection):
    model = make_model(selection=selection)
    if selection == "fisher":
        model.detect_child_network(BERT.batches(2, seed=10), progress=False)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    train_steps(model, optimizer, BERT.batches(2, seed=11))
    trained = child_values(model)
    with pytest.raises(RuntimeError, match="already has its child network"):
        model.detect_child_network(BERT.batches(2, seed=13), progress=False)
    assert {key: torch.equal(values, trained[key]) for key, values in child_values(model).items()} == dict.fromkeys(
        trained, True
    )
    train_steps(model, optimizer, BERT.batches(1, seed=14))  # the optimizer still steps


# ------------------------------------------------------------------------------------------------ (d) DDP
@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group: DistributedDataParallel is real (its reducer holds the gradient accumulators)."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_detect_child_network_after_wrapping_in_ddp_is_refused(process_group):
    model = make_model()
    wrapped = DistributedDataParallel(model)
    with pytest.raises(RuntimeError) as refusal:
        model.detect_child_network(BERT.batches(2, seed=10), progress=False)
    assert wrapped.module is model
    message = str(refusal.value)
    assert "DistributedDataParallel" in message and "before wrapping the model" in message
    assert "peft_childtuning.prepare_child_network(trainer)" in message
    assert model.peft_config["default"].needs_fisher_pass  # refused before anything changed
    assert all(parameter.numel() == 0 for name, parameter in model.named_parameters() if "childtuning_values" in name)


def test_detect_child_network_before_wrapping_in_ddp_trains(process_group):
    model = make_model()
    model.detect_child_network(BERT.batches(2, seed=10), progress=False)
    base, before = base_weights(model), child_values(model)
    wrapped = DistributedDataParallel(model)
    train_steps(wrapped, torch.optim.AdamW(trainable_parameters(model), lr=1e-2), BERT.batches(2, seed=11))
    assert_only_child_entries_moved(model, base, before)


def test_a_live_graph_of_an_earlier_forward_is_refused_too():
    model = make_model()
    model.eval()
    kept = model(**BERT.batches(1, seed=12)[0]).loss  # its graph holds the placeholders' gradient accumulators
    with pytest.raises(RuntimeError, match="an earlier forward pass"):
        model.detect_child_network(BERT.batches(2, seed=10), progress=False)
    del kept
    model.detect_child_network(BERT.batches(2, seed=10), progress=False)
    assert model.peft_config["default"].child_sizes
