"""Clause 7 of the loading contract: safetensors only.

An adapter_model.bin (a pickle, which can run code when it is loaded) is refused on every loader with an error that
says how to convert it; save_pretrained(safe_serialization=False) refuses; the Hub download never falls back to a .bin.
"""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel

from peft_childtuning import AdapterFormatError

from conftest import LOADERS, loader_target, run_loader
from model_state import ModelState


def _pickle_adapter(saved_adapters, tmp_path) -> str:
    from safetensors.torch import load_file

    adapter_dir = saved_adapters.copy_adapter("d", str(tmp_path / "adapter"))
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    torch.save(load_file(weights), os.path.join(adapter_dir, "adapter_model.bin"))
    os.remove(weights)
    return adapter_dir


@pytest.mark.parametrize("loader", LOADERS)
def test_a_pickled_adapter_is_refused_with_how_to_convert_it(saved_adapters, tmp_path, loader):
    adapter_dir = _pickle_adapter(saved_adapters, tmp_path)
    target = loader_target(loader, saved_adapters)
    before = ModelState.capture(target)
    with pytest.raises(AdapterFormatError, match="safetensors only") as caught:
        run_loader(loader, target, adapter_dir)
    assert "save_file" in str(caught.value) and "adapter_model.bin" in str(caught.value)
    before.assert_unchanged(ModelState.capture(target))


def test_save_pretrained_refuses_pickle(saved_adapters, tmp_path):
    model = PeftModel.from_pretrained(saved_adapters.load_base(), saved_adapters.adapters["d"])
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(str(tmp_path / "out"), safe_serialization=False)
    assert not (tmp_path / "out" / "adapter_model.bin").exists()


def test_the_hub_download_never_falls_back_to_a_pickle(saved_adapters, tmp_path, monkeypatch):
    """A repo holding only adapter_config.json and adapter_model.bin: download_adapter asks for the safetensors file
    only and reports it missing; the .bin is never requested."""
    from huggingface_hub.errors import EntryNotFoundError

    import peft_childtuning.hub as hub

    requested = []

    def fake_download(repo_id, filename, **kwargs):
        requested.append(filename)
        if filename == "adapter_config.json":
            return os.path.join(saved_adapters.adapters["d"], filename)
        raise EntryNotFoundError(f"{filename} not found")

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    with pytest.raises(hub.AdapterNotFoundError, match="adapter_model.safetensors"):
        hub.download_adapter("user/pickled", local_files_only=True)
    assert "adapter_model.bin" not in requested
