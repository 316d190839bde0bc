"""Artifact store: where adapters, checkpoints, run state and datasets live when several hosts share them.

One small interface (`ArtifactStore`) with two implementations: `LocalStore(root)`, a directory (the
default; also a shared mount such as NFS), and `S3Store(...)`, any S3-compatible object store through
boto3 (AWS S3, MinIO, Ceph, moto). Keys are '/'-separated relative paths ("runs/job_1/progress.json").

Atomic publish: a single object write is atomic in both stores (a temp file + rename locally; one PUT in
S3), but a directory is many objects. `publish` writes every file first and the marker object (e.g.
`record.json`) last, so a crash leaves at worst files without a marker; readers only treat a directory as
present when its marker exists (`is_published`). The marker can be written only-if-absent, so two hosts
can never both publish the same immutable version.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

from cltune.adapter_files import RECORD
from cltune.errors import (
    ConflictError,
    InvalidNameError,
    MissingDependencyError,
    NotFoundError,
    StoreError,
)

MARKER = RECORD  # the default marker: the registry's record is written last


class ArtifactStore(Protocol):
    """Objects by key. Every write of one key is atomic; readers never see half an object."""

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> None:
        """Store the file at `path` under `key`. `if_absent`: raise ConflictError if the key exists."""
        ...

    def get_file(self, key: str, path: Path) -> None:
        """Write the object to `path` (atomically: a temp file, then a rename). Raises NotFoundError."""
        ...

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None: ...

    def get_bytes(self, key: str) -> bytes:
        """Raises NotFoundError."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[str]:
        """Every key under `prefix` ('' = all), sorted; prefix 'a/b' matches 'a/b/...' only."""
        ...

    def delete(self, key: str) -> None:
        """Remove one key; a missing key is not an error."""
        ...


def check_key(key: str) -> str:
    """A safe relative key: no leading '/', no '.', '..' or empty parts, no backslashes."""
    parts = key.split("/")
    if not key or "\\" in key or any(p in ("", ".", "..") for p in parts) or "\x00" in key:
        raise InvalidNameError(f"invalid artifact key {key!r}: use a relative path like 'runs/job_1/x.json'")
    return key


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


# ---------------------------------------------------------------- local directory


class LocalStore:
    """A directory as an object store. Writes go to a temp file in the target directory, then one
    rename (or, for `if_absent`, one hard link, which fails if the name exists)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".put-")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            _commit(Path(tmp), dest, key, if_absent)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".put-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            _commit(Path(tmp), dest, key, if_absent)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def get_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFoundError(f"no artifact {key!r} in {self!r}", key=key)
        _atomic_copy(src, Path(path))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise NotFoundError(f"no artifact {key!r} in {self!r}", key=key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        out = []
        for p in base.rglob("*"):
            if p.is_file() and not p.name.startswith(".put-"):  # skip writes in flight
                out.append(p.relative_to(self.root).as_posix())
        return sorted(out)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def _commit(tmp: Path, dest: Path, key: str, if_absent: bool) -> None:
    if not if_absent:
        os.replace(tmp, dest)
        return
    try:
        os.link(tmp, dest)  # atomic create-if-absent
    except FileExistsError:
        raise ConflictError(f"artifact {key!r} already exists", key=key) from None


def _atomic_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".get-")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


# ---------------------------------------------------------------- S3-compatible


class S3Store:
    """A bucket (and key prefix) in an S3-compatible store.

    Args:
        bucket: the bucket; it must exist (`create_bucket()` makes it, for tests and first set-up).
        prefix: prepended to every key ("" = the bucket root); lets several deployments share a bucket.
        endpoint_url: None for AWS; e.g. "http://minio:9000" for MinIO (path-style addressing is used).
        access_key / secret_key / region: None = boto3's standard chain (AWS_ACCESS_KEY_ID,
            AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, ~/.aws, instance roles).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
    ) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as e:
            raise MissingDependencyError(
                "the S3 artifact store needs boto3: pip install 'cltune[s3]'", package="boto3"
            ) from e
        self.bucket, self.prefix, self.endpoint_url = bucket, prefix.strip("/"), endpoint_url
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=Config(
                s3={"addressing_style": "path"},  # MinIO and moto serve buckets as paths, not host names
                retries={"max_attempts": 5, "mode": "standard"},
            ),
        )

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Store('s3://{self.bucket}/{self.prefix}'{where})"

    def _key(self, key: str) -> str:
        return join(self.prefix, check_key(key))

    def _call(self, op: str, key: str, fn: Any, **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kw)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFoundError(f"no artifact {key!r} in {self!r}", key=key) from None
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise ConflictError(f"artifact {key!r} already exists in {self!r}", key=key) from None
            raise StoreError(f"{op} {key!r} in {self!r} failed: {code}: {e}", key=key) from e
        except BotoCoreError as e:  # connection refused, bad endpoint, no credentials
            raise StoreError(f"{op} {key!r} in {self!r} failed: {e}", key=key) from e

    def create_bucket(self) -> None:
        """Create the bucket if it does not exist."""
        try:
            self._call("head bucket", "", self.client.head_bucket, Bucket=self.bucket)
        except (NotFoundError, StoreError):
            self._call("create bucket", "", self.client.create_bucket, Bucket=self.bucket)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        extra = {"IfNoneMatch": "*"} if if_absent else {}  # S3 conditional write: 412 if the key exists
        self._call(
            "put", key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data, **extra
        )

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> None:
        if if_absent:  # markers are small: a conditional single PUT
            self.put_bytes(key, Path(path).read_bytes(), if_absent=True)
            return
        # upload_file switches to multipart for large files; the object appears only when complete
        self._call(
            "upload", key, self.client.upload_file, Filename=str(path), Bucket=self.bucket, Key=self._key(key)
        )

    def get_bytes(self, key: str) -> bytes:
        obj = self._call("get", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return bytes(obj["Body"].read())

    def get_file(self, key: str, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".get-")
        os.close(fd)
        try:
            self._call(
                "download",
                key,
                self.client.download_file,
                Bucket=self.bucket,
                Key=self._key(key),
                Filename=tmp,
            )
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
            return True
        except NotFoundError:
            return False

    def list(self, prefix: str = "") -> list[str]:
        full = join(self.prefix, check_key(prefix)) if prefix else self.prefix
        start = full + "/" if full else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start)
        out: list[str] = []
        try:
            for page in pages:
                out.extend(
                    o["Key"][len(self.prefix) + 1 if self.prefix else 0 :] for o in page.get("Contents", [])
                )
        except Exception as e:  # botocore errors surface while paging
            raise StoreError(f"list {prefix!r} in {self!r} failed: {e}", key=prefix) from e
        return sorted(out)

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))


