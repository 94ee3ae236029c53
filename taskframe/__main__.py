"""`python -m taskframe`: the same as the `taskframe` command."""

from taskframe.cli import main

main()
