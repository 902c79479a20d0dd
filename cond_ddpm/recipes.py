"""The shipped training recipes: each one a named set of the training script's flags, kept here and nowhere else.

`train_conditional_ddpm.py` takes the `gpu` recipe's values as its defaults and `--recipe cpu` for the other; a flag
given on the command line overrides the recipe's value. `benchmarks/quality.py --recipe NAME` trains and scores the
same recipe. What was tried against them and lost is in docs/experiments.md.
"""

# One GPU (an H100 or H200), 64x64, about 10 minutes: the CPU recipe's winners on a larger UNet at full resolution.
GPU = dict(
    preset="gpu",
    resolution=64,
    synthetic_scenes=6000,
    random_flip=False,  # the built-in scenes are lit from one side; a mirrored one shows a lighting none of them has
    same_colour_repeats=4,  # new_test.json is mostly pairs of one colour, train.json 11%
    prediction_type="v_prediction",
    snr_gamma=5.0,
    train_batch_size=128,
    learning_rate=5e-4,
    lr_warmup_steps=500,
    max_train_steps=4000,
    mixed_precision="bf16",
    dataloader_num_workers=8,
    checkpointing_steps=1000,
    save_images_epochs=10,
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
