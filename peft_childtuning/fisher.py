"""Mode "d": estimating the Fisher information of the tuned tensors, and choosing the child network from it.

Estimation follows the released code: dropout on, for each batch the loss gradient of each tuned tensor clipped to
norm `max_grad_norm` on its own, squared, and averaged over the batches. Selection picks exactly
k = round(reserve_p * N) entries across all tensors, without concatenating the scores into one copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from .sparse_format import all_finite, flat_nonzero

LossFunction = Callable[[torch.nn.Module, Any], torch.Tensor]

# bits of a non-negative float32, read as int32, order like the floats themselves; split into two 16-bit digits
_DIGIT_BITS = 16
_DIGIT_VALUES = 1 << _DIGIT_BITS


def child_size(reserve_p: float, num_entries: int) -> int:
    """k = round(reserve_p * N), the size of the child network."""
    return min(num_entries, round(reserve_p * num_entries))


def proportional_child_sizes(reserve_p: float, tensor_sizes: Sequence[int]) -> list[int]:
    """Per-tensor child sizes proportional to the tensor sizes, summing exactly to k (largest remainders win)."""
    total = child_size(reserve_p, sum(tensor_sizes))
    exact = [reserve_p * size for size in tensor_sizes]
    sizes = [min(size, math.floor(share)) for size, share in zip(tensor_sizes, exact)]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (sizes[i] - exact[i], i))
    for i in by_remainder[: total - sum(sizes)]:
        sizes[i] += 1
    return sizes


def random_child_positions(num_entries: int, size: int, seed: int, tensor_key: str) -> torch.Tensor:
    """`size` distinct sorted flat positions out of `num_entries`, from a generator seeded by (seed, tensor)."""
    from .gradient_mask import mask_seed  # the same stable seed mixing as mode "f"

    generator = torch.Generator().manual_seed(mask_seed(seed, -1, tensor_key))
    return torch.randperm(num_entries, generator=generator)[:size].sort().values


def _move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({key: _move_to(value, device) for key, value in batch.items()})
    return batch


def _default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"detect_child_network: a batch is a {type(batch).__name__}, not a dict of model inputs; pass batches "
            "for model(**batch), or loss_fn=lambda model, batch: ... that returns the loss."
        )
    outputs = model(**batch)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            "detect_child_network: model(**batch) returned no loss. Put the labels in each batch (e.g. 'labels'), "
            "or pass loss_fn=lambda model, batch: ... that returns the loss."
        )
    return loss


def estimate_fisher(
    model: torch.nn.Module,
    tensors: Mapping[str, torch.nn.Parameter],
    dataloader: Iterable[Any],
    num_batches: Optional[int] = None,
    loss_fn: Optional[LossFunction] = None,
    max_grad_norm: Optional[float] = 1.0,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Empirical Fisher information of each tensor in `tensors` (fp32, same shape), averaged over the batches.

    Only `tensors` get gradients during the pass; each gradient is folded into its Fisher buffer as soon as it is
    accumulated and then freed, so the peak is the Fisher buffers plus one layer's gradient. Every parameter's
    `requires_grad`, `.grad` and the model's train/eval mode are restored afterwards.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"detect_child_network: num_batches={num_batches} must be at least 1 (or None for all).")
    loss_fn = loss_fn or _default_loss
    device = next(iter(tensors.values())).device
    fisher = {name: torch.zeros_like(tensor, dtype=torch.float32) for name, tensor in tensors.items()}

    def fold_into_fisher(name: str) -> Callable[[torch.Tensor], None]:
        def hook(tensor: torch.Tensor) -> None:
            grad = tensor.grad.float()
            if max_grad_norm is not None:
                norm = torch.linalg.vector_norm(grad)
                grad = grad * (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            fisher[name].add_(grad.square())
            tensor.grad = None

        return hook

    parameters = list(model.parameters())
    saved_requires_grad = [parameter.requires_grad for parameter in parameters]
    saved_grads = [parameter.grad for parameter in parameters]
    was_training = model.training
    handles = []
    batches_seen = 0
    try:
        for parameter in parameters:
            parameter.requires_grad_(False)
            parameter.grad = None
        for name, tensor in tensors.items():
            tensor.requires_grad_(True)
            handles.append(tensor.register_post_accumulate_grad_hook(fold_into_fisher(name)))
        model.train()
        total = num_batches if num_batches is not None else _length_or_none(dataloader)
        for batch in tqdm(dataloader, total=total, desc="Fisher information", disable=not progress):
            if num_batches is not None and batches_seen >= num_batches:
                break
            loss = loss_fn(model, _move_to(batch, device))
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError("detect_child_network: the loss must be a scalar tensor.")
            loss.backward()
            batches_seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for parameter, requires_grad, grad in zip(parameters, saved_requires_grad, saved_grads):
            parameter.requires_grad_(requires_grad)
            parameter.grad = grad
        model.train(was_training)
    batches_seen = _sum_over_processes(fisher, batches_seen, device)
    if batches_seen == 0:
        raise ValueError("detect_child_network: the dataloader yielded no batch; the Fisher pass needs task data.")
    for name, scores in fisher.items():
        scores.div_(batches_seen)
        if not all_finite(scores):
            raise FloatingPointError(
                f"detect_child_network: non-finite Fisher scores in {name} (the loss or its gradient overflowed); "
                "check the data and the loss, or run the pass in float32."
            )
    return fisher


def _sum_over_processes(fisher: dict[str, torch.Tensor], batches_seen: int, device: torch.device) -> int:
    """In a multi-process run (accelerate, torchrun), sum the scores and batch counts of all processes.

    Each process sees its shard of the data; after the sum every process holds the Fisher of all the data, so all
    of them select the same child network as one process would.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return batches_seen
    if torch.distributed.get_world_size() == 1:
        return batches_seen
    for scores in fisher.values():
        torch.distributed.all_reduce(scores, op=torch.distributed.ReduceOp.SUM)
    count = torch.tensor([batches_seen], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.SUM)
    return int(count.item())


