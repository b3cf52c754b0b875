"""The event envelope: encoding, decoding and every way a stream entry can be bad."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workbench.domain.events import (
    AGGREGATE_TYPES,
    EVENT_TYPES,
    SCHEMA_VERSION,
    Event,
    EventDecodeError,
    UnknownEventType,
    decode,
    encode,
    entry_data,
    escrow_order,
    from_fields,
    to_fields,
)


def make_event(**overrides) -> Event:  # type: ignore[no-untyped-def]
    values = {
        "event_id": "evt_0001",
        "type": "escrow.funded",
        "aggregate_type": "escrow",
        "aggregate_id": "esc_42",
        "sequence": 4,
        "user_ids": ("buyer-1", "seller-1"),
        "occurred_at": 1_700_000_123.25,
        "correlation_id": "cor_1",
        "causation_id": "evt_0000",
        "payload": {"amount": 1500, "note": "ünïcode ✓", "nested": {"a": [1, 2]}},
    }
    values.update(overrides)
    return Event(**values)


def as_dict(event: Event) -> dict:  # type: ignore[type-arg]
    return json.loads(encode(event))


def encoded(**changes) -> bytes:  # type: ignore[no-untyped-def]
    """A valid envelope as JSON with fields changed (None removes the field)."""
    data = as_dict(make_event())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return json.dumps(data).encode()


# -- round trips ----------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    event = make_event()
    data = encode(event)
    assert isinstance(data, bytes)
    back = decode(data)
    assert back == event
    assert back.escrow_id == "esc_42"
    assert back.user_ids == ("buyer-1", "seller-1")
    assert back.payload["note"] == "ünïcode ✓"


def test_decode_accepts_str() -> None:
    event = make_event()
    assert decode(encode(event).decode()) == event


def test_defaults_are_omitted_on_the_wire_and_restored() -> None:
    event = make_event(causation_id=None, payload={})
    data = as_dict(event)
    assert "causation_id" not in data
    assert "schema_version" not in data
    assert "payload" not in data
    back = decode(encode(event))
    assert back == event
    assert back.causation_id is None
    assert back.schema_version == SCHEMA_VERSION
    assert back.payload == {}


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_every_known_event_type_round_trips(event_type: str) -> None:
    aggregate = EVENT_TYPES[event_type]
    assert aggregate in AGGREGATE_TYPES
    event = make_event(type=event_type, aggregate_type=aggregate)
    assert decode(encode(event)) == event


def test_stream_fields_round_trip_with_str_keys() -> None:
    event = make_event()
    fields = to_fields(event)
    assert fields["event_id"] == "evt_0001"
    assert fields["type"] == "escrow.funded"
    assert fields["data"] == encode(event)
    assert from_fields(fields) == event


def test_stream_fields_round_trip_with_bytes_keys_as_redis_returns_them() -> None:
    event = make_event()
    raw = {
        k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in to_fields(event).items()
    }
    assert from_fields(raw) == event


# -- bad entries ----------------------------------------------------------------


def test_malformed_json_raises_decode_error() -> None:
    with pytest.raises(EventDecodeError) as info:
        decode(b'{"event_id": "evt_1", ')
    assert not isinstance(info.value, UnknownEventType)
    assert info.value.reason.startswith("malformed event: ")
    assert str(info.value) == info.value.reason


def test_non_object_json_raises_decode_error() -> None:
    with pytest.raises(EventDecodeError, match="malformed event: Expected `object`"):
        decode(b"[1, 2, 3]")


@pytest.mark.parametrize(
    "missing", ["event_id", "type", "aggregate_type", "aggregate_id", "sequence", "correlation_id"]
)
def test_missing_required_field_is_named_in_the_reason(missing: str) -> None:
    with pytest.raises(EventDecodeError) as info:
        decode(encoded(**{missing: None}))
    assert info.value.reason.startswith("malformed event: ")
    assert f"`{missing}`" in info.value.reason


def test_wrongly_typed_field_raises_decode_error() -> None:
    with pytest.raises(EventDecodeError) as info:
        decode(encoded(sequence="four"))
    assert "malformed event" in info.value.reason
    assert "sequence" in info.value.reason


def test_unknown_type_raises_unknown_event_type() -> None:
    with pytest.raises(UnknownEventType) as info:
        decode(encoded(type="escrow.teleported"))
    assert isinstance(info.value, EventDecodeError)
    assert info.value.reason == "unknown event type 'escrow.teleported'"


def test_aggregate_type_mismatch_raises_decode_error() -> None:
    with pytest.raises(EventDecodeError) as info:
        decode(encoded(type="escrow.funded", aggregate_type="payment"))
    assert not isinstance(info.value, UnknownEventType)
    assert info.value.reason == (
        "event type 'escrow.funded' belongs to 'escrow', not aggregate type 'payment'"
    )


def test_future_schema_version_raises_decode_error() -> None:
    with pytest.raises(EventDecodeError) as info:
        decode(encoded(schema_version=SCHEMA_VERSION + 1))
    assert info.value.reason == (
        f"schema version {SCHEMA_VERSION + 1} is newer than {SCHEMA_VERSION}"
    )


def test_current_schema_version_given_explicitly_decodes() -> None:
    assert decode(encoded(schema_version=SCHEMA_VERSION)) == make_event()


@pytest.mark.parametrize("fields", [None, {}], ids=["none", "empty"])
def test_from_fields_without_fields(fields) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EventDecodeError) as info:
        from_fields(fields)
    assert info.value.reason == "entry has no fields (deleted while pending?)"


@pytest.mark.parametrize(
    "fields",
    [{b"event_id": b"evt_1", b"type": b"escrow.funded"}, {"event_id": "evt_1"}, {b"data": None}],
    ids=["bytes-keys", "str-keys", "data-none"],
)
def test_from_fields_without_data(fields) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EventDecodeError) as info:
        from_fields(fields)
    assert info.value.reason == "entry has no 'data' field"


@pytest.mark.parametrize("data", [b"", b"not json", b"{}"], ids=["empty", "garbage", "empty-obj"])
def test_from_fields_with_bad_data(data: bytes) -> None:
    with pytest.raises(EventDecodeError) as info:
        from_fields({b"event_id": b"evt_1", b"data": data})
    assert info.value.reason.startswith("malformed event: ")


def test_from_fields_reads_the_flat_field_list_of_a_raw_reply() -> None:
    event = make_event()
    flat = [
        b"event_id",
        event.event_id.encode(),
        b"type",
        event.type.encode(),
        b"data",
        encode(event),
    ]
    assert from_fields(flat) == event
    # Another layout: found by name, names at even positions only.
    assert entry_data([b"x", b"data", b"data", b"{}"]) == b"{}"
    assert entry_data(["data", "{}"]) == "{}"
    assert entry_data([b"event_id", b"data", b"type", b"t"]) is None
    assert entry_data([b"event_id", b"e", b"type", b"t", b"other", b"data"]) is None
    with pytest.raises(EventDecodeError, match="no 'data' field"):
        from_fields([b"event_id", b"data"])


def test_from_fields_with_unknown_type_raises_unknown_event_type() -> None:
    with pytest.raises(UnknownEventType):
        from_fields({b"data": encoded(type="payment.teleported", aggregate_type="payment")})


# -- handling order within a batch ------------------------------------------------------


def test_escrow_order_puts_each_escrow_in_sequence_order_in_its_own_slots() -> None:
    batch = [
        make_event(event_id="a3", aggregate_id="a", sequence=3),  # escrow stream first
        make_event(event_id="b1", aggregate_id="b", sequence=1),
        make_event(event_id="a2", aggregate_id="a", sequence=2),  # then the payment stream
        make_event(event_id="c7", aggregate_id="c", sequence=7),
    ]
    order = escrow_order(batch)
    assert [batch[i].event_id for i in order] == ["a2", "b1", "a3", "c7"]


@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(min_value=1, max_value=50)),
        max_size=30,
        unique=True,
    ).flatmap(st.permutations)
)
def test_escrow_order_is_a_permutation_sorted_per_escrow_keeping_slots(
    keys: list[tuple[str, int]],
) -> None:
    batch = [make_event(event_id=f"{e}{n}", aggregate_id=e, sequence=n) for e, n in keys]
    order = escrow_order(batch)
    assert sorted(order) == list(range(len(batch)))
    handled = [batch[i] for i in order]
    for escrow in "abc":
        mine = [e.sequence for e in handled if e.aggregate_id == escrow]
        assert mine == sorted(mine)
    # Every slot still holds an event of the escrow that held it.
    assert [e.aggregate_id for e in handled] == [e.aggregate_id for e in batch]


def test_the_same_event_read_twice_keeps_its_read_order() -> None:
    # A republished event (same id and sequence) after a later one of its escrow.
    first = make_event(event_id="a2", aggregate_id="a", sequence=2, occurred_at=1.0)
    later = make_event(event_id="a3", aggregate_id="a", sequence=3)
    again = make_event(event_id="a2", aggregate_id="a", sequence=2, occurred_at=2.0)
    batch = [first, later, again]
    assert [batch[i] for i in escrow_order(batch)] == [first, again, later]
