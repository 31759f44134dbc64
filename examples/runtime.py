"""What every example sets up before it starts working: torch's threads, output that reaches a log file as it
happens, and none of transformers' messages that are no news here.

Only the standard library is imported here, so that an example's ``--help`` answers at once; torch is imported by
:func:`configure`, after the arguments are parsed.

Threads: torch uses one thread per core by default. On a 2-core machine that another job is using too, those two
threads slow each other down: each operation waits for the thread that has no core at the moment. Measured on a
2-core virtual machine (MiniLM, one AdamW step at batch 16 x 40 tokens): 2 threads 0.46 s on the idle machine but 1.56 s beside
one busy process; 1 thread 0.78 s idle and 0.80 s beside it. So on machines with at most 2 cores the examples use
1 thread unless told otherwise (``--threads 2`` is faster on an idle machine); with more cores they keep torch's
default. ``OMP_NUM_THREADS``, where set, is the default instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Optional

_HANDLER_NAME = "examples: stdout"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which is a container's share), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average (runnable processes, on Linux those of the whole machine): what times depend on."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this system
        return float("nan")


def default_threads() -> Optional[int]:
    """``OMP_NUM_THREADS`` where it is set; else 1 on a machine with at most 2 cores; else None (torch's default)."""
    configured = os.environ.get("OMP_NUM_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return 1 if available_cores() <= 2 else None


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """The examples' ``--threads N`` option."""
    default = default_threads()
    parser.add_argument(
        "--threads",
        type=int,
        default=default,
        help=f"torch threads (default here: {default or 'one per core'}; 1 on machines with at most 2 cores, "
        "where 2 threads run twice as slow as 1 while another job uses a core; OMP_NUM_THREADS sets the default)",
    )


def configure(threads: Optional[int], loggers: Sequence[str] = ("peft_childtuning.fisher",)) -> int:
    """Set torch's threads, make stdout line-buffered, and print the INFO records of `loggers` (this package's
    progress lines) to stdout with the example's own output. Returns the number of torch threads.

    Line buffering: printed to a file or a pipe, stdout is otherwise written in blocks, so a log would show nothing
    of a long run until the end.
    """
    if threads is not None and threads < 1:
        raise SystemExit(f"--threads {threads}: give at least 1")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    handler = logging.StreamHandler(sys.stdout)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(existing.get_name() == _HANDLER_NAME for existing in logger.handlers):  # main() run twice
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # printed once, whatever the root logger does
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def quiet_transformers() -> None:
    """Hide what transformers and peft print that is not news for these examples: the load report of the new
    classifier head (MISSING, newly initialized: it is meant to be), the bars of loading the weights, and a
    deprecation warning that peft 0.21 triggers inside transformers 5."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
