"""Sharing adapters on the Hub, with the real huggingface_hub client against tests/hub_server.py on 127.0.0.1.

The server keeps repos in memory and is started and stopped by each test. The client runs in this process, pointed
at the server by `client_pointed_at` (huggingface_hub read HF_ENDPOINT when conftest imported it); one test runs
examples/share_on_hub.py in a subprocess with HF_ENDPOINT set, against the server started as a script.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_childtuning import ChildTuningConfig, ChildTuningLayer, hub
from peft_childtuning.hub import AdapterNotFoundError, HubAdapterError, HubPushError

from conftest import ARCHS, REPO_ROOT, peft_model, tiny_bert, trainable_parameters
from hub_server import HubServer, client_pointed_at, free_port

pytestmark = pytest.mark.filterwarnings(
    "ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning",  # inside the client's LFS upload
    "ignore:Could not find a config file in:UserWarning",  # peft's save_pretrained, offline, base named by Hub id
)

ARCH = ARCHS["bert"]
EXPECTED_FILES = {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"}
PAPER_DOI = "10.18653/v1/2021.emnlp-main.749"


# ------------------------------------------------------------------------------------------------ helpers
def train(model, steps=2, seed=21):
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model.train()
    for batch in ARCH.batches(steps, seed=seed):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


def trained(base=None, mode="d", **kwargs):
    """A tiny BERT with a trained Child-Tuning adapter (mode "d": a Fisher child network)."""
    model = peft_model(base if base is not None else tiny_bert(), mode=mode, reserve_p=0.3, seed=3,
                       task_type="SEQ_CLS", **kwargs)
    if model.peft_config["default"].needs_fisher_pass:
        model.detect_child_network(ARCH.batches(2, seed=20), progress=False)
    return train(model)


@torch.no_grad()
def logits(model):
    model.eval()
    return model(**BATCH).logits


BATCH = {key: value for key, value in ARCH.batches(1, seed=22)[0].items() if key != "labels"}


def merged_at_load(model):
    layers = [module for module in model.modules() if isinstance(module, ChildTuningLayer)]
    return bool(layers) and all(layer.merged for layer in layers)


def error_chain(error):
    """The exception and its __cause__ / __context__ ancestors."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


@pytest.fixture(params=["regular", "lfs"])
def upload_mode(request):
    return request.param


@pytest.fixture
def server(tmp_path, upload_mode):
    """A test Hub answering `upload_mode`, with this process's client pointed at it (own HF_HOME)."""
    with HubServer(upload_mode=upload_mode) as hub_server:
        with client_pointed_at(hub_server.url, tmp_path / "hf_home", disable_xet=upload_mode == "lfs"):
            yield hub_server
    assert not [call for call in hub_server.unhandled if "agent-harnesses" not in call], hub_server.unhandled


regular_only = pytest.mark.parametrize("upload_mode", ["regular"], indirect=True)


# ------------------------------------------------------------------------------------------------ push and pull
def test_push_then_pull_is_bit_identical_and_merged_at_load(server, upload_mode, tmp_path):
    model = trained()
    expected = logits(model)
    info = hub.push_to_hub(model, "user/ct")

    assert set(server.files("user/ct")) == EXPECTED_FILES
    assert server.head("user/ct") == info.oid
    entries = server.entries("user/ct")
    # the weights took the path of this upload mode: base64 in the commit, or the LFS batch API
    assert entries["adapter_model.safetensors"].is_lfs == (upload_mode == "lfs")
    assert not entries["README.md"].is_lfs and not entries["adapter_config.json"].is_lfs
    lfs_uploads = server.requests_to("lfs_upload")
    local = tmp_path / "local"
    model.save_pretrained(local)
    weights = (local / "adapter_model.safetensors").read_bytes()
    assert server.files("user/ct")["adapter_model.safetensors"] == weights  # exactly what save_pretrained writes
    if upload_mode == "lfs":
        assert [record.body_bytes for record in lfs_uploads] == [len(weights)]
    else:
        assert not lfs_uploads
    # the sparse format: values and encoded positions, far smaller than the tuned weights
    tensors = load_file(str(local / "adapter_model.safetensors"))
    assert any("childtuning_positions" in key for key in tensors)

    pulled = PeftModel.from_pretrained(tiny_bert(), "user/ct")
    assert merged_at_load(pulled)
    assert torch.equal(logits(pulled), expected)
    assert not torch.equal(logits(tiny_bert()), expected)  # the adapter does something

    pulled_pinned = hub.from_pretrained(tiny_bert(), "user/ct", revision=info.oid)
    assert merged_at_load(pulled_pinned)
    assert torch.equal(logits(pulled_pinned), expected)

    # a pulled (merged) adapter pushes back the same files: config and weights byte for byte
    hub.push_to_hub(pulled, "user/ct-copy")
    original, copied = server.files("user/ct"), server.files("user/ct-copy")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert copied[name] == original[name], name


