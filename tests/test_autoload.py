"""An installed peft_childtuning registers itself when peft is imported, so saved adapters load with peft alone.

The wheel and the editable wheel (``pip install .``, ``pip install -e .``) are built with the project's build backend
from a copy of this checkout and unpacked into folders that a fresh interpreter adds as site directories
(`site.addsitedir`, which runs their ``.pth`` files exactly as start-up does for site-packages). That interpreter
never imports peft_childtuning itself: it loads adapters saved here with ``PeftModel.from_pretrained``,
``AutoPeftModelFor...`` and transformers' loader, and must give the outputs of the trained models bit for bit.
Switched off (``PEFT_CHILDTUNING_NO_AUTOLOAD=1``), or with ``import peft_childtuning`` failing, loading must fail with
an error that names the package and the fix, and ``import peft`` must still work.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import ARCHS, REPO_ROOT, peft_model, tiny_bert, tiny_llama, train_steps, trainable_parameters

PTH_NAME = "peft_childtuning_autoload.pth"
# what the built wheels are made from: the files pyproject.toml and the build backend read
PROJECT_FILES = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "peft_childtuning_autoload.py", PTH_NAME)
PROJECT_DIRS = ("peft_childtuning", "build_backend")


# ------------------------------------------------------------------------------------------------ fixtures
@dataclass
class Saved:
    """Adapters saved with their bases (each config's base_model_name_or_path is the base's folder), the inputs and
    the trained models' outputs (``expected.pt``)."""

    root: Path
    bert_base: str
    bert_adapter: str
    llama_base: str
    llama_adapter: str
    expected: str


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    root = tmp_path_factory.mktemp("autoload_adapters")
    bert_base, llama_base = str(root / "bert-base"), str(root / "llama-base")
    tiny_bert(seed=0).save_pretrained(bert_base)
    tiny_llama(seed=0).save_pretrained(llama_base)
    expected = {}

    bert = peft_model(AutoModelForSequenceClassification.from_pretrained(bert_base), mode="d", reserve_p=0.3,
                      task_type="SEQ_CLS", seed=3)
    bert.detect_child_network(ARCHS["bert"].batches(2, seed=20), progress=False)
    llama = peft_model(AutoModelForCausalLM.from_pretrained(llama_base), mode="f", reserve_p=0.3,
                       task_type="CAUSAL_LM", seed=3)
    for name, model in (("bert", bert), ("llama", llama)):
        train_steps(model, torch.optim.AdamW(trainable_parameters(model), lr=1e-2), ARCHS[name].batches(2, seed=21))
        model.eval()
        model.save_pretrained(str(root / f"{name}-adapter"))
        batch = {k: v for k, v in ARCHS[name].batches(1, seed=22)[0].items() if k != "labels"}
        with torch.no_grad():
            expected[name] = {"batch": batch, "logits": model(**batch).logits}
    torch.save(expected, root / "expected.pt")
    return Saved(root, bert_base, str(root / "bert-adapter"), llama_base, str(root / "llama-adapter"),
                 str(root / "expected.pt"))


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"wheel": path, "editable": path, "project": the copy of the checkout they were built from, by the project's
    backend (as pip does)}."""
    root = tmp_path_factory.mktemp("autoload_wheels")
    project = root / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        shutil.copy2(os.path.join(REPO_ROOT, name), project / name)
    for name in PROJECT_DIRS:
        shutil.copytree(os.path.join(REPO_ROOT, name), project / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = (
        "import json, sys\n"
        "sys.path.insert(0, 'build_backend')  # pyproject.toml's backend-path\n"
        "import peft_childtuning_backend as backend\n"
        "dist = sys.argv[1]  # read first: setuptools rewrites sys.argv while it builds\n"
        "print(json.dumps([backend.build_wheel(dist), backend.build_editable(dist)]))\n"
    )
    result = subprocess.run([sys.executable, "-c", build, str(root / "dist")], cwd=project, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    wheel, editable = json.loads(result.stdout.strip().splitlines()[-1])
    return {"wheel": root / "dist" / wheel, "editable": root / "dist" / editable, "project": project}


def unpacked(wheel: Path, destination: Path) -> str:
    """The wheel's files in `destination`, as pip installs them into site-packages (its root is purelib)."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(destination)
    return str(destination)


