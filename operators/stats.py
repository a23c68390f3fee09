"""Statistics and anomaly flags of one entity's window of events.

Everything here looks at the window alone, as the streaming pipeline does: per-metric
count/min/max/mean/trend and IoT anomalies (spike, stuck sensor, dropout, drift); per-account
totals by currency, counts by merchant category and payment anomalies (burst, card testing,
geo-impossible travel). Each anomaly carries a severity and the key numbers that justify it,
rounded the way summaries state them (`Quantity`).

Trends are Theil-Sen slopes (median of pairwise slopes), so a single spike cannot fake a drift;
spikes are robust z-scores of the residuals around that trend line.
"""

import functools
import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

import numpy as np

from operators.events import IotReading, Transaction, event_time_ms

Severity = Literal["low", "medium", "high"]
MS_PER_HOUR = 3_600_000
MS_PER_MINUTE = 60_000


@dataclass(frozen=True)
class Quantity:
    """A number as a summary states it: `decimals` places, optionally with an explicit sign."""

    value: float
    decimals: int
    unit: str = ""
    signed: bool = False

    @property
    def text(self) -> str:
        rounded = round(self.value, self.decimals)
        if rounded == 0:
            rounded = 0.0  # never "-0.0"
        return f"{rounded:+.{self.decimals}f}" if self.signed else f"{rounded:.{self.decimals}f}"


@dataclass(frozen=True)
class Anomaly:
    type: str
    severity: Severity
    subject: str  # the metric, the merchant, or the countries involved
    numbers: tuple[Quantity, ...]


@dataclass(frozen=True)
class MetricStats:
    name: str
    unit: str
    count: int
    min: Quantity
    max: Quantity
    mean: Quantity
    trend: Quantity  # per hour
    unknown_unit: bool = False  # the metric has thresholds, none in this unit: not judged


@dataclass(frozen=True)
class IotStats:
    entity: str
    site: str
    start_ms: int
    end_ms: int
    count: int
    metrics: tuple[MetricStats, ...]
    not_ok: tuple[tuple[str, int], ...]  # readings per non-ok status
    anomalies: tuple[Anomaly, ...]


@dataclass(frozen=True)
class TxnStats:
    entity: str
    start_ms: int
    end_ms: int
    count: int
    totals: tuple[Quantity, ...]  # one per currency, unit = currency code
    largest: Quantity
    categories: tuple[tuple[str, int], ...]  # most frequent first
    countries: tuple[str, ...]
    anomalies: tuple[Anomaly, ...]


WindowStats = IotStats | TxnStats


# The size of one unit in its family's base unit, for differences (a trend, the noise): a
# temperature difference of 1 °F is 5/9 K whatever the offset. Units are written as readings write
# them; a spelling not listed here is an unknown unit.
UNIT_FAMILIES: dict[str, tuple[str, float]] = {
    "°C": ("temperature", 1.0), "degC": ("temperature", 1.0), "K": ("temperature", 1.0),
    "°F": ("temperature", 5 / 9), "degF": ("temperature", 5 / 9),
    "mW": ("power", 1e-3), "W": ("power", 1.0), "kW": ("power", 1e3), "MW": ("power", 1e6),
    "GW": ("power", 1e9),
    "Pa": ("pressure", 1.0), "hPa": ("pressure", 100.0), "mbar": ("pressure", 100.0),
    "kPa": ("pressure", 1e3), "MPa": ("pressure", 1e6), "bar": ("pressure", 1e5),
    "psi": ("pressure", 6894.757293168361), "atm": ("pressure", 101325.0),
    "mmHg": ("pressure", 133.322387415), "inHg": ("pressure", 3386.389),
    "mm/s": ("speed", 1e-3), "cm/s": ("speed", 1e-2), "m/s": ("speed", 1.0),
    "in/s": ("speed", 0.0254),
    "%": ("ratio", 1.0), "%RH": ("ratio", 1.0),
}  # fmt: skip


@dataclass(frozen=True)
class MetricRule:
    """Detection thresholds of one metric, in `unit`."""

    unit: str
    noise_floor: float  # the sensor's noise spec: a partly flat series must not shrink the scale
    drift_per_hour: float  # |trend| above this is a drift

    def in_unit(self, unit: str) -> "MetricRule | None":
        """The same thresholds in `unit`, or None where `unit` is not of this rule's family."""
        family, size = UNIT_FAMILIES.get(unit, ("", 0.0))
        own_family, own_size = UNIT_FAMILIES[self.unit]
        if family != own_family:
            return None
        factor = own_size / size
        return MetricRule(unit, self.noise_floor * factor, self.drift_per_hour * factor)