def test_repush_unchanged_makes_no_commit_and_uploads_nothing(server, upload_mode):
    model = trained()
    first = hub.push_to_hub(model, "user/ct")
    history = server.commit_shas("user/ct")
    server.reset_log()

    again = hub.push_to_hub(model, "user/ct")
    assert again.oid == first.oid
    assert server.commit_shas("user/ct") == history
    assert not server.requests_to("commit", "lfs_upload")

    # the saved config lists set-valued fields (target_modules given as a list) in a fixed order: a push from
    # another process, where the set iterates in another order, is still "unchanged"
    class ReversedSet(set):
        def __iter__(self):
            return iter(sorted(set.__iter__(self), reverse=True))

    model_with_list = trained(target_modules=["query", "key", "value", "intermediate.dense"])
    config = model_with_list.peft_config["default"]
    config.target_modules = ReversedSet(config.target_modules)
    pushed = hub.push_to_hub(model_with_list, "user/ct-list")
    saved = json.loads(server.files("user/ct-list")["adapter_config.json"])
    assert saved["target_modules"] == sorted(saved["target_modules"])
    config.target_modules = set(config.target_modules)
    assert hub.push_to_hub(model_with_list, "user/ct-list").oid == pushed.oid


@regular_only
def test_repush_changed_makes_a_commit_and_revision_loads_the_older_one(server):
    model = trained()
    v1_logits = logits(model)
    v1 = hub.push_to_hub(model, "user/ct", commit_message="v1")
    train(model, steps=1, seed=30)
    v2_logits = logits(model)
    assert not torch.equal(v1_logits, v2_logits)

    v2 = hub.push_to_hub(model, "user/ct", commit_message="v2")
    assert v2.oid != v1.oid
    assert server.commit_shas("user/ct")[:2] == [v2.oid, v1.oid]
    # only the changed file went into the commit (same child network and size: config and card unchanged)
    assert server.commit_log[-1] == ("user/ct", v2.oid, ["adapter_model.safetensors"])
    assert [commit.title for commit in HfApi().list_repo_commits("user/ct")][:2] == ["v2", "v1"]

    assert torch.equal(logits(PeftModel.from_pretrained(tiny_bert(), "user/ct")), v2_logits)
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_bert(), "user/ct", revision=v1.oid)), v1_logits)
    assert torch.equal(logits(hub.from_pretrained(tiny_bert(), "user/ct", revision=v1.oid)), v1_logits)


@regular_only
def test_push_to_a_branch_and_as_a_pull_request(server):
    model = trained()
    main = hub.push_to_hub(model, "user/ct")
    main_logits = logits(model)
    train(model, steps=1, seed=31)
    branch_logits = logits(model)

    on_branch = hub.push_to_hub(model, "user/ct", revision="experiment")  # the branch is created from main
    assert server.head("user/ct", "experiment") == on_branch.oid
    assert server.head("user/ct") == main.oid
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_bert(), "user/ct", revision="experiment")), branch_logits)
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_bert(), "user/ct")), main_logits)

    pr = hub.push_to_hub(model, "user/ct", create_pr=True)
    assert pr.pr_url is not None and pr.pr_revision == "refs/pr/1"
    assert server.head("user/ct") == main.oid
    assert torch.equal(logits(hub.from_pretrained(tiny_bert(), "user/ct", revision="refs/pr/1")), branch_logits)


