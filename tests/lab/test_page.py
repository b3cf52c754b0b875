"""``workbench report``: a run's and a sweep's page, opened from disk in a real Chromium.

The pages are made by the real command from real runs (a short crashy run with
flaky phones, a two-by-two sweep on Dask) and loaded from ``file://`` in headless
Chromium, which must find every figure drawn with labelled axes, the verdict,
and must have fetched nothing. Bad input is exit 2 with a message, never a traceback.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from simulations.analysis import figures
from simulations.analysis.checker import check
from simulations.analysis.page import report
from simulations.analysis.results import load_run
from simulations.analysis.tables import RunTables
from tests.http.test_browser import CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS, NOT_INSTALLED
from tests.support import ROOT
from workbench.cli import main

RUN_SETTINGS = (
    "run.duration_s=30", "run.drain_s=30", "phones.connection_mean_s=8",
    "phones.reconnect_mean_s=2", "phones.lose_id_p=0.1", "servers.mtbf_s=20",
)  # fmt: skip
X_LABELS = {figures.TIME_AXIS, figures.LATENCY_AXIS, figures.REPLAY_AXIS}
Y_LABELS = {
    figures.PENDING_AXIS, figures.LAG_AXIS, figures.OLDEST_AXIS, figures.ECDF_AXIS,
    figures.CONNECTIONS_AXIS, figures.CUMULATIVE_AXIS, *figures.MEASURES.values(),
}  # fmt: skip
#: What the browser saw: each figure's texts, the verdict, ids, what it fetched.
PAGE_STATE = """
return {
  figures: [...document.querySelectorAll("figure")].map((f) => ({
    name: f.id,
    svgs: f.querySelectorAll("svg").length,
    width: f.querySelector("svg") ? f.querySelector("svg").getBoundingClientRect().width : 0,
    texts: [...f.querySelectorAll("svg text")].map((t) => t.textContent.trim()),
  })),
  svgs: document.querySelectorAll("svg").length,
  verdict: document.getElementById("verdict").textContent.trim(),
  text: document.body.innerText,
  ids: [...document.querySelectorAll("[id]")].map((e) => e.id),
  fetched: performance.getEntriesByType("resource").map((r) => r.name),
  bad_cells: [...document.querySelectorAll("td.bad")].map((td) => td.textContent),
};
"""


def workbench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workbench", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short crashy run whose phones reconnect, replay and resync often."""
    out = tmp_path_factory.mktemp("page") / "run"
    settings = [arg for item in RUN_SETTINGS for arg in ("--set", item)]
    result = workbench("simulate", "crashy-consumers", *settings, "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two arrival rates times two seeds, short runs, one Dask worker."""
    from simulations.drivers.sweep import sweep

    out = tmp_path_factory.mktemp("page") / "sweep"
    sweep(
        "baseline", {"market.arrival_rate": [0.5, 1.5]}, 2, out=out, workers=1,
        base_overrides=("run.duration_s=20", "run.drain_s=20", "phones.count=5"),
    )  # fmt: skip
    return out


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(NOT_INSTALLED)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver: Any, path: Path) -> dict[str, Any]:
    driver.get(path.resolve().as_uri())
    return driver.execute_script(PAGE_STATE)  # type: ignore[no-any-return]


def assert_self_contained(page: Path, state: dict[str, Any]) -> None:
    """No URL in the file, nothing fetched, ids unique (figures share the page)."""
    assert re.findall(r"https?://", page.read_text()) == []
    assert state["fetched"] == []
    assert len(state["ids"]) == len(set(state["ids"]))


def assert_figures_labelled(
    state: dict[str, Any], names: list[str], x_labels: set[str] = X_LABELS
) -> None:
    """Exactly these figures, each one SVG drawn with an x and a y axis label."""
    assert [f["name"] for f in state["figures"]] == [f"figure-{name}" for name in names]
    assert state["svgs"] == len(names)
    for figure in state["figures"]:
        texts = set(figure["texts"])
        assert figure["svgs"] == 1 and figure["width"] > 200, figure["name"]
        assert texts & x_labels, figure
        assert texts & Y_LABELS, figure


# -- a run --------------------------------------------------------------------------


