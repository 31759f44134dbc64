"""Sharing Child-Tuning adapters on the Hugging Face Hub: push with our model card, pull with clear errors.

- `push_to_hub(model, "user/repo")` saves the adapter (``adapter_config.json``, ``adapter_model.safetensors``) with
  ``save_pretrained``, writes our model card (`model_card`) as ``README.md`` and uploads the three files in ONE commit
  with ``HfApi.create_repo(exist_ok=True)`` + ``HfApi.create_commit``. Files the Hub already has unchanged are not
  sent again, and if nothing changed no commit is made. ``PeftModel.push_to_hub`` (transformers' mixin) uploads the
  same adapter but replaces the card with transformers' generic template; use this function instead.
- The card that peft's ``save_pretrained`` writes, and with it transformers' ``Trainer.push_to_hub`` card, gets the
  ``child-tuning`` tag and the same loading note (`enable_peft_model_card`, done by ``import peft_childtuning``).
- ``PeftModel.from_pretrained(base, "user/repo", revision=...)`` works as is: an installed peft_childtuning registers
  itself when peft is imported (``peft_childtuning_autoload``; else ``import peft_childtuning`` first). It reports a
  missing repo, revision or file as a bare ``ValueError("Can't find 'adapter_config.json' at ...")`` that does not
  name the revision. `from_pretrained(base, "user/repo", revision=...)` here downloads both files of one commit
  first and raises `AdapterNotFoundError` naming the repo, revision, file and endpoint instead, with the Hub
  client's typed error (``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``EntryNotFoundError``) as its
  ``__cause__``.

Every call goes to ``huggingface_hub.constants.ENDPOINT`` (``HF_ENDPOINT``, read when huggingface_hub is imported).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from peft import PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from .config import ChildTuningConfig
from .model import tuned_tensors

__all__ = [
    "AdapterNotFoundError",
    "HubAdapterError",
    "HubPushError",
    "disable_peft_push_to_hub",
    "download_adapter",
    "enable_peft_model_card",
    "enable_peft_push_to_hub",
    "from_pretrained",
    "loading_note",
    "model_card",
    "push_to_hub",
    "with_loading_note",
]

PAPER_TITLE = "Raise a Child in Large Language Model: Towards Effective and Generalizable Fine-tuning"
PAPER_DOI = "10.18653/v1/2021.emnlp-main.749"
CITATION = """@inproceedings{xu-etal-2021-raise,
    title = "Raise a Child in Large Language Model: Towards Effective and Generalizable Fine-tuning",
    author = "Xu, Runxin and Luo, Fuli and Zhang, Zhiyuan and Tan, Chuanqi and Chang, Baobao and
              Huang, Songfang and Huang, Fei",
    booktitle = "Proceedings of the 2021 Conference on Empirical Methods in Natural Language Processing",
    month = nov,
    year = "2021",
    address = "Online and Punta Cana, Dominican Republic",
    publisher = "Association for Computational Linguistics",
    url = "https://aclanthology.org/2021.emnlp-main.749",
    doi = "10.18653/v1/2021.emnlp-main.749",
    pages = "9514--9528",
}"""

# peft task type -> (transformers auto class of the base model, Hub pipeline tag)
_TASKS = {
    "SEQ_CLS": ("AutoModelForSequenceClassification", "text-classification"),
    "TOKEN_CLS": ("AutoModelForTokenClassification", "token-classification"),
    "CAUSAL_LM": ("AutoModelForCausalLM", "text-generation"),
    "SEQ_2_SEQ_LM": ("AutoModelForSeq2SeqLM", None),
    "QUESTION_ANS": ("AutoModelForQuestionAnswering", "question-answering"),
    "FEATURE_EXTRACTION": ("AutoModel", "feature-extraction"),
}
# the card tags of a Child-Tuning adapter, besides peft's own
CARD_TAGS = ("child-tuning", "sparse-fine-tuning")
_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_BLOCK_PREFIX = re.compile(r"^.*?\.\d+\.")


class HubAdapterError(ValueError):
    """An adapter could not be downloaded from the Hub. A ValueError, like the errors of ``PeftModel.from_pretrained``.

    Attributes: ``repo_id``, ``revision``, ``filename`` (None when not about one file) and ``endpoint``. The Hub
    client's own exception is the ``__cause__``.
    """

    def __init__(self, message: str, repo_id: str, revision: Optional[str], filename: Optional[str], endpoint: str):
        super().__init__(message)
        self.repo_id, self.revision, self.filename, self.endpoint = repo_id, revision, filename, endpoint


class AdapterNotFoundError(HubAdapterError):
    """The repo, the revision or an adapter file does not exist (or the repo is private and no token was given)."""


class HubPushError(RuntimeError):
    """Pushing an adapter failed. Attributes ``repo_id``, ``revision``, ``endpoint``; the client's error is the
    ``__cause__``."""

    def __init__(self, message: str, repo_id: str, revision: Optional[str], endpoint: str):
        super().__init__(message)
        self.repo_id, self.revision, self.endpoint = repo_id, revision, endpoint


# ------------------------------------------------------------------------------------------------ model card
def _childtuning_config(peft_model: PeftModel, adapter_name: str) -> ChildTuningConfig:
    peft_config = getattr(peft_model, "peft_config", None)
    if not isinstance(peft_config, dict):
        raise TypeError(f"Expected a PeftModel with a Child-Tuning adapter, got {type(peft_model).__name__}.")
    if adapter_name not in peft_config:
        raise ValueError(f"The model has no adapter {adapter_name!r}; its adapters: {sorted(peft_config)}.")
    config = peft_config[adapter_name]
    if not isinstance(config, ChildTuningConfig):
        raise ValueError(
            f"Adapter {adapter_name!r} is a {config.peft_type} adapter, not a Child-Tuning one: push it with "
            "model.push_to_hub(...) instead."
        )
    return config


def _saved_adapter_bytes(peft_model: PeftModel, adapter_name: str) -> int:
    with tempfile.TemporaryDirectory(prefix="childtuning-card-") as tmp:
        folder = _save_adapter(peft_model, adapter_name, tmp)
        return os.path.getsize(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME))


def _module_summary(names: list[str]) -> str:
    """'attention.self.query, ..., output.dense (12 modules)': the tuned modules' names inside their block."""
    kinds = dict.fromkeys(_BLOCK_PREFIX.sub("", name) for name in names)
    return f"{', '.join(kinds)} ({len(names)} modules)"


