"""Fact accuracy: does a summary state the window's facts, and only those?

A window's facts are: its entity, each anomaly type (or "none"), each anomaly's severity, and the
key numbers (reading counts, means and ranges, totals, the anomalies' magnitudes), each written
at the rounding summaries use. A summary's facts are extracted with exact patterns, not fuzzy
matching: entity ids (`dev-0012`), anomaly phrases from a fixed vocabulary, severity words
paired with the nearest anomaly phrase in the same sentence, and every number as written.

Score = |stated ∩ expected| / |stated ∪ expected| over multisets: 1.0 exactly when the summary
states every fact and nothing else; a changed number or entity costs a miss and a false fact.
"""

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from operators.stats import IotStats, Quantity, WindowStats

ANOMALY_PATTERNS: dict[str, re.Pattern[str]] = {
    name: re.compile(pattern, re.IGNORECASE)
    for name, pattern in {
        "spike": r"\bspik(?:e|es|ed|ing)\b|\bsudden jump\b",
        "stuck": r"\bstuck\b|\bflatlined\b",
        "dropout": r"\bdropout\b|\bwent silent\b|\bdata gap\b",
        "drift": r"\bdrift(?:s|ed|ing)?\b",
        "burst": r"\bburst\b",
        "card_testing": r"\bcard[- ]testing\b",
        "geo_impossible": r"\bimpossible travel\b|\bgeo-impossible\b",
    }.items()
}
NO_ANOMALY = re.compile(r"\bno anomal(?:y|ies)\b|\bnothing unusual\b|\ball normal\b", re.IGNORECASE)
SEVERITY = re.compile(r"\b(low|medium|high)\b", re.IGNORECASE)
# Digits are ASCII digits: names in other scripts (a merchant's, a site's) may hold other
# digits (fullwidth, Arabic-Indic), which are part of the name, not numbers a summary states.
ENTITY = re.compile(r"\b[a-z]+-[0-9]+\b")
NUMBER = re.compile(r"(?<![\w.])[-+]?[0-9]+(?:\.[0-9]+)?")
SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")


def key_numbers(stats: WindowStats) -> list[Quantity]:
    """The numbers a summary of this window must state, besides the anomalies' own."""
    numbers = [Quantity(stats.count, 0)]
    if isinstance(stats, IotStats):
        for m in stats.metrics:
            numbers += [m.mean, m.min, m.max]
    else:
        numbers += list(stats.totals)
    return numbers


def reference_facts(stats: WindowStats) -> Counter[str]:
    """The facts of a window, as the multiset a perfect summary states."""
    facts: Counter[str] = Counter({f"entity:{stats.entity}": 1})
    numbers = key_numbers(stats) + [q for a in stats.anomalies for q in a.numbers]
    facts.update(f"number:{q.text}" for q in numbers)
    if not stats.anomalies:
        facts["anomaly:none"] = 1
    for a in stats.anomalies:
        facts[f"anomaly:{a.type}"] = 1
        facts[f"severity:{a.type}:{a.severity}"] = 1
    return facts


def extract_facts(text: str) -> Counter[str]:
    """The facts a summary states (entities and anomaly mentions count once, numbers each time)."""
    facts: Counter[str] = Counter()
    for entity in set(ENTITY.findall(text)):
        facts[f"entity:{entity}"] = 1
    for sentence in SENTENCE_END.split(ENTITY.sub(" ", text)):
        mentions = [
            (m.start(), name) for name, p in ANOMALY_PATTERNS.items() for m in p.finditer(sentence)
        ]
        for name in {name for _, name in mentions}:
            facts[f"anomaly:{name}"] = 1
        for word in SEVERITY.finditer(sentence):
            if mentions:
                _, nearest = min(mentions, key=lambda m: abs(m[0] - word.start()))
                facts[f"severity:{nearest}:{word.group(1).lower()}"] = 1
        if NO_ANOMALY.search(sentence):
            facts["anomaly:none"] = 1
        facts.update(f"number:{n}" for n in NUMBER.findall(sentence))
    return facts


@dataclass(frozen=True)
class FactScore:
    matched: int
    expected: int
    stated: int

    @property
    def accuracy(self) -> float:
        union = self.expected + self.stated - self.matched
        return self.matched / union if union else 1.0

    @property
    def recall(self) -> float:
        return self.matched / self.expected if self.expected else 1.0

    @property
    def precision(self) -> float:
        return self.matched / self.stated if self.stated else 1.0


def score(summary: str, expected: Counter[str] | Iterable[str]) -> FactScore:
    """Compare the facts stated in `summary` with the expected facts (a multiset or a list)."""
    expected = expected if isinstance(expected, Counter) else Counter(expected)
    stated = extract_facts(summary)
    return FactScore(
        matched=sum((stated & expected).values()),
        expected=sum(expected.values()),
        stated=sum(stated.values()),
    )


def facts_list(facts: Counter[str]) -> list[str]:
    """A multiset as a sorted list with repeats (how the corpus stores it)."""
    return sorted(facts.elements())