# Thresholds for the metrics our devices report, in the simulator's units; a reading in another
# unit of the same family is judged by the converted thresholds, one in a unit that does not
# convert is not judged (no spike or drift; `MetricStats.unknown_unit`); an unknown metric gets
# spike checks only.
METRIC_RULES: dict[str, MetricRule] = {
    "temperature": MetricRule("°C", noise_floor=0.1, drift_per_hour=7.0),
    "humidity": MetricRule("%", noise_floor=0.3, drift_per_hour=20.0),
    "pressure": MetricRule("hPa", noise_floor=0.2, drift_per_hour=12.0),
    "vibration": MetricRule("mm/s", noise_floor=0.05, drift_per_hour=3.0),
    "power": MetricRule("kW", noise_floor=0.3, drift_per_hour=18.0),
}


@functools.lru_cache(maxsize=256)
def metric_rule(name: str, unit: str) -> tuple[MetricRule | None, bool]:
    """The thresholds of (metric, unit), and whether the unit is unknown for a metric that has
    thresholds (then there are none to judge it by)."""
    rule = METRIC_RULES.get(name)
    if rule is None:
        return None, False
    converted = rule.in_unit(unit)
    return converted, converted is None


SPIKE_Z = 8.0  # robust z-score of a residual that counts as a spike
STUCK_MIN_READINGS = 8  # identical consecutive values that count as a stuck sensor
DROPOUT_MIN_MS = 60_000  # a silence this long, and ...
DROPOUT_MIN_INTERVALS = 4.0  # ... this many reporting intervals, is a dropout


def severity(value: float, medium: float, high: float) -> Severity:
    """Grade a magnitude that already passed its detection threshold."""
    return "high" if value >= high else "medium" if value >= medium else "low"


def iot_stats(key: str, start_ms: int, end_ms: int, readings: Sequence[IotReading]) -> IotStats:
    """Statistics and anomalies of one device's readings (sorted by time) in [start_ms, end_ms)."""
    if not readings:
        raise ValueError("a window has at least one reading")
    t = np.array([event_time_ms(r) for r in readings], dtype=np.int64)
    metrics, anomalies = [], []
    for (name, unit), (rows, values) in _metric_columns(readings).items():
        stats, found = _metric_window(name, unit, t[rows], np.array(values))
        metrics.append(stats)
        anomalies.extend(found)
    gap = _dropout(t, start_ms, end_ms)
    if gap is not None:
        anomalies.append(gap)
    not_ok = Counter(r.status for r in readings if r.status != "ok")
    return IotStats(
        entity=key,
        site=readings[-1].site,
        start_ms=start_ms,
        end_ms=end_ms,
        count=len(readings),
        metrics=tuple(metrics),
        not_ok=tuple(sorted(not_ok.items())),
        anomalies=tuple(anomalies),
    )


_Column = tuple[list[int], list[float]]  # indices of the readings, values


def _metric_columns(readings: Sequence[IotReading]) -> dict[tuple[str, str], _Column]:
    """Per (metric, unit), in order of first appearance: the indices of the readings that report
    it and their values, in one pass over the window (a device that changes units mid-window gets
    one column per unit: values of different units never mix)."""
    columns: dict[tuple[str, str], _Column] = {}
    for i, r in enumerate(readings):
        for m in r.metrics:
            column = columns.get((m.name, m.unit))
            if column is None:
                column = columns[m.name, m.unit] = ([], [])
            column[0].append(i)
            column[1].append(m.value)
    return columns


def median(a: np.ndarray) -> float:
    """`np.median` of a non-empty 1-D float array without NaNs, bit for bit, without its
    generic-axis overhead: numpy averages the middle element(s) with a sum that starts at 0.0
    (so -0.0 becomes 0.0), then divides by their count."""
    half = len(a) // 2
    if len(a) % 2:
        return float(0.0 + np.partition(a, half)[half])
    middle = np.partition(a, (half - 1, half))
    return float((0.0 + middle[half - 1] + middle[half]) / 2)


@functools.lru_cache(maxsize=256)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs i < j of n points (windows repeat the same few sizes)."""
    i, j = np.triu_indices(n, k=1)
    i.flags.writeable = j.flags.writeable = False  # shared between calls
    return i, j


def theil_sen(t_hours: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Median-of-pairwise-slopes line (slope, intercept); robust to outliers and flat runs.

    Only pairs at least a quarter of the time span apart vote: close pairs have noisy slopes,
    and when a dropout leaves two clumps of readings they would outvote the clumps' difference.
    """
    if len(y) < 2:
        return 0.0, float(y[0])
    i, j = _pairs(len(y))
    dt = t_hours[j] - t_hours[i]
    ok = (dt > 0) & (dt >= (t_hours[-1] - t_hours[0]) / 4)
    slope = median((y[j] - y[i])[ok] / dt[ok]) if ok.any() else 0.0
    return slope, median(y - slope * t_hours)


