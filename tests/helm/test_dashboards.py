"""What a person looks at, from one short real run (real broker, local Ray, onnxruntime):
`calm-stream report --html`'s page opened in a real headless chromium, offline, and the chart's
Grafana dashboard checked against a scrape of the pipeline's own metrics endpoint.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dashboard_queries import chart_dashboard, queries, series_of, unmet
from support import pipeline_settings, read_back, run_scraped, send, tiny_registry

from pipeline.kafka.local_broker import free_ports
from pipeline.sim.simulator import Mess
from pipeline.stream.job import JobOptions

BROWSER = Path("/usr/bin/chromium")
# Playwright's own flags plus these: nothing may reach out of a closed network or a CI box.
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MESS = Mess(late=0.02, reordered=0.03, duplicate=0.02, malformed=0.04)
# The charts a run with results, telemetry and dead letters shows (one per chart of the page).
CHARTS = {"throughput", "cost", "steps", "latency", "batches", "accuracy", "dead-letters"}
# Header figures the page must show, as paths into `calm-stream report`'s JSON.
HEADLINE = {
    "results.rows",
    "results.tokens_out",
    "telemetry.tokens_per_step",
    "telemetry.draws_per_step",
    "telemetry.dollars",
    "telemetry.dollars_per_1k_tokens",
    "telemetry.baseline_dollars_per_1k_tokens",
    "results.latency_seconds.p99",
    "results.faithfulness.fact_accuracy_mean",
    "results.faithfulness.rows_with_invented_facts",
    "dead_letters.rows",
}
# Paths of a chart's marks that enclose something: a lone point of a line (`M x,y`) or an empty
# bar (`M0,0Z`) has an empty box.
MARKS_JS = """() => Object.fromEntries([...document.querySelectorAll('.plotly-graph-div')].map(
    div => [div.id, [...div.querySelectorAll('.trace path')].filter(path => {
        const box = path.getBBox();
        return box.width > 0 || box.height > 0;
    }).length]))"""


@dataclass(frozen=True)
class ShortRun:
    root: Path  # the sink root
    scrape: str  # the metrics endpoint's text, once it showed what the dashboard reads


@pytest.fixture(scope="module")
def short_run(ray_local, kafka_broker, tmp_path_factory) -> ShortRun:
    base = tmp_path_factory.mktemp("short-run")
    settings = pipeline_settings(
        kafka_broker.bootstrap_servers,
        base,
        tiny_registry(tmp_path_factory),
        "views",
        metrics={"port": free_ports(1)[0]},
    )
    send(settings, "iot", 400, seed=5, entities=4, mess=MESS)
    send(settings, "transactions", 150, seed=6, entities=10, mess=MESS)
    dashboard = chart_dashboard()
    # Sources report their lag once a second: a run idle for 3 s at its end serves it for at
    # least two reports, however slowly the first run of a session starts.
    _, scrape = run_scraped(
        settings, JobOptions(until_idle_s=3.0), lambda text: not unmet(dashboard, text)
    )
    return ShortRun(Path(settings.sinks.root), scrape)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not BROWSER.is_file():
        pytest.fail(f"{BROWSER} is missing: run `make browser` (deploy/tools/install-browser.sh)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(BROWSER), headless=True, args=BROWSER_ARGS
        )
        yield launched
        launched.close()


@dataclass
class Opened:
    """A page as the browser shows it, and what went wrong on the way."""

    page: Any
    url: str
    errors: list[str] = field(default_factory=list)  # console errors and uncaught exceptions
    requests: list[str] = field(default_factory=list)  # anything asked for beyond the file

    def console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def request(self, request: Any) -> None:
        if request.url != self.url:
            self.requests.append(request.url)


def open_page(browser: Any, path: Path) -> Opened:
    context = browser.new_context(offline=True, viewport={"width": 1200, "height": 900})
    opened = Opened(context.new_page(), path.as_uri())
    opened.page.on("console", opened.console)
    opened.page.on("pageerror", lambda error: opened.errors.append(str(error)))
    opened.page.on("request", opened.request)
    opened.page.goto(opened.url, wait_until="load")
    # Plotly draws each chart into an SVG when its script runs; wait until every chart has one.
    opened.page.wait_for_function(
        "() => [...document.querySelectorAll('.plotly-graph-div')]"
        ".every(div => div.querySelector('svg.main-svg'))"
    )
    return opened


def cli(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, check=True
    ).stdout


def write_page(root: Path, target: Path) -> Path:
    """The page, written by the real CLI in its own process; it prints the path."""
    printed = cli("report", str(root), "--html", str(target)).strip()
    assert Path(printed) == target and target.is_file()
    return target


def at(report: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        report = report[part]
    return report


def shown(text: str) -> float | None:
    """A header cell's number as a person reads it: `$4.558e-05`, `1,632`, `73.01 %`, `28.94 s`."""
    text = text.strip()
    if text == "n/a":
        return None
    if text.endswith("%"):
        return float(text[:-1]) / 100
    return float(text.removeprefix("$").removesuffix(" s").replace(",", ""))


