PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install data train test test-slow test-torchrec bench clean

install: $(STAMP)

$(STAMP): requirements/cpu.txt requirements/cpu-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/cpu.txt
	$(PY) -m pip install -q --no-deps -r requirements/cpu-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Small synthetic samples in the Criteo, Avazu and tabular formats (data/samples/; see the README's Data section)
data: install
	$(PY) -m torchrec_shark.data.samples --out data/samples

# torchrun sets OMP_NUM_THREADS=1 for its workers anyway (and says so): set here, it stays quiet
train: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/torchrun --standalone --nproc_per_node=$${NPROC:-1} train.py $(ARGS)

test: install
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# The README's examples that start many jobs of their own (pipeline, pruning loop, dense-transform benchmark)
test-slow: install
	$(PY) -m pytest -q tests -m slow $(PYTEST_ARGS)

# TorchRec's sharding harness over every compressed kind x sharding type (2 gloo ranks; slow)
test-torchrec: install
	$(PY) -m pytest -q tests/torchrec_compat -m torchrec_full $(PYTEST_ARGS)

bench: install
	$(PY) -m torchrec_shark.bench.tables $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
