"""Child-Tuning in the transformers `Trainer`: a callback, and a hook for multi-process runs.

One process (the usual case)::

    model = get_peft_model(base, ChildTuningConfig(mode="d", reserve_p=0.3, task_type="SEQ_CLS"))
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[ChildTuningCallback()])
    trainer.train()

The adapter may come from any entry point: ``get_peft_model`` (also inside TRL's ``SFTTrainer(...,
peft_config=ChildTuningConfig(...))``), transformers' ``base.add_adapter(ChildTuningConfig(...))`` or peft's
``inject_adapter_in_model``; the callback finds its layers and config in the model either way.

Mode "d": at the start of training the callback runs the Fisher pass on the Trainer's own train dataloader (its
collator, its column removal, its batch size) and logs the size of the child network; training then proceeds. The
optimizer the Trainer has already created keeps working: choosing the child network resizes the values Parameters
in place. Mode "f": the callback keeps the mask step equal to the Trainer's ``global_step``, so a resumed run draws
the same masks as an uninterrupted one.

Several processes (``accelerate launch``, ``torchrun``), in both modes, and whenever you prefer the Fisher pass
before ``train()``::

    trainer = Trainer(..., callbacks=[ChildTuningCallback()])
    prepare_child_network(trainer)  # Fisher pass on every process, scores summed over processes
    trainer.train()

By the time ``on_train_begin`` runs, a multi-process Trainer has wrapped the model in DistributedDataParallel, whose
gradient buckets were laid out for the empty placeholders of an adapter still waiting for its Fisher pass; the pass
must therefore come before ``trainer.train()``, and the callback refuses (with this advice) rather than train a
broken model. (DDP leaves the child positions alone: the tuner lists them in ``_ddp_params_and_buffers_to_ignore``.)

Resuming (``trainer.train(resume_from_checkpoint=...)``) needs no Fisher pass: a Trainer checkpoint holds the child
network, and an adapter still waiting for its Fisher pass adopts the checkpoint's child network when the Trainer
loads it (which the Trainer does before wrapping the model, except under FSDP).
``prepare_child_network(trainer, resume_from_checkpoint=...)`` adopts it explicitly, before anything is wrapped.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .config import ChildTuningConfig
from .fisher import FisherChunks, LossFunction
from .gradient_mask import MaskStepCounter
from .layer import ChildTuningLayer
from .model import active_child_tuning_adapters, child_tuning_adapters, detect_child_network, tuned_tensors

logger = logging.getLogger(__name__)

__all__ = ["ChildTuningCallback", "child_network_summary", "prepare_child_network"]

# ------------------------------------------------------------------------------------------------ model lookup
def _require_adapters(model: nn.Module, who: str) -> dict[str, ChildTuningConfig]:
    """The model's Child-Tuning adapters (it may be wrapped in DDP / FSDP / compile), or a clear error."""
    adapters = child_tuning_adapters(model)
    if not adapters:
        raise ValueError(
            f"{who}: the model has no Child-Tuning adapter. Add one first: "
            "model = get_peft_model(base, ChildTuningConfig(...)), base.add_adapter(ChildTuningConfig(...)) or "
            "peft.inject_adapter_in_model(ChildTuningConfig(...), base); with TRL, pass "
            "peft_config=ChildTuningConfig(...) to the trainer."
        )
    return adapters


def _step_counters(model: nn.Module) -> list[MaskStepCounter]:
    """Every mode-"f" mask step counter the model's Child-Tuning layers read (one per tuner, usually)."""
    counters: dict[int, MaskStepCounter] = {}
    for module in model.modules():
        if isinstance(module, ChildTuningLayer):
            counters[id(module.step_counter)] = module.step_counter
    return list(counters.values())


def _pending_adapters(model: nn.Module, adapters: dict[str, ChildTuningConfig]) -> list[str]:
    """Active mode-"d" adapters still waiting for their Fisher pass."""
    return [
        name
        for name in active_child_tuning_adapters(model)
        if name in adapters and adapters[name].needs_fisher_pass
    ]


