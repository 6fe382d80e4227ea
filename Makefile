# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Build inputs: the editable install rebuilds medvl._C when one of these changes.
CORE := pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null)
# The editable install maps every Python module to its file when it is made: a module added, moved or
# removed needs it made again. This file lists them, and changes only when the list does.
MODULES := build/python-modules.txt
$(shell mkdir -p build && find medvl kernels -name '*.py' | sort > $(MODULES).new && \
  (cmp -s $(MODULES).new $(MODULES) || mv $(MODULES).new $(MODULES)); rm -f $(MODULES).new)

# Every version the two commands install, written by `make lock`.
LOCK := requirements-lock.txt
# torch and torchvision are pinned on purpose (an unpinned torch pulls the newest CUDA build).
TORCH := torch==2.14.1 torchvision==0.29.1
# The editable build runs without pip's build isolation, with these tools from the lock:
# pyproject.toml's [build-system] requires, and the CMake and Ninja that scikit-build-core adds.
BUILD_TOOLS := scikit-build-core pybind11 cmake ninja

.PHONY: setup demo bench test bench-full lock test-latest gpu-wheels gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(CORE) $(LOCK) $(MODULES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c $(LOCK) $(TORCH) $(BUILD_TOOLS)
	$(PIP) install --quiet -c $(LOCK) --no-build-isolation -e ".[test]"
	$(PY) .ci/lock.py check $(LOCK)
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

# Re-resolve the lock to the newest versions pyproject.toml's ranges allow. Run it on purpose, then
# `make clean test` and commit the lock with what it changed.
lock:
	$(PYTHON) .ci/lock.py write $(LOCK) $(TORCH) -- $(BUILD_TOOLS)

# The suite against the newest allowed versions of everything but torch, in a venv of its own (not
# in CI): the next dependency release that breaks us shows up here before it reaches the lock.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet --upgrade $(TORCH) $(BUILD_TOOLS)
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager --no-build-isolation \
	  --config-settings=build-dir=build/latest -e ".[test]"
	$(LATEST)/bin/python .ci/lock.py diff $(LOCK)
	$(LATEST)/bin/python -m pytest tests -q --timeout=900

# A GPU check for contributors. On a development machine, `make gpu-wheels` downloads (as locked)
# what a bare GPU machine lacks, for its Python, into .whl/ (git ignores it); carry the working tree
# with .whl/ there and run `make gpu-check`: build for that GPU, every op test on it, the benchmarks,
# the refreshed backend order, all in under six minutes (bench/gpu_check.sh, logs in $$OUT or
# bench/results/gpu-check/).
GPU_PYTHON ?= 3.12
GPU_WHEELS := monai pydicom nibabel open_clip_torch pytorch-metric-learning ftfy wcwidth
# Peers measured on the GPU only (not dependencies, so not in the lock).
GPU_PEERS := siglip-kernel==0.1.2
gpu-wheels:
	rm -rf .whl && mkdir .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform any -d .whl \
	  $$($(PYTHON) .ci/lock.py pins $(LOCK) $(GPU_WHEELS)) $(GPU_PEERS)
	du -sh .whl

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build $(VENV) $(LATEST) .pytest_cache
