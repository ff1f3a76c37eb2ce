# qwen_magic: `make demo` chats with the model, `make test` runs every check, `make test-fast` the
# unit tier (minutes, no demo model needed).
# Both start from a fresh clone: they make a virtual environment in .venv and install into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# Without a GPU, torch 2.13.0 (a CPU build where one is at hand); with one, the newest CUDA build.
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

# bench-gpu's Python: the .venv's where there is one, else the machine's python3 (a GPU image).
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)

.PHONY: install demo-model demo lab serve test test-fast lint format bench bench-gpu gpu-wheels browser-deps llama-cpp clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[demo,test,lab]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo-model: install  ## assemble, verify and convert the offline demo model (once)
	$(BIN)/python -m qwen_magic prepare-demo

demo: demo-model  ## run the quickstart notebook headless and show the chat
	$(BIN)/python -m qwen_magic run-notebook notebooks/01_quickstart.ipynb

lab: demo-model  ## open the quickstart in JupyterLab
	$(BIN)/jupyter lab notebooks/01_quickstart.ipynb

# The demo model behind an OpenAI-compatible server, for `%qwen_load --server` (Ctrl-C stops it).
PORT ?= 8000
serve: demo-model  ## serve the demo model with `transformers serve` on 127.0.0.1:$(PORT), CPU
	@DIR="$$($(BIN)/python -c 'from qwen_magic.backends.kernel.demo_model import ensure_demo_model; print(ensure_demo_model(progress=lambda m: None))')"; \
	echo "Serving $$DIR on http://127.0.0.1:$(PORT); in a notebook:"; \
	echo "    %qwen_load --server http://127.0.0.1:$(PORT)"; \
	HF_HUB_OFFLINE=1 exec $(BIN)/transformers serve "$$DIR" --device cpu --host 127.0.0.1 --port $(PORT)

browser-deps:  ## Debian's chromium for the browser test (playwright's own download cannot work offline)
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "chromium could not be installed: the browser test will be skipped"; \
	  else echo "No /usr/bin/chromium (install Debian's chromium): the browser test will be skipped"; fi; \
	fi

lint: install  ## ruff, mypy over qwen_magic/, and the layers' import contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The tiers are pytest markers (pyproject.toml): the unit tier is every test without one.
UNIT_TIER := not kernel and not server and not browser and not demo and not slow
PYTEST := $(BIN)/python -m pytest -q --durations=15

test-fast: install lint  ## the unit tier: the tiny model and scripted replies only
	$(PYTEST) -m "$(UNIT_TIER)" tests

test: install browser-deps demo-model lint  ## every tier: unit, then real kernels, servers, demo model, browser; then notebooks (nbval)
	$(PYTEST) -m "$(UNIT_TIER)" tests
	$(PYTEST) -m "not ($(UNIT_TIER))" tests
	$(PYTEST) --nbval-lax notebooks

bench: demo-model  ## speed and memory, written to BENCHMARKS.md
	$(BIN)/python benchmarks/run.py

# llama.cpp for BENCHMARKS.md's side by side (never a test dependency): llama-cpp-python built from
# its sdist (about 5 minutes). On a CPU that reports AMX a native build dies with an illegal
# instruction at the first token (its AMX buffer type), so there the instruction sets are named.
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CPP_FLAGS_AMX := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
  -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON \
  -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
LLAMA_CPP_FLAGS = $(if $(shell grep -m1 -ow amx_tile /proc/cpuinfo 2>/dev/null),$(LLAMA_CPP_FLAGS_AMX),-DGGML_NATIVE=ON)
llama-cpp: install  ## build and install llama-cpp-python into .venv for `benchmarks/run.py --only llamacpp`
	CMAKE_ARGS="$(LLAMA_CPP_FLAGS)" $(BIN)/python -m pip install -q --no-binary llama-cpp-python \
	  --no-cache-dir "llama-cpp-python==$(LLAMA_CPP_VERSION)"

# No install step: a GPU machine may have no network. Where build/gpu-wheels holds wheels (from
# `make gpu-wheels`, run where pip can download), they are installed into build/gpu-site first.
bench-gpu:  ## GPU decode speed on Qwen2-7B's shapes (CUDA only), into BENCHMARKS.md's GPU section
	@if ls build/gpu-wheels/*.whl >/dev/null 2>&1; then \
	  echo "installing build/gpu-wheels into build/gpu-site"; \
	  $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade \
	    --target build/gpu-site build/gpu-wheels/*.whl; \
	fi
	PYTHONPATH=build/gpu-site$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 \
	  $(GPU_PYTHON) benchmarks/gpu.py

gpu-wheels: install  ## the transformers wheel the tests use, for a GPU machine that cannot download
	rm -rf build/gpu-wheels
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: -d build/gpu-wheels \
	  "transformers==$$($(BIN)/python -c 'import transformers; print(transformers.__version__)')"

clean:
	rm -rf $(VENV) build test-artifacts .pytest_cache .ruff_cache
