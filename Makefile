# Two commands for a fresh machine:  `make serve` (run the service)  and  `make test` (run the tests).
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# A CPU build of torch: the wheel on disk when there is one, otherwise PyTorch's CPU index.
TORCH_SRC := $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)

.PHONY: serve test install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0 $(TORCH_SRC)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

serve: $(STAMP)
	$(VENV)/bin/ncservice serve

# One torch thread per process: the tests run API, worker and pytest processes side by side, and
# oversubscribed torch threads make them slower, not faster. Override with OMP_NUM_THREADS=N make test.
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest
