"""The local writer: generated images into a folder, each with a JSON sidecar.

CLI runs get readable names that never clobber an earlier file, even with
several writers in one folder: a name is claimed with O_CREAT|O_EXCL, never
checked and then opened. Pipeline runs pass a job id and get a deterministic
name, replaced atomically, so a redelivered job leaves one file, not two. The
writer never uploads and never touches the database.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imagen.backends.base import GeneratedImage
from imagen.errors import PermanentError, StorageError

# The one MIME table: the writer names files and storage names objects with it.
IMAGE_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/jpg": "jpg", "image/webp": "webp"}
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_MAX_COLLISIONS = 10_000


@dataclass(frozen=True)
class WrittenImage:
    """An image on disk: its file, its sidecar and what was written."""

    path: Path
    sidecar: Path
    image: GeneratedImage


def write_images(
    out_dir: Path,
    images: Sequence[GeneratedImage],
    *,
    prompt: str,
    preset: str | None,
    params: Mapping[str, Any],
    backend: str,
    model: str,
    usage: Mapping[str, Any] | None,
    created_at: datetime,
    job_id: str | None = None,
    name_hint: str | None = None,
) -> list[WrittenImage]:
    """Write each image and its sidecar into `out_dir` (created if missing).

    Names are `{created_at:%Y%m%d-%H%M%S}-{slug}-s{seed}-{index}.{ext}` (UTC; the
    `-s{seed}` part is left out when the seed is unknown), with `-2`, `-3`...
    appended on collision. The slug comes from `name_hint` when given, else from
    `prompt` (the prompt as sent). With `job_id` the names are `{job_id}.{ext}`,
    then `{job_id}-1.{ext}`... for further images, overwritten atomically.
    A naive `created_at` is taken as UTC. Filesystem failures raise `StorageError`.
    """
    if job_id is not None and not _JOB_ID.match(job_id):
        raise ValueError(f"job_id {job_id!r} is not usable as a file name")
    created_utc = created_at.replace(tzinfo=UTC) if created_at.tzinfo is None else created_at.astimezone(UTC)
    slug = slugify(name_hint or prompt)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from None
    written = []
    for position, image in enumerate(images):
        ext = _extension(image.mime)
        seed = image.seed if image.seed is not None else _int_or_none(params.get("seed"))
        meta = {
            "prompt": prompt,
            "preset": preset,
            "params": dict(params),
            "backend": backend,
            "model": model,
            "seed": seed,
            "index": image.index,
            "width": image.width,
            "height": image.height,
            "mime": image.mime,
            "bytes": len(image.data),
            "sha256": hashlib.sha256(image.data).hexdigest(),
            "usage": dict(usage) if usage is not None else None,
            "created_at": created_utc.isoformat(),
            "job_id": job_id,
        }
        try:
            if job_id is not None:
                stem = job_id if position == 0 else f"{job_id}-{position}"
                path = _write_job_image(out_dir / f"{stem}.{ext}", image.data, meta)
            else:
                seed_part = f"-s{seed}" if seed is not None else ""
                base = f"{created_utc:%Y%m%d-%H%M%S}-{slug}{seed_part}-{image.index}"
                path = _write_new_image(out_dir, base, ext, image.data, meta)
        except OSError as exc:
            raise StorageError(f"cannot write image into {out_dir}: {exc.strerror or exc}") from None
        written.append(WrittenImage(path=path, sidecar=_sidecar(path), image=image))
    return written


def slugify(text: str, max_len: int = 40) -> str:
    """A file-name-safe slug: lowercase ASCII letters, digits and single '-', never empty.

    Accents are folded ("café" -> "cafe"); anything else outside a-z0-9 becomes a
    separator, so the slug can hold no '/', '\\' or '..'. Cut at a word boundary
    where one falls in the second half of `max_len`. Falls back to "image".
    """
    if max_len < 1:
        raise ValueError("max_len must be at least 1")
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    if len(slug) > max_len:
        cut = slug[: max_len + 1]
        boundary = cut.rfind("-")
        slug = cut[:boundary] if boundary >= max_len // 2 else slug[:max_len]
        slug = slug.strip("-")
    return slug or "image"


def image_extension(mime: str) -> str | None:
    """The file extension for an image MIME type (parameters and case ignored), None if unsupported."""
    return IMAGE_EXTENSIONS.get(mime.split(";")[0].strip().lower())


def _extension(mime: str) -> str:
    ext = image_extension(mime)
    if ext is None:
        raise PermanentError(f"cannot write an image of type {mime!r} (expected png, jpeg or webp)")
    return ext


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _sidecar_bytes(path: Path, meta: Mapping[str, Any]) -> bytes:
    text = json.dumps({**meta, "file": path.name}, indent=2, ensure_ascii=False, default=str)
    return (text + "\n").encode("utf-8")


def _write_job_image(path: Path, data: bytes, meta: Mapping[str, Any]) -> Path:
    """Replace the job's image, then its sidecar: a rerun leaves the same two files.

    No fsync: a job's local copy is a convenience (storage holds the image), and two
    fsyncs per job would cost the pipeline more than the whole mock generation.
    """
    replace_atomically(path, data, durable=False)
    replace_atomically(_sidecar(path), _sidecar_bytes(path, meta), durable=False)
    return path


def _write_new_image(out_dir: Path, base: str, ext: str, data: bytes, meta: Mapping[str, Any]) -> Path:
    """Claim `{base}.{ext}` or the first free `{base}-N.{ext}`, with its sidecar, and write both.

    Both names are claimed with O_EXCL, so two writers can never pick the same
    one, and an image never takes over the sidecar of an older one of another
    type. On failure neither file is left behind.
    """
    for attempt in range(1, _MAX_COLLISIONS + 1):
        stem = base if attempt == 1 else f"{base}-{attempt}"
        path = out_dir / f"{stem}.{ext}"
        sidecar = _sidecar(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        is_claimed = False
        try:
            with os.fdopen(fd, "wb") as fh:
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(sidecar, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                    is_claimed = True
                if is_claimed:
                    fh.write(data)
            if is_claimed:
                replace_atomically(sidecar, _sidecar_bytes(path, meta))
        except BaseException:
            _unlink_quietly(path)
            if is_claimed:
                _unlink_quietly(sidecar)
            raise
        if not is_claimed:
            _unlink_quietly(path)
            continue
        return path
    raise StorageError(f"no free file name for {base}.{ext} in {out_dir} after {_MAX_COLLISIONS} tries")


def replace_atomically(path: Path, data: bytes, *, durable: bool = True, prefix: str = ".") -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename over `path`.

    os.replace within one directory is atomic on POSIX, so a reader (or a crash)
    sees the old file or the new one, never half of one. The fsync keeps a power
    loss from leaving a renamed but empty file. The temporary name starts with
    `prefix`. Not tempfile.mkstemp: it creates mode 0600, which the rename would
    carry over to the image, and costs two more system calls a file.
    """
    tmp = path.with_name(f"{prefix}{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to a raw descriptor.

    Not os.fdopen: a buffered file object costs three more system calls per file
    (fstat, an isatty ioctl, lseek), and the pipeline writes three files a job.
    """
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
