"""Where finished images live: a local folder or Supabase Storage, behind one interface.

Object paths are deterministic for jobs (`{owner_user_id}/{job_id}.{ext}`) and
uploads are upserts, so a stage that runs twice writes one object. Paths are
built only from UUIDs and a fixed extension: nothing a user typed reaches them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote
from uuid import UUID, uuid4

from imagen.config import Settings
from imagen.errors import ConfigError, StorageError, TransientStorageError
from imagen.writer import IMAGE_EXTENSIONS, image_extension, replace_atomically

log = logging.getLogger(__name__)

EXTENSIONS = IMAGE_EXTENSIONS  # the writer's table: one MIME table for files and objects


@dataclass(frozen=True)
class StoredObject:
    """Where an image was put."""

    bucket: str
    path: str
    bytes: int


def extension_for(mime: str) -> str:
    ext = image_extension(mime)
    if ext is None:
        raise StorageError(f"cannot store images of type {mime!r}")
    return ext


def job_object_path(owner_user_id: UUID, job_id: UUID, mime: str) -> str:
    """The one object path a job's image may have."""
    return f"{UUID(str(owner_user_id))}/{UUID(str(job_id))}.{extension_for(mime)}"


def cli_object_path(owner_user_id: UUID | None, mime: str) -> str:
    """A fresh object path for a CLI run (no job to make it deterministic)."""
    owner = str(UUID(str(owner_user_id))) if owner_user_id else "cli"
    return f"{owner}/cli-{uuid4()}.{extension_for(mime)}"


class StorageConfigError(StorageError, ConfigError):
    """Storage refused the key, or the bucket does not exist: the operator must fix the configuration."""


class Storage(Protocol):
    """An object store for images."""

    bucket: str

    def put(self, path: str, data: bytes, mime: str) -> StoredObject:
        """Create or replace the object at `path`."""
        ...

    def delete(self, path: str) -> bool:
        """Remove the object; missing is fine. Whether there was one."""
        ...


class LocalStorage:
    """Objects as files under `root/bucket/`, written atomically (temp file + rename)."""

    MAX_FOLDERS = 4096  # folders whose check `put` remembers; forgotten all at once past this

    def __init__(self, root: Path, bucket: str) -> None:
        self.root = root
        self.bucket = bucket
        self._folders: dict[str, Path] = {}

    @cached_property
    def _base(self) -> Path:
        return (self.root / self.bucket).resolve()

    def _file(self, path: str) -> Path:
        base = self._base
        target = (base / path).resolve()
        if base not in target.parents:
            raise StorageError(f"object path {path!r} escapes the storage folder")
        return target

    def _folder(self, folder: str) -> Path:
        """The object folder, resolved, checked to be inside the bucket and created, once per process.

        Resolving follows every symlink on the way (a system call per component), and a job's
        object lands in its owner's folder: `put` would pay that for the same few folders on
        every job. Only the folder needs it: the rename replaces a link at the file's own name
        rather than following it.
        """
        known = self._folders.get(folder)
        if known is not None:
            return known
        base = self._base
        resolved = (base / folder).resolve() if folder else base
        if resolved != base and base not in resolved.parents:
            raise StorageError(f"object path folder {folder!r} escapes the storage folder")
        resolved.mkdir(parents=True, exist_ok=True)
        if len(self._folders) >= self.MAX_FOLDERS:
            self._folders.clear()
        self._folders[folder] = resolved
        return resolved

    def put(self, path: str, data: bytes, mime: str) -> StoredObject:
        folder, _, name = path.rpartition("/")
        if name in ("", ".", "..") or path.startswith("/"):
            raise StorageError(f"object path {path!r} escapes the storage folder")
        try:
            try:
                replace_atomically(self._folder(folder) / name, data, durable=False, prefix=".upload-")
            except FileNotFoundError:
                # The folder went away since it was checked (pruned by hand): check and create it again.
                self._folders.pop(folder, None)
                replace_atomically(self._folder(folder) / name, data, durable=False, prefix=".upload-")
        except OSError as exc:
            raise StorageError(
                f"cannot write {self.root / self.bucket / path}: {exc.strerror or exc}"
            ) from None
        return StoredObject(bucket=self.bucket, path=path, bytes=len(data))

    def delete(self, path: str) -> bool:
        try:
            self._file(path).unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(
                f"cannot remove {self.root / self.bucket / path}: {exc.strerror or exc}"
            ) from None
        return True

    def local_path(self, path: str) -> Path:
        """The file an object is, checked to stay inside the bucket folder (the dashboard serves it)."""
        return self._file(path)


