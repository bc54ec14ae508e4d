# normlab — the two commands are `make demo` and `make test`; each builds .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
THREADS ?= 2

.PHONY: demo test test-all lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-cpu.txt
	$(PY) -m pip install --quiet -e ".[lab,dev,dist]"
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(PY) -m normlab demo

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) -m ruff format --check src tests benchmarks scripts

test: lint
	OMP_NUM_THREADS=$(THREADS) $(PY) -m pytest -q

test-all: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(PY) -m pytest -q -m ""

# the measurements are also stored in docs/bench/ (scripts/publish_results.py --regenerate puts them in README.md)
bench: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(PY) benchmarks/bench_layers.py --json docs/bench/layers.json
	OMP_NUM_THREADS=$(THREADS) $(PY) benchmarks/bench_layers.py --tuned-malloc --no-compile --json docs/bench/layers-tuned.json
	OMP_NUM_THREADS=$(THREADS) $(PY) benchmarks/bench_train.py --json docs/bench/train.json

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