def _is_distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _is_main_process() -> bool:
    return not _is_distributed() or torch.distributed.get_rank() == 0


def child_network_summary(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per Child-Tuning adapter of `model`: mode, reserve_p, child entries (mode "d") and tuned entries."""
    summary = {}
    for name, config in child_tuning_adapters(model).items():
        tuned = sum(tensor.numel() for _, _, _, tensor in tuned_tensors(model, name))
        entry: dict[str, Any] = {"mode": config.mode, "reserve_p": config.reserve_p, "tuned_entries": tuned}
        if config.mode == "d":
            child = None if config.child_sizes is None else sum(config.child_sizes.values())
            entry["child_entries"] = child
            entry["child_fraction"] = None if child is None else child / max(tuned, 1)
            entry["tensors"] = None if config.child_sizes is None else len(config.child_sizes)
        summary[name] = entry
    return summary


def _log_summary(model: nn.Module, global_step: Optional[int]) -> dict[str, dict[str, Any]]:
    """Log each adapter's child network (mode "d") or mask (mode "f", when the starting step is known)."""
    summary = child_network_summary(model)
    if _is_main_process():
        for name, entry in summary.items():
            if entry["mode"] == "d" and entry["child_entries"] is not None:
                logger.info(
                    "Child-Tuning-D adapter '%s': child network of %d / %d entries (%.2f%%) in %d tensors",
                    name,
                    entry["child_entries"],
                    entry["tuned_entries"],
                    100.0 * entry["child_fraction"],
                    entry["tensors"],
                )
            elif entry["mode"] == "f" and global_step is not None:
                logger.info(
                    "Child-Tuning-F adapter '%s': %d tuned entries, each step keeps a random %.2f%% of their "
                    "gradients (masks from step %d)",
                    name,
                    entry["tuned_entries"],
                    100.0 * entry["reserve_p"],
                    global_step,
                )
    return summary


# ------------------------------------------------------------------------------------------------ the Fisher pass
@contextmanager
def _without_autocast_wrapper(model: nn.Module) -> Iterator[None]:
    """The model's own forward for the duration, not the autocast wrapper accelerate leaves on it for bf16 / fp16.

    By ``on_train_begin`` the Trainer has prepared the model, and under mixed precision accelerate has replaced its
    forward by one that runs in autocast (keeping the original as ``_original_forward``). The Fisher pass ranks
    entries by small squared gradients and runs in full precision, as it does before ``train()`` and outside a
    Trainer: the same data gives the same child network whatever the training precision.
    """
    original = model.__dict__.get("_original_forward")
    if original is None:
        yield
        return
    wrapped = model.__dict__["forward"]
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


def _run_fisher_pass(
    model: nn.Module,
    adapter_names: list[str],
    dataloader: Iterable[Any],
    num_batches: Optional[int],
    loss_fn: Optional[LossFunction],
    max_grad_norm: Optional[float],
    progress: bool,
    fisher_chunks: FisherChunks,
) -> None:
    """One Fisher pass per adapter (each adapter's selection is its own, from its own reserve_p and targets)."""
    with _without_autocast_wrapper(model):
        for adapter_name in adapter_names:
            detect_child_network(
                model,
                dataloader,
                num_batches=num_batches,
                loss_fn=loss_fn,
                max_grad_norm=max_grad_norm,
                adapter_name=adapter_name,
                progress=progress,
                fisher_chunks=fisher_chunks,
            )


class ChildTuningCallback(TrainerCallback):
    """Child-Tuning for the transformers `Trainer`: ``Trainer(..., callbacks=[ChildTuningCallback()])``.

    - Mode "d" (Fisher selection): at the start of training, if the adapter has no child network yet, runs the
      Fisher pass on the Trainer's train dataloader and selects the child network. A resumed run (the checkpoint
      holds the child network) or one prepared with :func:`prepare_child_network` skips the pass.
    - Both modes: logs the size of the child network / of the tuned tensors (logger ``peft_childtuning.trainer``,
      level INFO) and keeps it in :attr:`summary`.
    - Mode "f": sets the mask step to the Trainer's ``global_step`` at the start of training and after every step,
      so the masks depend on the optimizer step only, also across resumes (and stay right when a mixed-precision
      step is skipped).

    In a multi-process run the Fisher pass must come before ``trainer.train()``: call
    ``prepare_child_network(trainer)`` first (it reads this callback's settings).

    Args:
        num_batches: batches of the Fisher pass (per process; default: one epoch of the train dataloader).
        loss_fn: ``loss_fn(model, batch) -> loss`` for the Fisher pass (default: ``model(**batch).loss``).
        max_grad_norm: per-tensor gradient clipping of the Fisher pass (the paper's code: 1.0).
        progress: show a progress bar during the Fisher pass.
        fisher_chunks: as in :func:`detect_child_network`: 1 (one pass, the fastest), N, or "auto" (scores in chunks,
            one pass over the same batches each, so that the pass peaks no higher than training does; the same child
            network).
    """

    def __init__(
        self,
        num_batches: Optional[int] = None,
        loss_fn: Optional[LossFunction] = None,
        max_grad_norm: Optional[float] = 1.0,
        progress: bool = False,
        fisher_chunks: FisherChunks = 1,
    ) -> None:
        self.num_batches = num_batches
        self.loss_fn = loss_fn
        self.max_grad_norm = max_grad_norm
        self.progress = progress
        self.fisher_chunks = fisher_chunks
        self.fisher_passes = 0  # Fisher passes run for this Trainer (0 when resumed from a checkpoint)
        self.fisher_seconds = 0.0  # their wall time
        self.summary: dict[str, dict[str, Any]] = {}

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Optional[nn.Module] = None,
        train_dataloader: Optional[Iterable[Any]] = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("ChildTuningCallback: the Trainer passed no model to on_train_begin.")
        pending = _pending_adapters(model, _require_adapters(model, "ChildTuningCallback"))
        if pending:
            if _is_distributed() or any(hasattr(param, "device_mesh") for param in model.parameters()):
                raise RuntimeError(
                    f"ChildTuningCallback: Child-Tuning-D adapter(s) {pending} still need their Fisher pass, but this "
                    "is a multi-process run and the Trainer has already wrapped the model (DDP/FSDP), whose gradient "
                    "buckets cannot follow the child network. Call "
                    "`peft_childtuning.trainer.prepare_child_network(trainer)` before `trainer.train()`: it runs the "
                    "Fisher pass (or, given resume_from_checkpoint, adopts the checkpoint's child network)."
                )
            if train_dataloader is None:
                raise ValueError(
                    "ChildTuningCallback: the Fisher pass needs the Trainer's train dataloader, and none was passed; "
                    "call prepare_child_network(trainer) before trainer.train()."
                )
            started = time.perf_counter()
            _run_fisher_pass(
                model,
                pending,
                train_dataloader,
                self.num_batches,
                self.loss_fn,
                self.max_grad_norm,
                self.progress,
                self.fisher_chunks,
            )
            self.fisher_seconds += time.perf_counter() - started
            self.fisher_passes += 1
        for counter in _step_counters(model):
            counter.step = state.global_step
        self.summary = _log_summary(model, state.global_step)

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Optional[nn.Module] = None,
        **kwargs: Any,
    ) -> None:
        if model is not None:
            for counter in _step_counters(model):
                counter.step = state.global_step


