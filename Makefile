# The two quick-start commands: `make demo` (main job) and `make test` (every test).
# Both work on a fresh machine: they install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Debian packages the tests need: prometheus (promtool and the server), chromium (UI tests,
# driven by Playwright: no browser download is possible here), wrk (HTTP load for bench/).
APT_PACKAGES := prometheus chromium wrk

.PHONY: demo test install system-deps lint docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet --editable '.[test]'

system-deps:
	@command -v promtool >/dev/null && command -v chromium >/dev/null && command -v wrk >/dev/null || { apt-get update && apt-get install -y $(APT_PACKAGES); }

demo: install
	$(BIN)/chatobs demo $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

docs: install
	$(BIN)/chatobs docs

test: system-deps install lint
	$(BIN)/pytest $(PYTEST_ARGS)
