"""Worker for tests/test_distributed.py: Child-Tuning on several CPU processes (gloo), and its one-process reference.

Launched as
    accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 tests/distributed_worker.py OUT_DIR TASK...
(`--multi_gpu` with `Accelerator(cpu=True)` gives MULTI_CPU with the gloo backend; `accelerate launch --cpu` would
start one non-distributed process). Each process writes what it saw to OUT_DIR/<task>_rank<r>.pt; the test compares
the processes with each other and with `reference_run` (a plain torch loop in one process over the same data).

Tasks:
    plain_d, plain_f   plain accelerate: Accelerator(cpu=True), accelerator.prepare(model, optimizer, dataloader)
    trainer_d          the transformers Trainer with ChildTuningCallback and prepare_child_network
    fsdp2_d, fsdp2_f   torch's FSDP2 (fully_shard) on gloo instead of DDP
    fsdp1_d            torch's FSDP1 (FullyShardedDataParallel, use_orig_params=True) on gloo
"""

from __future__ import annotations

import hashlib
import os
import sys
import traceback
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from conftest import VOCAB, child_layers, peft_model, positions_of, tiny_bert  # noqa: E402  (also sets 1 thread)
from peft_childtuning.gradient_mask import bernoulli_keep_mask  # noqa: E402

N_EXAMPLES = 32
SEQ = 8
PER_PROCESS_BATCH = 4
WORLD = 2
GLOBAL_BATCH = PER_PROCESS_BATCH * WORLD
P = 0.05  # small enough that the child positions use the uint16 gap16 encoding, and that some tensors get none
SEED = 5
LR = 1e-2


def dataset() -> list[dict[str, torch.Tensor]]:
    """Fixed-length examples (no padding), so that one batch of 8 is exactly two batches of 4 side by side."""
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(2, VOCAB, (SEQ,), generator=generator),
            "attention_mask": torch.ones(SEQ, dtype=torch.long),
            "labels": torch.randint(0, 2, (), generator=generator),
        }
        for _ in range(N_EXAMPLES)
    ]


