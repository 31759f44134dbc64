#!/usr/bin/env python3
"""Run the fault-injection cases of `tests/test_fault_injection.py` outside pytest, for as many cases as wanted.

    python3 scripts/fault_injection.py --count 10000 --seed 0
    python3 scripts/fault_injection.py --count 2000 --max-mutations 1 --variants   # one mutation per case
    python3 scripts/fault_injection.py --seed 0 --case 1234                          # rerun and show one case
    python3 scripts/fault_injection.py --count 500 --loaders from_pretrained --kinds b_bitflip,t_retype

Case i of a run is drawn from `random.Random(f"{seed}:{i}")`, so any case can be rerun alone with `--case i`.
Prints one line per case that violates the contract, then counts per loader, source and mutation kind, the violation
codes with the loaders and (single-mutation) variants they came from, and the smallest examples of each. Exits 1 if
any case violated the contract (a wrong model loaded, an exception other than AdapterFormatError, a refusal that
does not name the file or drops the original exception, a model changed or broken after a refused load).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fault_injection_cases as fic  # noqa: E402

SHARES = {"bert_d": 0.4, "bert_f": 0.2, "gpt2_d": 0.2, "bertwide_d": 0.2}


def draw(seed: int, index: int, sources, names, loaders, kinds, min_mutations, max_mutations) -> fic.Case:
    rng = random.Random(f"{seed}:{index}")
    source = rng.choices(names, weights=[SHARES.get(name, 0.25) for name in names])[0]
    return fic.draw_case(fic.RandomDraw(rng), sources[source], loaders, min_mutations, max_mutations, kinds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10000, help="number of cases (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sources", default=",".join(SHARES), help=f"comma-separated, of {list(SHARES)}")
    parser.add_argument("--loaders", default=",".join(fic.LOADER_NAMES), help=f"comma-separated, of {fic.LOADER_NAMES}")
    parser.add_argument("--kinds", default="", help=f"only these mutation kinds, of {[k.name for k in fic.KINDS]}")
    parser.add_argument("--min-mutations", type=int, default=1)
    parser.add_argument("--max-mutations", type=int, default=3)
    parser.add_argument("--case", type=int, default=None, help="run only case CASE of this seed, and show it")
    parser.add_argument("--variants", action="store_true", help="also count per mutation variant")
    parser.add_argument("--matrix", action="store_true",
                        help="also print, per variant of single-mutation cases and loader, the violation codes")
    parser.add_argument("--examples", type=int, default=3, help="examples kept per violation code and loader")
    parser.add_argument("--quiet", action="store_true", help="no line per violating case")
    parser.add_argument("--json", default=None, help="write the tally as JSON to this file")
    args = parser.parse_args(argv)

    names = [name for name in args.sources.split(",") if name]
    loaders = [name for name in args.loaders.split(",") if name]
    kinds = [name for name in args.kinds.split(",") if name] or None
    unknown = (set(names) - set(SHARES)) | (set(loaders) - set(fic.LOADER_NAMES)) | (
        set(kinds or ()) - set(fic.KINDS_BY_NAME))
    if unknown:
        parser.error(f"unknown names: {sorted(unknown)}")

    with tempfile.TemporaryDirectory(prefix="ct_fault_") as root:
        started = time.perf_counter()
        sources = fic.prepare_sources(os.path.join(root, "sources"), tuple(names))
        print(f"prepared {names} in {time.perf_counter() - started:.1f} s", flush=True)
        work = os.path.join(root, "adapter")
        tally = fic.Tally(examples_per_violation=args.examples)
        indices = [args.case] if args.case is not None else range(args.count)
        started = time.perf_counter()
        for done, index in enumerate(indices, start=1):
            case = draw(args.seed, index, sources, names, loaders, kinds, args.min_mutations, args.max_mutations)
            result = fic.run_case(sources, case, work)
            tally.add(result)
            if args.case is not None:
                print(result.report())
                if result.warnings:
                    print("  warnings:", *result.warnings, sep="\n    ")
            elif result.violations and not args.quiet:
                codes = ",".join(sorted({code for code, _ in result.violations}))
                print(f"VIOLATION #{index} {codes}: {case.describe()}", flush=True)
            if done % 500 == 0:
                print(f"... {done} cases, {time.perf_counter() - started:.0f} s, "
                      f"{tally.outcomes['violation']} violating", file=sys.stderr, flush=True)
        elapsed = time.perf_counter() - started
    print()
    print(tally.summary(variants=args.variants))
    if args.matrix:
        print()
        print(tally.matrix())
    print(f"\n{tally.cases} cases ({tally.mutations} mutations) in {elapsed:.1f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(tally.to_json(), handle, indent=1)
    return 1 if tally.outcomes["violation"] else 0


if __name__ == "__main__":
    sys.exit(main())
