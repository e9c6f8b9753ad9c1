# Two commands on a fresh machine: `make demo` and `make test` (Python 3.11 and make are all they need).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
JOBS ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.slicreg-installed

.PHONY: demo test setup clean-runs bench bench-docs

setup: $(STAMP)

# torch first and pinned: an open-ended torch requirement would pull a multi-GB CUDA build.
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python run_pipeline.py --jobs $(JOBS)

# the linter first (ruff, pinned in setup.cfg's test extra, configured in pyproject.toml), then the tests
test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q

# stage costs, scaling and the README's performance section (minutes on 2 cores); peers: benchmarks/README.md
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py
	$(BIN)/python benchmarks/make_readme.py --readme README.md

bench-docs: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --docs-only
	$(BIN)/python benchmarks/make_readme.py --readme README.md

clean-runs:
	rm -rf runs
