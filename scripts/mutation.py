"""Mutation testing of vaekit's core: run mutmut on every core module, or on those a change touched, and print the
score of each module with the listed equivalent mutants left out.

    python scripts/mutation.py                  # every core module (see [tool.mutmut] in pyproject.toml)
    python scripts/mutation.py --changed main   # every mutant of the core modules that differ from main
    python scripts/mutation.py --survivors      # again the mutants that survived the last run, after new tests
    python scripts/mutation.py --sample 60      # the same 60 mutants drawn from each core module: a score estimate
    python scripts/mutation.py --report         # the scores of the last run, running nothing
    python scripts/mutation.py --report --sample 60   # the estimate from that sample, running nothing
    python scripts/mutation.py --heavy          # the mutants only heavy tests kill, each against its test

mutmut keeps its results in mutants/ and a plain run tests only the mutants of functions that changed since.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "scripts" / "equivalent_mutants.toml"
# mutmut's exit codes of a detected mutant: a failing test (1; 3 when pytest itself fails), a timeout (36, and 24, -24,
# 152 and 255 for the CPU limit's signal) or a type error (37).
KILLED = {1, 3, 36, 24, -24, 152, 255, 37}


def core_files() -> list[str]:
    """The modules mutmut mutates, from pyproject.toml."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]


def module(path: str) -> str:
    """src/vaekit/uses/codec.py -> vaekit.uses.codec."""
    return path.removeprefix("src/").removesuffix(".py").replace("/", ".")


def changed(base: str) -> list[str]:
    """The core modules whose source differs from base (committed or not)."""
    out = subprocess.run(["git", "diff", "--name-only", base, "--", "src"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"mutation: git diff against {base!r} failed: {out.stderr.strip()}")
    touched = set(out.stdout.split())
    return [f for f in core_files() if f in touched]


def left_out() -> dict[str, str]:
    """The mutants left out of the score with their reasons: the equivalent ones, and those only a GPU tells apart
    when this machine has none."""
    listed = tomllib.loads(EQUIVALENT.read_text())
    out = dict(listed.get("equivalent", {}))
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if not gpu:
        out.update(listed.get("device", {}))
    return out


def heavy() -> dict[str, str]:
    """The mutants that only tests left out of mutation runs (marked heavy) kill, each with its test."""
    return tomllib.loads(EQUIVALENT.read_text()).get("heavy", {})


def check_heavy() -> int:
    """Run each mutant listed as killed by a heavy test against that test, which must fail, as mutmut runs a mutant:
    the last run's mutated source with that one switched on (child processes inherit the switch). Each test must
    first pass with none switched on. 1 if a mutant survives or cannot be checked."""

    def run(test: str, mutant: str) -> int:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "mutants" / "src"), "MUTANT_UNDER_TEST": mutant}
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test]
        return subprocess.run(pytest, cwd=ROOT, env=env, capture_output=True).returncode

    listed, known = heavy(), {name for codes in results(core_files()).values() for name in codes}
    clean = {test: run(test, "") for test in set(listed.values())}
    failures = 0
    for name, test in listed.items():
        if name not in known:
            verdict = "not checked (no such mutant in mutants/)"
        elif clean[test]:
            verdict = f"not checked (the test fails unmutated: pytest exit {clean[test]})"
        else:
            code = run(test, name)  # pytest exits 1 when a test fails, other codes when it cannot run
            verdict = {1: "killed", 0: "SURVIVED"}.get(code, f"not checked (pytest exit {code})")
        print(f"{verdict}: {name} by {test}")
        failures += verdict != "killed"
    return 1 if failures else 0


def results(files: list[str]) -> dict[str, dict[str, int | None]]:
    """mutmut's exit code for every mutant of each module (None: not run yet)."""
    found = {}
    for f in files:
        meta = ROOT / "mutants" / (f + ".meta")
        found[f] = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
    return found


def generate() -> None:
    """Make every core module's mutants and mutmut's map of which tests call which function, running no mutant: what
    a plain `mutmut run` does before its first mutant, so that a sample can be drawn without a full run first."""
    # mutmut 3.8's own steps (mutmut.__main__._run), which it offers no command for.
    from mutmut.__main__ import (
        collect_or_load_stats,
        copy_also_copy_files,
        copy_src_dir,
        create_mutants,
        get_mutant_runner,
        set_mutant_under_test,
        setup_source_paths,
        store_lines_covered_by_tests,
    )

    os.chdir(ROOT)
    set_mutant_under_test("mutant_generation")
    (ROOT / "mutants").mkdir(exist_ok=True)
    copy_src_dir()
    copy_also_copy_files()
    setup_source_paths()
    store_lines_covered_by_tests()
    workers = os.cpu_count() or 1
    create_mutants(workers)
    print("mapping tests to the functions they call (minutes)", flush=True)
    collect_or_load_stats(get_mutant_runner(workers), mutants_caught_by_type_checker={}, apply_config_invalidation=True)
    set_mutant_under_test("")


