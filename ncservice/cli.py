"""``ncservice``: the command line of the NC service (typer)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Neural Collapse service: measure features, run the service, submit sweeps.",
                  no_args_is_help=True, add_completion=False)
