"""What the chart's Grafana dashboard asks Prometheus for, parsed with promql-parser: which series
each query reads and which labels it needs them to have, and which of those a scrape of the
pipeline's own endpoint lacks.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import promql_parser
from helm_render import CHART
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = CHART / "dashboards" / "calm-stream.json"
# Labels Prometheus attaches to every series it scrapes through the chart's ServiceMonitor (the
# Prometheus Operator's target labels): the pipeline never exports them itself.
TARGET_LABELS = frozenset(
    {"namespace", "service", "pod", "container", "endpoint", "job", "instance"}
)
# Grafana replaces its interval variables with a duration before it sends a query: so do we, or
# the expression is not PromQL. (Other variables, like $namespace, sit inside label values.)
INTERVAL_VARIABLE = re.compile(r"\$(?:__rate_interval|__interval|__range)\b|\$\{__[a-z_]+\}")
# A Grafana template query `label_values(<series selector>, <label>)`: Grafana's syntax around a
# PromQL selector, which is parsed as PromQL.
LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*(?P<label>[A-Za-z_]\w*)\s*\)\s*$")


@dataclass(frozen=True)
class Query:
    where: str  # the panel's title and target, or the template variable
    expr: str


@dataclass(frozen=True)
class Needs:
    """One of `series` must exist, and together they must carry each of `labels`."""

    series: frozenset[str]
    labels: frozenset[str]


def queries(dashboard: dict[str, Any]) -> Iterator[Query]:
    """Every PromQL expression of the dashboard: the panels' targets (rows' panels included) and
    the template variables' queries."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield Query(
                    f"panel {panel.get('title')!r} {target.get('refId', '')}", target["expr"]
                )
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        if variable.get("type") == "query" and text:
            yield Query(f"variable ${variable['name']}", text)


def needs(expr: str) -> list[Needs]:
    """What the expression needs of the series it selects."""
    found = LABEL_VALUES.match(expr)
    if found:
        return [
            *needs(found["selector"]),
            Needs(_series(promql_parser.parse(found["selector"])), frozenset({found["label"]})),
        ]
    tree = promql_parser.parse(INTERVAL_VARIABLE.sub("5m", expr))
    out: list[Needs] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name for m in node.matchers.matchers if m.name != "__name__"}
            out.append(Needs(_series(node), frozenset(labels)))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            out.append(Needs(_series(node.expr), frozenset(node.modifier.labels)))
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            matching = node.modifier.matching
            labels = set(matching.labels if matching else ()) | set(
                node.modifier.group_labels or ()
            )
            if labels:
                out.append(Needs(_series(node.lhs) | _series(node.rhs), frozenset(labels)))

    promql_parser.walk(tree, visit)
    return out


def series_of(expr: str) -> set[str]:
    """The series names the expression reads."""
    return set().union(*(n.series for n in needs(expr)))


def _series(node: Any) -> frozenset[str]:
    names: set[str] = set()

    def visit(inner: Any) -> None:
        if isinstance(inner, promql_parser.VectorSelector):
            named = [m.value for m in inner.matchers.matchers if m.name == "__name__"]
            names.update([inner.name] if inner.name else named)

    promql_parser.walk(node, visit)
    return frozenset(names)


def exported(scrape: str) -> dict[str, set[str]]:
    """Series name -> the label names its samples carry, from Prometheus text exposition."""
    labels: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            labels[sample.name] |= set(sample.labels)
    return dict(labels)


def unmet(dashboard: dict[str, Any], scrape: str) -> list[str]:
    """Each series or label a dashboard query needs that the scrape does not have."""
    have = exported(scrape)
    problems = []
    for query in queries(dashboard):
        for need in needs(query.expr):
            missing = sorted(need.series - set(have))
            if missing:
                problems.append(f"{query.where}: no series {', '.join(missing)} in the scrape")
                continue
            carried = set(TARGET_LABELS).union(*(have[name] for name in need.series))
            for label in sorted(need.labels - carried):
                problems.append(f"{query.where}: {sorted(need.series)} carry no label {label!r}")
    return list(dict.fromkeys(problems))  # a query may need the same thing twice


def chart_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())