@regular_only
def test_push_a_non_default_adapter_stores_it_at_the_root(server):
    model = trained()
    other = ChildTuningConfig(mode="d", selection="random", reserve_p=0.2, seed=5, task_type="SEQ_CLS")
    model.add_adapter("other", other)
    model.set_adapter("other")
    train(model, steps=1, seed=32)
    other_logits = logits(model)
    hub.push_to_hub(model, "user/other", adapter_name="other")
    assert set(server.files("user/other")) == EXPECTED_FILES
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_bert(), "user/other")), other_logits)


# ------------------------------------------------------------------------------------------------ the model card
@regular_only
def test_pushed_model_card_is_ours_and_its_snippet_loads_the_adapter(server, tmp_path):
    base_dir = tmp_path / "tiny-bert"
    tiny_bert().save_pretrained(base_dir)
    from transformers import AutoModelForSequenceClassification

    model = trained(base=AutoModelForSequenceClassification.from_pretrained(base_dir))
    expected = logits(model)
    hub.push_to_hub(model, "user/card")

    readme = server.files("user/card")["README.md"].decode()
    assert readme in server.validated_cards  # the Hub validated its metadata (and accepted it)
    assert readme == hub.model_card(model, repo_id="user/card")
    card = ModelCard(readme)
    assert card.data.library_name == "peft"
    assert {"peft", "child-tuning"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local path is no Hub model id: only in the body
    assert str(base_dir) in card.text
    info = HfApi().model_info("user/card")
    assert info.library_name == "peft" and "child-tuning" in info.tags

    # the loading snippet works as written (against this Hub), importing peft_childtuning first
    snippet = re.search(r"```python\n(.*?)```", card.text, re.DOTALL).group(1)
    assert snippet.index("import peft_childtuning") < snippet.index("PeftModel.from_pretrained")
    namespace = {}
    exec(compile(snippet, "model-card-snippet", "exec"), namespace)
    assert torch.equal(logits(namespace["model"]), expected)


def test_model_card_content(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # saving asks the Hub whether the base's config.json exists
    base = tiny_bert()
    base.name_or_path = "prajjwal1/bert-tiny"
    model = trained(base=base)
    config = model.peft_config["default"]
    card_text = hub.model_card(model, repo_id="user/card")
    card = ModelCard(card_text)
    assert card.data.library_name == "peft"
    assert card.data.base_model == "prajjwal1/bert-tiny"
    assert {"peft", "child-tuning", "base_model:adapter:prajjwal1/bert-tiny"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-classification"

    child = sum(config.child_sizes.values())
    layers = [module for module in model.modules() if isinstance(module, ChildTuningLayer)]
    tuned = sum(layer.get_base_layer().weight.numel() for layer in layers)
    assert f"{child:,} of {tuned:,} entries" in card.text
    assert "| Mode | `d` (task-driven)" in card.text and "Fisher information" in card.text
    assert "| reserve_p | 0.3 |" in card.text
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        size = os.path.getsize(os.path.join(tmp, "adapter_model.safetensors"))
    assert f"`adapter_model.safetensors`, {size:,} bytes" in card.text
    assert 'from_pretrained("prajjwal1/bert-tiny", num_labels=2)' in card.text
    assert 'PeftModel.from_pretrained(base, "user/card")' in card.text
    assert "Raise a Child in Large Language Model: Towards Effective and Generalizable Fine-tuning" in card.text
    assert PAPER_DOI in card.text and "EMNLP" in card.text

    mode_f = hub.model_card(trained(mode="f"))
    assert "| Mode | `f` (task-free)" in mode_f and "no fixed child network" in mode_f
    assert "<this repo>" in mode_f and "base_model:" not in mode_f.split("---")[1]


@regular_only
def test_trainer_push_to_hub_card_carries_our_tag_and_loading_note(server, tmp_path):
    """transformers' Trainer.push_to_hub uploads its own template card; for a Child-Tuning adapter that card (written
    by save_pretrained, then again by Trainer.create_model_card) carries our tags and loading note, once."""
    from transformers import Trainer, TrainingArguments

    model = trained()
    expected = logits(model)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), hub_model_id="user/trainer-ct", report_to=[],
                             use_cpu=True)
    Trainer(model=model, args=args).push_to_hub(commit_message="End of training")

    readme = server.files("user/trainer-ct")["README.md"].decode()
    assert readme in server.validated_cards
    card = ModelCard(readme)
    assert "model-index" in card.data.to_dict() and "The following hyperparameters" in card.text  # the Trainer's
    assert card.data.library_name == "peft"
    assert set(hub.CARD_TAGS) <= set(card.data.tags)
    assert "child-tuning" in HfApi().model_info("user/trainer-ct").tags
    assert card.text.count("## How to use") == 1
    assert hub.loading_note(model).strip() in card.text
    assert card.text.index("## How to use") < card.text.index("## Training procedure")  # near the top
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_bert(), "user/trainer-ct")), expected)


