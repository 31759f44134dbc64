"""The Child-Tuning layer: wraps a module and substitutes child values for some entries of its weight (and bias).

Per adapter and tuned tensor (``weight``, optionally ``bias``) the layer holds

- ``childtuning_values`` / ``childtuning_bias_values``: the trainable values of the child entries (fp32 masters).
  Mode "d": a 1-D tensor of the k_t child entries. Mode "f": a full-shape copy of the tensor (every entry may move).
- ``childtuning_positions`` / ``childtuning_bias_positions``: mode "d" only, the flat positions of the child entries
  in the base tensor, in the encoding of the saved format (`sparse_format`: a bitmap, int32 positions or 16-bit
  gaps, with a table of the gaps too wide for 16 bits, whichever is smallest), so a checkpoint loads into them
  as it is; decoded and checked once, and cached in the compact form `sparse_format.held_positions` chooses (int32
  positions and gaps are their own cache), which each forward and backward expands (on the weights' device, with no
  host sync).

The base tensors are never written while unmerged. The forward composes ``W`` with the child values; for Linear and
GPT-2's Conv1D a custom autograd function does it one layer at a time without keeping the composed copy alive from
forward to backward, and its backward never forms a dense copy of a large weight at all: it works through blocks of
the weight (`BlockPlan`). Merging writes the child values into ``W`` (on CPU into a fresh copy of it that takes its
place; the Parameter stays the same object) and keeps the overwritten originals, so unmerging restores them exactly
(no subtraction, no drift in any dtype).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import ChildTuningConfig
from .fisher import random_child_positions
from .sparse_format import (
    VARIABLE_LENGTH_ENCODINGS,
    AdapterFormatError,
    all_finite,
    choose_encoding,
    decode_positions,
    encode_positions,
    expand_positions,
    held_positions,
    index_dtype,
    placeholder,
)
from .gradient_mask import BernoulliGradientMask, MaskStepCounter
from .resizing import resize_in_place, retire

# tuned tensor name -> (values container, positions container)
TUNED_TENSOR_CONTAINERS = {
    "weight": ("childtuning_values", "childtuning_positions"),
    "bias": ("childtuning_bias_values", "childtuning_bias_positions"),
}
# relative scale of the noise that init_weights=False adds to the child values
_TEST_INIT_NOISE = 0.1
# the backward's blocks of a weight: at most this many entries each, or a _MAX_BLOCKS-th of the weight if that is
# more. Small blocks fit in memory the allocator already holds: on benchmarks/memory_floor.py, blocks of 4M entries
# (16 MB) left the peak where the dense weight had put it, blocks of 1M reach LoRA's; but each block is a dozen
# kernel calls, which cost time where threads wait for a busy CPU
_BLOCK_ENTRIES = 1 << 20
_MAX_BLOCKS = 16


@dataclass(frozen=True)
class AdapterSpec:
    """What a layer needs to know of an adapter's config."""

    mode: str
    reserve_p: float
    seed: int
    awaits_fisher_pass: bool
    inference_mode: bool
    encodings: dict[str, str] = field(default_factory=dict)  # tuned tensor name -> position encoding (mode "d")
    encoded_lengths: dict[str, int] = field(default_factory=dict)  # tuned tensor name -> gap16x stream length
    # the tensors the config targets: the tuned ones, and those whose child network came out empty (not tuned)
    targeted: tuple[str, ...] = ()


