"""``rocketmq``: a RocketMQ commit log file, read through its record chain.

Layout, as RocketMQ writes it (checked against apache/rocketmq ``store/.../CommitLog.java``,
``store/.../MessageExtEncoder.java`` ``calMsgLength``, ``common/.../message/MessageDecoder.java``,
``MessageVersion.java``, ``sysflag/MessageSysFlag.java``, ``UtilAll.crc32``):

Each file (default 1 GiB, named by its 20-digit starting offset) is created at full size and filled
through mmap. Records follow each other from offset 0; every field is big-endian::

    TOTALSIZE 4 | MAGICCODE 4 | BODYCRC 4 | QUEUEID 4 | FLAG 4 | QUEUEOFFSET 8 | PHYSICALOFFSET 8
    | SYSFLAG 4 | BORNTIMESTAMP 8 | BORNHOST 8 (20 if SYSFLAG & 0x10) | STORETIMESTAMP 8
    | STOREHOST 8 (20 if SYSFLAG & 0x20) | RECONSUMETIMES 4 | PREPAREDTXOFFSET 8
    | BODYLEN 4 | BODY | TOPICLEN 1 (v1) or 2 (v2) | TOPIC | PROPERTIESLEN 2 | PROPERTIES

TOTALSIZE equals the sum of those fields (RocketMQ's own recovery checks it). BODYCRC is
``crc32(body) & 0x7FFFFFFF``. MAGICCODE is 0xDAA320A7 (v1) or 0xDAA320AB (v2, 2-byte topic length,
used for topics longer than 127 bytes). When a message does not fit in what is left of the file
(it needs its length plus 8 bytes), the broker writes an 8-byte BLANK head (TOTALSIZE = the rest of
the file, MAGICCODE 0xCBD43194) and goes on in the next file; the bytes after that head are
whatever the file held. Unwritten space is zeros (a zero TOTALSIZE: nothing written yet).

With ``enabledAppendPropCRC`` the properties end with ``__CRC32#`` 0x01, ten decimal digits (least
significant first) and 0x02: a CRC of the whole record but those 20 bytes. When present it is
checked too.

The broker copies a record into the mapping with one memory copy, so a reader racing it can see
the head before the body: a record counts only when it lies wholly in the file, its lengths add up
to TOTALSIZE, its last byte is written (the copy runs forward; properties and topics never end
with a zero byte) and its BODYCRC (and property CRC, if any) checks. Fields outside the body are
covered by no CRC unless the property CRC is on: a copy that did not run forward could still show
a record with a stale field; the seal's re-read of every local byte then fails it loudly.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

from uploader.formats import Scan

MESSAGE_MAGIC_CODE = 0xDAA320A7  # CommitLog.MESSAGE_MAGIC_CODE = -626843481
MESSAGE_MAGIC_CODE_V2 = 0xDAA320AB  # MessageDecoder.MESSAGE_MAGIC_CODE_V2 = -626843477
BLANK_MAGIC_CODE = 0xCBD43194  # CommitLog.BLANK_MAGIC_CODE = -875286124
END_FILE_MIN_BLANK_LENGTH = 4 + 4  # CommitLog.DefaultAppendMessageCallback
BORNHOST_V6_FLAG = 0x1 << 4  # MessageSysFlag
STOREHOSTADDRESS_V6_FLAG = 0x1 << 5
PROPERTY_CRC32 = b"__CRC32#"  # MessageConst.PROPERTY_CRC32
NAME_VALUE_SEPARATOR = 1  # MessageDecoder
PROPERTY_SEPARATOR = 2
CRC32_RESERVED_LEN = len(PROPERTY_CRC32) + 1 + 10 + 1  # CommitLog.CRC32_RESERVED_LEN

HEAD = 8  # TOTALSIZE + MAGICCODE
SYSFLAG_AT = 4 + 4 + 4 + 4 + 4 + 8 + 8  # offset of SYSFLAG in a record
WINDOW = 1 << 20  # read the file in windows of this size (a bigger record is read whole)


def topic_length_size(magic: int) -> int:
    return 2 if magic == MESSAGE_MAGIC_CODE_V2 else 1


def message_length(
    magic: int, sysflag: int, body_length: int, topic_length: int, properties_length: int
) -> int:
    """A record's TOTALSIZE from its parts (RocketMQ's ``MessageExtEncoder.calMsgLength``)."""
    born = 20 if sysflag & BORNHOST_V6_FLAG else 8
    store = 20 if sysflag & STOREHOSTADDRESS_V6_FLAG else 8
    return (
        SYSFLAG_AT + 4 + 8 + born + 8 + store + 4 + 8
        + 4 + max(body_length, 0)
        + topic_length_size(magic) + topic_length
        + 2 + max(properties_length, 0)
    )  # fmt: skip


MIN_MESSAGE_LENGTH = message_length(MESSAGE_MAGIC_CODE, 0, 0, 0, 0)  # 91 bytes


def body_crc(body: bytes) -> int:
    """RocketMQ's ``UtilAll.crc32``: CRC-32 (java.util.zip.CRC32, = zlib) with the top bit cleared."""
    return zlib.crc32(body) & 0x7FFFFFFF


