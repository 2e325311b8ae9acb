# `make demo` and `make test` create .venv at the repository root when it is missing.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo study bench test test-fast lint venv system-deps

venv: $(STAMP)

# torch/torchvision: the pinned releases (pyproject.toml states only the lowest supported ones).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST (real data for the demo) and jemalloc (stable CPU step times) come from Debian.
system-deps:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] || ! ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist libjemalloc2 >/dev/null; \
		else echo "note: install Debian packages dataset-fashion-mnist libjemalloc2 for the demo data"; fi; \
	fi

demo: venv system-deps
	$(VENV)/bin/simmim demo --out report

# about an hour on a 2-core CPU; resumable (runs/study/results.jsonl)
study: venv system-deps
	$(VENV)/bin/simmim study --out docs/results

# our SimMIM step against HF transformers' on the same input; writes docs/benchmark.{md,json}
bench: venv system-deps
	$(VENV)/bin/simmim bench

test: venv system-deps
	$(PY) -m pytest tests

# the inner loop: everything but the tests marked slow (training runs, full-size models) or distributed
test-fast: venv system-deps
	$(PY) -m pytest tests -m "not slow and not distributed"

lint: venv
	$(VENV)/bin/ruff check src tests
