"""Switching the active adapter of a model loaded for inference: Child-Tuning-D against LoRA, side by side.

Serving several adapters on one merged base means switching: write the old adapter out of the weights and the new
one in (``unmerge_adapter``, ``set_adapter``, ``merge_adapter`` for both methods: peft's ``set_adapter`` alone
leaves a merged model unmerged). Child-Tuning-D writes back the overwritten originals and writes in the other
adapter's child entries, in the copy of each weight its first merge made, so a switch costs time in proportion
to the child entries. LoRA subtracts and adds a dense B @ A per targeted weight.

Each model's base is saved and loaded back (memory-mapped, as a user's base is), two adapters of each method are
loaded for inference onto it, and switches alternate between them: the first switch is reported apart, the median
of the others as the switch time. Methods run in fresh processes,
alternating over rounds, at one torch thread (set --threads). Outputs after each switch are checked against a
model with only that adapter loaded (bit-identical for Child-Tuning, within float32 rounding for LoRA).

    python3 benchmarks/switch.py --models bert-base,llama-4l --reserve-ps 0.05,0.3

Writes benchmarks/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {  # bert: (hidden, layers, heads, intermediate); llama: TinyLlama-1.1B's layer shape, fewer layers
    "tiny": ("bert", (64, 2, 4, 128)),
    "bert-base": ("bert", (768, 12, 12, 3072)),
    "llama-tiny": ("llama", (64, 2, 176, 4, 2, 1000)),
    "llama-4l": ("llama", (2048, 4, 5632, 32, 4, 32000)),
}


# ------------------------------------------------------------------------------------------------- worker side
def _build(name: str):
    import torch
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    family, shape = MODELS[name]
    torch.manual_seed(0)
    if family == "bert":
        hidden, layers, heads, intermediate = shape
        return BertForSequenceClassification(
            BertConfig(
                hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate
            )
        )
    hidden, layers, intermediate, heads, kv_heads, vocab = shape
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate, num_attention_heads=heads,
            num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=False,
        )
    )  # fmt: skip


def _adapter_config(method: str, reserve_p: float, family: str, seed: int):
    from peft import LoraConfig

    from peft_childtuning import ChildTuningConfig

    task = "SEQ_CLS" if family == "bert" else "CAUSAL_LM"
    if method == "lora":
        targets = ["query", "key", "value", "dense"] if family == "bert" else "all-linear"
        return LoraConfig(r=16, target_modules=targets, task_type=task, init_lora_weights=False)
    # a seeded random child network: switching costs do not depend on how the child network was chosen
    return ChildTuningConfig(mode="d", reserve_p=reserve_p, selection="random", seed=seed, task_type=task)


def run_worker(args: argparse.Namespace) -> dict:
    import torch

    import peft_childtuning  # noqa: F401  (registers the tuner)
    from peft import PeftModel, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    torch.set_num_threads(args.threads)
    family = MODELS[args.model][0]
    auto = "AutoModelForSequenceClassification" if family == "bert" else "AutoModelForCausalLM"
    import transformers

    def load_base():
        return getattr(transformers, auto).from_pretrained(work / "base").eval()

    with tempfile.TemporaryDirectory(prefix="ctswitch_") as folder:
        work = Path(folder)
        model = _build(args.model)
        model.save_pretrained(work / "base")
        for index, name in enumerate(("a", "b")):
            trained = get_peft_model(load_base(), _adapter_config(args.worker, args.reserve_p, family, seed=index))
            with torch.no_grad():  # trained-looking values: every child entry (every LoRA factor) moved
                for parameter in trained.parameters():
                    if parameter.requires_grad:
                        parameter.add_(0.01 * torch.randn_like(parameter))
            trained.save_pretrained(work / name)
        ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
        expected = {}
        for name in ("a", "b"):
            with torch.inference_mode():
                expected[name] = PeftModel.from_pretrained(load_base(), work / name)(input_ids=ids).logits
        model = PeftModel.from_pretrained(load_base(), work / "a", adapter_name="a")
        model.load_adapter(work / "b", adapter_name="b")
        if args.worker == "lora":  # a Child-Tuning adapter loaded for inference is merged at load
            model.base_model.merge_adapter(["a"])

        def switch(name: str) -> float:
            # peft's set_adapter unmerges a merged model and leaves it unmerged: merge the new adapter again
            start = time.perf_counter()
            model.base_model.unmerge_adapter()
            model.set_adapter(name)
            model.base_model.merge_adapter([name])
            return time.perf_counter() - start

        first = switch("b")
        times, largest_difference = [], 0.0
        for index in range(args.switches):
            name = "a" if index % 2 == 0 else "b"
            times.append(switch(name))
            if not all(layer.merged for layer in model.modules() if isinstance(layer, BaseTunerLayer)):
                raise RuntimeError(f"{args.worker}: the model is not merged after switching to {name}")
            with torch.inference_mode():
                out = model(input_ids=ids).logits
            largest_difference = max(largest_difference, float((out - expected[name]).abs().max()))
        tuned_entries = sum(
            module.weight.numel()
            for module in model.base_model.model.modules()
            if hasattr(module, "base_layer") and hasattr(module.base_layer, "weight")
        )
        child_entries = sum(
            parameter.numel() for name, parameter in model.named_parameters() if ".b" in name and "childtuning" in name
        )
    return {
        "method": args.worker,
        "model": args.model,
        "reserve_p": args.reserve_p,
        "first_switch_seconds": first,
        "switch_seconds": statistics.median(times),
        "switches": len(times),
        "targeted_entries": tuned_entries,
        "child_entries": child_entries,
        "largest_output_difference": largest_difference,
    }


# ------------------------------------------------------------------------------------------------- driver side
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bert-base,llama-4l")
    parser.add_argument("--reserve-ps", default="0.05,0.3")
    parser.add_argument("--switches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--name", default="switch")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--reserve-p", type=float, default=0.05, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    runs = [("lora", None)] + [("childtuning_d", float(p)) for p in args.reserve_ps.split(",")]
    results: dict = {"settings": vars(args), "models": {}}
    for model in args.models.split(","):
        collected: dict[str, list[dict]] = {}
        for round_index in range(args.rounds):
            for method, reserve_p in runs if round_index % 2 == 0 else list(reversed(runs)):
                command = [
                    sys.executable, str(Path(__file__).resolve()), "--worker", method, "--model", model,
                    "--switches", str(args.switches), "--threads", str(args.threads),
                    "--reserve-p", str(reserve_p or 0.05),
                ]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"{method} on {model} failed:\n{done.stderr[-3000:]}")
                run = json.loads(done.stdout.strip().splitlines()[-1])
                label = method if reserve_p is None else f"{method} p={reserve_p}"
                collected.setdefault(label, []).append(run)
                print(f"[{model}] {label}: switch {run['switch_seconds'] * 1e3:.1f} ms", flush=True)
        results["models"][model] = {
            label: {
                **runs_[-1],
                "switch_seconds": statistics.median(run["switch_seconds"] for run in runs_),
                "first_switch_seconds": statistics.median(run["first_switch_seconds"] for run in runs_),
            }
            for label, runs_ in collected.items()
        }
    lines = [f"Settings: {json.dumps(results['settings'])}", ""]
    for model, labelled in results["models"].items():
        lora = labelled["lora"]["switch_seconds"]
        lines += [
            f"### {model}",
            "",
            "| method | child entries | switch ms (median) | vs LoRA | first switch ms | ns per child entry | largest output difference |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for label, run in labelled.items():
            child = run["child_entries"]
            lines.append(
                f"| {label} | {child:,} | {run['switch_seconds'] * 1e3:.1f} | {run['switch_seconds'] / lora:.2f}x | "
                f"{run['first_switch_seconds'] * 1e3:.1f} | "
                f"{run['switch_seconds'] / child * 1e9:.2f} | {run['largest_output_difference']:.2g} |"
                if child
                else f"| {label} | | {run['switch_seconds'] * 1e3:.1f} | 1.00x | {run['first_switch_seconds'] * 1e3:.1f} | | "
                f"{run['largest_output_difference']:.2g} |"
            )
        lines.append("")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    (out / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