def test_saved_card_carries_the_note_for_child_tuning_only(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path / "ct")
    model.save_pretrained(tmp_path / "ct")  # saving again replaces the note rather than adding one
    card = ModelCard.load(tmp_path / "ct" / "README.md")
    assert set(hub.CARD_TAGS) <= set(card.data.tags)
    assert card.text.count("## How to use") == 1 and hub.loading_note(model).strip() in card.text

    lora = get_peft_model(tiny_bert(), LoraConfig(target_modules=["query"], task_type="SEQ_CLS"))
    lora.save_pretrained(tmp_path / "lora")
    card = ModelCard.load(tmp_path / "lora" / "README.md")
    assert "child-tuning" not in (card.data.tags or []) and "peft_childtuning" not in card.text


# ------------------------------------------------------------------------------------------------ errors
@regular_only
def test_missing_repo_revision_and_file_name_what_is_missing(server):
    hub.push_to_hub(trained(), "user/ct")
    api = HfApi()
    api.create_repo("user/no-adapter")
    api.upload_file(path_or_fileobj=b"# not an adapter\n", path_in_repo="README.md", repo_id="user/no-adapter")
    api.create_repo("user/no-weights")
    config = server.files("user/ct")["adapter_config.json"]
    api.upload_file(path_or_fileobj=config, path_in_repo="adapter_config.json", repo_id="user/no-weights")

    cases = [  # repo, revision, our error's words, the typed error
        ("user/missing", None, ["'user/missing'", server.url], RepositoryNotFoundError),
        ("user/ct", "no-such-branch", ["'user/ct'", "'no-such-branch'"], RevisionNotFoundError),
        ("user/no-adapter", None, ["'user/no-adapter'", "'adapter_config.json'", "'main'"], EntryNotFoundError),
        ("user/no-weights", None, ["'user/no-weights'", "'adapter_model.safetensors'"], EntryNotFoundError),
    ]
    for repo_id, revision, words, typed in cases:
        start = time.monotonic()
        with pytest.raises(AdapterNotFoundError) as raised:
            hub.from_pretrained(tiny_bert(), repo_id, revision=revision)
        assert time.monotonic() - start < 10
        error = raised.value
        assert isinstance(error, ValueError)  # as peft's own errors are
        assert all(word in str(error) for word in words), (str(error), words)
        assert isinstance(error.__cause__, typed), repr(error.__cause__)
        assert (error.repo_id, error.revision) == (repo_id, revision)

        # peft's own loader: a ValueError, with the typed error kept in the chain
        with pytest.raises(ValueError) as raised:
            PeftModel.from_pretrained(tiny_bert(), repo_id, revision=revision)
        assert repo_id in str(raised.value)
        assert any(isinstance(link, typed) for link in error_chain(raised.value)), error_chain(raised.value)


