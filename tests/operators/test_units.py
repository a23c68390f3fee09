"""Anomaly rules keyed by (metric, unit): a reading in °F, K, W, MW or GW is judged by the same
physical thresholds as one in the simulator's °C and kW; a unit that does not convert is marked
unknown and not judged."""

import numpy as np
import pytest

from operators.events import IotReading, Metric, from_millis
from operators.prompts import render_prompt
from operators.stats import METRIC_RULES, UNIT_FAMILIES, iot_stats

WINDOW_MS = 900_000  # 15 minutes of readings every 10 s
T_MS = np.arange(0, WINDOW_MS, 10_000)
# (offset, scale) from the rule's unit: value_in_unit = offset + scale * value_in_rule_unit
CONVERSIONS = {
    "temperature": {"°C": (0, 1), "K": (273.15, 1), "°F": (32, 1.8), "degF": (32, 1.8)},
    "power": {"kW": (0, 1), "W": (0, 1e3), "MW": (0, 1e-3), "GW": (0, 1e-6)},
    "pressure": {"hPa": (0, 1), "Pa": (0, 100), "kPa": (0, 0.1), "bar": (0, 1e-3)},
    "vibration": {"mm/s": (0, 1), "m/s": (0, 1e-3), "in/s": (0, 1 / 25.4)},
}


def readings(name: str, unit: str, values: np.ndarray) -> list[IotReading]:
    return [
        IotReading(
            device_id="dev-0001",
            site="lab",
            seq=i,
            ts=from_millis(int(t)),
            metrics=(Metric(name=name, value=float(v), unit=unit),),
            firmware="1.0",
            status="ok",
        )
        for i, (t, v) in enumerate(zip(T_MS, values))
    ]


def anomalies(name: str, unit: str, physical: np.ndarray) -> list[tuple[str, str]]:
    """(type, severity) of the anomalies of a series given in the rule's unit, sent in `unit`."""
    offset, scale = CONVERSIONS[name][unit]
    stats = iot_stats("dev-0001", 0, WINDOW_MS, readings(name, unit, offset + scale * physical))
    return [(a.type, a.severity) for a in stats.anomalies]


def series(rng: np.random.Generator, name: str, trend_per_hour: float, level: float) -> np.ndarray:
    rule = METRIC_RULES[name]
    noise = rng.normal(0, rule.noise_floor, T_MS.size)
    return level + trend_per_hour * T_MS / 3_600_000 + noise


def test_the_conversions_agree_with_the_unit_table() -> None:
    for name, units in CONVERSIONS.items():
        family, base = UNIT_FAMILIES[METRIC_RULES[name].unit]
        for unit, (_, scale) in units.items():
            assert UNIT_FAMILIES[unit][0] == family
            assert UNIT_FAMILIES[unit][1] * scale == pytest.approx(base)


def test_noise_and_slow_trends_in_other_units_are_not_drift() -> None:
    """Power in W at the simulator's noise, and a temperature trend below the °C threshold sent
    in °F or GW-scale power: none of them is a drift (all were, judged by the kW and °C rules)."""
    rng = np.random.default_rng(6)
    for _ in range(50):
        assert anomalies("power", "W", series(rng, "power", 0.0, 20.0)) == []
        slow = series(rng, "temperature", 0.7 * METRIC_RULES["temperature"].drift_per_hour, 20)
        assert anomalies("temperature", "°F", slow) == []
        assert anomalies("temperature", "°C", slow) == []


def test_a_real_drift_is_found_in_any_unit_of_its_family() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        fast = series(rng, "power", 3 * METRIC_RULES["power"].drift_per_hour, 900.0)
        for unit in ("kW", "GW", "MW", "W"):
            assert [t for t, _ in anomalies("power", unit, fast)] == ["drift"], unit


def test_detections_do_not_depend_on_the_unit() -> None:
    """Random physical series (trends from none to 4x the drift threshold, a spike in some):
    the same anomalies and severities in every unit the series is sent in."""
    rng = np.random.default_rng(8)
    for _ in range(300):
        name = str(rng.choice(list(CONVERSIONS)))
        rule = METRIC_RULES[name]
        physical = series(rng, name, rng.uniform(-4, 4) * rule.drift_per_hour, 50.0)
        if rng.random() < 0.3:
            physical[int(rng.integers(T_MS.size))] += rng.uniform(5, 200) * rule.noise_floor
        found = {unit: anomalies(name, unit, physical) for unit in CONVERSIONS[name]}
        assert len({tuple(f) for f in found.values()}) == 1, (name, found)


def test_a_unit_that_does_not_convert_is_marked_and_not_judged() -> None:
    ramp = 20 + 100 * T_MS / 3_600_000  # 100 per hour: a drift in any known temperature unit
    ramp[40] += 50  # and a spike
    for unit in ("degR", "kW"):  # unknown spelling; a unit of another family
        stats = iot_stats("dev-0001", 0, WINDOW_MS, readings("temperature", unit, ramp))
        assert stats.anomalies == () and stats.metrics[0].unknown_unit
        assert "temperature " + unit + " mean" in render_prompt(stats)
        assert render_prompt(stats).splitlines()[1].endswith(" unit unknown")
    judged = iot_stats("dev-0001", 0, WINDOW_MS, readings("temperature", "K", ramp))
    assert {a.type for a in judged.anomalies} == {"drift", "spike"}
    assert not judged.metrics[0].unknown_unit and "unknown" not in render_prompt(judged)


def test_a_device_that_switches_units_gets_one_series_per_unit() -> None:
    """Half the window in °C, half in °F: two calm series, not one with a jump of 40 degrees."""
    rng = np.random.default_rng(9)
    celsius = series(rng, "temperature", 0.0, 21.0)
    mixed = readings("temperature", "°C", celsius)
    half = len(mixed) // 2
    mixed[half:] = readings("temperature", "°F", 32 + 1.8 * celsius)[half:]
    stats = iot_stats("dev-0001", 0, WINDOW_MS, mixed)
    assert stats.anomalies == ()
    assert [(m.unit, m.count) for m in stats.metrics] == [("°C", half), ("°F", len(mixed) - half)]
