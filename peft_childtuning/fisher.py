"""Mode "d": estimating the Fisher information of the tuned tensors, and choosing the child network from it.

Estimation follows the released code: dropout on, for each batch the loss gradient of each tuned tensor clipped to
norm `max_grad_norm` on its own, squared, and averaged over the batches. Selection picks exactly
k = round(reserve_p * N) entries across all tensors, without concatenating the scores into one copy.

The scores of all N entries (4 B each) are what makes the pass need more memory than training, which holds about
20 B per child entry (values, gradients, AdamW's moments, positions). With `fisher_chunks` > 1 the entries are
scored a chunk at a time, one pass over the same batches (replayed, with the same random state) per chunk, and only
the k best so far are kept between chunks: the same child network, bit for bit, in less memory and more time.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from dataclasses import dataclass
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable, Literal, Optional, Union

import torch
from tqdm.auto import tqdm

from .sparse_format import all_finite, flat_nonzero, index_dtype

LossFunction = Callable[[torch.nn.Module, Any], torch.Tensor]
FisherChunks = Union[int, Literal["auto"]]
# a contiguous run of one tensor's flat entries: (tensor name, start, stop)
Piece = tuple[str, int, int]

logger = logging.getLogger(__name__)
# where no progress bar is drawn on a terminal, the Fisher pass logs its progress at most this often (seconds)
PROGRESS_LOG_SECONDS = 30.0

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
    accumulated (in place, no temporaries) and then freed, so the peak is the Fisher buffers plus one layer's
    gradient. Every parameter's `requires_grad`, `.grad` and the model's train/eval mode are restored afterwards.

    `progress` draws a progress bar. Where none is drawn on a terminal (progress off, or output to a file or a
    pipe), the pass logs its progress instead (see `_ProgressLog`), so that a long pass shows signs of life in logs.
    """
    _check_num_batches(num_batches)
    pieces = [(name, 0, tensor.numel()) for name, tensor in tensors.items()]
    batches = itertools.islice(dataloader, num_batches)
    scores = _fisher_pass(
        model, tensors, pieces, batches, _batch_total(dataloader, num_batches), loss_fn, max_grad_norm, progress
    )
    return {name: score.view(tensors[name].shape) for (name, _, _), score in zip(pieces, scores)}


def fisher_child_network(
    model: torch.nn.Module,
    tensors: Mapping[str, torch.nn.Parameter],
    k: int,
    dataloader: Iterable[Any],
    num_batches: Optional[int] = None,
    loss_fn: Optional[LossFunction] = None,
    max_grad_norm: Optional[float] = 1.0,
    progress: bool = True,
    fisher_chunks: FisherChunks = 1,
) -> list[torch.Tensor]:
    """The k entries of highest Fisher information across `tensors`: sorted int64 flat positions per tensor, in order.

    `fisher_chunks` = 1 scores every entry in one pass over the batches (4 B per tuned entry). More chunks score the
    entries a contiguous chunk at a time, one pass over the same batches each, keeping between chunks only the k
    best so far (8 B per child entry: score and int32 position): the same positions bit for bit (each entry's score
    is computed by the same element-wise operations, the clipping norm over the whole tensor's gradient; ties go to
    the earlier tensor, then the lower position, either way), in `fisher_chunks` times the passes. The first pass's
    batches are kept (as the dataloader yields them) and replayed with the random state (host, and the model's
    accelerator) each one started from, so dropout draws the same masks; afterwards the random state is the one a
    single pass leaves. "auto": chunks of 2k entries, so that the scores and the kept candidates take no more than
    the 16 B per child entry that training holds for values, gradients and AdamW's two moments; but no smaller than
    the largest tensor, whose dense gradient the backward holds anyway.
    """
    _check_num_batches(num_batches)
    sizes = [(name, tensor.numel()) for name, tensor in tensors.items()]
    chunks = _chunk_pieces(sizes, _entries_per_chunk(fisher_chunks, [size for _, size in sizes], k))
    if len(chunks) == 1:
        pieces = chunks[0]
        batches = itertools.islice(dataloader, num_batches)
        total = _batch_total(dataloader, num_batches)
        scores = _fisher_pass(model, tensors, pieces, batches, total, loss_fn, max_grad_norm, progress)
        threshold = top_k_threshold(scores, k)
        positions = []
        for index in range(len(scores)):  # one tensor's positions at a time, its scores freed as they are made
            positions.append(threshold.positions(index, scores[index]))
            scores[index] = None  # type: ignore[call-overload]
        return positions
    device = next(iter(tensors.values())).device
    replay = _BatchReplay(itertools.islice(dataloader, num_batches), device)
    total = _batch_total(dataloader, num_batches)
    kept: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, flat positions, scores): the best so far
    try:
        for number, pieces in enumerate(chunks, 1):
            desc = f"Fisher information ({number}/{len(chunks)})"
            scores = _fisher_pass(model, tensors, pieces, replay, total, loss_fn, max_grad_norm, progress, desc)
            total = replay.num_batches
            kept = _keep_best(kept, pieces, scores, k)
    finally:
        replay.restore_final_state()
    chosen: dict[str, list[torch.Tensor]] = {name: [] for name, _ in sizes}
    for name, positions, _ in kept:
        chosen[name].append(positions.long())
    return [
        torch.cat(chosen[name]) if chosen[name] else torch.zeros(0, dtype=torch.int64, device=tensors[name].device)
        for name, _ in sizes
    ]


