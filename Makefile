# Everything a fresh machine needs: `make serve` and `make test` install into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

.PHONY: install proto serve test lint proto-lint node-deps bench soak demo clean

install: $(VENV)/.installed service/gen/__init__.py

# torch goes first and pinned: 2.13.0 is the local CPU wheel, anything looser pulls CUDA wheels.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

service/gen/__init__.py: proto/llmserve/v1/chat.proto proto/generate.py $(VENV)/.installed
	$(BIN)/python proto/generate.py

proto: $(VENV)/.installed
	$(BIN)/python proto/generate.py

demo: engines/demo/manifest.json

engines/demo/manifest.json: | install
	$(BIN)/python build_engine.py --demo

serve: install demo
	$(BIN)/llmserve serve

proto-lint: install
	cd proto && buf lint ../build/proto/llmserve.binpb --path llmserve/v1/chat.proto --config buf.yaml
	bash proto/breaking.sh

lint: install proto-lint
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

node-deps: tests/node/node_modules/.installed

tests/node/node_modules/.installed: tests/node/package.json
	cd tests/node && npm install --no-audit --no-fund --silent
	touch $@

test: install demo lint node-deps
	$(BIN)/pytest -q -ra

bench: install demo
	$(BIN)/python -m bench.record

soak: install demo
	$(BIN)/python -m bench.soak --minutes $${SOAK_MINUTES:-10}

clean:
	rm -rf $(VENV) build service/gen engines/demo
