"""`python -m drift ...`: see drift/cli.py."""

from drift.cli import app

app(prog_name="python -m drift")
