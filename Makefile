# Entry points used by the README and by .ci/run. Every target creates the
# virtual environment if it is missing and rebuilds the Cython extension when
# its sources changed, so each one works on a fresh clone.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SUFFIX := $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
EXT    := router/_fastparse$(SUFFIX) router/_fastroute$(SUFFIX) bench/loadlib/_fastload$(SUFFIX)

.PHONY: run test bench bench-compare bench-cluster peers build clean

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "setuptools>=77" wheel "Cython>=3.0"
	$(PY) -m pip install --quiet --no-build-isolation -e '.[test,bench]'
	touch $@

$(EXT) &: $(VENV)/.installed $(wildcard router/_fast*.pyx router/_fast*.pxd bench/loadlib/_fast*.pyx)
	$(PY) setup.py --quiet build_ext --inplace
	touch $(EXT)  # setup.py leaves an up-to-date extension as it was; make compares every one with every source

build: $(EXT)

# Real S2S peers for the interop tests (Prosody, ejabberd). Installs them with
# apt when running as root; otherwise the interop tests skip and say why.
peers:
	bash scripts/install-peers.sh

run: build
	$(PY) -m router serve

test: build peers
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: build
	$(PY) -m pytest bench -q --benchmark-only --benchmark-autosave --benchmark-compare

bench-compare: build peers
	$(PY) -m bench.compare

# The cluster hop: the relay against two nodes joined by a nats-server (started and stopped here).
bench-cluster: build peers
	$(PY) -m bench.compare --targets relay,relay-hop --streams 10,100 --rate-points '' --idle-streams 0 --no-floor --no-doc

clean:
	rm -rf build $(VENV) router/*.so router/_fast*.c
