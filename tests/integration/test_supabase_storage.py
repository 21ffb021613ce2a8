"""SupabaseStorage through the real supabase-py client against a local Storage double speaking its wire format."""

from __future__ import annotations

import io
import socket
import uuid
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image
from storage3.exceptions import StorageApiError

from imagen.errors import ConfigError, StorageError, TransientStorageError
from imagen.storage import StoredObject, SupabaseStorage, job_object_path
from tests.fake_storage import (
    DATABASE_TIMEOUT,
    DEFAULT_BUCKET,
    DEFAULT_KEY,
    DUPLICATE,
    FakeStorage,
    fake_storage,
)

OWNER = uuid.UUID("6f1c2d3e-4b5a-4c6d-8e7f-901a2b3c4d5e")
JOB = uuid.UUID("0a1b2c3d-4e5f-4a6b-9c7d-8e9f0a1b2c3d")
PATH = f"{OWNER}/{JOB}.png"


def png(colour: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def server() -> Iterator[FakeStorage]:
    with fake_storage() as storage:
        yield storage


@pytest.fixture
def storage(server: FakeStorage) -> SupabaseStorage:
    return SupabaseStorage(server.url, DEFAULT_KEY, DEFAULT_BUCKET, timeout=5)


def refused_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def assert_no_key(exc: BaseException, key: str = DEFAULT_KEY) -> None:
    for text in (str(exc), repr(exc), *map(str, exc.args)):
        assert key not in text, text


def test_upload_stores_exact_bytes_at_exact_path_as_png_with_upsert(
    server: FakeStorage, storage: SupabaseStorage
) -> None:
    data = png()

    stored = storage.put(PATH, data, "image/png")

    assert stored == StoredObject(bucket=DEFAULT_BUCKET, path=PATH, bytes=len(data))
    assert server.objects == {(DEFAULT_BUCKET, PATH): (data, "image/png")}
    (upload,) = server.requests_to("POST")
    assert upload.path == f"/storage/v1/object/{DEFAULT_BUCKET}/{PATH}"
    assert upload.headers["x-upsert"] == "true"
    assert upload.headers["apikey"] == DEFAULT_KEY
    assert upload.headers["authorization"] == f"Bearer {DEFAULT_KEY}"
    part = upload.form["file"]
    assert part.content_type == "image/png"
    assert part.filename == f"{JOB}.png"
    assert part.data == data


def test_uploading_the_same_path_twice_keeps_one_object_with_the_latest_bytes(
    server: FakeStorage, storage: SupabaseStorage
) -> None:
    storage.put(PATH, png("red"), "image/png")
    storage.put(PATH, png("blue"), "image/png")

    assert list(server.objects) == [(DEFAULT_BUCKET, PATH)]
    assert server.objects[(DEFAULT_BUCKET, PATH)][0] == png("blue")
    assert len(server.requests_to("POST")) == 2


def test_double_answers_an_existing_object_without_upsert_as_400_with_409_in_the_body(
    server: FakeStorage,
) -> None:
    # The contract the duplicate handling relies on, checked through storage3 itself.
    from supabase import create_client

    bucket = create_client(server.url, DEFAULT_KEY).storage.from_(DEFAULT_BUCKET)
    bucket.upload(PATH, png("red"), {"content-type": "image/png"})

    with pytest.raises(StorageApiError) as caught:
        bucket.upload(PATH, png("blue"), {"content-type": "image/png"})

    assert str(caught.value.status) == "409"
    assert caught.value.code == "Duplicate"
    assert server.objects[(DEFAULT_BUCKET, PATH)][0] == png("red")
    raw = httpx.post(
        f"{server.url}/storage/v1/object/{DEFAULT_BUCKET}/{PATH}",
        headers={"apikey": DEFAULT_KEY, "authorization": f"Bearer {DEFAULT_KEY}"},
        files={"file": ("x.png", png(), "image/png")},
    )
    assert raw.status_code == 400
    assert raw.json()["statusCode"] == "409"


def test_duplicate_answer_counts_as_a_successful_upload(
    server: FakeStorage, storage: SupabaseStorage
) -> None:
    data = png()
    server.fail_next(1, 400, DUPLICATE)

    stored = storage.put(PATH, data, "image/png")

    assert stored == StoredObject(bucket=DEFAULT_BUCKET, path=PATH, bytes=len(data))


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (503, None),
        (500, None),
        (429, None),
        (502, b"<html><body>502 Bad Gateway</body></html>"),
    ],
    ids=["503", "500", "429", "502-html"],
)
def test_server_errors_and_rate_limits_are_transient(
    server: FakeStorage, storage: SupabaseStorage, status: int, body: bytes | None
) -> None:
    server.fail_next(1, status, body)

    with pytest.raises(TransientStorageError) as caught:
        storage.put(PATH, png(), "image/png")

    assert caught.value.is_transient
    assert str(status) in str(caught.value)
    assert server.objects == {}


