# Everyday commands. `make demo` and `make test` install first when needed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SAMPLE_PRODUCTS ?= 800
DEMO_DIR ?= data/demo

.PHONY: install demo test bench soak lint check-java clean-demo

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; Python 3.11 is required" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) scripts/grpc_stubs.py > /dev/null
	touch $(STAMP)

install: check-java $(STAMP)

check-java:
	@command -v java >/dev/null || { echo "error: java not found; TorchServe needs Java 17 (e.g. apt-get install openjdk-17-jre-headless)" >&2; exit 1; }

demo: install
	SAMPLE_PRODUCTS=$(SAMPLE_PRODUCTS) DEMO_DIR=$(DEMO_DIR) PY=$(PY) bash scripts/demo

test: install
	$(PY) -m pytest

bench: install
	$(PY) scripts/bench.py

soak: install
	$(PY) scripts/soak.py --minutes $(or $(SOAK_MINUTES),10)

lint: install
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf $(DEMO_DIR) artifacts model_store reports runs cache
