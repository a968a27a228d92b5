# multichannel-gateway — how people and CI drive the project (CONTRACT §7).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PLUGINS := $(wildcard plugins/*/pyproject.toml)
# the benchmarks (bench/bare_server.py is the baseline server ingest.py starts, not a benchmark;
# bench/compare.py needs two source trees: see bench/README.md)
BENCHES := bench/ingest.py bench/floors.py bench/outbound.py bench/firestore.py

.PHONY: install demo test test-fast bench lint clean

install: $(STAMP)
	@bash scripts/install-system.sh
	@if [ -f scripts/install-helm.sh ]; then bash scripts/install-helm.sh; fi

$(STAMP): pyproject.toml $(PLUGINS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' $(foreach p,$(PLUGINS),-e $(dir $(p)))
	@touch $(STAMP)

demo: install
	$(BIN)/gateway demo

test: install
	$(BIN)/ruff check gateway channels sinks tests bench scripts plugins
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

bench: install
	@for b in $(BENCHES); do echo "== $$b"; $(BIN)/python $$b || exit 1; done

lint: install
	$(BIN)/ruff check gateway channels sinks tests bench scripts plugins

clean:
	rm -rf $(VENV) .tools build *.egg-info
