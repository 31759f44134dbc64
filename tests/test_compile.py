"""torch.compile: the training forward of an unmerged mode-"d" or mode-"f" model traces into as few graphs as LoRA's,
compiled training steps equal eager ones bit for bit, and the steps do not recompile.

The backend is aot_eager: dynamo and AOTAutograd trace and partition the forward and backward as inductor would, but
run the traced aten ops as they are, so results can be compared exactly. Inductor fuses and reorders float ops (and
compiles C++ for a minute on a small machine); `benchmarks/compile.py` measures it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch._dynamo.backends.debugging import ExplainOutput
from conftest import ARCHS, child_layers, tiny_bert, trainable_parameters
from peft import LoraConfig, get_peft_model

from peft_childtuning import ChildTuningConfig
from peft_childtuning.gradient_mask import _masked_gradient_op, masked_gradient
from peft_childtuning.layer import _BLOCK_ENTRIES

BERT = ARCHS["bert"]
P = 0.3


def build(method: str, seed: int = 3, init_weights: bool = True) -> torch.nn.Module:
    """A tiny 2-layer BERT in training mode, with LoRA or a random-selection Child-Tuning adapter of mode d or f."""
    if method == "lora":
        config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "key", "value", "dense"])
    else:
        config = ChildTuningConfig(
            mode=method, selection="random", reserve_p=P, seed=seed, init_weights=init_weights, task_type="SEQ_CLS"
        )
    model = get_peft_model(tiny_bert(), config)
    model.train()
    return model


def warm(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.nn.Module:
    """One eager forward: Child-Tuning decodes its positions at first use and BERT sets config.problem_type at its
    first loss, which a compiled first call would each trace once and then recompile."""
    with torch.no_grad():
        model(**batch)
    return model


def explain(model: torch.nn.Module, inputs: dict[str, torch.Tensor] | torch.Tensor) -> ExplainOutput:
    torch._dynamo.reset()
    if isinstance(inputs, torch.Tensor):
        return torch._dynamo.explain(model)(inputs)
    return torch._dynamo.explain(model)(**inputs)


@pytest.fixture(scope="module")
def lora_graphs() -> tuple[int, int]:
    explanation = explain(build("lora"), BERT.batches(1)[0])
    return explanation.graph_count, explanation.graph_break_count


@pytest.mark.parametrize("mode", ["d", "f"])
def test_training_forward_is_as_few_graphs_as_loras(mode, lora_graphs):
    batch = BERT.batches(1)[0]
    explanation = explain(warm(build(mode), batch), batch)
    assert lora_graphs == (1, 0)
    assert explanation.graph_count <= lora_graphs[0] and explanation.graph_break_count <= lora_graphs[1]


def mlp_model(seed: int, hidden: int = 16, inner: int = 32) -> torch.nn.Module:
    """Two Linear layers with a random mode-d child network and values off the base: small, so quick to trace."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(hidden, inner), torch.nn.ReLU(), torch.nn.Linear(inner, 4))
    config = ChildTuningConfig(
        mode="d", selection="random", reserve_p=P, seed=seed, init_weights=False, target_modules=["0", "2"]
    )
    return get_peft_model(base, config).train()


def test_a_fresh_model_breaks_only_where_it_decodes_its_positions_once():
    """Positions are decoded at their first use, eagerly: a graph break in each layer, in that first call only."""
    model, x = mlp_model(seed=3), torch.randn(5, 16)
    first = explain(model, x)
    assert 0 < first.graph_break_count <= len(child_layers(model))
    assert all("_decode_positions" in reason.reason for reason in first.break_reasons)
    second = explain(model, x)
    assert (second.graph_count, second.graph_break_count) == (1, 0)


def compiled_and_eager_steps(mode: str, steps: int) -> torch.nn.Module:
    """`steps` AdamW steps of a compiled and an eager copy of one model, on changing batches: the losses, gradients
    and values are equal bit for bit at every step, and one graph serves every step (none is compiled again)."""
    batches = BERT.batches(steps, seed=5)
    eager = warm(build(mode), batches[0])
    compiled_model = copy.deepcopy(eager)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend=counter)
    optimizers = [torch.optim.AdamW(trainable_parameters(m), lr=1e-2) for m in (eager, compiled_model)]
    for step, batch in enumerate(batches):
        losses = []
        for model, optimizer in zip((eager, compiled), optimizers):
            loss = model(**batch).loss
            loss.backward()
            losses.append(loss.detach())
        assert torch.equal(*losses), step
        gradients = [[p.grad for p in trainable_parameters(m)] for m in (eager, compiled_model)]
        assert all(torch.equal(a, b) for a, b in zip(*gradients)), step
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert counter.frame_count == 1, step
    for a, b in zip(trainable_parameters(eager), trainable_parameters(compiled_model)):
        assert torch.equal(a, b)
    return compiled_model


