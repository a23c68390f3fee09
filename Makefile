# calm-stream: every target sets up what it needs (venv, packages, Kafka jars) on its own.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-unit test-integration venv kafka-jars go-tools browser lint clean

## demo: the embedded default: a local Kafka broker, a local Ray, simulated IoT and payment
## streams and the shipped model bundle; prints results, throughput, cost and where the files are
demo: $(STAMP) kafka-jars
	$(VENV)/bin/calm-stream demo

## test: run every test (unit and integration) against a real Kafka broker and a real local Ray
test: $(STAMP) kafka-jars go-tools browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP) go-tools browser
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

test-integration: $(STAMP) kafka-jars browser
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

venv: $(STAMP)

# uv installs from its cache by hard links: torch's CUDA wheels cost seconds after the first time.
$(STAMP): pyproject.toml
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --user uv
	@PATH="$$HOME/.local/bin:$$PATH"; \
	  [ -x $(PY) ] || uv venv --quiet --python $(PYTHON) $(VENV); \
	  uv pip install --quiet --python $(PY) -e '.[train,dev]'
	@touch $(STAMP)

## kafka-jars: fetch Apache Kafka's broker jars from Maven Central into the user cache (once)
kafka-jars: $(STAMP)
	$(VENV)/bin/calm-stream kafka fetch

## go-tools: build helm and kubeconform from their Go modules into the user cache (once)
go-tools:
	bash deploy/tools/install-go-tools.sh

## browser: Debian's chromium for the report-page tests (apt-get, once; Playwright drives it)
browser:
	bash deploy/tools/install-browser.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check model operators pipeline deploy tests

clean:
	rm -rf $(VENV) .pytest_cache calm-stream-data
