"""Shared helpers for the peft_childtuning test suite: tiny models of each architecture, batches, layer accessors.

Every model here is built from a config (no hub access), with hidden size 32, 2 layers and a vocabulary of 100, and
with dropout disabled so that forward passes are deterministic.
"""

from __future__ import annotations

import copy
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

torch.set_num_threads(1)

import peft_childtuning  # noqa: E402  (registers the tuner with peft)
from peft import get_peft_model  # noqa: E402
from peft_childtuning import ChildTuningConfig, ChildTuningLayer  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.pytorch_utils import Conv1D  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

VOCAB = 100
HIDDEN = 32
SEQ_LEN = 8


def pytest_configure(config: pytest.Config) -> None:
    # transformers 5 renames gradient checkpointing; the old names still work and are what users call
    config.addinivalue_line("filterwarnings", "ignore:.*is deprecated and will be removed in v6.*:FutureWarning")


# ------------------------------------------------------------------------------------------------ tiny models
def tiny_bert(
    dropout: float = 0.0, seed: int = 0, num_labels: int = 2, intermediate_size: int = 64
) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=intermediate_size,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


WIDE_INTERMEDIATE = 8192
WIDE_GAP_KEY = "bert.encoder.layer.0.intermediate.dense.weight"  # in wide_bert: 8192 x 32 entries


def wide_bert(dropout: float = 0.0, seed: int = 0) -> BertForSequenceClassification:
    """The tiny BERT with a wide feed-forward block (262,144 entries per matrix): room for gaps wider than 16 bits."""
    return tiny_bert(dropout, seed, intermediate_size=WIDE_INTERMEDIATE)


def wide_gap_positions() -> torch.Tensor:
    """A child network of WIDE_GAP_KEY with a few gaps too wide for 16 bits: four clusters of 64 entries (every
    third), 80,000 entries apart (three wide gaps)."""
    return torch.cat([start + 3 * torch.arange(64) for start in (0, 80_000, 160_000, 240_000)])


def give_wide_gaps(model: torch.nn.Module, encoding: str | None = None, adapter: str = "default") -> None:
    """Make `wide_gap_positions` the child network of WIDE_GAP_KEY in a Fisher mode-"d" adapter of a `wide_bert`,
    once its Fisher pass chose the others (the smallest encoding, gap16x, unless `encoding` is given), recorded in
    the adapter's config."""
    from peft_childtuning.model import record_child_network

    layer = next(layer for layer in child_layers(model).values() if layer.tensor_key("weight") == WIDE_GAP_KEY)
    layer.set_child_network(adapter, "weight", wide_gap_positions(), encoding)
    record_child_network(model, model.peft_config[adapter], adapter)


def tiny_roberta(dropout: float = 0.0, seed: int = 0) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=2,
        pad_token_id=1,
    )
    return RobertaForSequenceClassification(config)


