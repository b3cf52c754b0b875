"""Bench records: one JSON file per bench, saying what was measured, where and when.

A record is the only source of the README's figure tables (``bench/report.py``
renders them), so it carries everything needed to judge a figure without the
person who ran it:

* ``environment``: the commit (``git rev-parse HEAD``) and whether the work
  tree differed from it (records under ``bench/records/`` do not count), the
  UTC date, the load average (1, 5, 15 min) before and after the run, the CPU
  count, and the Python, Redis server, redis-py and hiredis versions;
* ``parameters``: the options the bench ran with;
* ``rounds``: every round's raw numbers (items, timed seconds, steps per
  measurement) and ``orders``, the order each round ran in;
* ``ratios`` and ``rates``: :class:`bench.stats.Summary` dicts, each with its
  per-round values, median, min–max, bootstrap interval, target and verdict;
* whatever else the bench reports, under ``figures`` (the durability bench:
  its servers, a summary per cell and every trial).

Records are written to ``bench/records/<bench>.json`` unless a path is given.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.stats import Round, Summary

ROOT = Path(__file__).resolve().parent.parent
RECORDS_DIR = ROOT / "bench" / "records"
SCHEMA = 1


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def commit() -> tuple[str | None, bool | None]:
    """(HEAD's sha, whether the tree differs from it outside ``bench/records/``)."""
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=normal")
    if sha is None or status is None:
        return None, None
    changed = [
        line[3:] for line in status.splitlines() if not line[3:].startswith("bench/records/")
    ]
    return sha.strip(), bool(changed)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(redis_version: str | None, load_before: Sequence[float]) -> dict[str, Any]:
    """Where and when: everything but the load after, which :func:`build` adds."""
    sha, dirty = commit()
    return {
        "commit": sha,
        "dirty": dirty,
        "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "load_before": list(load_before),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "redis_server": redis_version,
        "redis_py": _version("redis"),
        "hiredis": _version("hiredis"),
        "platform": platform.platform(),
    }


def build(
    bench: str,
    env: Mapping[str, Any],
    *,
    parameters: Mapping[str, Any],
    rounds: Sequence[Round] = (),
    orders: Sequence[Sequence[str]] = (),
    ratios: Sequence[Summary] = (),
    rates: Sequence[Summary] = (),
    bounds: Sequence[Summary] = (),
    figures: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The record of one run; the load average after is taken now.

    ``bounds`` are figures held to a target that are neither ratios nor rates
    (KiB per connection, a latency ratio's ceiling); the key is left out when
    there are none, so other benches' records keep their shape.
    """
    record = {
        "bench": bench,
        "schema": SCHEMA,
        "environment": {**env, "load_after": load_average()},
        "parameters": dict(parameters),
        "rounds": [{name: s.to_dict() for name, s in r.items()} for r in rounds],
        "orders": [list(o) for o in orders],
        "ratios": {s.name: s.to_dict() for s in ratios},
        "rates": {s.name: s.to_dict() for s in rates},
        "figures": dict(figures or {}),
        "notes": list(notes),
    }
    if bounds:
        record["bounds"] = {s.name: s.to_dict() for s in bounds}
    return record


def write(record: Mapping[str, Any], path: Path | None = None) -> Path:
    """Write ``record`` as indented JSON (to ``bench/records/<bench>.json`` by default)."""
    path = path or RECORDS_DIR / f"{record['bench']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")  # the bench's order
    return path


def emit(
    record: Mapping[str, Any], paths: Sequence[Path | None], default: Path | None = None
) -> None:
    """A bench's ending: write ``record`` to each of ``paths`` given (``default``
    when the first is None: a full run's record), say where on stderr, and print
    the record as one JSON object, the last line of output."""
    first, *rest = paths
    for path in (first or default, *rest):
        if path is not None:
            write(record, path)
            print(f"record written to {path}", file=sys.stderr)
    print(json.dumps(record, sort_keys=True))


def read(path: Path) -> dict[str, Any]:
    """One record. A record written by another tool (``bench/mutation_score.py``
    writes ``commit`` and ``date`` but no ``bench``) is named by its file."""
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "bench" not in data and {"commit", "date"} <= set(data):
        data["bench"] = path.stem
    if not isinstance(data, dict) or "bench" not in data:
        raise ValueError(f"{path}: not a bench record (no 'bench' key)")
    return data


def read_all(directory: Path = RECORDS_DIR) -> dict[str, dict[str, Any]]:
    """Every record in ``directory`` by bench name; two records of one bench are an error."""
    out: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        record = read(path)
        name = record["bench"]
        if name in out:
            raise ValueError(f"two records of bench {name!r}: {paths[name]} and {path}")
        out[name], paths[name] = record, path
    return out
