# mcrelay: everything a newcomer needs is behind `make demo` and `make test`.
# Runtime runs on Debian's python3 with Debian's pyroute2 (what the .deb uses);
# test-only tools come from PyPI into .venv.

VENV    := .venv
PY      := $(VENV)/bin/python
DEBS    := python3 python3-venv python3-pip python3-pyroute2 python3-systemd \
           python3-prometheus-client \
           iproute2 procps socat gcc libc6-dev
STAMP_DEBS := $(VENV)/.debs
STAMP_PIP  := $(VENV)/.pip

.PHONY: all setup demo test lint typecheck unit netns bench deb clean

all: test

$(STAMP_DEBS): Makefile
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@touch $@

$(STAMP_PIP): $(STAMP_DEBS) pyproject.toml requirements-dev.txt
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $@

setup: $(STAMP_PIP)

demo: setup
	$(PY) -m mcrelay.demo

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: setup
	$(VENV)/bin/mypy src

unit: setup
	$(VENV)/bin/pytest -q tests/unit tests/fuzz

test: setup lint typecheck
	$(VENV)/bin/pytest -q --durations=15 tests

bench: setup
	$(PY) -m bench.hot_path
	$(PY) -m bench.relay_throughput

deb: setup
	bash packaging/build-deb.sh

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
