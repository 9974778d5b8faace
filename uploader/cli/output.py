"""Where the CLI writes: the stdout and stderr consoles, progress bars (stderr, only on a
terminal), lines said beside a live bar, and ``--json`` documents.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TransferSpeedColumn,
)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _progress(*, transfer: bool = False) -> Progress:
    """A progress bar on stderr when it is a terminal; nothing otherwise."""
    columns = [TextColumn("{task.description}"), BarColumn()]
    columns += [DownloadColumn(), TransferSpeedColumn()] if transfer else [MofNCompleteColumn()]
    return Progress(*columns, console=err, transient=True, disable=not err.is_terminal)


def _say(progress: Progress, text: str) -> None:
    """A line of output while a bar may be live: above the bar (through its console) when the
    bar and stdout share a terminal, where a plain stdout write would be glued onto the bar;
    on stdout otherwise."""
    if progress.live.is_started and not progress.disable and out.is_terminal:
        progress.console.print(text, markup=False)
    else:
        out.print(text, markup=False)


def _emit_json(data: object) -> None:
    out.print_json(json.dumps(data, default=str))


# Options several commands share, declared once (typer reads them from the annotations).
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output")]
MetricsPortOption = Annotated[
    int | None,
    typer.Option(
        metavar="PORT", min=0, max=65535, help="Serve Prometheus metrics (0: any free port)"
    ),
]
