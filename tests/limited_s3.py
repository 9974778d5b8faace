"""An S3 server with fewer capabilities: an HTTP proxy in front of moto that behaves like s3rver,
Ceph RGW or an SSE-KMS bucket where they differ from AWS.

Requests go to the real moto server, over HTTP, through botocore and s3fs as in production; the
proxy only changes what a less capable remote changes:

* ``refuse={"ListParts": 405, ...}``: the named operations answer that status with S3's error XML
  (``MethodNotAllowed`` for 405, ``NotImplemented`` for 501), as s3rver does for ListParts,
  AbortMultipartUpload (405) and ListMultipartUploads (501);
* ``ignore_if_none_match``: the ``If-None-Match`` header is dropped before it reaches moto, so a
  conditional PUT or complete overwrites (RGW on complete, s3rver);
* ``etags="plain-md5"``: HeadObject and GetObject report a multipart object's ETag as the MD5 of
  its bytes (s3rver); ``etags="opaque"``: every object's and every part's ETag is some other hex
  string, stable per object or part (SSE-KMS); the proxy maps part ETags back for
  CompleteMultipartUpload and forth in ListParts, as the real server knows its own;
* ``checksums="none"``: no additional checksums (Ceph RGW): the client's ``x-amz-checksum-*`` and
  ``x-amz-sdk-checksum-algorithm`` headers are dropped before they reach moto, the part checksums
  named in CompleteMultipartUpload too, and none comes back in headers or XML;
  ``checksums="unreported"``: kept, but HeadObject reports none for segment objects (the probe
  object under ``.uploader/probe/`` still reports its own), as a remote or a proxy that drops them.

``calls`` lists every operation that reached the proxy, in order (tests count retries with it).
"""

from __future__ import annotations

import hashlib
import http.client
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import parse_qs, urlsplit

#: Where the storage's capability probes write (see uploader.storage.s3.PROBE_PREFIX).
PROBE_PATH = "/.uploader/probe/"
ERROR_CODES = {405: "MethodNotAllowed", 501: "NotImplemented"}
#: Request headers that ask for (or carry) an additional checksum.
CHECKSUM_HEADER = re.compile(r"^x-amz-(checksum-|sdk-checksum-algorithm)", re.IGNORECASE)
#: XML elements that name one, in request and response bodies.
CHECKSUM_XML = re.compile(rb"<Checksum(\w*)>[^<]*</Checksum\1>")


def operation(method: str, path: str, query: Mapping[str, list[str]]) -> str:
    """The S3 operation a request is (only those the uploader sends)."""
    key = path.strip("/").partition("/")[2]
    if method == "GET" and "uploadId" in query:
        return "ListParts"
    if method == "DELETE" and "uploadId" in query:
        return "AbortMultipartUpload"
    if method == "GET" and "uploads" in query:
        return "ListMultipartUploads"
    if method == "POST" and "uploads" in query:
        return "CreateMultipartUpload"
    if method == "POST" and "uploadId" in query:
        return "CompleteMultipartUpload"
    if method == "PUT" and "partNumber" in query:
        return "UploadPart"
    if method == "PUT":
        return "PutObject" if key else "CreateBucket"
    if method == "HEAD":
        return "HeadObject" if key else "HeadBucket"
    if method == "DELETE":
        return "DeleteObject"
    if method == "GET":
        return "GetObject" if key else "ListObjectsV2"
    return f"{method} {path}"


