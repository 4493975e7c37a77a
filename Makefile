# qlorax — `make help` lists the targets. Overrides go through ARGS:
#   make train ARGS="model=stories260k data=english_quotes train.max_steps=50"
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
QLORAX := $(VENV)/bin/qlorax
# torch comes from the CPU build: 2.13.0 installs here without pulling CUDA. Elsewhere the
# CPU index keeps it that way (TORCH_INDEX=https://download.pytorch.org/whl/cpu make install).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
ARGS ?=
ASSETS ?= $(abspath ../shared/assets)
export QLORAX_ASSETS ?= $(ASSETS)

.PHONY: help install demo test test-fast train run merge verify plan runs bench bench-quick install-bigdl test-bigdl docker-build docker-test clean

help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed ## create .venv with CPU torch and qlorax (editable, with test extras)

# The built-in tiny model is pre-trained on counting text only (qlorax/engine/tiny.py); the demo
# fine-tune teaches it to write a number in words: adapters on every linear layer, rank 16, 400 steps
# of 16 examples (~18 epochs of the 360 training rows) at learning rate 1e-2 (5e-3 needs 600 steps
# to answer as well in both bf16 and fp32). Verify asks ten held-out prompts: three were too few to tell a
# run that learns (29-32 of the 40 held-out rows exact across seeds) from one that does not.
DEMO_ARGS ?= lora=all_linear lora.r=16 train.learning_rate=1e-2 train.max_steps=400 train.batch_size=16 train.micro_batch_size=16 verify.num_prompts=10

demo: install ## train -> merge -> verify the built-in tiny model on the sample data (no network)
	$(QLORAX) run run_dir=outputs/demo $(DEMO_ARGS) $(ARGS)
	@echo "demo finished: see outputs/demo/report.md"

test: install ## run the whole test suite (unit + integration)
	$(PY) -m pytest -q $(ARGS)

test-fast: install ## unit tests only (no end-to-end training)
	$(PY) -m pytest -q -m "not integration" $(ARGS)

train: install ## qlorax train $(ARGS)
	$(QLORAX) train $(ARGS)

run: install ## qlorax run $(ARGS)  (train -> merge -> verify)
	$(QLORAX) run $(ARGS)

merge: install ## qlorax merge run_dir=... $(ARGS)
	$(QLORAX) merge $(ARGS)

verify: install ## qlorax verify run_dir=... $(ARGS)
	$(QLORAX) verify $(ARGS)

plan: install ## qlorax plan $(ARGS): resolved spec, launch plan, memory estimate
	$(QLORAX) plan $(ARGS)

runs: install ## list run directories under outputs/
	$(QLORAX) runs $(ARGS)

bench: install ## training throughput / memory benchmark (benchmarks/bench.py $(ARGS))
	$(PY) benchmarks/bench.py $(ARGS)

bench-quick: install ## the benchmark's --quick mode (under 3 minutes)
	$(PY) benchmarks/bench.py --quick $(ARGS)

BIGDL_VENV := .venv-bigdl

# ipex-llm without its [all] extra (that one pins torch 2.1.2), plus the py-cpuinfo its CPU
# kernels import; constraints/bigdl.txt pins the old transformers / peft line it needs.
$(BIGDL_VENV)/.installed: pyproject.toml constraints/bigdl.txt
	python3 -m venv $(BIGDL_VENV)
	$(BIGDL_VENV)/bin/python -m pip install -q --upgrade pip
	$(BIGDL_VENV)/bin/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIGDL_VENV)/bin/python -m pip install -q -c constraints/bigdl.txt -e ".[test]" ipex-llm py-cpuinfo
	touch $@

install-bigdl: $(BIGDL_VENV)/.installed ## separate .venv-bigdl with ipex-llm and its old transformers/peft pins

test-bigdl: install-bigdl ## the bigdl backend's tests, in .venv-bigdl
	$(BIGDL_VENV)/bin/python -m pytest -q tests/test_bigdl.py $(ARGS)

docker-build: ## build the standalone and k8s images (needs a Docker engine)
	docker build -f docker/Dockerfile -t qlorax:latest .
	docker build -f docker/Dockerfile.k8s -t qlorax-k8s:latest .

# Without a Docker engine: buildah (chroot isolation, vfs storage) on a Debian base made by mmdebstrap, with
# torch from a local CPU wheel folder where pip has one (PIP_FIND_LINKS), else from the CPU wheel index.
TORCH_WHEELS ?= $(firstword $(PIP_FIND_LINKS))
DOCKER_BUILD_OPTS ?= --local-base $(if $(TORCH_WHEELS),--wheels $(TORCH_WHEELS))

docker-test: install ## build both images without a daemon (buildah + mmdebstrap, root) and run qlorax in them
	@command -v buildah >/dev/null && command -v mmdebstrap >/dev/null || { apt-get update -q && apt-get install -y -q buildah mmdebstrap; }
	QLORAX_DOCKER_TEST=1 QLORAX_DOCKER_BUILD="$(DOCKER_BUILD_OPTS)" $(PY) -m pytest -q -m docker tests/test_docker_image.py $(ARGS)

clean: ## remove outputs and caches (not the venvs)
	rm -rf outputs multirun .pytest_cache
