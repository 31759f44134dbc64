"""The Fisher pass from every entry point: `get_peft_model`, transformers' `add_adapter`, peft's
`inject_adapter_in_model`.

Each leaves the adapter's config in a different place (the PeftModel's tuner, the transformers model's own
`peft_config`, the plain module's), and only the first creates a `ChildTuningModel`. `detect_child_network(model,
...)` and `ChildTuningCallback` must find the adapter in each case, select the same child network as
`ChildTuningModel.detect_child_network` on the same data, and record it where the adapter is saved from.

Tiny Llama (hidden 32, 2 layers, dropout 0) on fixed-length token sequences.
"""

from __future__ import annotations

import warnings
from typing import Callable

import datasets
import pytest
import torch
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from transformers import Trainer, TrainingArguments

import peft_childtuning
from peft_childtuning import ChildTuningCallback, ChildTuningConfig, prepare_child_network
from peft_childtuning.model import tuned_tensors

from conftest import ARCHS, SEQ_LEN, VOCAB, child_layers, positions_of, tiny_llama, trainer_settings

P = 0.3
BATCH = 4
N_EXAMPLES = 16
LLAMA = ARCHS["llama"]


def config(**overrides) -> ChildTuningConfig:
    settings = dict(mode="d", reserve_p=P, seed=7, task_type="CAUSAL_LM")
    settings.update(overrides)
    return ChildTuningConfig(**settings)


def via_get_peft_model(adapter_config: ChildTuningConfig) -> torch.nn.Module:
    return get_peft_model(tiny_llama(), adapter_config)


def via_add_adapter(adapter_config: ChildTuningConfig) -> torch.nn.Module:
    base = tiny_llama()
    base.add_adapter(adapter_config)
    return base


def via_inject_adapter_in_model(adapter_config: ChildTuningConfig) -> torch.nn.Module:
    return inject_adapter_in_model(adapter_config, tiny_llama())


ENTRY_POINTS: dict[str, Callable[[ChildTuningConfig], torch.nn.Module]] = {
    "get_peft_model": via_get_peft_model,
    "add_adapter": via_add_adapter,
    "inject_adapter_in_model": via_inject_adapter_in_model,
}


def child_network(model: torch.nn.Module, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(positions, values) of every tuned tensor of a mode-"d" adapter, by tensor key."""
    return {
        layer.tensor_key(tensor_name): (
            positions_of(layer, adapter, tensor_name).clone(),
            layer.child_values(adapter, tensor_name).detach().clone(),
        )
        for layer in child_layers(model).values()
        if adapter in layer.childtuning_spec
        for tensor_name in layer.tuned_tensor_names(adapter)
    }


def assert_same_child_network(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key][0], b[key][0]), f"{key}: positions differ"
        assert torch.equal(a[key][1], b[key][1]), f"{key}: values differ"


def reference(batches: list[dict], **overrides) -> torch.nn.Module:
    """The existing path: a PeftModel and its tuner's `detect_child_network` method."""
    model = via_get_peft_model(config(**overrides))
    model.detect_child_network(batches, progress=False)
    return model


# ------------------------------------------------------------------------------------------------ the public function
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_selects_the_same_child_network(entry):
    batches = LLAMA.batches(3, seed=5)
    expected = reference(batches)
    model = ENTRY_POINTS[entry](config())
    sizes = peft_childtuning.detect_child_network(model, batches, progress=False)

    assert_same_child_network(child_network(model), child_network(expected))
    expected_config = expected.peft_config["default"]
    assert sizes == expected_config.child_sizes
    assert sum(sizes.values()) == round(P * sum(t.numel() for _, _, _, t in tuned_tensors(model, "default")))
    # recorded in the config the adapter is saved from (the model's own peft_config for add_adapter / inject)
    saved_config = model.peft_config["default"]
    assert not saved_config.needs_fisher_pass
    assert saved_config.child_sizes == expected_config.child_sizes
    assert saved_config.child_encodings == expected_config.child_encodings
    with pytest.raises(RuntimeError, match="already has its child network"):
        peft_childtuning.detect_child_network(model, batches, progress=False)


def test_several_adapters_each_get_their_own_child_network():
    batches = LLAMA.batches(2, seed=6)
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Already found a `peft_config` attribute in the model"
        model.add_adapter(config(), adapter_name="a")
        model.add_adapter(config(reserve_p=0.1), adapter_name="b")
    # transformers activates the adapter added last: that is the default
    assert peft_childtuning.detect_child_network(model, batches, progress=False) == model.peft_config["b"].child_sizes
    assert model.peft_config["a"].needs_fisher_pass
    peft_childtuning.detect_child_network(model, batches, adapter_name="a", progress=False)
    # each as if it were the model's only adapter: the other one's layers take no part in the pass
    assert_same_child_network(child_network(model, "a"), child_network(reference(batches)))
    assert_same_child_network(child_network(model, "b"), child_network(reference(batches, reserve_p=0.1)))

    both = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both.add_adapter(config(), adapter_name="a")
        both.add_adapter(config(), adapter_name="b")
    both.set_adapter(["a", "b"])
    with pytest.raises(ValueError, match=r"2 Child-Tuning adapters are active \(\['a', 'b'\]\); pass adapter_name="):
        peft_childtuning.detect_child_network(both, batches, progress=False)
    with pytest.raises(ValueError, match="no Child-Tuning adapter 'c'"):
        peft_childtuning.detect_child_network(both, batches, adapter_name="c", progress=False)


def test_refusals_name_the_problem():
    batches = LLAMA.batches(1)
    with pytest.raises(ValueError, match=r"no active Child-Tuning adapter.*add_adapter.*inject_adapter_in_model"):
        peft_childtuning.detect_child_network(tiny_llama(), batches, progress=False)
    with pytest.raises(ValueError, match="mode 'f'"):
        peft_childtuning.detect_child_network(via_add_adapter(config(mode="f")), batches, progress=False)


# ------------------------------------------------------------------------------------------------ Trainer
def make_dataset() -> datasets.Dataset:
    generator = torch.Generator().manual_seed(0)
    return datasets.Dataset.from_dict(
        {"input_ids": torch.randint(2, VOCAB, (N_EXAMPLES, SEQ_LEN), generator=generator).tolist()}
    )


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor([feature["input_ids"] for feature in features])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def make_trainer(model: torch.nn.Module, output_dir, dataset: datasets.Dataset) -> Trainer:
    args = TrainingArguments(
        **trainer_settings(
            output_dir,
            BATCH,
            max_steps=3,
            train_sampling_strategy="sequential",
            bf16=True,  # the Fisher pass must still run in full precision
        )
    )
    return Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[ChildTuningCallback()]
    )