class LimitedS3:
    """The proxy; ``url`` is its endpoint (give it as ``endpoint_url``)."""

    def __init__(
        self,
        upstream: str,
        *,
        refuse: Mapping[str, int] | None = None,
        ignore_if_none_match: bool = False,
        etags: Literal["aws", "plain-md5", "opaque"] = "aws",
        checksums: Literal["kept", "none", "unreported"] = "kept",
    ) -> None:
        parts = urlsplit(upstream)
        assert parts.hostname is not None and parts.port is not None
        self.upstream = (parts.hostname, parts.port)
        self.refuse = dict(refuse or {})
        self.ignore_if_none_match = ignore_if_none_match
        self.etags = etags
        self.checksums = checksums
        self.calls: list[str] = []
        self.paths: list[str] = []
        #: Each request's User-Agent header, in order.
        self.agents: list[str] = []
        #: Each request's Expect header ('' if none), in order.
        self.expects: list[str] = []
        self._lock = threading.Lock()
        self._real_part_etags: dict[str, str] = {}  # opaque part ETag -> upstream's (KMS mode)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet tests

            def _any(self) -> None:
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> LimitedS3:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, op: str, key: str | None = None) -> int:
        """How many ``op`` requests reached the proxy (for an object path ending in ``/key``).

        Without ``key``, the storage's once-per-instance capability probes (objects under the
        hidden ``.uploader/probe/``) are not counted: they are not requests for any segment."""
        with self._lock:
            return sum(
                1
                for o, path in zip(self.calls, self.paths, strict=True)
                if o == op
                and (path.endswith("/" + key) if key is not None else PROBE_PATH not in path)
            )

    # --- one request ------------------------------------------------------------------------------

    def _upstream(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes | None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(method, path, body=body, headers=dict(headers))
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()

    def _object_md5(self, path: str, headers: Mapping[str, str]) -> str:
        plain = {k: v for k, v in headers.items() if k.lower() not in ("range", "content-length")}
        status, _, data = self._upstream("GET", urlsplit(path).path, plain, None)
        assert status == 200, status
        return hashlib.md5(data, usedforsecurity=False).hexdigest()

    def _etag(self, etag: str, path: str, headers: Mapping[str, str]) -> str:
        bare = etag.strip('"')
        if self.etags == "plain-md5" and "-" in bare:
            return f'"{self._object_md5(path, headers)}"'
        if self.etags == "opaque":
            return f'"{hashlib.md5(b"kms:" + bare.encode(), usedforsecurity=False).hexdigest()}"'
        return etag

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        split = urlsplit(h.path)
        query = parse_qs(split.query, keep_blank_values=True)
        op = operation(h.command, split.path, query)
        with self._lock:
            self.calls.append(op)
            self.paths.append(split.path)
            self.agents.append(h.headers.get("User-Agent", ""))
            self.expects.append(h.headers.get("Expect", ""))
        body = _read_body(h)
        status = self.refuse.get(op)
        if status is not None:
            code = ERROR_CODES.get(status, str(status))
            xml = (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{op} is not implemented by this server</Message></Error>"
            ).encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(0 if h.command == "HEAD" else len(xml)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(xml)
            return
        hop = ("expect", "connection", "keep-alive", "transfer-encoding", "content-length")
        headers = {k: v for k, v in h.headers.items() if k.lower() not in hop}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        if self.ignore_if_none_match:
            headers = {k: v for k, v in headers.items() if k.lower() != "if-none-match"}
        if self.checksums == "none":
            headers = {k: v for k, v in headers.items() if not CHECKSUM_HEADER.match(k)}
            if op == "CompleteMultipartUpload" and body is not None:
                body = CHECKSUM_XML.sub(b"", body)
                headers["Content-Length"] = str(len(body))
        if self.etags == "opaque" and op == "CompleteMultipartUpload" and body is not None:
            # The client names the part ETags it was given; the server upstream knows its own.
            with self._lock:
                for opaque, real in self._real_part_etags.items():
                    body = body.replace(opaque.encode(), real.encode())
            headers["Content-Length"] = str(len(body))
        status, out_headers, data = self._upstream(h.command, h.path, headers, body)
        hide = self.checksums == "none" or (
            self.checksums == "unreported" and op == "HeadObject" and PROBE_PATH not in split.path
        )
        if hide:
            out_headers = [(k, v) for k, v in out_headers if not CHECKSUM_HEADER.match(k)]
            if h.command != "HEAD":
                data = CHECKSUM_XML.sub(b"", data)
        if self.etags == "opaque" and op == "ListParts" and status < 300:
            with self._lock:
                for opaque, real in self._real_part_etags.items():
                    data = data.replace(real.encode(), opaque.encode())
        h.send_response(status)
        for name, value in out_headers:
            lower = name.lower()
            if lower in ("transfer-encoding", "connection", "content-length", "date", "server"):
                continue
            if lower == "etag" and op in ("HeadObject", "GetObject") and status < 300:
                value = self._etag(value, h.path, headers)
            elif lower == "etag" and op == "PutObject" and status < 300 and self.etags == "opaque":
                # SSE-KMS: a PUT's response names the same opaque ETag a HEAD reports.
                value = self._etag(value, h.path, headers)
            elif lower == "etag" and op == "UploadPart" and status < 300 and self.etags == "opaque":
                # SSE-KMS: a part's ETag is no MD5 of its bytes either.
                real = value.strip('"')
                opaque = hashlib.md5(
                    b"kms-part:" + real.encode(), usedforsecurity=False
                ).hexdigest()
                with self._lock:
                    self._real_part_etags[opaque] = real
                value = f'"{opaque}"'
            h.send_header(name, value)
        if h.command == "HEAD":
            length_out = next((v for k, v in out_headers if k.lower() == "content-length"), "0")
            h.send_header("Content-Length", length_out)
        else:
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)


def _read_body(h: BaseHTTPRequestHandler) -> bytes | None:
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks: list[bytes] = []
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(h.rfile.read(size))
            h.rfile.readline()
    length = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(length) if length else None


@contextmanager
def limited_s3(
    upstream: str,
    *,
    refuse: Mapping[str, int] | None = None,
    ignore_if_none_match: bool = False,
    etags: Literal["aws", "plain-md5", "opaque"] = "aws",
    checksums: Literal["kept", "none", "unreported"] = "kept",
) -> Iterator[LimitedS3]:
    proxy = LimitedS3(
        upstream,
        refuse=refuse,
        ignore_if_none_match=ignore_if_none_match,
        etags=etags,
        checksums=checksums,
    ).start()
    try:
        yield proxy
    finally:
        proxy.stop()
