# Everyday commands. `make demo` and `make test` install first when needed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KSERVE_VENV := .venv-kserve
KSERVE_STAMP := $(KSERVE_VENV)/.installed
ENGINE_VENV := .venv-engine
ENGINE_STAMP := $(ENGINE_VENV)/.installed
SAMPLE_PRODUCTS ?= 800
DEMO_DIR ?= data/demo
NPROC ?= 2
MODEL ?= image
ENGINE ?= torchserve

.PHONY: help install kserve-venv engine-venv nginx serve stop bench-engines bench-real bench-runtimes prometheus demo test bench soak lint check-java clean-demo clean-all train-ddp sample-data train-real review chromium postgresql \
	budget hostile-mix

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; Python 3.11 is required" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m marketplace_classifier.cli grpc-stubs > /dev/null
	touch $(STAMP)

install: check-java $(STAMP) ## create .venv with the pinned dependencies and the project (editable, dev extras)

# KServe's model server (deploy/kserve/wrapper) in its own environment: its pins clash with ours.
$(KSERVE_STAMP): deploy/kserve/wrapper/requirements.txt
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(KSERVE_VENV)/bin/python -m pip install --quiet -r deploy/kserve/wrapper/requirements.txt
	touch $(KSERVE_STAMP)

kserve-venv: $(KSERVE_STAMP) ## KServe's model server in .venv-kserve (the KServe schema tests)

# The second engine (marketplace_classifier/engines/kserve_ray/: KServe's model server with Ray Serve batching) over the serving core.
$(ENGINE_STAMP): marketplace_classifier/engines/kserve_ray/requirements.txt marketplace_classifier/serving/requirements.txt
	$(PYTHON) -m venv $(ENGINE_VENV)
	$(ENGINE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(ENGINE_VENV)/bin/python -m pip install --quiet -r marketplace_classifier/engines/kserve_ray/requirements.txt -r marketplace_classifier/serving/requirements.txt
	touch $(ENGINE_STAMP)

engine-venv: $(ENGINE_STAMP) ## the second engine (KServe + Ray Serve, Ray Data) in .venv-engine

# nginx for the reverse proxy (marketplace_classifier/ops/proxy.py) and its tests, from Debian's packages where this
# runs as root; elsewhere tests/test_proxy.py is skipped and says why.
nginx: ## Debian's nginx-light for the reverse proxy (when root)
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; } || \
		echo "warning: nginx is not installed (apt-get install nginx-light); the proxy tests will be skipped" >&2

# Prometheus and promtool for the alert-rule and real-Prometheus tests, from Debian's packages where
# this runs as root; elsewhere those tests are skipped and say why.
prometheus: ## Debian's prometheus and promtool for the alert rules (when root)
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		prometheus >/dev/null; } || \
		echo "warning: prometheus is not installed (apt-get install prometheus); its tests will be skipped" >&2

# Debian's chromium for the review page's browser test (Playwright drives it; no browser download)
# and Debian's PostgreSQL for the review queue's tests, where this runs as root; elsewhere those
# tests are skipped and say why.
chromium: ## Debian's chromium for the review page's browser test (when root)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "warning: chromium is not installed (apt-get install chromium); the browser test will be skipped" >&2

postgresql: ## Debian's PostgreSQL server for the review queue's tests (when root)
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
		echo "warning: PostgreSQL is not installed (apt-get install postgresql); its tests will be skipped" >&2

check-java:
	@command -v java >/dev/null || { echo "error: java not found; TorchServe needs Java 17 (e.g. apt-get install openjdk-17-jre-headless)" >&2; exit 1; }

review: install ## the review page on the demo's data (after make demo), 127.0.0.1:8090, sign-in printed
	PY=$(PY) DEMO_DIR=$(DEMO_DIR) bash scripts/review

demo: install ## the whole job on generated sample data, end to end
	SAMPLE_PRODUCTS=$(SAMPLE_PRODUCTS) DEMO_DIR=$(DEMO_DIR) PY=$(PY) bash scripts/demo

test: install kserve-venv engine-venv nginx prometheus chromium postgresql ## the test suite (installs what it needs)
	$(PY) -m pytest

# Data-parallel training with torchrun on this machine's sample data (gloo on CPU, nccl on GPUs).
# More machines: run the same torchrun on each with --nnodes N --node-rank R --rdzv-endpoint HOST:PORT.
train-ddp: install sample-data ## data-parallel training with torchrun on the sample data
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) -m marketplace_classifier.training train --model $(MODEL) \
		--data-dir $(DEMO_DIR)/clean --image-backbone efficientnet_lite0 --epochs $(or $(EPOCHS),10) \
		--checkpoint-dir checkpoints/ddp --runs-dir runs/ddp

sample-data: install ## generate and clean the sample data
	@[ -f $(DEMO_DIR)/clean/splits.csv ] || { \
		$(PY) -m marketplace_classifier.cli sample --out $(DEMO_DIR)/raw --products $(SAMPLE_PRODUCTS) --overwrite && \
		$(PY) -m marketplace_classifier.cli clean --data-dir $(DEMO_DIR)/raw --out $(DEMO_DIR)/clean && \
		$(PY) -m marketplace_classifier.cli split --data-dir $(DEMO_DIR)/clean --seed 0; }

