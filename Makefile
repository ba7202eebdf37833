# poolkeeper: every set-up step lives here, so a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CERTS ?= .certs
PYTEST_ARGS ?=

.PHONY: run test venv certs clean bench

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("poolkeeper needs Python >= 3.11, $(PYTHON) is " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

certs: $(STAMP)
	$(BIN)/poolkeeper certs --out $(CERTS) --service poolkeeper --namespace poolkeeper-system

# Serves https://127.0.0.1:8443 with the embedded namespace file: no cluster needed.
run: certs
	$(BIN)/poolkeeper serve --host 127.0.0.1 --port 8443 --cert-dir $(CERTS) \
		--namespaces testdata/namespaces.yaml

# pytest exits 5 when it collected nothing: that must fail, not pass silently. The coverage gate:
# every line and branch of the rule implementations (app/rules/) is executed by the tests.
test: $(STAMP)
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

bench: $(BENCH_STAMP)
	@bash bench/install-wrk.sh $(if $(filter python,$(BENCH_ARGS)),|| true)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(CERTS) .pytest_cache .hypothesis .coverage *.egg-info
