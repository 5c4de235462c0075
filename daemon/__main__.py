"""`python -m apilogd`: the same as the `apilogd` command."""

from .cli import main

main()