def test_a_runs_page_opens_from_disk_with_every_figure_and_the_verdict(
    run_dir: Path, browser: Any
) -> None:
    result = workbench("report", str(run_dir))
    assert result.returncode == 0, result.stderr
    page = run_dir / "report.html"
    assert result.stdout.strip() == str(page)

    state = open_page(browser, page)
    assert_self_contained(page, state)
    assert_figures_labelled(
        state, ["backlog", "handling-latency", "phone-latency", "replays", "connections"]
    )
    run = load_run(run_dir)
    assert run.ok and state["verdict"] == "OK" and state["bad_cells"] == []
    text = state["text"]
    for name in [*run.report.groups["group"], *run.report.invariants["name"]]:
        assert name in text
    backlog, _, phones, _, connections = (set(f["texts"]) for f in state["figures"])
    kinds = set(run.faults["kind"])
    assert kinds == {"consumer_crash", "server_kill"}  # both kinds marked, by name
    assert {f"fault: {kind}" for kind in kinds} | {"drain starts"} <= backlog
    assert {"live (n=", "replay (n="} <= {t[: t.index("=") + 1] for t in phones if "=" in t}
    clients = run.report.clients
    reconnects = int(clients["connections"].sum() - (clients["connections"] > 0).sum())
    resets = int(clients["snapshots"].sum())
    assert reconnects > 0 and resets > 0
    assert f"reconnects: {reconnects:,}" in connections
    assert f"snapshot resyncs (resets): {resets:,}" in connections
    for fact in ["crashy-consumers", "arrival_rate", "connection_mean_s", "wall_seconds"]:
        assert fact in text


def test_a_failed_run_says_not_ok_and_marks_the_failing_cells(
    run_dir: Path, tmp_path: Path, browser: Any
) -> None:
    tables = RunTables.load(run_dir)
    ledger = tables.handled["group"] == "ledger"
    dropped = tables.handled[ledger].index[:3]
    tables.handled = tables.handled.drop(index=dropped)  # three ledger events never handled
    broken = tables.save(tmp_path / "broken")

    out = tmp_path / "pages" / "broken.html"
    result = workbench("report", str(broken), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out) and not (broken / "report.html").exists()
    state = open_page(browser, out)
    assert state["verdict"] == "NOT OK"
    assert "3" in state["bad_cells"]  # the ledger's lost column
    assert state["text"].count("lost") >= 3  # the problems table lists them


def test_an_unfinished_run_says_so_in_its_verdict(run_dir: Path, tmp_path: Path) -> None:
    tables = RunTables.load(run_dir)
    push = tables.final["group"] == "push"
    tables.final.loc[push, "pending"] = 1  # push had not drained: its misses are unseen
    tables.handled = tables.handled[tables.handled["group"] != "push"]
    unseen = check(tables).unseen
    assert unseen == len(tables.published)  # push reads every stream
    page = report(tables.save(tmp_path / "unfinished")).read_text()
    verdict = re.search(r'id="verdict">([^<]*)<', page)
    assert verdict is not None
    assert verdict.group(1) == f"NOT OK (UNFINISHED: {unseen:,} events unseen)"


def test_the_python_entry_writes_the_same_page(run_dir: Path, tmp_path: Path) -> None:
    import simulations

    path = simulations.report(run_dir, tmp_path / "r.html")
    assert path == tmp_path / "r.html"
    assert path.read_text().count("<svg") == 5


# -- a sweep ------------------------------------------------------------------------


def test_a_sweeps_page_has_the_verdict_count_summary_and_measures_with_intervals(
    sweep_dir: Path, browser: Any
) -> None:
    result = workbench("report", str(sweep_dir))
    assert result.returncode == 0, result.stderr
    page = sweep_dir / "report.html"
    state = open_page(browser, page)
    assert_self_contained(page, state)
    results = pd.read_parquet(sweep_dir / "results.parquet")
    summary = pd.read_parquet(sweep_dir / "summary.parquet")
    drawn = [m for m in figures.MAIN_MEASURES if summary[f"{m}_mean"].notna().any()]
    assert {"lost", "handling_p99_s", "events"} <= set(drawn)
    assert "recovery_max_s" not in drawn  # baseline has no crash: nothing to draw
    rate_axis = figures.key_axis("market.arrival_rate")
    assert rate_axis == "market.arrival_rate (per s)"
    assert_figures_labelled(state, [f"sweep-{m}" for m in drawn], {rate_axis})
    assert state["verdict"] == f"{int(results['ok'].sum())} of 4 runs OK"
    # The sweep's interval for events at rate 1.5, as its summary.parquet has it.
    row = summary[summary["market.arrival_rate"] == 1.5].iloc[0]
    cell = f"{shown(row['events_mean'])} [{shown(row['events_low'])}, {shown(row['events_high'])}]"
    assert cell in state["text"]
    for run in results["run"]:  # market.arrival_rate=0.5/seed-1 ...
        assert run in state["text"]