def test_upload_succeeds_once_the_transient_failure_has_passed(
    server: FakeStorage, storage: SupabaseStorage
) -> None:
    server.fail_next(1, 503)
    with pytest.raises(TransientStorageError):
        storage.put(PATH, png(), "image/png")

    storage.put(PATH, png(), "image/png")

    assert (DEFAULT_BUCKET, PATH) in server.objects


@pytest.mark.parametrize("http_status", [403, 400], ids=["http-403", "http-400-body-403"])
def test_forbidden_is_a_storage_error_that_is_not_transient(
    server: FakeStorage, storage: SupabaseStorage, http_status: int
) -> None:
    # The main API sends non-5xx errors as HTTP 400 with the real status in the body.
    body = {
        "statusCode": "403",
        "error": "Unauthorized",
        "message": "new row violates row-level security policy",
    }
    server.fail_next(1, http_status, body)

    with pytest.raises(StorageError) as caught:
        storage.put(PATH, png(), "image/png")

    assert not isinstance(caught.value, TransientStorageError)
    assert caught.value.is_transient is False
    assert "403" in str(caught.value)
    assert "row-level security" in str(caught.value)


@pytest.mark.parametrize("gateway", [False, True], ids=["storage-400-body-403", "gateway-401"])
def test_wrong_key_is_rejected_permanently_as_configuration_without_echoing_either_key(gateway: bool) -> None:
    """Storage answers a key that does not verify as HTTP 400 with statusCode "403"; the API gateway
    answers an apikey it does not know as HTTP 401 with a body that is not storage's shape."""
    wrong = "sb_secret_wrong-key-abcdefghijklmnop"
    with fake_storage(gateway=gateway) as server:
        storage = SupabaseStorage(server.url, wrong, DEFAULT_BUCKET, timeout=5)
        with pytest.raises(StorageError) as caught:
            storage.put(PATH, png(), "image/png")
        assert len(server.requests) == 1
        assert server.objects == {}

    assert caught.value.is_transient is False
    assert isinstance(caught.value, ConfigError)
    assert ("401" if gateway else "403") in str(caught.value)
    assert "check SUPABASE_SERVICE_ROLE_KEY" in str(caught.value)
    assert_no_key(caught.value, wrong)
    assert_no_key(caught.value, DEFAULT_KEY)


def test_an_object_over_the_size_limit_is_a_permanent_error() -> None:
    with fake_storage(max_bytes=10) as server:
        storage = SupabaseStorage(server.url, DEFAULT_KEY, DEFAULT_BUCKET, timeout=5)
        with pytest.raises(StorageError) as caught:
            storage.put(PATH, png(), "image/png")
        assert server.objects == {}

    assert not isinstance(caught.value, TransientStorageError)
    assert "413" in str(caught.value) and "exceeded the maximum allowed size" in str(caught.value)


def test_storages_database_timeout_is_transient(server: FakeStorage, storage: SupabaseStorage) -> None:
    server.fail_next(1, 544, DATABASE_TIMEOUT)

    with pytest.raises(TransientStorageError) as caught:
        storage.put(PATH, png(), "image/png")

    assert "544" in str(caught.value) and "timed out" in str(caught.value)
    storage.put(PATH, png(), "image/png")
    assert (DEFAULT_BUCKET, PATH) in server.objects


def test_double_answers_a_bulk_delete_in_a_missing_bucket_with_200_and_nothing(server: FakeStorage) -> None:
    storage = SupabaseStorage(server.url, DEFAULT_KEY, "no-such-bucket", timeout=5)

    storage.delete(PATH)  # as the real service: nothing to delete, no error

    (request,) = server.requests_to("DELETE")
    assert request.path.endswith("/object/no-such-bucket")


def test_missing_bucket_is_a_permanent_error_naming_the_bucket(server: FakeStorage) -> None:
    storage = SupabaseStorage(server.url, DEFAULT_KEY, "no-such-bucket", timeout=5)

    with pytest.raises(StorageError) as caught:
        storage.put(PATH, png(), "image/png")

    assert caught.value.is_transient is False
    assert isinstance(caught.value, ConfigError)
    assert "no-such-bucket" in str(caught.value) and "create the bucket" in str(caught.value)


