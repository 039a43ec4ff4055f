"""Mutation scores per module from a finished `mutmut run` (reads mutants/**/*.py.meta).

    python scripts/mutation_report.py [--survivors] [--markdown] [--mutants DIR]

Score = (killed + timed out) / mutants that ran. A timeout counts as detected: the mutant made the tests
hang (an infinite loop), which CI's per-test timeout catches. "no tests" (no test reaches the mutated
function) counts as a survivor. Mutants not yet run are reported, not scored.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

DETECTED = {1: "killed", 3: "killed", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout",
            37: "killed"}
SURVIVED = {0: "survived", 5: "no tests", 33: "no tests"}


def module_results(mutants: Path) -> dict[str, Counter]:
    """module → Counter of outcomes (killed, timeout, survived, no tests, not run, other)."""
    results: dict[str, Counter] = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        module = meta.relative_to(mutants).with_suffix("").with_suffix("").as_posix().replace("/", ".")
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if not codes:
            continue
        results[module] = Counter(outcome(code) for code in codes.values())
    return results


def outcome(code: int | None) -> str:
    if code is None:
        return "not run"
    return DETECTED.get(code) or SURVIVED.get(code) or "other"


def survivors(mutants: Path) -> list[str]:
    names = []
    for meta in sorted(mutants.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        names += [name for name, code in codes.items() if code in SURVIVED]
    return names


def score(counts: Counter) -> tuple[int, int]:
    ran = sum(n for k, n in counts.items() if k != "not run")
    return counts["killed"] + counts["timeout"], ran


def table(results: dict[str, Counter], markdown: bool) -> str:
    head = ("module", "mutants", "killed", "timeout", "survived", "no tests", "not run", "score")
    rows = []
    for module, c in results.items():
        detected, ran = score(c)
        pct = f"{100 * detected / ran:.1f} %" if ran else "-"
        rows.append((module, str(sum(c.values())), str(c["killed"]), str(c["timeout"]), str(c["survived"]),
                     str(c["no tests"]), str(c["not run"]), pct))
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in (head, *rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mutants", type=Path, default=Path("mutants"))
    parser.add_argument("--survivors", action="store_true", help="also list every surviving mutant")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if not args.mutants.is_dir():
        raise SystemExit(f"{args.mutants} does not exist: run `mutmut run` (or `make mutation`) first.")
    print(table(module_results(args.mutants), args.markdown))
    if args.survivors:
        print("\nsurvivors (`mutmut show NAME` prints the change):")
        print("\n".join(f"  {name}" for name in survivors(args.mutants)))


if __name__ == "__main__":
    main()
