"""Serving a job's image to the dashboard: the file from local storage, or a signed URL.

Local storage: the app reads the object itself (through `LocalStorage`, which
refuses paths that leave its folder) and scales thumbnails with Pillow, kept in
a small in-memory cache. Supabase Storage: the browser is redirected to a signed
URL that expires in a minute, so the service key never leaves the server and the
bucket can stay private.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from imagen.config import Settings
from imagen.errors import StorageError
from imagen.storage import LocalStorage

THUMB_SIZE = 160
SIGNED_URL_SECONDS = 60


class ImageSource:
    """Where the dashboard gets image bytes or addresses; one per app."""

    def __init__(self, settings: Settings, cache_size: int = 512) -> None:
        self.settings = settings
        self._thumbs: OrderedDict[tuple[str, float], bytes] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._supabase: Any = None

    @property
    def is_local(self) -> bool:
        return self.settings.storage_kind == "local"

    def local_file(self, row: dict[str, Any]) -> Path:
        """The file of an image row in local storage; StorageError when it is gone or outside the folder."""
        path = LocalStorage(self.settings.storage_dir, row["bucket"]).local_path(row["path"])
        if not path.is_file():
            raise StorageError(f"image file {row['bucket']}/{row['path']} is missing from local storage")
        return path

    def thumbnail(self, row: dict[str, Any]) -> bytes:
        """A PNG at most THUMB_SIZE pixels a side, cached by path and modification time."""
        from PIL import Image

        path = self.local_file(row)
        key = (str(path), path.stat().st_mtime)
        with self._lock:
            cached = self._thumbs.get(key)
            if cached is not None:
                self._thumbs.move_to_end(key)
                return cached
        with Image.open(path) as image:
            image.thumbnail((THUMB_SIZE, THUMB_SIZE))
            out = io.BytesIO()
            image.save(out, format="PNG", optimize=True)
        data = out.getvalue()
        with self._lock:
            self._thumbs[key] = data
            while len(self._thumbs) > self._cache_size:
                self._thumbs.popitem(last=False)
        return data

    def signed_url(self, row: dict[str, Any]) -> str:
        """A short-lived URL of the object in Supabase Storage."""
        settings = self.settings
        if not settings.supabase_url or not settings.supabase_service_role_key:
            raise StorageError("IMAGEN_STORAGE=supabase needs SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY")
        if self._supabase is None:
            import httpx
            from supabase import ClientOptions, create_client

            # Our own httpx client, as imagen.storage does: a short timeout, no deprecated arguments.
            http = httpx.Client(timeout=10.0, follow_redirects=True)
            self._supabase = create_client(
                settings.supabase_url,
                settings.supabase_service_role_key.get_secret_value(),
                options=ClientOptions(httpx_client=http),
            )
        try:
            signed = self._supabase.storage.from_(row["bucket"]).create_signed_url(
                row["path"], SIGNED_URL_SECONDS
            )
        except Exception as exc:
            raise StorageError(f"cannot sign {row['bucket']}/{row['path']}: {type(exc).__name__}") from None
        url = signed.get("signedURL") or signed.get("signedUrl")
        if not url:
            raise StorageError(f"storage gave no signed URL for {row['bucket']}/{row['path']}")
        return str(url)
