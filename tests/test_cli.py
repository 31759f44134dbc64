"""The `peft-childtuning` command line: `inspect` (text and --json) and `merge`, and its user errors (exit status 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    BertModel,
    BertTokenizer,
    GPT2LMHeadModel,
)

from peft_childtuning.sparse_format import save_with_checksums
from peft_childtuning.cli import main
from peft_childtuning.sparse_format import encoded_bytes

from conftest import (
    ARCHS,
    REPO_ROOT,
    WIDE_GAP_KEY,
    composed_weights,
    give_wide_gaps,
    peft_model,
    rewrite_config,
    tiny_bert,
    tiny_gpt2,
    wide_bert,
    wide_gap_positions,
)

BERT, GPT2 = ARCHS["bert"], ARCHS["gpt2"]


@pytest.fixture(scope="module", autouse=True)
def hub_offline():
    """Everything here loads from local directories: no Hub access (without leaking the setting to other modules)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


def train(model, arch, steps: int = 2):
    if model.peft_config["default"].needs_fisher_pass:
        model.detect_child_network(arch.batches(2, seed=20), progress=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for batch in arch.batches(steps, seed=21):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


def inputs(arch) -> dict[str, torch.Tensor]:
    return {k: v for k, v in arch.batches(1, seed=50)[0].items() if k != "labels"}


@torch.no_grad()
def logits(model, batch):
    model.eval()
    return model(**batch).logits


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base_dir = str(root / "bert")
    tiny_bert(seed=0).save_pretrained(base_dir)
    vocab = os.path.join(str(root), "vocab.txt")
    with open(vocab, "w") as handle:
        handle.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]) + "\n")
    BertTokenizer(vocab).save_pretrained(base_dir)

    model = train(peft_model(AutoModelForSequenceClassification.from_pretrained(base_dir), mode="d", reserve_p=0.3,
                             task_type="SEQ_CLS"), BERT)
    adapter_d = str(root / "adapter_d")
    model.save_pretrained(adapter_d)
    batch = inputs(BERT)
    expected = logits(model, batch)
    composed = composed_weights(model)

    model_f = train(peft_model(AutoModelForSequenceClassification.from_pretrained(base_dir), mode="f", reserve_p=0.5,
                               task_type="SEQ_CLS"), BERT, steps=1)
    adapter_f = str(root / "adapter_f")
    model_f.save_pretrained(adapter_f)

    gpt2_dir = str(root / "gpt2")
    tiny_gpt2(seed=0).save_pretrained(gpt2_dir)
    gpt2_model = train(peft_model(AutoModelForCausalLM.from_pretrained(gpt2_dir), mode="d", reserve_p=0.1,
                                  task_type="CAUSAL_LM"), GPT2)
    adapter_gpt2 = str(root / "adapter_gpt2")
    gpt2_model.save_pretrained(adapter_gpt2)
    gpt2_batch = inputs(GPT2)

    lora_dir = str(root / "lora")
    get_peft_model(tiny_bert(seed=0), LoraConfig(target_modules=["query"], r=2)).save_pretrained(lora_dir)
    return {
        "root": root, "base": base_dir, "d": adapter_d, "f": adapter_f, "batch": batch, "expected": expected,
        "composed": composed, "config": model.peft_config["default"], "gpt2": gpt2_dir, "adapter_gpt2": adapter_gpt2,
        "gpt2_batch": gpt2_batch, "gpt2_expected": logits(gpt2_model, gpt2_batch), "lora": lora_dir,
    }


