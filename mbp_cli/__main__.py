"""`python -m mbp_cli` runs the command line."""

from mbp_cli.cli import main

main()
