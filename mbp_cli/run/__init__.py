"""A training run: its start, its loop, the target-batch step, checkpoints and its folder."""
