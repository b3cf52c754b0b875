"""The dashboard in a real headless Chromium: the browser's own EventSource.

The server closes the page's stream several times (``POST /debug/users/{id}/drop``);
the page does nothing special: the browser reconnects by itself, resends
Last-Event-ID, and the server replays what was missed. The rendered timeline
must then be exactly the user stream: no loss, no duplicate, no reorder.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from tests.http_support import Deployment, token
from workbench.ops.waiting import wait_until
from workbench.service import EscrowService

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
NOT_INSTALLED = (
    "headless Chromium not installed: apt-get install chromium chromium-driver (.ci/run does)"
)
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

# A module mark, so a machine without Chromium skips before starting a deployment.
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()), reason=NOT_INSTALLED
)

# Everything the assertions need, read in one round trip.
PAGE_STATE = """
const text = (id) => document.getElementById(id).textContent;
return {
  connects: Number(text("connects")),
  reconnects: Number(text("reconnects")),
  resets: Number(text("resets")),
  count: Number(text("count")),
  status: text("status"),
  ready_state: window.eventSource ? window.eventSource.readyState : -1,
  timeline: [...document.querySelectorAll("#timeline li")].map(
    (li) => [li.dataset.id, li.dataset.eventId, li.dataset.type]),
  duplicates: document.querySelectorAll("[data-duplicate]").length,
  escrows: Object.fromEntries([...document.querySelectorAll("tr[data-escrow]")].map(
    (tr) => [tr.dataset.escrow, tr.children[1].textContent])),
};
"""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def produce(service: EscrowService, buyer: str, seller: str, escrows: int) -> int:
    """Open escrows, cancelling the first; return the events the buyer will get."""
    events = 0
    for i in range(escrows):
        escrow_id = service.create(buyer, seller, 100 + i).escrow["id"]  # type: ignore[index]
        events += 1
        if i == 0:
            service.cancel(escrow_id, buyer)
            events += 1
    return events


def open_dashboard(driver: Any, api: str, user: str) -> None:
    query = urlencode({"user": user, "access_token": token(user)})
    driver.get(f"{api}/dashboard?{query}")


def page(driver: Any) -> dict[str, Any]:
    return driver.execute_script(PAGE_STATE)  # type: ignore[no-any-return]


def wait_page(driver: Any, condition: Any, what: str, timeout: float = 20) -> dict[str, Any]:
    """Wait until ``condition(page state)`` holds; name the last state on timeout."""
    last: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        nonlocal last
        last = page(driver)
        if last["duplicates"] or last["resets"]:  # no waiting can undo these
            raise AssertionError(f"while waiting for {what}: page state: {last}")
        return last if condition(last) else None

    try:
        return wait_until(check, timeout=timeout, what=what)
    except TimeoutError as exc:
        shown = {**last, "timeline": last.get("timeline", [])[-5:]}
        raise AssertionError(f"{exc}; page state: {shown}") from None


def drop(api: str, user: str) -> None:
    """Close the user's sessions server-side, once one is subscribed.

    The page counts a connection when the response headers arrive; should the
    server subscribe the session only after that, there is nothing to drop for
    a moment, so ask again until one was closed.
    """
    wait_until(
        lambda: httpx.post(f"{api}/debug/users/{user}/drop", timeout=5).json()["dropped"] >= 1,
        timeout=30,
        what=f"a live session of {user} to drop",
    )


def test_dashboard_survives_server_side_drops_without_loss_or_duplicates(
    deployment: Deployment, service: EscrowService, browser: Any, alice: str, bob: str
) -> None:
    drops = 4
    # The browser waits out the retry hint before reconnecting: 3 s, so that
    # the events of a round are published while it is down even on a slow machine.
    api = deployment.start_api(extra_env={"WORKBENCH_SSE_RETRY_MS": "3000"})
    open_dashboard(browser, api, alice)
    wait_page(browser, lambda p: p["connects"] == 1, "the page's first connection")
    expected = 0
    missed_while_down = 0  # rounds whose events were all published while disconnected
    for round_ in range(drops):
        # Live: the page is connected while these are published.
        expected += produce(service, alice, bob, 2)
        wait_page(
            browser, lambda p, n=expected: p["count"] == n, f"{expected} events (round {round_})"
        )

        connects = page(browser)["connects"]
        drop(api, alice)
        # Disconnected: the browser waits 3 s (the retry hint) before reconnecting,
        # so these reach the page only through the replay after Last-Event-ID.
        expected += produce(service, alice, bob, 2)
        deployment.wait_fanned_out(alice, expected)
        if page(browser)["connects"] == connects:
            missed_while_down += 1
        wait_page(
            browser,
            lambda p, c=connects, n=expected: p["connects"] == c + 1 and p["count"] == n,
            f"the page to reconnect by itself and render {expected} events (round {round_})",
        )
    # Still live after the last reconnect.
    expected += produce(service, alice, bob, 3)
    state = wait_page(browser, lambda p: p["count"] == expected, f"{expected} events in the end")

    stream = deployment.wait_fanned_out(alice, expected)
    rendered = [(i, e) for i, e, _ in state["timeline"]]
    assert rendered == stream  # exactly the published sequence: no loss, dup or reorder
    assert state["duplicates"] == 0
    assert state["reconnects"] >= drops
    assert state["resets"] == 0
    assert state["ready_state"] == 1 and state["status"] == "live"
    assert missed_while_down >= 1, "no round's events were published while the page was down"
    # One more drop with nothing missed: the reconnect replays nothing, and what
    # follows it (arriving after any replay) is rendered once.
    drop(api, alice)
    wait_page(browser, lambda p: p["connects"] == drops + 2, "the final reconnect")
    expected += produce(service, alice, bob, 1)
    state = wait_page(browser, lambda p: p["count"] == expected, f"{expected} events after it")
    stream = deployment.wait_fanned_out(alice, expected)
    assert [(i, e) for i, e, _ in state["timeline"]] == stream
    assert state["duplicates"] == 0


def test_dashboard_shows_the_snapshot_and_updates_rows_live(
    deployment: Deployment, api: str, service: EscrowService, browser: Any, alice: str, bob: str
) -> None:
    old = [service.create(alice, bob, 100 + i).escrow["id"] for i in range(3)]  # type: ignore[index]
    service.cancel(old[0], alice)
    before = deployment.wait_fanned_out(alice, 4)

    open_dashboard(browser, api, alice)
    state = wait_page(
        browser, lambda p: len(p["escrows"]) == 3 and p["connects"] == 1, "the snapshot's rows"
    )
    assert state["escrows"] == {old[0]: "cancelled", old[1]: "created", old[2]: "created"}
    assert state["timeline"] == []  # the stream resumes at the snapshot's as_of

    new = service.create(alice, bob, 500).escrow["id"]  # type: ignore[index]
    wait_page(browser, lambda p: p["escrows"].get(new) == "created", "the new escrow's row")
    service.cancel(new, alice)
    service.cancel(old[1], alice)
    state = wait_page(
        browser,
        lambda p: p["escrows"].get(new) == "cancelled" and p["escrows"][old[1]] == "cancelled",
        "both rows to show cancelled",
    )
    assert state["escrows"] == {
        old[0]: "cancelled",
        old[1]: "cancelled",
        old[2]: "created",
        new: "cancelled",
    }
    after = deployment.wait_fanned_out(alice, 7)[len(before) :]
    assert [(i, e) for i, e, _ in state["timeline"]] == after
    assert [t for _, _, t in state["timeline"]] == [
        "escrow.created",
        "escrow.cancelled",
        "escrow.cancelled",
    ]
    assert state["duplicates"] == 0
