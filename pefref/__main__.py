"""``python -m pefref`` (and ``torchrun -m pefref``): the command line."""

from pefref.cli.entry import main

main()
