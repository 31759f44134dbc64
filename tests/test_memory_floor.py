"""Memory at the floor and device-clean training (issue #14).

A mode-"d" layer holds, per child entry, its fp32 value (4 bytes) and AdamW's two moments (8) and, for its position,
the encoded tensor a checkpoint needs plus whatever the layer keeps decoded (`sparse_format.held_positions`): at
most 4 bytes in all. Counted from the tensors themselves (each storage once), not from RSS, so deterministic.
The backward of a large weight works through blocks of it and forms no tensor the size of the weight (recorded op by
op). The CUDA tests are skipped without a GPU.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from peft_childtuning import ChildTuningConfig
from peft_childtuning.layer import (
    _BLOCK_ENTRIES,
    _MAX_BLOCKS,
    ChildTuningLayer,
    _ChildLinearFunction,
    block_plan,
    scatter_child,
)
from peft_childtuning.sparse_format import (
    choose_encoding,
    decode_positions,
    encode_positions,
    expand_positions,
    held_positions,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class TwoLinear(nn.Module):
    def __init__(self, hidden: int = 256, inner: int = 1024) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


# weights of 5.2M entries: more than `_BLOCK_ENTRIES`, so their backward works through blocks
WIDE = {"hidden": 2048, "inner": 2560}


def _model(reserve_p: float, device: str = "cpu", **sizes: int) -> nn.Module:
    torch.manual_seed(0)
    config = ChildTuningConfig(mode="d", reserve_p=reserve_p, selection="random", target_modules=["up", "down"])
    return get_peft_model(TwoLinear(**sizes).to(device), config)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, device: str = "cpu") -> None:
    hidden = model.get_base_model().up.in_features
    x = torch.randn(8, hidden, generator=torch.Generator().manual_seed(1)).to(device)
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _held_bytes_per_child_entry(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(all held bytes, position bytes) per child entry, each storage counted once."""
    seen: set[int] = set()

    def nbytes(tensors: list[torch.Tensor]) -> int:
        total = 0
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    layers = [module for module in model.modules() if isinstance(module, ChildTuningLayer)]
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    positions = nbytes([tensor for layer in layers for tensor in layer.held_position_tensors()])
    held = positions + nbytes(parameters) + nbytes([p.grad for p in parameters if p.grad is not None])
    held += nbytes([t for state in optimizer.state.values() for t in state.values() if t.dim() > 0])
    entries = sum(parameter.numel() for parameter in parameters)
    return held / entries, positions / entries


@pytest.mark.parametrize("reserve_p", [2e-5, 0.01, 0.05, 0.3, 0.8])
def test_at_most_16_bytes_held_per_child_entry(reserve_p: float) -> None:
    model = _model(reserve_p)
    if reserve_p == 2e-5:  # a few entries in 262,144: gaps over 16 bits, each tensor a gap16x stream
        assert set(model.peft_config["default"].child_encodings.values()) == {"gap16x"}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    for _ in range(2):
        _train_step(model, optimizer)
    per_entry, positions_per_entry = _held_bytes_per_child_entry(model, optimizer)
    assert positions_per_entry <= 4 and per_entry <= 16, (per_entry, positions_per_entry)


def test_a_loaded_adapter_holds_no_validation_cache(tmp_path) -> None:
    model = _model(0.3)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(TwoLinear(), tmp_path, is_trainable=True)
    optimizer = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad])
    _train_step(loaded, optimizer)
    assert all(not layer._validated_positions for layer in loaded.modules() if isinstance(layer, ChildTuningLayer))
    assert _held_bytes_per_child_entry(loaded, optimizer)[0] <= 16


@pytest.mark.parametrize(
    "positions, numel",
    [
        (torch.tensor([0, 1, 2, 5, 9, 10]), 12),  # dense: bitmap, held as gaps
        (torch.tensor([3, 70_000, 70_001, 70_002]), 400_000),  # a gap over 16 bits: gap16x, its own cache
        (torch.tensor([0, 200_000]), 400_000),  # a wide gap's triple costs more than int32: int32, its own cache
        (torch.tensor([7, 65_541, 131_075]), 300_000),  # the widest gaps that fit: gap16, its own cache
        (torch.arange(0, 200_000, 3), 200_000),  # bitmap with a gap of 3, held as gaps
        (torch.tensor([5, 100_000]), 100_001),  # bitmap forced below, held as a gap16x stream (a gap over 16 bits)
    ],
)
@pytest.mark.parametrize("encoding", [None, "bitmap"])
def test_held_positions_expand_to_the_positions(positions: torch.Tensor, numel: int, encoding: str | None) -> None:
    encoding = encoding or choose_encoding(positions, numel)
    encoded = encode_positions(positions, numel, encoding)
    decoded = decode_positions(encoded, numel, positions.numel(), encoding, "t", encoded.numel())
    held = held_positions(encoded, decoded, encoding)
    if encoding != "bitmap":
        assert held is encoded  # nothing held twice
    else:  # its gap16x stream: at most 4 bytes per child entry wherever the bitmap is the smallest encoding
        assert torch.equal(held, encode_positions(positions, numel, "gap16x"))
        if choose_encoding(positions, numel) == "bitmap":
            assert held.numel() * held.element_size() <= 4 * positions.numel()
    assert torch.equal(expand_positions(held, positions.numel()), positions)
    assert torch.equal(expand_positions(held, positions.numel(), torch.int32), positions.to(torch.int32))