def _length_or_none(iterable: Iterable[Any]) -> Optional[int]:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def _ordered_bits(scores: torch.Tensor) -> torch.Tensor:
    """int32 codes that order like the (non-negative, finite) float32 scores."""
    return scores.detach().reshape(-1).to(torch.float32).view(torch.int32)


@dataclass(frozen=True)
class TopKThreshold:
    """Where the k-th largest score lies: every score above `threshold_bits` is chosen, plus `ties[i]` of tensor
    i's scores equal to it (the first ones by position). Positions are materialised per tensor, when needed."""

    threshold_bits: int
    ties: tuple[int, ...]

    def positions(self, index: int, score: torch.Tensor) -> torch.Tensor:
        """The chosen flat positions (sorted, int64) of tensor `index`, whose scores are `score`."""
        bits = _ordered_bits(score)
        chosen = flat_nonzero(bits > self.threshold_bits)
        if self.ties[index]:
            ties = flat_nonzero(bits == self.threshold_bits)[: self.ties[index]]
            chosen = torch.cat([chosen, ties]).sort().values
        return chosen.to(score.device)


def top_k_threshold(scores: Sequence[torch.Tensor], k: int) -> TopKThreshold:
    """Find the threshold of the exactly-k highest scores across all tensors, without concatenating them.

    Ties at the threshold go to the earlier tensor, then the lower position, so the result is deterministic.
    Radix selection on the float bits: one histogram pass over the high 16 bits, one over the low 16 bits of the
    boundary bucket; extra memory is one tensor's temporaries at a time. (Keeping the boundary bucket's digits to count
    the ties would save a partial pass, but those small long-lived tensors fragment the heap: 13% of the scores' size
    in RSS at N = 10^9 instead of 2%.) Scores must be finite and non-negative (-0.0 must be passed as +0.0;
    `select_top_k` takes care of that).
    """
    total = sum(score.numel() for score in scores)
    if not 0 <= k <= total:
        raise ValueError(f"select_top_k: k={k} is outside [0, {total}].")
    if k == 0:  # above the largest possible code: nothing is chosen
        return TopKThreshold(torch.iinfo(torch.int32).max, (0,) * len(scores))

    def boundary(counts: torch.Tensor, wanted: int) -> tuple[int, int]:
        """The digit where the `wanted`-th largest entry falls, and how many entries lie strictly above it."""
        above = torch.cumsum(counts.flip(0), 0)  # above[i] = entries with digit >= last - i
        index = int(torch.searchsorted(above, torch.tensor(wanted)))
        strictly_above = int(above[index - 1]) if index > 0 else 0
        return _DIGIT_VALUES - 1 - index, strictly_above

    counts = torch.zeros(_DIGIT_VALUES, dtype=torch.int64)
    for score in scores:
        counts += torch.bincount(_ordered_bits(score) >> _DIGIT_BITS, minlength=_DIGIT_VALUES).cpu()
    high, above_high = boundary(counts, k)
    counts = torch.zeros(_DIGIT_VALUES, dtype=torch.int64)
    for score in scores:  # the low digits of the entries in the boundary bucket
        bits = _ordered_bits(score)
        lows = bits[(bits >> _DIGIT_BITS) == high] & (_DIGIT_VALUES - 1)
        counts += torch.bincount(lows, minlength=_DIGIT_VALUES).cpu()
    low, above_low = boundary(counts, k - above_high)
    threshold = (high << _DIGIT_BITS) | low
    ties_left = k - above_high - above_low
    ties = []
    for score in scores:
        taken = min(ties_left, int(torch.count_nonzero(_ordered_bits(score) == threshold))) if ties_left else 0
        ties.append(taken)
        ties_left -= taken
    return TopKThreshold(threshold, tuple(ties))


def select_top_k(scores: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Exactly k entries with the highest scores across all tensors, as sorted int64 flat positions per tensor.

    Ties at the threshold go to the earlier tensor, then the lower position (see `top_k_threshold`).
    """
    scores = list(scores)
    for index, score in enumerate(scores):
        if score.numel() and (not torch.isfinite(score).all() or bool((score < 0).any())):
            raise ValueError("select_top_k: scores must be finite and non-negative (Fisher information is).")
        if score.is_floating_point() and bool(torch.signbit(score).any()):
            scores[index] = score + 0.0  # -0.0 has the sign bit set: make it +0.0, whose bits order like the value
    threshold = top_k_threshold(scores, k)
    return [threshold.positions(index, score) for index, score in enumerate(scores)]
