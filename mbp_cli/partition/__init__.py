"""Partitioned training with synthetic intermediate labels (experimental): the model cut into
parts that train independently, each towards a random code per class, then composed."""