def shown(value: float) -> str:
    """A number as the page shows it: integers in full, others to 4 significant digits."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:.4g}"


def summary_table(page: str) -> str:
    found = re.search(r"<h3>summary</h3>.*?</table>", page, re.DOTALL)
    assert found is not None
    return found.group(0)


def test_without_summary_parquet_the_page_computes_the_same_summary(
    sweep_dir: Path, tmp_path: Path
) -> None:
    written = report(sweep_dir, tmp_path / "written.html").read_text()
    copy = Path(shutil.copytree(sweep_dir, tmp_path / "sweep"))
    (copy / "summary.parquet").unlink()
    computed = report(copy).read_text()
    assert "computed from results.parquet" in computed and "computed from" not in written
    assert summary_table(computed) == summary_table(written)
    assert computed.count("<svg") == written.count("<svg") > 0


def test_a_results_table_with_an_empty_grid_value_is_summarised_with_it(tmp_path: Path) -> None:
    """A grid column with a missing value (a hand-made or older table) is a grid point
    of its own in the computed summary, not a crash counting the runs that passed."""
    results = pd.DataFrame({"market.arrival_rate": [1.0, 1.0, math.nan], "seed": [1, 2, 1],
                            "ok": [True, False, True], "lost": [0, 3, 0]})  # fmt: skip
    results.to_parquet(tmp_path / "results.parquet", index=False)
    table = summary_table(report(tmp_path).read_text())
    assert table.count("<tr>") == 3  # the header, 1.0 and the missing value
    assert "1.5 [-17.56, 20.56]" in table


def test_every_measure_a_sweep_averages_has_an_axis_label_with_a_unit() -> None:
    from simulations.analysis.measures import MEASURES

    assert list(figures.MEASURES) == list(MEASURES)
    assert all(
        re.search(r" \((s|events|entries|faults)\)$", label) for label in figures.MEASURES.values()
    )
    assert set(figures.MAIN_MEASURES) <= set(MEASURES)


def test_a_sweeps_own_summary_is_what_the_page_shows(sweep_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(sweep_dir, tmp_path / "sweep"))
    summary = pd.DataFrame(
        {"market.arrival_rate": [0.5, 1.5], "n": [2, 2], "ok_runs": [2, 2],
         "events_mean": [111.0, 222.0], "events_low": [101.0, 202.0],
         "events_high": [121.0, 242.0]}
    )  # fmt: skip
    summary.to_parquet(copy / "summary.parquet", index=False)
    page = report(copy).read_text()
    assert "222 [202, 242]" in summary_table(page)
    assert page.count("<svg") == 1  # only the measure this summary has

    summary.drop(columns="market.arrival_rate").to_parquet(copy / "summary.parquet")
    result = CliRunner().invoke(main, ["report", str(copy)])
    assert result.exit_code == 2
    assert "lacks the grid's columns ['market.arrival_rate']" in result.stderr


# -- bad input ----------------------------------------------------------------------


def copy_run(run_dir: Path, where: Path) -> Path:
    """A copy of the run's tables and manifest (not a page another test wrote)."""
    return Path(shutil.copytree(run_dir, where, ignore=shutil.ignore_patterns("*.html")))


def unfinished_run(run_dir: Path, where: Path) -> Path:
    copy = copy_run(run_dir, where)
    (copy / "manifest.json").unlink()
    return copy


def unfinished_sweep(run_dir: Path, where: Path) -> Path:
    copy_run(run_dir, where / "market.arrival_rate=1" / "seed-1")
    return where


def corrupt_run(run_dir: Path, where: Path) -> Path:
    copy = copy_run(run_dir, where)
    (copy / "published.parquet").write_text("not parquet")
    return copy


def bad_manifest(run_dir: Path, where: Path) -> Path:
    copy = copy_run(run_dir, where)
    (copy / "manifest.json").write_text("{ not json")
    return copy


def manifest_not_an_object(run_dir: Path, where: Path) -> Path:
    copy = copy_run(run_dir, where)
    (copy / "manifest.json").write_text('["<script>alert(1)</script>"]')
    return copy