# ---------------------------------------------------------------- directories (functions over any store)


def put_dir(store: ArtifactStore, prefix: str, directory: Path, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Upload every file under `directory` to `prefix/<relative path>`. Returns the keys written.
    Not atomic as a whole: use `publish` when readers must never see a partial directory."""
    directory = Path(directory)
    keys = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel not in skip:
            store.put_file(join(prefix, rel), p)
            keys.append(join(prefix, rel))
    return keys


def get_dir(store: ArtifactStore, prefix: str, directory: Path) -> list[Path]:
    """Download every object under `prefix` into `directory`. Returns the files written."""
    out = []
    for key in store.list(prefix):
        dest = Path(directory) / key[len(prefix.strip("/")) + 1 :]
        store.get_file(key, dest)
        out.append(dest)
    return out


def delete_prefix(
    store: ArtifactStore, prefix: str, *, marker: str | None = None, keep: tuple[str, ...] = ()
) -> int:
    """Delete every key under `prefix` but `keep` (names relative to it); when `marker` is given it
    goes first (unpublish, then remove)."""
    kept = {join(prefix, k) for k in keep}
    keys = [k for k in store.list(prefix) if k not in kept]
    if marker is not None and join(prefix, marker) in keys:
        store.delete(join(prefix, marker))
        keys.remove(join(prefix, marker))
    for k in keys:
        store.delete(k)
    return len(keys) + (marker is not None)


def publish(
    store: ArtifactStore, prefix: str, directory: Path, *, marker: str = MARKER, if_absent: bool = True
) -> None:
    """Upload `directory` so readers see all of it or nothing: every file, then `marker` last.

    Raises:
        NotFoundError: `directory` has no `marker` file.
        ConflictError: `if_absent` and the marker already exists (someone published this prefix).
    """
    directory = Path(directory)
    if not (directory / marker).is_file():
        raise NotFoundError(f"{str(directory)!r} has no {marker!r} to publish it with", key=prefix)
    if if_absent and store.exists(join(prefix, marker)):
        raise ConflictError(f"{prefix!r} is already published in {store!r}", key=prefix)
    put_dir(store, prefix, directory, skip=(marker,))
    store.put_file(join(prefix, marker), directory / marker, if_absent=if_absent)


def is_published(store: ArtifactStore, prefix: str, marker: str = MARKER) -> bool:
    return store.exists(join(prefix, marker))


def fetch_published(
    store: ArtifactStore, prefix: str, directory: Path, *, marker: str = MARKER, skip: tuple[str, ...] = ()
) -> None:
    """Download a published directory into `directory` (which must not exist yet); the marker is
    placed last, so a local reader that also looks for the marker never sees a partial copy.

    Raises:
        NotFoundError: `prefix` is not published (no marker), even if some of its files exist.
    """
    if not is_published(store, prefix, marker):
        raise NotFoundError(f"{prefix!r} is not published in {store!r}", key=prefix)
    directory = Path(directory)
    for key in store.list(prefix):
        rel = key[len(prefix.strip("/")) + 1 :]
        if rel != marker and rel not in skip:
            store.get_file(key, directory / rel)
    store.get_file(join(prefix, marker), directory / marker)
