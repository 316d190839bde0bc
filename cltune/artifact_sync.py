"""Keep local directories and an artifact store in step: a run directory (resume on another host) and
an adapter registry (adapters trained on one host, served or continued on another).

Everything stays local-first: training and the Registry read and write local files exactly as on one
machine; these functions copy to and from the store at quiet points (after a checkpoint, at a task's
end, before a job starts).

Run directories are stored as snapshots: content-addressed blobs `<prefix>/blobs/<sha256>` plus one
manifest `<prefix>/manifest.json` ({relative path: sha256}) written last. A crash mid-upload leaves
the previous manifest in force, so a reader always gets one consistent snapshot (never a checkpoint
whose optimizer state belongs to another step than its adapters). Unchanged files are not re-sent.

Registry versions are published with `artifacts.publish`: files, then record.json last (only-if-absent).
Version numbers are allocated through the store: before a host writes `name@N` locally it claims it by
creating `<prefix>/<name>/v<N>/claim.json` only-if-absent (S3 conditional PUT, a hard link locally), so
two hosts registering the same adapter name at once get different numbers. A claim outlives a deleted
version (a tombstone): numbers are never reused, though one may be skipped when a host claims and dies.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cltune.adapter_files import RECORD, remove_versions
from cltune.artifacts import ArtifactStore, delete_prefix, fetch_published, join, publish
from cltune.data import file_sha256
from cltune.errors import ConflictError, NotFoundError

MANIFEST = "manifest.json"
CLAIM = "claim.json"  # <prefix>/<name>/v<N>/claim.json: this version number is taken
DELETED = "deleted.json"  # <prefix>/<name>/v<N>/deleted.json: this version was deleted (a tombstone)
LOCAL_STATE = ".sync.json"  # in the run dir: the snapshot id this copy last pushed or pulled
SKIP_NAMES = ("crash.log", LOCAL_STATE)  # per-host files: a faulthandler log, our own bookkeeping
SKIP_SUFFIXES = (".tmp",)  # writes in flight (checkpoint.tmp/, progress.tmp)


def _files(directory: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory)
        if not p.is_file() or p.name in SKIP_NAMES or p.name.startswith((".put-", ".get-")):
            continue
        if any(part.endswith(SKIP_SUFFIXES) for part in rel.parts):
            continue
        out[rel.as_posix()] = p
    return out


class RunSync:
    """Snapshots of one run directory under `prefix` (e.g. "runs/job_1") in `store`.

    `push()` after each checkpoint and at task ends; `pull()` before a run starts. One writer at a
    time (the job's lease holder); a stale writer can only replace the manifest, never corrupt it.
    """

    def __init__(self, store: ArtifactStore, prefix: str, directory: str | Path) -> None:
        self.store, self.prefix, self.dir = store, prefix.strip("/"), Path(directory)
        self._stat: dict[str, tuple[int, int, str]] = {}  # rel -> (size, mtime_ns, sha256)
        self._manifest: dict[str, Any] | None = None  # the last manifest we wrote or read

    def remote_manifest(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.store.get_bytes(join(self.prefix, MANIFEST))))
        except NotFoundError:
            return None

    def push(self) -> bool:
        """Upload what changed since the last push and publish a new manifest. Returns False when
        nothing changed (no write at all)."""
        files = _files(self.dir)
        hashes: dict[str, str] = {}
        for rel, p in files.items():
            st = p.stat()
            seen = self._stat.get(rel)
            if seen is not None and seen[:2] == (st.st_size, st.st_mtime_ns):
                hashes[rel] = seen[2]  # unchanged since we hashed it: skip reading a GB checkpoint
            else:
                hashes[rel] = file_sha256(p)
                self._stat[rel] = (st.st_size, st.st_mtime_ns, hashes[rel])
        old = self._manifest if self._manifest is not None else self.remote_manifest()
        if old is not None and old.get("files") == hashes:
            self._manifest = old
            return False
        have = set((old or {}).get("files", {}).values())
        for rel, sha in hashes.items():
            if sha not in have:  # content-addressed: a blob is written once and never changes
                self.store.put_file(join(self.prefix, "blobs", sha), files[rel])
                have.add(sha)
        snapshot = secrets.token_hex(8)
        manifest: dict[str, Any] = {"id": snapshot, "files": hashes}
        self.store.put_bytes(join(self.prefix, MANIFEST), json.dumps(manifest, indent=1).encode())
        for sha in set((old or {}).get("files", {}).values()) - set(hashes.values()):
            self.store.delete(join(self.prefix, "blobs", sha))  # only blobs the replaced manifest named
        self._manifest = manifest
        self._save_local_state(snapshot)
        return True

    def pull(self) -> bool:
        """Make the local directory the store's latest snapshot, unless the local copy is that snapshot
        or newer (this host wrote it last). Returns True when files were replaced."""
        manifest = self.remote_manifest()
        if manifest is None:
            return False
        self._manifest = manifest
        if self._local_state() == manifest["id"]:
            return False  # we pushed (or pulled) it: local files are the same or newer
        self.dir.mkdir(parents=True, exist_ok=True)
        wanted: dict[str, str] = manifest["files"]
        for rel, p in _files(self.dir).items():
            if rel not in wanted:
                p.unlink()  # e.g. a checkpoint of an older attempt on this host
        for rel, sha in wanted.items():
            dest = self.dir / rel
            if not (dest.is_file() and file_sha256(dest) == sha):
                self.store.get_file(join(self.prefix, "blobs", sha), dest)
        for d in sorted((p for p in self.dir.rglob("*") if p.is_dir()), reverse=True):
            if not any(d.iterdir()):
                d.rmdir()  # directories emptied above (a stale checkpoint/)
        self._save_local_state(manifest["id"])
        return True

    def fetch(self, wanted: Callable[[str], bool]) -> list[str]:
        """Copy the files of the store's latest snapshot whose relative path is `wanted` into the
        local directory (a reader's copy: nothing else there is touched). Returns those paths."""
        manifest = self.remote_manifest()
        files: dict[str, str] = manifest["files"] if manifest else {}
        out = []
        for rel, sha in files.items():
            if not wanted(rel):
                continue
            dest = self.dir / rel
            if not (dest.is_file() and file_sha256(dest) == sha):
                self.store.get_file(join(self.prefix, "blobs", sha), dest)
            out.append(rel)
        return out

    def delete(self) -> int:
        """Remove the run's snapshots from the store (manifest first)."""
        return delete_prefix(self.store, self.prefix, marker=MANIFEST)

    def _local_state(self) -> str | None:
        try:
            return str(json.loads((self.dir / LOCAL_STATE).read_text())["id"])
        except (FileNotFoundError, KeyError, ValueError):
            return None

    def _save_local_state(self, snapshot: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / LOCAL_STATE).write_text(json.dumps({"id": snapshot}))


# ---------------------------------------------------------------- adapter registry


def remote_versions(store: ArtifactStore, prefix: str) -> dict[str, list[int]]:
    """{name: [published versions]} under `prefix` (versions whose record.json exists)."""
    return _remote(store, prefix)[RECORD]


def _remote(store: ArtifactStore, prefix: str) -> dict[str, dict[str, list[int]]]:
    """From one listing of `prefix`: {RECORD: published versions, DELETED: deleted ones}, each
    {name: [versions]}."""
    out: dict[str, dict[str, list[int]]] = {RECORD: {}, DELETED: {}}
    for key in store.list(prefix) if prefix else store.list():
        parts = key[len(prefix.strip("/")) + 1 :].split("/") if prefix else key.split("/")
        if len(parts) == 3 and parts[2] in out and parts[1][:1] == "v" and parts[1][1:].isdigit():
            out[parts[2]].setdefault(parts[0], []).append(int(parts[1][1:]))
    return {m: {n: sorted(v) for n, v in sorted(found.items())} for m, found in out.items()}


def _local_versions(root: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            vs = [int(v.name[1:]) for v in d.iterdir() if v.name[:1] == "v" and v.name[1:].isdigit()]
            vs = sorted(v for v in vs if (d / f"v{v}" / RECORD).is_file())
            if vs:
                out[d.name] = vs
    return out


def claim_version(store: ArtifactStore, prefix: str, name: str, version: int, owner: str = "") -> bool:
    """Take `name@version` for a new adapter version. False: another writer has it (or it was
    published before claims existed), so the caller tries the next number."""
    key = join(prefix, name, f"v{version}")
    claim = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}
    try:
        store.put_bytes(join(key, CLAIM), json.dumps(claim).encode(), if_absent=True)
    except ConflictError:
        return False
    return not store.exists(join(key, RECORD))  # a version published without a claim (older data)


def push_registry(store: ArtifactStore, prefix: str, root: str | Path) -> list[str]:
    """Publish every local version the store lacks (files, then record.json, only-if-absent).

    Returns the refs published. Raises ConflictError when the store holds the same name@version with a
    different record: two hosts registered one adapter name at once (pull before training to avoid it).
    """
    root = Path(root)
    listed = _remote(store, prefix)
    remote, deleted = listed[RECORD], listed[DELETED]
    _prune_deleted(root, deleted)
    done = []
    for name, versions in _local_versions(root).items():
        for v in versions:
            if v in deleted.get(name, []):  # deleted on another host meanwhile: never published again
                continue
            key = join(prefix, name, f"v{v}")
            local_record = (root / name / f"v{v}" / RECORD).read_bytes()
            if v in remote.get(name, []):
                if store.get_bytes(join(key, RECORD)) != local_record:
                    raise ConflictError(
                        f"adapter {name}@{v} exists in the artifact store with a different record: "
                        "two hosts registered the same adapter version; the store's copy wins",
                        name=name,
                        version=v,
                    )
                continue
            publish(store, key, root / name / f"v{v}", marker=RECORD, if_absent=True)
            done.append(f"{name}@{v}")
    return done


def pull_registry(store: ArtifactStore, prefix: str, root: str | Path, name: str | None = None) -> list[str]:
    """Copy published versions the local registry lacks (all names, or one), and delete local copies of
    versions deleted in the store. Each version is fetched into a temp directory and renamed into place,
    as Registry.save publishes, so a local reader never sees half a version. Returns the refs fetched."""
    root = Path(root)
    listed = _remote(store, prefix)
    _prune_deleted(root, {n: v for n, v in listed[DELETED].items() if name is None or n == name})
    local = _local_versions(root)
    fetched = []
    for n, versions in listed[RECORD].items():
        if name is not None and n != name:
            continue
        for v in versions:
            if v in local.get(n, []):
                continue
            (root / n).mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=root / n, prefix=".pull-"))
            try:
                fetch_published(store, join(prefix, n, f"v{v}"), tmp, marker=RECORD, skip=(CLAIM,))
                try:
                    os.rename(tmp, root / n / f"v{v}")
                except OSError:
                    continue  # a concurrent pull on this host placed it first
                fetched.append(f"{n}@{v}")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return fetched


def delete_adapter(store: ArtifactStore, prefix: str, name: str, version: int | None = None) -> list[int]:
    """Unpublish (record.json first) and remove one version, or all versions of `name`, from the store.
    A tombstone (DELETED) is written first: every other host deletes its own copy when it next pulls, and
    never pushes it back. The claim stays too, so the number is never given to another adapter."""
    versions = remote_versions(store, prefix).get(name, [])
    gone = versions if version is None else [v for v in versions if v == version]
    for v in gone:
        key = join(prefix, name, f"v{v}")
        store.put_bytes(join(key, DELETED), json.dumps({"at": time.time()}).encode())
        delete_prefix(store, key, marker=RECORD, keep=(CLAIM, DELETED))
    return gone


def _prune_deleted(root: Path, deleted: dict[str, list[int]]) -> None:
    """Delete the local copies of the versions `deleted` in the store ({name: [versions]})."""
    local = _local_versions(root)
    for n, versions in deleted.items():
        remove_versions(root, n, [v for v in versions if v in local.get(n, [])])
