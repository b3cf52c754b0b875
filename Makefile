# Two commands: `make run` and `make test`. Everything else bootstraps itself.
PYTHON ?= python3
VENV   ?= .venv
UV_VERSION := 0.13.9
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run demo serve test test-notebooks lab notebooks lint bench bench-sse bench-sim \
	bench-report bench-report-check bench-durability bench-scale bench-capacity inspect clean venv mutation \
	mutation-again

venv: $(STAMP)

# Idempotent: rebuilt only when the lock file or pyproject change.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	@$(BIN)/uv pip sync -q --compile-bytecode --python $(BIN)/python requirements.lock
	@$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	@touch $(STAMP)

# The baseline scenario into data/runs/baseline-1; --force: a second `make run`
# overwrites the first one's run (`workbench simulate` refuses to without it).
run: $(STAMP)
	$(BIN)/workbench simulate baseline --force $(RUN_ARGS)

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
# As root (a container) jupyter refuses to start without --allow-root.
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir notebooks $$([ "$$(id -u)" = 0 ] && echo --allow-root)

# Re-run every notebook in place (refreshes the committed outputs), then strip what
# says when and how it ran (timestamps, papermill's records: simulations/notebooks.py).
# A subset: make notebooks NOTEBOOKS="03-streams-vs-pubsub.ipynb 04-ai-analytics.ipynb"
NOTEBOOKS ?= *.ipynb
notebooks: $(STAMP)
	cd notebooks && for nb in $(NOTEBOOKS); do \
		../$(BIN)/jupyter nbconvert --to notebook --execute --inplace "$$nb" || exit 1; \
		../$(BIN)/python -m simulations.notebooks "$$nb" || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check workbench simulations tests bench
	$(BIN)/ruff format --check workbench simulations tests bench

# FastStream, the throughput bench's peer anchor, lives in its own environment: it is
# not a dependency of the runtime. Without it the bench says so and skips that anchor.
BENCH_VENV  := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): bench/requirements-faststream.txt $(STAMP)
	@test -x $(BENCH_VENV)/bin/python || $(BIN)/uv venv -q --python $(BIN)/python $(BENCH_VENV)
	@$(BIN)/uv pip sync -q --python $(BENCH_VENV)/bin/python bench/requirements-faststream.txt
	@touch $(BENCH_STAMP)

# Each bench writes its record to bench/records/<bench>.json; `make bench-report` then
# regenerates the README's figure tables from them (throughput, sse, simulate,
# durability, scale, capacity, and mutation from `make mutation`). The durability matrix: 10 cells x
# DURABILITY_TRIALS interleaved rounds, each trial a kill -9 of redis-server.
DURABILITY_TRIALS ?= 5
bench: $(STAMP)
	@$(MAKE) --no-print-directory $(BENCH_STAMP) || \
		echo "bench: FastStream could not be installed in $(BENCH_VENV): its anchor is skipped"
	$(BIN)/python bench/throughput.py $(BENCH_ARGS)
	$(BIN)/python bench/sse.py
	$(BIN)/python bench/simulate.py
	$(BIN)/python bench/durability.py --trials $(DURABILITY_TRIALS)
	$(BIN)/python bench/scale.py
	@$(MAKE) --no-print-directory bench-capacity BENCH_ARGS=

bench-report: $(STAMP)
	$(BIN)/python bench/report.py

bench-report-check: $(STAMP)
	$(BIN)/python bench/report.py --check

bench-sim: $(STAMP)
	$(BIN)/python bench/simulate.py $(BENCH_ARGS)

bench-sse: $(STAMP)
	$(BIN)/python bench/sse.py $(BENCH_ARGS)

# Relay, ledger and fan-out on one redis-server (unpartitioned, then 16 partitions)
# and on a 3-master local Redis Cluster; the projection to N machines (#14).
bench-scale: $(STAMP)
	$(BIN)/python bench/scale.py $(BENCH_ARGS)

# Escrow lifecycles/s through serve's HTTP API with every group and phone keeping up,
# against the direct EscrowService rate: SQLite, then PostgreSQL when TEST_DATABASE_URL
# is set (in two fresh schemas of that database, dropped after).
bench-capacity: $(STAMP)
	$(BIN)/python bench/capacity.py $(BENCH_ARGS)
	@if [ -n "$$TEST_DATABASE_URL" ]; then \
		$(BIN)/python bench/capacity.py --database-url "$$TEST_DATABASE_URL" $(BENCH_ARGS); \
	else echo "bench-capacity: TEST_DATABASE_URL not set: PostgreSQL skipped"; fi

bench-durability: $(STAMP)
	$(BIN)/python bench/durability.py --trials $(DURABILITY_TRIALS) $(BENCH_ARGS)

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
	rm -rf $(VENV) $(BENCH_VENV) data/demo mutants
