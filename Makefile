# kdext developer entry points. On a fresh clone:
#   make demo   # sets everything up, then runs the main job
#   make test   # sets everything up, then runs every test
#
# The virtual environment (.venv, or VENV=...) is created on first use and
# reused. Where nvcc exists, the CUDA build of torch is installed so that the
# CUDA kernels compile (they need no GPU to build); elsewhere the CPU build.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HAVE_NVCC := $(shell command -v nvcc >/dev/null 2>&1 && echo yes)
# The CUDA toolkit (for CMake; setup.py finds it by itself): $CUDA_HOME if it
# holds the runtime, else /usr/local/cuda. nvcc on PATH may be a wrapper script.
CUDA_ROOT := $(firstword $(foreach d,$(CUDA_HOME) /usr/local/cuda,$(if $(wildcard $(d)/include/cuda_runtime.h),$(d))))
TORCH_SPEC ?= $(if $(HAVE_NVCC),torch==2.14.1,torch==2.13.0)
HYPOTHESIS_PROFILE ?= ci
PYTEST_ARGS ?=
DEMO_OUT ?= demo_out
MAX_JOBS ?= 2
export MAX_JOBS

KDEXT_SOURCES := setup.py pyproject.toml $(shell find csrc kdext -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' \) 2>/dev/null)

.PHONY: all setup install test test-cpp cmake demo bench clean distclean

all: install

# 1. The environment: torch and the Python dependencies.
# Downloads from the package index sometimes break off mid-file
# ("IncompleteRead"); pip's own retries do not cover every such case, so each
# install is retried whole, with a growing pause, before the build gives up.
PIP_ATTEMPTS ?= 4
define pip_install
	@for attempt in $$(seq 1 $(PIP_ATTEMPTS)); do \
	  echo "$(PIP) install $(1)  (attempt $$attempt of $(PIP_ATTEMPTS))"; \
	  $(PIP) install --quiet --retries 10 $(1) && exit 0; \
	  [ $$attempt -lt $(PIP_ATTEMPTS) ] && { echo "pip install failed; retrying in $$((attempt * 20)) s" >&2; sleep $$((attempt * 20)); }; \
	done; echo "pip install $(1) failed $(PIP_ATTEMPTS) times" >&2; exit 1
endef

$(VENV)/.deps-stamp: requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(call pip_install,--upgrade pip setuptools wheel)
	$(call pip_install,"$(TORCH_SPEC)")
	$(call pip_install,-r requirements.txt)
	@touch $@

setup: $(VENV)/.deps-stamp

# 2. kdext itself (editable, so Python edits need no reinstall; the C++/CUDA
#    build is incremental through ninja in build/).
$(VENV)/.kdext-stamp: $(VENV)/.deps-stamp $(KDEXT_SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	@touch $@

install: $(VENV)/.kdext-stamp

test: install
	HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(VENV)/bin/pytest tests $(PYTEST_ARGS)

# The C++ build of the same op library (CMake + find_package(Torch)) and the
# ctest suite for the framework-free math in csrc/include.
cmake: setup
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" cmake -S . -B build-cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
	  -DPython3_EXECUTABLE=$(abspath $(PY)) \
	  $(if $(CUDA_ROOT),-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_ROOT) -DCUDAToolkit_ROOT=$(CUDA_ROOT))
	cmake --build build-cmake -j $(MAX_JOBS)
	cd build-cmake && ctest --output-on-failure

test-cpp: cmake

demo: install
	$(VENV)/bin/kdext demo --out $(DEMO_OUT)

# The benchmarks' extra providers (TRL) first: bench/requirements.txt.
$(VENV)/.bench-stamp: $(VENV)/.deps-stamp bench/requirements.txt
	$(call pip_install,-r bench/requirements.txt)
	@touch $@

bench: install $(VENV)/.bench-stamp
	$(PY) bench/run_all.py --out bench/results

clean:
	rm -rf build build-cmake kdext/*.so $(VENV)/.kdext-stamp

distclean: clean
	rm -rf $(VENV)
