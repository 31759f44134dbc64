"""Issue #14: the Fisher pass in chunks (the same child network in less memory) and selection on the scores' device."""

from __future__ import annotations

import pytest
import torch

import peft_childtuning.fisher as fisher
import peft_childtuning.sparse_format as sparse_format
from peft_childtuning.fisher import _chunk_pieces, _entries_per_chunk, select_top_k
from peft_childtuning.model import _layers_disabled, tuned_tensors

from conftest import ARCHS, child_layers, peft_model, positions_of

RESERVE_P = 0.05


def reference_child_network(model, batches, k: int, max_grad_norm: float | None) -> dict[str, torch.Tensor]:
    """The single pass as it was before chunks: every tensor's scores at once, the fold out of place
    (grad * scale, squared, added), then the top k by (score, then earlier tensor, then lower position)."""
    tensors = {key: tensor for _, _, key, tensor in tuned_tensors(model, "default")}
    scores = {key: torch.zeros_like(tensor, dtype=torch.float32) for key, tensor in tensors.items()}

    def fold(key):
        def hook(tensor):
            grad = tensor.grad.float()
            if max_grad_norm is not None:
                grad = grad * (max_grad_norm / (torch.linalg.vector_norm(grad) + 1e-6)).clamp(max=1.0)
            scores[key].add_(grad.square())
            tensor.grad = None

        return hook

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    handles = []
    for key, tensor in tensors.items():
        tensor.requires_grad_(True)
        handles.append(tensor.register_post_accumulate_grad_hook(fold(key)))
    model.train()
    with _layers_disabled(model):
        for batch in batches:
            model(**batch).loss.backward()
    for handle in handles:
        handle.remove()
    flat = torch.cat([score.reshape(-1) / len(batches) for score in scores.values()])
    order = torch.sort(flat, descending=True, stable=True).indices[:k]  # stable: ties keep (tensor, position)
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[order] = True
    result, start = {}, 0
    for key, tensor in tensors.items():
        result[key] = torch.nonzero(chosen[start : start + tensor.numel()]).squeeze(1)
        start += tensor.numel()
    return result


def build(arch):
    torch.manual_seed(0)
    return peft_model(arch.build(dropout=0.1), mode="d", reserve_p=RESERVE_P, task_type=arch.task_type)