# ------------------------------------------------------------------------------------------------ inspect
def test_inspect_json_matches_the_config_and_the_file(dirs, capsys):
    code, out, err = run(capsys, "inspect", dirs["d"], "--json")
    assert code == 0, err
    report = json.loads(out)
    config = dirs["config"]
    assert report["mode"] == "d" and report["reserve_p"] == 0.3 and report["selection"] == "fisher"
    assert report["base_fingerprint"] == config.base_fingerprint
    saved = load_file(os.path.join(dirs["d"], "adapter_model.safetensors"))
    by_name = {record["name"]: record for record in report["tensors"]}
    assert set(by_name) == set(config.child_sizes)
    for key, size in config.child_sizes.items():
        record = by_name[key]
        module = "base_model.model." + key.rsplit(".", 1)[0]
        values, positions = saved[f"{module}.childtuning_values"], saved[f"{module}.childtuning_positions"]
        assert record["child_size"] == size == values.numel()
        assert record["encoding"] == config.child_encodings[key]
        assert record["value_bytes"] == values.numel() * values.element_size()
        assert record["position_bytes"] == positions.numel() * positions.element_size()
        assert record["bytes"] == record["value_bytes"] + record["position_bytes"]
        assert record["values_dtype"] == "float32"
    k = sum(config.child_sizes.values())
    totals = report["totals"]
    assert totals["child_entries"] == k
    assert report["total_bytes"] == totals["file_bytes"] == os.path.getsize(
        os.path.join(dirs["d"], "adapter_model.safetensors"))
    assert totals["value_bytes"] == 4 * k
    assert report["bytes_per_child_entry"] == pytest.approx((totals["value_bytes"] + totals["position_bytes"]) / k)
    assert report["file_bytes_per_child_entry"] == pytest.approx(totals["file_bytes"] / k)
    assert {record["name"] for record in report["modules_to_save"]} == {"classifier.weight", "classifier.bias"}
    assert totals["modules_to_save_bytes"] == (2 * 32 + 2) * 4
    assert report["problems"] == []


def test_inspect_text_output(dirs, capsys):
    code, out, err = run(capsys, "inspect", dirs["d"])
    assert code == 0, err
    config = dirs["config"]
    for needle in ("mode:", "reserve_p:", "0.3", "selection:", "fisher", "total bytes", "bytes per child entry",
                   "base fingerprint", config.base_fingerprint["tensors"], "classifier.weight"):
        assert needle in out, needle
    for key, size in config.child_sizes.items():
        line = next(line for line in out.splitlines() if key in line)
        assert str(size) in line.split() and config.child_encodings[key] in line.split(), line
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def test_inspect_reports_gap16x_and_a_length_the_file_disagrees_with(tmp_path, capsys):
    """A tensor stored as gap16x: its stream's bytes, and, where the config records another length, a problem."""
    model = peft_model(wide_bert(), mode="d", reserve_p=0.01, task_type="SEQ_CLS")
    model.detect_child_network(BERT.batches(2, seed=20), progress=False)
    give_wide_gaps(model)
    adapter_dir = str(tmp_path / "wide")
    model.save_pretrained(adapter_dir)
    words = wide_gap_positions().numel() + 3 * 3  # three wide gaps: a triple each
    code, out, err = run(capsys, "inspect", adapter_dir, "--json")
    assert code == 0, err
    record = next(record for record in json.loads(out)["tensors"] if record["name"] == WIDE_GAP_KEY)
    assert record["encoding"] == "gap16x" and record["position_bytes"] == 2 * words
    rewrite_config(adapter_dir, lambda config: config["child_encoded_lengths"].__setitem__(WIDE_GAP_KEY, words + 1))
    code, out, err = run(capsys, "inspect", adapter_dir)
    assert code == 2
    assert f"{WIDE_GAP_KEY}: the file's gap16x positions have {words} words" in err, err