def test_scatter_in_place_is_bit_identical_to_out_of_place() -> None:
    base = torch.randn(64, 33)
    positions = torch.tensor([0, 5, 6, 100, 2000, 64 * 33 - 1])
    values = torch.randn(6, dtype=torch.float64)
    expected = base.reshape(-1).index_copy(0, positions, values.to(base.dtype)).view_as(base)
    assert torch.equal(scatter_child(base, values, positions), expected)
    gaps = encode_positions(positions, base.numel(), "gap16")
    assert torch.equal(scatter_child(base, values, gaps), expected)


# ------------------------------------------------------------------------------------------------ backward by blocks
class _LargestTensor(TorchDispatchMode):
    """Records the most entries of any tensor an op creates while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        output = func(*args, **(kwargs or {}))
        for tensor in output if isinstance(output, (tuple, list)) else [output]:
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return output


def _largest_in_backward(loss: Callable[[], torch.Tensor]) -> int:
    output = loss()
    with _LargestTensor() as recorder:
        output.backward()
    return recorder.numel


@pytest.mark.parametrize("reserve_p", [0.01, 0.3])
def test_the_backward_of_a_large_weight_forms_no_tensor_of_its_size(reserve_p: float) -> None:
    """A dense composed weight or weight gradient in the backward (one layer's, the size of the weight) is caught."""
    model = _model(reserve_p, **WIDE)
    weight = model.get_base_model().up.weight
    assert weight.numel() > _BLOCK_ENTRIES
    x = torch.randn(8, WIDE["hidden"])
    layers = [module for module in model.modules() if isinstance(module, ChildTuningLayer)]
    largest = _largest_in_backward(lambda: model(x).square().sum())
    # a block, or what is as long as a layer's child entries (their positions, their gradient)
    children = max(layer.child_size("default", "weight") for layer in layers)
    assert largest <= max(_BLOCK_ENTRIES, weight.numel() // _MAX_BLOCKS, children) < weight.numel(), largest
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # the control: the same layers' backward with the weight as one block forms the dense weight gradient
    for layer in layers:
        decoded = layer._decoded("default", "weight")
        whole = block_plan(decoded.positions, layer.get_base_layer().weight.shape, block_entries=weight.numel())
        layer._decoded_positions[("default", "weight")] = decoded._replace(blocks=whole)
    assert _largest_in_backward(lambda: model(x).square().sum()) >= weight.numel()


@pytest.mark.parametrize("weight_is_in_by_out", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("block_entries", [1, 40, 97])
def test_the_backward_by_blocks_equals_the_backward_of_the_whole_weight(weight_is_in_by_out, block_entries) -> None:
    """Every gradient (input, child values, bias, a trained base weight) bit for bit, whatever the blocks. Integer
    values in float64 make every sum exact, so the equality checks the blocks and not a BLAS's summation order."""
    generator = torch.Generator().manual_seed(0)
    shape = (24, 19) if weight_is_in_by_out else (19, 24)

    def integers(*size: int) -> torch.Tensor:
        return torch.randint(-8, 9, size, generator=generator).double()

    positions = torch.randperm(24 * 19, generator=generator)[:150].sort().values.to(torch.int32)
    inputs = (integers(2, 5, 24), integers(*shape), integers(150), integers(19))
    upstream = integers(2, 5, 19)
    blocked = block_plan(positions, shape, block_entries)
    assert len(blocked.row_bounds) > 2 and len(blocked.col_bounds) > 2
    gradients = []
    for blocks in (blocked, block_plan(positions, shape, 24 * 19)):
        leaves = [tensor.clone().requires_grad_(True) for tensor in inputs]
        x, weight, values, bias = leaves
        output = _ChildLinearFunction.apply(x, weight, values, positions, bias, weight_is_in_by_out, blocks)
        gradients.append(torch.autograd.grad(output, leaves, upstream))
    for blocked, whole in zip(*gradients):
        assert torch.equal(blocked, whole)


# ------------------------------------------------------------------------------------------------ CUDA
@needs_cuda
@pytest.mark.parametrize("encoding", ["bitmap", "int32", "gap16", "gap16x"])
def test_encoding_on_the_device_matches_the_cpu(encoding: str) -> None:
    numel = 1_000_003
    count = 40 if encoding == "gap16x" else 50_000  # sparse enough for gaps over 16 bits
    positions = torch.randperm(numel, generator=torch.Generator().manual_seed(0))[:count].sort().values
    on_cpu = encode_positions(positions, numel, encoding)
    on_device = encode_positions(positions.cuda(), numel, encoding)
    assert on_device.is_cuda and torch.equal(on_device.cpu(), on_cpu)
    decoded = decode_positions(on_device, numel, positions.numel(), encoding, "t", on_cpu.numel())
    expected = decode_positions(on_cpu, numel, positions.numel(), encoding, "t", on_cpu.numel())
    assert decoded.is_cuda and torch.equal(decoded.cpu(), expected)
    assert choose_encoding(positions.cuda(), numel) == choose_encoding(positions, numel)
    held = held_positions(on_device, decoded, encoding)
    assert held.is_cuda and torch.equal(expand_positions(held, positions.numel()).cpu(), positions)


@needs_cuda
@pytest.mark.parametrize("sizes", [{}, WIDE], ids=["one-block", "blocks"])
@pytest.mark.parametrize("reserve_p", [2e-5, 0.05, 0.3])  # 2e-5: gap16x streams (gaps over 16 bits)
def test_a_training_step_on_cuda_never_syncs(reserve_p: float, sizes: dict[str, int]) -> None:
    model = _model(reserve_p, device="cuda", **sizes)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], capturable=True)
    _train_step(model, optimizer, device="cuda")  # decodes (and checks) the positions: syncs, once
    x = torch.randn(8, model.get_base_model().up.in_features, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