def _find_callback(trainer: Any) -> Optional[ChildTuningCallback]:
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ChildTuningCallback):
            return callback
    return None


_UNSET: Any = object()


def prepare_child_network(
    trainer: Any,
    resume_from_checkpoint: Union[str, bool, None] = None,
    num_batches: Optional[int] = _UNSET,
    loss_fn: Optional[LossFunction] = _UNSET,
    max_grad_norm: Optional[float] = _UNSET,
    progress: bool = _UNSET,
    fisher_chunks: FisherChunks = _UNSET,
) -> dict[str, dict[str, Any]]:
    """Give the Trainer's Child-Tuning-D adapter its child network now, before ``trainer.train()`` wraps the model.

    Needed in multi-process runs (DDP, FSDP: the wrapper's buckets / shards are laid out when ``train()`` starts);
    harmless in one process. Each process runs the Fisher pass on its shard of ``trainer.get_train_dataloader()``
    and the scores are summed over processes before the selection, so every process selects the same child network,
    the one a single process would select over all the batches.

    With ``resume_from_checkpoint`` (a checkpoint folder, or True for the last one in ``args.output_dir``) no Fisher
    pass runs: the adapter adopts the checkpoint's child network (and values; the Trainer loads them again). Pass the
    same value to ``trainer.train(resume_from_checkpoint=...)``.

    Adapters that already have a child network (mode "f", random selection, prepared before) are left alone. The
    Fisher-pass settings default to those of the trainer's :class:`ChildTuningCallback`, if it has one. In every
    multi-process run call it before ``train()`` when an adapter still needs its Fisher pass or when resuming.

    Returns:
        Per adapter: mode, reserve_p, tuned entries and (mode "d") child entries.
    """
    model = trainer.model
    adapters = _require_adapters(model, "prepare_child_network")
    callback = _find_callback(trainer)
    settings = {
        "num_batches": None if callback is None else callback.num_batches,
        "loss_fn": None if callback is None else callback.loss_fn,
        "max_grad_norm": 1.0 if callback is None else callback.max_grad_norm,
        "progress": False if callback is None else callback.progress,
        "fisher_chunks": 1 if callback is None else callback.fisher_chunks,
    }
    for key, value in (
        ("num_batches", num_batches),
        ("loss_fn", loss_fn),
        ("max_grad_norm", max_grad_norm),
        ("progress", progress),
        ("fisher_chunks", fisher_chunks),
    ):
        if value is not _UNSET:
            settings[key] = value
    pending = _pending_adapters(model, adapters)
    if pending and getattr(trainer, "model_wrapped", model) is not model:
        raise RuntimeError(
            "prepare_child_network: the Trainer has already wrapped the model (it trained before); call "
            "prepare_child_network(trainer) before the first trainer.train()."
        )
    if pending and resume_from_checkpoint not in (None, False):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(trainer.args.output_dir)
            if checkpoint is None:
                raise ValueError(f"prepare_child_network: no checkpoint found in {trainer.args.output_dir}.")
        _adopt_checkpoint_child_network(model, adapters, str(checkpoint), pending)
    elif pending:
        started = time.perf_counter()
        _run_fisher_pass(model, pending, trainer.get_train_dataloader(), **settings)
        if callback is not None:
            callback.fisher_seconds += time.perf_counter() - started
            callback.fisher_passes += 1
    summary = _log_summary(model, None)  # the callback logs mode "f" once it knows the starting step
    if callback is not None:
        callback.summary = summary
    return summary


def _adopt_checkpoint_child_network(
    model: nn.Module, configs: dict[str, ChildTuningConfig], checkpoint: str, adapters: list[str]
) -> None:
    """Load the adapters' tensors from a Trainer checkpoint: a Fisher-pending adapter adopts its child network."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    for adapter_name in adapters:
        # the Trainer saves the default adapter at the top of the checkpoint, others in sub-folders
        folder = checkpoint if adapter_name == "default" else os.path.join(checkpoint, adapter_name)
        if not os.path.isdir(folder):
            folder = checkpoint
        weights = load_peft_weights(folder, device=str(next(model.parameters()).device))
        set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
        if configs[adapter_name].needs_fisher_pass:
            raise ValueError(
                f"prepare_child_network: the checkpoint {checkpoint} holds no child network for adapter "
                f"'{adapter_name}'."
            )