def test_compiled_mode_d_steps_equal_eager_and_do_not_recompile():
    """The optimizer updates the child values in place; the positions stay."""
    compiled_and_eager_steps("d", steps=3)


def test_compiled_mode_f_steps_equal_eager_and_do_not_recompile():
    """The mask changes every step (it is seeded by the step counter, a graph input): equal gradients at every step
    mean the compiled backward drew the eager masks."""
    model = compiled_and_eager_steps("f", steps=3)
    assert model.base_model.mask_step_counter.step == 3


def test_compiled_forward_follows_a_child_network_loaded_in_place():
    """load_state_dict writes the encoded positions in place (the same tensor objects): the compiled forward must
    compute with the loaded child network, not the one it traced."""
    model, other, x = mlp_model(seed=3), mlp_model(seed=4), torch.randn(5, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")  # what is tested is dynamo's guards, not the traced graphs
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
        layers = list(child_layers(model).values())
        encoded = [layer.childtuning_positions["default"] for layer in layers]
        model.load_state_dict({k: v for k, v in other.state_dict().items() if ".childtuning_" in k}, strict=False)
        assert all(layer.childtuning_positions["default"] is tensor for layer, tensor in zip(layers, encoded))
        assert not torch.equal(model(x), mlp_model(seed=3)(x))
        assert torch.equal(compiled(x), other(x))


def test_a_backward_by_blocks_compiles_into_one_graph_and_follows_a_new_child_network():
    """A weight over `_BLOCK_ENTRIES` entries takes the backward by blocks, whose entry counts (`BlockPlan`) the trace
    holds as constants: compiled gradients equal eager ones bit for bit, also after another child network (other
    counts) is loaded in place, which must not reuse the traced counts."""
    model, other, x = mlp_model(3, 2048, 2560), mlp_model(4, 2048, 2560), torch.randn(5, 2048)
    assert model.base_model.model[0].get_base_layer().weight.numel() > _BLOCK_ENTRIES
    with torch.no_grad():
        model(x)
    assert (explain(model, x).graph_count, explain(model, x).graph_break_count) == (1, 0)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):
        gradients = []
        for forward in (model, compiled):
            forward(x).square().sum().backward()
            gradients.append([parameter.grad for parameter in trainable_parameters(model)])
            model.zero_grad(set_to_none=True)
        assert all(torch.equal(a, b) for a, b in zip(*gradients))
        loaded = {k: v for k, v in other.state_dict().items() if ".childtuning_" in k}
        model.load_state_dict(loaded, strict=False)


def test_mask_operator_is_opaque_to_compile_and_differentiable():
    """The mask is one operator in a compiled graph (hash and numpy generator inside); its fake result has the real
    one's shape and strides, and it is linear in the gradient, so a double backward masks with the same mask."""
    grad = torch.randn(33, 17, requires_grad=True)
    step = torch.tensor(2)
    torch.library.opcheck(_masked_gradient_op, (grad, step, P, 4, "k"))
    masked = _masked_gradient_op(grad, step, P, 4, "k")
    assert torch.equal(masked.detach(), masked_gradient(grad.detach(), P, 4, 2, "k"))
    masked.sum().backward()
    assert torch.equal(grad.grad, masked_gradient(torch.ones_like(grad), P, 4, 2, "k"))


def test_a_gap16x_child_network_compiles_into_one_graph_and_steps_as_eager():
    """Gaps over 16 bits (a gap16x stream, expanded with a scatter-add of its wide gaps and a prefix sum): once
    decoded, the training forward is one graph without a break, and compiled steps equal eager ones bit for bit."""
    torch.manual_seed(0)
    config = ChildTuningConfig(
        mode="d", selection="random", reserve_p=3e-5, seed=3, init_weights=False, target_modules=["0"]
    )
    eager = get_peft_model(torch.nn.Sequential(torch.nn.Linear(512, 512)), config).train()
    assert config.child_encodings == {"0.weight": "gap16x"}, config.child_encodings
    x = torch.randn(5, 512)
    explain(eager, x)  # decodes the positions, eagerly
    explanation = explain(eager, x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    compiled_model = copy.deepcopy(eager)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend=counter)
    for model in (eager, compiled):
        model(x).square().mean().backward()
    gradients = [[p.grad for p in trainable_parameters(m)] for m in (eager, compiled_model)]
    assert all(torch.equal(a, b) for a, b in zip(*gradients)) and counter.frame_count == 1
