"""The request layer of :class:`uploader.storage.s3.S3Storage`: one raw S3 request, bounded.

:class:`S3Requests` holds the configuration (bucket, prefix, the s3fs filesystem, the checksum
mode and what was learned about CRC32C) and makes each request through s3fs's ``_call_s3``,
mapping its errors to ours (:mod:`uploader.storage.errors_map`).

Servers name an unknown (aborted or completed) upload id differently; on a call that names an
upload id each of these means "the upload is unknown" (:class:`NoSuchUploadError`):

* ``NoSuchUpload`` (AWS, moto);
* ``404 NoSuchKey`` (Ceph RGW's ListParts: its upload is an object the server no longer finds);
* a 5xx that ``ListMultipartUploads`` confirms: the id is not listed (Ceph RGW answers Complete of
  an aborted upload with ``500 InternalError`` "This multipart completion is already in
  progress"). A 5xx for an id that is still listed, or from a remote that cannot list uploads,
  stays a server error.

Ceph RGW also answers Complete with an empty ETag (the HEAD that follows every complete is what we
record) and ignores ``If-None-Match`` on Complete (the probe finds it: hence the HEAD before it
there) but honours it on PUT.

Retries and deadlines. :mod:`uploader.storage.retry` alone decides about retries: s3fs's own
retries are off (``retries = 1``) and so are botocore's (``total_max_attempts = 1``, whatever a
user's ``config_kwargs["retries"]`` says about counts; its ``mode`` is kept), so one call with the
endpoint down is exactly one connection attempt per retry-layer attempt. Every request runs as a
coroutine on s3fs's event loop under ``asyncio.timeout(request_timeout)``: at the deadline the
request is cancelled *and the cancellation awaited* (the connection is closed) before
:class:`StorageTimeoutError` reaches the retry layer, so no attempt it gave up on is still being
sent when it retries. (A request whose bytes all reached the server before the cut may still be
applied there: that is why parts are idempotent by number and completes, PUTs and deletes are
conditional.)
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import Any, NoReturn, TypeVar

import s3fs
from fsspec.asyn import sync

from uploader.errors import (
    NoSuchUploadError,
    StorageError,
    StorageTimeoutError,
    UnsupportedOperationError,
    UsageError,
)
from uploader.keys import check_full_length
from uploader.storage.base import MIN_PART_SIZE, UploadRef
from uploader.storage.errors_map import client_error_code, is_unsupported, translate

T = TypeVar("T")

#: Where the conditional-delete probe puts its object (the hidden prefix no key can reach).
PROBE_PREFIX = ".uploader/probe"
#: The object whose reported CRC32C records that the remote keeps CRC32C checksums.
CRC32C_PROBE = f"{PROBE_PREFIX}/crc32c"
#: The hidden prefix (no key can reach it): probes, record sidecars.
HIDDEN_PREFIX = ".uploader/"
#: The ``checksum`` storage option: what proves the bytes a part or a PUT carries to the remote.
CHECKSUM_MODES = ("auto", "crc32c", "md5")
#: What a remote answers a Complete that names part checksums it does not hold (Ceph RGW 16:
#: InvalidPart; an upload started without CRC32C declared: InvalidRequest/InvalidArgument).
CHECKSUM_REFUSED_CODES = frozenset({"InvalidPart", "InvalidRequest", "InvalidArgument"})
#: Error codes that, on a call naming an upload id (the bucket exists: that is NoSuchBucket), mean
#: the upload is unknown. Ceph RGW's ListParts says NoSuchKey: without it, recovery would retry
#: ListParts of a lost upload forever instead of starting a fresh one.
UNKNOWN_UPLOAD_CODES = frozenset({"NoSuchUpload", "NoSuchKey"})

_session_lock = threading.Lock()
_shared_session: Any = None

#: Bodies smaller than this are sent without ``Expect: 100-continue``, which botocore adds to
#: every file-like body. The handshake costs a round trip, a server write and a wake-up of the
#: event loop per request, and saves only the sending of a body the server refuses (a failed
#: ``If-None-Match``, a lost upload): for a small segment's PUT, 6% of the wall time on Ceph RGW
#: (measured). The AWS SDKs draw such a line too (JavaScript v2: 1 MB; Go v2 and Kotlin: 2 MB,
#: ``ContinueHeaderThresholdBytes``). Ours is lower: a server that answers a refused conditional
#: PUT before reading its body and resets the connection turned 1-4 in 10 refusals of 1-2 MiB
#: bodies into connection errors, none of 512 KiB (a review's toy server); parts keep the header.
CONTINUE_THRESHOLD = 512 * 1024


def _continue_only_for_large_bodies(params: dict[str, Any], **_: Any) -> None:
    """botocore's ``before-call`` handler: drop the ``Expect`` botocore set on a small body."""
    headers = params.get("headers")
    if not headers or headers.get("Expect") != "100-continue":
        return
    from botocore.utils import determine_content_length

    size = determine_content_length(params.get("body"))
    if size is not None and size < CONTINUE_THRESHOLD:
        del headers["Expect"]


