"""Who holds a lease: the columns naming the holder process, and the same-node check that a
holder is gone (its lease may then be taken over at once instead of after it expires)."""

from __future__ import annotations

import logging
from typing import Any

from uploader import holders
from uploader.manifest.rowmap import SEGMENTS

log = logging.getLogger("uploader")

#: What a takeover looks at: the lease and its holder process.
HOLDER_COLUMNS = (
    SEGMENTS.c.id,
    SEGMENTS.c.key,
    SEGMENTS.c.fence,
    SEGMENTS.c.lease_owner,
    SEGMENTS.c.lease_node,
    SEGMENTS.c.lease_pid,
    SEGMENTS.c.lease_started,
    SEGMENTS.c.lease_pid_space,
)


def holder_values(node: str | None) -> dict[str, Any]:
    """The columns naming this process as a lease's holder on ``node`` (NULL when the caller
    names no node, or the process cannot be identified: then only expiry frees the lease)."""
    me = holders.this_process() if node is not None else None
    return {
        "lease_node": None if me is None else node,
        "lease_pid": None if me is None else me.pid,
        "lease_started": None if me is None else me.started,
        "lease_pid_space": None if me is None else me.space,
    }


#: The columns :func:`holder_values` fills.
HOLDER_VALUE_NAMES = tuple(holder_values(None))


def holder_gone(row: Any, node: str) -> bool:
    """Is the live lease of ``row`` held by a process on ``node`` that is certainly gone?"""
    return row.lease_node == node and holders.gone(
        row.lease_pid, row.lease_started, row.lease_pid_space
    )


def log_takeover(key: str, held: Any, owner: str) -> None:
    log.info(
        "segment %r: its lease holder %s (pid %s on %s) is gone; %s takes the lease over now "
        "instead of waiting for it to expire",
        key,
        held.lease_owner,
        held.lease_pid,
        held.lease_node,
        owner,
    )