def save_and_reload(entry: str, model: torch.nn.Module, trainer: Trainer, folder) -> list[torch.nn.Module]:
    """The trained adapter saved the way each entry point saves, loaded into fresh bases by every loader it has."""
    if entry == "inject_adapter_in_model":
        # a plain module has no save_pretrained: the adapter is its config and peft's state dict of it
        model.peft_config["default"].save_pretrained(str(folder))
        loaded = []
        for merge in (False, True):
            fresh = inject_adapter_in_model(ChildTuningConfig.from_pretrained(str(folder)), tiny_llama())
            set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))
            for layer in child_layers(fresh).values() if merge else ():
                layer.merge()
            loaded.append(fresh)
        return loaded
    trainer.save_model(str(folder))  # PeftModel.save_pretrained, or transformers' adapter-only save_pretrained
    transformers_loaded = tiny_llama()
    transformers_loaded.load_adapter(str(folder))
    # both loaders merge the child values into the base weights (inference)
    return [PeftModel.from_pretrained(tiny_llama(), str(folder)), transformers_loaded]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_callback_runs_the_fisher_pass_for_every_entry_point(entry, tmp_path):
    dataset = make_dataset()
    model = ENTRY_POINTS[entry](config())
    trainer = make_trainer(model, tmp_path / "run", dataset)
    trainer.train()
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ChildTuningCallback))
    assert callback.fisher_passes == 1
    child = sum(model.peft_config["default"].child_sizes.values())
    assert callback.summary["default"]["child_entries"] == child

    # the pass ran on the Trainer's batches: the same child network as the function on them
    batches = [collate([dataset[j] for j in range(i, i + BATCH)]) for i in range(0, N_EXAMPLES, BATCH)]
    expected = reference(batches)
    trained = child_network(model)
    for key, (positions, values) in child_network(expected).items():
        assert torch.equal(trained[key][0], positions), key
    assert any(not torch.equal(trained[key][1], values) for key, (_, values) in child_network(expected).items()), (
        "the child values did not train"
    )

    inputs = {key: value for key, value in LLAMA.batches(1, seed=9)[0].items() if key != "labels"}
    # the Trainer left the bf16 autocast wrapper on the trained model's forward; compare in full precision
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    for loaded in save_and_reload(entry, model, trainer, tmp_path / "adapter"):
        with torch.no_grad():
            assert torch.equal(loaded.eval()(**inputs).logits, logits)


@pytest.mark.parametrize("entry", ["add_adapter", "inject_adapter_in_model"])
def test_prepare_child_network_for_models_without_a_peft_model(entry, tmp_path):
    model = ENTRY_POINTS[entry](config())
    summary = prepare_child_network(make_trainer(model, tmp_path, make_dataset()))
    assert summary["default"]["child_entries"] == sum(model.peft_config["default"].child_sizes.values())
    assert not model.peft_config["default"].needs_fisher_pass
