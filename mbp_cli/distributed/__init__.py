"""Several processes on one target batch: the world, the ranks' exchange, the launcher."""
