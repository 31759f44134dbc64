"""transformers' own adapter API (``PeftAdapterMixin``) end to end, with Child-Tuning (modes d and f) and LoRA.

transformers drives peft by a path of its own: ``add_adapter`` (peft's ``inject_adapter_in_model``, no PeftModel),
``set_adapter`` / ``disable_adapters`` / ``enable_adapters`` on every tuner layer, ``get_adapter_state_dict``,
``save_pretrained`` of the adapter only, its own ``load_adapter`` and ``delete_adapter`` (peft.functional). A
transformers release that breaks this path with the installed peft (transformers 5.24 with peft 0.21 raises "The
version of PEFT you are using is not compatible" on every call, for LoRA too) fails here for both methods, which
tells a broken combination from a Child-Tuning bug.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_childtuning import ChildTuningConfig

from conftest import ARCHS, TinyArch, trainable_parameters

ARCH_NAMES = ("bert", "llama")
METHODS = ("childtuning_d", "childtuning_f", "lora")
LORA_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
PREFIX = "base_model.model."  # what both savers put before every key of the adapter file


def adapter_config(method: str, arch: TinyArch, seed: int) -> PeftConfig:
    """A fresh config of `method`; no task_type, so that get_peft_model builds the same adapter as add_adapter
    (a SEQ_CLS PeftModel would also train the classifier head)."""
    if method == "lora":
        return LoraConfig(r=2, target_modules=LORA_TARGETS[arch.name])
    mode = method.removeprefix("childtuning_")
    return ChildTuningConfig(mode=mode, selection="random", reserve_p=0.3, seed=seed)


def train_step(model: torch.nn.Module, arch: TinyArch, seed: int) -> None:
    """One AdamW step on the trainable parameters, so that the active adapter differs from the identity."""
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model.train()
    model(**arch.batches(1, seed=seed)[0]).loss.backward()
    optimizer.step()
    model.eval()


@torch.no_grad()
def logits(model: torch.nn.Module, arch: TinyArch) -> torch.Tensor:
    batch = arch.batches(1, seed=99)[0]
    return model(**{key: value for key, value in batch.items() if key != "labels"}).logits


ADAPTER_MARKERS = ("childtuning_", "lora_")


def base_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's own parameters and buffers as they are in memory, by their names in the bare model.

    Not `state_dict`: that reports the unmerged base tensors of a merged Child-Tuning layer, and would hide a
    merge left behind in the weights.
    """
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return {
        key.replace(".base_layer", ""): tensor.detach().clone()
        for key, tensor in tensors.items()
        if not any(marker in key for marker in ADAPTER_MARKERS)
    }


def adapter_tensors(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors from the model's state dict, keyed as peft saves them (the adapter name removed)."""
    marker = f".{adapter_name}"
    return {
        key.replace(marker, ""): tensor
        for key, tensor in model.state_dict().items()
        if marker in key and any(prefix in key for prefix in ADAPTER_MARKERS)
    }


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), key


@pytest.fixture(params=ARCH_NAMES)
def arch(request: pytest.FixtureRequest) -> TinyArch:
    return ARCHS[request.param]