def test_unreachable_hub_fails_fast_with_a_clear_error(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    with client_pointed_at(endpoint, tmp_path / "hf_home"):
        start = time.monotonic()
        with pytest.raises(HubAdapterError) as raised:
            hub.from_pretrained(tiny_bert(), "user/ct")
        assert "could not be reached" in str(raised.value) and endpoint in str(raised.value)
        with pytest.raises(HubPushError) as pushed:
            hub.push_to_hub(trained(), "user/ct")
        assert "'user/ct'" in str(pushed.value) and endpoint in str(pushed.value)
        assert pushed.value.__cause__ is not None
        assert time.monotonic() - start < 10


@regular_only
def test_hub_down_uses_the_cached_copy_at_once(server):
    model = trained()
    hub.push_to_hub(model, "user/ct")
    hub.from_pretrained(tiny_bert(), "user/ct")  # fills the cache
    server.fail("resolve", status=503, times=None)
    start = time.monotonic()
    assert torch.equal(logits(hub.from_pretrained(tiny_bert(), "user/ct")), logits(model))
    assert time.monotonic() - start < 10  # no retries with backoff first
    with pytest.raises(HubAdapterError, match="answered 503") as raised:
        hub.from_pretrained(tiny_bert(), "user/not-cached")
    assert isinstance(raised.value.__cause__, HfHubHTTPError)


@regular_only
def test_failed_commit_publishes_nothing(server):
    model = trained()
    v1_logits = logits(model)
    v1 = hub.push_to_hub(model, "user/ct")
    train(model, steps=1, seed=33)

    server.fail("commit", status=500)
    with pytest.raises(HubPushError) as raised:
        hub.push_to_hub(model, "user/ct")
    assert "'user/ct'" in str(raised.value) and "'main'" in str(raised.value)
    assert isinstance(raised.value.__cause__, HfHubHTTPError)
    assert raised.value.__cause__.response.status_code == 500
    assert server.commit_shas("user/ct")[0] == v1.oid and len(server.commit_shas("user/ct")) == 2
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_bert(), "user/ct")), v1_logits)

    retried = hub.push_to_hub(model, "user/ct")  # the fault is gone: the retry commits
    assert retried.oid != v1.oid
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_bert(), "user/ct")), logits(model))


@pytest.mark.parametrize("upload_mode", ["lfs"], indirect=True)
def test_failed_lfs_upload_publishes_nothing(server):
    model = trained()
    v1_logits = logits(model)
    v1 = hub.push_to_hub(model, "user/ct")
    train(model, steps=1, seed=34)

    server.fail("lfs_upload", status=507, times=None)  # storage full (a status the client does not retry)
    with pytest.raises(HubPushError) as raised:
        hub.push_to_hub(model, "user/ct")
    assert any(isinstance(link, HfHubHTTPError) for link in error_chain(raised.value))
    assert server.requests_to("lfs_upload")
    assert [record.status for record in server.requests_to("commit")] == [200]  # v1's: the failed push never commits
    assert server.commit_shas("user/ct")[0] == v1.oid
    assert torch.equal(logits(hub.from_pretrained(tiny_bert(), "user/ct")), v1_logits)


@regular_only
def test_config_and_weights_come_from_one_commit(server):
    """A push landing between the two downloads must not pair the old config with the new weights, or v.v."""
    model = trained()
    v1_logits = logits(model)
    v1 = hub.push_to_hub(model, "user/ct")
    train(model, steps=1, seed=35)
    v2 = hub.push_to_hub(model, "user/ct", revision="next")
    repo = server.repo("user/ct")

    def move_main_after_config(record):
        if record.method == "GET" and record.path.endswith("/adapter_config.json"):
            repo.branches["main"] = v2.oid

    server.after_request = move_main_after_config
    assert torch.equal(logits(hub.from_pretrained(tiny_bert(), "user/ct")), v1_logits)
    assert server.head("user/ct") == v2.oid  # main did move in between
    assert v1.oid != v2.oid