# index_select / index_copy rather than advanced indexing: several times faster on CPU for millions of entries.
def gather_child(tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The entries of `tensor` at the sorted flat `positions` (int32 or int64), as a 1-D tensor."""
    return tensor.reshape(-1).index_select(0, positions.to(tensor.device))


# `positions` below are sorted flat positions, or what a layer holds of them (`sparse_format.held_positions`),
# expanded for as many positions as there are values.
def scatter_child(base: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor equal to `base` with `values` (cast to its dtype) at the flat `positions`:
    differentiable in the values. Written into a clone in place: twice as fast on CPU as the out-of-place index_copy,
    same bits."""
    composed = base.clone(memory_format=torch.contiguous_format)
    index = expand_positions(positions.to(base.device), values.numel())
    composed.view(-1).index_copy_(0, index, values.to(base.dtype))
    return composed


def write_child(flat: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    """Write `values` into the flat tensor `flat` at `positions`, in place."""
    index = expand_positions(positions.to(flat.device), values.numel())
    flat.index_copy_(0, index, values.to(flat.device, flat.dtype))


class BlockPlan(NamedTuple):
    """The blocks a weight's backward works through (`_ChildLinearFunction`): the boundaries of its blocks of rows and
    of columns (as stored) and their child entries, counted once, when the positions are decoded, so that slicing and
    gathering them at each step needs no host sync.

    Rows are what the weight gradient is formed by (sorted positions: a block of rows holds a contiguous range of the
    child entries, from ``row_entries[i]`` to ``row_entries[i + 1]``), and what a Conv1D's input gradient is; a Linear's
    input gradient is formed by blocks of columns, whose ``col_counts`` child entries lie scattered over every row.
    """

    row_bounds: tuple[int, ...]
    row_entries: tuple[int, ...]
    col_bounds: tuple[int, ...]
    col_counts: tuple[int, ...]


def _block_bounds(length: int, line: int, block_entries: int) -> tuple[int, ...]:
    """Boundaries of blocks of whole lines (`line` entries each) along a dimension of `length` lines: fewer than 256
    blocks (at most `length`, or about `_MAX_BLOCKS` where `length` is 256 or more)."""
    per_block = max(block_entries, -(-length * line // _MAX_BLOCKS)) // max(line, 1)
    return (*range(0, length, max(per_block, 1)), length)


def block_plan(positions: torch.Tensor, shape: torch.Size, block_entries: int = _BLOCK_ENTRIES) -> BlockPlan:
    """The `BlockPlan` of a 2-D weight of `shape` (as stored) with the child entries at the sorted flat `positions`
    (any integer dtype, on any device: one host sync, for the counts)."""
    rows, cols = shape
    positions = positions.long()
    row_bounds = _block_bounds(rows, cols, block_entries)
    col_bounds = _block_bounds(cols, rows, block_entries)
    row_entries = torch.searchsorted(positions, torch.tensor(row_bounds, device=positions.device) * cols)
    col_counts = torch.bincount(positions % cols // col_bounds[1], minlength=len(col_bounds) - 1)
    counts = torch.cat([row_entries, col_counts]).tolist()
    return BlockPlan(row_bounds, tuple(counts[: len(row_bounds)]), col_bounds, tuple(counts[len(row_bounds) :]))


def _row_blocks(
    index: torch.Tensor, cols: int, blocks: BlockPlan
) -> Iterator[tuple[int, int, int, int, torch.Tensor]]:
    """(first row, end row, first child entry, end child entry, their flat positions in the block) for each block of
    rows of a weight of `cols` columns, given its sorted int64 child positions `index`: a contiguous range of them."""
    bounds = zip(blocks.row_bounds, blocks.row_bounds[1:], blocks.row_entries, blocks.row_entries[1:])
    for row_start, row_stop, start, stop in bounds:
        local = index[start:stop] - row_start * cols if row_start else index[start:stop]
        yield row_start, row_stop, start, stop, local


def _column_blocks(
    values: torch.Tensor, index: torch.Tensor, cols: int, blocks: BlockPlan
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(first column, end column, child values, their flat positions in the block) for each block of columns of a
    weight of `cols` columns, given its sorted int64 child positions `index`: the entries of a block, found with the
    static size the plan counted (no host sync), in row-major order."""
    if len(blocks.col_counts) == 1:
        yield 0, cols, values, index
        return
    # one byte per child entry: a weight has fewer than 256 blocks of columns (`_block_bounds`)
    block_of = (index % cols).div_(blocks.col_bounds[1], rounding_mode="floor").to(torch.uint8)
    for number, (start, stop, count) in enumerate(zip(blocks.col_bounds, blocks.col_bounds[1:], blocks.col_counts)):
        entries = torch.nonzero_static(block_of == number, size=count).squeeze(1)
        positions = index.index_select(0, entries)
        # row * width + column - start: the position less (cols - width) per row before it, less start
        local = positions - (positions // cols) * (cols - (stop - start)) - start
        yield start, stop, values.index_select(0, entries), local


class _ChildLinearFunction(torch.autograd.Function):
    """y = x @ W_child^T + b, where W_child is W with the child values scattered in.

    W_child is built in the forward and never saved: only x, W, the values and positions are, as a plain linear layer
    would save x and W. The backward works through the blocks of `BlockPlan` (one, for a weight of up to
    `_BLOCK_ENTRIES` entries): the input gradient from W_child a block at a time, the child values' gradient from the
    weight gradient a block of rows at a time, gathered at the child positions there. So no dense copy of the weight
    is formed (its gradient only if the base weight itself is trained); a step's peak is that of the activations.
    Each output entry is still one full-length product, as in a single matrix product (whether a BLAS sums it in the
    same order for the narrower matrix of a block is the BLAS's choice).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        bias: Optional[torch.Tensor],
        weight_is_in_by_out: bool,
        blocks: BlockPlan,
    ) -> torch.Tensor:
        composed = scatter_child(weight, values, positions)
        output = F.linear(x, composed.t() if weight_is_in_by_out else composed, bias)
        ctx.save_for_backward(x, weight, values, positions)
        ctx.weight_is_in_by_out = weight_is_in_by_out
        ctx.blocks = blocks
        ctx.bias_dtype = None if bias is None else bias.dtype
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, weight, values, positions = ctx.saved_tensors
        blocks: BlockPlan = ctx.blocks
        grad_x = grad_weight = grad_values = grad_bias = None
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
        index = expand_positions(positions, values.numel())  # once for every block below
        cols = weight.shape[1]
        if ctx.needs_input_grad[0]:
            pieces = []  # grad_x's columns, a block at a time
            if ctx.weight_is_in_by_out:  # grad_x = g @ W_child^T: W's rows are grad_x's columns
                for row_start, row_stop, start, stop, local in _row_blocks(index, cols, blocks):
                    block = scatter_child(weight[row_start:row_stop], values[start:stop], local)
                    pieces.append(grad_rows @ block.to(grad_rows.dtype).t())
            else:  # grad_x = g @ W_child: W's columns are grad_x's columns
                for col_start, col_stop, block_values, local in _column_blocks(values, index, cols, blocks):
                    block = scatter_child(weight[:, col_start:col_stop], block_values, local)
                    pieces.append(grad_rows @ block.to(grad_rows.dtype))
            grad_x = _joined(pieces, 1).view(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            x_rows = x.reshape(-1, x.shape[-1]).to(grad_rows.dtype)
            # the weight gradient, g^T x (Linear) or x^T g (Conv1D): W's rows are the left factor's columns
            left, right = (x_rows, grad_rows) if ctx.weight_is_in_by_out else (grad_rows, x_rows)
            values_pieces, weight_pieces = [], []
            for row_start, row_stop, _, _, local in _row_blocks(index, cols, blocks):
                dense = (left[:, row_start:row_stop].t() @ right).view(-1)
                if ctx.needs_input_grad[2]:
                    values_pieces.append(dense.index_select(0, local))
                if ctx.needs_input_grad[1]:  # the base weight is trained too: its gradient is dense, zero at the child
                    weight_pieces.append(dense.index_fill_(0, local, 0).view(row_stop - row_start, cols))
            if ctx.needs_input_grad[2]:
                grad_values = _joined(values_pieces, 0).to(values.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = _joined(weight_pieces, 0).to(weight.dtype)
        if ctx.needs_input_grad[4]:
            grad_bias = grad_rows.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_values, None, grad_bias, None, None


def _joined(pieces: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The blocks' results as one tensor (the one block's itself: no copy where the weight is one block)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


class DecodedPositions(NamedTuple):
    """Decoded child positions as the layer holds them (`sparse_format.held_positions`: often the encoded tensor
    itself), the encoded positions tensor they were decoded from (held, so that its identity cannot pass to a new
    tensor), and for the weight of a Linear or Conv1D the blocks its backward works through."""

    encoded: torch.Tensor
    positions: torch.Tensor
    blocks: Optional[BlockPlan]


class ChildTuningLayer(BaseTunerLayer):
    """Child-Tuning adapter state and logic, for any module with a `weight` (Linear, Conv1D, Embedding, norms...)."""

    adapter_layer_names = ("childtuning_values", "childtuning_bias_values")
    other_param_names = ("childtuning_positions", "childtuning_bias_positions", "childtuning_spec")

    def __init__(self, base_layer: nn.Module, module_key: str, step_counter: MaskStepCounter, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.childtuning_values = nn.ParameterDict({})
        self.childtuning_bias_values = nn.ParameterDict({})
        self.childtuning_positions = BufferDict(persistent=True)
        self.childtuning_bias_positions = BufferDict(persistent=True)
        self.childtuning_spec: dict[str, AdapterSpec] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        # peft's disable_input_dtype_casting switches it off; nothing here reads it, as the forward never casts its
        # input: the child values are cast to the weight's dtype, and the base computation gets the input as given
        self.cast_input_dtype_enabled: bool = True
        # decoded positions per (adapter, tensor name), with the encoded buffer they came from
        self._decoded_positions: dict[tuple[str, str], DecodedPositions] = {}
        # positions decoded while a checkpoint was validated, with its encoded tensor: reused once it is loaded
        self._validated_positions: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        # the base tensors' copies merging made (data pointer per tensor name), written in place by later merges
        self._copied_storage: dict[str, int] = {}
        # the base values that merging overwrote, per (adapter, tensor name): unmerge copies them back
        self._merge_originals: dict[tuple[str, str], tuple[Optional[torch.Tensor], torch.Tensor]] = {}
        self.module_key = module_key
        self.step_counter = step_counter
        base = self.get_base_layer()
        if isinstance(base, Conv1D):
            self.in_features, self.out_features = base.weight.shape
        elif isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features

    # ----------------------------------------------------------------------------------------------- creation
    def tuned_tensor_names(self, adapter_name: str) -> list[str]:
        return [
            name
            for name, (values_attr, _) in TUNED_TENSOR_CONTAINERS.items()
            if adapter_name in getattr(self, values_attr)
        ]

    def targeted_tensor_names(self, adapter_name: str) -> list[str]:
        """The tensors the adapter's config targets here, tuned or not (a mode-"d" child network may leave a tensor
        empty; such a tensor has no values Parameter and no positions)."""
        return list(self.childtuning_spec[adapter_name].targeted)

    def child_values(self, adapter_name: str, tensor_name: str) -> nn.Parameter:
        """The adapter's trainable values for one tuned tensor (the child entries, or the whole tensor in mode f)."""
        return getattr(self, TUNED_TENSOR_CONTAINERS[tensor_name][0])[adapter_name]

    def child_size(self, adapter_name: str, tensor_name: str) -> int:
        return self.child_values(adapter_name, tensor_name).numel()

    def tensor_key(self, tensor_name: str) -> str:
        """The name of a tuned tensor in the base model, e.g. 'encoder.layer.0.attention.self.query.weight'."""
        return f"{self.module_key}.{tensor_name}"

    def update_layer(self, adapter_name: str, config: ChildTuningConfig, values_on_meta: bool = False) -> None:
        """Add the adapter's values (and positions) for this layer's tuned tensors.

        `values_on_meta`: a loader will assign the file's values (peft's low_cpu_mem_usage), so their placeholders
        are created on the meta device instead of being allocated, filled and then thrown away.
        """
        base = self.get_base_layer()
        names = ["weight"] + (["bias"] if config.tune_bias and getattr(base, "bias", None) is not None else [])
        encodings, encoded_lengths = {}, {}
        for tensor_name in names:
            tensor = getattr(base, tensor_name)
            values_attr, positions_attr = TUNED_TENSOR_CONTAINERS[tensor_name]
            if config.mode == "f":
                values = torch.empty_like(tensor, device="meta") if values_on_meta else tensor.detach().clone()
            else:
                key = self.tensor_key(tensor_name)
                size = (config.child_sizes or {}).get(key, 0)
                if config.child_sizes is not None and size == 0:
                    # an empty child network (absent from child_sizes, or 0 as earlier versions saved it): not tuned
                    self.untune(adapter_name, tensor_name)
                    continue
                if config.selection == "random":  # drawn from the seed: the same child network every time
                    # encoded on the weight's device (`sparse_format` runs there), nothing copied back to the host
                    positions = random_child_positions(tensor.numel(), size, config.seed, key).to(tensor.device)
                    encodings[tensor_name] = choose_encoding(positions, tensor.numel())
                    encoded = encode_positions(positions, tensor.numel(), encodings[tensor_name])
                    values = gather_child(tensor.detach(), positions)
                else:  # placeholders, filled by detect_child_network or by the adapter being loaded
                    encodings[tensor_name] = (config.child_encodings or {}).get(key, "int32")
                    recorded = (config.child_encoded_lengths or {}).get(key)
                    encoded = placeholder(tensor.numel(), size, encodings[tensor_name], recorded=recorded)
                    # NaN until loaded: a loader that skips a tensor is caught at first use, never a wrong model
                    # (an adapter awaiting its Fisher pass keeps real, empty ones: it may adopt a checkpoint's child
                    # network, which resizes them in place)
                    on_meta = values_on_meta and config.child_sizes is not None
                    values = torch.full(
                        (size,), float("nan"), dtype=tensor.dtype, device="meta" if on_meta else tensor.device
                    )
                getattr(self, positions_attr)[adapter_name] = encoded.to(tensor.device)
                if encodings[tensor_name] in VARIABLE_LENGTH_ENCODINGS:
                    encoded_lengths[tensor_name] = encoded.numel()
            if not config.init_weights:
                values = values.float() + _TEST_INIT_NOISE * torch.randn(values.shape, device=values.device)
            getattr(self, values_attr)[adapter_name] = nn.Parameter(values, requires_grad=True)
        self.childtuning_spec[adapter_name] = AdapterSpec(
            config.mode,
            config.reserve_p,
            config.seed,
            config.needs_fisher_pass,
            config.inference_mode,
            encodings,
            encoded_lengths,
            targeted=tuple(names),
        )
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def set_child_network(
        self, adapter_name: str, tensor_name: str, positions: torch.Tensor, encoding: Optional[str] = None
    ) -> str:
        """Make `positions` (sorted flat positions) the child network of one tensor; values restart from the base.

        The values Parameter is resized in place (`resizing.resize_in_place`), so an optimizer created earlier still
        holds it and has its state rebuilt for the new size. Empty `positions` leave an empty child, which
        `model.record_child_network` then stops tuning. Returns the encoding of the positions (the smallest one
        unless `encoding` is given).
        """
        if self.merged:
            raise RuntimeError("Unmerge the adapter before choosing its child network.")
        base_tensor = getattr(self.get_base_layer(), tensor_name)
        values_attr, positions_attr = TUNED_TENSOR_CONTAINERS[tensor_name]
        positions = positions.to(base_tensor.device)  # chosen and encoded where the weight is
        encoding = encoding or choose_encoding(positions, base_tensor.numel())
        encoded = encode_positions(positions, base_tensor.numel(), encoding)
        getattr(self, positions_attr)[adapter_name] = encoded
        parameter = getattr(self, values_attr)[adapter_name]
        resize_in_place(parameter, gather_child(base_tensor.detach(), positions).to(parameter.dtype))
        self._record_encoding(adapter_name, tensor_name, encoded, encoding)
        return encoding

    def _record_encoding(
        self, adapter_name: str, tensor_name: str, encoded: Optional[torch.Tensor], encoding: Optional[str]
    ) -> None:
        """Put one tensor's chosen child network in the adapter's spec: `encoded` positions in `encoding` (and a
        gap16x stream's length), or None where it is empty (not tuned). Nothing is left to wait for."""
        spec = self.childtuning_spec[adapter_name]
        encodings = {name: known for name, known in spec.encodings.items() if name != tensor_name}
        lengths = {name: length for name, length in spec.encoded_lengths.items() if name != tensor_name}
        if encoding is not None:
            encodings[tensor_name] = encoding
            if encoding in VARIABLE_LENGTH_ENCODINGS:
                lengths[tensor_name] = encoded.numel()
        self.childtuning_spec[adapter_name] = replace(
            spec, awaits_fisher_pass=False, encodings=encodings, encoded_lengths=lengths
        )

    # ----------------------------------------------------------------------------------------------- forward
    def _check_ready_to_train(self, adapter_names: list[str]) -> None:
        if not (torch.is_grad_enabled() and self.training):
            return
        for adapter_name in adapter_names:
            if self.childtuning_spec[adapter_name].awaits_fisher_pass:
                raise RuntimeError(
                    f"Child-Tuning-D adapter '{adapter_name}' has no child network yet: call "
                    "model.detect_child_network(train_dataloader) before training (or use "
                    "ChildTuningConfig(selection='random') for a random child network, or add ChildTuningCallback "
                    "to the Trainer)."
                )

    def _check_not_training_merged(self) -> None:
        """Merged weights hold copies of the values: a training step would change values the forward never reads."""
        if torch.is_grad_enabled() and self.training:
            trainable = [
                name for name in self.merged_adapters if any(p.requires_grad for p in self._adapter_parameters(name))
            ]
            if trainable:
                raise RuntimeError(
                    f"Child-Tuning adapter(s) {trainable} are merged into {self.module_key} and trainable: a training "
                    "step would change their values but not what the model computes. Call model.unmerge_adapter() "
                    "before training (or model.eval() / torch.no_grad() for inference)."
                )

    def _trainable_values(self, adapter_name: str, tensor_name: str) -> torch.Tensor:
        """The adapter's values for one tensor; in mode "f" routed through the per-step Bernoulli gradient mask."""
        values = self.child_values(adapter_name, tensor_name)
        spec = self.childtuning_spec[adapter_name]
        if spec.mode == "f" and values.requires_grad and torch.is_grad_enabled() and spec.reserve_p < 1.0:
            return BernoulliGradientMask.apply(
                values, self.step_counter.step_tensor, spec.reserve_p, spec.seed, self.tensor_key(tensor_name)
            )
        return values

    def _positions(self, adapter_name: str, tensor_name: str) -> Optional[torch.Tensor]:
        """The adapter's child positions in one tensor (sorted, see `decode_positions`), or None where it tunes every
        entry (mode f)."""
        held = self._held_positions(adapter_name, tensor_name)
        if held is None:
            return None
        numel = getattr(self.get_base_layer(), tensor_name).numel()
        return expand_positions(held, self.child_size(adapter_name, tensor_name), index_dtype(numel))

    def _held_positions(self, adapter_name: str, tensor_name: str) -> Optional[torch.Tensor]:
        """`_positions` as the layer holds them (`sparse_format.held_positions`), for `expand_positions` at each use."""
        decoded = self._decoded(adapter_name, tensor_name)
        return None if decoded is None else decoded.positions

    def _decoded(self, adapter_name: str, tensor_name: str) -> Optional[DecodedPositions]:
        """The adapter's decoded positions in one tensor, or None where it tunes every entry (mode f).

        Decoded once per encoded positions tensor (`_decode_positions`); a lookup and an identity check afterwards,
        which torch.compile traces (and guards on) without breaking the graph. A tensor replaced (a new child
        network, a move to another device, a load with assign=True) is decoded again; one written in place by
        ``load_state_dict`` is forgotten before the load (`_forget_positions_being_loaded`).
        """
        encoded_positions = getattr(self, TUNED_TENSOR_CONTAINERS[tensor_name][1])
        if adapter_name not in encoded_positions:
            return None
        cached = self._decoded_positions.get((adapter_name, tensor_name))
        if cached is None or cached.encoded is not encoded_positions[adapter_name]:
            cached = self._decode_positions(adapter_name, tensor_name)
        return cached

    def _merge_positions(self, adapter_name: str, tensor_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(what `unmerge` will expand, the sorted int64 positions) for merging one adapter's tensor.

        `unmerge` always expands the encoded tensor itself (one representation, whichever merge made it). A merge at
        load takes the positions checked with the checkpoint, so loading for inference never builds the held form
        that training forwards need; any other merge (switching adapters, say) expands the cached held form."""
        encoded = getattr(self, TUNED_TENSOR_CONTAINERS[tensor_name][1])[adapter_name]
        if (adapter_name, tensor_name) in self._validated_positions:  # decoded with the checkpoint it came from
            return encoded, self._checked_positions(adapter_name, tensor_name).to(encoded.device)
        held = self._held_positions(adapter_name, tensor_name)  # decoded once, for every later merge
        return encoded, expand_positions(held, self.child_size(adapter_name, tensor_name))

    @torch.compiler.disable  # numpy, data-dependent checks: run eagerly, once, rather than traced
    def _decode_positions(self, adapter_name: str, tensor_name: str) -> DecodedPositions:
        """Decode the adapter's positions in one tensor and cache what the layer holds of them."""
        encoded = getattr(self, TUNED_TENSOR_CONTAINERS[tensor_name][1])[adapter_name]
        positions = self._checked_positions(adapter_name, tensor_name).to(encoded.device)
        encoding = self.childtuning_spec[adapter_name].encodings[tensor_name]
        base = self.get_base_layer()
        blocks = None
        if tensor_name == "weight" and isinstance(base, (nn.Linear, Conv1D)):
            blocks = block_plan(positions, base.weight.shape)
        decoded = DecodedPositions(encoded, held_positions(encoded, positions, encoding), blocks)
        self._decoded_positions[(adapter_name, tensor_name)] = decoded
        return decoded

    def _checked_positions(self, adapter_name: str, tensor_name: str) -> torch.Tensor:
        """The adapter's sorted int64 positions in one tensor, decoded and checked with its values first (a loader
        that skipped them left NaN); positions decoded while a checkpoint was validated are taken as they are."""
        encoded = getattr(self, TUNED_TENSOR_CONTAINERS[tensor_name][1])[adapter_name]
        validated = self._validated_positions.pop((adapter_name, tensor_name), None)
        if validated is not None and (validated[0] is encoded or torch.equal(validated[0], encoded)):
            return validated[1]  # checked (values and positions) before it was loaded
        base_tensor = getattr(self.get_base_layer(), tensor_name)
        values = self.child_values(adapter_name, tensor_name)
        if not values.is_meta and not all_finite(values):
            raise AdapterFormatError(
                f"{self.tensor_key(tensor_name)}: the child values of adapter '{adapter_name}' are NaN or inf "
                "(not loaded, or a corrupted adapter file)."
            )
        try:
            spec = self.childtuning_spec[adapter_name]
            return decode_positions(
                encoded,
                base_tensor.numel(),
                values.numel(),
                spec.encodings[tensor_name],
                self.tensor_key(tensor_name),
                spec.encoded_lengths.get(tensor_name),
            )
        except AdapterFormatError as error:
            raise AdapterFormatError(
                f"{error} Adapter '{adapter_name}' expects its child network from a saved adapter (its config "
                "carries child_sizes) that was not loaded, or was corrupted: load it with "
                "PeftModel.from_pretrained or load_adapter, or create the adapter from a config without "
                "child_sizes."
            ) from error

    def held_position_tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer holds for child positions (encoded buffers, decoded caches), for memory accounting;
        a tensor may appear twice when one is the other."""
        held = [*self.childtuning_positions.values(), *self.childtuning_bias_positions.values()]
        held += [tensor for decoded in self._decoded_positions.values() for tensor in decoded[:2]]
        return held + [tensor for validated in self._validated_positions.values() for tensor in validated]

    def compose(self, tensor_name: str, adapter_names: list[str]) -> torch.Tensor:
        """The tensor as the active adapters see it, differentiable in their values.

        One adapter: its child values replace the base entries. Several: their changes against the base add up.
        """
        base_tensor = getattr(self.get_base_layer(), tensor_name)
        adapters = [name for name in adapter_names if tensor_name in self.tuned_tensor_names(name)]
        if not adapters:
            return base_tensor
        if len(adapters) == 1:
            values = self._trainable_values(adapters[0], tensor_name)
            positions = self._held_positions(adapters[0], tensor_name)
            if positions is None:
                return values.to(base_tensor.dtype)
            return scatter_child(base_tensor, values, positions)
        composed = base_tensor.detach().float().reshape(-1)
        for adapter_name in adapters:
            values = self._trainable_values(adapter_name, tensor_name).float().reshape(-1)
            positions = self._positions(adapter_name, tensor_name)
            if positions is None:
                composed = composed + (values - base_tensor.detach().float().reshape(-1))
            else:
                change = values - gather_child(base_tensor.detach(), positions).float()
                composed = composed.index_add(0, positions, change)
        return composed.to(base_tensor.dtype).view_as(base_tensor)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Switch adapters; if merged, by writing back the old child entries and writing in the new ones."""
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        if was_merged:
            self.merge()

    def untune(self, adapter_name: str, tensor_name: str) -> None:
        """Stop tuning one tensor (its child network is empty): drop its values, positions and cached positions.

        No 0-element Parameter is left behind: optimizers such as torch's Adafactor divide by a tensor's size, and
        0-size tensors do not survive every checkpoint format.
        """
        values_attr, positions_attr = TUNED_TENSOR_CONTAINERS[tensor_name]
        if adapter_name in getattr(self, values_attr):
            retire(getattr(self, values_attr)[adapter_name])  # optimizers created earlier drop it too
        for container in (getattr(self, values_attr), getattr(self, positions_attr)):
            if adapter_name in container:
                del container[adapter_name]
        for cache in (self._decoded_positions, self._validated_positions):
            cache.pop((adapter_name, tensor_name), None)
        if adapter_name in self.childtuning_spec:  # its child network is known (empty)
            self._record_encoding(adapter_name, tensor_name, None, None)

    def _get_available_adapters(self) -> set[str]:
        """Every adapter of the layer, also one whose child network here is empty (no values, yet merged with the
        others): get_layer_status would otherwise report it merged but not available."""
        return set(self.childtuning_spec)

    def delete_adapter(self, adapter_name: str) -> None:
        """peft's, also for a merged adapter: unmerged first (its originals written back), the others merged again.

        transformers' delete_adapter (peft.functional's) reaches the layers without peft's refusal of merged adapters,
        and its load_adapter leaves Child-Tuning adapters merged: deleting one merged would leave its values in the
        base weights for good.
        """
        remerge = [name for name in self.merged_adapters if name != adapter_name]
        merged = adapter_name in self.merged_adapters
        if merged:
            self.unmerge()
        super().delete_adapter(adapter_name)
        for cache in (self._decoded_positions, self._validated_positions):
            for key in [key for key in cache if key[0] == adapter_name]:
                del cache[key]
        if merged and remerge:
            self.merge(adapter_names=remerge)

    # ----------------------------------------------------------------------------------------------- merging
    def _merged_values(
        self, adapter_name: str, tensor_name: str
    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
        """(what `unmerge` expands, int64 positions, the values to write there) for merging one adapter's tensor;
        the positions are None where it writes every entry (mode f)."""
        base_tensor = getattr(self.get_base_layer(), tensor_name)
        values = self.child_values(adapter_name, tensor_name).detach()
        held = positions = None
        if adapter_name in getattr(self, TUNED_TENSOR_CONTAINERS[tensor_name][1]):
            held, positions = self._merge_positions(adapter_name, tensor_name)
        new_values = values.reshape(-1).to(base_tensor.dtype)
        if any((name, tensor_name) in self._merge_originals for name in self.merged_adapters):
            full_index = positions if positions is not None else torch.arange(base_tensor.numel(), device=values.device)
            current = gather_child(base_tensor.detach(), full_index).float()
            true_base = gather_child(self.unmerged_base_tensor(tensor_name), full_index)
            change = values.reshape(-1).float() - true_base.float()
            new_values = (current + change).to(base_tensor.dtype)
        return held, positions, new_values

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write the child values into the base tensors, keeping the overwritten originals for `unmerge`."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter_name in adapter_names:
            if adapter_name not in self.childtuning_spec:
                continue
            broken = ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
            if safe_merge and not all(all_finite(values) for values in self._adapter_parameters(adapter_name)):
                raise broken
            updates = {name: self._merged_values(adapter_name, name) for name in self.tuned_tensor_names(adapter_name)}
            if safe_merge and not all(all_finite(values) for *_, values in updates.values()):
                raise broken  # finite values can still overflow the base dtype
            # listed before the writes, so that unmerge undoes a merge that fails halfway exactly too
            self.merged_adapters.append(adapter_name)
            for tensor_name, (held, positions, new_values) in updates.items():
                tensor = getattr(self.get_base_layer(), tensor_name)
                unmerged = tensor.data.view(-1)
                copied = tensor.device.type == "cpu" and self._copied_storage.get(tensor_name) != tensor.data_ptr()
                if copied:
                    # written in a copy of its own, as peft's safe_merge does. A freshly loaded base is
                    # memory-mapped: writing into it costs a copy-on-write fault per 4 KiB page, slowed further by
                    # threads faulting at once (loading an adapter onto BERT-base: 0.41 s with the copy, 1.1 s in
                    # place, measured). The file's pages stay in the page cache either way. Once copied, it is
                    # written in place: switching adapters costs the child entries, not the tensor.
                    tensor.data = tensor.data.clone()
                    self._copied_storage[tensor_name] = tensor.data_ptr()
                flat = tensor.data.view(-1)
                if positions is None:  # every entry is overwritten: the originals are the whole unmerged tensor
                    originals = unmerged if copied else unmerged.clone()
                    flat.copy_(new_values)
                else:  # int64 positions for both; `held` (16-bit gaps, a bitmap...) is kept for unmerge
                    positions = positions.to(flat.device)
                    originals = gather_child(flat, positions)
                    write_child(flat, positions, new_values)
                self._merge_originals[(adapter_name, tensor_name)] = (held, originals)

    def unmerge(self) -> None:
        """Copy back the base values that merging overwrote, latest merge first: exact in every dtype."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            for tensor_name in self.tuned_tensor_names(adapter_name):
                saved = self._merge_originals.pop((adapter_name, tensor_name), None)
                if saved is None:  # a merge that failed before it wrote this tensor
                    continue
                index, originals = saved
                flat = getattr(self.get_base_layer(), tensor_name).data.view(-1)
                if index is None:
                    flat.copy_(originals.to(flat.device))
                else:
                    write_child(flat, index, originals)

    def _adapter_parameters(self, adapter_name: str) -> list[torch.Tensor]:
        return [self.child_values(adapter_name, name) for name in self.tuned_tensor_names(adapter_name)]

    def unmerged_base_tensor(self, tensor_name: str) -> torch.Tensor:
        """A copy of the base tensor with every merged adapter's overwritten entries put back."""
        flat = getattr(self.get_base_layer(), tensor_name).detach().reshape(-1).clone()
        for adapter_name in reversed(self.merged_adapters):
            saved = self._merge_originals.get((adapter_name, tensor_name))
            if saved is not None:
                index, originals = saved
                if index is None:
                    flat.copy_(originals.reshape(-1))
                else:
                    write_child(flat, index, originals)
        return flat.view_as(getattr(self.get_base_layer(), tensor_name))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense change this adapter makes to the base weight (zero outside the child network)."""
        weight = self.get_base_layer().weight
        _, index, new_values = self._merged_values(adapter_name, "weight")
        base_flat = weight.detach().reshape(-1)
        delta = torch.zeros_like(base_flat)
        if index is None:
            delta = new_values - base_flat
        else:
            write_child(delta, index, new_values - gather_child(base_flat, index))
        return delta.view_as(weight)


def _forget_positions_being_loaded(
    layer: ChildTuningLayer, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """A load_state_dict pre-hook: positions that the load writes in place are decoded afresh at their next use."""
    for adapter_name, tensor_name in list(layer._decoded_positions):
        if f"{prefix}{TUNED_TENSOR_CONTAINERS[tensor_name][1]}.{adapter_name}" in state_dict:
            del layer._decoded_positions[(adapter_name, tensor_name)]


class ChildTuningModule(nn.Module, ChildTuningLayer):
    """A module wrapped by Child-Tuning (any module with a `weight`; Linear and Conv1D take the fast path)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: ChildTuningConfig,
        module_key: str,
        step_counter: MaskStepCounter,
        values_on_meta: bool = False,
    ) -> None:
        super().__init__()
        ChildTuningLayer.__init__(self, base_layer, module_key=module_key, step_counter=step_counter)
        self.register_load_state_dict_pre_hook(_forget_positions_being_loaded)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, values_on_meta=values_on_meta)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.childtuning_spec]
        if self.merged:
            self._check_not_training_merged()
            return self.base_layer(x, *args, **kwargs)
        if not active:
            return self.base_layer(x, *args, **kwargs)
        self._check_ready_to_train(active)
        base = self.get_base_layer()
        tuned = {name for adapter_name in active for name in self.tuned_tensor_names(adapter_name)}
        if isinstance(base, (nn.Linear, Conv1D)) and not args and not kwargs:
            weight_is_in_by_out = isinstance(base, Conv1D)
            bias = self.compose("bias", active) if "bias" in tuned else base.bias
            decoded = self._decoded(active[0], "weight") if len(active) == 1 else None
            if decoded is not None:
                values = self._trainable_values(active[0], "weight")
                return _ChildLinearFunction.apply(
                    x, base.weight, values, decoded.positions, bias, weight_is_in_by_out, decoded.blocks
                )
            weight = self.compose("weight", active)
            return F.linear(x, weight.t() if weight_is_in_by_out else weight, bias)
        overrides = {name: self.compose(name, active) for name in tuned}
        return torch.func.functional_call(base, overrides, (x, *args), kwargs, strict=False)

    def __repr__(self) -> str:
        return "childtuning." + super().__repr__()
