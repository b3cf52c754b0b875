"""The mutation score of the pure cores, per module, from mutmut's results.

``make mutation`` runs mutmut (configured in ``[tool.mutmut]`` of pyproject.toml)
and then this script, which reads the per-file results mutmut leaves in
``mutants/<path>.meta`` and prints, per mutated module, how many mutants the tests
killed, how many survived, and how many of the survivors are *equivalent*: listed
with the reason in ``bench/mutation_equivalents.toml`` (a mutation that cannot
change behaviour, so no test can kill it). A mutant listed there that the tests do
kill, or that no longer exists, is reported as a stale entry.

The score is ``killed / (total - equivalent)``. Exit status 1 when a mutant
survived that is not listed as equivalent, or a mutant was not run or had no
test (the habit: every survivor is killed or explained), 2 on bad input.
``--record PATH`` writes the JSON record (commit, date, tool and version, per
module: total, killed, survived, equivalent with reasons).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENTS = ROOT / "bench" / "mutation_equivalents.toml"

# mutmut's exit codes of a mutant's test run (mutmut.stats.status_by_exit_code).
KILLED = {1, 3}
SURVIVED = {0}


@dataclass
class ModuleScore:
    module: str
    total: int = 0
    killed: int = 0
    survived: list[str] = field(default_factory=list)
    not_killed_otherwise: dict[str, str] = field(default_factory=dict)  # name -> status
    equivalent: dict[str, str] = field(default_factory=dict)  # name -> reason

    @property
    def unexplained(self) -> list[str]:
        return [m for m in self.survived if m not in self.equivalent]

    @property
    def score(self) -> float:
        judged = self.total - len(self.equivalent)
        return self.killed / judged if judged else 1.0

    def to_dict(self) -> dict[str, object]:
        return {
            "total": self.total,
            "killed": self.killed,
            "survived": len(self.survived),
            "equivalent": len(self.equivalent),
            "score": round(self.score, 4),
            "unexplained_survivors": self.unexplained,
            "not_run": self.not_killed_otherwise,
            "equivalents": [
                {"mutant": name, "reason": reason}
                for name, reason in sorted(self.equivalent.items())
            ],
        }


def mutated_files(pyproject: Path) -> list[str]:
    config = tomllib.loads(pyproject.read_text())["tool"]["mutmut"]
    return list(config["only_mutate"])


def load_equivalents(path: Path) -> dict[str, str]:
    """mutant name -> reason, from ``[[equivalent]]`` tables (mutant, reason)."""
    if not path.exists():
        return {}
    out: dict[str, str] = {}
    for item in tomllib.loads(path.read_text()).get("equivalent", []):
        mutant, reason = item.get("mutant"), item.get("reason", "").strip()
        if not mutant or not reason:
            raise ValueError(f"{path}: every [[equivalent]] needs a mutant and a reason: {item}")
        out[mutant] = reason
    return out


def scores(root: Path, files: list[str], equivalents: dict[str, str]) -> list[ModuleScore]:
    result = []
    for path in files:
        meta = root / "mutants" / (path + ".meta")
        if not meta.exists():
            raise FileNotFoundError(f"{meta} is missing: run `make mutation` (mutmut run) first")
        codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
        module = ModuleScore(path.removesuffix(".py").replace("/", "."))
        for name, code in sorted(codes.items()):
            module.total += 1
            if code in KILLED:
                module.killed += 1
            elif code in SURVIVED:
                module.survived.append(name)
                if name in equivalents:
                    module.equivalent[name] = equivalents[name]
            else:
                module.not_killed_otherwise[name] = f"exit code {code}"
        result.append(module)
    return result


def stale_equivalents(modules: list[ModuleScore], equivalents: dict[str, str]) -> list[str]:
    used = {name for m in modules for name in m.equivalent}
    return sorted(set(equivalents) - used)


def print_table(modules: list[ModuleScore]) -> None:
    header = (
        f"{'module':<28} {'total':>6} {'killed':>7} {'survived':>9} {'equivalent':>11} {'score':>7}"
    )
    print(header)
    print("-" * len(header))
    for m in modules:
        print(
            f"{m.module:<28} {m.total:>6} {m.killed:>7} {len(m.survived):>9}"
            f" {len(m.equivalent):>11} {m.score:>7.1%}"
        )
    total = sum(m.total for m in modules)
    killed = sum(m.killed for m in modules)
    equivalent = sum(len(m.equivalent) for m in modules)
    survived = sum(len(m.survived) for m in modules)
    judged = total - equivalent
    print("-" * len(header))
    print(
        f"{'all cores':<28} {total:>6} {killed:>7} {survived:>9} {equivalent:>11}"
        f" {killed / judged if judged else 1:>7.1%}"
    )


def git_commit(root: Path) -> str:
    out = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False
    )
    commit = out.stdout.strip() or "unknown"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return commit + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", type=Path, help="write the JSON record here")
    parser.add_argument(
        "--method",
        default="one mutmut run from scratch (make mutation)",
        help="how the verdicts were obtained, for the record",
    )
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="print only the names of the mutants not killed and not explained (to re-run them)",
    )
    args = parser.parse_args(argv)
    try:
        equivalents = load_equivalents(EQUIVALENTS)
        modules = scores(ROOT, mutated_files(ROOT / "pyproject.toml"), equivalents)
    except (FileNotFoundError, ValueError, KeyError, tomllib.TOMLDecodeError) as exc:
        print(f"mutation_score: {exc}", file=sys.stderr)
        return 2
    if args.survivors:
        for m in modules:
            print("\n".join([*m.unexplained, *m.not_killed_otherwise]))
        return 0
    print_table(modules)
    failed = False
    for m in modules:
        for name in m.unexplained:
            print(f"SURVIVED (neither killed nor listed as equivalent): {name}")
            failed = True
        for name, status in m.not_killed_otherwise.items():
            print(f"NOT KILLED ({status}): {name}")
            failed = True
    for name in stale_equivalents(modules, equivalents):
        print(f"stale entry in {EQUIVALENTS.name} (killed or gone): {name}")
    if args.record:
        record = {
            "commit": git_commit(ROOT),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "tool": "mutmut",
            "tool_version": version("mutmut"),
            "python": sys.version.split()[0],
            "score_definition": "killed / (total - equivalent)",
            "method": args.method,
            "mutated": mutated_files(ROOT / "pyproject.toml"),
            "modules": {m.module: m.to_dict() for m in modules},
        }
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.record}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
