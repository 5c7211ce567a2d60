# Two commands for a machine with only python3: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-celery test lint typecheck pytest bench bench-e2e bench-celery bench-client bench-scrape bench-stream clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Start examples/catchall.py under gunicorn on 127.0.0.1, run the client, stop.
demo: $(STAMP)
	$(BIN)/python examples/demo.py

# The same example on Celery: a worker and gunicorn, Redis (db 12) as broker and store.
demo-celery: $(STAMP)
	$(BIN)/python examples/demo_celery.py

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

# Benchmarks are not part of `make test`: they print figures, they do not assert.
bench: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_overhead.py --store memory://
	$(BIN)/python tests/benchmarks/bench_overhead.py --store sqlite:///$$(mktemp -d)/bench.db
	$(BIN)/python tests/benchmarks/bench_overhead.py --store redis://127.0.0.1:6379/12
	# What signal receivers and the Prometheus metrics add to a submit (SQLite, {"x": 1}).
	for extra in "" --signals --metrics; do \
		$(BIN)/python tests/benchmarks/bench_overhead.py --store sqlite:///$$(mktemp -d)/bench.db \
			--body-size 0 --clock thread $$extra || exit 1; \
	done
	$(BIN)/python tests/benchmarks/bench_retention.py --stores memory sqlite redis://127.0.0.1:6379/12
	$(BIN)/python tests/benchmarks/bench_progress.py --stores sqlite redis://127.0.0.1:6379/12

# A whole task on real gunicorn against a plain call, each way a client gets its
# answer, with the default SQLite store and with Redis (db 12, a prefix of its own).
bench-e2e: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_e2e.py --store sqlite
	$(BIN)/python tests/benchmarks/bench_e2e.py --store redis://127.0.0.1:6379/12

# What a Prometheus scrape costs the store with 100,000 tasks kept (SQLite, Redis db 12).
bench-scrape: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_scrape.py --store sqlite:///$$(mktemp -d)/scrape.db
	$(BIN)/python tests/benchmarks/bench_scrape.py --store redis://127.0.0.1:6379/12

# 200 event streams on one gunicorn worker, 50 tasks writing progress 10 times a
# second in another server: SQLite with gthread, Redis (db 12) with gevent.
bench-stream: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_stream.py --store sqlite --worker gthread
	$(BIN)/python tests/benchmarks/bench_stream.py --store redis://127.0.0.1:6379/12 --worker gevent

# Our CeleryExecutor against raw Celery, through one worker (Redis db 12).
bench-celery: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_celery.py

# Tasks through the Python client (long-poll) against plain calls, on gunicorn.
bench-client: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_client.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis *.egg-info
