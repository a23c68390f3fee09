"""Event schemas: the JSON contract of the `iot.readings` and `transactions` topics.

Every event carries `kind` (which schema) and `schema_version` (which revision of it), so a
consumer can refuse what it does not understand instead of guessing. The models are strict:
on the wire a number is a number, a flag is a boolean, a timestamp is an ISO-8601 string with
a UTC offset. Identifiers are restricted to a safe alphabet because they end up in prompts; names
the world writes in its own scripts (a merchant, a site) are free text: any Unicode, NFC-normalised
and trimmed, bounded in characters and in UTF-8 bytes, without control characters.
"""

import unicodedata
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
)
from pydantic_core import PydanticCustomError

SCHEMA_VERSION = 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)  # built once: this is on every event's path
# Event times outside [epoch, year 9000) are refused: Kafka timestamps start at the epoch, and
# window starts and ends (plus lateness) must stay representable as datetimes downstream.
_LAST = datetime(9000, 1, 1, tzinfo=UTC)

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]
FREE_TEXT_CHARS = 64
# The tokenizer is byte-level: bytes, not characters, are what a name costs in a prompt.
FREE_TEXT_BYTES = 128
# Characters a name may not hold: they would break a prompt's lines or reorder what a reader sees.
_CONTROL_CATEGORIES = {"Cc", "Cs", "Zl", "Zp"}  # C0/C1 controls, lone surrogates, line breaks
_BIDI_CONTROLS = {"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"}


def _free_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    if not text.isprintable():  # the fast path lets every printable name through
        for i, char in enumerate(text):
            if (
                unicodedata.category(char) in _CONTROL_CATEGORIES
                or unicodedata.bidirectional(char) in _BIDI_CONTROLS
            ):
                raise PydanticCustomError(
                    "control_character",
                    "control character {code} at character {at} is not allowed",
                    {"code": f"U+{ord(char):04X}", "at": i},
                )
    text = text.strip()  # after the check: strip() would drop controls such as U+0085
    if not text:
        raise ValueError("must not be blank")
    if len(text) > FREE_TEXT_CHARS:
        raise ValueError(f"at most {FREE_TEXT_CHARS} characters, got {len(text)}")
    size = len(text.encode())
    if size > FREE_TEXT_BYTES:
        raise ValueError(f"at most {FREE_TEXT_BYTES} bytes in UTF-8, got {size}")
    return text


FreeText = Annotated[str, AfterValidator(_free_text)]


def _utc_in_range(ts: datetime) -> datetime:
    try:
        utc = ts.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00 has no UTC datetime
        raise ValueError("the timestamp is out of range in UTC") from None
    if not _EPOCH <= utc < _LAST:
        raise ValueError("the timestamp must be from 1970-01-01 to before 9000-01-01 (UTC)")
    return utc


UtcTimestamp = Annotated[AwareDatetime, AfterValidator(_utc_in_range)]


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    # A payload without the field is read as version 1; any other version is refused.
    schema_version: Literal[1] = SCHEMA_VERSION


class Metric(BaseModel):
    """One measured quantity of a reading."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: Annotated[str, Field(pattern=r"^[a-z][a-z_]{0,31}$")]
    value: Annotated[float, Field(allow_inf_nan=False)]
    unit: Annotated[str, Field(pattern=r"^[A-Za-z%/°]{1,8}$")]


class IotReading(_Event):
    """A sensor reading: one device, one instant, one or more metrics."""

    kind: Literal["iot"] = "iot"
    device_id: Identifier
    site: FreeText
    seq: Annotated[int, Field(ge=0, lt=2**63)]  # per-device sequence number: the dedupe id
    ts: UtcTimestamp
    metrics: Annotated[tuple[Metric, ...], Field(min_length=1, max_length=16)]
    firmware: Annotated[str, Field(pattern=r"^[0-9A-Za-z.+-]{1,32}$")]
    status: Literal["ok", "degraded", "fault"]

    @field_validator("metrics")
    @classmethod
    def _unique_names(cls, metrics: tuple[Metric, ...]) -> tuple[Metric, ...]:
        names = [m.name for m in metrics]
        if len(set(names)) != len(names):
            raise ValueError("metric names must be unique within a reading")
        return metrics


class Transaction(_Event):
    """A card payment."""

    kind: Literal["transaction"] = "transaction"
    txn_id: Identifier
    account_id: Identifier
    merchant: FreeText
    category: Annotated[str, Field(pattern=r"^[a-z][a-z_]{0,31}$")]  # MCC group, e.g. grocery
    amount: Annotated[Decimal, Field(gt=0, max_digits=18, decimal_places=4, allow_inf_nan=False)]
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]  # ISO 4217 alphabetic code
    ts: UtcTimestamp
    country: Annotated[str, Field(pattern=r"^[A-Z]{2}$")]  # ISO 3166-1 alpha-2 code
    channel: Literal["pos", "ecom", "atm", "moto"]
    card_present: bool


Event = Annotated[IotReading | Transaction, Field(discriminator="kind")]
EVENT_ADAPTER: TypeAdapter[IotReading | Transaction] = TypeAdapter(Event)


def entity_id(event: IotReading | Transaction) -> str:
    """The key events are partitioned and windowed by: the device or the account."""
    return event.device_id if isinstance(event, IotReading) else event.account_id


def event_id(event: IotReading | Transaction) -> str:
    """A stable identity for deduplication: re-delivered copies share it."""
    return f"{event.device_id}#{event.seq}" if isinstance(event, IotReading) else event.txn_id


def event_time_ms(event: IotReading | Transaction) -> int:
    """Event time as integer milliseconds since the Unix epoch (window arithmetic is exact)."""
    return (event.ts - _EPOCH) // _MS


def to_json_bytes(event: IotReading | Transaction) -> bytes:
    """The wire form: compact UTF-8 JSON."""
    return event.model_dump_json().encode()


def from_millis(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)
