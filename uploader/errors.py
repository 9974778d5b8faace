"""One exception hierarchy for the library, the CLI and the recovery job.

Every error names what it is about (key, file, state) and, where there is one, what to do.
``exit_code`` is what the CLI returns for it: 2 for bad usage or bad input (the caller must change
something), 1 for anything that failed or stays unverified. ``retryable`` is the one way every error
says whether trying the same thing again later may succeed (a remote's throttling, a file that is
unreadable right now); it is False unless the error knows otherwise.

The branches say when an error can happen: :class:`UsageError` only before anything was recorded
or sent; :class:`LocalFileError` and :class:`StateError` also in the middle of a seal or a
recovery pass, where the manifest holds what was done up to that point.
"""

from __future__ import annotations


class UploaderError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code: int = 1
    retryable: bool = False


# --- bad input: refused before anything is recorded or sent ------------------------------------


class UsageError(UploaderError):
    """The caller asked for something that cannot be done; nothing was recorded or sent."""

    exit_code = 2


class InvalidKeyError(UsageError):
    """A segment key that would escape the remote root or is not a valid object name."""


class KeyConflictError(UsageError):
    """The same key is already registered for another local path."""


class SegmentSealedError(UsageError):
    """A commit or seal was asked of a segment that is already sealed."""


class StoreClosedError(UsageError):
    """The store was closed; open a new one."""


class InvalidRangeError(UsageError):
    """A commit byte range that is negative, overlaps another, or leaves a gap."""


# --- local files: before anything is recorded, or mid-seal and mid-recovery ---------------------


class LocalFileError(UploaderError):
    """The local file is missing, unreadable, shorter than what was committed, or changed.

    ``retryable`` is False when the bytes are provably gone or changed (the segment can never be
    verified from them) and True when they are only unreadable right now (EACCES, EMFILE, a volume
    not yet mounted: try again later). Exit code 2: the operator has to look at the file.
    """

    exit_code = 2

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


# --- states: an unknown state name, or a transition the state machine does not allow ------------


class StateError(UploaderError):
    """A state or transition problem; may be raised mid-seal or mid-recovery."""

    exit_code = 2


class InvalidStateError(StateError):
    """An unknown state name or a transition the state machine does not allow."""


# --- manifest -----------------------------------------------------------------------------------


class ManifestError(UploaderError):
    """The manifest database cannot be used as asked."""


class ManifestUnreachableError(ManifestError):
    """The manifest URL cannot be connected to (the URL in the message has no password)."""


class SchemaBehindError(ManifestError):
    """The manifest schema is older than this code; run ``uploader db upgrade``."""


class SchemaAheadError(ManifestError):
    """The manifest schema is newer than this code; upgrade segment-uploader."""


class StaleStateError(ManifestError):
    """A compare-and-set transition found the row in another state: someone else moved it."""

    def __init__(self, key: str, expected: str, actual: str | None, what: str = "segment") -> None:
        self.key = key
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"{what} {key!r}: expected state {expected!r} but found {actual!r}; "
            "another worker moved it, nothing was overwritten"
        )


class LeaseLostError(ManifestError):
    """Our fence token is no longer the segment's: another worker took it over."""

    def __init__(self, key: str, token: int, current: int | None) -> None:
        self.key = key
        self.token = token
        self.current = current
        super().__init__(
            f"segment {key!r}: lease lost (our fence {token}, current {current}); "
            "another worker owns it now, this write was refused"
        )


class SegmentBusyError(ManifestError):
    """The segment is leased by another live worker."""


# --- storage ------------------------------------------------------------------------------------


class StorageError(UploaderError):
    """A remote call failed. ``retryable`` says whether trying again may succeed."""

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class RetryableStorageError(StorageError):
    """Throttling, 5xx, timeouts, connection resets: worth another try."""

    retryable = True


class StorageTimeoutError(RetryableStorageError):
    """A request did not answer within its deadline and was cancelled."""


class NoSuchBucketError(StorageError):
    """The bucket (or root directory) does not exist."""


class AccessDeniedError(StorageError):
    """Credentials were refused."""


class NoSuchUploadError(StorageError):
    """The remote does not know this upload id (never started, aborted or completed)."""


class UnsupportedOperationError(StorageError):
    """The remote does not implement an operation (HTTP 405 or 501): asking again cannot help.

    ``op`` names the S3 operation (``ListParts``, ``ListMultipartUploads``, ...). Never retried;
    the caller takes another way where there is one (a fresh upload instead of listing parts) or
    says which capability is missing.
    """

    retryable = False

    def __init__(self, message: str, *, op: str) -> None:
        super().__init__(message, retryable=False)
        self.op = op


class ObjectExistsError(StorageError):
    """A conditional write found an object already at the key."""


class ObjectChangedError(RetryableStorageError):
    """The object at a key changed while it was read back (another ETag, size or checksum after
    the reads than before): the bytes read may belong to two objects, and prove neither. Nothing
    is concluded from them; the next attempt looks at the key again."""


class PreconditionFailedError(StorageError):
    """A conditional call (delete if the ETag matches) found another object at the key.

    Not retryable: the object at the key is not the one named, and trying again will not make it
    so. Nothing was removed.
    """

    retryable = False

    def __init__(
        self, key: str, etag: str, found: str | None = None, *, where: str = "", detail: str = ""
    ) -> None:
        self.key = key
        self.etag = etag
        self.found = found
        seen = f"the object there has ETag {found}" if found else "the object there differs"
        super().__init__(
            f"{where or 'conditional delete'} of {key!r}: asked for ETag {etag} but {seen}; "
            f"nothing was removed{detail}",
            retryable=False,
        )


class PartRuleError(StorageError):
    """A part breaks the multipart rules (size, count, order); checked before the remote call, and
    never worth retrying as it is."""

    retryable = False


# --- verification -------------------------------------------------------------------------------


class VerificationError(UploaderError):
    """The remote object does not match the checksums of the local bytes."""


class WorkInterruptedError(UploaderError):
    """Work stopped on request (SIGINT): parts in flight finished and were recorded; nothing new
    was started. What is left stays ``pending`` for ``uploader recover``."""

    exit_code = 130


class CorruptObjectError(VerificationError):
    """Bytes read back from the remote differ from what the manifest recorded for them."""

    def __init__(self, key: str, part: int, start: int, end: int, detail: str = "") -> None:
        self.key = key
        self.part = part
        self.start = start
        self.end = end
        super().__init__(
            f"object {key!r}: part {part}, bytes [{start}, {end}), differs from the manifest"
            f"{': ' + detail if detail else ''}; the remote copy is damaged (the local file, if "
            "it still exists, or another replica is needed)"
        )


class UnverifiedObjectError(VerificationError):
    """A read of an object the manifest does not record as ``verified`` was refused."""


class SegmentFailedError(UploaderError):
    """The segment is in the terminal ``failed`` state; the reason says why."""
