"""Who holds a lease, as a process: enough to tell, on the same node, that the holder is gone.

A lease records the holder's node, pid and the process's start time (``/proc/<pid>/stat`` field
22, clock ticks after boot), plus the *pid space* in which that pid means something: the boot id
and the pid namespace. A worker on the same node in the same pid space can then see that the
holder process is gone (no such pid, a zombie, or the pid reused by a process started at another
time) and take the lease at once instead of waiting for it to expire.

Only a definite answer counts: in another pid space (another boot, another container sharing the
node name) or without ``/proc`` the holder is presumed alive and the lease runs out as usual.
Taking a live holder's lease would still be safe (the fence refuses its writes) but would make two
workers fight; waiting out a dead one's lease only costs time.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

_PROC = "/proc"


@dataclass(frozen=True, slots=True)
class Holder:
    """A process as a lease records it."""

    pid: int
    started: int  # clock ticks after boot
    space: str  # boot id and pid namespace: where ``pid`` names this process


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of ``pid``, or None if there is no such process."""
    try:
        with open(f"{_PROC}/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 2 (the command) is in parentheses and may hold spaces and parentheses itself: the
    # fields after it start after the *last* ')'. There field 3 is index 0, field 22 index 19.
    rest = raw[raw.rindex(")") + 2 :].split()
    return rest[0], int(rest[19])


@functools.cache
def _space() -> str | None:
    try:
        with open(f"{_PROC}/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        ns = os.readlink(f"{_PROC}/self/ns/pid")  # 'pid:[4026531836]'
    except OSError:
        return None
    return f"{boot}/{ns}"


_ME: dict[int, Holder | None] = {}


def this_process() -> Holder | None:
    """This process as a lease records it; None where ``/proc`` cannot say (not Linux)."""
    pid = os.getpid()  # a forked child is another process: looked up again
    if pid not in _ME:
        space = _space()
        stat = None if space is None else _stat(pid)
        _ME[pid] = None if space is None or stat is None else Holder(pid, stat[1], space)
    return _ME[pid]


def gone(pid: int | None, started: int | None, space: str | None) -> bool:
    """True only when the recorded holder is certainly not running: same pid space as this
    process, and no process with that pid, a zombie, or one started at another time."""
    me = this_process()
    if me is None or pid is None or started is None or space != me.space:
        return False
    try:
        stat = _stat(pid)
    except (OSError, ValueError, IndexError):  # unreadable: cannot say, presume alive
        return False
    if stat is None:
        return True
    state, start = stat
    return state in ("Z", "X") or start != started
