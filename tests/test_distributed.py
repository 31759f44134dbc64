"""Child-Tuning on two CPU processes (gloo), compared with each other and with one process over the same data.

One `accelerate launch --multi_gpu --num_processes 2` (with `Accelerator(cpu=True)` in the worker: MULTI_CPU, gloo)
runs every task of tests/distributed_worker.py once per module; each process writes what it saw to a file. The
one-process reference (`reference_run`) trains the same model on batches of 8, the global batch of 2 x 4.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import distributed_worker as worker

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)
pytest.importorskip("accelerate")

TASKS = ["plain_d", "plain_f", "trainer_d", "fsdp2_d", "fsdp2_f", "fsdp1_d"]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{task: [rank 0 result, rank 1 result]} from one two-process launch."""
    out_dir = tmp_path_factory.mktemp("distributed")
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_machines", "1", "--num_processes", str(worker.WORLD), "--main_process_port", "0",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py"), str(out_dir), *TASKS,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    found = {}
    for task in TASKS:
        paths = [out_dir / f"{task}_rank{rank}.pt" for rank in range(worker.WORLD)]
        if all(path.is_file() for path in paths):
            found[task] = [torch.load(path, weights_only=False) for path in paths]
    if completed.returncode != 0 and len(found) < len(TASKS):
        pytest.fail(f"accelerate launch failed ({completed.returncode}):\n{completed.stderr[-6000:]}")
    return found


@pytest.fixture(scope="module")
def references():
    runs = {mode: worker.reference_run(mode) for mode in ("d", "f")}
    for mode, run in runs.items():  # the reference itself trained
        untrained = worker.trainable_state(worker.make_model(mode))
        trained = {name: tensor for name, tensor in run["state"].items() if "childtuning" in name}
        assert trained and any(not torch.equal(untrained[name], tensor) for name, tensor in trained.items())
    return runs


def task_results(results, task):
    assert task in results, f"the worker wrote no result for {task}"
    ranks = results[task]
    for rank, result in enumerate(ranks):
        assert "error" not in result, f"{task} failed on rank {rank}:\n{result.get('traceback')}"
    return ranks


def assert_same_positions(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------ mode "d"
def test_fisher_scores_are_summed_over_processes_before_selection(results, references):
    rank0, rank1 = task_results(results, "plain_d")
    assert rank0["distributed_type"] == "DistributedType.MULTI_CPU"
    # each process saw its own half of the 8 Fisher batches...
    assert rank0["fisher_batches_here"] == rank1["fisher_batches_here"] == 4
    # ...and both selected the child network of all the data, the one a single process selects
    assert_same_positions(rank0["positions"], rank1["positions"])
    assert_same_positions(rank0["positions"], references["d"]["positions"])
    total = sum(p.numel() for p in rank0["positions"].values())
    assert total == round(worker.P * 16384)
    # the uint16 gap16 encoding is in play, which DDP must not broadcast over gloo (int32 never wins on tensors this
    # small: every gap fits in 16 bits)
    assert rank0["encodings"] == ["bitmap", "gap16"]
    # one positions buffer per tuned weight (the weights whose child network came out empty are not tuned)
    assert len(rank0["ddp_ignores"]) == len(rank0["positions"]) < 12
    assert all(".childtuning_positions." in n for n in rank0["ddp_ignores"])


def test_only_child_values_and_the_head_require_grad_and_cross_the_wire(results, references):
    rank0, rank1 = task_results(results, "plain_d")
    assert rank0["wrapper"] == "DistributedDataParallel"
    assert rank0["requires_grad"] == rank1["requires_grad"]
    for name in rank0["requires_grad"]:
        assert name.startswith("module.base_model.model."), name
        assert ".childtuning_values.default" in name or ".modules_to_save.default." in name, name
    child = sum(p.numel() for p in rank0["positions"].values())
    head = sum(n for name, n in rank0["requires_grad"].items() if "modules_to_save" in name)
    assert sum(rank0["requires_grad"].values()) == child + head
    # what the DDP communication hook all-reduced: the child entries' and the head's gradients, once per step
    steps = rank0["steps"]
    assert steps == 4
    assert rank0["wire_elements"] == rank1["wire_elements"] == steps * (child + head)
    assert child + head < 0.1 * 16384  # vs. every targeted entry in full fine-tuning


# ------------------------------------------------------------------------------------------------ mode "f"
def test_mode_f_masks_are_equal_on_every_process(results):
    rank0, rank1 = task_results(results, "plain_f")
    assert len(rank0["mask_digests"]) == 4 and len(set(rank0["mask_digests"])) == 4, "one fresh mask per step"
    assert rank0["mask_digests"] == rank1["mask_digests"]
    # each process's own gradient, before the all-reduce, is zero exactly outside the step's mask
    for rank in (rank0, rank1):
        checks = rank["local_checks"]
        assert len(checks) == 4 * 12
        assert [check["step"] for check in checks] == sorted(check["step"] for check in checks)
        assert all(check["zero_outside_mask"] for check in checks)
        assert min(check["nonzero_inside"] for check in checks) > 0.9


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("task", TASKS)
def test_training_is_identical_on_both_processes_and_matches_one_process(results, references, task):
    rank0, rank1 = task_results(results, task)
    reference = references[task[-1]]
    assert rank0["state"].keys() == rank1["state"].keys()
    for name in rank0["state"]:
        assert torch.equal(rank0["state"][name], rank1["state"][name]), f"{task}: {name} differs between processes"
    state = {name.removeprefix("module."): tensor for name, tensor in rank0["state"].items()}
    assert set(state) == set(reference["state"]), set(state) ^ set(reference["state"])
    for name, tensor in reference["state"].items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=TOLERANCE, msg=f"{task}: {name}")
    if "positions" in rank0:
        assert_same_positions(rank0["positions"], reference["positions"])
    if "steps" in rank0:
        assert rank0["steps"] == reference["steps"] == 4


def test_trainer_on_two_processes(results, references):
    rank0, rank1 = task_results(results, "trainer_d")
    # the callback alone refuses to run the Fisher pass once the Trainer has wrapped the model in DDP
    for rank in (rank0, rank1):
        assert rank["refusal"] is not None and "prepare_child_network(trainer)" in rank["refusal"]
    # prepare_child_network before train(): one Fisher pass, scores summed over the processes
    assert rank0["fisher_passes"] == rank1["fisher_passes"] == 1
    assert_same_positions(rank0["positions"], rank1["positions"])
    assert_same_positions(rank0["positions"], references["d"]["positions"])
    assert rank0["summary"]["default"]["child_entries"] == sum(p.numel() for p in rank0["positions"].values())
    assert rank0["wrapper"] == "DistributedDataParallel" and rank0["global_step"] == 4
    for name in rank0["requires_grad"]:
        assert ".childtuning_values.default" in name or ".modules_to_save.default." in name, name


def test_fsdp_shards_the_child_values(results):
    for task in ("fsdp2_d", "fsdp2_f"):
        rank0, _ = task_results(results, task)
        assert "DTensor" in rank0["sharded_types"], rank0["sharded_types"]
    rank0, _ = task_results(results, "fsdp2_d")
    assert rank0["empty_child_tensors"], "the tiny model is expected to leave some tensors without child entries"
    assert not rank0["zero_element_parameters"]
