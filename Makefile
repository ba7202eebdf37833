# poolkeeper: every set-up step lives here, so a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CERTS ?= .certs
PORT ?= 8443
PYTEST_ARGS ?=

.PHONY: help run test lint venv certs clean bench kind-start kind-deploy integration logs kind-delete docker-e2e lock \
	uninstall export

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z0-9-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv: $(STAMP) ## create .venv and install poolkeeper with its test tools

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("poolkeeper needs Python >= 3.11, $(PYTHON) is " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	@test -x $(BIN)/python || { echo "make: creating $(VENV) (first run only)"; $(PYTHON) -m venv $(VENV); }
	@echo "make: installing poolkeeper and its test tools into $(VENV) (a minute or two the first time)"
	$(BIN)/python -m pip install --disable-pip-version-check -e '.[test]'
	touch $@

certs: $(STAMP) ## create a CA and a serving certificate in .certs/
	$(BIN)/poolkeeper certs --out $(CERTS) --service poolkeeper --namespace poolkeeper-system

# Serves https://127.0.0.1:$(PORT) with the embedded namespace file: no cluster needed.
run: certs ## serve https://127.0.0.1:8443 (PORT=N for another) with testdata/namespaces.yaml, no cluster
	@echo "make: serving https://127.0.0.1:$(PORT) (Ctrl-C stops it)"
	$(BIN)/poolkeeper serve --host 127.0.0.1 --port $(PORT) --cert-dir $(CERTS) \
		--namespaces testdata/namespaces.yaml

# ruff (rules in pyproject.toml), mypy on app/ and the import contracts (both in setup.cfg).
lint: $(STAMP) ## ruff, mypy --strict on app/, import contracts
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# deploy/overlays/in-tree/policies.yaml: the shipped rules as in-tree admission policies (README
# "In-tree policies"); what no policy can express is left out and listed (stderr and the file's
# header). tests/test_export.py fails when the file is not what this prints.
IN_TREE := deploy/overlays/in-tree/policies.yaml

export: $(STAMP) ## regenerate deploy/overlays/in-tree/policies.yaml from rules/
	$(BIN)/poolkeeper export --rules rules --skip-unsupported -o yaml > $(IN_TREE).new
	mv $(IN_TREE).new $(IN_TREE)

# pytest exits 5 when it collected nothing: that must fail, not pass silently. The coverage gate:
# every line and branch of the rule implementations (app/rules/) is executed by the tests.
test: lint ## lint, then every test and the coverage gate
	@$(BIN)/python -m pytest --cov=app --cov-branch --cov-report= $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; \
	echo "coverage gate: app/rules/ must be 100% (lines and branches)"; \
	$(BIN)/coverage report --include='app/rules/*' --fail-under=100

# Benchmark (bench/README.md): BENCH_QUICK=1 for about a minute, BENCH_ARGS for more options.
# The OPA bindings (extra `bench`) declare Python >= 3.14 but work on 3.11, hence the flag; wrk
# comes from Debian (bench/install-wrk.sh installs it when missing and root).
BENCH_STAMP := $(VENV)/.bench-stamp
BENCH_ARGS ?=

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --ignore-requires-python -e '.[bench]'
	touch $@

bench: $(BENCH_STAMP) ## the benchmarks (bench/README.md); BENCH_QUICK=1 for a short run
	@bash bench/install-wrk.sh $(if $(filter python,$(BENCH_ARGS)),|| true)
	$(BIN)/python -m bench $(BENCH_ARGS)

# Cluster (README "Deploying to a cluster"): kind with a pool1 and a pool2 worker, the image built
# and loaded (tagged by its content, so a rebuilt image rolls the pods), installed by
# integration/deploy.sh; `integration` runs integration/ against the current kubectl context.
# Both hand deploy.sh this venv's Python (PYTHON), wherever VENV puts it.
KIND ?= kind
KIND_CLUSTER ?= poolkeeper
KUBECTL ?= kubectl
DOCKER ?= docker
DEVCONTAINER_IMAGE ?= poolkeeper-devcontainer

kind-start: ## create the kind cluster (pool1 and pool2 workers)
	@$(KIND) get clusters 2>/dev/null | grep -qx '$(KIND_CLUSTER)' || \
		$(KIND) create cluster --name $(KIND_CLUSTER) --config integration/kind-config.yaml --wait 180s
	$(KUBECTL) config use-context kind-$(KIND_CLUSTER)

kind-deploy: $(STAMP) ## build the image, load it into kind, install with deploy.sh
	$(DOCKER) build -t poolkeeper:dev .
	@tag=poolkeeper:dev-$$($(DOCKER) image inspect -f '{{.Id}}' poolkeeper:dev | sed 's/^sha256://' | cut -c1-12); \
	$(DOCKER) tag poolkeeper:dev $$tag && \
	$(KIND) load docker-image $$tag --name $(KIND_CLUSTER) && \
	IMAGE=$$tag PYTHON=$(BIN)/python KUBECTL=$(KUBECTL) integration/deploy.sh deploy/overlays/kind

integration: $(STAMP) ## run integration/ against the current kubectl context
	PYTHON=$(BIN)/python $(BIN)/python -m pytest -p no:cacheprovider integration $(PYTEST_ARGS)

logs: ## the poolkeeper pods' logs
	$(KUBECTL) -n poolkeeper-system logs -l app.kubernetes.io/name=poolkeeper --prefix --tail=200

# Removes poolkeeper from the current kubectl context (README "Removing poolkeeper"): the policy
# backstop and the webhook configuration first, then, once the API server admits an unpinned pod
# in a pooled namespace, everything else. Safe to run twice. UNINSTALL_FROM: the kustomization it
# was installed from (e.g. deploy/overlays/no-admission-policy); only kubectl is needed.
UNINSTALL_FROM ?= deploy

uninstall: ## remove poolkeeper, admission objects first (UNINSTALL_FROM=deploy)
	KUBECTL=$(KUBECTL) integration/uninstall.sh $(UNINSTALL_FROM)

kind-delete: ## delete the kind cluster
	$(KIND) delete cluster --name $(KIND_CLUSTER)

# The whole flow inside the dev container (devcontainer/): the host's Docker builds and runs kind;
# the container shares the host network, where kind publishes its API server on 127.0.0.1. It
# runs as you (so files it writes in the checkout stay yours), with the socket's group.
docker-e2e: ## the whole kind flow inside the dev container
	$(DOCKER) build -t $(DEVCONTAINER_IMAGE) devcontainer
	$(DOCKER) run --rm --network host -v /var/run/docker.sock:/var/run/docker.sock \
		--user "$$(id -u):$$(id -g)" --group-add "$$(stat -c %g /var/run/docker.sock)" \
		-e HOME=/tmp/e2e-home -e VENV=/tmp/e2e-home/venv \
		-v "$(CURDIR)":"$(CURDIR)" -w "$(CURDIR)" $(DEVCONTAINER_IMAGE) \
		bash -c 'make kind-start kind-deploy integration; rc=$$?; make kind-delete; exit $$rc'

# requirements.lock: the image's exact dependency versions, resolved afresh from setup.cfg.
LOCK_VENV ?= /tmp/poolkeeper-lock-venv

lock: ## resolve requirements.lock afresh from setup.cfg
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --disable-pip-version-check .
	{ sed -n '/^#/p' requirements.lock; $(LOCK_VENV)/bin/pip freeze --exclude poolkeeper; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean: ## remove .venv, .certs and caches
	rm -rf $(VENV) $(CERTS) .pytest_cache .hypothesis .coverage *.egg-info