# The real run on a raw marketplace export (default ../shared/data/marketplace), outputs under */real/.
train-real: install ## the real run on a marketplace export (RAW_DIR=..., default ../shared/data/marketplace)
	PY=$(PY) bash scripts/train_real $(RAW_DIR)

# One switch for the engine: make serve ENGINE=torchserve|kserve_ray (and make stop ENGINE=...).
serve: install ## start the engine with the exported models (ENGINE=torchserve|kserve_ray)
	$(PY) -m marketplace_classifier.cli serve start --engine $(ENGINE)

stop: install ## stop the engine (ENGINE=...)
	$(PY) -m marketplace_classifier.cli serve stop --engine $(ENGINE)

# Both engines in one run on the same inputs (docs/engines.md).
bench-engines: install engine-venv ## the same load on both engines
	$(PY) -m marketplace_classifier.benchmarks.engines_bench --artifacts-dir $(or $(ARTIFACTS),artifacts)

# make bench: TorchServe's full benchmark, then every model under TorchScript against the runtime its
# export chose (make bench ARTIFACTS=artifacts/real CHECKPOINTS=checkpoints/real DATA=data/real: the
# real models, with test accuracy); make bench ENGINE=kserve_ray: the same served load (items/s,
# p99, cold start, RSS) on the second engine alone.
bench: install ## model, served and naive throughput (after make demo)
	@if [ "$(ENGINE)" = torchserve ]; then \
	  $(PY) -m marketplace_classifier.benchmarks.bench --artifacts-dir $(or $(ARTIFACTS),artifacts) \
	    $(if $(CHECKPOINTS),--checkpoint-dir $(CHECKPOINTS)) && $(MAKE) bench-runtimes; else \
	  $(MAKE) engine-venv && $(PY) -m marketplace_classifier.benchmarks.engines_bench --engines $(ENGINE) \
	    --artifacts-dir $(or $(ARTIFACTS),artifacts) --out reports/bench-$(ENGINE); fi

# The real models (after make train-real): the reports docs/benchmark.md and docs/results.md copy,
# then those docs refreshed from them.
bench-real: install ## the real models' benchmark, published into docs/
	$(PY) -m marketplace_classifier.benchmarks.bench --artifacts-dir artifacts/real \
	  --checkpoint-dir checkpoints/real --out reports/benchmark-real
	$(MAKE) bench-runtimes ARTIFACTS=artifacts/real DATA=data/real RUNTIMES_OUT=reports/runtimes-real
	$(PY) -m marketplace_classifier.ops.publish --keep-missing

# Old runtime against new, served side by side, with the server's CPU time per item (docs/benchmark.md).
bench-runtimes: install ## the CPU runtimes compared on the exported models
	$(PY) -m marketplace_classifier.benchmarks.runtimes_bench --artifacts-dir $(or $(ARTIFACTS),artifacts) \
	  $(if $(DATA),--data-dir $(DATA)) --out $(or $(RUNTIMES_OUT),reports/runtimes)

soak: install ## all three models under load for 10 minutes (after make bench)
	$(PY) -m marketplace_classifier.benchmarks.soak --minutes $(or $(SOAK_MINUTES),10)

# The work budget measured: the largest admitted requests, one core, alone and four to a batch.
budget: install ## the largest requests the work budget admits, on one core
	$(PY) -m marketplace_classifier.benchmarks.budget_bench --artifacts-dir $(or $(ARTIFACTS),artifacts)

# The outside test's mixed run: 16 ordinary clients and every hostile request among them.
hostile-mix: install ## ordinary clients with hostile requests among them
	$(PY) -m marketplace_classifier.benchmarks.hostile_mix --artifacts-dir $(or $(ARTIFACTS),artifacts) --minutes $(or $(MINUTES),3)

lint: install ## ruff
	$(VENV)/bin/ruff check .

# What `make demo` wrote, and nothing else: the real models (*/real/), other reports and the feature
# cache (40 minutes of the real run) stay.
DEMO_MODELS := image text combined
clean-demo: ## remove the demo's outputs only
	rm -rf $(DEMO_DIR) reports/summary.md reports/demo_scores.csv \
	  $(foreach m,$(DEMO_MODELS),checkpoints/$(m) artifacts/$(m) artifacts/$(m)_int8 model_store/$(m).mar reports/$(m) runs/$(m))

# Everything built or measured here, the real models and the feature cache included.
clean-all: ## remove every built output, the real models and the feature cache too
	@echo "removing data/, checkpoints/, artifacts/, model_store/, reports/, runs/ and cache/ (real models and features included)"
	rm -rf data checkpoints artifacts model_store reports runs cache

help: ## this list
	@awk -F ':.*## ' '/^[a-z][a-z-]*:.*## / { printf "  %-16s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)
