"""`python -m apilog`: the same as the `apilog` command."""

from .cli import main

main()
