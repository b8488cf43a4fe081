"""``python -m rmtp`` (and ``torchrun -m rmtp``) run the CLI."""

from rmtp.cli import main

main()
