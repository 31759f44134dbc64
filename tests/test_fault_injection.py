"""Fault injection: "a failed load changes nothing", held against hypothesis-drawn corruptions of real adapters.

Real saved adapters (mode "d", Fisher selection, with the classifier head as modules_to_save, on the tiny BERT of
conftest; mode "f" on the same BERT; mode "d" on the tiny GPT-2, CAUSAL_LM; mode "d" on a BERT with a wide
feed-forward block, one tensor's child network having gaps too wide for 16 bits, stored as gap16x), each trained two
steps, are copied and mutated 1-3 times (config fields edited or deleted, the config file broken, tensors added /
removed / renamed / re-typed / resized / set to NaN, inf or 1e300, 16-bit gap streams edited, safetensors header
edits, truncations, byte and bit flips anywhere in the file, a pickle next to or instead of the safetensors file; see
`fault_injection_cases.KINDS`), and loaded with
one of seven loaders (`fault_injection_cases.LOADERS`). Every case must end in

(a) the adapter that was saved, exactly: outputs bit-identical (fp32) to the trained model's; or
(b) an `AdapterFormatError` that names the file by its path, chained to the original exception where there was one,
    with the user's model afterwards exactly what it was (`model_state.ModelState`) and computing what it computed
    before.

Violations are collected over all examples (no shrinking: a run reports every kind of violation it met, with the
smallest examples) and each test fails at its end if it met any. The number of examples is `CT_FAULT_EXAMPLES`
(total over the four sources; default 2,000 examples, about 4,200 mutations); a
summary of outcomes per loader and mutation kind is printed at the end of the module, and written as JSON to
`$CT_FAULT_REPORT` when that is set. `scripts/fault_injection.py` runs the same cases outside pytest.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings

import fault_injection_cases as fic

DEFAULT_EXAMPLES = 2000
EXAMPLES = int(os.environ.get("CT_FAULT_EXAMPLES", DEFAULT_EXAMPLES))
SHARES = {"bert_d": 0.4, "bert_f": 0.2, "gpt2_d": 0.2, "bertwide_d": 0.2}  # of the examples, per source
SOURCES = tuple(SHARES)


@pytest.fixture(scope="module", autouse=True)
def hub_offline():
    """Everything loads from local directories (AutoPeftModel reads base_model_name_or_path, a local path).

    huggingface_hub reads HF_HUB_OFFLINE when it is imported (by conftest, before this fixture), so its constant is
    patched too: a mutated config (e.g. base_model_name_or_path null) must not make a loader retry the network.
    """
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def sources(tmp_path_factory, hub_offline):
    return fic.prepare_sources(str(tmp_path_factory.mktemp("fault_injection_sources")), SOURCES)


@pytest.fixture(scope="module")
def tally(request):
    """The outcomes of every fault-injection example of this module; summarised when the module is done."""
    total = fic.Tally()
    yield total
    text = total.summary()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print("\n" + text, flush=True)
    else:
        print("\n" + text, flush=True)
    report = os.environ.get("CT_FAULT_REPORT")
    if report:
        with open(report, "w") as handle:
            json.dump(total.to_json(), handle, indent=1)


def _clean_case(source: fic.Source, loader: str) -> fic.Case:
    with open(os.path.join(source.adapter_dir, fic.CONFIG), "rb") as handle:
        config = handle.read()
    return fic.Case(source.name, loader, [], {fic.CONFIG: config, fic.WEIGHTS: source.weights_bytes, fic.PICKLE: None})


@pytest.mark.parametrize("loader", fic.LOADER_NAMES)
@pytest.mark.parametrize("source_name", SOURCES)
def test_unmutated_adapter_loads_exactly(sources, tmp_path, source_name, loader):
    """The control: the adapter as saved loads exactly with every loader (else no mutation could be judged)."""
    result = fic.run_case(sources, _clean_case(sources[source_name], loader), str(tmp_path / "adapter"))
    assert result.outcome == "loaded_exactly", result.report()


@pytest.mark.parametrize("source_name", SOURCES)
def test_fault_injection(sources, tally, tmp_path, source_name):
    examples = max(1, round(EXAMPLES * SHARES[source_name]))
    local = fic.Tally()

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],  # nothing fails inside: no shrinking, every example is one load
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=fic.case_strategy(sources[source_name], fic.LOADER_NAMES))
    def run(case):
        local.add(fic.run_case(sources, case, str(tmp_path / "adapter")))

    run()
    tally.merge(local)
    assert local.cases >= 0.9 * examples, f"hypothesis ran only {local.cases} of {examples} examples"
    if local.violation_codes:
        pytest.fail(
            f"{local.outcomes['violation']} of {local.cases} fault-injection cases on {source_name} violate the "
            f"contract:\n{local.summary(examples_shown=1)}",
            pytrace=False,
        )
