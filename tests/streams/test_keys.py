"""Key names: unpartitioned names stay today's; partitioned ones keep what is used
together in one cluster slot."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from workbench.streams.keys import RiskNames, StreamNames, UserStreamNames, names_for
from workbench.streams.partitions import Partitioning


def _slot(key: str) -> int:
    return key_slot(key.encode())


def test_unpartitioned_names_are_the_single_server_layout() -> None:
    names = names_for("wb", 0)
    assert names == StreamNames("wb")
    assert names.partitions == range(1)
    assert names.stream("payment") == "wb:payment"
    assert names.streams(("escrow", "payment")) == ["wb:escrow", "wb:payment"]
    assert names.dead_letters("ledger") == ["wb:dead:ledger"]
    users = UserStreamNames.of(names)
    assert users.stream("u1") == "wb:user:u1"
    assert users.fanout_marker("e1") == "wb:fanout:e1"
    assert users.live_channels == ["wb:live"]
    assert RiskNames.of(names).marker("analytics", "e1") == "wb:scored:analytics:e1"
    with pytest.raises(ValueError, match="partition 1 of an unpartitioned log"):
        names.stream("escrow", 1)


def test_a_partition_s_streams_dead_letters_and_leases_share_one_slot() -> None:
    names = names_for("wb", 16)
    assert names.partitions == range(16)
    slots = set()
    for p in names.partitions:
        keys = [
            *names.streams(partitions=(p,)),
            names.dead_letter("ledger", p),
            names.lease("ledger", p),
            names.lease("relay", p),
        ]
        assert len({_slot(k) for k in keys}) == 1, keys
        slots.add(_slot(keys[0]))
    assert len(slots) == 16
    assert len(names.streams()) == 16 * 4


def test_an_escrow_s_streams_are_those_of_its_partition() -> None:
    names = names_for("wb", 8)
    p = names.partition_of("escrow-42")
    assert p == Partitioning(8).of("escrow-42")
    assert {_slot(names.stream(a, p)) for a in ("escrow", "payment", "payout", "dispute")} == {
        _slot(names.lease("relay", p))
    }


def test_a_user_s_stream_marker_and_channel_share_the_user_s_partition_slot() -> None:
    users = UserStreamNames.of(names_for("wb", 8))
    for user in ("alice", "bob", "carol", "dave"):
        p = users.partition_of(user)
        assert (
            _slot(users.stream(user))
            == _slot(users.fanout_marker("e1", p))
            == _slot(users.live_channel(p))
        )
    assert len(users.live_channels) == 8


def test_the_risk_stream_and_its_markers_share_a_slot() -> None:
    risk = RiskNames.of(names_for("wb", 8))
    assert _slot(risk.stream) == _slot(risk.marker("analytics", "e9"))


def test_defaults_name_partition_zero_of_the_wb_prefix() -> None:
    assert names_for() == StreamNames("wb")
    names = names_for("wb", 4)
    assert names.lease("relay") == names.lease("relay", 0)
    assert StreamNames().dead_letter("ledger") == "wb:dead:ledger"
    assert UserStreamNames().live_channel() == "wb:live"
    users = UserStreamNames.of(names)
    assert users.live_channel() == users.live_channels[0]
    assert names.dead_letters("ledger") == [names.dead_letter("ledger", p) for p in range(4)]
    assert len(set(names.dead_letters("ledger"))) == 4
    with pytest.raises(ValueError, match=r"^unknown aggregate type 'nope'; known: escrow, "):
        names.stream("nope")