def _metric_window(
    name: str, unit: str, t_ms: np.ndarray, y: np.ndarray
) -> tuple[MetricStats, list[Anomaly]]:
    rule, unknown_unit = metric_rule(name, unit)
    t_hours = (t_ms - t_ms[0]) / MS_PER_HOUR
    slope, intercept = theil_sen(t_hours, y)
    stats = MetricStats(
        name=name,
        unit=unit,
        count=len(y),
        min=Quantity(float(y.min()), 1, unit),
        max=Quantity(float(y.max()), 1, unit),
        mean=Quantity(float(y.mean()), 1, unit),
        trend=Quantity(slope, 1, f"{unit}/h", signed=True),
        unknown_unit=unknown_unit,
    )
    judged = (
        ()
        if unknown_unit
        else (
            _spike(name, unit, t_hours, y, slope, intercept, rule),
            _drift(name, unit, slope, rule),
        )
    )
    anomalies = [a for a in (_stuck(name, unit, t_ms, y), *judged) if a is not None]
    return stats, anomalies


def _spike(
    name: str,
    unit: str,
    t_hours: np.ndarray,
    y: np.ndarray,
    slope: float,
    intercept: float,
    rule: MetricRule | None,
) -> Anomaly | None:
    if len(y) < 5:
        return None
    residual = y - (intercept + slope * t_hours)
    scale = 1.4826 * median(np.abs(residual - median(residual)))
    scale = max(scale, rule.noise_floor if rule else 1e-9)
    z = np.abs(residual) / scale
    worst = int(np.argmax(z))
    if z[worst] < SPIKE_Z:
        return None
    return Anomaly(
        "spike",
        severity(float(z[worst]), medium=3 * SPIKE_Z, high=6 * SPIKE_Z),
        name,
        (Quantity(float(y[worst]), 1, unit),),
    )


def _stuck(name: str, unit: str, t_ms: np.ndarray, y: np.ndarray) -> Anomaly | None:
    # Longest run of exactly equal consecutive values: live sensors always jitter.
    values = y.tolist()  # Python floats: the loop below is per element
    best_start, best_len, run_start = 0, 1, 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[run_start]:
            if i - run_start > best_len:
                best_start, best_len = run_start, i - run_start
            run_start = i
    if best_len < STUCK_MIN_READINGS:
        return None
    minutes = (t_ms[best_start + best_len - 1] - t_ms[best_start]) / MS_PER_MINUTE
    return Anomaly(
        "stuck",
        severity(minutes, medium=2.5, high=4.0),
        name,
        (Quantity(float(y[best_start]), 1, unit), Quantity(minutes, 1, "min")),
    )


def _drift(name: str, unit: str, slope: float, rule: MetricRule | None) -> Anomaly | None:
    if rule is None or abs(slope) < rule.drift_per_hour:
        return None
    ratio = abs(slope) / rule.drift_per_hour
    return Anomaly(
        "drift",
        severity(ratio, medium=2.5, high=5.0),
        name,
        (Quantity(slope, 1, f"{unit}/h", signed=True),),
    )


def _dropout(t_ms: np.ndarray, start_ms: int, end_ms: int) -> Anomaly | None:
    # Silences between readings, and from the window's edges to the first and last reading.
    edges = np.concatenate([[start_ms], t_ms, [end_ms]])
    gaps = np.diff(edges)
    # The shortest spacing is the device's cadence even when most of the window is silent.
    typical = float(np.diff(t_ms).min()) if len(t_ms) > 2 else 0.0
    longest = int(gaps.max())
    if longest < DROPOUT_MIN_MS or longest < DROPOUT_MIN_INTERVALS * typical:
        return None
    minutes = longest / MS_PER_MINUTE
    return Anomaly(
        "dropout",
        severity(minutes, medium=2.0, high=3.5),
        "readings",
        (Quantity(minutes, 1, "min"),),
    )


# Amounts below this (per currency) on a card-not-present payment look like card testing.
SMALL_AMOUNT: dict[str, Decimal] = {
    "EUR": Decimal(2),
    "USD": Decimal(2),
    "GBP": Decimal(2),
    "CHF": Decimal(2),
    "JPY": Decimal(300),
}
MINOR_UNITS: dict[str, int] = {"JPY": 0}  # ISO 4217 exponent where it is not 2
BURST_MIN = 6  # regular payments in one window
CARD_TEST_MIN = 3  # small card-not-present payments in one window