@pytest.mark.parametrize("method", METHODS)
def test_add_set_disable_enable_delete(arch, method):
    model = arch.build().eval()
    base_out, base_before = logits(model, arch), base_tensors(model)

    model.add_adapter(adapter_config(method, arch, seed=1), adapter_name="first")
    assert model.active_adapters() == ["first"]
    assert logits(model, arch).equal(base_out)  # a fresh adapter is the identity
    train_step(model, arch, seed=1)
    first_out = logits(model, arch)
    assert not first_out.equal(base_out)

    model.add_adapter(adapter_config(method, arch, seed=2), adapter_name="second")
    assert model.active_adapters() == ["second"]
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(".second" in name for name in trainable)
    assert logits(model, arch).equal(base_out)
    train_step(model, arch, seed=2)
    second_out = logits(model, arch)
    assert not second_out.equal(base_out) and not second_out.equal(first_out)

    model.set_adapter("first")
    assert model.active_adapters() == ["first"]
    assert logits(model, arch).equal(first_out)
    model.disable_adapters()
    assert logits(model, arch).equal(base_out)
    model.enable_adapters()
    assert logits(model, arch).equal(first_out)

    # training touched only the adapters
    assert_same_tensors(base_tensors(model), base_before)

    model.delete_adapter("first")
    assert list(model.peft_config) == ["second"] and model.active_adapters() == ["second"]
    assert not any(".first" in key for key in model.state_dict())
    assert logits(model, arch).equal(second_out)
    model.delete_adapter("second")
    assert not hasattr(model, "peft_config")
    assert logits(model, arch).equal(base_out)
    assert_same_tensors(base_tensors(model), base_before)


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_save_and_load(arch, method, tmp_path):
    base_dir = str(tmp_path / "base")  # loaded from a folder, so that both savers record base_model_name_or_path
    base = arch.build()
    base.save_pretrained(base_dir)

    def load_base() -> torch.nn.Module:
        return type(base).from_pretrained(base_dir).eval()

    torch.manual_seed(0)  # LoRA's A matrices come from torch's global generator
    model = load_base()
    model.add_adapter(adapter_config(method, arch, seed=1), adapter_name="tuned")
    train_step(model, arch, seed=1)
    tuned_out = logits(model, arch)
    model.add_adapter(adapter_config(method, arch, seed=2), adapter_name="other")

    # exactly the named adapter's tensors, though another adapter is active
    state = model.get_adapter_state_dict("tuned")
    assert_same_tensors(state, adapter_tensors(model, "tuned"))
    if method == "childtuning_d":
        assert any(key.endswith("childtuning_positions") for key in state)

    # the same adapter built and trained through PeftModel: the same file
    torch.manual_seed(0)
    twin = get_peft_model(load_base(), adapter_config(method, arch, seed=1), adapter_name="tuned")
    train_step(twin, arch, seed=1)
    assert logits(twin, arch).equal(tuned_out)
    twin.save_pretrained(str(tmp_path / "peft"))
    peft_dir = str(tmp_path / "peft" / "tuned")  # peft saves a non-default adapter in a folder of its name
    assert_same_tensors(load_file(os.path.join(peft_dir, "adapter_model.safetensors")), {
        PREFIX + key: tensor for key, tensor in state.items()
    })

    model.set_adapter("tuned")
    saved_dir = str(tmp_path / "transformers")
    model.save_pretrained(saved_dir)
    saved = load_file(os.path.join(saved_dir, "adapter_model.safetensors"))
    assert_same_tensors(saved, {PREFIX + key: tensor for key, tensor in state.items()})
    with open(os.path.join(saved_dir, "adapter_config.json"), encoding="utf-8") as handle:
        saved_config = json.load(handle)
    with open(os.path.join(peft_dir, "adapter_config.json"), encoding="utf-8") as handle:
        peft_config = json.load(handle)
    # the same adapter description; what differs by design: peft writes inference_mode=True and, for a model
    # without a task type, the base class (auto_mapping); transformers writes the live config
    bookkeeping = ("auto_mapping", "inference_mode")
    assert {k: v for k, v in saved_config.items() if k not in bookkeeping} == {
        k: v for k, v in peft_config.items() if k not in bookkeeping
    }
    if method != "lora":
        assert saved_config["base_fingerprint"] is not None

    # into a fresh base with transformers' load_adapter, and with peft's loader
    fresh = load_base()
    fresh.load_adapter(saved_dir, adapter_name="tuned")
    assert fresh.active_adapters() == ["tuned"]
    assert logits(fresh, arch).equal(tuned_out)
    assert_same_tensors(fresh.get_adapter_state_dict("tuned"), state)
    assert logits(PeftModel.from_pretrained(load_base(), saved_dir).eval(), arch).equal(tuned_out)


@pytest.mark.parametrize("method", METHODS)
def test_loaded_adapters_switch_disable_delete(arch, method, tmp_path):
    """Adapters loaded by transformers' load_adapter (Child-Tuning merges them for inference): switching, disabling
    and deleting them leave the base weights bit-identical."""
    outputs, folders = {}, {}
    for name, seed in (("a", 1), ("b", 2)):
        trained = arch.build().eval()
        trained.add_adapter(adapter_config(method, arch, seed=seed), adapter_name=name)
        train_step(trained, arch, seed=seed)
        outputs[name], folders[name] = logits(trained, arch), str(tmp_path / name)
        trained.save_pretrained(folders[name])
    model = arch.build().eval()
    base_out, base_before = logits(model, arch), base_tensors(model)

    model.load_adapter(folders["a"], adapter_name="a")
    assert logits(model, arch).equal(outputs["a"])
    model.delete_adapter("a")  # the only one, merged
    assert logits(model, arch).equal(base_out)
    assert_same_tensors(base_tensors(model), base_before)

    model.load_adapter(folders["a"], adapter_name="a")
    model.load_adapter(folders["b"], adapter_name="b")
    assert model.active_adapters() == ["b"]
    assert logits(model, arch).equal(outputs["b"])
    model.set_adapter("a")
    assert logits(model, arch).equal(outputs["a"])
    model.delete_adapter("a")  # the active one, merged
    assert model.active_adapters() == ["b"]
    assert logits(model, arch).equal(outputs["b"])

    model.disable_adapters()
    assert logits(model, arch).equal(base_out)
    assert_same_tensors(base_tensors(model), base_before)
    model.enable_adapters()
    assert logits(model, arch).equal(outputs["b"])
    model.delete_adapter("b")
    assert logits(model, arch).equal(base_out)
    assert_same_tensors(base_tensors(model), base_before)
    assert not any(marker in key for key in model.state_dict() for marker in ADAPTER_MARKERS)
