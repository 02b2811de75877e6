# fusion: every set-up step lives here, so that a fresh Debian 12 machine needs
# only `make demo` or `make test`. Repeated runs skip what is already done.

PYTHON_SYS := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .stamps

# Debian packages: torch and its headers, the build toolchain, and what tests,
# benchmarks and the native hardening targets use.
DEBS := python3-torch libtorch-dev python3-torchvision python3-dev \
        python3-setuptools python3-pytest python3-numpy python3-venv \
        python3-onnx python3-matplotlib python3-tqdm python3-psutil \
        libopenblas0-pthread build-essential ninja-build \
        clang libclang-rt-14-dev libfuzzer-14-dev valgrind flake8

NATIVE_SRC := csrc/fold.c csrc/fold.h csrc/module.c csrc/torch_shim.cpp csrc/torch_shim.h

PYTEST_ARGS ?=

.PHONY: setup deps venv install test test-python test-c demo bench bench-full \
        fuzz test-sanitize valgrind lint format clean

setup: install

deps: $(STAMPS)/deps
$(STAMPS)/deps: Makefile
	@mkdir -p $(STAMPS)
	@missing=""; for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" \
	    || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi
	@touch $@

venv: $(STAMPS)/venv
$(STAMPS)/venv: $(STAMPS)/deps
	@test -x $(PY) || $(PYTHON_SYS) -m venv --system-site-packages $(VENV)
	@touch $@

install: $(STAMPS)/install
$(STAMPS)/install: $(STAMPS)/venv setup.py pyproject.toml $(NATIVE_SRC)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

test: install test-c test-python

test-python: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-c: $(STAMPS)/deps
	$(MAKE) -C tests/c run

demo: install
	$(PY) -m fusion demo

bench: install
	$(PY) benchmarks/run.py --quick

bench-full: install
	$(PY) benchmarks/run.py --full

fuzz: $(STAMPS)/deps
	$(MAKE) -C tests/fuzz run

# The extension built with AddressSanitizer and UBSan into build/asan, and the
# Python tests run against it (the sanitizer runtime must be preloaded into
# the uninstrumented interpreter).
test-sanitize: $(STAMPS)/venv
	bash tests/sanitize.sh

valgrind: $(STAMPS)/deps
	$(MAKE) -C tests/c valgrind

lint:
	flake8 --max-line-length 100 fusion tests benchmarks
	clang-format --dry-run --Werror csrc/*.c csrc/*.h csrc/*.cpp

format:
	clang-format -i csrc/*.c csrc/*.h csrc/*.cpp

clean:
	rm -rf build $(STAMPS) fusion/_C*.so tests/c/build tests/fuzz/build
