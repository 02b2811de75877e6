# fusion: every set-up step lives here, so that a fresh machine needs only
# `make test` or `make demo`. Repeated runs skip what is already done, and the
# targets work in any order.
#
# Two environments, each with its own build of fusion._C:
#   .venv         the current PyTorch (the default): pip's torch 2 wheels for
#                 the Python 3.11 on PATH (pyenv's CPython), whose pip installs
#                 them from this machine's disk without a download
#   .venv-oldest  the oldest supported PyTorch: Debian's python3-torch for
#                 /usr/bin/python3, in a venv with --system-site-packages
# Both are CPython 3.11, so both builds are named fusion/_C.cpython-311-*.so.
# Each venv gets a regular (not editable) install, built in
# build/py311-torch<version>/ (setup.py), with a stamp keyed on the venv's
# torch version; the tests run with `python -P`, so the source tree's fusion/
# (which holds no extension) never shadows the installed package.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
PYTHON_SYS := /usr/bin/python3
VENV := .venv
VENV_OLDEST := .venv-oldest
PY := $(VENV)/bin/python
PY_OLDEST := $(VENV_OLDEST)/bin/python
STAMPS := .stamps

# Matched torch + torchvision pairs, preferred first: the small CPU pair where
# the machine has it (the Debian 13 image), else the CUDA build that runs on
# the CPU (the Debian 12 image; PyPI's torchvision does not import beside the
# 2.13.0 CPU wheel there). The first pair pip can install wins.
TORCH_PAIRS := torch==2.13.0+cpu,torchvision==0.28.0+cpu torch==2.14.1,torchvision==0.29.1
# Free disk needed before creating .venv, in GiB (the CUDA pair takes 5.5).
VENV_DISK_GIB := 8

# Test and demo extras from PyPI for the torch 2 venv (pyproject's [test]
# extra); installed under pins of the venv's own torch, torchvision and numpy,
# which are checked again afterwards.
EXTRAS := pytest onnx onnxscript onnxruntime threadpoolctl psutil matplotlib
# The model libraries (pyproject's [models] extra): test, demo and benchmark
# dependencies, never runtime ones.
MODEL_EXTRAS := timm ultralytics
# The oldest venv takes pytest and onnx from Debian, and what Debian lacks from
# PyPI under the same pins (ONNX Runtime 1.26 is the newest that keeps
# Debian's protobuf).
EXTRAS_OLDEST := onnxruntime threadpoolctl timm ultralytics

# Debian packages: the oldest torch with its headers and test dependencies;
# and, apart, the tools of the native hardening targets.
DEBS_OLDEST := python3-torch libtorch-dev python3-torchvision python3-dev \
        python3-setuptools python3-pytest python3-numpy python3-venv \
        python3-onnx python3-matplotlib python3-tqdm python3-psutil \
        libopenblas0-pthread build-essential
