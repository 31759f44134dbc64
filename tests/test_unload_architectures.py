"""unload() and merge_and_unload() on every tiny architecture (issue #12, clause 11), and the CLI merge of RoBERTa.

RoBERTa's classifier (`RobertaClassificationHead`, saved whole as modules_to_save) has no `weight` of its own: peft's
`BaseTuner._replace_module` copied `child.weight` onto the unloaded head and raised AttributeError, for Child-Tuning
but not for LoRA (which overrides it). The promise: merge_and_unload's plain model computes the peft model's logits bit
for bit (fp32), and unload() returns the base bit-identical, keeping the trained copies of modules_to_save (as peft
does).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from transformers import AutoModelForSequenceClassification, RobertaForSequenceClassification

from peft_childtuning.cli import main

from conftest import ARCHS, peft_model, tiny_roberta, trainable_parameters

MODES = ["d", "f"]


def trained(arch, base, mode: str):
    """A Child-Tuning adapter (mode "d" after its Fisher pass) trained 2 AdamW steps, head included."""
    model = peft_model(base, mode=mode, reserve_p=0.3, seed=4, task_type=arch.task_type)
    if mode == "d":
        model.detect_child_network(arch.batches(2, seed=30), progress=False)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model.train()
    for batch in arch.batches(2, seed=31):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


@torch.no_grad()
def logits(model, arch) -> torch.Tensor:
    model.eval()
    return model(**arch.batches(1, seed=32)[0]).logits


def assert_plain(model, arch) -> None:
    assert type(model) is type(arch.build())
    assert not any(isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for module in model.modules())
    assert not any("childtuning" in name for name, _ in model.named_parameters())


def saved_whole_state(model) -> dict[str, torch.Tensor]:
    """The trained copies of the modules saved whole (modules_to_save), under their names in the plain model."""
    state = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            for key, tensor in module.modules_to_save["default"].state_dict().items():
                state[f"{name}.{key}"] = tensor.detach().clone()
    return state


@pytest.mark.parametrize("mode", MODES)
def test_merge_and_unload_computes_the_peft_models_logits(tiny_models, mode):
    arch = tiny_models
    original = arch.build()
    model = trained(arch, copy.deepcopy(original), mode)
    expected = logits(model, arch)
    assert not torch.equal(expected, logits(original, arch)), "the adapter did not train"
    plain = model.merge_and_unload()
    assert_plain(plain, arch)
    assert torch.equal(logits(plain, arch), expected)


@pytest.mark.parametrize("merged_first", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("mode", MODES)
def test_unload_returns_the_base_bit_identical(tiny_models, mode, merged_first):
    arch = tiny_models
    original = arch.build()
    base_state = {name: tensor.clone() for name, tensor in original.state_dict().items()}
    model = trained(arch, copy.deepcopy(original), mode)
    heads = saved_whole_state(model)
    assert bool(heads) == (arch.task_type == "SEQ_CLS")
    if merged_first:
        model.merge_adapter()
    unloaded = model.unload()
    assert_plain(unloaded, arch)
    state = unloaded.state_dict()
    assert state.keys() == base_state.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, heads.get(name, base_state[name])), name
    expected = copy.deepcopy(original)
    expected.load_state_dict({**base_state, **heads})
    assert torch.equal(logits(unloaded, arch), logits(expected, arch))


def test_cli_merge_of_a_roberta_adapter(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arch = ARCHS["roberta"]
    base_dir, adapter_dir, out_dir = (str(tmp_path / name) for name in ("base", "adapter", "merged"))
    tiny_roberta().save_pretrained(base_dir)
    model = trained(arch, AutoModelForSequenceClassification.from_pretrained(base_dir), "d")
    expected = logits(model, arch)
    model.save_pretrained(adapter_dir)

    code = main(["merge", "--base", base_dir, "--adapter", adapter_dir, "--out", out_dir])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"saved the merged RobertaForSequenceClassification to {out_dir}" in captured.out
    merged = AutoModelForSequenceClassification.from_pretrained(out_dir)
    assert type(merged) is RobertaForSequenceClassification
    assert_plain(merged, arch)
    assert torch.equal(logits(merged, arch), expected)
