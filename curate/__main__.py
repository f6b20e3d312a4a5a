"""`python -m curate` runs the CLI (handy where the console script is not on PATH)."""

from curate.cli import main

main()
