"""The README's figure tables, generated from the bench records and never typed by hand.

For every record ``bench/records/<bench>.json`` the README may hold a block
between two markers::

    <!-- bench:<bench>:start -->
    ...generated...
    <!-- bench:<bench>:end -->

``bench/report.py`` replaces each block's text with the tables rendered from
the record: a line saying when, on which commit (and whether the tree was
clean), under what load average and on what software the figures were
measured (a record whose verdict does not follow from its own interval is
refused), then the ratios (median of per-round ratios, min–max, bootstrap
interval, target, verdict), the rates, and any headline figures the bench
recorded. The output depends on the records alone, so running it twice
changes nothing. ``--check`` changes nothing and exits 1 when the README
differs from what the records give (a stale or hand-edited table), naming the
blocks; markers without a record and records without markers are reported,
and a marker pair out of order or unclosed is an error (exit 2).

Usage::

    .venv/bin/python bench/report.py            # rewrite README.md's blocks
    .venv/bin/python bench/report.py --check    # exit 1 if README.md is stale
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(ROOT))

from bench import records, stats  # noqa: E402

MARKER = re.compile(r"<!-- bench:([A-Za-z0-9_-]+):(start|end) -->")


class MarkerError(ValueError):
    """The README's markers do not pair up."""


def _number(value: float, unit: str) -> str:
    if unit == "ratio":
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _load(values: list[float] | None) -> str:
    return " / ".join(f"{v:.2f}" for v in values) if values else "unknown"


def provenance(record: Mapping[str, Any]) -> str:
    """When, where and on what the record's figures were measured: one paragraph."""
    e = record["environment"]
    sha = e.get("commit")
    commit = f"`{sha[:10]}`" if sha else "an unknown commit"
    if e.get("dirty"):
        commit += " with uncommitted changes"
    software = ", ".join(
        f"{label} {e[key]}"
        for label, key in (
            ("Python", "python"),
            ("Redis", "redis_server"),
            ("redis-py", "redis_py"),
            ("hiredis", "hiredis"),
        )
        if e.get(key)
    )
    return (
        f"Measured {e.get('date', 'at an unknown date')} on commit {commit}; load average "
        f"(1, 5, 15 min) {_load(e.get('load_before'))} before, {_load(e.get('load_after'))} "
        f"after; {e.get('cpus', '?')} CPUs; {software}."
    )


def _method(record: Mapping[str, Any]) -> str | None:
    rounds = len(record.get("rounds") or [])
    if not rounds:
        return None
    p = record.get("parameters", {})
    work = (
        f" of at least {p['min_seconds']:g} s of work per measurement" if "min_seconds" in p else ""
    )
    confidence = next(
        (s["confidence"] for s in [*record["ratios"].values(), *record["rates"].values()]), 0.95
    )
    return (
        f"{rounds} interleaved rounds{work}, order reversed every other round. Median of the "
        f"per-round values, their min–max and a {confidence:.0%} bootstrap interval of the "
        "median; a verdict only where the whole interval is on one side of the target."
    )


