"""A deterministic simulator of IoT readings and card payments, as they arrive from Kafka.

Time is cut into blocks (the window size, aligned to the epoch). For every entity and block the
simulator decides, with the configured rates, whether to inject one anomaly there, generates the
block's events in event-time order, and records what it injected (`Simulation.truth`), so tests
can check that the windows flag exactly that. Devices follow daily cycles with sensor noise;
injected: spikes, stuck sensors, dropouts, drifts. Accounts spend at their own pace in their
home country and currency; injected: bursts, card testing, geo-impossible travel.

`deliver` then turns the clean stream into what a broker sees: a configurable share of messages
arrives reordered (within the watermark delay), late (beyond it), duplicated or malformed, each
malformed message tagged with the decode reason it must produce. Same seed, same bytes.
"""

import heapq
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Literal

import numpy as np

from operators.decode import Reason
from operators.events import (
    IotReading,
    Metric,
    Transaction,
    entity_id,
    event_time_ms,
    from_millis,
    to_json_bytes,
)
from operators.stats import COUNTRY_COORDS, minor_units

Event = IotReading | Transaction
DEFAULT_START = datetime(2025, 1, 6, tzinfo=UTC)
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
TEN_YEARS = timedelta(days=3652)  # a clock set wrong: the decoder's future check must catch it

IOT_ANOMALIES = ("spike", "stuck", "dropout", "drift")
TXN_ANOMALIES = ("burst", "card_testing", "geo_impossible")


@dataclass(frozen=True)
class MetricModel:
    """How one physical quantity behaves: level, daily swing, sensor noise, drift speed."""

    unit: str
    baseline: tuple[float, float]
    daily_amplitude: float
    noise: float
    drift_per_hour: tuple[float, float]


METRICS: dict[str, MetricModel] = {
    "temperature": MetricModel("°C", (18.0, 26.0), 3.0, 0.1, (11.0, 56.0)),
    "humidity": MetricModel("%", (35.0, 60.0), 6.0, 0.3, (32.0, 160.0)),
    "pressure": MetricModel("hPa", (1000.0, 1025.0), 2.0, 0.2, (19.0, 96.0)),
    "vibration": MetricModel("mm/s", (1.5, 4.0), 0.5, 0.05, (4.8, 24.0)),
    "power": MetricModel("kW", (5.0, 40.0), 8.0, 0.3, (29.0, 144.0)),
}
DEVICE_TYPES = (("temperature", "humidity"), ("vibration", "power"), ("pressure", "temperature"))
SITES = ("lyon-east", "hamburg-port", "austin-north", "osaka-bay", "turin-plant", "leeds-depot")
FIRMWARE = ("2.4.1", "2.5.0", "3.0.2")

HOME_COUNTRIES = {"DE": "EUR", "FR": "EUR", "ES": "EUR", "NL": "EUR", "IT": "EUR",
                  "GB": "GBP", "CH": "CHF", "US": "USD", "JP": "JPY"}  # fmt: skip
PRICE_SCALE = {"EUR": 1.0, "GBP": 0.85, "CHF": 0.95, "USD": 1.1, "JPY": 160.0}
CARD_TEST_AMOUNT = {"JPY": (40.0, 250.0)}  # others: 0.30 .. 1.95 in their unit
# category -> (median amount in EUR, log-normal sigma, merchants)
CATEGORIES: dict[str, tuple[float, float, tuple[str, ...]]] = {
    "grocery": (35.0, 0.6, ("Corner Grocer", "FreshMart", "Daily Basket")),
    "fuel": (60.0, 0.4, ("QuickFuel", "Route Nine Gas")),
    "dining": (28.0, 0.6, ("Blue Door Bistro", "Noodle Bar", "Cafe Central")),
    "travel": (180.0, 0.8, ("SkyHop Air", "RailLink")),
    "electronics": (120.0, 0.9, ("Volt Store", "Circuit House")),
    "pharmacy": (18.0, 0.5, ("Green Cross Pharmacy",)),
    "online_retail": (45.0, 0.8, ("ShopSphere", "Parcelly")),
    "entertainment": (25.0, 0.6, ("Starlight Cinema", "Stream Hub")),
}
CARD_TEST_MERCHANTS = ("PixelPay Store", "QuickGift Online", "Game Coins Direct")
CHANNELS = ("pos", "ecom", "atm", "moto")
CHANNEL_CDF = (0.6, 0.92, 0.97, 1.0)