def params_not_sections(run_dir: Path, where: Path) -> Path:
    copy = copy_run(run_dir, where)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["params"] = {"run": "fast"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def manifest_not_utf8(run_dir: Path, where: Path) -> Path:
    copy = copy_run(run_dir, where)
    (copy / "manifest.json").write_bytes(b'{"scenario": "\xff\xfe"}')
    return copy


def sweep_without_runs(run_dir: Path, where: Path) -> Path:
    where.mkdir()
    columns = {"market.arrival_rate": "float64", "seed": "int64", "ok": "bool", "lost": "int64"}
    no_runs = pd.DataFrame({name: pd.Series([], dtype=dtype) for name, dtype in columns.items()})
    no_runs.to_parquet(where / "results.parquet")
    return where


def results_with_text_measure(run_dir: Path, where: Path) -> Path:
    where.mkdir()
    results = pd.DataFrame({"market.arrival_rate": [1.0, 1.0], "seed": [1, 2], "ok": [True] * 2,
                            "lost": ["none", "some"]})  # fmt: skip
    results.to_parquet(where / "results.parquet")
    return where


def summary_with_text_interval(run_dir: Path, where: Path) -> Path:
    where.mkdir()
    pd.DataFrame({"market.arrival_rate": [1.0], "seed": [1], "ok": [True], "lost": [0]}).to_parquet(
        where / "results.parquet"
    )
    summary = pd.DataFrame({"market.arrival_rate": [1.0], "n": [1], "lost_mean": ["zero"],
                            "lost_low": [0.0], "lost_high": [0.0]})  # fmt: skip
    summary.to_parquet(where / "summary.parquet")
    return where


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda run, where: where, "does not exist"),
        (lambda run, where: where.symlink_to(where) or where, "is a symlink to nothing (a loop"),
        (lambda run, where: where.mkdir() or where, "is neither a run directory"),
        (lambda run, where: where.write_text("x") and where, "is not a directory"),
        (unfinished_run, "is an unfinished run: it has tables but no manifest.json"),
        (unfinished_sweep, "(e.g. market.arrival_rate=1/seed-1) but no results.parquet"),
        (corrupt_run, "cannot read the run"),
        (bad_manifest, "cannot read the run"),
        (manifest_not_an_object, "manifest.json is not a JSON object"),
        (params_not_sections, "params is not an object of sections"),
        (manifest_not_utf8, "cannot read the run"),
        (sweep_without_runs, "results.parquet has no rows: a sweep with no runs"),
        (results_with_text_measure, "results.parquet: column 'lost' should hold numbers"),
        (summary_with_text_interval, "summary.parquet: column 'lost_mean' should hold numbers"),
    ],
    ids=["missing", "symlink-loop", "empty", "a-file", "unfinished-run", "unfinished-sweep",
         "corrupt-table", "bad-manifest", "manifest-not-an-object", "params-not-sections",
         "manifest-not-utf8", "sweep-without-runs", "results-text-measure",
         "summary-text-interval"],
)  # fmt: skip
def test_what_is_not_a_finished_run_or_sweep_is_exit_2_with_a_message(
    run_dir: Path, tmp_path: Path, make: Any, message: str
) -> None:
    target = make(run_dir, tmp_path / "target")
    result = CliRunner().invoke(main, ["report", str(target)])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and str(target) in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "target" / "report.html").exists()


