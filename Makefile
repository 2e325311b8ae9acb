# `make demo` and `make test` create .venv at the repository root when it is missing.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo study study-continue bench bench-peers test test-fast test-compile lint venv system-deps

venv: $(STAMP)

# torch/torchvision: the pinned releases (pyproject.toml states only the lowest supported ones).
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

# about 3 h in one process on a 2-core AMX CPU in bf16 (runtime.precision=auto); the README gives the split into two
# processes of about 1.5 h each (--only, --seeds); resumable (runs/study/results.jsonl)
study: venv system-deps
	$(VENV)/bin/simmim study --out docs/results

# does continuing pretraining on a new domain pay? about 30 min on 2 quiet cores (README); resumable, writes
# docs/results/continue.{md,json,png}
study-continue: venv system-deps
	$(VENV)/bin/simmim study --only continue --out docs/results

# our SimMIM step against HF transformers' on the same input; writes docs/benchmark.{md,json}
bench: venv system-deps
	$(VENV)/bin/simmim bench

# mmpretrain, the third column of the bench, in a venv of its own: the project never depends on it.
# mmcv is built from its source distribution without compiled ops (the wheel pip calls mmcv-lite).
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed
PEERS_PIP := $(PEERS)/bin/python -m pip install -q --disable-pip-version-check

$(PEERS_STAMP): pyproject.toml
	test -x $(PEERS)/bin/python || python3 -m venv $(PEERS)
	$(PEERS_PIP) torch==2.14.1 torchvision==0.29.1 mmengine==0.10.7 'setuptools>=77.0.3,<81' wheel
	rm -rf $(PEERS)/src && mkdir -p $(PEERS)/src
	$(PEERS)/bin/python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
		-d $(PEERS)/src mmcv==2.1.0
	tar -xzf $(PEERS)/src/mmcv-2.1.0.tar.gz -C $(PEERS)/src
	MMCV_WITH_OPS=0 $(PEERS_PIP) --no-build-isolation $(PEERS)/src/mmcv-2.1.0
	$(PEERS_PIP) --no-deps mmpretrain==1.2.0
	$(PEERS_PIP) einops importlib-metadata mat4py modelindex rich safetensors
	$(PEERS_PIP) -e '.[bench]'
	touch $(PEERS_STAMP)

# the bench with mmpretrain as a third column (ours, HF and mmpretrain timed in one process)
bench-peers: venv system-deps $(PEERS_STAMP)
	$(VENV)/bin/simmim bench

test: venv system-deps
	$(PY) -m pytest tests -m "not compiles"

# the inner loop: everything but the tests marked slow (training runs, full-size models) or distributed
test-fast: venv system-deps
	$(PY) -m pytest tests -m "not slow and not distributed and not compiles"

# the benchmark's compiled rows (each side compiled in fresh processes): minutes on two CPU cores
test-compile: venv system-deps
	$(PY) -m pytest tests -m compiles

lint: venv
	$(VENV)/bin/ruff check src tests