@dataclass(frozen=True)
class InjectedAnomaly:
    entity: str
    type: str
    start_ms: int  # the block it was injected in
    end_ms: int


@dataclass(frozen=True)
class IotConfig:
    seed: int = 0
    devices: int = 50
    interval_s: float = 10.0
    block_s: float = 300.0
    start: datetime = DEFAULT_START
    anomaly_rates: dict[str, float] = field(
        default_factory=lambda: {"spike": 0.02, "stuck": 0.02, "dropout": 0.02, "drift": 0.02}
    )


@dataclass(frozen=True)
class TxnConfig:
    seed: int = 0
    accounts: int = 200
    block_s: float = 300.0
    start: datetime = DEFAULT_START
    mean_per_block: tuple[float, float] = (0.15, 0.6)  # an account's normal pace, drawn per account
    anomaly_rates: dict[str, float] = field(
        default_factory=lambda: {"burst": 0.02, "card_testing": 0.02, "geo_impossible": 0.02}
    )


def _check_rates(rates: dict[str, float], known: tuple[str, ...]) -> None:
    unknown = set(rates) - set(known)
    if unknown:
        raise ValueError(f"unknown anomaly type(s) {sorted(unknown)}; known: {', '.join(known)}")
    if any(r < 0 for r in rates.values()) or sum(rates.values()) > 1:
        raise ValueError("anomaly rates must be >= 0 and sum to at most 1 (one anomaly per block)")


def _check_start(start: datetime, block_s: float) -> int:
    start_ms = int(start.timestamp() * 1000)
    if start_ms % round(block_s * 1000):
        raise ValueError("start must be aligned to the block size so that blocks match windows")
    return start_ms


class _BlockSimulator:
    """Shared loop: per block, per entity, maybe one anomaly; events merged in time order."""

    anomaly_types: tuple[str, ...]

    def __init__(self, seed: int, block_s: float, start: datetime, rates: dict[str, float]):
        _check_rates(rates, self.anomaly_types)
        self.block_ms = round(block_s * 1000)
        self.start_ms = _check_start(start, block_s)
        self.rates = rates
        self.rng = np.random.default_rng([seed, 1])  # the stream; [seed, 0] drew the entities
        self.truth: list[InjectedAnomaly] = []

    ids: list[str]

    def block_events(self, start_ms: int, anomalies: list[str | None]) -> list[Event]:
        """All entities' events of one block, given the anomaly (or None) of each entity."""
        raise NotImplementedError

    def events(self, blocks: int | None = None) -> Iterator[Event]:
        """The clean stream in event-time order: `blocks` blocks, or endless."""
        types = list(self.rates)
        probs = np.array([self.rates[t] for t in types] + [1 - sum(self.rates.values())])
        start_ms = self.start_ms
        for _ in itertools.count() if blocks is None else range(blocks):
            choices = self.rng.choice(len(probs), size=len(self.ids), p=probs)
            anomalies = [types[c] if c < len(types) else None for c in choices]
            for entity, anomaly in zip(self.ids, anomalies):
                if anomaly:
                    self.truth.append(
                        InjectedAnomaly(entity, anomaly, start_ms, start_ms + self.block_ms)
                    )
            block = self.block_events(start_ms, anomalies)
            block.sort(key=lambda e: (e.ts, entity_id(e)))
            yield from block
            start_ms += self.block_ms


