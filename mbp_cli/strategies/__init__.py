"""Memory strategies, each plugged into the one micro-step: mixed precision, BatchNorm's running
statistics once per target batch, activation checkpointing and activation offload."""
