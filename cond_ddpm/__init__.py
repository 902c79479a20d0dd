"""cond-ddpm's library: i-CLEVR data and the synthetic renderer, the ResNet18 evaluator, sampling from a saved
pipeline, the machinery of a training run (`cond_ddpm.training`), Hub publishing, atomic writes, command-line helpers.

The entry points stay at the top level of a checkout (and install as modules of their own): `train_conditional_ddpm`,
`pipeline_cond_ddpm` (also each saved pipeline's remote code, so it imports nothing from here) and `evaluate_iclevr`.
Nothing here imports an entry point but `pipeline_cond_ddpm`.
"""
