# Two commands do all the set-up on a fresh machine:
#   make run    the embedded single-node cluster (in-process bus, SQLite, simulated agent) on :8080
#   make test   the static checks (ruff, mypy), then the whole suite; RabbitMQ/PostgreSQL tests run
#               when the servers are reachable and are skipped loudly when not (CI makes them required);
#               the compose tests start a Docker engine (.ci/docker-up) and skip loudly when none can run
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run lint test test-fast test-compose bench fault-full clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	rm -f $(VENV)/.installed-*
	touch $@

run: $(STAMP)
	$(BIN)/zstack-mn start

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration and not cluster and not compose" $(PYTEST_ARGS)

test-compose: $(STAMP)
	$(BIN)/python -m pytest -m compose tests/test_compose.py tests/test_compose_ha.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(SCENARIOS)

fault-full: $(STAMP)
	$(BIN)/python -m pytest -m slow --run-slow tests/test_faults.py tests/test_api_schemathesis.py --fault-report benchmarks/results/faults-latest.json $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