def test_push_refuses_an_adapter_without_its_child_network(tmp_path):
    model = peft_model(tiny_bert(), mode="d", reserve_p=0.3, task_type="SEQ_CLS")
    with HubServer() as hub_server, client_pointed_at(hub_server.url, tmp_path / "hf_home"):
        with pytest.raises(ValueError, match="detect_child_network"):
            hub.push_to_hub(model, "user/ct")
        assert not hub_server.requests


# ------------------------------------------------------------------------------------------------ PeftModel.push_to_hub
@regular_only
def test_peft_model_push_to_hub_uses_our_card_for_child_tuning_only(server):
    """`import peft_childtuning` routes PeftModel.push_to_hub to ours for Child-Tuning adapters, not other tuners."""
    model = trained()
    expected = logits(model)
    model.push_to_hub("user/wired", commit_message="wired")
    readme = server.files("user/wired")["README.md"].decode()
    assert readme == hub.model_card(model, repo_id="user/wired")
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_bert(), "user/wired")), expected)
    # another tuner still goes through transformers' mixin
    lora = get_peft_model(tiny_bert(), LoraConfig(target_modules=["query"], task_type="SEQ_CLS"))
    lora.push_to_hub("user/lora")
    assert ModelCard(server.files("user/lora")["README.md"].decode()).data.library_name == "transformers"

    # without the wiring, transformers' mixin uploads a loadable adapter but replaces the card with its template
    hub.disable_peft_push_to_hub()
    try:
        assert "push_to_hub" not in PeftModel.__dict__
        model.push_to_hub("user/mixin")
        assert torch.equal(logits(PeftModel.from_pretrained(tiny_bert(), "user/mixin")), expected)
        assert ModelCard(server.files("user/mixin")["README.md"].decode()).data.library_name == "transformers"
    finally:
        hub.enable_peft_push_to_hub()
    assert PeftModel.__dict__["push_to_hub"] is hub._dispatching_push_to_hub


# ------------------------------------------------------------------------------------------------ the server itself
@regular_only
def test_server_serves_snapshot_download_and_rejects_bad_card_metadata(server):
    hub.push_to_hub(trained(), "user/ct")
    folder = snapshot_download("user/ct")
    assert set(os.listdir(folder)) == EXPECTED_FILES
    assert [f.path for f in HfApi().list_repo_tree("user/ct")] == sorted(EXPECTED_FILES)
    with pytest.raises(ValueError, match="Invalid metadata"):
        HfApi().upload_file(path_or_fileobj=b"---\ntags: {a: [\n---\n", path_in_repo="README.md", repo_id="user/ct")
    assert len(server.commit_shas("user/ct")) == 2


# ------------------------------------------------------------------------------------------------ the example
def test_example_script_against_the_script_server(tmp_path):
    """examples/share_on_hub.py with HF_ENDPOINT set, against `python3 tests/hub_server.py --port 0`."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HUB_DISABLE_XET")}
    server = subprocess.Popen(
        [sys.executable, os.path.join(REPO_ROOT, "tests", "hub_server.py"), "--port", "0"],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        endpoint = re.search(r"http://[\d.]+:\d+", server.stdout.readline()).group(0)
        env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=REPO_ROOT)
        result = subprocess.run(
            [sys.executable, os.path.join(REPO_ROOT, "examples", "share_on_hub.py"), "--repo", "user/demo",
             "--steps", "3"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        summary = json.loads(result.stdout[result.stdout.index("{"):])
        assert summary["endpoint"] == endpoint
        assert summary["pulled_identical"] and summary["merged_at_load"] and summary["repush_made_no_commit"]
        assert summary["card_library_name"] == "peft" and "child-tuning" in summary["card_tags"]
        with urllib.request.urlopen(f"{endpoint}/api/models/user/demo/commits/main", timeout=10) as answer:
            commits = json.load(answer)
        assert len(commits) == 2 and commits[0]["id"] == summary["commit"]  # the push; the re-push made none
    finally:
        server.terminate()
        server.wait(timeout=10)