# Capital coordinates (lat, lon) for the distance of impossible travel.
COUNTRY_COORDS: dict[str, tuple[float, float]] = {
    "DE": (52.52, 13.40), "FR": (48.86, 2.35), "ES": (40.42, -3.70), "IT": (41.90, 12.50),
    "NL": (52.37, 4.90), "GB": (51.51, -0.13), "CH": (46.95, 7.45), "US": (38.91, -77.04),
    "JP": (35.68, 139.69), "BR": (-15.79, -47.88), "IN": (28.61, 77.21), "AU": (-35.28, 149.13),
    "NG": (9.08, 7.40), "RU": (55.76, 37.62), "MX": (19.43, -99.13), "SG": (1.29, 103.85),
}  # fmt: skip


def minor_units(currency: str) -> int:
    return MINOR_UNITS.get(currency, 2)


def txn_stats(key: str, start_ms: int, end_ms: int, txns: Sequence[Transaction]) -> TxnStats:
    """Statistics and anomalies of one account's payments (sorted by time) in [start_ms, end_ms)."""
    if not txns:
        raise ValueError("a window has at least one transaction")
    totals: dict[str, Decimal] = {}
    for t in txns:
        totals[t.currency] = totals.get(t.currency, Decimal(0)) + t.amount
    largest = max(txns, key=lambda t: (t.amount, t.ts))
    categories = Counter(t.category for t in txns)
    anomalies = [
        a for a in (_burst(txns), _card_testing(txns), _geo_impossible(txns)) if a is not None
    ]
    return TxnStats(
        entity=key,
        start_ms=start_ms,
        end_ms=end_ms,
        count=len(txns),
        totals=tuple(
            Quantity(float(total), minor_units(cur), cur) for cur, total in sorted(totals.items())
        ),
        largest=Quantity(float(largest.amount), minor_units(largest.currency), largest.currency),
        categories=tuple(sorted(categories.items(), key=lambda kv: (-kv[1], kv[0]))),
        countries=tuple(sorted({t.country for t in txns})),
        anomalies=tuple(anomalies),
    )


def _is_small_cnp(t: Transaction) -> bool:
    small = SMALL_AMOUNT.get(t.currency)
    return not t.card_present and small is not None and t.amount < small


def _burst(txns: Sequence[Transaction]) -> Anomaly | None:
    regular = [t for t in txns if not _is_small_cnp(t)]
    if len(regular) < BURST_MIN:
        return None
    n = len(regular)
    return Anomaly("burst", severity(n, medium=9, high=12), "payments", (Quantity(n, 0),))


def _card_testing(txns: Sequence[Transaction]) -> Anomaly | None:
    small = [t for t in txns if _is_small_cnp(t)]
    if len(small) < CARD_TEST_MIN:
        return None
    merchant = Counter(t.merchant for t in small).most_common(1)[0][0]
    n = len(small)
    return Anomaly("card_testing", severity(n, medium=5, high=8), merchant, (Quantity(n, 0),))


def _geo_impossible(txns: Sequence[Transaction]) -> Anomaly | None:
    # Two card-present payments in different countries inside one window: nobody travels that fast.
    present = [t for t in txns if t.card_present]
    best: tuple[float, Transaction, Transaction] | None = None
    for a, b in itertools.pairwise(present):
        if a.country != b.country:
            km = distance_km(a.country, b.country)
            if best is None or km > best[0]:
                best = (km, a, b)
    if best is None:
        return None
    km, a, b = best
    minutes = Quantity((event_time_ms(b) - event_time_ms(a)) / MS_PER_MINUTE, 1, "min")
    return Anomaly(
        "geo_impossible",
        severity(km, medium=1000, high=5000),
        f"{a.country}>{b.country}",
        (minutes, Quantity(km, 0, "km")) if km else (minutes,),
    )


def distance_km(country_a: str, country_b: str) -> float:
    """Great-circle distance between two countries' capitals; 0 when either is unknown."""
    if country_a not in COUNTRY_COORDS or country_b not in COUNTRY_COORDS:
        return 0.0
    (lat1, lon1), (lat2, lon2) = (
        map(math.radians, COUNTRY_COORDS[c]) for c in (country_a, country_b)
    )
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * 6371.0 * math.asin(math.sqrt(h))


def window_stats(
    key: str, start_ms: int, end_ms: int, events: Sequence[IotReading | Transaction]
) -> WindowStats:
    """Dispatch on the window's event kind (a window holds one entity, hence one kind)."""
    if all(isinstance(e, IotReading) for e in events):
        return iot_stats(key, start_ms, end_ms, events)  # type: ignore[arg-type]
    if all(isinstance(e, Transaction) for e in events):
        return txn_stats(key, start_ms, end_ms, events)  # type: ignore[arg-type]
    raise ValueError(f"window {key}@{start_ms} mixes IoT readings and transactions")
