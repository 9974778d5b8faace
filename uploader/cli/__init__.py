"""The ``uploader`` command line.

Exit codes: 0 everything asked for is done (and verified); 1 something failed or stays
unverified; 2 bad usage or bad input (nothing was recorded or sent). Errors are one line naming
what and what to do; ``--debug`` adds the traceback. Storage options are never printed.

The modules: ``app`` (the typer app, global options, ``main()``), ``output`` (consoles, progress
bars, JSON), ``signals`` (early handlers, stop events), and the commands: ``ship``, ``daemons``
(``watch``, ``recover``, ``verify``), ``upkeep`` (``status``, ``retry``, ``sweep``), ``readback``
(``get``, ``restore``, ``rebuild``, ``demo``) and ``db``.
"""

from __future__ import annotations

import os
import sys

from uploader.cli.signals import _EARLY_SIGNALS, _early_handler, install_early_handlers

# The signal handlers come before the slow imports (typer, SQLAlchemy, fsspec) below: a SIGTERM
# sent while the command starts is honoured by its own handler. ``python -m uploader.cli``
# imports this package while ``sys.argv[0]`` is still "-m"; the console script is "uploader".
if sys.argv[0] == "-m" or os.path.basename(sys.argv[0]) == "uploader":
    install_early_handlers()

from uploader.cli.app import Context, app, ctx_store, is_embedded_default, main, require_manifest
from uploader.cli.daemons import recover, verify, watch
from uploader.cli.db import db_app
from uploader.cli.output import err, out
from uploader.cli.readback import demo, get, rebuild, restore
from uploader.cli.ship import ship
from uploader.cli.upkeep import print_status, retry, status, sweep

# Registered here, in the order `uploader --help` lists them.
for _command in (ship, watch, recover, retry, status, verify, sweep, demo, get, restore, rebuild):
    app.command()(_command)
app.add_typer(db_app, name="db")

__all__ = [
    "_EARLY_SIGNALS",
    "Context",
    "_early_handler",
    "app",
    "ctx_store",
    "db_app",
    "err",
    "install_early_handlers",
    "is_embedded_default",
    "main",
    "out",
    "print_status",
    "require_manifest",
]
