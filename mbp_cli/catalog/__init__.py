"""What a recipe can name out of the box: models, datasets, losses, loggers."""