def test_bad_input_from_the_shell_is_exit_2_without_a_traceback(
    run_dir: Path, tmp_path: Path
) -> None:
    result = workbench("report", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert f"{tmp_path / 'missing'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    result = workbench("report", str(run_dir), "--out", str(tmp_path))
    assert result.returncode == 2
    assert "is a directory" in result.stderr and "Traceback" not in result.stderr
    copy = copy_run(run_dir, tmp_path / "run")
    manifest = (copy / "manifest.json").read_bytes()
    result = workbench("report", str(copy), "--out", str(copy / "manifest.json"))
    assert result.returncode == 2, result.stderr
    assert "exists and is not an HTML page; not written over" in result.stderr
    assert (copy / "manifest.json").read_bytes() == manifest  # the run is intact
    (tmp_path / "a-file").write_text("")
    result = workbench("report", str(run_dir), "--out", str(tmp_path / "a-file" / "x.html"))
    assert result.returncode == 2, result.stderr
    assert f"cannot write {tmp_path / 'a-file' / 'x.html'}" in result.stderr
    assert "Traceback" not in result.stderr


# -- big series -----------------------------------------------------------------------


def test_long_backlogs_are_reduced_to_their_peaks() -> None:
    t = np.arange(200_000, dtype=float)
    pending = np.zeros_like(t)
    pending[123_457] = 99.0  # one sample's spike must survive the reduction
    reduced_t, reduced = figures._peaks(t, pending)
    assert len(reduced_t) <= figures.MAX_POINTS < len(t)
    assert reduced.max() == 99.0 and reduced_t[0] == 0.0
    assert np.all(np.diff(reduced_t) > 0)


def test_long_ecdfs_are_drawn_at_evenly_spaced_quantiles() -> None:
    values = np.random.default_rng(1).exponential(size=100_000)
    x, y = figures._ecdf(values)
    assert len(x) == figures.MAX_POINTS and y[-1] == 1.0
    assert x[-1] == values.max() and np.all(np.diff(x) >= 0)
    small_x, small_y = figures._ecdf(np.array([3.0, 1.0, 2.0]))
    assert list(small_x) == [1.0, 2.0, 3.0] and list(small_y) == [1 / 3, 2 / 3, 1.0]


def test_a_figure_is_bare_svg_with_text_kept_as_text() -> None:
    samples = pd.DataFrame(
        {"t": [0.0, 1.0, 2.0], "group": "ledger", "pending": [0, 5, 0],
         "oldest_pending_age_s": [0.0, 1.0, 0.0], "lag": [0, 2, 0], "lag_s": [0.0, 0.5, 0.0]}
    )  # fmt: skip
    faults = pd.DataFrame(
        {"t_start": [0.5, 1.5], "t_end": [1.0, None], "kind": ["consumer_crash", "redis_kill"],
         "target": ["ledger-1", "redis"], "detail": ["", ""]}
    )  # fmt: skip
    svg = figures.backlog_figure(samples, faults, drain_start=1.8).svg
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "xmlns" not in svg and "<metadata" not in svg and "http" not in svg
    for label in [figures.TIME_AXIS, figures.PENDING_AXIS, figures.LAG_AXIS,
                  "fault: consumer_crash", "fault: redis_kill", "drain starts"]:  # fmt: skip
        assert f">{label}<" in svg
    again = figures.backlog_figure(samples, faults, drain_start=1.8).svg
    assert again == svg  # the same data, the same page


def test_manifest_values_are_read_not_trusted(run_dir: Path, tmp_path: Path) -> None:
    """A manifest from another version (no params, odd values) still gives a page."""
    copy = copy_run(run_dir, tmp_path / "run")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.pop("params")
    manifest["wall_seconds"] = "unknown"
    manifest["supervisor_gave_up"] = {"redis-server": "3 restarts within 60 s"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    page = report(copy).read_text()
    assert page.count("<svg") == 5 and "wall time</dt><dd>-</dd>" in page
    assert "redis-server</td>" in page and "3 restarts within 60 s</td>" in page  # the why
    manifest["supervisor_gave_up"] = 7  # neither a list nor a mapping: left out
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert "supervisor gave up on" not in report(copy).read_text()


def test_text_from_the_tables_is_shown_never_run(run_dir: Path, tmp_path: Path) -> None:
    """Scenario names, parameters and fault details are the page's text, in the HTML
    (autoescaped) and in the figures' SVG (legend labels, and matplotlib's comments)."""
    copy = copy_run(run_dir, tmp_path / "run")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["scenario"] = "<script>alert(1)</script>"
    manifest["params"]["consumers"]["restart"] = "<img src=x onerror=alert(2)>"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    faults = pd.read_parquet(copy / "faults.parquet")
    faults["kind"] = "--><script>alert(3)</script><!--"
    faults["detail"] = "</svg><script>alert(4)</script>"
    faults.to_parquet(copy / "faults.parquet", index=False)
    page = report(copy).read_text()
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert "<title>&lt;script&gt;alert(1)&lt;/script&gt;, seed" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "fault: --&gt;&lt;script&gt;alert(3)" in page  # the backlog's legend
    assert "&lt;/svg&gt;&lt;script&gt;alert(4)&lt;/script&gt;" in page  # the faults table


def test_a_sweep_page_skips_run_manifests_it_cannot_read(sweep_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(sweep_dir, tmp_path / "sweep"))
    manifests = sorted(copy.rglob("manifest.json"))
    manifests[0].write_text("[1, 2]")
    odd = json.loads(manifests[1].read_text())
    odd["params"] = "none"
    manifests[1].write_text(json.dumps(odd))
    page = report(copy).read_text()
    assert "4 of 4 runs OK" in page
