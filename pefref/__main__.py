"""``python -m pefref`` (and ``torchrun -m pefref``): the command line."""

from pefref.cli.app import app

app()