class IotSimulator(_BlockSimulator):
    anomaly_types = IOT_ANOMALIES

    def __init__(self, config: IotConfig):
        super().__init__(config.seed, config.block_s, config.start, config.anomaly_rates)
        self.interval_ms = round(config.interval_s * 1000)
        if self.block_ms < 20 * self.interval_ms:
            raise ValueError("a block must hold at least 20 readings (block_s >= 20 * interval_s)")
        setup = np.random.default_rng([config.seed, 0])
        self.ids = [f"dev-{i:04d}" for i in range(config.devices)]
        self.site = [SITES[int(setup.integers(len(SITES)))] for _ in self.ids]
        self.firmware = [FIRMWARE[int(setup.integers(len(FIRMWARE)))] for _ in self.ids]
        self.metrics = [DEVICE_TYPES[int(setup.integers(len(DEVICE_TYPES)))] for _ in self.ids]
        self.baseline = [[setup.uniform(*METRICS[m].baseline) for m in ms] for ms in self.metrics]
        self.phase_ms = setup.integers(0, DAY_MS, len(self.ids))  # local time of the daily peak
        self.offset_ms = setup.integers(0, self.interval_ms, len(self.ids))
        self.seq = [0] * len(self.ids)

    def block_events(self, start_ms: int, anomalies: list[str | None]) -> list[Event]:
        return [
            r
            for index, anomaly in enumerate(anomalies)
            for r in self._device(index, start_ms, anomaly)
        ]

    def _device(self, index: int, start_ms: int, anomaly: str | None) -> list[IotReading]:
        rng = self.rng
        n = self.block_ms // self.interval_ms
        jitter = rng.integers(-500, 501, n)
        t = start_ms + self.offset_ms[index] + np.arange(n) * self.interval_ms + jitter
        t = np.clip(t, start_ms, start_ms + self.block_ms - 1)
        names = self.metrics[index]
        values = []
        for name, base in zip(names, self.baseline[index]):
            model = METRICS[name]
            cycle = model.daily_amplitude * np.sin(2 * np.pi * (t - self.phase_ms[index]) / DAY_MS)
            values.append(base + cycle + rng.normal(0, model.noise, n))
        keep = np.ones(n, dtype=bool)
        which = int(rng.integers(len(names)))  # the metric an anomaly hits
        model = METRICS[names[which]]
        if anomaly == "spike":
            at = int(rng.integers(3, n - 3))
            sign = 1 if rng.random() < 0.8 else -1
            values[which][at] += sign * rng.uniform(10, 70) * model.noise
        elif anomaly == "stuck":
            length = int(rng.integers(int(0.4 * n), n - 1))
            at = int(rng.integers(0, n - length + 1))
            values[which][at : at + length] = round(float(values[which][at]), 2)
        elif anomaly == "drift":
            rate = rng.uniform(*model.drift_per_hour) * (1 if rng.random() < 0.5 else -1)
            values[which] += rate * (t - start_ms) / HOUR_MS
        elif anomaly == "dropout":
            gap = rng.uniform(0.24, 0.9) * self.block_ms
            margin = self.block_ms / 30  # keep a reading on each side of the silence
            gap_start = start_ms + rng.uniform(margin, self.block_ms - gap - margin)
            keep = (t < gap_start) | (t >= gap_start + gap)
        columns = [np.round(v, 2).tolist() for v in values]  # sensor resolution: 0.01
        units = [METRICS[name].unit for name in names]
        times = t.tolist()
        readings = []
        for i in np.flatnonzero(keep).tolist():
            self.seq[index] += 1
            readings.append(
                IotReading(
                    device_id=self.ids[index],
                    site=self.site[index],
                    seq=self.seq[index],
                    ts=from_millis(times[i]),
                    metrics=tuple(
                        Metric(name=name, value=column[i], unit=unit)
                        for name, column, unit in zip(names, columns, units)
                    ),
                    firmware=self.firmware[index],
                    status="ok",
                )
            )
        return readings


