"""Tools for the checkout, not shipped with mbp: `make readme` (readme.py)."""
