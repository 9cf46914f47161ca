"""Device memory: the tensor tracker, one measured step, the fit, and the probe built on them."""