def property_crc_digits(crc: int) -> bytes:
    """The ten digits ``MessageDecoder.createCrc32`` writes: least significant first."""
    out = bytearray()
    for _ in range(10):
        out.append(ord("0") + crc % 10)
        crc //= 10
    return bytes(out)


KNOWN_MAGIC_CODES = (MESSAGE_MAGIC_CODE, MESSAGE_MAGIC_CODE_V2, BLANK_MAGIC_CODE)


def _partial_magic(magic: int) -> bool:
    """Zero, or the first bytes of a known MAGICCODE with the rest still zeros."""
    return any(
        magic == code & mask
        for code in KNOWN_MAGIC_CODES
        for mask in (0x00000000, 0xFF000000, 0xFFFF0000, 0xFFFFFF00)
    )


class _Reader:
    """Reads a file forward in windows, keeping only the current one."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.base = 0
        self.buf = b""

    def get(self, pos: int, n: int) -> bytes:
        """``n`` bytes at ``pos`` (fewer only at the end of the file)."""
        if pos < self.base or pos + n > self.base + len(self.buf):
            self.base = pos
            self.buf = os.pread(self.fd, max(n, min(WINDOW, self.size - pos)), pos)
        off = pos - self.base
        return self.buf[off : off + n]


@dataclass(frozen=True)
class _Check:
    ok: bool
    why: str = ""


def check_message(record: bytes) -> _Check:
    """Is this whole message record (TOTALSIZE bytes) consistent and its CRCs right?"""
    total, magic, crc, sysflag = (
        *struct.unpack_from(">iII", record, 0),
        struct.unpack_from(">i", record, SYSFLAG_AT)[0],
    )
    pos = SYSFLAG_AT + 4 + 8
    pos += 20 if sysflag & BORNHOST_V6_FLAG else 8
    pos += 8
    pos += 20 if sysflag & STOREHOSTADDRESS_V6_FLAG else 8
    pos += 4 + 8
    (body_length,) = struct.unpack_from(">i", record, pos)
    pos += 4
    if body_length < 0 or pos + body_length > total:
        return _Check(False, f"BODYLEN {body_length} does not fit in TOTALSIZE {total}")
    body = record[pos : pos + body_length]
    pos += body_length
    size = topic_length_size(magic)
    if pos + size > total:
        return _Check(False, "no room for the topic length")
    # Java reads these lengths signed (get()/getShort()).
    topic_length = struct.unpack_from(">b" if size == 1 else ">h", record, pos)[0]
    pos += size + max(topic_length, 0)
    if pos + 2 > total:
        return _Check(False, f"TOPICLEN {topic_length} does not fit in TOTALSIZE {total}")
    (properties_length,) = struct.unpack_from(">h", record, pos)
    expect = message_length(magic, sysflag, body_length, topic_length, properties_length)
    if topic_length < 0 or properties_length < 0 or expect != total:
        return _Check(
            False,
            f"lengths add up to {expect}, not TOTALSIZE {total} (BODYLEN {body_length}, "
            f"TOPICLEN {topic_length}, PROPERTIESLEN {properties_length})",
        )
    # BODYCRC covers only the body. The broker's copy runs forward, so the record's last byte is
    # the last to appear: it must be written. The properties (name 0x01 value 0x02 ...) and the
    # topic never end with a zero byte; without properties the record ends with the topic.
    last = total - 1 if properties_length > 0 else pos - 1
    if (properties_length > 0 or topic_length > 0) and record[last] == 0:
        return _Check(False, "its last byte is not written")
    if body_crc(body) != crc:
        return _Check(False, f"BODYCRC {crc:#x} does not match the body ({body_crc(body):#x})")
    tail = record[total - CRC32_RESERVED_LEN :]
    if (
        properties_length >= CRC32_RESERVED_LEN
        and tail.startswith(PROPERTY_CRC32 + bytes([NAME_VALUE_SEPARATOR]))
        and tail[-1] == PROPERTY_SEPARATOR
    ):
        whole = zlib.crc32(record[: total - CRC32_RESERVED_LEN]) & 0x7FFFFFFF
        if tail[len(PROPERTY_CRC32) + 1 : -1] != property_crc_digits(whole):
            return _Check(False, "the __CRC32# property does not match the record")
    return _Check(True)


class RocketMQFormat:
    """The record chain of a RocketMQ commit log file (see the module's docstring)."""

    name = "rocketmq"
    preallocated = True

    def begun(self, path: str) -> bool:
        """The first record's head is written (the broker preallocates files ahead of use)."""
        with open(path, "rb") as f:
            return f.read(HEAD).strip(b"\0") != b""

    def scan(self, path: str, start: int, *, rolled: bool) -> Scan:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            return self._walk(_Reader(fd, size), size, start, rolled=rolled)
        finally:
            os.close(fd)

    def _walk(self, reader: _Reader, size: int, start: int, *, rolled: bool) -> Scan:
        pos = start

        def waiting(why: str) -> Scan:
            """Not (yet) complete at ``pos``: wait, unless the writer moved on."""
            if rolled:
                return Scan(pos, False, f"record at offset {pos} {why}, and a later file has begun")
            return Scan(pos, False)

        def corrupt(why: str) -> Scan:
            return Scan(pos, False, f"corrupt record chain at offset {pos}: {why}")

        while True:
            if pos == size:  # exact fill: no room for anything more
                return Scan(pos, True)
            if size - pos < HEAD:
                return corrupt(f"{size - pos} bytes left, fewer than a record head")
            total, magic = struct.unpack(">iI", reader.get(pos, HEAD))
            if total == 0 and magic == 0:
                return waiting("is not written")
            if total == 0 or _partial_magic(magic):  # a head caught half-written
                return waiting(f"has a half-written head (TOTALSIZE {total}, MAGICCODE {magic:#x})")
            if magic == BLANK_MAGIC_CODE:
                if total != size - pos:
                    return corrupt(f"BLANK of {total} bytes does not end at the file's end {size}")
                return Scan(size, True)
            if magic in (MESSAGE_MAGIC_CODE, MESSAGE_MAGIC_CODE_V2):
                if total < MIN_MESSAGE_LENGTH:
                    return corrupt(f"TOTALSIZE {total} is less than a message's minimum")
                if total > size - pos:
                    return corrupt(f"TOTALSIZE {total} goes past the file's end {size}")
                check = check_message(reader.get(pos, total))
                if not check.ok:
                    return waiting(f"is incomplete or damaged ({check.why})")
                pos += total
                continue
            return corrupt(f"unknown MAGICCODE {magic:#010x}")


# --- writing (the demo's broker and the tests' producer) ------------------------------------------


def encode_message(
    body: bytes,
    *,
    topic: bytes = b"TopicTest",
    properties: bytes = b"",
    queue_id: int = 0,
    queue_offset: int = 0,
    physical_offset: int = 0,
    v2: bool = False,
    born_v6: bool = False,
    store_v6: bool = False,
    property_crc: bool = False,
    timestamp: int = 1_700_000_000_000,
) -> bytes:
    """One message record, every field big-endian, BODYCRC = crc32(body) & 0x7FFFFFFF."""
    magic = MESSAGE_MAGIC_CODE_V2 if v2 else MESSAGE_MAGIC_CODE
    sysflag = (BORNHOST_V6_FLAG if born_v6 else 0) | (STOREHOSTADDRESS_V6_FLAG if store_v6 else 0)
    props = properties
    if property_crc:
        if props and props[-1] != PROPERTY_SEPARATOR:
            props += bytes([PROPERTY_SEPARATOR])
        props += b"\0" * CRC32_RESERVED_LEN  # filled below, once the rest is known
    total = message_length(magic, sysflag, len(body), len(topic), len(props))
    host = (b"\0" * 15 + b"\1") if born_v6 else b"\x7f\0\0\1"
    store_host = (b"\0" * 15 + b"\1") if store_v6 else b"\x7f\0\0\1"
    out = bytearray()
    out += struct.pack(">iIIiiqqiq", total, magic, body_crc(body), queue_id, 0, queue_offset,
                       physical_offset, sysflag, timestamp)  # fmt: skip
    out += host + struct.pack(">i", 10911)
    out += struct.pack(">q", timestamp + 1)
    out += store_host + struct.pack(">i", 10911)
    out += struct.pack(">iqi", 0, 0, len(body)) + body
    out += struct.pack(">h" if v2 else ">b", len(topic)) + topic
    out += struct.pack(">h", len(props)) + props
    if property_crc:
        crc = body_crc(bytes(out[: total - CRC32_RESERVED_LEN]))
        out[total - CRC32_RESERVED_LEN :] = (
            PROPERTY_CRC32 + bytes([NAME_VALUE_SEPARATOR]) + property_crc_digits(crc)
            + bytes([PROPERTY_SEPARATOR])
        )  # fmt: skip
    assert len(out) == total
    return bytes(out)


def blank_head(remaining: int) -> bytes:
    """The 8 bytes ``doAppend`` writes when a message does not fit: TOTALSIZE = the rest."""
    return struct.pack(">iI", remaining, BLANK_MAGIC_CODE)
