# Set-up and checks. `make demo`: create .venv, install, run the main job on the embedded default.
# `make test`: (re)use .venv, install the test extras, run the whole test suite. CI runs `make test`.
# After each install, tools/venv_fixes.py checks that torchvision and robustbench import in a fresh interpreter and,
# only for the known failures of the pinned builds, installs a startup fix into the venv (see that file).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The constraints keep the CPU build of torch: an unpinned torchvision pulls a newer torch with CUDA packages.
PIP_INSTALL := $(PIP) install --quiet -c constraints.txt

.PHONY: demo test install install-test bench-corruptions

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml constraints.txt tools/venv_fixes.py
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[demo]'
	$(PY) tools/venv_fixes.py
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[test]'
	$(PY) tools/venv_fixes.py
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/tta demo

test: install-test
	$(PY) -m pytest -q

bench-corruptions: install
	$(PIP_INSTALL) -e '.[bench]'
	$(PY) benchmarks/corruption_speed.py
