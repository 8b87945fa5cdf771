# Two commands do all setup: `make up` runs the local stack, `make test` runs the whole suite.
# `make test-containers` builds the images and tests the compose stack on a real engine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export REFIT_DATA_DIR ?= $(CURDIR)/.refit

.PHONY: install gen up down status demo test lint bench clean images test-containers

install: $(VENV)/.installed gen .venv-oip/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# Pinned first: these two come from the machine's wheel mirror; others would download GBs.
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[dev]'
	bash deploy/install-system-deps.sh
	touch $@

# The stock Open Inference Protocol clients the tests and the bench call refit with, in a venv of
# their own (tests/service/oip_client/requirements.txt says why).
.venv-oip/.installed: tests/service/oip_client/requirements.txt
	python3 -m venv .venv-oip
	.venv-oip/bin/pip install -q -r $<
	touch $@

gen: $(VENV)/.installed
	$(PY) proto/generate.py

up: install
	$(PY) -m local_stack.launcher up

down:
	$(PY) -m local_stack.launcher down

status:
	$(PY) -m local_stack.launcher status

demo: up
	$(PY) -m local_stack.demo

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

# The container images, built as this project's machines build them (no image registry: a local
# base image, pip's local mirrors; deploy/containers/local_build.py). Starts an engine if needed.
images: install
	bash deploy/containers/engine.sh start
	$(PY) -m deploy.containers.local_build

# The compose stack end to end on a real engine (tests/containers/), never part of `make test`.
# Installs and starts an engine when none runs, and stops the one it started.
test-containers: install
	bash deploy/containers/engine.sh start
	$(PY) -m pytest -m containers tests/containers -v -p no:cacheprovider; \
	  status=$$?; bash deploy/containers/engine.sh stop; exit $$status

# Long measurements, never part of `make test`; figures go to docs/benchmarks.md.
bench: install
	$(PY) bench/predict_latency.py
	$(PY) bench/frontdoor_cost.py
	$(PY) bench/frontdoor_cost.py --breakdown
	$(PY) bench/dataset_throughput.py
	$(PY) bench/retrain_timing.py
	$(PY) bench/epoch_data_cost.py
	$(PY) bench/train_step_formats.py
	$(PY) bench/finetune_fashion_mnist.py

clean:
	rm -rf build $(VENV) .venv-oip refit/v1 refit/trainer refit/torchserve_api refit/inference_api
