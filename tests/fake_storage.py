"""A loopback HTTP double of Supabase Storage's object API, faithful to its wire format.

It speaks what storage3 (supabase-py) sends and answers as the real service does
(supabase/storage `src/internal/errors`: an error is rendered as `{"statusCode":
"<its status, a string>", "code", "error", "message"}` and sent as HTTP 500 when
its status is 500, as HTTP 400 otherwise, except the database timeout, sent as
HTTP 544): multipart uploads with `x-upsert`; the duplicate as HTTP 400 with
`statusCode` "409"; a key that does not verify as HTTP 400 with `statusCode` "403",
`error` "Unauthorized" (or, with `gateway=True`, the API gateway's HTTP 401 with a
body that is not the storage shape, as Supabase's gateway answers a wrong `apikey`);
an object over `max_bytes` as HTTP 400 with `statusCode` "413" (EntityTooLarge);
object info for `exists`; bulk delete by prefixes, which answers 200 `[]` for a
bucket that does not exist. Tests can script the next requests to fail (see
ENTITY_TOO_LARGE and DATABASE_TIMEOUT). It must never listen beyond 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_KEY = "sb_secret_fake-service-role-key-0123456789"
DEFAULT_BUCKET = "imagen"
PREFIX = "/storage/v1/object"
BUCKET_PREFIX = "/storage/v1/bucket"

DUPLICATE = {
    "statusCode": "409",
    "code": "ResourceAlreadyExists",
    "error": "Duplicate",
    "message": "The resource already exists",
}
NOT_FOUND = {"statusCode": "404", "code": "NoSuchKey", "error": "not_found", "message": "Object not found"}
BUCKET_NOT_FOUND = {
    "statusCode": "404",
    "code": "NoSuchBucket",
    "error": "Bucket not found",
    "message": "Bucket not found",
}
_ERROR_NAMES = {401: "Unauthorized", 403: "Unauthorized", 429: "too_many_connections"}
# A JWT that does not verify (a wrong service key), as storage renders it.
INVALID_KEY = {"statusCode": "403", "error": "Unauthorized", "message": "signature verification failed"}
# What the API gateway in front of Supabase answers for an `apikey` it does not know: not the storage shape.
GATEWAY_INVALID_KEY = {
    "message": "Invalid API key",
    "hint": "Double check your Supabase `anon` or `service_role` API key.",
}
# An object over the bucket's (or the project's) size limit: permanent. Sent as HTTP 400.
ENTITY_TOO_LARGE = {
    "statusCode": "413",
    "code": "EntityTooLarge",
    "error": "Payload too large",
    "message": "The object exceeded the maximum allowed size",
}
# Storage's database did not answer in time: transient. Sent as HTTP 544.
DATABASE_TIMEOUT = {
    "statusCode": "544",
    "code": "DatabaseTimeout",
    "error": "DatabaseTimeout",
    "message": "The connection to the database timed out",
}


@dataclass(frozen=True)
class FormPart:
    """One part of a multipart/form-data body."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass(frozen=True)