def _hub_model_id(name: Optional[str]) -> Optional[str]:
    """`name` if it can be a Hub model id ("name" or "namespace/name"), None for a local path or nothing."""
    if not name or os.path.isabs(name) or name.startswith(".") or os.path.exists(name):
        return None
    return name if _HUB_ID.match(name) else None


def _modules_saved_whole(peft_model: PeftModel, adapter_name: str) -> list[str]:
    """The modules trained fully and saved whole with the adapter (e.g. a classifier head), by name in the base."""
    from peft.utils.other import ModulesToSaveWrapper

    names = []
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            names.append(name)
    return names


def _task(config: ChildTuningConfig) -> tuple[Optional[str], str, Optional[str]]:
    """(peft task type, transformers auto class of the base model, Hub pipeline tag) of an adapter."""
    task_type = str(config.task_type.value if hasattr(config.task_type, "value") else config.task_type or "") or None
    auto_class, pipeline_tag = _TASKS.get(task_type or "", ("AutoModel", None))
    return task_type, auto_class, pipeline_tag


def loading_note(
    peft_model: PeftModel,
    adapter_name: str = "default",
    *,
    repo_id: Optional[str] = None,
    base_model: Optional[str] = None,
) -> str:
    """The "How to use" section of a Child-Tuning adapter's model card: what makes peft know Child-Tuning (this
    package, which registers itself when peft is imported) and a loading snippet.

    Every card of ours carries it: `model_card`'s, and (through `enable_peft_model_card`) the card that peft's
    ``save_pretrained`` and transformers' ``Trainer.push_to_hub`` write. `repo_id` and `base_model` are as for
    `model_card`.
    """
    config = _childtuning_config(peft_model, adapter_name)
    base_model = base_model or config.base_model_name_or_path or None
    task_type, auto_class, _ = _task(config)
    base_config = getattr(peft_model.base_model.model, "config", None)
    num_labels = getattr(base_config, "num_labels", None) if task_type in ("SEQ_CLS", "TOKEN_CLS") else None
    load_line = (
        f'base = {auto_class}.from_pretrained("{base_model or "<the base model it was tuned from>"}"'
        + (f", num_labels={num_labels})" if num_labels else ")")
    )
    repo_text = repo_id or "<this repo>"
    return f"""## How to use

peft does not know Child-Tuning by itself: the `peft_childtuning` package teaches it. Install it (`pip install
peft_childtuning`): it then registers Child-Tuning whenever peft is imported, so `PeftModel.from_pretrained` and
`AutoPeftModelFor...` load this adapter as they are. Without the package peft fails with `KeyError: 'CHILDTUNING'`;
where its registration is switched off (`PEFT_CHILDTUNING_NO_AUTOLOAD=1`), import it before loading, as below.

```python
import peft_childtuning  # registers Child-Tuning with peft (done by itself at `import peft`, unless switched off)
from peft import PeftModel
from transformers import {auto_class}

{load_line}
model = PeftModel.from_pretrained(base, "{repo_text}")  # merged into the base weights at load
```

`peft_childtuning.hub.from_pretrained(base, "{repo_text}", revision=...)` does the same with errors that name a
missing repo, revision or file. The adapter checks the base weights' fingerprint when it is loaded: load it onto the
base it was tuned from. `is_trainable=True` loads it unmerged, to train it further.
"""