def tiny_gpt2(dropout: float = 0.0, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=2,
        n_positions=64,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _tiny_decoder(config_class: type, model_class: type, dropout: float, seed: int) -> torch.nn.Module:
    """A 2-layer Llama-style decoder (Llama, Qwen2: the same config fields)."""
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        attention_dropout=dropout,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return model_class(config)


def tiny_llama(dropout: float = 0.0, seed: int = 0) -> LlamaForCausalLM:
    return _tiny_decoder(LlamaConfig, LlamaForCausalLM, dropout, seed)


def tiny_qwen2(dropout: float = 0.0, seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _tiny_decoder(Qwen2Config, Qwen2ForCausalLM, dropout, seed)


def tiny_t5(dropout: float = 0.0, seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        dropout_rate=dropout,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config)


def _classification_batch(batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(2, VOCAB, (batch_size, SEQ_LEN), generator=generator)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.randint(0, 2, (batch_size,), generator=generator),
    }


def _causal_lm_batch(batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(2, VOCAB, (batch_size, SEQ_LEN), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def _seq2seq_batch(batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(2, VOCAB, (batch_size, SEQ_LEN), generator=generator)
    labels = torch.randint(2, VOCAB, (batch_size, SEQ_LEN // 2), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


# the repeated blocks of each family, and the module types that hold their weight matrices
_BLOCK_RE = re.compile(r"(^|\.)(layer|layers|h|block)\.\d+\.")


@dataclass(frozen=True)
class TinyArch:
    """A tiny architecture: how to build it, its peft task type, how to make batches, and its expected targets."""

    name: str
    build: Callable[..., torch.nn.Module]
    task_type: str
    batch_fn: Callable[[int, torch.Generator], dict[str, torch.Tensor]]
    matrix_type: type
    # modules that must never be wrapped by default (outside the blocks)
    never_wrapped: tuple[str, ...]
    expected_num_targets: int

    def batches(self, n: int, batch_size: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        return [self.batch_fn(batch_size, generator) for _ in range(n)]

    def expected_default_targets(self, base: torch.nn.Module) -> set[str]:
        """The names of every weight matrix (Linear / Conv1D) inside the repeated transformer blocks."""
        return {
            name
            for name, module in base.named_modules()
            if isinstance(module, self.matrix_type) and _BLOCK_RE.search(name)
        }


ARCHS: dict[str, TinyArch] = {
    "bert": TinyArch(
        "bert", tiny_bert, "SEQ_CLS", _classification_batch, torch.nn.Linear,
        ("bert.pooler.dense", "classifier"), 12,
    ),
    "roberta": TinyArch(
        "roberta", tiny_roberta, "SEQ_CLS", _classification_batch, torch.nn.Linear,
        ("classifier.dense", "classifier.out_proj"), 12,
    ),
    "gpt2": TinyArch("gpt2", tiny_gpt2, "CAUSAL_LM", _causal_lm_batch, Conv1D, ("lm_head",), 8),
    "llama": TinyArch("llama", tiny_llama, "CAUSAL_LM", _causal_lm_batch, torch.nn.Linear, ("lm_head",), 14),
    "t5": TinyArch("t5", tiny_t5, "SEQ_2_SEQ_LM", _seq2seq_batch, torch.nn.Linear, ("lm_head",), 32),
}


# not among ARCHS (the tests run over those): the tiny BERT with a wide feed-forward block, for gaps over 16 bits
WIDE_BERT = TinyArch(
    "bertwide", wide_bert, "SEQ_CLS", _classification_batch, torch.nn.Linear, ("bert.pooler.dense", "classifier"), 12
)


@pytest.fixture(params=list(ARCHS), ids=list(ARCHS))
def tiny_models(request: pytest.FixtureRequest) -> TinyArch:
    """Parametrises a test over the tiny BERT, RoBERTa, GPT-2, Llama and T5 architectures."""
    return ARCHS[request.param]


@pytest.fixture
def bert_arch() -> TinyArch:
    return ARCHS["bert"]


# ------------------------------------------------------------------------------------------------ helpers
def peft_model(base: torch.nn.Module, **config_kwargs):
    """get_peft_model on `base` with a ChildTuningConfig built from `config_kwargs`."""
    return get_peft_model(base, ChildTuningConfig(**config_kwargs))


def child_layers(model: torch.nn.Module) -> dict[str, ChildTuningLayer]:
    """The Child-Tuning layers of a (peft) model, keyed by the name of the tuned module in the base model."""
    return {module.module_key: module for module in model.modules() if isinstance(module, ChildTuningLayer)}


def positions_of(layer: ChildTuningLayer, adapter: str = "default", tensor_name: str = "weight") -> torch.Tensor:
    """The decoded child positions (sorted flat int32) of one targeted tensor of a mode-"d" adapter (none if empty).

    The layer stores them encoded (bitmap / int32 / gap16 / gap16x, see `peft_childtuning.sparse_format`); this
    decodes them.
    """
    from peft_childtuning.sparse_format import decode_positions

    if tensor_name not in layer.tuned_tensor_names(adapter):  # an empty child network: the tensor is not tuned
        assert tensor_name in layer.targeted_tensor_names(adapter)
        return torch.empty(0, dtype=torch.int32)
    values_attr, positions_attr = {
        "weight": ("childtuning_values", "childtuning_positions"),
        "bias": ("childtuning_bias_values", "childtuning_bias_positions"),
    }[tensor_name]
    encoded = getattr(layer, positions_attr)[adapter]
    numel = getattr(layer.get_base_layer(), tensor_name).numel()
    size = getattr(layer, values_attr)[adapter].numel()
    spec = layer.childtuning_spec[adapter]
    encoding, recorded = spec.encodings[tensor_name], spec.encoded_lengths.get(tensor_name)
    positions = decode_positions(encoded, numel, size, encoding, layer.tensor_key(tensor_name), recorded)
    positions = positions.to(torch.int32)
    # the layer's own decoded view agrees
    assert torch.equal(layer._positions(adapter, tensor_name), positions)
    return positions


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Snapshot of the base weight of every Child-Tuning layer, keyed by tensor key."""
    return {
        layer.tensor_key("weight"): layer.get_base_layer().weight.detach().clone()
        for layer in child_layers(model).values()
    }


def composed_weights(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The effective weight of every Child-Tuning layer (base with the adapter's child values), by tensor key."""
    with torch.no_grad():
        return {
            layer.tensor_key("weight"): layer.compose("weight", [adapter]).detach().clone()
            for layer in child_layers(model).values()
        }


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def fresh_copy(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module)


def train_steps(model, optimizer, batches, steps: int | None = None) -> None:
    """Plain training loop: forward, backward, optimizer step, zero_grad, over `batches` (cycled to `steps`)."""
    model.train()
    steps = len(batches) if steps is None else steps
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------ saved adapters
@dataclass
class SavedAdapters:
    """A tiny BERT base saved to disk, trained mode-d and mode-f adapters saved from it, and their outputs."""

    base: str
    adapters: dict[str, str]  # mode -> adapter directory
    batch: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]  # mode -> logits of the trained model; "base" -> the base's

    def load_base(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(self.base, dtype=dtype).eval()

    def copy_adapter(self, mode: str, destination: str) -> str:
        import shutil

        shutil.copytree(self.adapters[mode], destination)
        return destination


@pytest.fixture(scope="session")
def saved_adapters(tmp_path_factory: pytest.TempPathFactory) -> SavedAdapters:
    root = tmp_path_factory.mktemp("saved_adapters")
    base_dir = str(root / "base")
    tiny_bert(seed=0).save_pretrained(base_dir)
    arch = ARCHS["bert"]
    batch = {k: v for k, v in arch.batches(1, seed=40)[0].items() if k != "labels"}
    saved = SavedAdapters(base_dir, {}, batch, {})
    with torch.no_grad():
        saved.outputs["base"] = saved.load_base()(**batch).logits
    for mode in ("d", "f"):
        model = peft_model(saved.load_base(), mode=mode, reserve_p=0.3, task_type="SEQ_CLS", seed=3)
        if mode == "d":
            model.detect_child_network(arch.batches(2, seed=20), progress=False)
        optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
        train_steps(model, optimizer, arch.batches(2, seed=21))
        model.eval()
        path = str(root / mode)
        model.save_pretrained(path)
        saved.adapters[mode] = path
        with torch.no_grad():
            saved.outputs[mode] = model(**batch).logits
    return saved


LOADERS = ("from_pretrained", "from_pretrained_low_cpu_mem_usage", "load_adapter", "transformers_load_adapter")


def loader_target(loader: str, saved: SavedAdapters, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """What `loader` loads into: a fresh base, or (load_adapter) a model with the mode-f adapter loaded and merged."""
    from peft import PeftModel

    if loader == "load_adapter":
        return PeftModel.from_pretrained(saved.load_base(dtype), saved.adapters["f"])
    return saved.load_base(dtype)


def run_loader(loader: str, target: torch.nn.Module, adapter_dir: str, **kwargs) -> torch.nn.Module:
    """Load `adapter_dir` into `target` with one of the loaders users have; returns the model that runs it."""
    from peft import PeftModel

    if loader == "from_pretrained":  # placeholders allocated, then copied into (the default assigns the file's)
        return PeftModel.from_pretrained(target, adapter_dir, low_cpu_mem_usage=False, **kwargs)
    if loader == "from_pretrained_low_cpu_mem_usage":
        return PeftModel.from_pretrained(target, adapter_dir, low_cpu_mem_usage=True, **kwargs)
    if loader == "load_adapter":
        target.load_adapter(adapter_dir, adapter_name="loaded", **kwargs)
        target.set_adapter("loaded")
        return target
    if loader == "transformers_load_adapter":
        target.load_adapter(adapter_dir, adapter_name="default", **kwargs)
        return target
    raise ValueError(f"unknown loader {loader!r}")


def rewrite_weights(adapter_dir: str, edit: Callable[[dict[str, torch.Tensor]], None], checksums: bool = True) -> None:
    """Edit an adapter file's tensors in place; with `checksums`, store fresh ones (a consistent file, as a tool
    that knows the format would write it), otherwise none (as a file saved before checksums existed)."""
    import json as _json

    from safetensors.torch import load_file, save_file

    from peft_childtuning.sparse_format import CHECKSUMS_METADATA_KEY, tensor_checksums

    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    metadata = {"format": "pt"}
    if checksums:
        metadata[CHECKSUMS_METADATA_KEY] = _json.dumps(tensor_checksums(tensors))
    save_file(tensors, path, metadata=metadata)


def rewrite_config(adapter_dir: str, edit: Callable[[dict], None]) -> None:
    import json as _json

    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path, encoding="utf-8") as handle:
        config = _json.load(handle)
    edit(config)
    with open(path, "w", encoding="utf-8") as handle:
        _json.dump(config, handle)


def written_by_hand(base: torch.nn.Module, adapter_dir: str) -> torch.nn.Module:
    """The base with the adapter file's child values and saved-whole modules written in directly: an oracle for
    what loading must compute, independent of the loader."""
    from safetensors.torch import load_file

    from peft_childtuning.sparse_format import decode_positions, encoding_of

    tensors = {key.removeprefix("base_model.model."): value for key, value in load_file(
        os.path.join(adapter_dir, "adapter_model.safetensors")).items()}
    state = base.state_dict()
    for key, values in tensors.items():
        if key.endswith(".childtuning_values"):
            module = key.removesuffix(".childtuning_values")
            encoded = tensors[f"{module}.childtuning_positions"]
            weight = state[f"{module}.weight"]
            encoding = encoding_of(encoded, values.numel())
            positions = decode_positions(encoded, weight.numel(), values.numel(), encoding, module, encoded.numel())
            weight.view(-1)[positions.long()] = values.to(weight.dtype)
        elif not key.endswith(".childtuning_positions"):
            state[key].copy_(values)
    return base


def trainer_settings(output_dir, batch_size: int, **overrides) -> dict:
    """TrainingArguments for a few quiet, reproducible CPU steps in a test (constant learning rate, nothing saved,
    reported or drawn), with `overrides` on top."""
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return settings
