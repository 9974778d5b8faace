"""Translate what the S3 client stack and filesystems raise into :mod:`uploader.errors`.

Every translated error names the operation, the bucket (or root) and the key it was about, and says
whether retrying may help (``retryable``). Messages never carry credentials: for authentication
failures the server's message is dropped (AWS puts the access key id and the string-to-sign in
some of them) and the original exception is not chained.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any, NoReturn

from uploader.errors import (
    AccessDeniedError,
    NoSuchBucketError,
    NoSuchUploadError,
    ObjectExistsError,
    PartRuleError,
    RetryableStorageError,
    StorageError,
    StorageTimeoutError,
    UnsupportedOperationError,
)

#: Error codes S3 (and S3-compatible stores) use for "slow down", transient server trouble.
THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "ServiceUnavailable",
        "InternalError",
        "OperationAborted",
        "EC2ThrottledException",
    }
)
TIMEOUT_CODES = frozenset({"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete"})
#: The body arrived damaged or short: sending it again may succeed.
TRANSIT_CODES = frozenset({"BadDigest", "XAmzContentSHA256Mismatch", "IncompleteBody"})
AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "InvalidSecurity",
        "NotSignedUp",
        "RequestTimeTooSkewed",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "403",
    }
)
#: "This server does not implement the operation" (s3rver answers 405 for ListParts and
#: AbortMultipartUpload, 501 for ListMultipartUploads): never worth retrying.
UNSUPPORTED_CODES = frozenset({"NotImplemented", "MethodNotAllowed"})
UNSUPPORTED_STATUSES = frozenset({405, 501})

PART_RULE_CODES = frozenset(
    {"EntityTooSmall", "EntityTooLarge", "InvalidPartOrder", "TooManyParts"}
)


def operation_name(op: str) -> str:
    """S3's name for a client method: ``list_parts`` -> ``ListParts``."""
    if "_" not in op and op[:1].isupper():
        return op
    return "".join(word.capitalize() for word in op.split("_"))


def is_unsupported(code: str, status: int | None) -> bool:
    """Whether an S3 error says the server does not implement the call at all."""
    return code in UNSUPPORTED_CODES or status in UNSUPPORTED_STATUSES


def _where(op: str, bucket: str, key: str | None) -> str:
    if key is None:
        return f"{op} in {bucket!r}"
    return f"{op} of {key!r} in {bucket!r}"


def client_error_code(exc: BaseException) -> tuple[str, int | None]:
    """``(code, http status)`` of a botocore ``ClientError``; ``("", None)`` for anything else."""
    response: Any = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", None
    error = response.get("Error") or {}
    code = str(error.get("Code") or "")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if not isinstance(status, int):
        status = int(code) if code.isdigit() else None
    return code, status


def _client_error_message(exc: BaseException) -> str:
    response: Any = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    error = response.get("Error") or {}
    return str(error.get("Message") or "")


def translate(
    exc: BaseException, *, op: str, bucket: str, key: str | None = None
) -> StorageError | PartRuleError | None:
    """Our error for ``exc``, or None when ``exc`` is not an I/O failure (a bug: let it through)."""
    if isinstance(exc, StorageError | PartRuleError):
        return exc
    where = _where(op, bucket, key)
    code, status = client_error_code(exc)
    if code or status is not None:
        if is_unsupported(code, status):
            return unsupported(op, where, code or str(status), _client_error_message(exc))
        return _translate_client_error(exc, code, status, where, bucket)
    return translate_transport(exc, where)


def _translate_client_error(
    exc: BaseException, code: str, status: int | None, where: str, bucket: str
) -> StorageError | PartRuleError:
    label = code or str(status)
    if code in AUTH_CODES or status == 403:
        # No server message: some carry the access key id or the string to sign.
        return AccessDeniedError(
            f"{where}: access denied ({label}); check the credentials and the bucket policy"
        )
    message = _client_error_message(exc)
    detail = f"{label}: {message}" if message and message != label else label
    if code == "NoSuchBucket":
        return NoSuchBucketError(f"{where}: bucket {bucket!r} does not exist ({detail})")
    if code == "NoSuchUpload":
        return NoSuchUploadError(
            f"{where}: the upload is unknown (aborted or completed) ({detail})"
        )
    if code == "PreconditionFailed" or status == 412:
        return ObjectExistsError(f"{where}: an object already exists at the key ({detail})")
    if code in PART_RULE_CODES:
        return PartRuleError(f"{where}: the remote refused the parts ({detail})")
    if code in TIMEOUT_CODES or status in (408,):
        return StorageTimeoutError(f"{where}: the remote timed out ({detail})")
    if code in THROTTLING_CODES or code in TRANSIT_CODES or status == 429:
        return RetryableStorageError(f"{where}: {detail}; worth retrying")
    if status is not None and status >= 500:
        return RetryableStorageError(f"{where}: server error {detail}; worth retrying")
    return StorageError(f"{where}: refused by the remote ({detail})")


def unsupported(op: str, where: str, label: str, message: str = "") -> UnsupportedOperationError:
    """The typed error for a 405/501 answer to ``op``."""
    name = operation_name(op)
    detail = f"{label}: {message}" if message and message != label else label
    return UnsupportedOperationError(
        f"{where}: the remote does not support {name} ({detail}); not retried", op=name
    )


def translate_transport(exc: BaseException, where: str) -> StorageError | None:
    """Network, timeout and filesystem failures (no HTTP response to look at)."""
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError) or name in (
        "FSTimeoutError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ServerTimeoutError",
        "ConnectionTimeoutError",
        "SocketTimeoutError",
    ):
        return StorageTimeoutError(f"{where}: timed out ({name})")
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return AccessDeniedError(f"{where}: no usable credentials ({name})")
    if name == "SSLError":
        return StorageError(f"{where}: TLS failure ({name}); check the endpoint and certificates")
    if module.startswith(("botocore", "aiobotocore", "aiohttp", "urllib3")):
        # Connection resets, closed connections, truncated bodies, unparsable responses.
        return RetryableStorageError(f"{where}: transport failure ({name}: {_short(exc)})")
    if isinstance(exc, ConnectionError):
        return RetryableStorageError(f"{where}: connection failure ({name})")
    if isinstance(exc, FileExistsError):
        return ObjectExistsError(f"{where}: something already exists there")
    if isinstance(exc, PermissionError):
        return AccessDeniedError(f"{where}: permission denied")
    if isinstance(exc, OSError):
        transient = exc.errno in (
            errno.EAGAIN,
            errno.EINTR,
            errno.EBUSY,
            errno.ETIMEDOUT,
            errno.ECONNRESET,
            errno.ECONNABORTED,
            errno.EPIPE,
            errno.EIO,
        )
        reason = exc.strerror or name
        return StorageError(f"{where}: {reason}", retryable=transient)
    return None


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."


def raise_translated(
    exc: BaseException, *, op: str, bucket: str, key: str | None = None
) -> NoReturn:
    """Raise our error for ``exc`` (chained to it unless it is about credentials)."""
    err = translate(exc, op=op, bucket=bucket, key=key)
    if err is None:
        raise exc
    if err is exc:
        raise err
    if isinstance(err, AccessDeniedError):
        raise err from None
    raise err from exc