def make_model(mode: str):
    return peft_model(tiny_bert(), mode=mode, reserve_p=P, seed=SEED, task_type="SEQ_CLS")


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {
        name.replace("_fsdp_wrapped_module.", ""): param.detach().clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def child_positions(model) -> dict[str, torch.Tensor]:
    """The child positions of every tuned weight (a weight whose child network came out empty is not tuned)."""
    return {
        key: positions_of(layer).clone()
        for key, layer in child_layers(model).items()
        if "weight" in layer.tuned_tensor_names("default")
    }


def mask_digest(model, step: int) -> str:
    """A hash of the mode-"f" masks of every tuned tensor at one optimizer step."""
    digest = hashlib.sha256()
    for layer in child_layers(model).values():
        values = layer.childtuning_values["default"]
        spec = layer.childtuning_spec["default"]
        keep = bernoulli_keep_mask(values.shape, spec.reserve_p, spec.seed, step, layer.tensor_key("weight"), "cpu")
        digest.update(keep.to(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ reference
def reference_run(mode: str) -> dict[str, Any]:
    """One process, plain torch: Fisher over all batches of 4, then training with batches of 8 (the global batch)."""
    model = make_model(mode)
    data = dataset()
    if mode == "d":
        model.detect_child_network(DataLoader(data, batch_size=PER_PROCESS_BATCH), progress=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    model.train()
    for batch in DataLoader(data, batch_size=GLOBAL_BATCH):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result = {"state": trainable_state(model), "steps": model.base_model.mask_step_counter.step}
    if mode == "d":
        result["positions"] = child_positions(model)
    return result


# ------------------------------------------------------------------------------------------------ plain accelerate
def plain(mode: str) -> dict[str, Any]:
    from accelerate import Accelerator
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == WORLD, accelerator.state
    model = make_model(mode)
    data = dataset()
    result: dict[str, Any] = {"distributed_type": str(accelerator.distributed_type)}
    if mode == "d":
        # before accelerator.prepare wraps the model in DDP: each process sees its shard, the scores are summed
        fisher_loader = accelerator.prepare_data_loader(DataLoader(data, batch_size=PER_PROCESS_BATCH))
        result["fisher_batches_here"] = len(fisher_loader)
        model.detect_child_network(fisher_loader, progress=False)
        result["positions"] = child_positions(model)
        specs = [layer.childtuning_spec["default"] for layer in child_layers(model).values()]
        result["encodings"] = sorted({encoding for spec in specs for encoding in spec.encodings.values()})
        # DDP would broadcast the positions buffers, and gloo refuses the uint16 of the gap16 encoding: the tuner
        # names them in DDP's ignore list, found on the PeftModel through its attribute forwarding
        buffers = {name for name, _ in model.named_buffers()}
        result["ddp_ignores"] = sorted(set(model._ddp_params_and_buffers_to_ignore) & buffers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    ddp_model, optimizer, loader = accelerator.prepare(
        model, optimizer, DataLoader(data, batch_size=PER_PROCESS_BATCH)
    )
    result["wrapper"] = type(ddp_model).__name__
    result["requires_grad"] = {name: p.numel() for name, p in ddp_model.named_parameters() if p.requires_grad}

    names = {id(p): name for name, p in ddp_model.named_parameters()}
    wire: list[int] = []  # elements all-reduced per bucket
    local_checks: list[dict[str, Any]] = []  # mode f: what each process's own gradient looked like

    def counting_allreduce(state, bucket):  # no annotations: DDP checks them, and they are strings here
        wire.append(bucket.buffer().numel())
        if mode == "f":
            step = model.base_model.mask_step_counter.step
            for param, grad in zip(bucket.parameters(), bucket.gradients()):
                name = names[id(param)]
                if "childtuning_values" not in name:
                    continue
                key = name.split("base_model.model.", 1)[1].rsplit(".childtuning_values", 1)[0] + ".weight"
                keep = bernoulli_keep_mask(grad.shape, P, SEED, step, key, grad.device)
                local_checks.append(
                    {
                        "step": step,
                        "key": key,
                        "zero_outside_mask": bool((grad[keep == 0] == 0).all()),
                        "nonzero_inside": float((grad[keep == 1] != 0).float().mean()),
                    }
                )
        return allreduce_hook(None, bucket)

    ddp_model.register_comm_hook(None, counting_allreduce)
    ddp_model.train()
    digests = []
    for batch in loader:
        if mode == "f":
            digests.append(mask_digest(model, model.base_model.mask_step_counter.step))
        loss = ddp_model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    unwrapped = accelerator.unwrap_model(ddp_model)
    result.update(
        state=trainable_state(unwrapped),
        steps=unwrapped.base_model.mask_step_counter.step,
        wire_elements=sum(wire),
        mask_digests=digests,
        local_checks=local_checks,
    )
    return result


# ------------------------------------------------------------------------------------------------ Trainer
def trainer_d(out_dir: str) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments

    from peft_childtuning.trainer import ChildTuningCallback, prepare_child_network

    def make_trainer(model, name: str) -> Trainer:
        args = TrainingArguments(
            output_dir=os.path.join(out_dir, name),
            per_device_train_batch_size=PER_PROCESS_BATCH,
            max_steps=4,
            learning_rate=LR,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            seed=0,
            train_sampling_strategy="sequential",
            disable_tqdm=True,
            ddp_backend="gloo",
            ddp_find_unused_parameters=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[ChildTuningCallback()])
        # transformers 5.24 treats any forward with **kwargs as taking num_items_in_batch and then multiplies the
        # loss by the number of processes, but BERT's classification loss is a plain mean: the gradient would be
        # twice the one of one process. With this the Trainer averages like DDP.
        trainer.model_accepts_loss_kwargs = False
        return trainer

    result: dict[str, Any] = {}
    # the callback alone cannot run the Fisher pass once the Trainer has wrapped the model in DDP: it says so
    refused = make_trainer(make_model("d"), "refused")
    try:
        refused.train()
        result["refusal"] = None
    except RuntimeError as error:
        result["refusal"] = str(error)

    model = make_model("d")
    trainer = make_trainer(model, "prepared")
    summary = prepare_child_network(trainer)
    result["summary"] = summary
    result["positions"] = child_positions(model)
    trainer.train()
    result["wrapper"] = type(trainer.model_wrapped).__name__
    result["requires_grad"] = {
        name: p.numel() for name, p in trainer.model_wrapped.named_parameters() if p.requires_grad
    }
    result["state"] = trainable_state(model)
    result["global_step"] = trainer.state.global_step
    result["fisher_passes"] = next(
        cb.fisher_passes for cb in trainer.callback_handler.callbacks if isinstance(cb, ChildTuningCallback)
    )
    return result


# ------------------------------------------------------------------------------------------------ FSDP
def fsdp(version: int, mode: str) -> dict[str, Any]:
    """torch's FSDP on gloo: FSDP2 (`fully_shard` per BertLayer and the root) or FSDP1 (use_orig_params=True).

    accelerate cannot do this on CPU (its FSDP plugin is ignored under MULTI_CPU: the model comes back wrapped in
    DDP), so the process group and the data sharding come from accelerate and the sharding from torch itself.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == WORLD, accelerator.state
    model = make_model(mode)
    data = dataset()
    result: dict[str, Any] = {}
    if mode == "d":
        model.detect_child_network(
            accelerator.prepare_data_loader(DataLoader(data, batch_size=PER_PROCESS_BATCH)), progress=False
        )
        result["positions"] = child_positions(model)
        # not tuned at all: no 0-element values Parameter, which FSDP2's reduce-scatter would refuse ("_chunk_cat
        # expects non-empty tensor")
        result["empty_child_tensors"] = [key for key in child_layers(model) if key not in result["positions"]]
        result["zero_element_parameters"] = [name for name, p in model.named_parameters() if p.numel() == 0]
    if version == 2:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (accelerator.num_processes,))
        for block in model.base_model.model.bert.encoder.layer:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    result["sharded_types"] = sorted({type(p).__name__ for p in wrapped.parameters()})
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    loader = accelerator.prepare_data_loader(DataLoader(data, batch_size=PER_PROCESS_BATCH))
    wrapped.train()
    for batch in loader:
        wrapped(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if version == 2:
        state = {
            name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()
            if "childtuning_values" in name or "modules_to_save" in name
        }
    else:
        with FullyShardedDataParallel.summon_full_params(wrapped):
            state = {
                name.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                for name, p in wrapped.named_parameters()
                if "childtuning_values" in name or "modules_to_save" in name
            }
    result["state"] = state
    result["steps"] = model.base_model.mask_step_counter.step
    return result


def main(argv: list[str]) -> None:
    out_dir, tasks = argv[0], argv[1:]
    rank = int(os.environ.get("RANK", "0"))
    for task in tasks:
        try:
            if task.startswith("plain_"):
                result = plain(task.split("_", 1)[1])
            elif task == "trainer_d":
                result = trainer_d(out_dir)
            elif task.startswith("fsdp"):  # fsdp1_d, fsdp2_d, fsdp2_f
                result = fsdp(int(task[4]), task.split("_", 1)[1])
            else:
                raise ValueError(f"unknown task {task}")
        except Exception as error:  # reported to the test, which shows it
            result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        torch.save(result, os.path.join(out_dir, f"{task}_rank{rank}.pt"))
        if "error" in result:
            print(f"[rank {rank}] {task}: {result['error']}", file=sys.stderr, flush=True)
            break  # the other process may be waiting in a collective: stop here


if __name__ == "__main__":
    main(sys.argv[1:])