# the fresh interpreter (python -S: no site-packages processed at start): adds the site directories, then the paths
# of the dependencies as plain entries, imports peft (never peft_childtuning) and loads the adapters
SCRIPT = r"""
import json, site, sys, threading, warnings

args = json.loads(sys.argv[1])
for directory in args["site_dirs"]:
    site.addsitedir(directory)  # runs the folder's .pth files, as start-up does for site-packages
sys.path.extend(path for path in args["paths"] if path not in sys.path)
result = {
    "imported_at_start": sorted(n for n in ("torch", "transformers", "peft", "peft_childtuning") if n in sys.modules),
    "hook_installed": any(type(f).__name__ == "_PeftImportFinder" for f in sys.meta_path),
}
if args["break_import"]:
    sys.modules["peft_childtuning"] = None  # `import peft_childtuning` raises ModuleNotFoundError

# several threads import peft at once: each must find Child-Tuning registered as soon as its import returns
registered, barrier = [], threading.Barrier(4)
def import_peft():
    barrier.wait()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    registered.append("CHILDTUNING" in PEFT_TYPE_TO_CONFIG_MAPPING)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    threads = [threading.Thread(target=import_peft) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
import peft
result["registered_in_threads"] = registered
result["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
result["hook_left_meta_path"] = not any(type(f).__name__ == "_PeftImportFinder" for f in sys.meta_path)
result["peft_loader"] = type(peft.__spec__.loader).__name__
result["peft_childtuning_from"] = getattr(sys.modules.get("peft_childtuning"), "__file__", None)

import torch
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

expected = torch.load(args["expected"])
loaders = {
    "PeftModel.from_pretrained": ("bert", lambda: PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(args["bert_base"]), args["bert_adapter"])),
    "AutoPeftModelForSequenceClassification": ("bert", lambda: AutoPeftModelForSequenceClassification.from_pretrained(
        args["bert_adapter"])),
    "AutoPeftModelForCausalLM": ("llama", lambda: AutoPeftModelForCausalLM.from_pretrained(args["llama_adapter"])),
    "transformers AutoModelForCausalLM": ("llama", lambda: AutoModelForCausalLM.from_pretrained(
        args["llama_adapter"])),
}
result["loads"] = {}
for name, (arch, load) in loaders.items():
    try:
        model = load().eval()
    except Exception as error:
        result["loads"][name] = {
            "error": type(error).__name__, "is_key_error": isinstance(error, KeyError), "message": str(error),
            "cause": type(error.__cause__).__name__ if error.__cause__ is not None else None,
        }
        continue
    with torch.no_grad():
        logits = model(**expected[arch]["batch"]).logits
    result["loads"][name] = {"identical": torch.equal(logits, expected[arch]["logits"])}
if args["then_import"]:  # registering by hand still works after the failed loads
    import peft_childtuning
    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(args["bert_base"]), args["bert_adapter"]).eval()
    with torch.no_grad():
        result["after_import_identical"] = torch.equal(
            model(**expected["bert"]["batch"]).logits, expected["bert"]["logits"])
print("RESULT " + json.dumps(result))
"""


def dependency_paths() -> list[str]:
    """This interpreter's import paths but the checkout's root (which holds our modules): where torch, peft and
    transformers come from."""
    return [path for path in sys.path if path and os.path.isdir(path) and os.path.abspath(path) != REPO_ROOT]


