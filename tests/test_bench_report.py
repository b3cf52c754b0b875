"""``bench/report.py`` regenerates the README's bench blocks from records, and only them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    """The real README with a throughput block (hand-typed figures in it) and an sse block."""
    original = (ROOT / "README.md").read_text()
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