def test_inspect_mode_f(dirs, capsys):
    code, out, err = run(capsys, "inspect", dirs["f"], "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["mode"] == "f"
    assert report["tensors"] and all(record["encoding"] == "dense" and record["position_bytes"] == 0
                                     for record in report["tensors"])
    assert report["totals"]["child_entries"] == sum(record["child_size"] for record in report["tensors"])


def test_inspect_reports_a_file_that_disagrees_with_its_config(dirs, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    saved = load_file(os.path.join(dirs["d"], "adapter_model.safetensors"))
    del saved["base_model.model.bert.encoder.layer.0.output.dense.childtuning_values"]
    save_file(saved, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text(open(os.path.join(dirs["d"], "adapter_config.json")).read())
    code, out, err = run(capsys, "inspect", str(bad))
    assert code == 2
    assert "layer.0.output.dense" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ merge
def test_merge_writes_a_plain_transformers_model(dirs, tmp_path, capsys):
    out_dir = str(tmp_path / "merged")
    code, out, err = run(capsys, "merge", "--base", dirs["base"], "--adapter", dirs["d"], "--out", out_dir)
    assert code == 0, err
    files = set(os.listdir(out_dir))
    assert "config.json" in files and "model.safetensors" in files
    assert "adapter_config.json" not in files
    with open(os.path.join(out_dir, "config.json")) as handle:
        assert json.load(handle)["architectures"] == ["BertForSequenceClassification"]
    state = load_file(os.path.join(out_dir, "model.safetensors"))
    assert not any("childtuning" in key or "base_layer" in key or "modules_to_save" in key for key in state)
    for key, weight in dirs["composed"].items():
        assert torch.equal(state[key], weight), key
    merged = AutoModelForSequenceClassification.from_pretrained(out_dir)
    assert type(merged) is BertForSequenceClassification
    assert torch.equal(logits(merged, dirs["batch"]), dirs["expected"])
    # the tokenizer came along
    tokenizer_files = {name for name in os.listdir(dirs["base"]) if name.startswith("tokenizer") or name == "vocab.txt"}
    assert tokenizer_files and tokenizer_files <= files, (tokenizer_files, files)
    tokenizer = BertTokenizer.from_pretrained(out_dir)
    assert tokenizer.convert_tokens_to_ids("world") == 6


def test_merge_causal_lm_picks_the_causal_lm_class(dirs, tmp_path, capsys):
    out_dir = str(tmp_path / "merged_gpt2")
    code, out, err = run(capsys, "merge", "--base", dirs["gpt2"], "--adapter", dirs["adapter_gpt2"], "--out", out_dir)
    assert code == 0, err
    assert "AutoModelForCausalLM" in out
    merged = AutoModelForCausalLM.from_pretrained(out_dir)
    assert type(merged) is GPT2LMHeadModel
    assert torch.equal(logits(merged, dirs["gpt2_batch"]), dirs["gpt2_expected"])


def test_merge_refuses_another_base_unless_told(dirs, tmp_path, capsys):
    other = str(tmp_path / "other")
    tiny_bert(seed=1).save_pretrained(other)
    code, out, err = run(capsys, "merge", "--base", other, "--adapter", dirs["d"], "--out", str(tmp_path / "o1"))
    assert code == 2
    assert "fingerprint" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o1")
    code, out, err = run(capsys, "merge", "--base", other, "--adapter", dirs["d"], "--out", str(tmp_path / "o2"),
                         "--ignore-base-mismatch")
    assert code == 0, err
    assert os.path.isfile(tmp_path / "o2" / "model.safetensors")


def test_merge_refuses_a_non_empty_out_dir(dirs, tmp_path, capsys):
    out_dir = tmp_path / "busy"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    code, out, err = run(capsys, "merge", "--base", dirs["base"], "--adapter", dirs["d"], "--out", str(out_dir))
    assert code == 2 and "not empty" in err
    assert os.listdir(out_dir) == ["keep.txt"]


# ------------------------------------------------------------------------------------------------ user errors
@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_dir", "does not exist"),
        ("not_an_adapter", "no adapter_config.json"),
        ("lora_adapter", "not a Child-Tuning adapter"),
        ("truncated_file", "truncated"),
        ("merge_missing_base", "does not exist"),
        ("merge_lora_adapter", "not a Child-Tuning adapter"),
        ("merge_corrupt_adapter", "NaN or inf"),
    ],
)
def test_user_errors_exit_2_without_traceback(dirs, tmp_path, capsys, case, message):
    out_dir = str(tmp_path / "out")
    if case == "missing_dir":
        argv = ["inspect", str(tmp_path / "nowhere")]
    elif case == "not_an_adapter":
        argv = ["inspect", dirs["base"]]
    elif case == "lora_adapter":
        argv = ["inspect", dirs["lora"]]
    elif case == "truncated_file":
        bad = tmp_path / "truncated"
        bad.mkdir()
        (bad / "adapter_config.json").write_text(open(os.path.join(dirs["d"], "adapter_config.json")).read())
        data = open(os.path.join(dirs["d"], "adapter_model.safetensors"), "rb").read()
        (bad / "adapter_model.safetensors").write_bytes(data[:100])
        argv = ["inspect", str(bad)]
    elif case == "merge_missing_base":
        argv = ["merge", "--base", str(tmp_path / "nowhere"), "--adapter", dirs["d"], "--out", out_dir]
    elif case == "merge_lora_adapter":
        argv = ["merge", "--base", dirs["base"], "--adapter", dirs["lora"], "--out", out_dir]
    else:
        bad = tmp_path / "nan"
        bad.mkdir()
        (bad / "adapter_config.json").write_text(open(os.path.join(dirs["d"], "adapter_config.json")).read())
        saved = load_file(os.path.join(dirs["d"], "adapter_model.safetensors"))
        key = "base_model.model.bert.encoder.layer.0.output.dense.childtuning_values"
        saved[key] = saved[key].clone()
        saved[key][0] = float("nan")
        save_with_checksums(saved, str(bad / "adapter_model.safetensors"))  # consistent: the value check refuses
        argv = ["merge", "--base", dirs["base"], "--adapter", str(bad), "--out", out_dir]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err, err
    assert err.count("peft-childtuning: error:") >= 1 and "Traceback" not in err
    assert not os.path.exists(out_dir) or not os.listdir(out_dir)


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["inspect"]) == 2
    assert main(["merge", "--base", "x"]) == 2
    assert main(["--help"]) == 0
    assert "inspect" in capsys.readouterr().out


