"""The shipped training recipes: each one a named set of a training script's flags, kept here and nowhere else.

`train_conditional_ddpm.py` takes the `gpu` recipe's values as its defaults and `--recipe cpu` for the other; a flag
given on the command line overrides the recipe's value. `benchmarks/quality.py --recipe NAME` trains and scores the
same recipe. What was tried against them and lost is in docs/experiments.md.
"""

# One GPU, 64x64: the CPU recipe's winners on a larger UNet at full resolution. Sized, before any GPU ran it, at about
# 4 minutes of steps on an H100 (at most 6), half the 10-minute budget, so that one short GPU session trains and scores
# it whole (benchmarks/gpu_check.py). The estimate: the `gpu` model takes 0.41x the training FLOPs per image of the
# 78M-parameter self-attention model that ran 540 images/s on an H200, so about 1300 images/s there and 1000 on an
# H100 (0.75x); 750 if it uses the GPU only as well as its activations' size suggests (0.54x). 1800 steps of 128
# images are 230k images: 3.8 minutes at 1000 images/s, 5.1 at 750.
GPU = dict(
    preset="gpu",
    resolution=64,
    synthetic_scenes=6000,
    random_flip=False,  # the built-in scenes are lit from one side; a mirrored one shows a lighting none of them has
    same_colour_repeats=4,  # new_test.json is mostly pairs of one colour, train.json 11%
    prediction_type="v_prediction",
    snr_gamma=5.0,
    train_batch_size=128,
    learning_rate=8e-4,  # between the 78M model's 3e-4 (batch 64) and the CPU model's 2e-3 (batch 32): fewer steps
    lr_warmup_steps=200,
    max_train_steps=1800,
    mixed_precision="bf16",
    dataloader_num_workers=8,
    checkpointing_steps=1000,
    save_images_epochs=5,
)

# Two CPU cores, 32x32, about 25 minutes: the best of the CPU comparisons (docs/experiments.md).
CPU = dict(
    preset="cpu",
    resolution=32,
    synthetic_scenes=5000,
    random_flip=False,
    same_colour_repeats=4,
    prediction_type="v_prediction",
    snr_gamma=5.0,
    train_batch_size=32,
    learning_rate=2e-3,
    lr_warmup_steps=200,
    max_train_steps=3600,
    mixed_precision="no",
    dataloader_num_workers=1,
    checkpointing_steps=1000,
    save_images_epochs=1000,
)

RECIPES = {"gpu": GPU, "cpu": CPU}
DEFAULT_RECIPE = "gpu"  # what `accelerate launch train_conditional_ddpm.py` with no flags trains

# Distilling the CPU recipe's teacher on 2 CPU cores into a 4-step student (distill_conditional_ddpm.py). A step
# costs about twice a training step (two teacher passes, the student's forward and backward, one target pass), so
# 1600 steps of 32 images take about the time of the teacher's 3600.
DISTILL_CPU = dict(
    synthetic_scenes=5000,  # the teacher's own data: `make train` rendered it
    same_colour_repeats=4,
    train_batch_size=32,
    learning_rate=2e-4,
    lr_warmup_steps=100,
    max_train_steps=1600,
    mixed_precision="no",
    dataloader_num_workers=1,
    checkpointing_steps=500,
    save_images_epochs=1000,
    num_ddim_timesteps=50,
    w_min=1.0,  # guidance scales 2 to 4 around the teacher's default 3
    w_max=3.0,
)

DISTILL_RECIPES = {"cpu": DISTILL_CPU}
DEFAULT_DISTILL_RECIPE = "cpu"  # what `accelerate launch distill_conditional_ddpm.py` with no recipe flag runs
