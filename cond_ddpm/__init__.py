"""cond-ddpm's helpers: i-CLEVR data and the synthetic renderer, Hub publishing, atomic writes, command-line helpers.

The entry points stay at the top level of a checkout (and install as modules of their own): `train_conditional_ddpm`,
`pipeline_cond_ddpm` (also each saved pipeline's remote code, so it imports nothing from here) and `evaluate_iclevr`.
"""
