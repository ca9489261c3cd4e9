# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtualenv in $(VENV) and install medray into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a machine with torch already in $(VENV) keeps its own build.
TORCH_VERSION ?= 2.13.0
# On images that ship torch system-wide (e.g. rayproject/ray GPU images), use
# VENV_FLAGS=--system-site-packages so the venv sees and keeps that torch.
VENV_FLAGS ?=
# deepspeed JIT-builds ops on first use; keep them between runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/medray/torch_extensions

.PHONY: install browser demo test test-gpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	# Pin whatever torch is installed, so no dependency can swap in a multi-GB CUDA build.
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -e '.[dev]' -c $(VENV)/torch-constraint.txt
	touch $@

demo: install
	$(VENV)/bin/medray demo

# The web page's test drives Debian's Chromium (Playwright cannot download a browser here).
# Installed when missing and apt-get can run; otherwise that one test skips, unless
# MEDRAY_CI=1 (CI) makes it fail.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq >/dev/null 2>&1; apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "note: no chromium; the web page test will skip (apt-get install chromium)"

test: install browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache
