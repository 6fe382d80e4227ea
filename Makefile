# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Build inputs: the editable install rebuilds medvl._C when one of these changes.
CORE := pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: setup demo bench test bench-full clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(CORE) constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c constraints.txt "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install --quiet -c constraints.txt -e ".[test]"
	$(PY) -m medvl info
	touch $@

# The main job on its embedded default: train the tiny CLIP model on the CT phantoms, then evaluate it
# (runs/demo: checkpoint, metrics.jsonl, loss.png, eval/results.json, eval/report.md, PNGs).
demo: setup
	$(PY) -m medvl demo --out runs/demo

# Every fused op against its baselines, as a table.
bench: setup
	$(PY) -m medvl bench

# The full test suite (CPU; GPU tests run where a GPU is visible).
test: setup
	$(PY) -m pytest tests -q --timeout=900

# The issue-sized benchmarks (pytest-benchmark); results land in bench/results/.
bench-full: setup
	$(PY) -m pytest bench -q --benchmark-only --benchmark-json=bench/results/pytest-benchmark-$$(hostname).json

clean:
	rm -rf build $(VENV) .pytest_cache
