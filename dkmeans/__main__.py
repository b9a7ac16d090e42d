"""`python -m dkmeans` runs the command line."""

from .cli import main

main(prog_name="dkmeans")
