"""Default target modules: the weight matrices of attention and MLP inside the repeated transformer blocks.

Each entry is a full-match regular expression (peft treats a string ``target_modules`` as one), so that modules with
the same short name outside the blocks (BERT's pooler ``dense``, a classifier's ``dense``) are not tuned.
"""

from __future__ import annotations

# the attribute that holds the repeated blocks, per family: encoder.layer.N, h.N, layers.N, block.N
_BLOCK = r"(?:layer|layers|h|block|blocks)\.\d+"


def _in_blocks(*module_names: str) -> str:
    return rf"(?:.*\.)?{_BLOCK}\.(?:.*\.)?(?:{'|'.join(module_names)})"


_BERT_LIKE = _in_blocks("query", "key", "value", "dense")
_LLAMA_LIKE = _in_blocks("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

TRANSFORMERS_MODELS_TO_CHILDTUNING_TARGET_MODULES_MAPPING: dict[str, str] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "deberta": _in_blocks("in_proj", "pos_proj", "pos_q_proj", "dense"),
    "deberta-v2": _in_blocks("query_proj", "key_proj", "value_proj", "pos_key_proj", "pos_query_proj", "dense"),
    "distilbert": _in_blocks("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
    "gpt2": _in_blocks("c_attn", "c_proj", "c_fc"),
    "gptj": _in_blocks("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
    "gpt_neox": _in_blocks("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "opt": _in_blocks("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "bart": _in_blocks("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "t5": _in_blocks("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"),
    "mt5": _in_blocks("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _in_blocks("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}
