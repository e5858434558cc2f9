# The two commands a newcomer runs (see README):  `make generate`  and  `make test`.
# Both create .venv on first use: the CPU build of torch 2.13.0 (pinned, so no CUDA build is ever pulled),
# then minidiff with its test extra (diffusers, transformers, pytest, hypothesis).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: generate report test bench clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# the main job: the built-in model (shipped in the package) draws a prompt, offline, in seconds
generate: $(VENV)/.installed
	$(VENV)/bin/minidiff generate --prompt "a red circle on a blue background" --output generated.png --overwrite

report: $(VENV)/.installed
	$(PY) -m parity

# every test, the slow ones included (CI runs this); `.venv/bin/python -m pytest` alone leaves out those marked slow
test: $(VENV)/.installed
	$(PY) -m pytest -m ""

bench: $(VENV)/.installed
	$(PY) -m benchmarks --quick

clean-venv:
	rm -rf $(VENV)
