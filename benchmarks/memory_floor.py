"""Memory of Child-Tuning-D against LoRA at the shape of issue #14: 4 decoder layers of TinyLlama-1.1B.

A LlamaForCausalLM (hidden 2048, intermediate 5632, 32 heads, 4 kv heads, vocab 32000) in fp32 on CPU; LoRA r=16 and
Child-Tuning-D (a random child network: the same memory as a Fisher-selected one of that size) target the seven
linear layers of every decoder layer; the embedding and LM head are frozen. Each method trains a few AdamW steps on
2x128 tokens in its own process. Figures (bench.py's helpers): the peak RSS above the built model, the RSS held
between steps, and for Child-Tuning-D the bytes held per child entry (held between steps / child entries) next to
an accounting of the tensors the layers and the optimizer hold.

    python3 benchmarks/memory_floor.py                 # LoRA, then Child-Tuning-D at reserve_p 0.013, 0.05 and 0.3
    python3 benchmarks/memory_floor.py --rounds 3      # the same 3 times, alternating; the table gives medians

RSS moves by tens of MB from one run to the next (where glibc's arenas place the step's allocations), so several
rounds are worth their time. Writes benchmarks/results/memory_floor.json (every run) and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import _reset_peak_rss, _return_freed_memory, _rss_bytes  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GB = 1e9


def _build():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    )
    return LlamaForCausalLM(config)


def _held_tensor_bytes(model, optimizer) -> dict[str, int]:
    """Bytes of the tensors Child-Tuning holds between steps, by kind, each storage counted once."""
    import torch

    from peft_childtuning.layer import ChildTuningLayer

    seen: set[int] = set()
    kinds = {"values": 0, "optimizer_state": 0, "grads": 0, "positions": 0, "other_caches": 0}

    def add(kind: str, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            kinds[kind] += storage.nbytes()

    for module in model.modules():
        if isinstance(module, ChildTuningLayer):
            for tensor in module.held_position_tensors():
                add("positions", tensor)
            for originals in module._merge_originals.values():
                add("other_caches", originals[1])
    for parameter in (p for p in model.parameters() if p.requires_grad):
        add("values", parameter)
        if parameter.grad is not None:
            add("grads", parameter.grad)
    for state in optimizer.state.values():
        for tensor in state.values():
            if torch.is_tensor(tensor) and tensor.dim() > 0:
                add("optimizer_state", tensor)
    return kinds


def run_worker(method: str, reserve_p: float, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    import peft_childtuning  # noqa: F401  (registers the tuner)
    from peft_childtuning import ChildTuningConfig

    torch.set_num_threads(2)
    base = _build()
    batch = {"input_ids": torch.randint(0, 32000, (2, 128), generator=torch.Generator().manual_seed(0))}
    batch["labels"] = batch["input_ids"]
    _return_freed_memory()
    rss_after_build = _rss_bytes("VmRSS")
    _reset_peak_rss()
    if method == "lora":
        config = LoraConfig(r=16, target_modules=TARGETS, task_type="CAUSAL_LM")
    else:
        config = ChildTuningConfig(
            mode="d", reserve_p=reserve_p, selection="random", target_modules=TARGETS, task_type="CAUSAL_LM"
        )
    model = get_peft_model(base, config)
    model.train()
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    peak_setup = _rss_bytes("VmHWM") - rss_after_build
    _return_freed_memory()
    _reset_peak_rss()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak_steps = _rss_bytes("VmHWM") - rss_after_build
    _return_freed_memory()
    held = _rss_bytes("VmRSS") - rss_after_build
    trainable = sum(parameter.numel() for parameter in parameters)
    result = {
        "method": method,
        "reserve_p": reserve_p if method != "lora" else None,
        "trainable_entries": trainable,
        "peak_setup_rss_bytes": peak_setup,
        "peak_steps_rss_bytes": peak_steps,
        "held_between_steps_rss_bytes": held,
    }
    if method != "lora":
        accounted = _held_tensor_bytes(model, optimizer)
        result["held_tensor_bytes"] = accounted
        result["held_tensor_bytes_per_child_entry"] = sum(accounted.values()) / trainable
        result["held_rss_bytes_per_child_entry"] = held / trainable
    return result


def _spawn(method: str, reserve_p: float, steps: int) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--reserve-p", str(reserve_p), "--steps", str(steps)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _peak(result: dict) -> int:
    return max(result["peak_setup_rss_bytes"], result["peak_steps_rss_bytes"])


def _markdown(runs: list[list[dict]], steps: int) -> str:
    """One row per method: medians over the rounds (each round ran every method once), and each round's peak."""
    lora_peak = statistics.median(_peak(run[0]) for run in runs)
    lines = [
        "# Memory at the floor (issue #14)",
        "",
        "4 decoder layers of TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 32/4 heads, vocab 32000), fp32,",
        f"CPU, 2x128 tokens, AdamW, {steps} steps; the seven linear layers of each decoder layer targeted, the",
        "embedding and LM head frozen. RSS above the built model; medians of "
        f"{len(runs)} round{'s' if len(runs) > 1 else ''}. `python3 benchmarks/memory_floor.py --rounds {len(runs)}`",
        "",
        "| method | trainable | peak (GB) | vs LoRA | peak per round (GB) | held between steps (GB) "
        "| held B / child entry (RSS) | held B / child entry (tensors) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for results in zip(*runs):
        first = results[0]
        name = "LoRA r=16" if first["method"] == "lora" else f"Child-Tuning-D p={first['reserve_p']}"
        peak = statistics.median(_peak(result) for result in results)
        held = statistics.median(result["held_between_steps_rss_bytes"] for result in results)
        per_round = " / ".join(f"{_peak(result) / GB:.2f}" for result in results)
        per_rss = "" if first["method"] == "lora" else f"{held / first['trainable_entries']:.1f}"
        per_tensors = first.get("held_tensor_bytes_per_child_entry")
        lines.append(
            f"| {name} | {first['trainable_entries'] / 1e6:.1f}M | {peak / GB:.2f} | {peak / lora_peak:.2f}x "
            f"| {per_round} | {held / GB:.2f} | {per_rss} | {'' if per_tensors is None else f'{per_tensors:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["lora", "childtuning_d"])
    parser.add_argument("--reserve-p", type=float, nargs="*", default=[0.013, 0.05, 0.3])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="run every method this many times, alternating")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "memory_floor")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.reserve_p[0], args.steps)))
        return
    runs = []
    for _ in range(args.rounds):
        results = [_spawn("lora", 0.0, args.steps)]
        for reserve_p in args.reserve_p:
            results.append(_spawn("childtuning_d", reserve_p, args.steps))
        runs.append(results)
    markdown = _markdown(runs, args.steps)
    print(markdown)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {"steps": args.steps, "rounds": args.rounds, "runs": runs}
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.output.with_suffix(".md").write_text(markdown)


if __name__ == "__main__":
    main()