def drawn(f: str, names: list[str], n: int) -> list[str]:
    """The first n mutants of a module in an order shuffled with the module's name as seed: a uniform random sample
    that a larger n extends, whatever the other modules hold."""
    order = sorted(names)
    random.Random(module(f)).shuffle(order)
    return order[:n]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson 95% interval of a proportion k / n: a module's score estimated from the mutants run so far."""
    if not n:
        return 0.0, 1.0
    p, spread = k / n, z * math.sqrt(k * (n - k) / n + z * z / 4) / n
    centre, scale = p + z * z / (2 * n), 1 + z * z / n
    return (centre - spread) / scale, (centre + spread) / scale


def report(files: list[str], sample: int | None = None) -> int:
    """Print each module's score and its surviving mutants; 1 if a module is below 90% or not run. With a sample size,
    a module not run in full is scored on its drawn sample alone, so that the estimate is not skewed by the functions
    that happened to be run in full."""
    equivalent, by_heavy_test = left_out(), heavy()
    worst = 1.0
    print(
        f"{'module':28} {'mutants':>7} {'killed':>6} {'equiv':>5} {'survived':>8} {'untested':>8} {'score':>6}"
        "  (95% interval while untested mutants remain)"
    )
    for f, codes in results(files).items():
        count: Counter[str] = Counter()
        survivors = []
        everything = len(codes)
        if sample and any(c is None for c in codes.values()):
            codes = {name: codes[name] for name in drawn(f, list(codes), sample)}
        for name, code in codes.items():
            if name in equivalent:
                count["equiv"] += 1
            elif code in KILLED or name in by_heavy_test:
                count["killed"] += 1
            elif code is None:
                count["untested"] += 1
            else:
                count["survived"] += 1
                survivors.append(name)
        judged = len(codes) - count["equiv"] - count["untested"]
        score = count["killed"] / judged if judged else 0.0
        sampled = len(codes) < everything
        low, high = wilson(count["killed"], judged)
        # A module run in full passes on its score; a sample only when its whole 95% interval clears 90%.
        worst = min(worst, 0.0 if count["untested"] else low if sampled else score)
        interval = f"  ({low:.0%} to {high:.0%})" if (count["untested"] or sampled) and judged else ""
        size = f"{len(codes)}/{everything}" if sampled else str(everything)
        print(
            f"{module(f):28} {size:>7} {count['killed']:6} {count['equiv']:5} {count['survived']:8}"
            f" {count['untested']:8} {score:6.1%}{interval}"
        )
        for name in survivors:
            print(f"    survived: {name}")
    stale = sorted((set(equivalent) | set(by_heavy_test)) - {n for c in results(core_files()).values() for n in c})
    for name in stale:
        print(f"listed in {EQUIVALENT.name} but no longer a mutant: {name}")
    return 0 if worst >= 0.9 and not stale else 1


def main() -> int:
    """Run mutmut on the chosen core modules, then report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changed", metavar="BASE", help="only the core modules that differ from this git revision")
    parser.add_argument("--survivors", action="store_true", help="run again the mutants that survived the last run")
    parser.add_argument(
        "--sample", type=int, metavar="N", help="run the N mutants drawn from each module not yet run; score the sample"
    )
    parser.add_argument("--report", action="store_true", help="print the last run's scores without running")
    parser.add_argument(
        "--heavy", action="store_true", help="check the mutants listed as killed by heavy tests against their tests"
    )
    parser.add_argument("--max-children", type=int, help="parallel workers (default: one per CPU)")
    args = parser.parse_args()
    if args.heavy:
        return check_heavy()
    files = changed(args.changed) if args.changed else core_files()
    if not files:
        print("no core module changed")
        return 0
    if args.sample:
        done = results(files)
        if not any(done.values()) and not args.report:
            generate()
            done = results(files)
        names = [n for f, codes in done.items() for n in drawn(f, list(codes), args.sample) if codes[n] is None]
    elif args.survivors:
        done, skip = results(files), left_out() | heavy()
        names = [n for codes in done.values() for n, c in codes.items() if c not in KILLED | {None} and n not in skip]
    else:
        # Named mutants are run again whatever their last result; with no names mutmut runs the untested ones.
        names = [f"{module(f)}.*" for f in files] if args.changed else []
    if not args.report and (names or not args.survivors):
        extra = ["--max-children", str(args.max_children)] if args.max_children else []
        subprocess.run([sys.executable, "-m", "mutmut", "run", *extra, *names], cwd=ROOT, check=False)
    return report(files, args.sample)


if __name__ == "__main__":
    sys.exit(main())
