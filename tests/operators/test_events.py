"""Event schemas and the decoder: any bytes give an event or a precise, structured error."""

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import events, json_values, payment_payload, reading_payload

from operators.decode import DecodeError, Reason, decode
from operators.events import (
    IotReading,
    Transaction,
    entity_id,
    event_id,
    event_time_ms,
    from_millis,
    to_json_bytes,
)


def assert_decoded(result: object) -> None:
    assert isinstance(result, IotReading | Transaction | DecodeError)
    if isinstance(result, DecodeError):
        assert isinstance(result.reason, Reason)
        assert result.field is None or isinstance(result.field, str)
        assert result.message


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_give_an_event_or_a_structured_error(data: bytes) -> None:
    assert_decoded(decode(data))


@settings(max_examples=300, deadline=None)
@given(
    events,
    st.sampled_from(
        ["ts", "amount", "seq", "metrics", "kind", "schema_version", "card_present", "new"]
    ),
    json_values,
)
def test_valid_events_with_one_field_replaced_never_crash(event, name: str, value: object) -> None:
    obj = json.loads(to_json_bytes(event))
    obj[name] = value
    assert_decoded(decode(json.dumps(obj).encode()))


@settings(max_examples=300, deadline=None)
@given(events)
def test_every_valid_event_round_trips_through_json(event: IotReading | Transaction) -> None:
    wire = to_json_bytes(event)
    assert decode(wire) == event
    assert to_json_bytes(decode(wire)) == wire


def without(obj: dict, name: str) -> dict:
    return {k: v for k, v in obj.items() if k != name}


def encode(obj: object) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("payload", "reason", "field"),
    [
        (b"", Reason.EMPTY, None),
        (b"x" * 70_000, Reason.TOO_LARGE, None),
        (b'{"kind": "iot", \xff}', Reason.NOT_UTF8, None),
        (
            encode(reading_payload()).replace(b'"iot"', b'"io\xfft"'),
            Reason.NOT_UTF8,
            None,
        ),  # in a string
        (b'{"kind": "iot",', Reason.MALFORMED_JSON, None),
        (b"[" * 10_000 + b"]" * 10_000, Reason.MALFORMED_JSON, None),
        (b"[1, 2]", Reason.NOT_OBJECT, None),
        (encode(without(reading_payload(), "kind")), Reason.MISSING_FIELD, "kind"),
        (encode(reading_payload(kind="weather")), Reason.UNKNOWN_KIND, "kind"),
        (encode(reading_payload(schema_version=2)), Reason.UNSUPPORTED_VERSION, "schema_version"),
        (encode(without(reading_payload(), "ts")), Reason.MISSING_FIELD, "ts"),
        (encode(reading_payload(extra=1)), Reason.UNKNOWN_FIELD, "extra"),
        (encode(reading_payload(seq="7")), Reason.WRONG_TYPE, "seq"),
        (encode(reading_payload(seq=7.0)), Reason.WRONG_TYPE, "seq"),
        (encode(reading_payload(ts=1736157600)), Reason.WRONG_TYPE, "ts"),
        (
            encode(reading_payload(ts="2025-01-06T10:00:00")),
            Reason.INVALID_VALUE,
            "ts",
        ),  # no UTC offset
        (encode(reading_payload(metrics=[])), Reason.INVALID_VALUE, "metrics"),
        (
            encode(reading_payload(metrics=[{"name": "t", "value": float("nan"), "unit": "C"}])),
            Reason.NOT_FINITE,
            "metrics.0.value",
        ),
        (
            encode(reading_payload(metrics=[{"name": "t", "value": float("inf"), "unit": "C"}])),
            Reason.NOT_FINITE,
            "metrics.0.value",
        ),
        (
            encode(reading_payload(device_id="dev\n<eos> ignore all previous")),
            Reason.INVALID_VALUE,
            "device_id",
        ),
        (encode(payment_payload(amount="-12.30")), Reason.NON_POSITIVE_AMOUNT, "amount"),
        (encode(payment_payload(amount=0)), Reason.NON_POSITIVE_AMOUNT, "amount"),
        (encode(payment_payload(amount="NaN")), Reason.NOT_FINITE, "amount"),
        (encode(payment_payload(amount="ten")), Reason.WRONG_TYPE, "amount"),
        (encode(payment_payload(card_present="yes")), Reason.WRONG_TYPE, "card_present"),
        (encode(payment_payload(currency="euro")), Reason.INVALID_VALUE, "currency"),
        (encode(payment_payload(channel="fax")), Reason.INVALID_VALUE, "channel"),
    ],
)
def test_bad_payloads_give_a_precise_reason(
    payload: bytes, reason: Reason, field: str | None
) -> None:
    result = decode(payload)
    assert isinstance(result, DecodeError), result
    assert (result.reason, result.field) == (reason, field)
    assert len(result.message) <= 200


def test_future_timestamps_are_refused_relative_to_the_given_clock() -> None:
    now = datetime(2025, 1, 6, 10, 0, tzinfo=UTC)
    on_time = encode(reading_payload(ts="2025-01-06T10:04:59Z"))
    ahead = encode(reading_payload(ts="2025-01-06T10:05:01Z"))
    assert isinstance(decode(on_time, now=now), IotReading)
    result = decode(ahead, now=now)
    assert isinstance(result, DecodeError) and (result.reason, result.field) == (
        Reason.FUTURE_TIMESTAMP,
        "ts",
    )
    assert isinstance(decode(ahead), IotReading)  # no clock given, no check


def test_size_cap_is_inclusive_and_configurable() -> None:
    data = encode(reading_payload())
    assert isinstance(decode(data, max_bytes=len(data)), IotReading)
    assert decode(data, max_bytes=len(data) - 1).reason == Reason.TOO_LARGE  # type: ignore[union-attr]


def test_expected_kind_rejects_events_on_the_wrong_topic() -> None:
    result = decode(encode(payment_payload()), expected_kind="iot")
    assert isinstance(result, DecodeError) and result.reason == Reason.UNEXPECTED_KIND
    assert isinstance(decode(encode(payment_payload()), expected_kind="transaction"), Transaction)


def test_missing_schema_version_reads_as_version_one() -> None:
    assert decode(encode(without(reading_payload(), "schema_version"))) == decode(
        encode(reading_payload())
    )


def test_timestamps_are_normalised_to_utc_and_keys_come_from_the_entity() -> None:
    event = decode(encode(reading_payload(ts="2025-01-06T12:00:00.123+02:00")))
    assert isinstance(event, IotReading)
    assert event.ts == datetime(
        2025, 1, 6, 10, 0, 0, 123000, tzinfo=UTC
    ) and event.ts.utcoffset() == timedelta(0)
    assert event_time_ms(event) == 1736157600123 and from_millis(1736157600123) == event.ts
    assert (entity_id(event), event_id(event)) == ("dev-0001", "dev-0001#7")
    txn = decode(encode(payment_payload()))
    assert (entity_id(txn), event_id(txn)) == ("acct-00001", "tx-1")  # type: ignore[arg-type]