def run_fresh(saved: Saved, site_dirs: list[str], cwd: Path, *, disabled: bool = False, break_import: bool = False,
              then_import: bool = False) -> dict:
    """Run SCRIPT in a fresh interpreter, offline, from `cwd`. Only the site directories provide our modules: with
    ``-S`` this environment's site-packages are plain path entries, so their ``.pth`` files (this checkout's own
    editable install, say) do not run."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PEFT_CHILDTUNING_NO_AUTOLOAD")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if disabled:
        env["PEFT_CHILDTUNING_NO_AUTOLOAD"] = "1"
    args = dict(site_dirs=site_dirs, paths=dependency_paths(), break_import=break_import, then_import=then_import,
                expected=saved.expected, bert_base=saved.bert_base, bert_adapter=saved.bert_adapter,
                llama_adapter=saved.llama_adapter)
    result = subprocess.run([sys.executable, "-S", "-c", SCRIPT, json.dumps(args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def assert_cheap_start_and_clean_hook(result: dict) -> None:
    assert result["imported_at_start"] == []  # the .pth imports neither torch nor peft nor us
    assert result["hook_installed"]
    assert result["hook_left_meta_path"]
    assert result["peft_loader"] == "SourceFileLoader"  # peft's own loader is back on its spec


# ------------------------------------------------------------------------------------------------ the wheels
def record_entry(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest},{len(data)}"


@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_both_wheels_install_the_pth_into_site_packages(wheels, kind):
    pth = Path(REPO_ROOT, PTH_NAME).read_bytes()
    assert pth.startswith(b"import ") and pth.count(b"\n") == 1  # one line that site.py executes
    with zipfile.ZipFile(wheels[kind]) as archive:
        names = archive.namelist()
        assert PTH_NAME in names  # at the root: installed into site-packages itself
        assert archive.read(PTH_NAME) == pth
        record = archive.read(next(n for n in names if n.endswith(".dist-info/RECORD"))).decode()
        # listed with its hash and size (pip checks them, and uninstalls what RECORD lists), RECORD's own line last
        assert f"{PTH_NAME},{record_entry(pth)}" in record.splitlines()
        assert record.splitlines()[-1].endswith("RECORD,,")
        assert archive.testzip() is None
        if kind == "wheel":
            hook = Path(REPO_ROOT, "peft_childtuning_autoload.py").read_bytes()
            assert archive.read("peft_childtuning_autoload.py") == hook
        else:  # the editable finder maps the hook module to the source tree, next to the package
            finder = next(n for n in names if n.startswith("__editable___") and n.endswith("_finder.py"))
            assert "peft_childtuning_autoload" in archive.read(finder).decode()
            # site runs .pth files in name order: the editable finder's is first, so the hook module is importable
            editable_pth = next(n for n in names if n.startswith("__editable__.") and n.endswith(".pth"))
            assert sorted([PTH_NAME, editable_pth])[0] == editable_pth


# ------------------------------------------------------------------------------------------------ fresh interpreters
@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_a_fresh_interpreter_loads_adapters_without_importing_us(saved, wheels, kind, tmp_path):
    site_dir = unpacked(wheels[kind], tmp_path / "site-packages")
    result = run_fresh(saved, [site_dir], tmp_path)

    assert_cheap_start_and_clean_hook(result)
    assert result["registered_in_threads"] == [True] * 4
    assert result["warnings"] == []
    # the package itself: from the wheel, or (editable) from the source tree the wheel was built from
    assert result["peft_childtuning_from"].startswith(site_dir if kind == "wheel" else str(wheels["project"]))
    assert result["loads"] == {name: {"identical": True} for name in result["loads"]}
    assert len(result["loads"]) == 4


def test_switched_off_loading_names_the_package_and_the_fix(saved, wheels, tmp_path):
    site_dir = unpacked(wheels["wheel"], tmp_path / "site-packages")
    result = run_fresh(saved, [site_dir], tmp_path, disabled=True, then_import=True)

    assert_cheap_start_and_clean_hook(result)
    assert result["registered_in_threads"] == [False] * 4
    assert result["peft_childtuning_from"] is None  # peft alone was imported
    assert len(result["loads"]) == 4
    for name, outcome in result["loads"].items():
        assert outcome["error"] == "ChildTuningNotRegisteredError" and outcome["is_key_error"], (name, outcome)
        message = outcome["message"]
        assert "Child-Tuning" in message and "`import peft_childtuning`" in message, message
        assert "PEFT_CHILDTUNING_NO_AUTOLOAD" in message and not message.startswith("'")  # not a KeyError repr
    assert result["after_import_identical"]


def test_a_failing_import_warns_keeps_peft_working_and_explains_the_loads(saved, wheels, tmp_path):
    site_dir = unpacked(wheels["wheel"], tmp_path / "site-packages")
    result = run_fresh(saved, [site_dir], tmp_path, break_import=True)

    assert_cheap_start_and_clean_hook(result)  # and `import peft` itself succeeded in every thread
    assert result["registered_in_threads"] == [False] * 4
    assert len(result["warnings"]) == 1 and "could not register Child-Tuning" in result["warnings"][0]
    for name, outcome in result["loads"].items():
        assert outcome["error"] == "ChildTuningNotRegisteredError", (name, outcome)
        assert "importing peft_childtuning failed" in outcome["message"] and "ModuleNotFoundError" in outcome["message"]
        assert outcome["cause"] == "ModuleNotFoundError"  # the reason, kept as the cause


def test_the_pth_twice_on_the_path_installs_one_hook(tmp_path):
    """The .pth file in two site directories (a venv over a system site-packages that holds it too): one hook."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copy(os.path.join(REPO_ROOT, PTH_NAME), tmp_path / name / PTH_NAME)
    count = (
        "import site, sys\n"
        "site.addsitedir(sys.argv[1]); site.addsitedir(sys.argv[2])\n"
        "print(sum(type(f).__name__ == '_PeftImportFinder' for f in sys.meta_path))\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    result = subprocess.run([sys.executable, "-c", count, str(tmp_path / "a"), str(tmp_path / "b")], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "1", result.stdout + result.stderr


def test_peft_imported_by_transformers_registers_at_the_next_import(wheels, tmp_path):
    """``from transformers import Trainer`` imports peft while transformers is still executing: registering then
    would be a circular import (it used to fail with a warning), so it happens at the next import statement."""
    site_dir = unpacked(wheels["wheel"], tmp_path / "site-packages")
    script = (
        "import json, site, sys, warnings\n"
        "site.addsitedir(sys.argv[1]); sys.path.extend(json.loads(sys.argv[2]))\n"
        "warnings.simplefilter('error', RuntimeWarning)\n"
        "from transformers import Trainer\n"
        "deferred = 'peft' in sys.modules and 'peft_childtuning' not in sys.modules\n"
        "from peft import PeftModel\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
        "import builtins\n"
        "print(json.dumps([deferred, 'CHILDTUNING' in PEFT_TYPE_TO_CONFIG_MAPPING,\n"
        "                  builtins.__import__.__name__ == '__import__']))\n"
    )
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PEFT_CHILDTUNING_NO_AUTOLOAD")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-S", "-c", script, site_dir, json.dumps(dependency_paths())],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    deferred, registered, import_restored = json.loads(result.stdout.strip().splitlines()[-1])
    assert deferred and registered and import_restored