class SupabaseStorage:
    """Supabase Storage through supabase-py, authenticated with the service role key."""

    def __init__(self, url: str, key: str, bucket: str, *, timeout: float = 60.0) -> None:
        import httpx
        from supabase import ClientOptions, create_client

        self.bucket = bucket
        self._key = key
        # Our own httpx client: a float timeout, and none of storage3's deprecated timeout arguments.
        http = httpx.Client(timeout=timeout, follow_redirects=True)
        self._client = create_client(url, key, options=ClientOptions(httpx_client=http))

    def _redact(self, text: str) -> str:
        # A proxy or gateway may echo request headers into its error body; the key must not travel on.
        return text.replace(self._key, "***") if self._key else text

    def _check_path(self, path: str, action: str) -> None:
        # storage3 raises ValueError for dot segments, which would otherwise read as a transient failure.
        if any(part in ("", ".", "..") for part in unquote(path).split("/")):
            raise StorageError(f"storage {action} {self.bucket}/{path!r} refused: not a plain object path")

    def _translate(self, exc: Exception, action: str, path: str) -> StorageError:
        from storage3.exceptions import StorageApiError

        if isinstance(exc, StorageApiError):
            try:
                status = int(str(exc.status))
            except ValueError:
                status = 0
            text = self._redact(
                f"storage {action} {self.bucket}/{path} failed: {exc.code} ({status}): {exc.message}"
            )
            if status == 429 or status >= 500:  # 544: storage's database timed out
                return TransientStorageError(text)
            if status in (401, 403):
                return StorageConfigError(f"{text}; check SUPABASE_SERVICE_ROLE_KEY and SUPABASE_URL")
            if status == 404 and "bucket" in f"{exc.code} {exc.message}".lower():
                return StorageConfigError(
                    f"{text}; create the bucket {self.bucket!r} (docs/supabase.md) or set IMAGEN_BUCKET"
                )
            return StorageError(text)  # 413 EntityTooLarge and the like: retrying cannot help
        # httpx transport errors: the service may be back in a moment.
        return TransientStorageError(
            self._redact(f"storage {action} {self.bucket}/{path} failed: {type(exc).__name__}: {exc}")
        )

    def put(self, path: str, data: bytes, mime: str) -> StoredObject:
        from storage3.exceptions import StorageApiError

        self._check_path(path, "upload")
        bucket = self._client.storage.from_(self.bucket)
        try:
            bucket.upload(path, data, {"content-type": mime, "upsert": "true", "cache-control": "3600"})
        except StorageApiError as exc:
            # Storage answers a duplicate as HTTP 400 with statusCode "409" in the body; with upsert
            # that means a concurrent run of this stage got there first with the same bytes.
            if str(exc.status) == "409" or exc.code in ("Duplicate", "ResourceAlreadyExists"):
                log.info("storage: %s/%s already exists; keeping it", self.bucket, path)
                return StoredObject(bucket=self.bucket, path=path, bytes=len(data))
            raise self._translate(exc, "upload", path) from None
        except Exception as exc:
            raise self._translate(exc, "upload", path) from None
        return StoredObject(bucket=self.bucket, path=path, bytes=len(data))

    def delete(self, path: str) -> bool:
        self._check_path(path, "delete")
        try:
            removed = self._client.storage.from_(self.bucket).remove([path])
        except Exception as exc:
            raise self._translate(exc, "delete", path) from None
        return bool(removed)  # the objects Storage removed: none when there was none

    def check_bucket(self) -> None:
        """Raise StorageConfigError unless the bucket exists and the key may read it (a clear
        start for a live run, instead of a first upload that fails)."""
        try:
            self._client.storage.get_bucket(self.bucket)
        except Exception as exc:
            raise self._translate(exc, "bucket check", "") from None


def open_storage(settings: Settings) -> Storage:
    """The storage configured by IMAGEN_STORAGE (local unless SUPABASE_URL is set)."""
    if settings.storage_kind == "supabase":
        if not settings.supabase_url or not settings.supabase_service_role_key:
            raise ConfigError("IMAGEN_STORAGE=supabase needs SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY")
        return SupabaseStorage(
            settings.supabase_url, settings.supabase_service_role_key.get_secret_value(), settings.bucket
        )
    return LocalStorage(settings.storage_dir, settings.bucket)
