# The two commands of the quick start (`make run`, `make test`) and the UIs.
# Each target bootstraps .venv when it is missing or pyproject.toml changed.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export DAGSTER_HOME := $(CURDIR)/.dagster
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := 1

.PHONY: install run ablation test lint ui bench browser mlflow-server s3-server

install: $(STAMP) $(DAGSTER_HOME)/dagster.yaml

# torch goes first and pinned, so nothing later pulls a different multi-GB build.
# Dagster's asset-selection parser needs the antlr4 4.13 runtime; dvc's optional hydra
# integration (unused here) pins 4.9, so pip cannot resolve both in one go: set it last.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps antlr4-python3-runtime==4.13.2
	touch $@

# The instance settings (run monitoring, the accelerator pool): see dagster.yaml.
$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

# `dalle3 run` calls `dagster asset materialize` for the whole graph, one run per shard
# partition where an asset is partitioned.
run: install
	$(BIN)/dalle3 run --summary

# The paper's caption ablations (Figures 4 and 5) on what `make run` made: every variant x seed
# of ablation_model, then the report, copied into docs/results.md.
ablation: install
	$(BIN)/dalle3 run --select 'ablation_model,ablation_report'
	$(BIN)/dalle3 results

test: install browser
	$(BIN)/pytest

# The UI test (tests/test_ui.py) drives Debian's headless Chromium through its chromedriver.
browser:
	@test -x /usr/bin/chromedriver || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	  else \
	    echo "tests/test_ui.py needs /usr/bin/chromedriver: install the Debian packages" \
	      "chromium and chromium-driver (as root: apt-get install chromium chromium-driver)" >&2; \
	    exit 1; \
	  fi; \
	}

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/bench_data.py

ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--host 127.0.0.1 --port 5000 & \
	$(BIN)/dagster dev -m dalle3_dag.definitions --host 127.0.0.1 --port 3000; \
	kill %1

# A tracking server for a team (README "Production"): runs in SQLite (or PostgreSQL:
# MLFLOW_BACKEND_STORE_URI=postgresql://user@host/db, with psycopg2 installed), artifacts on
# S3, whose endpoint and credentials the server reads from MLFLOW_S3_ENDPOINT_URL and AWS_*.
# The pipeline uses it with MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT).
MLFLOW_PORT ?= 5001
MLFLOW_BACKEND_STORE_URI ?= sqlite:///$(CURDIR)/mlflow-server.db
MLFLOW_ARTIFACTS ?= s3://mlflow/artifacts
mlflow-server: install
	$(BIN)/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1 \
		--backend-store-uri $(MLFLOW_BACKEND_STORE_URI) --artifacts-destination $(MLFLOW_ARTIFACTS)

# An S3-compatible server on 127.0.0.1:9000 to try the S3 paths on (moto; MinIO works the same).
s3-server: install
	$(BIN)/moto_server -H 127.0.0.1 -p 9000
