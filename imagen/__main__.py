"""`python -m imagen` is the `imagen` command."""

from imagen.cli import main

main()
