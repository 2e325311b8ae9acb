# `make demo` and `make test` create .venv at the repository root when it is missing.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo study bench test lint venv system-deps

venv: $(STAMP)

# torch/torchvision are pinned to the releases this machine's pip serves from disk.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST (real data for the demo), jemalloc (stable CPU step times) and headless Chromium with
# its driver (the browser test of `simmim serve`'s page) come from Debian.
system-deps:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] || ! ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1 \
			|| ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist libjemalloc2 chromium chromium-driver >/dev/null; \
		else echo "note: install Debian packages dataset-fashion-mnist libjemalloc2 chromium chromium-driver"; fi; \
	fi

demo: venv system-deps
	$(VENV)/bin/simmim demo --out report

# about two hours on a 2-core CPU (--only main ~85 min, --only ablations ~35 min); resumable (runs/study/results.jsonl)
study: venv system-deps
	$(VENV)/bin/simmim study --out docs/results

# our SimMIM step against HF transformers' on the same input; writes docs/benchmark.{md,json}
bench: venv system-deps
	$(VENV)/bin/simmim bench

test: venv system-deps
	$(PY) -m pytest tests

lint: venv
	$(VENV)/bin/ruff check src tests