def _session() -> Any:
    """One aiobotocore session for the process's S3 storages: a session parses botocore's S3
    model and endpoint data (~0.25 s of CPU, ~10 MiB) once, for every client it makes. Clients
    stay one per storage, each with its own credentials and options; only that data is shared.
    s3fs makes its clients on fsspec's one event-loop thread, where the session is used. Its
    clients send small bodies without ``Expect: 100-continue`` (:data:`CONTINUE_THRESHOLD`); a
    user's own session or profile is left as botocore makes it."""
    global _shared_session
    with _session_lock:
        if _shared_session is None:
            from aiobotocore.session import get_session

            session = get_session()
            # After botocore's own handler (registered with the session), in every client made.
            session.register("before-call.s3", _continue_only_for_large_bodies)
            _shared_session = session
        return _shared_session


def user_agent() -> str:
    """The User-Agent our S3 requests carry: us, then the stack that sends them (aiobotocore's
    session adds ``botocore/<version>`` after it, and a ``user_agent_extra`` after that)."""
    import platform

    import aiobotocore

    from uploader import __version__

    return (
        f"segment-uploader/{__version__} aiobotocore/{aiobotocore.__version__} "
        f"Python/{platform.python_version()}"
    )


def _client_error(exc: BaseException) -> BaseException:
    """s3fs turns botocore's ClientError into OSError subclasses; the code is on the cause."""
    if getattr(exc, "response", None) is None and getattr(exc.__cause__, "response", None):
        assert exc.__cause__ is not None
        return exc.__cause__
    return exc


def _b64md5(md5_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(md5_hex)).decode("ascii")


