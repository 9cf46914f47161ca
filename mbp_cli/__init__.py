"""mbp: exact micro-batched training of PyTorch models at large target batches."""

__version__ = "0.1.0"
