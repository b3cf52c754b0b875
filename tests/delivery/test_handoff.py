"""The replay-then-live handoff, without Redis: pages, live messages, gaps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.delivery.entries import UserEntry
from workbench.delivery.handoff import (
    HistoryLost,
    Live,
    ReplaySession,
    resume_point_known,
)
from workbench.domain.streamid import ZERO, StreamId


def stream(n: int) -> list[UserEntry]:
    """A user stream of n entries with its prev chain."""
    out, prev = [], ZERO
    for i in range(1, n + 1):
        entry_id = StreamId(1000 + i, 0)
        out.append(UserEntry(entry_id, prev, f"evt_{i}", "escrow.created", "{}"))
        prev = entry_id
    return out


def after(entries: list[UserEntry], cursor: StreamId, count: int) -> list[UserEntry]:
    return [e for e in entries if e.id > cursor][:count]


def test_a_page_that_follows_the_cursor_is_taken() -> None:
    s = stream(5)
    session = ReplaySession(s[1].id)
    assert session.take_page(after(s, s[1].id, 10)) == s[2:]
    assert session.cursor == s[4].id


def test_a_page_after_trimmed_entries_is_history_lost() -> None:
    s = stream(5)
    session = ReplaySession(s[0].id)
    with pytest.raises(HistoryLost):
        session.take_page(s[2:])  # s[1] was trimmed


def test_an_empty_page_after_a_lost_cursor_is_history_lost_and_says_so() -> None:
    # An empty page proves nothing when the cursor itself is gone (Redis lost it):
    # the client must get ``reset`` with a reason, not "caught up".
    s = stream(3)
    session = ReplaySession(s[1].id)
    with pytest.raises(HistoryLost) as lost:
        session.take_page([], cursor_exists=False)
    assert lost.value.reason == (
        f"{s[1].id} is no longer an entry of the stream (Redis lost it) and nothing follows it"
    )
    assert session.cursor == s[1].id and session.sent == 0
    assert session.take_page([], cursor_exists=True) == []
    # 0-0 is never an entry: a session from the start has lost nothing.
    assert ReplaySession(ZERO).take_page([], cursor_exists=False) == []


def test_live_message_next_in_line_is_sent_older_skipped_later_caught_up() -> None:
    s = stream(4)
    session = ReplaySession(s[1].id)
    assert session.take_live(s[0]) is Live.SKIP
    assert session.take_live(s[1]) is Live.SKIP
    assert session.take_live(s[3]) is Live.CATCH_UP  # s[2] missing
    assert session.cursor == s[1].id
    assert session.take_live(s[2]) is Live.SEND
    assert session.take_live(s[3]) is Live.SEND


def test_resume_point_rules() -> None:
    s = stream(3)
    assert resume_point_known(s[0].id, s[1:], requested_exists=True)
    # The requested entry itself was trimmed but the next one still names it.
    assert resume_point_known(s[0].id, s[1:], requested_exists=False)
    # Unknown id between entries, or trimmed with its successor.
    assert not resume_point_known(StreamId(1001, 5), s[1:], requested_exists=False)
    # At the tail.
    assert resume_point_known(s[2].id, [], requested_exists=True)
    # Beyond the tail, never an entry.
    assert not resume_point_known(StreamId(9999, 0), [], requested_exists=False)
    # From the beginning: fine while the first entry is retained.
    assert resume_point_known(ZERO, s, requested_exists=False)
    assert not resume_point_known(ZERO, s[1:], requested_exists=False)
    assert resume_point_known(ZERO, [], requested_exists=False)


@settings(max_examples=300)
@given(
    n=st.integers(0, 40),
    start=st.integers(0, 40),
    page_size=st.integers(1, 7),
    published_before_replay=st.integers(0, 40),
    lost=st.sets(st.integers(0, 39), max_size=10),
)
def test_handoff_delivers_the_stream_once_in_order(
    n: int, start: int, page_size: int, published_before_replay: int, lost: set[int]
) -> None:
    """Model a session: subscribed, replays in pages while entries keep arriving
    live (some live messages lost), then drains live. The client must end up with
    exactly the entries after its start, in order."""
    s = stream(n)
    start = min(start, n)
    cursor = s[start - 1].id if start else ZERO
    visible = min(max(published_before_replay, start), n)  # appended before replay began
    session = ReplaySession(cursor)
    sent: list[UserEntry] = []
    catch_ups = 0
    # Replay over what exists now.
    while True:
        page = after(s[:visible], session.cursor, page_size)
        sent += session.take_page(page)
        if len(page) < page_size:
            break
    # Live: every entry was published on the channel (queued since subscribe),
    # except the lost ones; a gap triggers a catch-up read of the whole stream.
    for i, entry in enumerate(s):
        if i in lost:
            continue
        decision = session.take_live(entry)
        if decision is Live.SEND:
            sent.append(entry)
        elif decision is Live.CATCH_UP:
            catch_ups += 1
            sent += session.take_page(after(s, session.cursor, 10**6))
    # A resync at the end (the feed reconnected) picks up trailing losses, and only
    # them: a catch-up read the whole stream (all of it is appended in this model),
    # otherwise everything up to the last live message that arrived was sent.
    final = session.take_page(after(s, session.cursor, 10**6))
    last_arrived = max((i for i in range(n) if i not in lost), default=-1)
    assert final == ([] if catch_ups else s[max(last_arrived + 1, start, visible) :])
    # Reading the stream is the exception: only a lost message makes a session do it.
    assert catch_ups <= len(lost)
    if not lost:
        assert final == [] and catch_ups == 0
    sent += final
    assert sent == s[start:]


def test_history_lost_names_the_cursor_and_the_oldest_following_entry() -> None:
    # The reason goes to the client in the ``reset`` event, so it must say what is gone.
    s = stream(6)
    session = ReplaySession(s[0].id)
    with pytest.raises(HistoryLost) as lost:
        session.take_page(s[3:])  # s[1] and s[2] were trimmed
    reason = lost.value.reason
    assert str(lost.value) == reason
    assert f"entries after {s[0].id} are no longer retained" in reason
    assert f"oldest following entry {s[3].id} follows {s[2].id}" in reason
    assert session.cursor == s[0].id and session.sent == 0  # nothing was taken


def test_sent_counts_every_entry_handed_over_and_skipped_every_duplicate() -> None:
    # ``sent`` is what the session reports as "replayed"; both start at zero.
    s = stream(8)
    session = ReplaySession(s[0].id)
    assert (session.sent, session.skipped) == (0, 0)
    session.take_page(s[1:4])
    assert (session.sent, session.skipped) == (3, 0)
    assert session.take_live(s[2]) is Live.SKIP
    assert session.take_live(s[3]) is Live.SKIP
    assert (session.sent, session.skipped) == (3, 2)
    assert session.take_live(s[4]) is Live.SEND
    assert session.take_live(s[5]) is Live.SEND
    assert (session.sent, session.skipped) == (5, 2)
    session.take_page([])
    assert session.take_live(s[5]) is Live.SKIP
    assert (session.sent, session.skipped) == (5, 3)
    session.take_page(s[6:8])  # a later page (a catch-up) adds to what was sent
    assert (session.sent, session.skipped) == (7, 3)


def test_decide_says_what_take_live_would_do_and_changes_nothing() -> None:
    s = stream(4)
    session = ReplaySession(s[1].id)
    assert [session.decide(e) for e in s] == [Live.SKIP, Live.SKIP, Live.SEND, Live.CATCH_UP]
    assert (session.cursor, session.sent, session.skipped) == (s[1].id, 0, 0)
    assert [session.take_live(e) for e in (s[0], s[3], s[2])] == [
        Live.SKIP,
        Live.CATCH_UP,
        Live.SEND,
    ]
    assert (session.cursor, session.sent, session.skipped) == (s[2].id, 1, 1)
