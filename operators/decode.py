"""Bytes from Kafka -> an event, or a structured reason why not. Never raises.

The stream must not stop on bad input: every failure becomes a `DecodeError` with a reason code
from a fixed vocabulary (what the DLQ and its dashboards group by), the offending field as a
dotted path, and a short message that never echoes the payload back.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import ValidationError

from operators.events import EVENT_ADAPTER, IotReading, Transaction

DEFAULT_MAX_BYTES = 64 * 1024
DEFAULT_MAX_FUTURE = timedelta(minutes=5)
# The adapter's core validator: parses the bytes in Rust, without the adapter's Python wrapper
# (this runs once per event).
_VALIDATOR = EVENT_ADAPTER.validator


class Reason(StrEnum):
    NULL_VALUE = "null_value"
    TOO_LARGE = "too_large"
    EMPTY = "empty"
    NOT_UTF8 = "not_utf8"
    MALFORMED_JSON = "malformed_json"
    NOT_OBJECT = "not_object"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    UNKNOWN_KIND = "unknown_kind"
    UNEXPECTED_KIND = "unexpected_kind"
    UNSUPPORTED_VERSION = "unsupported_version"
    WRONG_TYPE = "wrong_type"
    NOT_FINITE = "not_finite"
    NON_POSITIVE_AMOUNT = "non_positive_amount"
    FUTURE_TIMESTAMP = "future_timestamp"
    INVALID_VALUE = "invalid_value"
    CONTROL_CHARACTER = "control_character"  # in free text (a merchant's or a site's name)


@dataclass(frozen=True)
class DecodeError:
    """Why a payload is not an event: `field` is a dotted path ('metrics.0.value') or None."""

    reason: Reason
    field: str | None
    message: str


def decode(
    data: bytes | None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expected_kind: str | None = None,
    now: datetime | None = None,
    max_future: timedelta = DEFAULT_MAX_FUTURE,
) -> IotReading | Transaction | DecodeError:
    """Decode and validate one message value.

    `expected_kind` ('iot' or 'transaction') rejects events on the wrong topic. `now` (wall clock,
    or the stream's event-time clock) rejects timestamps more than `max_future` ahead of it.
    A null value (a Kafka tombstone) is refused too: this stream has no deletes.
    """
    if data is None:
        return DecodeError(Reason.NULL_VALUE, None, "null value (a tombstone)")
    if len(data) > max_bytes:
        return DecodeError(
            Reason.TOO_LARGE, None, f"{len(data)} bytes exceeds the {max_bytes}-byte cap"
        )
    if not data:
        return DecodeError(Reason.EMPTY, None, "empty payload")
    try:
        data.decode("utf-8")  # only the check: the validator reads the bytes themselves
    except UnicodeDecodeError as error:
        return DecodeError(Reason.NOT_UTF8, None, f"invalid UTF-8 at byte {error.start}")
    try:
        event = _VALIDATOR.validate_json(data)
    except ValidationError as error:
        return _from_validation_error(error)
    if expected_kind is not None and event.kind != expected_kind:
        return DecodeError(
            Reason.UNEXPECTED_KIND, "kind", f"expected {expected_kind!r}, got {event.kind!r}"
        )
    if now is not None and event.ts > now + max_future:
        ahead = (event.ts - now).total_seconds()
        return DecodeError(Reason.FUTURE_TIMESTAMP, "ts", f"{ahead:.0f} s ahead of the clock")
    return event


# pydantic error types that mean "the JSON value has the wrong type" end in these suffixes.
_TYPE_SUFFIXES = ("_type", "_parsing", "_from_date_parsing")


def _from_validation_error(error: ValidationError) -> DecodeError:
    first = error.errors(include_input=False, include_url=False, include_context=False)[0]
    kind, loc, message = first["type"], first["loc"], first["msg"][:200]
    # A tagged union prefixes the location with the tag ('iot', 'metrics', 0, ...): drop it.
    path = loc[1:] if loc and loc[0] in ("iot", "transaction") else loc
    field = ".".join(str(part) for part in path) or None
    if kind == "json_invalid":
        return DecodeError(Reason.MALFORMED_JSON, None, message)
    if kind in ("dict_type", "model_type", "model_attributes_type") and field is None:
        return DecodeError(Reason.NOT_OBJECT, None, "the payload must be a JSON object")
    if kind == "union_tag_not_found":
        return DecodeError(Reason.MISSING_FIELD, "kind", "field 'kind' is required")
    if kind == "union_tag_invalid":
        return DecodeError(Reason.UNKNOWN_KIND, "kind", "kind must be 'iot' or 'transaction'")
    if field == "schema_version":
        return DecodeError(Reason.UNSUPPORTED_VERSION, field, message)
    reason = {
        "missing": Reason.MISSING_FIELD,
        "extra_forbidden": Reason.UNKNOWN_FIELD,
        "finite_number": Reason.NOT_FINITE,
        "control_character": Reason.CONTROL_CHARACTER,
    }.get(kind)
    if reason is None and field == "amount" and kind == "greater_than":
        reason = Reason.NON_POSITIVE_AMOUNT
    if reason is None:
        reason = Reason.WRONG_TYPE if kind.endswith(_TYPE_SUFFIXES) else Reason.INVALID_VALUE
    return DecodeError(reason, field, message)
