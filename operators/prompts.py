"""Render a window's statistics as the compact text the model reads.

The model is small, so the prompt is terse and regular: one header line, one line per metric
(or the totals, categories and countries of an account), one line per anomaly the detectors
raised, then `summary:`, after which the model writes. The numbers are already rounded the way
a summary states them, so the model copies them instead of doing arithmetic.
"""

from operators.stats import Anomaly, IotStats, TxnStats, WindowStats

PROMPT_END = "summary:"


def render_prompt(stats: WindowStats) -> str:
    lines = _iot_lines(stats) if isinstance(stats, IotStats) else _txn_lines(stats)
    lines += [_anomaly_line(a) for a in stats.anomalies] or ["anomaly none"]
    return "\n".join(lines + [PROMPT_END])


def _iot_lines(s: IotStats) -> list[str]:
    lines = [f"iot {s.entity} {s.site} n={s.count}"]
    lines += [
        f"{m.name} {m.unit} mean {m.mean.text} min {m.min.text} max {m.max.text} trend {m.trend.text}/h"
        + (" unit unknown" if m.unknown_unit else "")  # no thresholds in this unit: not judged
        for m in s.metrics
    ]
    if s.not_ok:
        lines.append("status " + " ".join(f"{status}={n}" for status, n in s.not_ok))
    return lines


def _txn_lines(s: TxnStats) -> list[str]:
    return [
        f"txn {s.entity} n={s.count}",
        "total " + ", ".join(f"{q.text} {q.unit}" for q in s.totals),
        f"max {s.largest.text} {s.largest.unit}",
        "categories " + ", ".join(f"{name} {n}" for name, n in s.categories),
        "countries " + " ".join(s.countries),
    ]


def _anomaly_line(a: Anomaly) -> str:
    numbers = " ".join(f"{q.text} {q.unit}".rstrip() for q in a.numbers)
    return f"anomaly {a.type} {a.subject} {numbers} {a.severity}"
