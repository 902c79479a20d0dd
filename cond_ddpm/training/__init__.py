"""The machinery of a training run, for any training script to reuse: the objective, checkpoints that resume exactly,
stopping at a step boundary, launch guards and the EMA copy."""