def test_module_entry_point_exit_status_and_no_traceback(dirs, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO_ROOT}
    missing = subprocess.run([sys.executable, "-m", "peft_childtuning.cli", "inspect", str(tmp_path / "nowhere")],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_console_script_is_declared():
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)["project"]
    assert project.get("scripts", {}).get("peft-childtuning") == "peft_childtuning.cli:main"


def test_inspect_bytes_agree_with_the_encodings(dirs, capsys):
    """The reported position bytes are the encoded sizes of the child network (bitmap: one bit per entry)."""
    code, out, err = run(capsys, "inspect", dirs["d"], "--json")
    report = json.loads(out)
    base = dict(AutoModelForSequenceClassification.from_pretrained(dirs["base"]).named_parameters())
    for record in report["tensors"]:
        numel = base[record["name"]].numel()
        assert record["position_bytes"] == encoded_bytes(numel, record["child_size"], record["encoding"])


# ------------------------------------------------------------------------------------------------ what a merge prints
def merge_in_a_fresh_process(*argv: str) -> subprocess.CompletedProcess:
    """`peft-childtuning merge` as a user runs it: its own process, output to pipes (warnings and logs included)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO_ROOT}
    return subprocess.run([sys.executable, "-m", "peft_childtuning.cli", "merge", *argv],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("pooler", [True, False])
def test_merge_onto_a_headless_base_reports_only_what_the_adapter_does_not_supply(tmp_path, pooler):
    """A base saved without the classifier head (as MiniLM is): transformers would call the head 'MISSING, newly
    initialized', though the adapter brings it, and peft would warn that the adapter merged at load is 'already
    merged'. Neither is printed; a tensor that neither the base nor the adapter has (the pooler) still is."""
    full = tiny_bert(seed=0)
    base_dir = str(tmp_path / "headless")
    if pooler:
        full.bert.save_pretrained(base_dir)
    else:
        state = {k: v for k, v in full.bert.state_dict().items() if not k.startswith("pooler.")}
        BertModel(full.config, add_pooling_layer=False).save_pretrained(base_dir, state_dict=state)
    torch.manual_seed(1)
    model = train(peft_model(AutoModelForSequenceClassification.from_pretrained(base_dir), mode="d", reserve_p=0.3,
                             task_type="SEQ_CLS"), BERT)
    adapter_dir = str(tmp_path / "adapter")
    model.save_pretrained(adapter_dir)
    out_dir = str(tmp_path / "merged")
    result = merge_in_a_fresh_process("--base", base_dir, "--adapter", adapter_dir, "--out", out_dir,
                                      *([] if pooler else ["--ignore-base-mismatch"]))  # a random pooler each load
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for noise in ("MISSING", "LOAD REPORT", "already merged", "is_gradient_checkpointing", "Loading weights",
                  "Writing model shards", "Traceback"):
        assert noise not in output, (noise, output)
    assert result.stdout.splitlines()[-1] == f"saved the merged BertForSequenceClassification to {out_dir}"
    if pooler:
        assert result.stderr == "", result.stderr
    else:
        warning, = [line for line in result.stderr.splitlines() if "warning" in line]
        assert "bert.pooler.dense.weight" in warning and "classifier" not in warning
    merged = AutoModelForSequenceClassification.from_pretrained(out_dir)
    if pooler:  # the head and the child values came from the adapter: the merged model computes the trained one
        assert torch.equal(logits(merged, inputs(BERT)), logits(model, inputs(BERT)))
