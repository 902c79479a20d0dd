# The commands of the README. Each sets up .venv first (once; again when setup.cfg changes).
VENV := .venv
BIN := $(VENV)/bin
# This torch pair installs from the local disk on the project's CI machines; override TORCH elsewhere if needed.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: train quick distill test demo print-torch

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test,demo]"
	touch $@

# One process on all cores of this machine; tqdm shows the steps done and the time left.
LAUNCH := $(BIN)/accelerate launch --num_processes 1 --num_machines 1 --num_cpu_threads_per_process $(shell nproc) \
	--mixed_precision no --dynamo_backend no
TRAIN := $(LAUNCH) train_conditional_ddpm.py --recipe cpu

# The main job: the CPU recipe (cond_ddpm/recipes.py) on the built-in synthetic data, which it renders first.
train: $(VENV)/.installed
	@echo "make train: the CPU recipe, 3600 steps at 32x32 on 5000 built-in synthetic scenes, into runs/cpu-synthetic."
	@echo "On 2 CPU cores: 25 minutes at 75 images/s, about 2 hours at 16 (the progress bar shows the time left),"
	@echo "plus a few minutes to render the scenes on the first run."
	@echo "(make quick: a 300-step smoke run, 3 to 12 minutes.)"
	$(TRAIN) --output_dir runs/cpu-synthetic --overwrite_output_dir

# A smoke run: the same recipe for 300 steps on 500 scenes, into runs/quick.
quick: $(VENV)/.installed
	@echo "make quick: 300 steps of the CPU recipe on 500 synthetic scenes, into runs/quick; 3 to 12 minutes on 2 cores."
	$(TRAIN) --synthetic_scenes 500 --max_train_steps 300 --lr_warmup_steps 50 --output_dir runs/quick \
		--overwrite_output_dir

# After `make train`: its pipeline distilled into a student that draws a scene in 4 UNet evaluations, into
# runs/cpu-distilled (the cpu distillation recipe, cond_ddpm/recipes.py).
distill: $(VENV)/.installed
	@test -f runs/cpu-synthetic/model_index.json || { echo "make distill distils the pipeline of make train, and"\
		"runs/cpu-synthetic holds none yet: run make train first"; exit 1; }
	@echo "make distill: 1600 steps of the cpu distillation recipe, about as long as make train took."
	$(LAUNCH) distill_conditional_ddpm.py --recipe cpu --pretrained_teacher_model runs/cpu-synthetic \
		--output_dir runs/cpu-distilled --overwrite_output_dir

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# The browser demo (app.py) of the pipeline `make train` saves; PIPELINE=folder-or-hub-id shows another.
PIPELINE ?= runs/cpu-synthetic
demo: $(VENV)/.installed
	$(BIN)/python app.py --pipeline $(PIPELINE)

# The torch pair, for .ci/install_check's fresh environment.
print-torch:
	@echo $(TORCH)
