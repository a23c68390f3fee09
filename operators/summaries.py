"""The reference summarizer: what an analyst would write about a window, by rule.

It states every fact of `operators.facts.reference_facts` and nothing else (no other numbers,
no severity words outside anomaly sentences), so it is both the training target and the
yardstick of fact accuracy. Phrasing varies between several templates per sentence, chosen by a
hash of the window key, so the model learns the language rather than one template, and the same
window always gets the same summary.
"""

import hashlib
import random

from operators.stats import Anomaly, IotStats, MetricStats, Quantity, TxnStats, WindowStats


def summarize(stats: WindowStats) -> str:
    rng = random.Random(hashlib.sha256(f"{stats.entity}|{stats.start_ms}".encode()).digest())
    if isinstance(stats, IotStats):
        opening = _pick(rng, IOT_OPENINGS).format(
            entity=stats.entity, site=stats.site, n=stats.count
        )
        style = rng.randrange(len(METRIC_SENTENCES))
        body = [_metric_sentence(m, style) for m in stats.metrics]
    else:
        opening = _txn_opening(stats, rng)
        body = [_pick(rng, TOTALS).format(totals=_join([_money(q) for q in stats.totals]))]
    alerts = [_anomaly_sentence(a, rng) for a in stats.anomalies] or [_pick(rng, NO_ANOMALY)]
    sentences = [opening] + (alerts + body if rng.random() < 0.5 else body + alerts)
    return " ".join(sentences)


def _pick(rng: random.Random, options: tuple[str, ...]) -> str:
    return options[rng.randrange(len(options))]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _unit(q: Quantity) -> str:
    return f"{q.text} {q.unit}".rstrip()


def _money(q: Quantity) -> str:
    return f"{q.text} {q.unit}"


IOT_OPENINGS = (
    "{entity} at {site} sent {n} readings.",
    "{n} readings came in from {entity} ({site}).",
    "Device {entity} on site {site} reported {n} times.",
    "Over this window {entity} at {site} logged {n} readings.",
)
METRIC_SENTENCES = (
    "{Name} averaged {mean}, between {min} and {max}.",
    "{Name} stayed around {mean} (range {min} to {max}).",
    "Mean {name} was {mean}, from {min} up to {max}.",
    "{Name}: mean {mean}, minimum {min}, peak {max}.",
)


def _metric_sentence(m: MetricStats, style: int) -> str:
    return METRIC_SENTENCES[style].format(
        name=m.name, Name=m.name.capitalize(), mean=_unit(m.mean), min=m.min.text, max=_unit(m.max)
    )


def _txn_opening(s: TxnStats, rng: random.Random) -> str:
    payments = "payment" if s.count == 1 else "payments"
    where = _join(list(s.countries))
    top = s.categories[0][0].replace("_", " ")
    return _pick(
        rng,
        (
            f"{s.entity} made {s.count} {payments} in {where}, mostly {top}.",
            f"Account {s.entity} had {s.count} card {payments} ({top} first) in {where}.",
            f"{s.count} card {payments} for {s.entity} in {where}, led by {top}.",
        ),
    )


TOTALS = ("They total {totals}.", "Spending came to {totals}.", "Total spend: {totals}.")
NO_ANOMALY = ("No anomalies.", "Nothing unusual was detected.", "All normal, no anomalies.")

# Each template names the anomaly with a phrase from operators.facts.ANOMALY_PATTERNS.
ANOMALY_SENTENCES: dict[str, tuple[str, ...]] = {
    "spike": (
        "A {sev}-severity spike hit {subject}, reaching {n0}.",
        "{Subject} spiked to {n0} ({sev} severity).",
        "Alert ({sev}): sudden jump in {subject} to {n0}.",
    ),
    "stuck": (
        "The {subject} sensor was stuck at {n0} for {n1} ({sev} severity).",
        "{Subject} flatlined at {n0} for {n1}, a {sev}-severity fault.",
        "Stuck sensor, {sev} severity: {subject} read {n0} for {n1}.",
    ),
    "dropout": (
        "The device went silent for {n0}, a {sev}-severity dropout.",
        "A dropout of {n0} was detected ({sev} severity).",
        "Data gap: no readings for {n0}, severity {sev}.",
    ),
    "drift": (
        "{Subject} is drifting at {n0} ({sev} severity).",
        "A {sev}-severity drift in {subject}: {n0}.",
        "{Subject} drifted by {n0}, severity {sev}.",
    ),
    "burst": (
        "A {sev}-severity burst of {n0} payments hit the account.",
        "Burst alert ({sev}): {n0} regular payments in quick succession.",
        "{n0} payments arrived in a burst, severity {sev}.",
    ),
    "card_testing": (
        "Possible card testing at {subject}: {n0} tiny online charges ({sev} severity).",
        "{n0} small card-not-present charges at {subject} look like card testing, severity {sev}.",
        "A {sev}-severity card-testing pattern: {n0} micro-payments at {subject}.",
    ),
    "geo_impossible": (
        "Impossible travel ({sev} severity): the card was used in {a} and {b} within {n0}{dist}.",
        "A {sev}-severity geo-impossible pair: {a} then {b} only {n0} later{dist}.",
        "The card was present in {a} and {b} within {n0}{dist}: impossible travel, severity {sev}.",
    ),
}


def _anomaly_sentence(a: Anomaly, rng: random.Random) -> str:
    numbers = {f"n{i}": _unit(q) for i, q in enumerate(a.numbers)}
    if a.type in ("burst", "card_testing"):
        numbers["n0"] = a.numbers[0].text  # a count: "7 payments", not "7 "
    extra = {}
    if a.type == "geo_impossible":
        country_a, _, country_b = a.subject.partition(">")
        dist = f" ({numbers.pop('n1')} apart)" if "n1" in numbers else ""  # unknown country: no km
        extra = {"a": country_a, "b": country_b, "dist": dist}
    template = _pick(rng, ANOMALY_SENTENCES[a.type])
    return template.format(
        sev=a.severity, subject=a.subject, Subject=a.subject.capitalize(), **numbers, **extra
    )