class _PartBody(io.BytesIO):
    """A part's bytes as a file-like body, sharing them instead of copying them.

    botocore turns a ``bytes`` Body into ``io.BytesIO`` (which shares the bytes), then aiohttp
    sizes that with ``getbuffer()``, which makes the BytesIO copy them: a second copy of every
    in-flight part. Here ``getbuffer()`` is a read-only view of the same bytes.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self._data = data

    def getbuffer(self) -> memoryview:
        return memoryview(self._data)


class S3Requests:
    """A bucket and prefix on S3 and the raw requests to it (the base of ``S3Storage``)."""

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        min_part_size: int = MIN_PART_SIZE,
        request_timeout: float | None = None,
    ) -> None:
        """``request_timeout``: seconds each request may take before it is cancelled (None: no
        deadline but the client's connect and read timeouts).

        ``storage_options["checksum"]`` (ours, not passed to s3fs): ``"auto"`` (default) declares
        CRC32C and keeps it where the remote answers with it, else MD5 alone; ``"crc32c"``
        requires it (a remote that ignores it is an error); ``"md5"`` never sends it."""
        scheme, _, rest = url.partition("://")
        if scheme not in ("s3", "s3a") or not rest or rest.startswith("/"):
            raise UsageError(f"{url!r} is not an S3 URL; use s3://bucket/prefix")
        if "@" in rest.split("/", 1)[0]:
            raise UsageError(
                "put S3 credentials in storage options (key, secret), not in the remote URL"
            )
        bucket, _, prefix = rest.partition("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._min_part_size = min_part_size
        options = dict(storage_options or {})
        mode = str(options.pop("checksum", None) or "auto").lower()
        if mode not in CHECKSUM_MODES:
            raise UsageError(
                f"storage option checksum={mode!r} is not one of {', '.join(CHECKSUM_MODES)}"
            )
        self.checksum_mode = mode
        #: Whether the remote keeps CRC32C checksums: None until it answered a request that
        #: declared it (auto), then what it answered. Learned once per instance.
        self._crc32c: bool | None = {"auto": None, "crc32c": True, "md5": False}[mode]
        options["skip_instance_cache"] = True
        # Every part and PUT carries Content-MD5 (checked by the server) and we compare the
        # returned ETag with our MD5: botocore's extra CRC32 trailers would only add CPU work on
        # s3fs's single event-loop thread. A user's own config_kwargs win.
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("request_checksum_calculation", "when_required")
        config.setdefault("response_checksum_validation", "when_required")
        # No SHA-256 of every body for the signature: the body's MD5 goes in the signed
        # Content-MD5 header, which the server checks (botocore itself does the same over https).
        s3_config = dict(config.get("s3") or {})
        s3_config.setdefault("payload_signing_enabled", False)
        config["s3"] = s3_config
        # One HTTP attempt per call: our retry layer counts the attempts (nested botocore retries
        # would multiply them and keep retrying after our deadline). A user's mode is kept.
        retries = {k: v for k, v in dict(config.get("retries") or {}).items() if k == "mode"}
        retries["total_max_attempts"] = 1
        config["retries"] = retries
        # Our own User-Agent, built once: it names us in the server's logs, and botocore's default
        # string is built twice per request (measured: about 6% of a small PUT's client CPU). A
        # user's user_agent wins, and so does a user_agent_appid (only the default string has it).
        if "user_agent" not in config and "user_agent_appid" not in config:
            config["user_agent"] = user_agent()
        options["config_kwargs"] = config
        if "session" not in options and "profile" not in options:
            # A named profile is a session of its own (s3fs makes it); anything else shares one.
            options["session"] = _session()
        self.fs = s3fs.S3FileSystem(**options)
        self.fs.retries = 1  # one attempt per call: RetryingStorage decides about retries
        self.request_timeout = request_timeout
        self._probe_lock = threading.Lock()
        self._conditional_delete: bool | None = None
        #: Whether If-None-Match is honoured on PutObject / CompleteMultipartUpload: probed once.
        self._conditional_put: bool | None = None
        self._conditional_complete: bool | None = None
        #: Whether the remote proved it keeps and echoes CRC32C (see ``S3Objects.keeps_crc32c``).
        self._crc32c_kept: bool | None = None
        self._write_probe_lock = threading.Lock()
        #: Its own lock: the Complete probe may run in the background (see
        #: ``S3Storage.start_upload``) while a registration asks about CRC32C.
        self._complete_probe_lock = threading.Lock()
        #: The background Complete probe (``S3Objects.prepare_complete``), once started; its
        #: own lock, since the probe holds ``_complete_probe_lock`` while it runs.
        self._complete_probe: threading.Thread | None = None
        self._complete_probe_start = threading.Lock()

    # --- helpers ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._url

    @property
    def min_part_size(self) -> int:
        return self._min_part_size

    def check_key(self, key: str) -> None:
        """S3 counts a key from the bucket: prefix + ``/`` + key must be <= 1024 UTF-8 bytes."""
        check_full_length(key, self.prefix, f"bucket {self.bucket!r}")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        if self.prefix and full.startswith(self.prefix + "/"):
            return full[len(self.prefix) + 1 :]
        return full

    def _raise(self, exc: BaseException, op: str, key: str | None) -> NoReturn:
        original = _client_error(exc)
        err = translate(original, op=op, bucket=self.bucket, key=key)
        if err is None:
            raise exc
        if err is original:
            raise err
        from uploader.errors import AccessDeniedError

        if isinstance(err, AccessDeniedError):
            raise err from None  # the cause may carry credentials
        raise err from exc

    def _bounded(self, op: str, make: Callable[[], Awaitable[T]]) -> T:
        """Run ``make()`` on s3fs's loop; at the deadline cancel it and await the cancellation."""
        result: T = sync(self.fs.loop, self._abounded, op, make)
        return result

    async def _abounded(self, op: str, make: Callable[[], Awaitable[T]]) -> T:
        """``make()`` on the running loop (s3fs's), cut at ``request_timeout``."""
        timeout = self.request_timeout
        try:
            if timeout is None:
                return await make()
            async with asyncio.timeout(timeout):
                return await make()
        except TimeoutError as exc:
            # asyncio.timeout raises only once the cancelled request has unwound (its connection
            # closed): nothing of this attempt is still being sent.
            limit = f"within {timeout:g} s" if timeout is not None else "in time"
            raise StorageTimeoutError(
                f"{op} in {self.bucket!r}: no answer {limit}; the request was cancelled and "
                "its cancellation awaited"
            ) from exc

    def _request(self, op: str, **kwargs: Any) -> Any:
        """One raw S3 request (no retries), cut at ``request_timeout``."""
        return self._bounded(op, lambda: self.fs._call_s3(op, **kwargs))

    async def _acall(self, op: str, key: str | None, **kwargs: Any) -> Any:
        """:meth:`_call` as a coroutine on s3fs's loop (a batch's requests, no thread each)."""
        try:
            return await self._abounded(op, lambda: self.fs._call_s3(op, **kwargs))
        except Exception as exc:
            self._raise(exc, op, key)

    def _call(self, op: str, key: str | None, **kwargs: Any) -> Any:
        try:
            return self._request(op, **kwargs)
        except Exception as exc:
            self._raise(exc, op, key)

    def _upload_known(self, key: str, upload_id: str) -> bool:
        """Whether the remote still lists ``upload_id`` for ``key``."""
        return any(u.upload_id == upload_id for u in self._list_uploads(self._key(key)))

    def _maybe_known(self, key: str, upload_id: str) -> bool:
        """Whether ``upload_id`` may still exist: listed, or the listing cannot be made (a
        remote without ListMultipartUploads proves nothing: the 5xx stays a server error)."""
        try:
            return self._upload_known(key, upload_id)
        except UnsupportedOperationError:
            return True

    def _call_upload(self, op: str, key: str, upload_id: str, **kwargs: Any) -> Any:
        """A call naming an upload id: an unknown id becomes NoSuchUploadError whatever the status
        (see the module's docstring for how servers say it)."""
        try:
            return self._request(op, **kwargs)
        except Exception as exc:
            code, status = client_error_code(_client_error(exc))
            if is_unsupported(code, status):
                self._raise(exc, op, key)  # 405/501: not implemented, whatever the upload is
            if code in UNKNOWN_UPLOAD_CODES or (
                status is not None and status >= 500 and not self._maybe_known(key, upload_id)
            ):
                raise NoSuchUploadError(
                    f"{op} of {key!r} in {self.bucket!r}: upload {upload_id} is unknown "
                    "(aborted or completed)"
                ) from None
            self._raise(exc, op, key)

    def _learn_crc32c(self, supported: bool, op: str, key: str) -> None:
        """What a request that declared CRC32C learned about the remote (once per instance)."""
        if supported:
            if self._crc32c is None:
                self._crc32c = True
            return
        if self.checksum_mode == "crc32c":
            raise StorageError(
                f"{op} of {key!r} in {self.bucket!r}: the remote did not answer with the CRC32C "
                "checksum it was asked to keep (it does not support additional checksums); use "
                "the storage option checksum='md5' (or 'auto') for this remote",
                retryable=False,
            )
        self._crc32c = False  # MD5 alone from now on: Content-MD5 and the ETags, as before

    @property
    def crc32c(self) -> bool | None:
        """Whether the remote keeps CRC32C checksums (None: not learned yet)."""
        return self._crc32c

    def _list_uploads(self, full_prefix: str, *, probes: bool = True) -> list[UploadRef]:
        """Unfinished uploads under ``full_prefix``; ``probes=False`` leaves out a capability
        probe's own (under ``.uploader/probe/``: its probe, maybe running on a thread of this
        process, aborts it itself). Deciding whether an upload is known keeps them all."""
        uploads: list[UploadRef] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix}
        while True:
            out = self._call("list_multipart_uploads", None, **kwargs)
            for u in out.get("Uploads", []):
                if not probes and self._rel(u["Key"]).startswith(PROBE_PREFIX + "/"):
                    continue
                initiated = u.get("Initiated")
                if initiated is not None and initiated.tzinfo is not None:
                    initiated = initiated.astimezone(UTC).replace(tzinfo=None)
                uploads.append(
                    UploadRef(key=self._rel(u["Key"]), upload_id=u["UploadId"], initiated=initiated)
                )
            if not out.get("IsTruncated"):
                break
            kwargs["KeyMarker"] = out.get("NextKeyMarker")
            kwargs["UploadIdMarker"] = out.get("NextUploadIdMarker")
            if not kwargs["KeyMarker"] and not kwargs["UploadIdMarker"]:
                break
        return uploads
