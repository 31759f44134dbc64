"""`ChildTuningConfig`: what a user sets, and what a saved adapter needs to rebuild its layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig

from .registration import CHILDTUNING_PEFT_TYPE
from .sparse_format import ENCODINGS, VARIABLE_LENGTH_ENCODINGS

MODES = ("d", "f")
SELECTIONS = ("fisher", "random")


@dataclass
class ChildTuningConfig(PeftConfig):
    """Configuration of Child-Tuning (Xu et al., EMNLP 2021, "Raise a Child in Large Language Model").

    Child-Tuning updates only a *child network* of the pretrained weights:

    - mode ``"d"`` (task-driven): the ``reserve_p`` fraction of entries with the highest Fisher information on the task
      data, chosen once before training by ``model.detect_child_network(dataloader)`` (or a seeded random child network
      of the same size with ``selection="random"``). Only those entries are trainable; every other entry stays
      bit-identical to the base weight, and the adapter is the sparse diff against the base.
    - mode ``"f"`` (task-free): every step, a fresh Bernoulli(``reserve_p``) mask keeps a random subset of the
      gradients of the targeted weights and scales them by ``1 / reserve_p``.

    Args:
        mode: ``"d"`` or ``"f"``.
        reserve_p: fraction of entries in the child network (mode "d") or kept per step (mode "f"), in (0, 1].
        selection: mode "d" only: ``"fisher"`` (the paper; needs ``detect_child_network``) or ``"random"`` (a seeded
            random child network of the same size, chosen when the model is created: the paper's ablation, and a way
            to run without data).
        seed: seeds the random child network and the mode-"f" masks (drawn from (seed, optimizer step)).
        target_modules: modules to tune (list: suffix match, str: full regex). Default: the attention and MLP weight
            matrices inside the repeated transformer blocks of known architectures. LayerNorms and embeddings can be
            opted in by naming them here.
        exclude_modules: modules not to tune.
        tune_bias: also child-tune the bias of each targeted module (default: only its weight).
        modules_to_save: modules that train fully and are saved whole (the classifier head for SEQ_CLS is added by
            peft).
        init_weights: True: the adapter starts as the identity (outputs equal the base model's). False: the child
            values start perturbed with noise from torch's global RNG (for tests).
        child_sizes, child_encodings: filled in by child selection: the number of child entries of each tuned
            tensor and the encoding of its positions, keyed by ``"<module name>.<weight|bias>"``. A saved adapter
            needs them so that every loader can build layers of the right shapes before the tensors arrive.
        child_encoded_lengths: filled in by child selection, only for tensors whose positions have an encoding of
            variable length ("gap16x", 16-bit gaps with a table of the wide ones): the number of words of the
            stream, with which every loader builds the layer's positions tensor; None where no tensor needs it.
        base_fingerprint: filled in when the adapter is created: what identifies the base model it is tuned from
            (`fingerprint`), checked whenever its child network is loaded.
        ignore_base_mismatch: load the adapter even onto a base whose fingerprint differs (at your own risk). Only
            a value given when loading counts (``ChildTuningConfig.from_pretrained(path, ignore_base_mismatch=True)``
            or ``PeftModel.from_pretrained(..., ignore_base_mismatch=True)``): one saved in adapter_config.json is
            ignored, so that editing a file cannot switch the check off.
    """

    mode: Literal["d", "f"] = field(default="d", metadata={"help": "'d' (Fisher child network) or 'f' (random mask)."})
    reserve_p: float = field(default=0.3, metadata={"help": "Fraction of entries tuned (d) or kept per step (f)."})
    selection: Literal["fisher", "random"] = field(
        default="fisher", metadata={"help": "Mode 'd': 'fisher' (detect_child_network) or 'random' (seeded)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random child network and of the mode-'f' masks."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules to tune; None picks the transformer blocks' weight matrices."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules not to tune (list: suffix match, str: regex)."}
    )
    tune_bias: bool = field(default=False, metadata={"help": "Also child-tune the biases of targeted modules."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained fully and saved whole, e.g. a classifier head."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: identity at start. False: child values perturbed (for tests)."}
    )
    child_sizes: Optional[dict[str, int]] = field(
        default=None, metadata={"help": "Set by child selection: child entries per tuned tensor. Leave unset."}
    )
    child_encodings: Optional[dict[str, str]] = field(
        default=None, metadata={"help": "Set by child selection: position encoding per tuned tensor. Leave unset."}
    )
    child_encoded_lengths: Optional[dict[str, int]] = field(
        default=None, metadata={"help": "Set by child selection: gap16x stream length per tensor. Leave unset."}
    )
    base_fingerprint: Optional[dict[str, Any]] = field(
        default=None, metadata={"help": "Set at creation: what identifies the base model tuned. Leave unset."}
    )
    ignore_base_mismatch: bool = field(
        default=False, metadata={"help": "Load even onto a base whose fingerprint differs from the recorded one."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = CHILDTUNING_PEFT_TYPE
        self.target_parameters = None  # peft reads it; Child-Tuning targets modules
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.mode not in MODES:
            raise ValueError(f"ChildTuningConfig: unknown mode {self.mode!r}; use 'd' (Fisher child network) or 'f'.")
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"ChildTuningConfig: unknown selection {self.selection!r}; use 'fisher' (detect_child_network) or "
                "'random'."
            )
        if isinstance(self.reserve_p, bool) or not isinstance(self.reserve_p, (int, float)) or not (
            0.0 < self.reserve_p <= 1.0
        ):
            raise ValueError(
                f"ChildTuningConfig: reserve_p={self.reserve_p!r} is outside (0, 1]; it is the fraction of entries "
                "tuned, e.g. 0.3."
            )
        self.reserve_p = float(self.reserve_p)
        if self.child_sizes is not None:
            self.child_sizes = {str(key): int(size) for key, size in self.child_sizes.items()}
        unknown = set((self.child_encodings or {}).values()) - set(ENCODINGS)
        if unknown:
            raise ValueError(f"ChildTuningConfig: unknown position encodings {sorted(unknown)}; known: {ENCODINGS}.")
        lengths = self.child_encoded_lengths or {}
        if not all(type(length) is int and length >= 0 for length in lengths.values()):
            raise ValueError(
                f"ChildTuningConfig: child_encoded_lengths must map tensors to word counts, got {lengths!r}; the "
                "config is corrupted. Save the adapter again."
            )
        encodings = self.child_encodings or {}
        variable = {key for key, encoding in encodings.items() if encoding in VARIABLE_LENGTH_ENCODINGS}
        if set(lengths) != variable:
            raise ValueError(
                f"ChildTuningConfig: child_encoded_lengths records {sorted(lengths)}, but the tensors whose encoding "
                f"has a variable length ({', '.join(VARIABLE_LENGTH_ENCODINGS)}) are {sorted(variable)}; each needs "
                "its length, and only they have one. The config is corrupted: save the adapter again."
            )

    @property
    def needs_fisher_pass(self) -> bool:
        """True until a Fisher-selected mode-"d" adapter has its child network."""
        return self.mode == "d" and self.selection == "fisher" and self.child_sizes is None

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any
    ) -> "ChildTuningConfig":
        """peft's from_pretrained, except that `ignore_base_mismatch` comes from the caller, never from the file
        (peft lets the file's values override keyword arguments)."""
        ignore_base_mismatch = bool(kwargs.pop("ignore_base_mismatch", False))
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config.ignore_base_mismatch = ignore_base_mismatch
        return config
