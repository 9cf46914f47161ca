"""What the commands do besides training, and what they print."""
