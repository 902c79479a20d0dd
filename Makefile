# The two commands of the README. Each sets up .venv first (once; again when setup.cfg changes).
VENV := .venv
BIN := $(VENV)/bin
# This torch pair installs from the local disk on the project's CI machines; override TORCH elsewhere if needed.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: train test print-torch

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

# The main job on the built-in synthetic data, sized for a CPU: the tiny preset at 32x32, a few minutes.
train: $(VENV)/.installed
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --num_cpu_threads_per_process $(shell nproc) --mixed_precision no --dynamo_backend no \
		train_conditional_ddpm.py --preset tiny --resolution 32 --synthetic_scenes 1000 \
		--max_train_steps 600 --train_batch_size 32 --learning_rate 1e-3 --lr_warmup_steps 50 \
		--save_images_epochs 5 --dataloader_num_workers 1 --output_dir runs/tiny-synthetic --overwrite_output_dir

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# The torch pair, for .ci/install_check's fresh environment.
print-torch:
	@echo $(TORCH)
