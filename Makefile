# Two commands: `make run` and `make test`. Everything else bootstraps itself.
PYTHON ?= python3
VENV   ?= .venv
UV_VERSION := 0.13.9
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run demo serve test test-notebooks lab notebooks lint bench bench-sse bench-sim inspect clean venv \
	mutation mutation-again

venv: $(STAMP)

# Idempotent: rebuilt only when the lock file or pyproject change.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	@$(BIN)/uv pip sync -q --compile-bytecode --python $(BIN)/python requirements.lock
	@$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/workbench simulate baseline $(RUN_ARGS)

demo: $(STAMP)
	$(BIN)/workbench run

serve: $(STAMP)
	$(BIN)/workbench serve $(SERVE_ARGS)

test: $(STAMP)
	$(BIN)/ruff check workbench simulations tests bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-notebooks

# Re-execute every notebook and compare the outputs marked NBVAL_CHECK_OUTPUT.
test-notebooks: $(STAMP)
	cd notebooks && ../$(BIN)/python -m pytest -p no:cacheprovider --nbval-lax \
		--nbval-sanitize-with sanitize.cfg --nbval-cell-timeout 900 -o testpaths=. .

# JupyterLab on notebooks/ with the project's environment as the kernel.
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir notebooks

# Re-run every notebook in place (refreshes the committed outputs).
notebooks: $(STAMP)
	cd notebooks && for nb in *.ipynb; do \
		../$(BIN)/jupyter nbconvert --to notebook --execute --inplace "$$nb" || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check workbench simulations tests bench
	$(BIN)/ruff format --check workbench simulations tests bench

bench: $(STAMP)
	$(BIN)/python bench/throughput.py $(BENCH_ARGS)
	$(BIN)/python bench/sse.py
	$(BIN)/python bench/simulate.py

bench-sim: $(STAMP)
	$(BIN)/python bench/simulate.py $(BENCH_ARGS)

bench-sse: $(STAMP)
	$(BIN)/python bench/sse.py $(BENCH_ARGS)

# Mutation testing of the pure cores ([tool.mutmut] in pyproject.toml); not part of
# `make test`. A fresh run from scratch, then the score per module; exit 1 when a
# mutant survived that bench/mutation_equivalents.toml does not explain.
# MUTATION_ARGS="--record bench/records/mutation.json" also writes the record.
mutation: $(STAMP)
	rm -rf mutants
	nice -n 15 $(BIN)/mutmut run $(MUTMUT_ARGS)
	$(BIN)/python bench/mutation_score.py $(MUTATION_ARGS)

# After adding tests: re-run only the mutants that survived last time (mutmut keeps
# every verdict in mutants/ and re-runs a decided mutant only when named).
mutation-again: $(STAMP)
	nice -n 15 $(BIN)/mutmut run $$($(BIN)/python bench/mutation_score.py --survivors) $(MUTMUT_ARGS)
	$(BIN)/python bench/mutation_score.py $(MUTATION_ARGS)

inspect: $(STAMP)
	$(BIN)/workbench inspect

clean:
	rm -rf $(VENV) data/demo mutants