def _summary_rows(summaries: Mapping[str, Any], with_target: bool) -> list[str]:
    rows = []
    for name, s in summaries.items():
        unit = s["unit"]
        lo, hi = s["interval"]
        cells = [
            f"`{name}`",
            s.get("what", ""),
            _number(s["median"], unit),
            f"{_number(s['min'], unit)}–{_number(s['max'], unit)}",
            f"{_number(lo, unit)}–{_number(hi, unit)}",
        ]
        if with_target:
            target = s.get("target")
            cells += [
                "none" if target is None else f"≥ {_number(target, unit)}",
                s.get("verdict") or "",
            ]
        else:
            cells.insert(2, unit)
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def render(record: Mapping[str, Any]) -> str:
    """The Markdown block of one record; a verdict its interval does not give is an error."""
    for section in ("ratios", "rates"):
        for name, s in record.get(section, {}).items():
            if not stats.consistent(s):
                raise ValueError(
                    f"record {record['bench']}: the verdict of {name} ({s['verdict']}) is not "
                    f"what its interval {s['interval']} and target {s['target']} give"
                )
    out = [provenance(record)]
    method = _method(record)
    if method:
        out[0] += " " + method
    for note in record.get("notes", []):
        out.append(f"Note: {note}")
    if record.get("ratios"):
        out += [
            "",
            "| ratio | what | median | min–max | interval | target | verdict |",
            "|---|---|---:|---:|---:|---:|---|",
            *_summary_rows(record["ratios"], with_target=True),
        ]
    if record.get("rates"):
        out += [
            "",
            "| measurement | what | unit | median | min–max | interval |",
            "|---|---|---|---:|---:|---:|",
            *_summary_rows(record["rates"], with_target=False),
        ]
    headline = record.get("figures", {}).get("headline")
    if headline:
        out += ["", "| figure | value |", "|---|---|"]
        out += [f"| {row[0]} | {row[1]} |" for row in headline]
    return "\n".join(out)


def blocks(text: str) -> list[tuple[str, int, int]]:
    """(bench, start of the block's body, end of it) for each marker pair, in order."""
    found: list[tuple[str, int, int]] = []
    open_name: str | None = None
    body_start = 0
    for match in MARKER.finditer(text):
        name, kind = match.groups()
        if kind == "start":
            if open_name is not None:
                raise MarkerError(f"bench:{name}:start inside the unclosed block of {open_name}")
            open_name, body_start = name, match.end()
        else:
            if open_name != name:
                raise MarkerError(f"bench:{name}:end without bench:{name}:start before it")
            found.append((name, body_start, match.start()))
            open_name = None
    if open_name is not None:
        raise MarkerError(f"bench:{open_name}:start is never closed")
    return found


def regenerate(text: str, recs: Mapping[str, Mapping[str, Any]]) -> tuple[str, list[str]]:
    """``text`` with every block that has a record replaced; and the names left alone."""
    out, last, missing = [], 0, []
    for name, start, end in blocks(text):
        out.append(text[last:start])
        if name in recs:
            out.append("\n" + render(recs[name]) + "\n")
        else:
            out.append(text[start:end])
            missing.append(name)
        last = end
    out.append(text[last:])
    return "".join(out), missing


@click.command()
@click.option(
    "--readme",
    type=click.Path(dir_okay=False, path_type=Path),
    default=ROOT / "README.md",
    show_default=True,
)
@click.option(
    "--records",
    "records_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=records.RECORDS_DIR,
    show_default=True,
)
@click.option("--check", is_flag=True, help="change nothing; exit 1 if the README is stale")
def main(readme: Path, records_dir: Path, check: bool) -> None:
    """Regenerate the README's bench tables from the records."""
    if not readme.is_file():
        raise click.UsageError(f"no README at {readme}")
    text = readme.read_text()
    try:
        recs = records.read_all(records_dir)
        new, missing = regenerate(text, recs)
    except (MarkerError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    placed = {name for name, _, _ in blocks(text)}
    for name in missing:
        click.echo(
            f"no record for the block bench:{name} in {records_dir}: left as it is", err=True
        )
    for name in sorted(set(recs) - placed):
        click.echo(
            f"record {name} has no block (<!-- bench:{name}:start -->) in {readme}", err=True
        )
    stale = [
        n for n, s, e in blocks(text) if n in recs and text[s:e] != "\n" + render(recs[n]) + "\n"
    ]
    if check:
        if stale:
            click.echo(f"{readme}: stale bench blocks: {', '.join(stale)} (run make bench-report)")
            sys.exit(1)
        click.echo(f"{readme}: bench blocks match the records")
        return
    if new != text:
        readme.write_text(new)
    click.echo(f"{readme}: regenerated {', '.join(stale) or 'nothing (already current)'}")


if __name__ == "__main__":
    main()