def detected(arch, batches, **kwargs) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The chosen positions of each tuned tensor, and the random state the pass leaves."""
    model = build(arch)
    torch.manual_seed(1)
    model.detect_child_network(batches, progress=False, **kwargs)
    positions = {layer.tensor_key("weight"): positions_of(layer).long() for layer in child_layers(model).values()}
    return {key: chosen for key, chosen in positions.items() if chosen.numel()}, torch.get_rng_state()


def reference(arch, batches, max_grad_norm=1.0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    model = build(arch)
    total = sum(tensor.numel() for _, _, _, tensor in tuned_tensors(model, "default"))
    torch.manual_seed(1)
    result = reference_child_network(model, batches, round(RESERVE_P * total), max_grad_norm)
    return {key: positions for key, positions in result.items() if positions.numel()}, torch.get_rng_state()


def assert_same_child_network(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


# ------------------------------------------------------------------------------------------------ same child network
@pytest.mark.parametrize("fisher_chunks", [1, 2, 7, "auto"])
def test_chunks_choose_the_reference_child_network(tiny_models, fisher_chunks):
    """Bit for bit the positions of the single out-of-place pass, with dropout on (replayed with the same random
    state in every chunk's pass), and the random state afterwards is the one a single pass leaves."""
    batches = tiny_models.batches(3)
    expected, expected_rng = reference(tiny_models, batches)
    actual, rng = detected(tiny_models, batches, fisher_chunks=fisher_chunks)
    assert_same_child_network(actual, expected)
    assert torch.equal(rng, expected_rng)


@pytest.mark.parametrize("fisher_chunks", [1, 5])
def test_chunks_without_clipping(fisher_chunks):
    arch = ARCHS["llama"]
    batches = arch.batches(2)
    expected, _ = reference(arch, batches, max_grad_norm=None)
    actual, _ = detected(arch, batches, fisher_chunks=fisher_chunks, max_grad_norm=None)
    assert_same_child_network(actual, expected)


def test_chunks_read_a_one_shot_iterator_once_and_only_num_batches():
    """The batches are taken from the dataloader once (a generator works) and replayed; no batch past num_batches
    is drawn."""
    arch = ARCHS["bert"]
    batches = arch.batches(4)
    drawn = []

    def generator():
        for batch in batches:
            drawn.append(batch)
            yield batch

    expected, _ = reference(arch, batches[:2])
    actual, _ = detected(arch, generator(), num_batches=2, fisher_chunks=4)
    assert_same_child_network(actual, expected)
    assert len(drawn) == 2


# ------------------------------------------------------------------------------------------------ memory
def test_one_gradient_at_a_time_and_one_chunk_of_scores(monkeypatch):
    """During a chunked pass, whenever a gradient arrives no other parameter holds one (each is folded and freed at
    once), only the chunk's tensors take gradients, and each pass holds scores for at most one chunk of entries."""
    arch = ARCHS["llama"]
    model = build(arch)
    tensors = [tensor for _, _, _, tensor in tuned_tensors(model, "default")]
    total = sum(tensor.numel() for tensor in tensors)
    chunks = 4
    per_chunk = -(-total // chunks)
    grads_held, requiring_grad, chunk_entries = [], [], []

    def spy(tensor):
        grads_held.append(sum(parameter.grad is not None for parameter in model.parameters()))
        requiring_grad.append(sum(parameter.requires_grad for parameter in model.parameters()))

    for tensor in tensors:  # registered first: runs before the fold, while the gradient is still there
        tensor.requires_grad_(True).register_post_accumulate_grad_hook(spy)
        tensor.requires_grad_(False)
    real_pass = fisher._fisher_pass

    def counting_pass(model, tensors, pieces, *args, **kwargs):
        chunk_entries.append((sum(stop - start for _, start, stop in pieces), len(pieces)))
        return real_pass(model, tensors, pieces, *args, **kwargs)

    monkeypatch.setattr(fisher, "_fisher_pass", counting_pass)
    model.detect_child_network(arch.batches(2), progress=False, fisher_chunks=chunks)
    assert len(chunk_entries) == chunks
    assert all(entries <= per_chunk for entries, _ in chunk_entries)
    assert grads_held and max(grads_held) == 1
    assert max(requiring_grad) <= max(pieces for _, pieces in chunk_entries) < len(tensors)


def test_chunk_pieces_cover_every_entry_once():
    sizes = [("a", 10), ("b", 0), ("c", 7), ("d", 25)]
    for per_chunk in (1, 3, 10, 42, 100):
        chunks = _chunk_pieces(sizes, per_chunk)
        assert all(sum(stop - start for _, start, stop in chunk) <= per_chunk for chunk in chunks)
        assert all(len({name for name, _, _ in chunk}) == len(chunk) for chunk in chunks)  # one piece per tensor
        assert sum(len(chunk) > 0 for chunk in chunks) == len(chunks)
        for name, size in sizes:
            ranges = [(start, stop) for chunk in chunks for piece_name, start, stop in chunk if piece_name == name]
            assert ranges[0][0] == 0 and ranges[-1][1] == size
            assert all(previous[1] == following[0] for previous, following in zip(ranges, ranges[1:]))


def test_auto_chunks_hold_2k_entries_but_no_less_than_the_largest_tensor():
    """2k scores + k kept candidates (8 B each) stay within training's 16 B per child entry; below the largest
    tensor a chunk would save nothing, its dense gradient being held anyway (and k = 0 must not mean N passes)."""
    assert _entries_per_chunk("auto", [10, 30], 20) == 40
    assert _entries_per_chunk("auto", [10, 30], 3) == 30
    assert _entries_per_chunk("auto", [10, 30], 0) == 30
    assert _entries_per_chunk(3, [10, 30], 0) == 14


@pytest.mark.parametrize("fisher_chunks", [0, -1, 1.5, "all", True])
def test_fisher_chunks_must_be_a_positive_int_or_auto(fisher_chunks):
    arch = ARCHS["bert"]
    with pytest.raises(ValueError, match="fisher_chunks"):
        build(arch).detect_child_network(arch.batches(1), progress=False, fisher_chunks=fisher_chunks)


# ------------------------------------------------------------------------------------------------ torch selection
def test_torch_selection_path_equals_numpy(monkeypatch):
    """The torch path (what runs on an accelerator, without host copies of the scores) picks the same positions."""
    generator = torch.Generator().manual_seed(0)
    scores = [torch.randint(0, 50, shape, generator=generator).float() / 7 for shape in [(30, 20), (1000,), (9, 9)]]
    scores.append(torch.zeros(40))  # a tensor of ties only
    total = sum(score.numel() for score in scores)
    with_numpy = {k: select_top_k(scores, k) for k in (0, 1, 17, 500, total - 3, total)}
    monkeypatch.setattr(sparse_format, "_NUMPY_ON_CPU", False)
    for k, expected in with_numpy.items():
        actual = select_top_k(scores, k)
        assert all(a.dtype == torch.int64 and torch.equal(a, e) for a, e in zip(actual, expected)), k


def test_torch_selection_path_in_detect_child_network(monkeypatch):
    arch = ARCHS["gpt2"]
    batches = arch.batches(2)
    expected, _ = reference(arch, batches)
    monkeypatch.setattr(sparse_format, "_NUMPY_ON_CPU", False)
    actual, _ = detected(arch, batches, fisher_chunks=3)
    assert_same_child_network(actual, expected)