def test_the_page_of_a_real_run_draws_every_chart_offline_with_the_reports_numbers(
    short_run, browser, tmp_path
):
    page_path = write_page(short_run.root, tmp_path / "run.html")
    report = json.loads(cli("report", str(short_run.root)))
    assert report["results"]["rows"] and report["dead_letters"]["rows"]  # a run worth charting
    opened = open_page(browser, page_path)
    page = opened.page
    screenshot = tmp_path / "run.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 0
    print(f"screenshot: {screenshot}")

    assert opened.errors == []
    assert opened.requests == []  # self-contained: no CDN, no server

    marks = page.evaluate(MARKS_JS)
    assert set(marks) == {f"chart-{name}" for name in CHARTS}
    assert {chart: n for chart, n in marks.items() if n == 0} == {}, marks

    # The header's figures are the JSON report's, as stored and as a person reads them.
    cells = page.evaluate(
        "() => [...document.querySelectorAll('td[data-key]')]"
        ".map(td => [td.dataset.key, td.dataset.value, td.textContent])"
    )
    assert HEADLINE <= {key for key, _, _ in cells}
    for key, value, text in cells:
        expected = at(report, key)
        assert json.loads(value) == expected, key
        assert shown(text) == pytest.approx(expected, rel=1e-3), (key, text)
    header = page.inner_text("header")
    for model in report["results"]["by_model"]:
        assert model in header

    # The latest dead letters, newest first, against the dataset read back with pyarrow alone.
    dlq = read_back(short_run.root, "dlq")
    listed = page.evaluate(
        "() => [...document.querySelectorAll('#latest-dead-letters tbody tr')]"
        ".map(tr => [...tr.querySelectorAll('td')].map(td => td.textContent))"
    )
    assert len(listed) == min(20, dlq.num_rows)
    letters = {
        (f"{stamp:%Y-%m-%d %H:%M:%S}", reason, topic, str(partition), str(offset))
        for stamp, reason, topic, partition, offset in zip(
            *(dlq[c].to_pylist() for c in ("timestamp", "reason", "topic", "partition", "offset"))
        )
    }
    shown_letters = {tuple(row[:5]) for row in listed}
    assert shown_letters <= letters
    stamps = [row[0] for row in listed]
    assert stamps == sorted(stamps, reverse=True)
    assert all(letter[0] <= stamps[-1] for letter in letters - shown_letters)


def test_an_empty_sink_root_gives_a_page_that_says_so(browser, tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    opened = open_page(browser, write_page(root, tmp_path / "empty.html"))
    assert opened.errors == [] and opened.requests == []
    assert "holds no committed rows" in opened.page.inner_text(".message")
    assert opened.page.evaluate(MARKS_JS) == {}


def test_a_root_with_only_dead_letters_charts_them_and_says_so(short_run, browser, tmp_path):
    root = tmp_path / "letters-only"
    shutil.copytree(short_run.root / "dlq", root / "dlq")
    letters = read_back(root, "dlq").num_rows
    opened = open_page(browser, write_page(root, tmp_path / "letters.html"))
    page = opened.page
    assert opened.errors == [] and opened.requests == []
    assert f"holds only dead letters ({letters})" in page.inner_text(".message")
    marks = page.evaluate(MARKS_JS)
    assert list(marks) == ["chart-dead-letters"] and marks["chart-dead-letters"] > 0
    assert json.loads(page.get_attribute('td[data-key="dead_letters.rows"]', "data-value")) == (
        letters
    )


def test_the_grafana_dashboard_reads_only_what_a_running_pipeline_exports(short_run):
    dashboard = chart_dashboard()
    assert len(list(queries(dashboard))) >= 10
    assert unmet(dashboard, short_run.scrape) == []

    # ... and the check fails on a renamed series and on a label the series do not carry.
    def broken(old: str, new: str) -> list[str]:
        changed = copy.deepcopy(dashboard)
        for panel in changed["panels"]:
            for target in panel["targets"]:
                if "calm_dead_letters_total" in series_of(target["expr"]):
                    target["expr"] = target["expr"].replace(old, new)
        return unmet(changed, short_run.scrape)

    renamed = broken("calm_dead_letters_total", "calm_dead_letter_total")
    assert renamed and all("calm_dead_letter_total" in problem for problem in renamed), renamed
    relabelled = broken("by (reason)", "by (cause)")
    assert relabelled and all("'cause'" in problem for problem in relabelled), relabelled
