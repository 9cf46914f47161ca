"""The recipe: YAML into frozen dataclasses, names to builders, every problem at once."""
