"""``bench/report.py`` regenerates the README's bench blocks from records, and only them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import records, report, stats
from bench.stats import Sample
from tests.support import ROOT

START, END = "<!-- bench:throughput:start -->", "<!-- bench:throughput:end -->"


def throughput_record(ratio_a: list[int]) -> dict:  # type: ignore[type-arg]
    rounds = [{"a": Sample(a, 1.0), "b": Sample(1000, 1.0)} for a in ratio_a]
    env = records.environment("7.0.15", [1.5, 2.25, 3.0])
    env.update(commit="0123456789abcdef0123456789abcdef01234567", dirty=False,
               date="2026-12-06T03:00:00+00:00")  # fmt: skip
    record = records.build(
        "throughput",
        env,
        parameters={"rounds": len(rounds), "min_seconds": 1.0},
        rounds=rounds,
        orders=[["a", "b"], ["b", "a"], ["a", "b"]][: len(rounds)],
        ratios=[stats.ratio_summary("a_vs_b", rounds, "a", "b", what="a / b", target=0.25)],
        rates=[stats.rate_summary("a", rounds, what="the a loop", unit="entries/s")],
    )
    record["environment"]["load_after"] = [2.5, 2.5, 3.0]
    return record


def readme_copy(tmp_path: Path) -> tuple[Path, str]:
    """The real README (its own generated blocks taken out) with a throughput block
    (hand-typed figures in it) and an sse block."""
    original = re.sub(
        r"<!-- bench:(\w+):start -->.*?<!-- bench:\1:end -->\n?",
        "",
        (ROOT / "README.md").read_text(),
        flags=re.S,
    )
    text = (
        original
        + f"\n## Figures\n\n{START}\nhand-typed: 38% of raw, MET\n{END}\n\n"
        + "<!-- bench:sse:start -->\nkept\n<!-- bench:sse:end -->\n"
    )
    path = tmp_path / "README.md"
    path.write_text(text)
    return path, original


def run_report(readme: Path, recs: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "report.py"), "--readme", str(readme),
         "--records", str(recs), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_report_regenerates_the_block_from_the_record_and_check_agrees(tmp_path) -> None:  # type: ignore[no-untyped-def]
    recs = tmp_path / "records"
    records.write(throughput_record([300, 310, 320, 305, 315]), recs / "throughput.json")
    readme, original = readme_copy(tmp_path)
    before = readme.read_text()

    stale = run_report(readme, recs, "--check")
    assert stale.returncode == 1 and "throughput" in stale.stdout
    assert readme.read_text() == before  # --check changes nothing

    done = run_report(readme, recs)
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert text.startswith(original)  # everything outside the blocks is as it was
    block = text[text.index(START) + len(START) : text.index(END)]
    assert "hand-typed" not in block
    assert "commit `0123456789`" in block and "2026-12-06T03:00:00+00:00" in block
    assert "1.50 / 2.25 / 3.00 before, 2.50 / 2.50 / 3.00 after" in block
    assert "Redis 7.0.15" in block and "5 interleaved rounds of at least 1 s" in block
    assert "| `a_vs_b` | a / b | 0.31 | 0.3–0.32 |" in block and "| ≥ 0.25 | MET |" in block
    assert "| `a` | the a loop | entries/s | 310 | 300–320 |" in block
    assert "<!-- bench:sse:start -->\nkept\n<!-- bench:sse:end -->" in text  # no record: kept
    assert "no record for the block bench:sse" in done.stderr

    assert run_report(readme, recs, "--check").returncode == 0
    again = run_report(readme, recs)
    assert again.returncode == 0 and readme.read_text() == text  # idempotent

    # A figure edited by hand in the block makes the README stale again.
    readme.write_text(text.replace("| 0.31 |", "| 0.38 |"))
    assert run_report(readme, recs, "--check").returncode == 1


def test_an_inconclusive_record_renders_without_a_verdict_it_does_not_have(tmp_path) -> None:  # type: ignore[no-untyped-def]
    record = throughput_record([200, 240, 260, 300, 220])
    assert record["ratios"]["a_vs_b"]["verdict"] == stats.INCONCLUSIVE
    block = report.render(record)
    assert "| ≥ 0.25 | INCONCLUSIVE |" in block and "MET" not in block


def test_a_record_whose_verdict_its_interval_does_not_give_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    recs = tmp_path / "records"
    record = throughput_record([200, 240, 260, 300, 220])  # INCONCLUSIVE
    record["ratios"]["a_vs_b"]["verdict"] = stats.MET  # as if typed by hand
    records.write(record, recs / "throughput.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\n")
    result = run_report(readme, recs)
    assert result.returncode == 2 and "the verdict of a_vs_b (MET)" in result.stderr
    assert readme.read_text() == f"{START}\n{END}\n"


def test_a_dirty_tree_is_said(tmp_path) -> None:  # type: ignore[no-untyped-def]
    record = throughput_record([300, 310, 320])
    record["environment"]["dirty"] = True
    assert "commit `0123456789` with uncommitted changes" in report.render(record)


def test_markers_that_do_not_pair_are_an_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    recs = tmp_path / "records"
    records.write(throughput_record([300, 310, 320]), recs / "throughput.json")
    nested = f"{START}\n<!-- bench:sse:start -->\n{END}"
    for broken, says in ((f"{START}\nx\n", "never closed"),
                         (f"{END}\n", "without bench:throughput:start"),
                         (nested, "inside the unclosed")):  # fmt: skip
        readme = tmp_path / "README.md"
        readme.write_text("# T\n" + broken)
        result = run_report(readme, recs, "--check")
        assert result.returncode == 2 and says in result.stderr, result.stderr
        assert readme.read_text() == "# T\n" + broken
    # Two records of one bench: which one the table shows would be an accident.
    readme.write_text(f"{START}\n{END}\n")
    records.write(throughput_record([1, 2, 3]), recs / "throughput-old.json")
    result = run_report(readme, recs)
    assert result.returncode == 2 and "two records of bench 'throughput'" in result.stderr
    assert readme.read_text() == f"{START}\n{END}\n"


def test_records_of_the_sse_and_simulate_benches_render(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rounds = [{"replay_sse": Sample(1000, 0.5), "replay_xrange": Sample(1000, 0.05)}] * 3
    env = records.environment(None, [1.0, 1.0, 1.0])
    record = records.build(
        "sse",
        env,
        parameters={"repeat": 3},
        rounds=rounds,
        ratios=[
            stats.ratio_summary("replay_sse_vs_xrange", rounds, "replay_sse", "replay_xrange")
        ],  # fmt: skip
        figures={"headline": [["SSE connections held by one process", "200 of 200"]]},
    )
    path = records.write(record, tmp_path / "sse.json")
    block = report.render(json.loads(path.read_text()))
    assert "| `replay_sse_vs_xrange` |  | 0.1 | 0.1–0.1 | 0.1–0.1 | none |  |" in block
    assert "| SSE connections held by one process | 200 of 200 |" in block


def test_bounds_render_with_their_ceiling_and_are_checked(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = records.environment(None, [1.0, 1.0, 1.0])
    kib = stats.summarise(
        "server_kib_per_connection", [30.0, 31.0, 29.5], what="KiB", unit="KiB", target=32.0,
        at_most=True,
    )  # fmt: skip
    record = records.build("sse", env, parameters={}, bounds=[kib])
    assert "bounds" not in records.build("sse", env, parameters={})  # other records unchanged
    block = report.render(json.loads(records.write(record, tmp_path / "sse.json").read_text()))
    assert "| `server_kib_per_connection` | KiB | 30 | 29.5–31 |" in block
    assert "| ≤ 32 | MET |" in block
    record["bounds"]["server_kib_per_connection"]["verdict"] = stats.NOT_MET  # typed by hand
    with pytest.raises(ValueError, match="server_kib_per_connection"):
        report.render(record)


def durability_record() -> dict:  # type: ignore[type-arg]
    """Three rounds of two cells: everysec with repair (one kill lost 4 entries, all
    given back) and the plain cell; relay drains of 1000 rows."""
    fast, slow = "auto/no/no repair", "auto/everysec/repair"
    rounds = [{fast: Sample(1000, 0.020), slow: Sample(1000, s)} for s in (0.040, 0.050, 0.025)]
    env = records.environment("7.0.15 (auto)", [1.0, 1.0, 1.0])
    env.update(commit="fedcba9876543210fedcba9876543210fedcba98", dirty=False,
               date="2026-12-06T04:00:00+00:00")  # fmt: skip

    def cell(name: str, fsync: str, repair: bool, **figures: object) -> dict:  # type: ignore[type-arg]
        return {"cell": name, "server": "auto", "appendfsync": fsync, "repair": repair,
                "waitaof": False, "trials": 3, "kills_with_loss": 0, "acked_lost_total": 0,
                "acked_lost_max": 0, "lost_after_total": 0, "missing_after_total": 0,
                "repair_s_max": None, "recovered_s_median": 1.1,
                "drain_rows_per_s_median": 50000.0, "throughput_rows_per_s_median": 1000.0,
                "latency_p50_ms_median": 11.5, "latency_p99_ms_median": 55.0,
                **figures}  # fmt: skip

    return records.build(
        "durability",
        env,
        parameters={
            "rate": 1000.0,
            "load": 2.0,
            "dd_mb": 400,
            "trials": 3,
            "drain_rows": 5000,
            "min_seconds": 1.0,
        },  # fmt: skip
        rounds=rounds,
        orders=[[fast, slow], [slow, fast], [fast, slow]],
        ratios=[
            stats.ratio_summary(
                f"relay rate {slow} / {fast}",
                rounds,
                slow,
                fast,
                what="relay drain against the plain cell",
            )
        ],  # fmt: skip
        rates=[stats.rate_summary(n, rounds, unit="rows/s") for n in (slow, fast)],
        figures={
            "servers": {"auto": "redis-server 7.0.15"},
            "cells": [
                cell(
                    slow,
                    "everysec",
                    True,
                    kills_with_loss=1,
                    acked_lost_total=4,
                    acked_lost_max=4,
                    repair_s_max=0.0019,
                    latency_p50_ms_median=26.5,
                ),
                cell(fast, "no", False),
            ],  # fmt: skip
            "trials": [],
        },
    )


def test_the_durability_record_renders_as_a_matrix_with_its_trials_and_costs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = records.write(durability_record(), tmp_path / "durability.json")
    block = report.render(records.read(path))
    assert "commit `fedcba9876`" in block and "2026-12-06T04:00:00+00:00" in block
    assert "Servers: redis-server 7.0.15 (cells `auto`)." in block
    assert "Redis 7.0.15" not in block  # two servers may run: named per cell instead
    assert "3 interleaved rounds" in block and "2 s of load at 1000 escrows/s" in block
    assert "400 MB `dd conv=fsync`" in block
    assert "backlogs of 5,000 rows drained flat out, at least 1 s of timed work per kill" in block
    # everysec with repair: 3 kills, 1 lost 4 acked entries, 0 lost after repair;
    # relay 25,000 (20,000–40,000) rows/s; p50 26.5 ms.
    assert (
        "| auto | everysec | on | off | 3 | 1 of 3 | 4 (4) | 0 | 0.0019 | 1.1 | "
        "25,000 (20,000–40,000) | 26.5 / 55 | 1,000 |"
    ) in block
    assert (
        "| auto | no | off | off | 3 | 0 of 3 | 0 (0) | 0 | – | 1.1 | 50,000 (50,000–50,000)"
        in block
    )
    # The cost: median of per-round ratios 0.5, 0.4, 0.8 -> 0.5 (0.4–0.8), over 3 rounds.
    assert (
        "| `relay rate auto/everysec/repair / auto/no/no repair` | relay drain against the "
        "plain cell | 3 | 0.5 | 0.4–0.8 |"
    ) in block


def mutation_record() -> dict:  # type: ignore[type-arg]
    """As bench/mutation_score.py --record writes it (no ``bench`` key)."""

    def module(total: int, killed: int, survived: int, equivalent: int) -> dict:  # type: ignore[type-arg]
        judged = total - equivalent
        return {"total": total, "killed": killed, "survived": survived,
                "equivalent": equivalent, "score": round(killed / judged, 4),
                "unexplained_survivors": [], "not_run": {}, "equivalents": []}  # fmt: skip

    return {
        "commit": "abcdef0123456789abcdef0123456789abcdef01",
        "date": "2026-12-06T03:34:33+00:00",
        "tool": "mutmut",
        "tool_version": "3.8.1",
        "python": "3.11.7",
        "score_definition": "killed / (total - equivalent)",
        "mutated": ["workbench/domain/escrow.py", "workbench/delivery/handoff.py"],
        "modules": {
            "workbench.domain.escrow": module(664, 663, 1, 1),
            "workbench.delivery.handoff": module(40, 36, 4, 2),
        },
    }


def test_the_mutation_record_renders_per_module_and_a_stale_table_fails_check(tmp_path) -> None:  # type: ignore[no-untyped-def]
    recs = tmp_path / "records"
    recs.mkdir()
    (recs / "mutation.json").write_text(json.dumps(mutation_record(), indent=2))
    records.write(durability_record(), recs / "durability.json")
    assert sorted(records.read_all(recs)) == ["durability", "mutation"]  # named by its file

    block = report.render(records.read_all(recs)["mutation"])
    assert "Measured 2026-12-06T03:34:33+00:00 on commit `abcdef0123` with mutmut 3.8.1" in block
    assert "killed / (total - equivalent)" in block
    assert "| `workbench.domain.escrow` | 664 | 663 | 1 | 1 | 100.0% |" in block
    assert "| `workbench.delivery.handoff` | 40 | 36 | 4 | 2 | 94.7% |" in block
    # All modules: 699 killed of 704 - 3 judged.
    assert "| all | 704 | 699 | 5 | 3 | 99.7% |" in block
    assert "Not killed and not explained" not in block

    readme = tmp_path / "README.md"
    readme.write_text(
        "# T\n<!-- bench:mutation:start -->\nhand-typed 100%\n<!-- bench:mutation:end -->\n"
        "<!-- bench:durability:start -->\n<!-- bench:durability:end -->\n"
    )
    stale = run_report(readme, recs, "--check")
    assert stale.returncode == 1 and "mutation, durability" in stale.stdout
    assert run_report(readme, recs).returncode == 0
    assert run_report(readme, recs, "--check").returncode == 0
    text = readme.read_text()
    assert "hand-typed" not in text and "| all | 704 | 699 |" in text

    # A new record (a later run) makes each table stale again.
    changed = mutation_record()
    replay = changed["modules"]["workbench.delivery.handoff"]
    replay.update(killed=38, survived=2, score=1.0)
    (recs / "mutation.json").write_text(json.dumps(changed))
    result = run_report(readme, recs, "--check")
    assert result.returncode == 1 and "stale bench blocks: mutation" in result.stdout
    (recs / "mutation.json").write_text(json.dumps(mutation_record()))
    other = durability_record()
    other["figures"]["cells"][0]["lost_after_total"] = 2
    records.write(other, recs / "durability.json")
    result = run_report(readme, recs, "--check")
    assert result.returncode == 1 and "stale bench blocks: durability" in result.stdout


def test_unexplained_survivors_are_named_under_the_mutation_table() -> None:
    record = mutation_record()
    record["bench"] = "mutation"
    record["modules"]["workbench.delivery.handoff"]["unexplained_survivors"] = [
        "x_take_live__mutmut_3"
    ]
    block = report.render(record)
    assert "Not killed and not explained: `x_take_live__mutmut_3`." in block


def test_the_targets_block_gathers_every_target_and_floor_across_records(tmp_path) -> None:  # type: ignore[no-untyped-def]
    met = throughput_record([300, 310, 320, 305, 315])
    rounds = [{"a": Sample(a, 1.0), "b": Sample(1000, 1.0)} for a in (500, 510, 520)]
    other = throughput_record([300, 310, 320])
    other["bench"] = "relay"
    other["ratios"] = {
        "x_vs_y": stats.ratio_summary("x_vs_y", rounds, "a", "b", what="x / y").to_dict(),
        "floor_ab": stats.ratio_summary(
            "floor_ab", rounds, "a", "b", what="floor: plain / anchor"
        ).to_dict(),
    }
    other["bounds"] = {
        "kib": stats.summarise(
            "kib", [20.0, 21.0, 22.0], what="KiB each", unit="KiB", target=32, at_most=True
        ).to_dict()
    }
    block = report.render_targets({"throughput": met, "relay": other})
    lines = block.splitlines()
    assert "| relay | `kib` | KiB each | 21 KiB | 20–22 | ≤ 32 | MET |" in block  # a ceiling
    target_rows = [ln for ln in lines if "| ≥ " in ln]
    assert target_rows == [
        "| throughput | `a_vs_b` | a / b | 0.31 | 0.3–0.32 | ≥ 0.25 | MET | — "
        "| `0123456789` 2026-12-06 |"
    ]
    floors = lines[lines.index("| bench | figure | what | median | interval | measured |") :]
    assert "| relay | `floor_ab` | floor: plain / anchor | 0.51 |" in "\n".join(floors)
    assert "x_vs_y" not in block  # neither a target nor a floor

    # The README block follows the records; --check finds it stale when they change.
    recs = tmp_path / "records"
    records.write(met, recs / "throughput.json")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:targets:start -->\n<!-- bench:targets:end -->\n")
    assert run_report(readme, recs, "--check").returncode == 1
    assert run_report(readme, recs).returncode == 0
    assert "| ≥ 0.25 | MET |" in readme.read_text()
    assert run_report(readme, recs, "--check").returncode == 0
    records.write(throughput_record([200, 240, 260, 300, 220]), recs / "throughput.json")
    assert run_report(readme, recs, "--check").returncode == 1


def test_reach_says_where_a_floors_interval_puts_a_target() -> None:
    # A ">=" target: out of reach only when the whole floor interval is below it.
    assert report.reach(0.33, False, 0.26, 0.29) == report.OUT_OF_REACH
    assert report.reach(0.33, False, 0.33, 0.40) == report.WITHIN_REACH
    assert report.reach(0.33, False, 0.30, 0.35) == report.AT_THE_EDGE
    assert report.reach(0.33, False, 0.30, 0.33) == report.AT_THE_EDGE
    # A ceiling: out of reach only when the whole interval is above it.
    assert report.reach(1.3, True, 1.58, 2.08) == report.OUT_OF_REACH
    assert report.reach(1.3, True, 0.86, 1.30) == report.WITHIN_REACH
    assert report.reach(1.3, True, 1.20, 1.40) == report.AT_THE_EDGE
    assert report.reach(1.3, True, 1.30, 1.40) == report.AT_THE_EDGE
    # Too few rounds give a floor no spread to judge by.
    assert report.reach(0.33, False, 0.26, 0.29, rounds=2) == report.AT_THE_EDGE


def test_every_floor_named_beside_a_target_is_in_its_record_with_the_same_anchor() -> None:
    recs = {p.stem: json.loads(p.read_text()) for p in (ROOT / "bench" / "records").glob("*.json")}
    assert report.FLOOR_OF  # the loop below runs
    for (bench, target), floor in report.FLOOR_OF.items():
        record = recs[bench]
        section = next(k for k in ("ratios", "rates", "bounds") if target in record.get(k, {}))
        t = record[section][target]
        if floor == "self":
            assert t["denominator"] == "floor", (bench, target)
        elif floor.startswith("headline:"):
            labels = [row[0] for row in record["figures"]["headline"]]
            assert any(label.startswith(floor.split(":", 1)[1]) for label in labels), bench
        else:
            f = record[section][floor]  # a ratio's floor is a ratio, a rate's a rate
            assert f["what"].startswith("floor") and f["unit"] == t["unit"], (bench, floor)
            assert f.get("denominator") == t.get("denominator"), (bench, target, floor)


def test_each_target_shows_the_floor_that_bounds_it_and_where_it_puts_it(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    record = throughput_record([300, 310, 320, 305, 315])  # a_vs_b, target 0.25
    rounds = [{"a": Sample(a, 1.0), "b": Sample(1000, 1.0)} for a in (200, 210, 220)]
    floor = stats.ratio_summary("floor_ab", rounds, "a", "b", what="floor: plain / anchor")
    record["ratios"]["floor_ab"] = floor.to_dict()
    monkeypatch.setitem(report.FLOOR_OF, ("throughput", "a_vs_b"), "floor_ab")
    row = next(ln for ln in report.render_targets({"throughput": record}).splitlines()
               if "`a_vs_b`" in ln)  # fmt: skip
    assert f"| `floor_ab` 0.21 (0.2–0.22): {report.OUT_OF_REACH} |" in row
    # A floor that clears the target, and one whose spread straddles it.
    for values, said in (((260, 270, 280), report.WITHIN_REACH), ((240, 250, 260), "edge")):
        assert said not in report.render_targets({"throughput": record})
        rounds = [{"a": Sample(a, 1.0), "b": Sample(1000, 1.0)} for a in values]
        record["ratios"]["floor_ab"] = stats.ratio_summary(
            "floor_ab", rounds, "a", "b", what="floor: plain / anchor"
        ).to_dict()
        assert said in report.render_targets({"throughput": record})
    # A ceiling reads the other way: a floor below it clears it.
    record["ratios"]["a_vs_b"].update(target=0.3, at_most=True, verdict=stats.MET)
    record["ratios"]["a_vs_b"]["interval"] = [0.2, 0.22]
    assert f"(0.24–0.26): {report.WITHIN_REACH}" in report.render_targets({"throughput": record})
    record["ratios"]["floor_ab"]["interval"] = [0.31, 0.4]
    assert f"(0.31–0.4): {report.OUT_OF_REACH}" in report.render_targets({"throughput": record})
    # A ratio to its own floor; a headline bound (capacity), marked as not plain code;
    # none known: a dash.
    monkeypatch.setitem(report.FLOOR_OF, ("throughput", "a_vs_b"), "self")
    assert f"1 (it is a ratio to its floor): {report.OUT_OF_REACH}" in report.render_targets(
        {"throughput": record}
    )
    record["figures"] = {"headline": [["the target needs 0.5 x direct", "9/s needed; 4/s"]]}
    monkeypatch.setitem(report.FLOOR_OF, ("throughput", "a_vs_b"), "headline:the target needs")
    assert "| CPU bound, not plain code: 9/s needed; 4/s |" in report.render_targets(
        {"throughput": record}
    )
    monkeypatch.delitem(report.FLOOR_OF, ("throughput", "a_vs_b"))
    assert "| MET | — |" in report.render_targets({"throughput": record})


def test_the_method_line_says_how_the_rounds_were_ordered() -> None:
    from bench.report import _ordering

    assert _ordering([["a", "b"], ["b", "a"], ["a", "b"]]) == "order reversed every other round"
    assert _ordering([["a", "b"], ["a", "b"]]) == "the same order in every round"
    assert _ordering([["a", "b", "c"], ["b", "c", "a"]]).startswith("in the order each round")
    assert _ordering([["a", "b"]]) == "one round, so no order to vary"
    assert _ordering([]) == "the order not recorded"
