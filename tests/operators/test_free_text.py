"""Free text in the world's scripts: merchants' and sites' names are Unicode, NFC-normalised,
trimmed and bounded (64 characters, 128 UTF-8 bytes), control characters refused with their own
dead-letter reason; identifiers stay restricted. Prompts, reference summaries, the byte-level
tokenizer and the fact scorer carry the names unchanged. Fast unit tests, then the real source on
a real broker and Ray."""

import json
import unicodedata
from datetime import UTC, datetime

import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import KafkaProducer
from support import (
    create_topics,
    event_with,
    payment_payload,
    pipeline_settings,
    read_back,
    reading_payload,
)

from deploy import SHIPPED_REGISTRY
from model.tokenizer import Tokenizer
from operators.decode import DecodeError, Reason, decode
from operators.events import FREE_TEXT_BYTES, FREE_TEXT_CHARS, Transaction, from_millis
from operators.facts import reference_facts, score
from operators.prompts import render_prompt
from operators.stats import txn_stats
from operators.summaries import summarize
from pipeline.kafka.clients import kafka_client_options
from pipeline.sim.simulator import simulate
from pipeline.stream.job import JobOptions, run_pipeline

NAMES = [
    "Café Zürich – Bäckerei",
    "東京ラーメン",
    "Bäckerei ２４ Köln",  # fullwidth digits are part of the name, not a number
    "مخبز ٢٤",  # Arabic-Indic digits likewise
    "Crème brûlée & Co.",
    "Pâtisserie\u00a0Étoile",  # a no-break space is text
    "Ölkännchen 🍵",
]


def encode(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def test_names_in_any_script_are_accepted_and_nfc_normalised() -> None:
    for name in NAMES:
        decomposed = unicodedata.normalize("NFD", name)
        txn = decode(encode(payment_payload(merchant=f"  {decomposed} ")))
        iot = decode(encode(reading_payload(site=decomposed)))
        want = unicodedata.normalize("NFC", name)
        assert (txn.merchant, iot.site) == (want, want), (txn, iot)


@pytest.mark.parametrize(
    ("name", "reason", "detail"),
    [
        ("ab\x07", Reason.CONTROL_CHARACTER, "U+0007 at character 2"),
        ("line\nbreak", Reason.CONTROL_CHARACTER, "U+000A at character 4"),
        ("C1 \x85", Reason.CONTROL_CHARACTER, "U+0085"),
        ("para\u2029graph", Reason.CONTROL_CHARACTER, "U+2029"),
        ("evil\u202eredro", Reason.CONTROL_CHARACTER, "U+202E"),  # a bidi override
        (
            "x" * (FREE_TEXT_CHARS + 1),
            Reason.INVALID_VALUE,
            f"at most {FREE_TEXT_CHARS} characters",
        ),
        ("東" * 43, Reason.INVALID_VALUE, f"at most {FREE_TEXT_BYTES} bytes"),  # 129 bytes
        ("  ", Reason.INVALID_VALUE, "blank"),
    ],
)
def test_control_characters_and_overlong_names_are_refused(name, reason, detail) -> None:
    for obj, field in (
        (payment_payload(merchant=name), "merchant"),
        (reading_payload(site=name), "site"),
    ):
        error = decode(encode(obj))
        assert isinstance(error, DecodeError), error
        assert (error.reason, error.field) == (reason, field)
        assert detail in error.message and name not in error.message


def test_identifiers_stay_restricted() -> None:
    for obj, field in (
        (reading_payload(device_id="gerät-1"), "device_id"),
        (payment_payload(txn_id="tx 1"), "txn_id"),
    ):
        error = decode(encode(obj))
        assert (error.reason, error.field) == (Reason.INVALID_VALUE, field)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_any_text_is_a_normalised_name_or_a_reason(text: str) -> None:
    result = decode(encode(payment_payload(merchant=text)))
    if isinstance(result, DecodeError):
        assert result.field == "merchant" or result.reason is Reason.MALFORMED_JSON  # surrogates
        return
    name = result.merchant
    assert name == unicodedata.normalize("NFC", text).strip()
    assert not any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in name)
    assert 0 < len(name) <= FREE_TEXT_CHARS and len(name.encode()) <= FREE_TEXT_BYTES


def card_testing_window(merchant: str):
    """Four small online charges at `merchant`: a card-testing anomaly whose subject is the name."""
    base = datetime(2025, 1, 6, tzinfo=UTC)
    txns = [
        Transaction.model_validate(
            payment_payload(
                txn_id=f"tx-{i}",
                merchant=merchant,
                amount="0.99",
                card_present=False,
                channel="ecom",
                ts=from_millis(int(base.timestamp() * 1000) + i * 30_000),
            ),
            strict=False,
        )
        for i in range(4)
    ]
    return txn_stats("acct-00001", 0, 300_000, txns)


def test_prompts_summaries_tokens_and_facts_carry_the_names() -> None:
    tokenizer = Tokenizer.load(next(SHIPPED_REGISTRY.glob("*/tokenizer.json")))
    for name in NAMES:
        stats = card_testing_window(name)
        assert [a.type for a in stats.anomalies] == ["card_testing"]
        prompt, summary = render_prompt(stats), summarize(stats)
        assert name in prompt and name in summary
        assert tokenizer.decode(tokenizer.encode(prompt)) == prompt
        assert score(summary, reference_facts(stats)).accuracy == 1.0, summary


def test_unicode_names_through_the_real_source_and_broker(ray_local, kafka_broker, tmp_path):
    """Readings from sites named in several scripts (some decomposed, some padded) become windows
    whose prompts hold the NFC names; a name with a control character is a dead letter
    `control_character`, an overlong one `invalid_value`, and nothing else is lost."""
    settings_ = pipeline_settings(kafka_broker.bootstrap_servers, tmp_path, None, "unicode")
    create_topics(settings_)
    messages = list(simulate("iot", seed=11, entities=len(NAMES)).messages(blocks=1))
    devices = sorted({m.event.device_id for m in messages})
    sites = dict(zip(devices, NAMES))  # device -> the NFC name its readings carry
    records = [  # decomposed or padded on the wire
        event_with(m.event, "site", unicodedata.normalize("NFD", name) if i % 2 else f" {name} ")
        for i, m in enumerate(messages)
        for name in [sites[m.event.device_id]]
    ]
    bad = [
        event_with(messages[0].event, "site", "Café\x00Zürich"),
        event_with(messages[1].event, "site", "Ω" * 65),
    ]
    producer = KafkaProducer(**kafka_client_options(settings_.kafka))
    for value in records[:10] + bad + records[10:]:
        producer.send(settings_.kafka.topics.iot, value=value).get(timeout=30)
    producer.close()

    run_pipeline(settings_, JobOptions(passthrough=True, until_idle_s=1.0))

    root = tmp_path / "sink"
    results, dlq = read_back(root, "results"), read_back(root, "dlq")
    assert pc.sum(results.column("events")).as_py() == len(records)
    assert sorted(dlq.column("reason").to_pylist()) == ["control_character", "invalid_value"]
    assert sorted(dlq.column("offset").to_pylist()) == [10, 11]
    for row in results.to_pylist():
        header = row["prompt"].splitlines()[0]
        assert header.startswith(f"iot {row['entity']} {sites[row['entity']]} n="), header
