# The two quick-start commands: `make demo` (main job) and `make test` (every test).
# Both work on a fresh machine: they install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Debian packages the demo and the tests need: python3-venv (Debian ships `python3 -m venv`'s
# ensurepip apart from Python), prometheus (promtool and the server the demo starts), chromium
# (UI tests, driven by Playwright: no browser download is possible here), wrk (HTTP load for bench/).
APT_PACKAGES := python3-venv prometheus chromium wrk
# The suite on two pytest-xdist workers: the long tests mostly wait on servers and time
# windows, so two run side by side in little more than the time of one. `loadgroup` hands the
# tests out a few at a time as a worker frees up; `load` sent the slow ones ahead in one
# block to one worker, which ran on while the other sat idle. The tests marked `alone`
# compare latencies, so they run afterwards in a run of their own: beside the other worker's
# tests (and its servers) a p99 moved by 4%.
PARALLEL := -n 2 --dist loadgroup

.PHONY: demo test install system-deps lint docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet --editable '.[test]'

system-deps:
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null && command -v promtool >/dev/null && command -v chromium >/dev/null && command -v wrk >/dev/null || { apt-get update && apt-get install -y $(APT_PACKAGES); }

# system-deps before install: the venv needs python3-venv.
demo: system-deps install
	$(BIN)/chatobs demo $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

docs: install
	$(BIN)/chatobs docs

# `make test PYTEST_ARGS=...` runs what those arguments select, in one process.
test: system-deps install lint
ifdef PYTEST_ARGS
	$(BIN)/pytest $(PYTEST_ARGS)
else
	$(BIN)/pytest $(PARALLEL) -m "not alone"
	$(BIN)/pytest -m alone -rP  # -rP: its figures (the p99 ratios) in the log, passed or not
endif
