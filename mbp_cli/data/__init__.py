"""Target batches: a seeded sampler or a stream, cut into micro-batches and rank shares."""
