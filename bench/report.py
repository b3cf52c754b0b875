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
recorded. Two benches have tables of their own: ``durability`` (the matrix,
one row per cell: kills, kills that lost acknowledged entries, entries lost,
events lost after repair, time to repair, publish cost, each with its number
of trials; then its cost ratios against the plain cells) and ``mutation`` (per
mutated module: mutants, killed, survived, equivalent, score; the record
``bench/mutation_score.py`` writes). The block ``targets`` gathers, across
all records, every figure with a target and every floor (a figure whose
``what`` starts with "floor"); beside each target, the floor that bounds it
(:data:`FLOOR_OF`) and where that floor's interval puts the target: the
floor short of it too, the floor clear of it, or at the edge. The output
depends on the records alone, so running it twice changes nothing.
``--check`` changes nothing and exits 1 when the README differs from what the
records give (a stale or hand-edited table), naming the blocks; markers
without a record and records without markers are reported, and a marker pair
out of order or unclosed is an error (exit 2).

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

from bench import projection, records, stats  # noqa: E402

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
    ordering = _ordering(record.get("orders") or [])
    counted = "1 round" if rounds == 1 else f"{rounds} interleaved rounds"
    return (
        f"{counted}{work}, {ordering}. Median of the "
        f"per-round values, their min–max and a {confidence:.0%} bootstrap interval of the "
        "median; a verdict only where the whole interval is on one side of the target."
    )


def _ordering(orders: list[list[str]]) -> str:
    """How the rounds' measurements were ordered, read off the record's ``orders``."""
    if not orders:
        return "the order not recorded"
    if len(orders) == 1:
        return "one round, so no order to vary"
    if len(orders) > 1 and all(o == orders[0] for o in orders):
        return "the same order in every round"
    if all(o == (orders[0] if i % 2 == 0 else orders[0][::-1]) for i, o in enumerate(orders)):
        return "order reversed every other round"
    return "in the order each round gives (the record's orders)"


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
                "none"
                if target is None
                else f"{'≤' if s.get('at_most') else '≥'} {_number(target, unit)}",
                s.get("verdict") or "",
            ]
        else:
            cells.insert(2, unit)
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def render(record: Mapping[str, Any]) -> str:
    """The Markdown block of one record; a verdict its interval does not give is an error."""
    special = RENDERERS.get(record["bench"])
    if special is not None:
        return special(record)
    return _render_generic(record)


def _check_verdicts(record: Mapping[str, Any]) -> None:
    for section in ("ratios", "rates", "bounds"):
        for name, s in record.get(section, {}).items():
            if not stats.consistent(s):
                raise ValueError(
                    f"record {record['bench']}: the verdict of {name} ({s['verdict']}) is not "
                    f"what its interval {s['interval']} and target {s['target']} give"
                )