class TxnSimulator(_BlockSimulator):
    anomaly_types = TXN_ANOMALIES

    def __init__(self, config: TxnConfig):
        super().__init__(config.seed, config.block_s, config.start, config.anomaly_rates)
        setup = np.random.default_rng([config.seed, 0])
        homes = sorted(HOME_COUNTRIES)
        self.ids = [f"acct-{i:05d}" for i in range(config.accounts)]
        self.country = [homes[int(setup.integers(len(homes)))] for _ in self.ids]
        self.pace = setup.uniform(*config.mean_per_block, len(self.ids))
        self.favourites = [setup.permutation(sorted(CATEGORIES))[:4].tolist() for _ in self.ids]
        # Per-payment scalar draws: Python's generator is far cheaper per call than numpy's.
        self.draw = random.Random(f"{config.seed}:payments")

    def block_events(self, start_ms: int, anomalies: list[str | None]) -> list[Event]:
        counts = self.rng.poisson(self.pace)
        return [
            txn
            for index, (count, anomaly) in enumerate(zip(counts, anomalies))
            if count or anomaly
            for txn in self._account(index, start_ms, int(count), anomaly)
        ]

    def _account(
        self, index: int, start_ms: int, count: int, anomaly: str | None
    ) -> list[Transaction]:
        draw = self.draw
        txns = [
            self._regular(index, int(draw.uniform(start_ms, start_ms + self.block_ms)))
            for _ in range(count)
        ]
        span = draw.uniform(0.2, 0.6) * self.block_ms  # an attack takes a minute or a few
        begin = start_ms + draw.uniform(0, self.block_ms - span)
        if anomaly == "burst":
            times = sorted(begin + draw.uniform(0, span) for _ in range(draw.randint(6, 14)))
            txns += [self._regular(index, int(t)) for t in times]
        elif anomaly == "card_testing":
            merchant = draw.choice(CARD_TEST_MERCHANTS)
            times = [begin + draw.uniform(0, span) for _ in range(draw.randint(3, 10))]
            txns += [self._card_test(index, int(t), merchant) for t in times]
        elif anomaly == "geo_impossible":
            home = self.country[index]
            abroad = draw.choice(sorted(set(COUNTRY_COORDS) - {home}))
            first = int(begin)
            second = first + int(draw.uniform(0.1, 1.0) * (start_ms + self.block_ms - 1 - first))
            txns += [
                self._regular(index, first, "pos", home),
                self._regular(index, second, "pos", abroad),
            ]
        return txns

    def _new(
        self,
        index: int,
        ts_ms: int,
        merchant: str,
        category: str,
        amount: float,
        country: str,
        channel: str,
    ) -> Transaction:
        currency = HOME_COUNTRIES[self.country[index]]
        exponent = Decimal(1).scaleb(-minor_units(currency))
        return Transaction(
            txn_id=f"tx-{self.draw.getrandbits(62):016x}",
            account_id=self.ids[index],
            merchant=merchant,
            category=category,
            amount=Decimal(str(amount)).quantize(exponent),
            currency=currency,
            ts=from_millis(ts_ms),
            country=country,
            channel=channel,
            card_present=channel in ("pos", "atm"),
        )

    def _regular(
        self, index: int, ts_ms: int, channel: str | None = None, country: str | None = None
    ) -> Transaction:
        draw = self.draw
        if channel is None:
            channel = draw.choices(CHANNELS, cum_weights=CHANNEL_CDF)[0]
        if channel == "atm":
            category, merchant = "cash", "ATM"
            amount = float(draw.choice((20, 50, 100, 200)))
        else:
            category = draw.choice(self.favourites[index])
            median, sigma, merchants = CATEGORIES[category]
            merchant = draw.choice(merchants)
            amount = max(2.5, median * draw.lognormvariate(0, sigma))
        amount *= PRICE_SCALE[HOME_COUNTRIES[self.country[index]]]
        return self._new(
            index, ts_ms, merchant, category, amount, country or self.country[index], channel
        )

    def _card_test(self, index: int, ts_ms: int, merchant: str) -> Transaction:
        currency = HOME_COUNTRIES[self.country[index]]
        amount = self.draw.uniform(*CARD_TEST_AMOUNT.get(currency, (0.3, 1.95)))
        return self._new(
            index, ts_ms, merchant, "online_retail", amount, self.country[index], "ecom"
        )


# --- delivery: what the broker sees ------------------------------------------------------------

Tag = Literal["ok", "reordered", "late", "duplicate", "malformed"]


@dataclass(frozen=True)
class Mess:
    """Shares of imperfect deliveries (each message independently) and their delays."""

    late: float = 0.0
    reordered: float = 0.0
    duplicate: float = 0.0
    malformed: float = 0.0
    late_delay_s: float = 900.0  # beyond any window's close: these must come out as late
    reorder_delay_s: float = 20.0  # within the watermark delay: these must not

    def __post_init__(self) -> None:
        shares = (self.late, self.reordered, self.duplicate, self.malformed)
        if (
            any(s < 0 for s in shares)
            or self.late + self.reordered + self.malformed > 1
            or self.duplicate > 1
        ):
            raise ValueError(
                "mess shares must be >= 0, late+reordered+malformed <= 1, duplicate <= 1"
            )


@dataclass(frozen=True)
class Message:
    key: str
    value: bytes
    event: Event | None  # None when the value is malformed
    tag: Tag
    reason: Reason | None = None  # the decode error a malformed value must produce