def model_card(
    peft_model: PeftModel,
    adapter_name: str = "default",
    *,
    repo_id: Optional[str] = None,
    adapter_bytes: Optional[int] = None,
    base_model: Optional[str] = None,
) -> str:
    """The model card (README.md text) of a Child-Tuning adapter.

    YAML front matter: ``library_name: peft``, ``base_model`` (the base's Hub id, when known), ``tags`` (``peft``,
    ``child-tuning``, ...) and the pipeline tag of the task. Body: the base model (its name, or its local path), the
    mode, ``reserve_p``, the child network's size, the adapter file's size, how to load it (`loading_note`) and the
    paper's citation.

    A base loaded from a local folder has its path as ``base_model_name_or_path``; the path is shown in the body and
    the loading snippet but kept out of the ``base_model`` metadata, which the Hub reads as a model id (links it in
    the model tree). Pass ``base_model="namespace/name"`` to name the Hub model it is a copy of.

    Args:
        peft_model: the PeftModel holding the adapter.
        adapter_name: which adapter.
        repo_id: the repo the card is for (used in the loading snippet).
        adapter_bytes: the size of ``adapter_model.safetensors``; measured by saving the adapter when not given.
        base_model: the base model's name or path (default: the adapter config's ``base_model_name_or_path``).
    """
    from huggingface_hub import ModelCardData

    import peft
    import transformers

    from . import __version__

    config = _childtuning_config(peft_model, adapter_name)
    base_model = base_model or config.base_model_name_or_path or None
    base_model_id = _hub_model_id(base_model)
    task_type, _, pipeline_tag = _task(config)
    if adapter_bytes is None:
        adapter_bytes = _saved_adapter_bytes(peft_model, adapter_name)

    tuned = list(tuned_tensors(peft_model.base_model.model, adapter_name))
    tuned_entries = sum(tensor.numel() for _, _, _, tensor in tuned)
    module_names = list(dict.fromkeys(layer.module_key for layer, _, _, _ in tuned))
    tensor_dtypes = sorted({str(tensor.dtype).replace("torch.", "") for _, _, _, tensor in tuned})

    tags = ["peft", *CARD_TAGS]
    if base_model_id:
        tags.append(f"base_model:adapter:{base_model_id}")
    data = ModelCardData(library_name="peft", base_model=base_model_id, tags=tags, pipeline_tag=pipeline_tag)

    if config.mode == "d":
        mode_text = (
            "`d` (task-driven): one fixed child network, the entries with the highest Fisher information on the task "
            "data, was trained" if config.selection == "fisher"
            else f"`d` (random child network, seed {config.seed}): one fixed random child network was trained"
        ) + "; every other entry equals the base weight"
        if config.child_sizes is not None:
            child_entries = sum(config.child_sizes.values())
            child_text = (
                f"{child_entries:,} of {tuned_entries:,} entries ({100.0 * child_entries / max(tuned_entries, 1):.2f}%)"
                f" in {len(config.child_sizes)} tensors"
            )
        else:
            child_text = "not chosen yet (the Fisher pass has not run)"
        storage = "the child entries' values and positions (a sparse diff against the base weights)"
    else:
        mode_text = (
            f"`f` (task-free): each step kept a fresh random {config.reserve_p:g} fraction of the gradients "
            f"(scaled by 1/{config.reserve_p:g})"
        )
        child_text = (
            f"a fresh random {100.0 * config.reserve_p:g}% of the {tuned_entries:,} targeted entries each step "
            "(no fixed child network)"
        )
        storage = "the full tuned tensors (mode f updates every entry over training)"

    rows = [
        ("Base model", (f"`{base_model}`" + ("" if base_model_id else " (a local path)")) if base_model
         else "not recorded"),
        ("Task type", f"`{task_type}`" if task_type else "not set"),
        ("Mode", mode_text),
        ("reserve_p", f"{config.reserve_p:g}"),
        ("Child network", child_text),
        ("Tuned modules", _module_summary(module_names) if module_names else "none"),
        ("Tuned weights' dtype", ", ".join(tensor_dtypes) or "n/a"),
        ("Also saved whole", ", ".join(f"`{m}`" for m in _modules_saved_whole(peft_model, adapter_name)) or "nothing"),
        ("Adapter file", f"`{SAFETENSORS_WEIGHTS_NAME}`, {adapter_bytes:,} bytes: {storage}"),
    ]
    table = "\n".join(["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in rows])
    body = f"""
# Child-Tuning adapter{f" for {base_model}" if base_model else ""}

A [Child-Tuning](https://doi.org/{PAPER_DOI}) adapter (Xu et al., EMNLP 2021), made with `peft_childtuning`, a
plugin for 🤗 PEFT. Child-Tuning fine-tunes only a *child network* of the pretrained weights. Loading the adapter for
inference merges it into the base weights, so the model runs as fast as the base model.

{table}

{loading_note(peft_model, adapter_name, repo_id=repo_id, base_model=base_model)}
## Framework versions

- peft_childtuning {__version__}
- PEFT {peft.__version__}
- Transformers {transformers.__version__}
- PyTorch {torch.__version__.split("+")[0]}

## Citation

Runxin Xu, Fuli Luo, Zhiyuan Zhang, Chuanqi Tan, Baobao Chang, Songfang Huang, Fei Huang. "{PAPER_TITLE}".
EMNLP 2021, pages 9514-9528. doi: [{PAPER_DOI}](https://doi.org/{PAPER_DOI})

```bibtex
{CITATION}
```
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


# ------------------------------------------------------------------------------------------------ push
def _save_adapter(peft_model: PeftModel, adapter_name: str, directory: str) -> str:
    """save_pretrained one adapter; return the folder holding its files (peft nests non-default adapters).

    The config is rewritten so that the same adapter always gives the same file: values that are sets (e.g.
    ``target_modules`` given as a list) sorted, as peft writes them in set order, which changes from one Python
    process to the next; ``modules_to_save`` without repeats, as peft's task models append the head's names to it
    again at every load.
    """
    peft_model.save_pretrained(directory, selected_adapters=[adapter_name])
    folder = directory if adapter_name == "default" else os.path.join(directory, adapter_name)
    config_path = os.path.join(folder, CONFIG_NAME)
    config = peft_model.peft_config[adapter_name]
    with open(config_path, encoding="utf-8") as file:
        saved = json.load(file)
    for key, value in saved.items():
        if isinstance(getattr(config, key, None), set) and isinstance(value, list):
            saved[key] = sorted(value, key=str)
    if isinstance(saved.get("modules_to_save"), list):  # peft appends the head's names again at every load
        saved["modules_to_save"] = list(dict.fromkeys(saved["modules_to_save"]))
    with open(config_path, "w", encoding="utf-8") as file:
        file.write(json.dumps(saved, indent=2, sort_keys=True))
    return folder


def push_to_hub(
    peft_model: PeftModel,
    repo_id: str,
    *,
    revision: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[str | bool] = None,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    create_pr: bool = False,
    adapter_name: str = "default",
    base_model: Optional[str] = None,
) -> CommitInfo:
    """Push a Child-Tuning adapter and its model card to the Hub in one commit.

    Saves the adapter with ``save_pretrained`` to a temporary folder, writes `model_card` as ``README.md``, creates
    the repo if needed (``private`` applies only then) and the branch ``revision`` if it does not exist, and commits
    ``adapter_config.json``, ``adapter_model.safetensors`` and ``README.md`` in a single commit: a reader sees the
    previous commit or the new one, never a mix. Files that are unchanged on the Hub are not uploaded again; when
    nothing changed, no commit is made and the returned `CommitInfo` names the current commit.

    Args:
        peft_model: a PeftModel with a Child-Tuning adapter (a mode-"d" adapter needs its child network).
        repo_id: ``"namespace/name"`` (or ``"name"``, in the token's own namespace).
        revision: the branch to commit to (default ``main``); created from ``main`` when missing.
        private: visibility of a repo created now.
        token: Hub token (default: the saved login / ``HF_TOKEN``).
        commit_message, commit_description: of the commit.
        create_pr: open a pull request with the commit instead of committing to the branch.
        adapter_name: the adapter to push; it is stored at the root of the repo, so it loads as ``"default"``.
        base_model: the Hub id of the base model, for the card (default: the config's ``base_model_name_or_path``).

    Returns:
        The `CommitInfo` of the commit (``.oid``, ``.commit_url``, ``.pr_url``).

    Raises:
        HubPushError: the Hub refused or failed a step (the client's error is the cause). When the commit call
            fails, the Hub has not published anything new: re-running the push retries it.
    """
    config = _childtuning_config(peft_model, adapter_name)
    if config.needs_fisher_pass:
        raise ValueError(
            f"Adapter {adapter_name!r} has no child network yet: run model.detect_child_network(dataloader) before "
            "pushing it."
        )
    api = HfApi(token=token)
    endpoint = api.endpoint
    branch = revision or constants.DEFAULT_REVISION
    with tempfile.TemporaryDirectory(prefix="childtuning-push-") as tmp:
        folder = _save_adapter(peft_model, adapter_name, tmp)
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
            if revision is not None and not create_pr and not revision.startswith("refs/"):
                api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        except Exception as error:
            raise HubPushError(
                f"Could not create or open the model repo {repo_id!r} (branch {branch!r}) on {endpoint}: {error}",
                repo_id, revision, endpoint,
            ) from error
        weights_bytes = os.path.getsize(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME))
        card = model_card(
            peft_model, adapter_name, repo_id=repo_id, adapter_bytes=weights_bytes, base_model=base_model
        )
        Path(folder, "README.md").write_text(card, encoding="utf-8")
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name))
            for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))
        ]
        message = commit_message or f"Upload Child-Tuning adapter (mode {config.mode}, reserve_p={config.reserve_p:g})"
        try:
            return api.create_commit(
                repo_id,
                operations,
                commit_message=message,
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
                token=token,
            )
        except Exception as error:
            raise HubPushError(
                f"Pushing the adapter to {repo_id!r} (branch {branch!r}) on {endpoint} failed: {error}\n"
                f"The Hub did not confirm a commit, so {branch!r} should still hold its previous files; push again to "
                "retry (files already on the Hub are not sent twice).",
                repo_id, revision, endpoint,
            ) from error


# ------------------------------------------------------------------------------------------------ pull
def _download_error(
    error: Exception, repo_id: str, revision: Optional[str], filename: str, endpoint: str
) -> HubAdapterError:
    """Our error for a failed hf_hub_download, naming the repo, revision and file."""
    rev = revision or constants.DEFAULT_REVISION
    if isinstance(error, RepositoryNotFoundError):
        return AdapterNotFoundError(
            f"There is no model repo {repo_id!r} on {endpoint} (or it is private or gated and no valid token was "
            "given): check the repo id and your token.",
            repo_id, revision, None, endpoint,
        )
    if isinstance(error, RevisionNotFoundError):
        return AdapterNotFoundError(
            f"The model repo {repo_id!r} on {endpoint} has no revision {rev!r} (no branch, tag or commit of that "
            "name).",
            repo_id, revision, None, endpoint,
        )
    if isinstance(error, LocalEntryNotFoundError):
        reason = (
            "offline mode is on (HF_HUB_OFFLINE=1)" if constants.is_offline_mode()
            else f"the Hub at {endpoint} could not be reached"
        )
        return HubAdapterError(
            f"Could not download {filename!r} of {repo_id!r} (revision {rev!r}): {reason}, and it is not in the local "
            "cache.",
            repo_id, revision, filename, endpoint,
        )
    if isinstance(error, EntryNotFoundError):
        return AdapterNotFoundError(
            f"The model repo {repo_id!r} on {endpoint} has no file {filename!r} at revision {rev!r}: it holds no PEFT "
            "adapter there (if the adapter is in a folder of the repo, pass subfolder=).",
            repo_id, revision, filename, endpoint,
        )
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else "an error"
        return HubAdapterError(
            f"The Hub at {endpoint} answered {status} when asked for {filename!r} of {repo_id!r} (revision {rev!r}).",
            repo_id, revision, filename, endpoint,
        )
    return HubAdapterError(
        f"Could not download {filename!r} of {repo_id!r} (revision {rev!r}) from {endpoint}: {error}",
        repo_id, revision, filename, endpoint,
    )


def _probe_commit(
    repo_id: str, filename: str, revision: Optional[str], token: Optional[str | bool], cache_dir: Any
) -> tuple[Optional[str], bool]:
    """(commit that `revision` points to, whether to read from the cache only), from one HEAD request.

    A missing repo, revision or file raises the client's typed error. When the Hub cannot be reached (or answers a
    server error), a cached copy is used as it is; without one, `HubAdapterError` is raised at once. (The download
    functions would first retry for about 25 s with backoff, which looks like a hang.)
    """
    try:
        metadata = get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision), token=token)
        return metadata.commit_hash, False
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
        raise
    except Exception as error:  # connection refused, timeout, 5xx, a proxy answering something else than the Hub
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
        if isinstance(cached, str):
            return None, True
        endpoint = constants.ENDPOINT
        reason = (
            f"the Hub at {endpoint} answered {error.response.status_code}"
            if isinstance(error, HfHubHTTPError) and error.response is not None
            else f"the Hub at {endpoint} could not be reached ({type(error).__name__}: {error})"
        )
        raise HubAdapterError(
            f"Could not download {filename!r} of {repo_id!r} (revision {revision or constants.DEFAULT_REVISION!r}): "
            f"{reason}, and it is not in the local cache.",
            repo_id, revision, filename, endpoint,
        ) from error


def download_adapter(
    repo_id: str,
    *,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
    token: Optional[str | bool] = None,
    cache_dir: Optional[str | os.PathLike] = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> str:
    """Download a PEFT adapter (config and weights of ONE commit) into the Hub cache; return its local folder.

    The weights are downloaded at the commit the config came from (`revision`: branch, tag, ``refs/pr/N`` or commit;
    default ``main``), so a push landing in between cannot pair the config of one version with the weights of
    another. Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``), or when the Hub cannot be reached, the
    cached copy is used.

    Raises:
        AdapterNotFoundError: no such repo, revision or file (``adapter_config.json``, ``adapter_model.safetensors``).
        HubAdapterError: the Hub cannot be reached and nothing is cached, or it answered another error.
        Both name the repo, revision and file, with the client's typed exception as ``__cause__``.
    """
    endpoint = constants.ENDPOINT
    config_name = f"{subfolder}/{CONFIG_NAME}" if subfolder else CONFIG_NAME
    commit = None
    if not (local_files_only or constants.is_offline_mode()):
        try:
            commit, local_files_only = _probe_commit(repo_id, config_name, revision, token, cache_dir)
        except (HfHubHTTPError, EntryNotFoundError) as error:
            raise _download_error(error, repo_id, revision, CONFIG_NAME, endpoint) from error
    kwargs: dict[str, Any] = dict(
        subfolder=subfolder, token=token, cache_dir=cache_dir, force_download=force_download,
        local_files_only=local_files_only,
    )
    try:  # by `revision`, not by commit: the cache then maps the revision to its commit, for offline use
        config_path = hf_hub_download(repo_id, CONFIG_NAME, revision=revision, **kwargs)
    except (HfHubHTTPError, EntryNotFoundError) as error:
        raise _download_error(error, repo_id, revision, CONFIG_NAME, endpoint) from error
    # the weights of the commit the config came from: .../snapshots/<commit>/[<subfolder>/]adapter_config.json
    snapshot = Path(config_path).parents[len(Path(subfolder).parts) if subfolder else 0]
    if snapshot.parent.name == "snapshots" and _COMMIT_HASH.match(snapshot.name):
        commit = snapshot.name
    pinned = commit or revision
    try:  # safetensors only: never a pickled adapter_model.bin, which can run code when it is loaded
        hf_hub_download(repo_id, SAFETENSORS_WEIGHTS_NAME, revision=pinned, **kwargs)
    except (HfHubHTTPError, EntryNotFoundError) as error:
        raise _download_error(error, repo_id, revision, SAFETENSORS_WEIGHTS_NAME, endpoint) from error
    return str(Path(config_path).parent)


def from_pretrained(
    model: torch.nn.Module,
    repo_id: str | os.PathLike,
    *,
    revision: Optional[str] = None,
    adapter_name: str = "default",
    is_trainable: bool = False,
    subfolder: Optional[str] = None,
    token: Optional[str | bool] = None,
    cache_dir: Optional[str | os.PathLike] = None,
    force_download: bool = False,
    local_files_only: bool = False,
    **kwargs: Any,
) -> PeftModel:
    """``PeftModel.from_pretrained(model, repo_id, ...)`` with errors that name a missing repo, revision or file.

    A local folder is loaded as it is. A Hub repo is downloaded with `download_adapter` (config and weights of the
    same commit) and then loaded from the cache; ``is_trainable=False`` merges it into the base at load. Other
    keyword arguments go to ``PeftModel.from_pretrained``.

    Raises:
        AdapterNotFoundError: no such repo, revision, ``adapter_config.json`` or adapter weights (a ValueError; the
            Hub client's typed error is its ``__cause__``).
        HubAdapterError: the Hub could not be reached (and nothing is cached) or answered another error.
    """
    local = os.fspath(repo_id)
    if os.path.isfile(os.path.join(local, subfolder or "", CONFIG_NAME)):
        if subfolder:
            kwargs["subfolder"] = subfolder
        return PeftModel.from_pretrained(model, local, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
    folder = download_adapter(
        local, revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir,
        force_download=force_download, local_files_only=local_files_only,
    )
    return PeftModel.from_pretrained(model, folder, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)


# ------------------------------------------------------------------------------------------------ PeftModel.push_to_hub wiring
_PUSH_ARGUMENTS = {"revision", "private", "token", "commit_message", "commit_description", "create_pr"}
_original_push_to_hub: Any = None
_push_to_hub_was_own_attribute = False


def _dispatching_push_to_hub(self: PeftModel, repo_id: str, **kwargs: Any) -> Any:
    """PeftModel.push_to_hub: `push_to_hub` (ours) for a Child-Tuning adapter, the original method otherwise."""
    adapter_name = kwargs.pop("adapter_name", None) or self.active_adapter
    if not isinstance(self.peft_config.get(adapter_name), ChildTuningConfig):
        return _original_push_to_hub(self, repo_id, **kwargs)
    kwargs.pop("max_shard_size", None)  # one small file: never sharded
    unexpected = sorted(set(kwargs) - _PUSH_ARGUMENTS)
    if unexpected:
        raise TypeError(f"push_to_hub() of a Child-Tuning adapter got unexpected arguments {unexpected}")
    return push_to_hub(self, repo_id, adapter_name=adapter_name, **kwargs)


def enable_peft_push_to_hub() -> None:
    """Make ``PeftModel.push_to_hub`` use `push_to_hub` (our card, one commit) for Child-Tuning adapters.

    ``import peft_childtuning`` calls it, so ``model.push_to_hub(repo)`` uploads our model card rather than
    transformers' template (which would replace it).

    Sets ``PeftModel.push_to_hub`` to a dispatcher that calls `push_to_hub` when the adapter pushed (the active one,
    or ``adapter_name=``) is a Child-Tuning adapter, and the original method (transformers' mixin) for any other.
    Idempotent; `disable_peft_push_to_hub` undoes it.
    """
    global _original_push_to_hub, _push_to_hub_was_own_attribute
    if PeftModel.__dict__.get("push_to_hub") is _dispatching_push_to_hub:
        return
    _push_to_hub_was_own_attribute = "push_to_hub" in PeftModel.__dict__
    _original_push_to_hub = PeftModel.push_to_hub
    PeftModel.push_to_hub = _dispatching_push_to_hub


def disable_peft_push_to_hub() -> None:
    """Restore the ``PeftModel.push_to_hub`` that `enable_peft_push_to_hub` replaced."""
    if PeftModel.__dict__.get("push_to_hub") is not _dispatching_push_to_hub:
        return
    if _push_to_hub_was_own_attribute:
        PeftModel.push_to_hub = _original_push_to_hub
    else:
        del PeftModel.push_to_hub


# ------------------------------------------------------------------------------------------------ peft's model card
# the loading note in a card written by peft or transformers lies between these, so that writing the card again (the
# Trainer does, after save_pretrained) replaces it instead of adding a second one
_NOTE_BEGIN = "<!-- peft_childtuning: how to load this adapter -->"
_NOTE_END = "<!-- end of peft_childtuning's note -->"
_NOTE_BLOCK = re.compile(re.escape(_NOTE_BEGIN) + r".*?" + re.escape(_NOTE_END) + r"\n?", re.DOTALL)
_original_create_or_update_model_card: Any = None


def _card_adapter(peft_model: PeftModel) -> Optional[str]:
    """The Child-Tuning adapter that a card of `peft_model` is about: an active one, else the first; None if none."""
    configs = peft_model.peft_config
    for name in [*peft_model.active_adapters, *configs]:
        if isinstance(configs.get(name), ChildTuningConfig):
            return name
    return None


def with_loading_note(card_text: str, note: str) -> str:
    """A card's text (below its metadata) with `note` between our markers: in place of the one it has, else before
    its first section (``## ...``, after the title and summary), else at its end."""
    block = f"{_NOTE_BEGIN}\n{note.strip()}\n{_NOTE_END}\n"
    if _NOTE_BLOCK.search(card_text):
        return _NOTE_BLOCK.sub(lambda _: block, card_text, count=1)
    section = re.search(r"^## ", card_text, re.MULTILINE)
    if section is None:
        return f"{card_text.rstrip()}\n\n{block}"
    return f"{card_text[:section.start()]}{block}\n{card_text[section.start():]}"


def _create_or_update_model_card(self: PeftModel, output_dir: str) -> None:
    """PeftModel.create_or_update_model_card, then, for a model with a Child-Tuning adapter, our tags and
    `loading_note` in the card."""
    from huggingface_hub import ModelCard

    _original_create_or_update_model_card(self, output_dir)
    adapter_name = _card_adapter(self)
    if adapter_name is None:
        return
    path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(path)
    card.data["tags"] = sorted(set(card.data.tags or []) | set(CARD_TAGS))
    card.text = with_loading_note(card.text, loading_note(self, adapter_name))
    card.save(path)


def enable_peft_model_card() -> None:
    """Make the model card that peft writes for a model with a Child-Tuning adapter carry our tags
    (`CARD_TAGS`) and `loading_note`.

    peft writes that card (``README.md``) in ``PeftModel.save_pretrained`` and, through transformers'
    ``Trainer.create_model_card``, over the card of ``Trainer.push_to_hub``: both call
    ``PeftModel.create_or_update_model_card``, which this wraps. ``import peft_childtuning`` calls it; idempotent.
    """
    global _original_create_or_update_model_card
    if PeftModel.__dict__.get("create_or_update_model_card") is _create_or_update_model_card:
        return
    _original_create_or_update_model_card = PeftModel.create_or_update_model_card
    PeftModel.create_or_update_model_card = _create_or_update_model_card