def _keep_best(
    kept: list[tuple[str, torch.Tensor, torch.Tensor]], pieces: Sequence[Piece], scores: list[torch.Tensor], k: int
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The k best of the kept candidates and of a new chunk's `scores`, in (tensor, position) order: the top k of
    all entries seen so far, since the top k of a union is the top k of the kept top k and the rest. Empties `kept`
    and `scores` as it goes, so that each is freed once read."""
    where: list[Any] = [(name, positions) for name, positions, _ in kept] + [(name, start) for name, start, _ in pieces]
    scores[:0] = [score for _, _, score in kept]
    kept.clear()
    threshold = top_k_threshold(scores, min(k, sum(score.numel() for score in scores)))
    best = []
    for index, (name, at) in enumerate(where):
        chosen = threshold.positions(index, scores[index])
        if isinstance(at, torch.Tensor):  # a kept candidate's positions
            positions = at[chosen]
        else:  # a new piece's start: int32 positions where they fit (the piece ends at start + its size)
            positions = (chosen + at).to(index_dtype(at + scores[index].numel()))
        best.append((name, positions, scores[index][chosen]))
        where[index] = scores[index] = None
    return best


def _entries_per_chunk(fisher_chunks: FisherChunks, sizes: Sequence[int], k: int) -> int:
    if fisher_chunks == "auto":  # the Fisher pass's backward holds a dense gradient of the largest tensor anyway
        return max(2 * k, max(sizes, default=0), 1)
    if isinstance(fisher_chunks, bool) or not isinstance(fisher_chunks, int) or fisher_chunks < 1:
        raise ValueError(
            f"detect_child_network: fisher_chunks={fisher_chunks!r} must be a positive int (1: one pass, the fastest) "
            "or 'auto' (chunks sized to fit in the memory training takes)."
        )
    return max(math.ceil(sum(sizes) / fisher_chunks), 1)


def _chunk_pieces(sizes: Sequence[tuple[str, int]], per_chunk: int) -> list[list[Piece]]:
    """The tensors' entries in order, cut into chunks of `per_chunk` entries (the last may be smaller); a tensor
    may span chunks, but has at most one piece in each."""
    chunks: list[list[Piece]] = [[]]
    room = per_chunk
    for name, size in sizes:
        start = 0
        while True:
            if room == 0:
                chunks.append([])
                room = per_chunk
            stop = min(size, start + room)
            chunks[-1].append((name, start, stop))
            room -= stop - start
            start = stop
            if start >= size:
                break
    return chunks


def _check_num_batches(num_batches: Optional[int]) -> None:
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"detect_child_network: num_batches={num_batches} must be at least 1 (or None for all).")


def _batch_total(dataloader: Iterable[Any], num_batches: Optional[int]) -> Optional[int]:
    total = _length_or_none(dataloader)
    if num_batches is not None:
        total = num_batches if total is None else min(total, num_batches)
    return total


def _fisher_pass(
    model: torch.nn.Module,
    tensors: Mapping[str, torch.nn.Parameter],
    pieces: Sequence[Piece],
    batches: Iterable[Any],
    total: Optional[int],
    loss_fn: Optional[LossFunction],
    max_grad_norm: Optional[float],
    progress: bool,
    desc: str = "Fisher information",
) -> list[torch.Tensor]:
    """One pass over `batches`: the averaged Fisher scores (flat fp32) of each piece, summed over processes."""
    loss_fn = loss_fn or _default_loss
    device = next(iter(tensors.values())).device
    fisher = [
        torch.zeros(stop - start, dtype=torch.float32, device=tensors[name].device) for name, start, stop in pieces
    ]

    def fold_into_fisher(start: int, stop: int, scores: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(tensor: torch.Tensor) -> None:
            # in place on the gradient, which autograd hands over and which is dropped right after: the same
            # element-wise operations (so the same bits) as grad * scale, squared, without their two temporaries
            grad = tensor.grad.float()
            piece = grad.reshape(-1)[start:stop]
            if max_grad_norm is not None:  # the norm of the whole tensor's gradient, whatever the piece
                norm = torch.linalg.vector_norm(grad)
                piece.mul_((max_grad_norm / (norm + 1e-6)).clamp(max=1.0))
            scores.add_(piece.square_())
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
        for (name, start, stop), scores in zip(pieces, fisher):
            tensors[name].requires_grad_(True)
            handles.append(tensors[name].register_post_accumulate_grad_hook(fold_into_fisher(start, stop, scores)))
        model.train()
        bar_on_terminal = progress and _is_terminal(sys.stderr)
        log = None if bar_on_terminal else _ProgressLog(total, desc)
        for batch in tqdm(batches, total=total, desc=desc, disable=not progress):
            loss = loss_fn(model, _move_to(batch, device))
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError("detect_child_network: the loss must be a scalar tensor.")
            loss.backward()
            batches_seen += 1
            if log is not None:
                log.batch_done(batches_seen)
        if log is not None:
            log.finished(batches_seen)
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
    for (name, _, _), scores in zip(pieces, fisher):
        scores.div_(batches_seen)
        if not all_finite(scores):
            raise FloatingPointError(
                f"detect_child_network: non-finite Fisher scores in {name} (the loss or its gradient overflowed); "
                "check the data and the loss, or run the pass in float32."
            )
    return fisher


class _BatchReplay:
    """The batches of the first pass, and the random state each one's loss began with, for the later passes: every
    chunk's pass sees the same batches in the same order and draws the same dropout masks."""

    def __init__(self, batches: Iterable[Any], device: torch.device) -> None:
        self.source = batches
        self.device = device
        self.batches: Optional[list[Any]] = None
        self.states: list[list[torch.Tensor]] = []
        self.final_state: Optional[list[torch.Tensor]] = None

    @property
    def num_batches(self) -> Optional[int]:
        return None if self.batches is None else len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        if self.batches is None:
            batches = []
            for batch in self.source:
                self.states.append(_rng_state(self.device))
                batches.append(batch)
                yield batch
            self.batches = batches
            self.final_state = _rng_state(self.device)
            return
        for batch, state in zip(self.batches, self.states):
            _set_rng_state(self.device, state)
            yield batch

    def restore_final_state(self) -> None:
        """The random state after the first pass: what one pass over the batches would have left."""
        if self.final_state is not None:
            _set_rng_state(self.device, self.final_state)


def _rng_state(device: torch.device) -> list[torch.Tensor]:
    """The host generator's state, and the accelerator's (of `device`) when the model is on one."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    elif device.type != "cpu" and device.type != "meta":
        states.append(torch.get_device_module(device.type).get_rng_state())
    return states


def _set_rng_state(device: torch.device, states: list[torch.Tensor]) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)
    elif len(states) > 1:
        torch.get_device_module(device.type).set_rng_state(states[1])


def _sum_over_processes(fisher: Sequence[torch.Tensor], batches_seen: int, device: torch.device) -> int:
    """In a multi-process run (accelerate, torchrun), sum the scores and batch counts of all processes.

    Each process sees its shard of the data; after the sum every process holds the Fisher of all the data, so all
    of them select the same child network as one process would.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return batches_seen
    if torch.distributed.get_world_size() == 1:
        return batches_seen
    for scores in fisher:
        torch.distributed.all_reduce(scores, op=torch.distributed.ReduceOp.SUM)
    count = torch.tensor([batches_seen], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.SUM)
    return int(count.item())


class _ProgressLog:
    """The Fisher pass's progress as INFO records of logger ``peft_childtuning.fisher``: after the first batch (the
    time per batch, an estimate of the time left), then at most every `PROGRESS_LOG_SECONDS`, and at the end. Only
    the first process of a multi-process run logs. Silent unless the application shows INFO records of this logger
    (e.g. ``logging.basicConfig(level=logging.INFO)``)."""

    def __init__(self, total: Optional[int], desc: str) -> None:
        self.total = total
        self.desc = desc
        self.enabled = logger.isEnabledFor(logging.INFO) and _is_first_process()
        self.started = time.perf_counter()
        self.last_report = -math.inf

    def batch_done(self, done: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (done > 1 and now - self.last_report < PROGRESS_LOG_SECONDS):
            return
        self.last_report = now
        per_batch = (now - self.started) / done
        if self.total:
            left = per_batch * max(self.total - done, 0)
            logger.info(
                "%s: batch %d/%d, %.2f s per batch, about %s left",
                self.desc, done, self.total, per_batch, _duration(left),
            )
        else:
            logger.info("%s: batch %d, %.2f s per batch", self.desc, done, per_batch)

    def finished(self, done: int) -> None:
        if self.enabled:
            logger.info("%s: %d batches in %s", self.desc, done, _duration(time.perf_counter() - self.started))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:  # a closed stream
        return False


def _is_first_process() -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return True
    return torch.distributed.get_rank() == 0


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
        """The chosen flat positions (sorted, int64, on the score's device) of tensor `index`, whose scores are
        `score`."""
        bits = _ordered_bits(score)
        chosen = flat_nonzero(bits > self.threshold_bits)
        if self.ties[index]:
            ties = flat_nonzero(bits == self.threshold_bits)[: self.ties[index]]
            chosen = torch.cat([chosen, ties]).sort().values
        return chosen


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
        index = int(torch.searchsorted(above, torch.tensor(wanted, device=above.device)))
        strictly_above = int(above[index - 1]) if index > 0 else 0
        return _DIGIT_VALUES - 1 - index, strictly_above

    device = scores[0].device  # the histograms stay with the scores: only counts and the threshold reach the host
    counts = torch.zeros(_DIGIT_VALUES, dtype=torch.int64, device=device)
    for score in scores:
        counts += torch.bincount(_ordered_bits(score) >> _DIGIT_BITS, minlength=_DIGIT_VALUES).to(device)
    high, above_high = boundary(counts, k)
    counts = torch.zeros(_DIGIT_VALUES, dtype=torch.int64, device=device)
    for score in scores:  # the low digits of the entries in the boundary bucket
        bits = _ordered_bits(score)
        lows = bits[(bits >> _DIGIT_BITS) == high] & (_DIGIT_VALUES - 1)
        counts += torch.bincount(lows, minlength=_DIGIT_VALUES).to(device)
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