def test_connection_refused_is_transient() -> None:
    storage = SupabaseStorage(refused_url(), DEFAULT_KEY, DEFAULT_BUCKET, timeout=5)

    with pytest.raises(TransientStorageError) as caught:
        storage.put(PATH, png(), "image/png")

    assert caught.value.is_transient
    assert_no_key(caught.value)


def test_service_key_never_appears_in_error_text_even_when_the_server_echoes_it(
    server: FakeStorage, storage: SupabaseStorage
) -> None:
    errors: list[BaseException] = []
    scripted: list[tuple[int, dict[str, str] | bytes | None]] = [
        (503, None),
        (403, None),
        (400, {"statusCode": "403", "error": "Unauthorized", "message": f"bad key {DEFAULT_KEY}"}),
        (502, f"<html>upstream rejected apikey={DEFAULT_KEY}</html>".encode()),
    ]
    for status, body in scripted:
        server.fail_next(1, status, body)
        with pytest.raises(StorageError) as caught:
            storage.put(PATH, png(), "image/png")
        errors.append(caught.value)
    server.fail_next(1, 503)
    with pytest.raises(StorageError) as caught:
        storage.delete(PATH)
    errors.append(caught.value)

    assert len(errors) == 5
    for error in errors:
        assert_no_key(error)


def test_delete_removes_the_object_and_deleting_a_missing_one_is_fine(
    server: FakeStorage, storage: SupabaseStorage
) -> None:
    other = f"{OWNER}/{uuid.uuid4()}.png"
    storage.put(PATH, png(), "image/png")
    storage.put(other, png(), "image/png")

    storage.delete(PATH)
    storage.delete(PATH)

    assert list(server.objects) == [(DEFAULT_BUCKET, other)]
    remove = server.requests_to("DELETE")[0]
    assert remove.path == f"/storage/v1/object/{DEFAULT_BUCKET}"
    assert remove.json() == {"prefixes": [PATH]}


@pytest.mark.parametrize("path", ["../../etc/passwd.png", "a/./b.png", "%2e%2e/x.png", "a//b.png", ""])
@pytest.mark.parametrize("action", ["put", "delete"])
def test_a_path_that_is_not_plain_is_refused_permanently_before_any_request(
    server: FakeStorage, storage: SupabaseStorage, path: str, action: str
) -> None:
    calls = {
        "put": lambda: storage.put(path, png(), "image/png"),
        "delete": lambda: storage.delete(path),
    }

    with pytest.raises(StorageError) as caught:
        calls[action]()

    assert caught.value.is_transient is False
    assert server.requests == []


def test_job_object_path_is_owner_slash_job_with_the_mime_extension() -> None:
    assert job_object_path(OWNER, JOB, "image/png") == f"{OWNER}/{JOB}.png"
    assert job_object_path(OWNER, JOB, "image/jpeg") == f"{OWNER}/{JOB}.jpg"
    assert job_object_path(OWNER, JOB, "image/webp") == f"{OWNER}/{JOB}.webp"


def test_job_object_path_is_canonical_for_uuid_strings_in_any_case() -> None:
    upper = str(OWNER).upper()

    assert job_object_path(upper, str(JOB), "image/png") == f"{OWNER}/{JOB}.png"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("owner", "job"),
    [
        ("../../etc", JOB),
        (OWNER, "../../etc/passwd"),
        (OWNER, f"{JOB}/../x"),
        ("", JOB),
    ],
    ids=["owner-traversal", "job-traversal", "job-suffix", "owner-empty"],
)
def test_job_object_path_rejects_anything_that_is_not_a_uuid(owner: object, job: object) -> None:
    with pytest.raises(ValueError):
        job_object_path(owner, job, "image/png")  # type: ignore[arg-type]


def test_job_object_path_rejects_an_unstorable_mime() -> None:
    with pytest.raises(StorageError, match="image/gif"):
        job_object_path(OWNER, JOB, "image/gif")


def test_uploaded_object_reads_back_as_the_same_png(server: FakeStorage, storage: SupabaseStorage) -> None:
    data = png("green")
    storage.put(PATH, data, "image/png")

    response = httpx.get(
        f"{server.url}/storage/v1/object/{DEFAULT_BUCKET}/{PATH}",
        headers={"apikey": DEFAULT_KEY, "authorization": f"Bearer {DEFAULT_KEY}"},
    )

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content == data
    with Image.open(io.BytesIO(response.content)) as img:
        assert img.size == (8, 6)
