# ccidbridge — `make demo` and `make test` set up everything on a fresh
# Debian 12 (as root): Debian packages, a venv, an editable install.

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
PACKAGES := $(shell sed 's/\#.*//' .ci/debian-packages)
BENCH_PACKAGES := $(shell sed 's/\#.*//' .ci/bench-packages)
ISOLATED := .ci/isolated
READER   ?=

.PHONY: setup deps venv guest roots wheelhouse test typecheck demo bench bench-deps lint examples clean

setup: deps venv roots guest wheelhouse

# The Debian 13 and sid roots (QEMU 10.0/11.1, libvirt 11.3/12.8, pcsc-lite 2.3/2.5)
# debootstrapped into .cache/roots before entering the namespace, like the guest:
# debootstrap needs Debian's archive.  Cached; rebuilt when missing or when
# lab/stacks.py's package list changes.  A root that cannot be built stops here
# with one line naming the stack and why.
roots: venv
	$(PY) -m lab.stacks

# The test guest (Debian kernel + initramfs) is built into .cache/guest before
# entering the namespace: the kernel download needs the network, which
# .ci/isolated does not have.  Cached; rebuilt only when its inputs change.
guest: venv roots
	$(PY) -m lab.guest
	$(PY) -m lab.guest.stackguest

# Install the Debian packages of a list that are missing (and only those).
define install-missing
	@missing=$$(for p in $(1); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q --no-install-recommends $$missing; \
	fi
endef

deps:
	$(call install-missing,$(PACKAGES))

# The wheel test (tests/test_wheel.py) builds the wheel and installs it into a
# fresh venv inside .ci/isolated, which has no network: the build backend and
# the runtime dependencies are fetched (and pyscard compiled) here, once.
WHEELHOUSE := .cache/wheelhouse
wheelhouse: $(WHEELHOUSE)/.complete

$(WHEELHOUSE)/.complete: pyproject.toml | venv
	$(PY) -m lab.wheelhouse $(WHEELHOUSE)
	touch $@

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: setup typecheck
	$(VENV)/bin/ruff check ccidbridge lab tests benchmarks
	$(ISOLATED) $(VENV)/bin/pytest -q

# mypy --strict on ccidbridge/ (settings in pyproject.toml's [tool.mypy]).
typecheck: venv
	$(VENV)/bin/mypy

# Without READER: a private pcscd + vicc inside the namespace.  With READER:
# the machine's own pcscd and the card in that reader (nothing isolated to hide it).
demo: setup
ifeq ($(READER),)
	$(ISOLATED) $(PY) -m lab.demo
else
	$(PY) -m lab.demo --reader '$(READER)'
endif

# What only the benchmarks need, before entering the network-less namespace:
# the build dependencies of libcacard's vscclient, then vscclient itself,
# built from Debian 12's source package into .cache/vscclient (cached).
bench-deps: setup
	$(call install-missing,$(BENCH_PACKAGES))
	$(PY) -m benchmarks.vscclient

bench: bench-deps
	$(ISOLATED) $(PY) -m benchmarks

lint: venv
	$(VENV)/bin/ruff check ccidbridge lab tests benchmarks

examples: venv
	$(PY) -m lab.examples_regen

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
