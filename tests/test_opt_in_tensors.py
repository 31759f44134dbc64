"""Biases, LayerNorms and embeddings can be opted in: they are child-tuned, saved and reloaded like the weights."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from peft_childtuning import ChildTuningConfig, ChildTuningLayer


@pytest.mark.parametrize("mode", ["d", "f"])
def test_layernorm_embedding_and_bias_opt_in(mode: str, tmp_path) -> None:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    base = BertForSequenceClassification(config).eval()
    batch = {"input_ids": torch.randint(0, 100, (4, 12)), "labels": torch.tensor([0, 1, 0, 1])}
    model = get_peft_model(
        copy.deepcopy(base),
        ChildTuningConfig(
            mode=mode, target_modules=["query", "LayerNorm", "word_embeddings"], tune_bias=True, task_type="SEQ_CLS"
        ),
    )
    layers = [module for module in model.modules() if isinstance(module, ChildTuningLayer)]
    wrapped = {type(layer.get_base_layer()).__name__ for layer in layers}
    assert wrapped == {"Linear", "LayerNorm", "Embedding"}
    if mode == "d":
        model.detect_child_network([batch], progress=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    embedding = model.base_model.model.bert.embeddings.word_embeddings
    layer_norm = model.base_model.model.bert.embeddings.LayerNorm
    for layer, tensor_name in [(embedding, "weight"), (layer_norm, "weight"), (layer_norm, "bias")]:
        composed = layer.compose(tensor_name, ["default"]).detach()
        assert not torch.equal(composed, getattr(layer.get_base_layer(), tensor_name)), f"{tensor_name} did not train"
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
