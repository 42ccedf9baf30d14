# Two commands set everything up on a fresh machine with Python 3.11+ and pip:
#   make demo   install, then run the whole product locally in the Dagster UI
#   make test   install with test extras and run the whole suite
#   make test-fast   the suite without the end-to-end and slow tests (markers in pyproject.toml)
#   make invariants   the money invariants' stateful test with 10x the examples of make test
#   make chaos        every fault at once, then the ledger audited against fal's truth (docs/reliability.md)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo demo-headless prod-local test test-fast invariants lint typecheck bench bench-quick chaos clean stop

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: install
	$(BIN)/renderqueue dev

demo-headless: install
	$(BIN)/renderqueue demo --headless

prod-local: install
	$(BIN)/renderqueue dev --production-shape

lint: install
	$(BIN)/ruff check renderqueue_pipeline tests bench
	$(BIN)/ruff format --check renderqueue_pipeline tests bench

# pyright (basic mode, [tool.pyright] in pyproject.toml) over renderqueue_pipeline, against
# the venv's packages; pyright[nodejs] brings its own node, nothing is fetched from npm
typecheck: install
	$(BIN)/pyright --pythonpath $(BIN)/python

test: install lint typecheck
	$(BIN)/dg check defs
	$(BIN)/pytest -q

# A developer's loop: no `e2e` or `slow` test (the demo, dev, chaos, the wheel, soaks).
test-fast: install lint
	$(BIN)/pytest -q -m "not e2e and not slow"

# tests/test_money_invariants.py: `make test` runs 8 examples; this runs 10x as many
invariants: install
	RENDERQUEUE_INVARIANT_EXAMPLES=80 $(BIN)/pytest -q tests/test_money_invariants.py

bench: install
	$(BIN)/python -m bench; status=$$?; \
	RENDERQUEUE_HOME=.renderqueue/bench $(BIN)/renderqueue db stop >/dev/null; exit $$status

# Every benchmark at a tenth of its size: a developer's check before a commit (writes no docs;
# fails only when a benchmark fails, the bars being for the full size; prints the time taken;
# what make bench would write goes to .renderqueue/bench/BENCHMARKS-quick.md).
bench-quick: install
	BENCH_SCALE=0.1 $(BIN)/python -m bench --no-write --markdown .renderqueue/bench/BENCHMARKS-quick.md; status=$$?; \
	RENDERQUEUE_HOME=.renderqueue/bench $(BIN)/renderqueue db stop >/dev/null; exit $$status

# Every fault at once against its own embedded Postgres (.renderqueue/chaos); exit 1 on any
# difference between the ledger and the simulator's ground truth (docs/reliability.md).
chaos: install
	$(BIN)/python -m renderqueue_pipeline.chaos; status=$$?; \
	RENDERQUEUE_HOME=.renderqueue/chaos $(BIN)/renderqueue db stop >/dev/null; exit $$status

stop:
	-$(BIN)/renderqueue db stop
	-RENDERQUEUE_HOME=.renderqueue/test $(BIN)/renderqueue db stop
	-RENDERQUEUE_HOME=.renderqueue/bench $(BIN)/renderqueue db stop
	-RENDERQUEUE_HOME=.renderqueue/chaos $(BIN)/renderqueue db stop

clean: stop
	rm -rf $(VENV) .renderqueue .pytest_cache .ruff_cache .hypothesis
