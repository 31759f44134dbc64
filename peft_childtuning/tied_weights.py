"""Refusing to child-tune a tied tensor (one Parameter reachable from several modules, e.g. GPT-2's `wte` / `lm_head`).

Unmerged, the adapter changes the tensor only where the targeted module reads it; merged, it writes the child values
into the one shared Parameter, which every module sharing it reads. Merged and unmerged models would compute different
things (and the trained model would match neither exactly), so such a target is refused before any module is wrapped.
"""

from __future__ import annotations

from collections.abc import Iterable

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def tied_tensor_problems(model: nn.Module, targets: Iterable[tuple[str, nn.Module]], tune_bias: bool) -> list[str]:
    """'<target tensor> is the same Parameter as <other names>' for every targeted tensor that another module shares."""
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name.replace(".base_layer.", "."))
    problems = []
    for key, module in targets:
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        for tensor_name in ("weight", "bias") if tune_bias else ("weight",):
            tensor = getattr(base, tensor_name, None)
            if not isinstance(tensor, nn.Parameter):
                continue
            others = sorted({name for name in names_of.get(id(tensor), []) if not name.startswith(f"{key}.")})
            if others:
                problems.append(f"{key}.{tensor_name} is the same Parameter as {', '.join(others)}")
    return problems


def refuse_tied_targets(model: nn.Module, targets: Iterable[tuple[str, nn.Module]], tune_bias: bool) -> None:
    """Raise `ValueError` naming the tied tensors and the fixes, if any targeted tensor is tied to another module's."""
    problems = tied_tensor_problems(model, targets, tune_bias)
    if problems:
        raise ValueError(
            f"Child-Tuning cannot tune tied tensors: {'; '.join(problems)}. Merging would write the child values into "
            "the shared tensor, which the other modules read too, while the unmerged adapter changes only the "
            "targeted module, so merged and unmerged outputs would differ. Untie them before get_peft_model: set "
            "model.config.tie_word_embeddings = False (so transformers does not tie them again) and give the other "
            "module a copy of its own, e.g. model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach()"
            ".clone()); or build the model untied (tie_word_embeddings=False in its config); or leave the tied "
            "module out of target_modules."
        )