def _render_generic(record: Mapping[str, Any]) -> str:
    _check_verdicts(record)
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
    if record.get("bounds"):
        out += [
            "",
            "| figure | what | median | min–max | interval | target | verdict |",
            "|---|---|---:|---:|---:|---:|---|",
            *_summary_rows(record["bounds"], with_target=True),
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


def _opt(value: Any, fmt: str = "{:.3g}") -> str:
    return "–" if value is None else fmt.format(value)


def _yes(flag: bool) -> str:
    return "on" if flag else "off"


def render_durability(record: Mapping[str, Any]) -> str:
    """The durability matrix: one row per cell, then its costs against the plain cells."""
    _check_verdicts(record)
    p = record.get("parameters", {})
    rounds = len(record.get("rounds") or [])
    load, rate, dd_mb = p.get("load"), p.get("rate"), p.get("dd_mb")
    # Two servers ran; provenance's single "Redis" would name them wrongly.
    env = {k: v for k, v in record["environment"].items() if k != "redis_server"}
    servers = record.get("figures", {}).get("servers", {})
    out = [
        provenance({**record, "environment": env})
        + (
            " Servers: " + ", ".join(f"{v} (cells `{k}`)" for k, v in servers.items()) + "."
            if servers
            else ""
        )
        + f" {rounds} interleaved round{'s' if rounds != 1 else ''} (each round kills "
        "redis-server once in every cell, the order reversed every other round); each row "
        "says how many kills it is made of. "
        f"Per kill: {_opt(load, '{:g}')} s of load at {_opt(rate, '{:g}')} escrows/s, then a "
        f"{_opt(dd_mb, '{:g}')} MB `dd conv=fsync` into the data directory and SIGKILL while "
        "a background fsync is pending (or at the end of the window). The relay rate: "
        f"backlogs of {_opt(p.get('drain_rows'), '{:,}')} rows drained flat out, at least "
        f"{_opt(p.get('min_seconds'), '{:g}')} s of timed work per kill."
    ]
    out += [f"Note: {note}" for note in record.get("notes", [])]
    rates = record.get("rates", {})
    out += [
        "",
        "| server | appendfsync | repair | WAITAOF | kills | kills that lost acked entries "
        "| acked entries lost (max in one kill) | events lost after repair | repair s (max) "
        "| recovered s (median) | relay rows/s, median (min–max) "
        "| publish p50 / p99 ms (median) | publish rows/s under load (median) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in record["figures"]["cells"]:
        rate = rates.get(c["cell"])
        relay = (
            f"{_number(rate['median'], '')} ({_number(rate['min'], '')}–{_number(rate['max'], '')})"
            if rate
            else _opt(c.get("drain_rows_per_s_median"), "{:,.0f}")
        )
        cells = [
            c["server"],
            c["appendfsync"],
            _yes(c["repair"]),
            _yes(c["waitaof"]),
            str(c["trials"]),
            f"{c['kills_with_loss']} of {c['trials']}",
            f"{c['acked_lost_total']:,} ({c['acked_lost_max']:,})",
            f"{c['lost_after_total']:,}",
            _opt(c.get("repair_s_max")),
            _opt(c.get("recovered_s_median")),
            relay,
            f"{_opt(c.get('latency_p50_ms_median'))} / {_opt(c.get('latency_p99_ms_median'))}",
            _opt(c.get("throughput_rows_per_s_median"), "{:,.0f}"),
        ]
        out.append("| " + " | ".join(cells) + " |")
    ratios = record.get("ratios", {})
    if ratios:
        out += [
            "",
            "| cost | what | rounds | median | min–max | interval |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, s in ratios.items():
            lo, hi = s["interval"]
            out.append(
                f"| `{name}` | {s.get('what', '')} | {len(s['per_round'])} | "
                f"{_number(s['median'], 'ratio')} | {_number(s['min'], 'ratio')}–"
                f"{_number(s['max'], 'ratio')} | {_number(lo, 'ratio')}–{_number(hi, 'ratio')} |"
            )
    return "\n".join(out)


def render_mutation(record: Mapping[str, Any]) -> str:
    """The mutation score per mutated module, from ``bench/mutation_score.py``'s record."""
    sha = record.get("commit")
    tool = " ".join(str(record[k]) for k in ("tool", "tool_version") if record.get(k))
    head = (
        f"Measured {record.get('date', 'at an unknown date')} on commit "
        + (f"`{sha[:10]}`" if sha else "an unknown commit")
        + (f" with {tool}" if tool else "")
        + (f", Python {record['python']}" if record.get("python") else "")
        + f". Score = {record.get('score_definition', 'killed / (total - equivalent)')};"
        + " an equivalent mutant cannot change behaviour, so no test can kill it."
    )
    if record.get("method"):
        head += f" Method: {record['method']}."
    out = [
        head,
        "",
        "| module | mutants | killed | survived | equivalent | score |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    totals = dict.fromkeys(("total", "killed", "survived", "equivalent"), 0)
    unexplained: list[str] = []
    for module, m in record["modules"].items():
        for key in totals:
            totals[key] += m[key]
        unexplained += m.get("unexplained_survivors", []) + list(m.get("not_run", {}))
        out.append(
            f"| `{module}` | {m['total']:,} | {m['killed']:,} | {m['survived']:,} | "
            f"{m['equivalent']:,} | {m['score']:.1%} |"
        )
    judged = totals["total"] - totals["equivalent"]
    score = totals["killed"] / judged if judged else 1.0
    out.append(
        f"| all | {totals['total']:,} | {totals['killed']:,} | {totals['survived']:,} | "
        f"{totals['equivalent']:,} | {score:.1%} |"
    )
    if unexplained:
        out += ["", f"Not killed and not explained: {', '.join(f'`{u}`' for u in unexplained)}."]
    return "\n".join(out)


def _check_projection(record: Mapping[str, Any]) -> list[projection.Row]:
    """The projection's rows as its inputs give them; a record that says otherwise
    (rows edited, or computed by another model) is refused."""
    recorded = record["figures"]["projection"]
    inputs = projection.Inputs.from_dict(recorded["inputs"])
    machines = [row["machines"] for row in recorded["rows"]]
    rows = projection.project(inputs, machines)
    if [row.to_dict() for row in rows] != recorded["rows"]:
        raise ValueError(
            f"record {record['bench']}: the projection's rows are not what its inputs give"
        )
    if recorded["assumptions"] != projection.assumptions(inputs):
        raise ValueError(
            f"record {record['bench']}: the projection's assumptions are not its model's"
        )
    return rows


def render_scale(record: Mapping[str, Any]) -> str:
    """The scale bench: its ratios and rates, per partition and Redis CPU per entry,
    and the projection to N machines with its assumptions."""
    _check_verdicts(record)
    rows = _check_projection(record)
    p = record.get("parameters", {})
    layouts = record["figures"]["layouts"]
    out = [provenance(record) + " " + (_method(record) or "")]
    out.append(
        f"Layouts: `single` one redis-server, unpartitioned; `partitioned` the same server, "
        f"{p.get('partitions')} partitions; `cluster` {p.get('cluster')}, the same partitions. "
        f"{p.get('entries', 0):,} entries per step ({p.get('escrows', 0):,} escrow lifecycles; "
        f"{p.get('entries_ledger', 0):,} of them read by the ledger), store {p.get('store')}; "
        f"busy partitions: "
        + ", ".join(f"{name} {x['partitions_busy']}" for name, x in layouts.items())
        + "."
    )
    out += [f"Note: {note}" for note in record.get("notes", [])]
    out += [
        "",
        "| ratio | what | median | min–max | interval |",
        "|---|---|---:|---:|---:|",
    ]
    for name, s in record["ratios"].items():
        lo, hi = s["interval"]
        out.append(
            f"| `{name}` | {s.get('what', '')} | {_number(s['median'], 'ratio')} | "
            f"{_number(s['min'], 'ratio')}–{_number(s['max'], 'ratio')} | "
            f"{_number(lo, 'ratio')}–{_number(hi, 'ratio')} |"
        )
    measures = record["figures"]["measures"]
    out += [
        "",
        "| measurement | what | entries/s, median | min–max | interval | per busy partition "
        "| Redis CPU µs per entry |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in record["rates"].items():
        lo, hi = s["interval"]
        m = measures[name]
        cpu = m.get("redis_cpu_per_entry")
        out.append(
            f"| `{name}` | {s.get('what', '')} | {_number(s['median'], '')} | "
            f"{_number(s['min'], '')}–{_number(s['max'], '')} | {_number(lo, '')}–"
            f"{_number(hi, '')} | {_number(m['rate_per_partition'], '')} | "
            f"{_opt(None if cpu is None else cpu * 1e6)} |"
        )
    out += [
        "",
        "Projection (`bench/projection.py`, computed from the figures above), in log "
        "entries per second:",
        "",
        "| machines | partitions per machine (most) | masters | machines' limit (slowest stage) "
        "| Redis limit | SQL store limit | projected | bound by |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        out.append(
            f"| {row.machines} | {row.partitions_per_machine} | {row.masters} | "
            f"{row.machines_limit:,.0f} ({row.slowest_stage}) | "
            f"{_opt(row.redis_limit, '{:,.0f}')} | {row.store_limit:,.0f} | "
            f"{row.projected:,.0f} | {row.bound_by} |"
        )
    out += ["", "Assumptions:", ""]
    out += [f"* {line}" for line in record["figures"]["projection"]["assumptions"]]
    return "\n".join(out)


RENDERERS = {"durability": render_durability, "mutation": render_mutation, "scale": render_scale}

#: The block that gathers, across records, every figure with a target and every floor.
TARGETS_BLOCK = "targets"


def _is_floor(summary: Mapping[str, Any]) -> bool:
    return str(summary.get("what", "")).startswith("floor")


#: The floor beside each target: (bench, target) -> a figure of the same record with
#: the same anchor and unit, the plain code doing the target's work; ``self`` for a
#: ratio to its own floor (1 by construction); ``headline:<label>`` for capacity,
#: whose bound is not plain code but the cores at the runtime's own measured CPU per
#: lifecycle (shown as its record says it, marked as such). A floor is one plain
#: implementation's median with its interval, not a proof: the runtime can match
#: it, and in single rounds beat it.
FLOOR_OF: dict[tuple[str, str], str] = {
    ("simulate", "speed_vs_floor"): "self",
    ("throughput", "parallel_vs_raw4"): "plain4_vs_raw4",
    ("throughput", "noop_vs_raw1"): "ordered_raw1_vs_raw1",
    ("throughput", "noop_vs_faststream_batch"): "ordered_raw1_vs_faststream_batch",
    ("throughput", "relay_vs_xadd"): "plain_relay_vs_xadd",
    ("sse", "latency_p99_sse_vs_xreadgroup"): "latency_p99_plain_vs_xreadgroup",
    ("sse", "latency_p99_9_sse_vs_xreadgroup"): "latency_p99_9_plain_vs_xreadgroup",
    ("simulate", "batched_at_10"): "floor_batched_at_10",
    ("capacity", "http_vs_direct"): "headline:the target needs",
    ("capacity_postgresql", "http_vs_direct"): "headline:the target needs",
}

OUT_OF_REACH = "plain code falls short too"
WITHIN_REACH = "plain code clears it"
AT_THE_EDGE = "at the edge"


def reach(
    target: float, at_most: bool, lo: float, hi: float, rounds: int = stats.MIN_ROUNDS
) -> str:
    """Where a floor's interval ``lo``-``hi`` puts a target: short of it too when the
    whole interval is on the wrong side (below a ``>=`` target, above an ``at_most``
    one), clear of it when the whole interval clears it, else at the edge (the
    floor's own spread straddles it, or fewer than ``stats.MIN_ROUNDS`` rounds
    give it no spread to speak of)."""
    if rounds < stats.MIN_ROUNDS:
        return AT_THE_EDGE
    beyond = lo > target if at_most else hi < target
    clear = hi <= target if at_most else lo >= target
    return OUT_OF_REACH if beyond else WITHIN_REACH if clear else AT_THE_EDGE


def _floor_cell(bench: str, record: Mapping[str, Any], name: str, s: Mapping[str, Any]) -> str:
    """The target's floor as the targets table shows it (``—``: none known)."""
    floor = FLOOR_OF.get((bench, name))
    if floor is None:
        return "—"
    if floor == "self":
        return f"1 (it is a ratio to its floor): {reach(s['target'], bool(s.get('at_most')), 1, 1)}"
    if floor.startswith("headline:"):
        label = floor.split(":", 1)[1]
        rows = record.get("figures", {}).get("headline", [])
        found = [value for row_label, value in rows if str(row_label).startswith(label)]
        return f"CPU bound, not plain code: {found[0]}" if found else "—"
    for section in ("ratios", "rates", "bounds"):
        f = record.get(section, {}).get(floor)
        if f is not None:
            unit, (lo, hi) = f["unit"], f["interval"]
            rounds = len(f.get("per_round", ()))
            where = reach(s["target"], bool(s.get("at_most")), lo, hi, rounds)
            suffix = "" if unit == "ratio" else f" {unit}"
            return (
                f"`{floor}` {_number(f['median'], unit)}{suffix} "
                f"({_number(lo, unit)}–{_number(hi, unit)}): {where}"
            )
    return "—"


def render_targets(recs: Mapping[str, Mapping[str, Any]]) -> str:
    """One table of every figure that has a target, from whichever record holds it,
    with the floor that bounds it and where that floor puts it, then the floors the
    benches measured (the most a figure can be on this machine while the work it
    names stays in the loop), each with its record's commit and date."""
    targets: list[str] = []
    floors: list[str] = []
    for bench in sorted(recs):
        record = recs[bench]
        _check_verdicts(record)
        e = record.get("environment", {})
        where = f"`{(e.get('commit') or '?')[:10]}` {str(e.get('date', ''))[:10]}"
        for section in ("ratios", "rates", "bounds"):
            for name, s in record.get(section, {}).items():
                unit = s["unit"]
                lo, hi = s["interval"]
                cells = [
                    bench,
                    f"`{name}`",
                    s.get("what", ""),
                    _number(s["median"], unit) + ("" if unit == "ratio" else f" {unit}"),
                    f"{_number(lo, unit)}–{_number(hi, unit)}",
                ]
                if s.get("target") is not None:
                    side = "≤" if s.get("at_most") else "≥"
                    cells += [
                        f"{side} {_number(s['target'], unit)}",
                        s.get("verdict") or "",
                        _floor_cell(bench, record, name, s),
                        where,
                    ]
                    targets.append("| " + " | ".join(cells) + " |")
                elif _is_floor(s):
                    floors.append("| " + " | ".join([*cells, where]) + " |")
    out = [
        "| bench | figure | what | median | interval | target | verdict | its floor here | "
        "measured |",
        "|---|---|---|---:|---:|---:|---|---|---|",
        *targets,
    ]
    if floors:
        out += [
            "",
            "Floors: the plain code doing the same work (with what the figure keeps in its "
            "loop) against the anchor — the most the figure above it can reach here.",
            "",
            "| bench | figure | what | median | interval | measured |",
            "|---|---|---|---:|---:|---|",
            *floors,
        ]
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
        if name == TARGETS_BLOCK and recs:
            out.append("\n" + render_targets(recs) + "\n")
        elif name in recs:
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
    for name in [m for m in missing if m != TARGETS_BLOCK]:
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
    stale += [
        n
        for n, s, e in blocks(text)
        if n == TARGETS_BLOCK and recs and text[s:e] != "\n" + render_targets(recs) + "\n"
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
