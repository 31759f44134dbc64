"""Tied weights (issue #12, clause 8): a targeted tensor that another module shares is refused at get_peft_model.

Merging writes the child values into the one shared Parameter, which the other module reads too, while the unmerged
adapter changes the tensor only for the targeted module: GPT-2's tied `wte` / `lm_head` gave logits 2.5-3.1 apart.
An untied model with the same targeting trains, and its merged outputs equal the unmerged ones bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel

from peft_childtuning import ChildTuningLayer

from conftest import ARCHS, peft_model, tiny_gpt2, trainable_parameters

GPT2 = ARCHS["gpt2"]
MODES = ["d", "f"]
WTE_TARGETS = [["wte"], r".*\.wte"]  # suffix list and regex


def train(model, batches, mode: str) -> None:
    if mode == "d" and model.peft_config["default"].needs_fisher_pass:
        model.detect_child_network(batches, progress=False)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


@torch.no_grad()
def outputs(model, inputs) -> torch.Tensor:
    model.eval()
    result = model(**inputs)
    return result.logits if hasattr(result, "logits") else result


def assert_merged_equals_unmerged(model, inputs) -> None:
    """Unmerged, merged, unmerged again and merge_and_unload's plain model: the same outputs bit for bit."""
    unmerged = outputs(model, inputs)
    model.merge_adapter()
    assert torch.equal(outputs(model, inputs), unmerged)
    model.unmerge_adapter()
    assert torch.equal(outputs(model, inputs), unmerged)
    plain = model.merge_and_unload()
    assert not any(isinstance(module, ChildTuningLayer) for module in plain.modules())
    assert torch.equal(outputs(plain, inputs), unmerged)


def gpt2_inputs() -> dict[str, torch.Tensor]:
    return {key: value for key, value in GPT2.batches(1, seed=9)[0].items() if key != "labels"}


def untied_gpt2() -> GPT2LMHeadModel:
    """tiny_gpt2 built with tie_word_embeddings=False: lm_head has a weight of its own."""
    config = tiny_gpt2().config
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


# ------------------------------------------------------------------------------------------------ refused
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("targets", WTE_TARGETS, ids=["list", "regex"])
def test_tied_embedding_is_refused_naming_the_tensors_and_the_fix(mode, targets):
    base = tiny_gpt2()
    assert base.transformer.wte.weight is base.lm_head.weight
    with pytest.raises(ValueError) as refusal:
        peft_model(base, mode=mode, reserve_p=0.3, target_modules=targets)
    message = str(refusal.value)
    assert "transformer.wte.weight is the same Parameter as lm_head.weight" in message
    assert "tie_word_embeddings = False" in message and "leave the tied module out of target_modules" in message
    # refused before anything was wrapped: the base is as it was
    assert not any(isinstance(module, ChildTuningLayer) for module in base.modules())
    assert base.transformer.wte.weight is base.lm_head.weight


class SharedBias(nn.Module):
    """Two Linear layers with their own weights and one bias Parameter between them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 8)
        self.second.bias = self.first.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


@pytest.mark.parametrize("mode", MODES)
def test_tied_bias_is_refused_when_tune_bias_is_on(mode):
    with pytest.raises(ValueError, match=r"first\.bias is the same Parameter as second\.bias"):
        peft_model(SharedBias(), mode=mode, reserve_p=0.5, selection="random", target_modules=["first"], tune_bias=True)


@pytest.mark.parametrize("mode", MODES)
def test_untied_weight_next_to_a_tied_bias_trains_and_merges_exactly(mode):
    model = peft_model(
        SharedBias(), mode=mode, reserve_p=0.5, selection="random", target_modules=["first"], init_weights=False
    )
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(outputs(model, {"x": x}), SharedBias()(x).detach())  # the adapter does something
    assert_merged_equals_unmerged(model, {"x": x})


# ------------------------------------------------------------------------------------------------ untied: works
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("targets", WTE_TARGETS, ids=["list", "regex"])
def test_untied_gpt2_with_the_same_targeting_merges_exactly(mode, targets):
    base = untied_gpt2()
    assert base.transformer.wte.weight is not base.lm_head.weight
    model = peft_model(base, mode=mode, reserve_p=0.3, target_modules=targets, task_type="CAUSAL_LM")
    assert [layer.module_key for layer in model.modules() if isinstance(layer, ChildTuningLayer)] == [
        "transformer.wte"
    ]
    before = outputs(model, gpt2_inputs())
    train(model, GPT2.batches(2, seed=3), mode)
    assert not torch.equal(outputs(model, gpt2_inputs()), before)  # trained
    assert_merged_equals_unmerged(model, gpt2_inputs())


def test_untying_as_the_message_says_keeps_the_outputs_and_then_works():
    base = tiny_gpt2()
    inputs = gpt2_inputs()
    tied_outputs = outputs(base, inputs)
    base.config.tie_word_embeddings = False
    base.lm_head.weight = nn.Parameter(base.lm_head.weight.detach().clone())
    assert torch.equal(outputs(base, inputs), tied_outputs)
    model = peft_model(base, mode="d", reserve_p=0.3, target_modules=["wte"], task_type="CAUSAL_LM")
    train(model, GPT2.batches(2, seed=3), "d")
    assert_merged_equals_unmerged(model, inputs)