class StorageRequest:
    """One request as the double saw it; header names are lower-case, the path is unquoted."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    form: dict[str, FormPart] = field(default_factory=dict)
    query: str = ""

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass(frozen=True)
class _Failure:
    status: int
    body: bytes
    content_type: str


def parse_multipart(content_type: str, body: bytes) -> dict[str, FormPart]:
    """Split a multipart/form-data body into its parts by name (exact bytes, no re-encoding)."""
    params = dict(part.strip().split("=", 1) for part in content_type.split(";")[1:] if "=" in part.strip())
    boundary = params.get("boundary", "").strip('"')
    if not boundary:
        raise ValueError("multipart body without a boundary")
    parts: dict[str, FormPart] = {}
    for section in body.split(b"--" + boundary.encode())[1:]:
        if section.startswith(b"--"):
            break
        section = section.removeprefix(b"\r\n").removesuffix(b"\r\n")
        head, _, data = section.partition(b"\r\n\r\n")
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        disposition: dict[str, str] = {}
        for item in headers.get("content-disposition", "").split(";")[1:]:
            key, _, value = item.strip().partition("=")
            disposition[key] = value.strip('"')
        part = FormPart(
            name=disposition.get("name", ""),
            filename=disposition.get("filename"),
            content_type=headers.get("content-type"),
            data=data,
        )
        parts[part.name] = part
    return parts


class FakeStorage:
    """Supabase Storage's object endpoints over a ThreadingHTTPServer on 127.0.0.1.

    `objects` maps (bucket, path) to (bytes, content type); `requests` records
    every request in arrival order, failed ones included.
    """

    def __init__(
        self,
        key: str = DEFAULT_KEY,
        buckets: tuple[str, ...] = (DEFAULT_BUCKET,),
        *,
        gateway: bool = False,
        max_bytes: int | None = None,
    ) -> None:
        self.key = key
        self.buckets = set(buckets)
        self.gateway = gateway
        self.max_bytes = max_bytes
        self.objects: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.requests: list[StorageRequest] = []
        self._failures: deque[_Failure] = deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name="fake-storage",
            daemon=True,
        )
        self._started = False

    @property
    def url(self) -> str:
        """The base URL to give as SUPABASE_URL (the double serves /storage/v1 under it)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> str:
        """Start serving; return the base URL."""
        if not self._started:
            self._thread.start()
            self._started = True
        return self.url

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._started:
            self._thread.join(timeout=5)

    def fail_next(self, n: int, status: int, body: dict[str, Any] | bytes | None = None) -> None:
        """Answer the next `n` requests with HTTP `status` before looking at them.

        The default body is the service's JSON error shape with `statusCode` set to
        `status`; pass a dict for another JSON body or bytes for a non-JSON one
        (a gateway's HTML page).
        """
        if body is None:
            body = {
                "statusCode": str(status),
                "error": _ERROR_NAMES.get(status, "InternalError"),
                "message": f"fake storage: scripted failure {status}",
            }
        if isinstance(body, bytes):
            failure = _Failure(status, body, "text/html")
        else:
            failure = _Failure(status, json.dumps(body).encode(), "application/json")
        with self._lock:
            self._failures.extend([failure] * n)

    def requests_to(self, method: str) -> list[StorageRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == method]

    def _take_failure(self, request: StorageRequest) -> _Failure | None:
        with self._lock:
            self.requests.append(request)
            return self._failures.popleft() if self._failures else None

    def _refusal(self, headers: dict[str, str]) -> tuple[int, bytes, str] | None:
        """A wrong key's answer: the gateway's 401 for the `apikey`, else storage's for the JWT."""
        if self.gateway and headers.get("apikey") != self.key:
            return _json(401, GATEWAY_INVALID_KEY)
        if headers.get("apikey") != self.key or headers.get("authorization") != f"Bearer {self.key}":
            return _json(400, INVALID_KEY)
        return None

    def _handle(self, request: StorageRequest) -> tuple[int, bytes, str]:
        """Route one request; returns (status, body, content type)."""
        failure = self._take_failure(request)
        if failure is not None:
            return failure.status, failure.body, failure.content_type
        if request.method == "GET" and request.path.startswith(PREFIX + "/sign/"):
            return self._signed_get(request)
        refused = self._refusal(request.headers)
        if refused is not None:
            return refused
        if request.method == "GET" and request.path.startswith(BUCKET_PREFIX + "/"):
            return self._bucket(request.path[len(BUCKET_PREFIX) + 1 :])
        if not request.path.startswith(PREFIX + "/"):
            return _json(404, {"statusCode": "404", "error": "not_found", "message": "Route not found"})
        rest = request.path[len(PREFIX) + 1 :]
        if request.method == "GET" and rest.startswith("info/"):
            return self._info(*_split(rest[len("info/") :]))
        if request.method == "DELETE" and "/" not in rest:
            return self._remove(rest, request)
        if request.method == "POST" and rest.startswith("sign/"):
            return self._sign(*_split(rest[len("sign/") :]))
        bucket, path = _split(rest)
        if bucket not in self.buckets:
            return _json(400, BUCKET_NOT_FOUND)
        if not path:
            return _json(400, {"statusCode": "400", "error": "InvalidKey", "message": "Invalid key"})
        if request.method == "POST":
            return self._upload(bucket, path, request, is_update=False)
        if request.method == "PUT":
            return self._upload(bucket, path, request, is_update=True)
        if request.method in ("GET", "HEAD"):
            with self._lock:
                stored = self.objects.get((bucket, path))
            if stored is None:
                return _json(400, NOT_FOUND)
            return 200, stored[0], stored[1]
        return _json(405, {"statusCode": "405", "error": "MethodNotAllowed", "message": request.method})

    def _upload(
        self, bucket: str, path: str, request: StorageRequest, *, is_update: bool
    ) -> tuple[int, bytes, str]:
        part = request.form.get("file")
        if part is None:
            return _json(400, {"statusCode": "400", "error": "InvalidRequest", "message": "no file part"})
        # The service reads the mime from a `contentType` field, else the part's own type.
        mime_field = request.form.get("contentType")
        mime = mime_field.data.decode() if mime_field else (part.content_type or "application/octet-stream")
        # x-upsert counts only when it is exactly the string 'true'.
        is_upsert = request.headers.get("x-upsert") == "true"
        if self.max_bytes is not None and len(part.data) > self.max_bytes:
            return _json(400, ENTITY_TOO_LARGE)
        with self._lock:
            exists = (bucket, path) in self.objects
            if is_update and not exists:
                return _json(400, NOT_FOUND)
            if exists and not is_update and not is_upsert:
                return _json(400, DUPLICATE)
            self.objects[(bucket, path)] = (part.data, mime)
        return _json(200, {"Id": str(uuid.uuid4()), "Key": f"{bucket}/{path}"})

    def _bucket(self, bucket: str) -> tuple[int, bytes, str]:
        """`GET /bucket/{id}` (storage3's get_bucket)."""
        if bucket not in self.buckets:
            return _json(400, BUCKET_NOT_FOUND)
        now = "2026-01-01T00:00:00.000Z"
        return _json(
            200,
            {
                "id": bucket, "name": bucket, "owner": "", "public": False, "type": "STANDARD",
                "file_size_limit": self.max_bytes, "allowed_mime_types": None,
                "created_at": now, "updated_at": now,
            },
        )  # fmt: skip

    def _sign_token(self, bucket: str, path: str) -> str:
        return hmac.new(self.key.encode(), f"{bucket}/{path}".encode(), hashlib.sha256).hexdigest()

    def _sign(self, bucket: str, path: str) -> tuple[int, bytes, str]:
        """A signed URL, relative to /storage/v1 as the service answers it (no expiry kept here)."""
        with self._lock:
            exists = (bucket, path) in self.objects
        if not exists:
            return _json(400, NOT_FOUND)
        token = self._sign_token(bucket, path)
        return _json(200, {"signedURL": f"/object/sign/{quote(bucket)}/{quote(path)}?token={token}"})

    def _signed_get(self, request: StorageRequest) -> tuple[int, bytes, str]:
        bucket, path = _split(request.path[len(PREFIX + "/sign/") :])
        token = parse_qs(request.query).get("token", [""])[0]
        if not hmac.compare_digest(token, self._sign_token(bucket, path)):
            return _json(400, {"statusCode": "400", "error": "InvalidJWT", "message": "invalid signature"})
        with self._lock:
            stored = self.objects.get((bucket, path))
        if stored is None:
            return _json(400, NOT_FOUND)
        return 200, stored[0], stored[1]

    def _info(self, bucket: str, path: str) -> tuple[int, bytes, str]:
        if bucket not in self.buckets:
            return _json(400, BUCKET_NOT_FOUND)
        with self._lock:
            stored = self.objects.get((bucket, path))
        if stored is None:
            return _json(400, NOT_FOUND)
        return _json(
            200,
            {
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{bucket}/{path}")),
                "name": path,
                "bucket_id": bucket,
                "size": len(stored[0]),
                "content_type": stored[1],
            },
        )

    def _remove(self, bucket: str, request: StorageRequest) -> tuple[int, bytes, str]:
        # A bulk delete in a bucket that does not exist finds nothing to delete: 200 [].
        if bucket not in self.buckets:
            return _json(200, [])
        try:
            prefixes = request.json()["prefixes"]
        except (ValueError, KeyError, TypeError):
            return _json(400, {"statusCode": "400", "error": "InvalidRequest", "message": "prefixes"})
        removed = []
        with self._lock:
            for path in prefixes:
                if self.objects.pop((bucket, path), None) is not None:
                    removed.append({"name": path, "bucket_id": bucket})
        return _json(200, removed)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        storage = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                content_type = headers.get("content-type", "")
                form = parse_multipart(content_type, body) if content_type.startswith("multipart/") else {}
                request = StorageRequest(
                    method=self.command,
                    path=unquote(urlsplit(self.path).path),
                    headers=headers,
                    body=body,
                    form=form,
                    query=urlsplit(self.path).query,
                )
                status, payload, payload_type = storage._handle(request)
                try:
                    self.send_response(status)
                    self.send_header("content-type", payload_type)
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _json(status: int, body: Any) -> tuple[int, bytes, str]:
    return status, json.dumps(body).encode(), "application/json"


def _split(rest: str) -> tuple[str, str]:
    bucket, _, path = rest.partition("/")
    return bucket, path


@contextmanager
def fake_storage(
    key: str = DEFAULT_KEY,
    buckets: tuple[str, ...] = (DEFAULT_BUCKET,),
    *,
    gateway: bool = False,
    max_bytes: int | None = None,
) -> Iterator[FakeStorage]:
    """A started FakeStorage, shut down afterwards."""
    storage = FakeStorage(key, buckets, gateway=gateway, max_bytes=max_bytes)
    storage.start()
    try:
        yield storage
    finally:
        storage.close()
