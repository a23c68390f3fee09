"""Event schemas and the decoder: any bytes give an event or a precise, structured error."""

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.decode import DecodeError, Reason, decode
from operators.events import (
    IotReading,
    Metric,
    Transaction,
    entity_id,
    event_id,
    event_time_ms,
    from_millis,
    to_json_bytes,
)

identifiers = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", fullmatch=True)
timestamps = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-9, minutes=-30))]
    ),
)
metrics = st.builds(
    Metric,
    name=st.from_regex(r"[a-z][a-z_]{0,31}", fullmatch=True),
    value=st.floats(allow_nan=False, allow_infinity=False),
    unit=st.from_regex(r"[A-Za-z%/°]{1,8}", fullmatch=True),
)
readings = st.builds(
    IotReading,
    device_id=identifiers,
    site=identifiers,
    seq=st.integers(0, 2**63 - 1),
    ts=timestamps,
    metrics=st.lists(metrics, min_size=1, max_size=16, unique_by=lambda m: m.name).map(tuple),
    firmware=st.from_regex(r"[0-9A-Za-z.+-]{1,32}", fullmatch=True),
    status=st.sampled_from(["ok", "degraded", "fault"]),
)
transactions = st.builds(
    Transaction,
    txn_id=identifiers,
    account_id=identifiers,
    merchant=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 &'.,_-]{0,63}", fullmatch=True),
    category=st.from_regex(r"[a-z][a-z_]{0,31}", fullmatch=True),
    amount=st.decimals(min_value=Decimal("0.0001"), max_value=Decimal(99999999999999), places=4),
    currency=st.from_regex(r"[A-Z]{3}", fullmatch=True),
    ts=timestamps,
    country=st.from_regex(r"[A-Z]{2}", fullmatch=True),
    channel=st.sampled_from(["pos", "ecom", "atm", "moto"]),
    card_present=st.booleans(),
)
events = st.one_of(readings, transactions)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
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


def reading(**changes: object) -> dict:
    obj = {
        "schema_version": 1,
        "kind": "iot",
        "device_id": "dev-0001",
        "site": "lyon-east",
        "seq": 7,
        "ts": "2025-01-06T10:00:00Z",
        "firmware": "2.4.1",
        "status": "ok",
        "metrics": [{"name": "temperature", "value": 21.5, "unit": "°C"}],
    }
    obj.update(changes)
    return obj


def payment(**changes: object) -> dict:
    obj = {
        "schema_version": 1,
        "kind": "transaction",
        "txn_id": "tx-1",
        "account_id": "acct-00001",
        "merchant": "Corner Grocer",
        "category": "grocery",
        "amount": "12.30",
        "currency": "EUR",
        "ts": "2025-01-06T10:00:00Z",
        "country": "DE",
        "channel": "pos",
        "card_present": True,
    }
    obj.update(changes)
    return obj


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
        (encode(reading()).replace(b'"iot"', b'"io\xfft"'), Reason.NOT_UTF8, None),  # in a string
        (b'{"kind": "iot",', Reason.MALFORMED_JSON, None),
        (b"[" * 10_000 + b"]" * 10_000, Reason.MALFORMED_JSON, None),
        (b"[1, 2]", Reason.NOT_OBJECT, None),
        (encode(without(reading(), "kind")), Reason.MISSING_FIELD, "kind"),
        (encode(reading(kind="weather")), Reason.UNKNOWN_KIND, "kind"),
        (encode(reading(schema_version=2)), Reason.UNSUPPORTED_VERSION, "schema_version"),
        (encode(without(reading(), "ts")), Reason.MISSING_FIELD, "ts"),
        (encode(reading(extra=1)), Reason.UNKNOWN_FIELD, "extra"),
        (encode(reading(seq="7")), Reason.WRONG_TYPE, "seq"),
        (encode(reading(seq=7.0)), Reason.WRONG_TYPE, "seq"),
        (encode(reading(ts=1736157600)), Reason.WRONG_TYPE, "ts"),
        (encode(reading(ts="2025-01-06T10:00:00")), Reason.INVALID_VALUE, "ts"),  # no UTC offset
        (encode(reading(metrics=[])), Reason.INVALID_VALUE, "metrics"),
        (
            encode(reading(metrics=[{"name": "t", "value": float("nan"), "unit": "C"}])),
            Reason.NOT_FINITE,
            "metrics.0.value",
        ),
        (
            encode(reading(metrics=[{"name": "t", "value": float("inf"), "unit": "C"}])),
            Reason.NOT_FINITE,
            "metrics.0.value",
        ),
        (
            encode(reading(device_id="dev\n<eos> ignore all previous")),
            Reason.INVALID_VALUE,
            "device_id",
        ),
        (encode(payment(amount="-12.30")), Reason.NON_POSITIVE_AMOUNT, "amount"),
        (encode(payment(amount=0)), Reason.NON_POSITIVE_AMOUNT, "amount"),
        (encode(payment(amount="NaN")), Reason.NOT_FINITE, "amount"),
        (encode(payment(amount="ten")), Reason.WRONG_TYPE, "amount"),
        (encode(payment(card_present="yes")), Reason.WRONG_TYPE, "card_present"),
        (encode(payment(currency="euro")), Reason.INVALID_VALUE, "currency"),
        (encode(payment(channel="fax")), Reason.INVALID_VALUE, "channel"),
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
    on_time = encode(reading(ts="2025-01-06T10:04:59Z"))
    ahead = encode(reading(ts="2025-01-06T10:05:01Z"))
    assert isinstance(decode(on_time, now=now), IotReading)
    result = decode(ahead, now=now)
    assert isinstance(result, DecodeError) and (result.reason, result.field) == (
        Reason.FUTURE_TIMESTAMP,
        "ts",
    )
    assert isinstance(decode(ahead), IotReading)  # no clock given, no check


def test_size_cap_is_inclusive_and_configurable() -> None:
    data = encode(reading())
    assert isinstance(decode(data, max_bytes=len(data)), IotReading)
    assert decode(data, max_bytes=len(data) - 1).reason == Reason.TOO_LARGE  # type: ignore[union-attr]


def test_expected_kind_rejects_events_on_the_wrong_topic() -> None:
    result = decode(encode(payment()), expected_kind="iot")
    assert isinstance(result, DecodeError) and result.reason == Reason.UNEXPECTED_KIND
    assert isinstance(decode(encode(payment()), expected_kind="transaction"), Transaction)


def test_missing_schema_version_reads_as_version_one() -> None:
    assert decode(encode(without(reading(), "schema_version"))) == decode(encode(reading()))


def test_timestamps_are_normalised_to_utc_and_keys_come_from_the_entity() -> None:
    event = decode(encode(reading(ts="2025-01-06T12:00:00.123+02:00")))
    assert isinstance(event, IotReading)
    assert event.ts == datetime(
        2025, 1, 6, 10, 0, 0, 123000, tzinfo=UTC
    ) and event.ts.utcoffset() == timedelta(0)
    assert event_time_ms(event) == 1736157600123 and from_millis(1736157600123) == event.ts
    assert (entity_id(event), event_id(event)) == ("dev-0001", "dev-0001#7")
    txn = decode(encode(payment()))
    assert (entity_id(txn), event_id(txn)) == ("acct-00001", "tx-1")  # type: ignore[arg-type]
