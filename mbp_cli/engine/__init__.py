"""A recipe built for a device: model, loss, data, strategies, and the micro-step."""
