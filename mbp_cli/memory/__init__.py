"""Device memory: tracker, one measured step, fit, search, estimate, weighing of strategies."""