def deliver(events: Iterator[Event], mess: Mess, seed: int) -> Iterator[Message]:
    """Order the events by arrival time after the configured delays, copies and corruptions."""
    rng = random.Random(f"{seed}:delivery")
    pending: list[tuple[int, int, Message]] = []  # (arrival ms, tiebreak, message)
    counter = 0
    for event in events:
        now = event_time_ms(event)
        while pending and pending[0][0] <= now:
            yield heapq.heappop(pending)[2]
        key, value = entity_id(event), to_json_bytes(event)
        u = rng.random()
        if u < mess.malformed:
            reason, value = _corrupt(event, value, rng)
            out = [(now, Message(key, value, None, "malformed", reason))]
        elif u < mess.malformed + mess.late:
            out = [(now + round(mess.late_delay_s * 1000), Message(key, value, event, "late"))]
        elif u < mess.malformed + mess.late + mess.reordered:
            delay = rng.randint(1000, round(mess.reorder_delay_s * 1000))
            out = [(now + delay, Message(key, value, event, "reordered"))]
        else:
            out = [(now, Message(key, value, event, "ok"))]
        if out[0][1].tag != "malformed" and rng.random() < mess.duplicate:
            delay = rng.randint(0, round(mess.reorder_delay_s * 1000))
            out.append((out[0][0] + delay, Message(key, value, event, "duplicate")))
        for arrival, message in out:
            counter += 1
            heapq.heappush(pending, (arrival, counter, message))
    while pending:  # a finite input ends: everything still in flight arrives
        yield heapq.heappop(pending)[2]


def _corrupt(event: Event, value: bytes, rng: random.Random) -> tuple[Reason, bytes]:
    """One realistic way of breaking a message, with the reason the decoder must give."""
    obj = json.loads(value)
    choices: list[tuple[Reason, object]] = [
        (Reason.MALFORMED_JSON, lambda: value[: len(value) // 2]),
        (Reason.NOT_UTF8, lambda: value[:10] + b"\xff\xfe" + value[10:]),
        (Reason.MISSING_FIELD, lambda: _dump({k: v for k, v in obj.items() if k != "ts"})),
        (Reason.TOO_LARGE, lambda: _dump({**obj, "padding": "x" * 70_000})),
        (Reason.FUTURE_TIMESTAMP, lambda: _dump({**obj, "ts": (event.ts + TEN_YEARS).isoformat()})),
    ]
    if isinstance(event, IotReading):
        metric = {**obj["metrics"][0], "value": float("nan")}
        choices += [
            (Reason.WRONG_TYPE, lambda: _dump({**obj, "seq": str(obj["seq"])})),
            (Reason.NOT_FINITE, lambda: _dump({**obj, "metrics": [metric, *obj["metrics"][1:]]})),
        ]
    else:
        choices += [
            (Reason.WRONG_TYPE, lambda: _dump({**obj, "card_present": "yes"})),
            (Reason.NON_POSITIVE_AMOUNT, lambda: _dump({**obj, "amount": "-" + obj["amount"]})),
        ]
    reason, make = rng.choice(choices)
    return reason, make()  # type: ignore[operator]


def _dump(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass
class Simulation:
    """One seeded stream of messages and the ground truth it was built from."""

    source: IotSimulator | TxnSimulator
    mess: Mess
    seed: int

    @property
    def truth(self) -> list[InjectedAnomaly]:
        return self.source.truth

    def messages(self, blocks: int | None = None) -> Iterator[Message]:
        """What the broker receives: `blocks` whole blocks' worth of events, or endless."""
        return deliver(self.source.events(blocks), self.mess, self.seed)


def simulate(
    kind: Literal["iot", "transactions"],
    seed: int = 0,
    entities: int | None = None,
    anomaly_rates: dict[str, float] | None = None,
    mess: Mess | None = None,
    block_s: float = 300.0,
) -> Simulation:
    """The one entry point: a reproducible stream of IoT readings or transactions."""
    options: dict = {"seed": seed, "block_s": block_s}
    if anomaly_rates is not None:
        options["anomaly_rates"] = anomaly_rates
    if kind == "iot":
        source: IotSimulator | TxnSimulator = IotSimulator(
            IotConfig(**options, **({"devices": entities} if entities else {}))
        )
    elif kind == "transactions":
        source = TxnSimulator(TxnConfig(**options, **({"accounts": entities} if entities else {})))
    else:
        raise ValueError(f"kind must be 'iot' or 'transactions', got {kind!r}")
    return Simulation(source, mess or Mess(), seed)
