"""LocalStorage: objects as files under root/bucket, replaced atomically, never outside that folder."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from imagen.errors import StorageError
from imagen.storage import LocalStorage, StoredObject

OWNER = "6f1c2d3e-4b5a-4c6d-8e7f-901a2b3c4d5e"
PATH = f"{OWNER}/0a1b2c3d-4e5f-4a6b-9c7d-8e9f0a1b2c3d.png"


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "root", "imagen")


def object_exists(storage: LocalStorage, path: str) -> bool:
    """Whether the object's file is there (LocalStorage has no test-only `exists`)."""
    return storage.local_path(path).is_file()


def leftovers(folder: Path) -> list[str]:
    """Every file under `folder` whose name marks it as a temporary upload."""
    return [p.name for p in folder.rglob("*") if p.name.startswith(".upload-")]


def test_put_writes_the_bytes_under_root_and_bucket(storage: LocalStorage, tmp_path: Path) -> None:
    stored = storage.put(PATH, b"png bytes", "image/png")

    assert stored == StoredObject(bucket="imagen", path=PATH, bytes=9)
    assert (tmp_path / "root" / "imagen" / PATH).read_bytes() == b"png bytes"
    assert storage.local_path(PATH) == (tmp_path / "root" / "imagen" / PATH).resolve()


def test_exists_is_false_before_put_and_true_after(storage: LocalStorage) -> None:
    assert object_exists(storage, PATH) is False

    storage.put(PATH, b"x", "image/png")

    assert object_exists(storage, PATH) is True


def test_delete_removes_the_object_and_deleting_a_missing_one_is_fine(storage: LocalStorage) -> None:
    storage.put(PATH, b"x", "image/png")

    storage.delete(PATH)
    storage.delete(PATH)

    assert object_exists(storage, PATH) is False


def test_second_put_replaces_the_object_and_leaves_no_temporary_files(
    storage: LocalStorage, tmp_path: Path
) -> None:
    storage.put(PATH, b"first version, longer", "image/png")
    storage.put(PATH, b"second", "image/png")

    assert storage.local_path(PATH).read_bytes() == b"second"
    assert [p.name for p in storage.local_path(PATH).parent.iterdir()] == [Path(PATH).name]
    assert leftovers(tmp_path) == []


def test_put_replaces_by_rename_so_a_reader_holding_the_old_file_still_sees_it_whole(
    storage: LocalStorage,
) -> None:
    storage.put(PATH, b"old" * 1000, "image/png")
    old_inode = os.stat(storage.local_path(PATH)).st_ino

    with open(storage.local_path(PATH), "rb") as reader:
        storage.put(PATH, b"new", "image/png")
        assert reader.read() == b"old" * 1000

    assert os.stat(storage.local_path(PATH)).st_ino != old_inode
    assert storage.local_path(PATH).read_bytes() == b"new"


def test_concurrent_puts_leave_one_complete_object(storage: LocalStorage, tmp_path: Path) -> None:
    payloads = [bytes([i]) * 50_000 for i in range(8)]
    errors: list[BaseException] = []

    def put(data: bytes) -> None:
        try:
            storage.put(PATH, data, "image/png")
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(data,)) for data in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert errors == []
    assert storage.local_path(PATH).read_bytes() in payloads
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "path",
    ["../escape.png", "../../etc/passwd", f"{OWNER}/../../escape.png", "/etc/passwd", "", "."],
)
def test_paths_escaping_the_bucket_folder_are_refused(
    storage: LocalStorage, tmp_path: Path, path: str
) -> None:
    for action in (
        lambda: storage.put(path, b"x", "image/png"),
        lambda: storage.local_path(path),
        lambda: storage.delete(path),
    ):
        with pytest.raises(StorageError, match="escapes"):
            action()

    assert not (tmp_path / "root" / "escape.png").exists()
    assert not (tmp_path / "escape.png").exists()


def test_a_symlink_pointing_outside_the_bucket_is_refused(storage: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    bucket = tmp_path / "root" / "imagen"
    bucket.mkdir(parents=True)
    (bucket / "link").symlink_to(outside, target_is_directory=True)

    with pytest.raises(StorageError, match="escapes"):
        storage.put("link/x.png", b"x", "image/png")

    assert list(outside.iterdir()) == []


def test_put_into_a_folder_removed_since_the_last_put_creates_it_again(
    storage: LocalStorage, tmp_path: Path
) -> None:
    # put checks and creates a folder once per process; an operator pruning folders by hand
    # must not make the next upload fail.
    storage.put(PATH, b"first", "image/png")
    shutil.rmtree(storage.local_path(PATH).parent)

    storage.put(PATH, b"second", "image/png")

    assert storage.local_path(PATH).read_bytes() == b"second"
    assert leftovers(tmp_path) == []


def test_a_failed_write_raises_storage_error_and_leaves_no_temporary_file(
    storage: LocalStorage, tmp_path: Path
) -> None:
    storage.local_path(PATH).mkdir(parents=True)  # a folder where the object should go

    with pytest.raises(StorageError, match="cannot write"):
        storage.put(PATH, b"x", "image/png")

    assert leftovers(tmp_path) == []
