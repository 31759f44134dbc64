"""Mode "f": the per-step Bernoulli gradient mask, and the optimizer-step counter that seeds it.

A mask is a pure function of (seed, optimizer step, tensor name): the same run twice gives the same weights, every
process of a multi-process run draws the same masks, and all micro-batches of one accumulated step share one mask.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from typing import Any, Callable

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def mask_seed(seed: int, step: int, tensor_key: str) -> int:
    """A 63-bit generator seed for one tensor at one optimizer step (stable across processes and Python runs)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{tensor_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# each entry's keep decision compares 15 random bits with reserve_p, so the keep probability is reserve_p to within
# 2**-16; four entries share one 64-bit draw, a quarter of the draws of one float per entry
_MASK_BITS = 15
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def bernoulli_keep_mask(
    shape: torch.Size, reserve_p: float, seed: int, step: int, tensor_key: str, device: torch.device | str
) -> torch.Tensor:
    """The bool mask of Child-Tuning-F: each entry kept with probability `reserve_p` (to a resolution of 2**-15).

    On CPU the draws come from numpy's SFC64 generator, on other devices from torch's generator there: a mask is
    reproducible for a given device type (as torch's own CPU and CUDA streams differ anyway).
    """
    threshold = max(1, round(reserve_p * (1 << _MASK_BITS)))
    if threshold >= 1 << _MASK_BITS:  # every entry kept (and the threshold would not fit the 16-bit draws)
        return torch.ones(shape, dtype=torch.bool, device=device)
    numel = math.prod(shape)
    generator_seed = mask_seed(seed, step, tensor_key)
    if torch.device(device).type == "cpu":
        # about twice the throughput of torch's CPU generator and compare (4M entries, side by side: 2.8 vs 5.0 ms);
        # 16-bit draw < 2 * threshold is exactly its top 15 bits < threshold
        words = np.random.SFC64(generator_seed).random_raw((numel + 3) // 4)
        return torch.from_numpy(words.view(np.uint16)[:numel] < 2 * threshold).view(shape)
    generator = torch.Generator(device=device).manual_seed(generator_seed)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(generator=generator)
    draws = words.view(torch.int16)[:numel] & ((1 << _MASK_BITS) - 1)  # random_ leaves the sign bit 0: 15 bits each
    return (draws < threshold).view(shape)


def masked_gradient(grad: torch.Tensor, reserve_p: float, seed: int, step: int, tensor_key: str) -> torch.Tensor:
    """`grad` times its Bernoulli(reserve_p) keep mask, divided by reserve_p: Child-Tuning-F's gradient."""
    keep = bernoulli_keep_mask(grad.shape, reserve_p, seed, step, tensor_key, grad.device)
    if grad.device.type == "cpu" and grad.dtype in _NUMPY_FLOATS and not grad.requires_grad:
        # numpy multiplies by a bool mask without first converting it (measured on 4M entries: 1.6 vs 2.4 ms)
        return torch.from_numpy(np.multiply(grad.numpy(), keep.numpy())).div_(reserve_p)
    return grad.mul(keep).div_(reserve_p)


class MaskStepCounter:
    """Counts the optimizer steps that update a model's mode-"f" tensors.

    Gradient hooks cannot tell a micro-batch from an optimizer step, so the count comes from torch's global
    optimizer-step hook, which every optimizer (fused AdamW included) calls. `step` can be set, e.g. when resuming.

    The count lives in a 0-dim CPU tensor, changed in place: a compiled forward reads it as a graph input, where a
    Python int would be baked into the graph as a constant and recompile it every step.
    """

    def __init__(self, trainable_parameters: Callable[[], list[torch.nn.Parameter]]) -> None:
        with torch.inference_mode(False):  # a model built under inference mode still counts its training steps
            self.step_tensor = torch.zeros((), dtype=torch.int64, device="cpu")
        self._trainable_parameters = trainable_parameters
        _COUNTERS.add(self)

    @property
    def step(self) -> int:
        return int(self.step_tensor)

    @step.setter
    def step(self, value: int) -> None:
        self.step_tensor.fill_(value)

    def _updated_by(self, optimizer: torch.optim.Optimizer) -> bool:
        ours = {id(parameter) for parameter in self._trainable_parameters()}
        return any(id(parameter) in ours for group in optimizer.param_groups for parameter in group["params"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a copy (deepcopy, pickle) counts the steps of its own model
        self.__dict__.update(state)
        _COUNTERS.add(self)


# every live counter, weakly: one global hook serves them all. (A hook per counter, removed when the counter is
# collected, would change torch's hook dict while torch iterates it: the cyclic garbage collector can free a
# counter at any allocation, also during the hooks of an optimizer step.)
_COUNTERS: "weakref.WeakSet[MaskStepCounter]" = weakref.WeakSet()


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for counter in list(_COUNTERS):
        if counter._updated_by(optimizer):
            counter.step_tensor += 1


register_optimizer_step_post_hook(_count_optimizer_step)


@torch.library.custom_op("peft_childtuning::masked_gradient", mutates_args=())
def _masked_gradient_op(
    grad: torch.Tensor, step: torch.Tensor, reserve_p: float, seed: int, tensor_key: str
) -> torch.Tensor:
    """`masked_gradient` as an operator that torch.compile keeps opaque: the mask's hash and numpy generator cannot
    be traced, and as one node of the graph they need not be. Contiguous, as its fake (meta) result says."""
    return masked_gradient(grad.contiguous(), reserve_p, seed, int(step), tensor_key)


@_masked_gradient_op.register_fake
def _(grad: torch.Tensor, step: torch.Tensor, reserve_p: float, seed: int, tensor_key: str) -> torch.Tensor:
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _masked_gradient_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.mask_inputs = inputs[1:]


def _masked_gradient_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    # linear in the gradient: a double backward (create_graph=True) masks with the same mask
    return _masked_gradient_op(grad, *ctx.mask_inputs), None, None, None, None


_masked_gradient_op.register_autograd(_masked_gradient_backward, setup_context=_masked_gradient_setup)


class BernoulliGradientMask(torch.autograd.Function):
    """Identity in the forward; in the backward, multiplies the gradient by a fresh Bernoulli(p) mask / p.

    Living in the autograd graph (rather than as a hook on the Parameter object) it survives peft replacing adapter
    Parameters when it moves or upcasts them, and it works with any optimizer. The step is the counter's 0-dim
    tensor (`MaskStepCounter.step_tensor`), copied at forward time: the mask is that of the step the forward ran in.
    """

    @staticmethod
    def forward(
        ctx: Any, values: torch.Tensor, step: torch.Tensor, reserve_p: float, seed: int, tensor_key: str
    ) -> torch.Tensor:
        ctx.save_for_backward(step.clone())
        ctx.mask_args = (reserve_p, seed, tensor_key)
        return values.view_as(values)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (step,) = ctx.saved_tensors
        return _masked_gradient_op(grad, step, *ctx.mask_args), None, None, None, None
