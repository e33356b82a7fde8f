# Two commands matter: `make demo` (the whole flow) and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test static lint protos model serve bench soak clean idp crds

# Quiet installs, with a line before each slow step so a minute of installing shows progress.
export PIP_DISABLE_PIP_VERSION_CHECK := 1
$(STAMP): pyproject.toml
	@echo "==> creating $(VENV)"
	@$(PYTHON) -m venv $(VENV)
	@echo "==> upgrading pip"
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "==> installing aigis with the [dev] extra into $(VENV) (a few minutes on a fresh machine)"
	@# setuptools' build warnings (e.g. "Editable installation") are UserWarnings meant for packagers.
	@PYTHONWARNINGS=ignore::UserWarning $(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)
	@echo "==> installed; run: . $(VENV)/bin/activate"

demo: $(STAMP)
	$(BIN)/aigis demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m aigis.tools.gen_protos --check
	$(MAKE) --no-print-directory static
	$(BIN)/python -m pytest

# The real external IdP the tests start (node's oidc-provider, pinned by tests/idp/package-lock.json).
# Without npm the tests that need it are skipped (outside CI).
IDP_STAMP := tests/idp/node_modules/.package-lock.json
$(IDP_STAMP): tests/idp/package.json tests/idp/package-lock.json
	npm ci --prefix tests/idp --no-audit --no-fund --loglevel=error

idp: $(IDP_STAMP)

# cert-manager's CRD schemas for the manifest test (tests/test_kubernetes_manifests.py).
CRDS_STAMP := tests/crds/node_modules/.package-lock.json
$(CRDS_STAMP): tests/crds/package.json tests/crds/package-lock.json
	npm ci --prefix tests/crds --no-audit --no-fund --loglevel=error

crds: $(CRDS_STAMP)

# Layer contracts (import-linter) and types (mypy) over the tree the wheel installs: neither tool
# can follow setuptools' editable-install finder, so both check what users get.
static: $(STAMP)
	rm -rf build/pkg && mkdir -p build
	$(BIN)/python -m pip install --quiet --no-deps --target build/pkg . 2>build/pkg.log || (cat build/pkg.log; exit 1)
	cd build/pkg && PYTHONPATH=. ../../$(BIN)/lint-imports ../../pyproject.toml
	cd build/pkg && PYTHONPATH=. ../../$(BIN)/mypy --config-file ../../pyproject.toml -p aigis

lint: $(STAMP)
	$(BIN)/ruff check .

# Regenerate the committed protobuf/gRPC code from protos/**/*.proto.
protos: $(STAMP)
	$(BIN)/python -m aigis.tools.gen_protos

# Retrain the bundled digits model (deterministic: same seed, same bytes).
model: $(STAMP)
	$(BIN)/python -m aigis.tools.train_digits

# The side-by-side benchmark (about 30 minutes); `--quick` runs in CI through tests/test_bench.py.
bench: $(STAMP)
	$(BIN)/aigis bench --cnn

# The fault tests (kill -9 during a denial flood, disk full, worker kill and crash loop, key rotation
# under load, never-reading clients) with the figures they print; bounded, a few minutes. CI runs them
# inside `make test` too.
soak: $(STAMP)
	$(BIN)/python -m pytest -m reliability -s -q

serve: $(STAMP)
	$(BIN)/aigis serve

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info build
