"""How the valid end of a segment file is found: one small interface, one module per format.

A writer that appends (``append``) makes the file size the valid end. A writer that preallocates its
files and fills them in place (RocketMQ's commit log, PostgreSQL WAL) does not: the file size says
nothing, and only the format's own structure says how far the bytes are final. A :class:`Format`
answers, for one file: from a known boundary ``start``, how far are the bytes final, and is the file
complete (seal it at ``valid_end``)?

To add a format (Kafka's log segments, WAL), write a class with the three members of
:class:`Format` in a module beside ``rocketmq.py`` and add it to :data:`FORMATS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from uploader.errors import UsageError


@dataclass(frozen=True)
class Scan:
    """What a format found in one file.

    ``valid_end``: bytes ``[0, valid_end)`` are final; committing up to it is safe, never past it.
    For a chain format it is a record boundary, so it may be passed back as the next ``start``.
    ``complete``: the file will not change any more: seal it at ``valid_end``.
    ``problem``: the file cannot be read past ``valid_end`` and waiting will not help (a corrupt
    chain, or a chain that stopped although the writer moved on to a later file). Nothing past
    ``valid_end`` is ever committed; a human has to look. ``None`` when all is well.
    """

    valid_end: int
    complete: bool
    problem: str | None = None


class Format(Protocol):
    """A file format's answer to "where is the valid end, and is the file complete?"."""

    #: The ``--format`` name.
    name: str
    #: Files are created at their final size and filled in place: the size says nothing about
    #: what is written, so a size limit (``--segment-size``) means nothing for them.
    preallocated: bool

    def begun(self, path: str) -> bool:
        """Has the writer started writing this file? A later file that has begun means every
        earlier file *rolled* (the writer is done with it). RocketMQ creates the next file (and
        preallocates the one after) before writing it, so "exists" is not "begun" there."""
        ...

    def scan(self, path: str, start: int, *, rolled: bool) -> Scan:
        """Read ``path`` from ``start`` (0, or a ``valid_end`` this format returned for this file)
        and say how far it is valid. ``rolled``: the writer has moved on to a later file, so what is
        incomplete now stays incomplete (a ``problem``). Reads only what it needs."""
        ...


def formats() -> dict[str, Format]:
    """The formats by ``--format`` name."""
    from uploader.formats.append import AppendFormat
    from uploader.formats.rocketmq import RocketMQFormat
    from uploader.formats.whole import WholeFormat

    return {f.name: f for f in (AppendFormat(), RocketMQFormat(), WholeFormat())}


FORMAT_NAMES = ("append", "rocketmq", "whole")


def get_format(name: str) -> Format:
    """The format called ``name``; an unknown name is a :class:`UsageError` listing the known."""
    known = formats()
    try:
        return known[name]
    except KeyError:
        raise UsageError(
            f"unknown segment format {name!r}; known formats: {', '.join(sorted(known))}"
        ) from None


__all__ = ["FORMAT_NAMES", "Format", "Scan", "formats", "get_format"]
