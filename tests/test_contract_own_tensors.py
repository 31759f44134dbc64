"""Clause 3 of the loading contract: a file can only write its own adapter.

An adapter file may hold only this adapter's tensors (child values and positions, its modules_to_save copies). A
tensor named like a base weight (an embedding, a LayerNorm, a tuned layer's base_layer.weight) or anything else is
refused by every loader and by the CLI merge, even in a file whose checksums are consistent, and nothing is written.
"""

from __future__ import annotations

import pytest
import torch

from peft_childtuning import AdapterFormatError
from peft_childtuning.cli import main as cli_main

from conftest import LOADERS, loader_target, rewrite_weights, run_loader
from model_state import ModelState

PREFIX = "base_model.model."
FOREIGN = {
    "embedding": ("bert.embeddings.word_embeddings.weight", (100, 32)),
    "layernorm": ("bert.embeddings.LayerNorm.weight", (32,)),
    "tuned_base_weight": ("bert.encoder.layer.0.attention.self.query.base_layer.weight", (32, 32)),
    "tuned_weight_plain_name": ("bert.encoder.layer.0.attention.self.query.weight", (32, 32)),
    "pooler": ("bert.pooler.dense.weight", (32, 32)),
    "unknown_name": ("bert.encoder.layer.0.something_else", (4,)),
    "other_adapter_values": ("bert.encoder.layer.0.attention.self.query.childtuning_values.other", (3,)),
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("mode", ["d", "f"])
@pytest.mark.parametrize("foreign", list(FOREIGN))
def test_a_tensor_that_is_not_the_adapters_is_refused(saved_adapters, tmp_path, loader, mode, foreign):
    name, shape = FOREIGN[foreign]
    adapter_dir = saved_adapters.copy_adapter(mode, str(tmp_path / "adapter"))
    rewrite_weights(adapter_dir, lambda tensors: tensors.update({PREFIX + name: torch.full(shape, 7.0)}))
    target = loader_target(loader, saved_adapters)
    before = ModelState.capture(target)
    with pytest.raises(AdapterFormatError, match="not a tensor of adapter") as caught:
        run_loader(loader, target, adapter_dir)
    assert name in str(caught.value) and "adapter_model.safetensors" in str(caught.value)
    before.assert_unchanged(ModelState.capture(target))


def test_cli_merge_refuses_a_foreign_tensor_and_writes_nothing(saved_adapters, tmp_path, capsys):
    adapter_dir = saved_adapters.copy_adapter("d", str(tmp_path / "adapter"))
    name, shape = FOREIGN["embedding"]
    rewrite_weights(adapter_dir, lambda tensors: tensors.update({PREFIX + name: torch.zeros(shape)}))
    out_dir = tmp_path / "merged"
    code = cli_main(["merge", "--base", saved_adapters.base, "--adapter", adapter_dir, "--out", str(out_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "not a tensor of adapter" in err and "Traceback" not in err
    assert len([line for line in err.strip().splitlines() if line.startswith("peft-childtuning")]) == 1
    assert not out_dir.exists()


def test_the_saved_adapter_itself_loads_on_every_loader(saved_adapters):
    """The control: the untouched files load and compute the trained outputs."""
    for loader in LOADERS:
        for mode in ("d", "f"):
            model = run_loader(loader, loader_target(loader, saved_adapters), saved_adapters.adapters[mode])
            with torch.no_grad():
                assert torch.equal(model(**saved_adapters.batch).logits, saved_adapters.outputs[mode]), (loader, mode)