# The headless browser that renders the notebook report in tests/test_report_html.py.
DEBS_BROWSER := chromium
DEBS_TOOLS := build-essential clang libclang-rt-14-dev libfuzzer-14-dev valgrind flake8 \
        clang-format

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.c csrc/*.h csrc/*.cpp fusion/*.py fusion/_tools/*.py)

# ultralytics (a test extra) probes public DNS servers at import and may
# pip-install packages unless told not to; every process started from here
# inherits these.
export YOLO_OFFLINE := True
export YOLO_AUTOINSTALL := False
export YOLO_CONFIG_DIR := $(CURDIR)/build/yolo-config

PYTEST_ARGS ?=

.PHONY: setup setup-oldest deps deps-browser deps-tools extras extras-oldest venv venv-oldest install install-oldest test \
        test-python test-models test-c test-oldest test-ids demo bench bench-fold bench-full timm-table bench-reparam fuzz \
        test-sanitize test-sanitize-oldest valgrind lint format clean

setup: install

# --- the current PyTorch ----------------------------------------------------

venv: $(STAMPS)/venv
$(STAMPS)/venv:
	@mkdir -p $(STAMPS)
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ ! -x $(PY) ] && [ "$$free" -lt $(VENV_DISK_GIB) ]; then \
	  echo "error: $(VENV) needs about $(VENV_DISK_GIB) GiB of free disk for torch," \
	       "and only $$free GiB is free here ($$(pwd)). Free some space and run make again." >&2; \
	  exit 1; fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@for pair in $(TORCH_PAIRS); do \
	  pkgs=$$(echo $$pair | tr , ' '); \
	  if $(PY) -m pip install -q --dry-run --no-deps $$pkgs >/dev/null 2>&1; then \
	    echo "Installing $$pkgs into $(VENV) (with $(PYTHON))"; \
	    $(PY) -m pip install -q $$pkgs setuptools wheel > $(STAMPS)/pip.log 2>&1 \
	      || { cat $(STAMPS)/pip.log; exit 1; }; \
	    $(PY) -c "import torch, torchvision" || exit 1; \
	    touch $@; exit 0; fi; \
	done; \
	echo "error: pip finds none of these torch + torchvision pairs: $(TORCH_PAIRS)" >&2; exit 1

# extras_into(python, packages): installs packages from PyPI under constraints
# that pin every distribution the venv already sees (its torch, torchvision and
# numpy among them) to its current version, then checks those three again.
define extras_into
	@$(1) -m pip freeze > $(STAMPS)/pins.txt 2>/dev/null
	@grep -iE '^(torch|torchvision|numpy)==' $(STAMPS)/pins.txt > $(STAMPS)/pins-stack.txt
	@$(1) -m pip install -q -c $(STAMPS)/pins.txt $(2) > $(STAMPS)/pip.log 2>&1 \
	  || { cat $(STAMPS)/pip.log; exit 1; }
	@$(1) -m pip freeze 2>/dev/null | grep -iE '^(torch|torchvision|numpy)==' \
	  | diff $(STAMPS)/pins-stack.txt - \
	  || { echo "error: installing $(2) changed the torch stack of $(1) (above)" >&2; exit 1; }
	@touch $@
endef

extras: $(STAMPS)/extras
$(STAMPS)/extras: $(STAMPS)/venv Makefile
	$(call extras_into,$(PY),$(EXTRAS) $(MODEL_EXTRAS))

# install_into(python): a regular install of this tree, redone when a source is
# newer than the stamp for that venv and its torch version.
define install_into
	@v=$$($(1) -c 'import torch; print(torch.__version__)' 2>/dev/null) || exit 1; \
	stamp=$(STAMPS)/install-$$(echo $(1) | cut -d/ -f1 | tr -d .)-torch$$v; \
	if [ -f $$stamp ] && [ -z "$$(find $(SOURCES) -newer $$stamp | head -1)" ]; then exit 0; fi; \
	echo "Building fusion against torch $$v for $(1)"; \
	$(1) -m pip install -q --no-build-isolation --no-deps --force-reinstall . \
	  > $(STAMPS)/pip.log 2>&1 || { cat $(STAMPS)/pip.log; exit 1; }; \
	$(1) -P -c 'import fusion' || exit 1; touch $$stamp
endef

install: $(STAMPS)/extras
	$(call install_into,$(PY))

test: test-c test-python

test-python: install $(STAMPS)/deps-browser
	$(PY) -P -m pytest -q -m "not models" $(PYTEST_ARGS)

# One committed timm model per family (tests/test_timm.py, marked `models`),
# each with its measured time; CI runs it after make test.
test-models: install
	$(PY) -P -m pytest -q -m models $(PYTEST_ARGS)

# DEMO_ARGS: e.g. make demo DEMO_ARGS="timm:efficientnet_b0 yolo:yolov8n"
DEMO_ARGS ?=
demo: install
	$(VENV)/bin/fusion demo $(DEMO_ARGS)

# The whole quick run on the current torch, after fuse() time and latency on the
# oldest (the two that differ notably between them), shown side by side.
BENCH_OLDEST := benchmarks/results/raw/oldest
bench: install install-oldest bench-fold
	$(PY_OLDEST) benchmarks/run.py --quick --only fuse_time latency --raw $(BENCH_OLDEST) --no-report
	$(PY) benchmarks/run.py --quick --oldest-raw $(BENCH_OLDEST)

# The C core's fold per dtype and instruction-set path against a read and a
# memcpy of the same bytes (benchmarks/results/fold_isa.md is one such run).
bench-fold:
	@mkdir -p benchmarks/results/raw
	OPENMP=1 bash benchmarks/fold_speed.sh | tee benchmarks/results/raw/fold_isa.md

bench-full: install
	$(PY) benchmarks/run.py --full

# The full timm sweep behind benchmarks/results/timm.md: every timm
# architecture with a BatchNorm-like module and at most 30M parameters, fused
# in fp32 and bf16 (about an hour here; it resumes, and --table rewrites the
# table from the raw results). Not part of CI: make test-models runs one model
# per family.
TIMM_SWEEP_ARGS ?=
timm-table: install
	nice $(PY) -P benchmarks/timm_sweep.py $(TIMM_SWEEP_ARGS)

# timm's reparameterize_model against fusion on repvgg, mobileone and fastvit
# (benchmarks/results/reparam.md).
bench-reparam: install
	$(PY) -P benchmarks/bench_reparam.py

# --- the oldest supported PyTorch --------------------------------------------

# apt_install(packages): installs those not installed yet.
define apt_install
	@mkdir -p $(STAMPS)
	@missing=""; for p in $(1); do \
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
endef

deps: $(STAMPS)/deps
$(STAMPS)/deps: Makefile
	$(call apt_install,$(DEBS_OLDEST))

deps-browser: $(STAMPS)/deps-browser
$(STAMPS)/deps-browser: Makefile
	$(call apt_install,$(DEBS_BROWSER))

deps-tools: $(STAMPS)/deps-tools
$(STAMPS)/deps-tools: Makefile
	$(call apt_install,$(DEBS_TOOLS))

venv-oldest: $(STAMPS)/venv-oldest
$(STAMPS)/venv-oldest: $(STAMPS)/deps
	@test -x $(PY_OLDEST) || $(PYTHON_SYS) -m venv --system-site-packages $(VENV_OLDEST)
	@touch $@

extras-oldest: $(STAMPS)/extras-oldest
$(STAMPS)/extras-oldest: $(STAMPS)/venv-oldest Makefile
	$(call extras_into,$(PY_OLDEST),$(EXTRAS_OLDEST))

setup-oldest install-oldest: $(STAMPS)/extras-oldest
	$(call install_into,$(PY_OLDEST))

test-oldest: install-oldest $(STAMPS)/deps-browser
	@$(PY_OLDEST) -c 'import torch, torchvision; print("Testing on the oldest supported torch:", torch.__version__, "torchvision", torchvision.__version__)'
	$(PY_OLDEST) -P -m pytest -q -m "not models" $(PYTEST_ARGS)

# --- native checks -------------------------------------------------------------

# gcc alone (on every machine of this kind); no torch.
test-c:
	$(MAKE) -C tests/c run

fuzz: $(STAMPS)/deps-tools
	$(MAKE) -C tests/fuzz run

# The extension built with AddressSanitizer and UBSan, and the fast Python
# tests run against it (the sanitizer runtime is preloaded into the
# uninstrumented interpreter).
test-sanitize: install $(STAMPS)/deps-tools
	PY=$(PY) bash tests/sanitize.sh

test-sanitize-oldest: install-oldest $(STAMPS)/deps-tools
	PY=$(PY_OLDEST) bash tests/sanitize.sh

valgrind: $(STAMPS)/deps-tools
	$(MAKE) -C tests/c valgrind

lint: $(STAMPS)/deps-tools
	flake8 --max-line-length 100 fusion tests benchmarks
	clang-format --dry-run --Werror csrc/*.c csrc/*.h csrc/*.cpp

format:
	clang-format -i csrc/*.c csrc/*.h csrc/*.cpp

clean:
	rm -rf build $(STAMPS) fusion/_C*.so tests/c/build tests/fuzz/build
