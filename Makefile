# mcrelay: everything a newcomer needs is behind `make demo` and `make test`.
# Runtime runs on Debian's python3 with Debian's pyroute2 (what the .deb uses);
# test-only tools come from PyPI into .venv.

VENV    := .venv
PY      := $(VENV)/bin/python
DEBS    := python3 python3-venv python3-pip python3-pyroute2 python3-systemd \
           python3-prometheus-client \
           iproute2 procps socat gcc libc6-dev
STAMP_DEBS := $(VENV)/.debs
# Real discovery clients for tests/netns/test_discovery.py, started only inside
# lab namespaces. Their services must not start on the host when installed:
# a policy-rc.d that refuses every start is in place for the install (unless
# the machine already has one).
TEST_DEBS  := avahi-daemon avahi-utils dbus-daemon python3-zeroconf minidlna \
              python3-gi gir1.2-gssdp-1.6 wakeonlan
STAMP_TEST_DEBS := $(VENV)/.test-debs
STAMP_PIP  := $(VENV)/.pip
# A second environment with the newest pyroute2 the bounds in pyproject.toml
# allow, from PyPI: what `pip install .` gives users. The namespace suite runs
# against it as well as against Debian's python3-pyroute2.
VENV_PYPI  := .venv-pypi
STAMP_PYPI := $(VENV_PYPI)/.pip

.PHONY: all setup setup-pypi demo test lint typecheck unit netns bench deb deb-check man docs clean

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

$(STAMP_TEST_DEBS): $(STAMP_DEBS)
	@missing=""; for p in $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the discovery tests (services not started):$$missing"; \
	  own=""; if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; own=1; fi; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; rc=$$?; \
	  if [ -n "$$own" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
	  [ $$rc -eq 0 ] || exit $$rc; \
	fi
	@touch $@

$(STAMP_PIP): $(STAMP_DEBS) pyproject.toml requirements-dev.txt
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $@

$(STAMP_PYPI): $(STAMP_DEBS) pyproject.toml requirements-dev.txt
	@test -x $(VENV_PYPI)/bin/python || /usr/bin/python3 -m venv $(VENV_PYPI)
	$(VENV_PYPI)/bin/python -m pip install -q --upgrade pip
	$(VENV_PYPI)/bin/python -m pip install -q --upgrade -r requirements-dev.txt
	$(VENV_PYPI)/bin/python -m pip install -q --upgrade -e ".[metrics]"
	@$(VENV_PYPI)/bin/python -c 'import pyroute2; print("pyroute2 from PyPI:", pyroute2.__version__)'
	@touch $@

setup: $(STAMP_PIP) $(STAMP_TEST_DEBS)

setup-pypi: $(STAMP_PYPI)

demo: setup
	$(PY) -m mcrelay.demo

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: setup
	$(VENV)/bin/mypy src

unit: setup
	$(VENV)/bin/pytest -q tests/unit tests/fuzz

test: setup setup-pypi lint typecheck
	$(VENV)/bin/pytest -q --durations=15 tests
	@echo "namespace suite again, with pyroute2 $$($(VENV_PYPI)/bin/python -c 'import pyroute2; print(pyroute2.__version__)') from PyPI:"
	$(VENV_PYPI)/bin/pytest -q -p no:cacheprovider tests/netns

bench: setup
	$(PY) -m bench.hot_path
	$(PY) -m bench.relay_throughput

# The Debian package and the docs are built with Debian's tools only (no PyPI).
DEB_BUILD_DEBS := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
                  python3-shtab python3-pyroute2 lintian
DOCS_DEBS      := mkdocs python3-pyroute2

define apt_need
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

deb:
	$(call apt_need,$(DEB_BUILD_DEBS))
	bash packaging/deb.sh build build

deb-check:
	$(call apt_need,$(DEB_BUILD_DEBS))
	bash packaging/deb.sh check build

man:
	@mkdir -p build/man
	export SOURCE_DATE_EPOCH=$$(dpkg-parsechangelog -S Timestamp) PYTHONPATH=src; \
	for p in mcrelay mcrelayd; do \
	  /usr/bin/python3 packaging/docgen.py man $$p >build/man/$$p.8 || exit 1; done; \
	/usr/bin/python3 packaging/docgen.py man mcrelay.toml >build/man/mcrelay.toml.5
	@echo "man pages in build/man (man -l build/man/mcrelay.8)"

docs:
	$(call apt_need,$(DOCS_DEBS))
	PYTHONPATH=src /usr/bin/python3 packaging/docgen.py settings-md >docs/settings.md
	/usr/bin/python3 -m mkdocs build --strict --site-dir build/site

clean:
	rm -rf $(VENV) $(VENV_PYPI) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
