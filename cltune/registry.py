"""Adapter registry: immutable, versioned adapters in peft format plus a metadata record.

Layout under the root:   <name>/v<version>/adapter_config.json
                                          adapter_model.safetensors
                                          record.json
                                          method_state.safetensors + method_state.json (optional)
A version is written into a temporary directory and published with one rename, so a crash never
leaves a record that points at half-written files, and an existing version is never overwritten.
"""

from __future__ import annotations

import builtins
import copy
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from peft import PeftModel, get_peft_model_state_dict
from pydantic import BaseModel, Field
from safetensors.torch import save_file

from cltune.adapter_files import PEFT_FILES, RECORD, WEIGHTS, high_water, remove_versions
from cltune.config import check_name
from cltune.errors import ConflictError, InvalidNameError, NotFoundError
from cltune.methods.base import STATE_META, STATE_TENSORS, MethodState

STATE_FILES = (STATE_TENSORS, STATE_META)  # MethodState.save's files


class AdapterRecord(BaseModel):
    name: str
    version: int
    base_model: str
    base_fingerprint: str
    method: str
    method_params: dict[str, Any] = Field(default_factory=dict)
    lora: dict[str, Any] = Field(default_factory=dict)
    task: str | None = None
    parent: str | None = None  # "name@version" this adapter continued from (lineage)
    datasets: list[dict[str, Any]] = Field(default_factory=list)  # [{task, role, sha256, examples}]
    metrics: dict[str, Any] = Field(default_factory=dict)  # own score, R-matrix row, ...
    group: str | None = None  # routing group
    codebook: list[str] = Field(default_factory=list)  # instructions it was trained on (routing)
    notes: dict[str, Any] = Field(default_factory=dict)  # method facts (selection, approximations)
    created_by: str | None = None  # job id or "cli"
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def codebook_size(self) -> int:
        return len(self.codebook)


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'name' -> (name, None) meaning latest; 'name@3' -> (name, 3)."""
    name, sep, ver = ref.partition("@")
    check_name(name, "adapter name")
    if not sep:
        return name, None
    if not ver.isdigit() or int(ver) < 1:
        raise InvalidNameError(
            f"invalid adapter version {ver!r} in {ref!r}: use name@N with N >= 1", name=ref
        )
    return name, int(ver)


def write_peft(model: PeftModel, adapter: str, directory: Path) -> None:
    """Write peft adapter `adapter` of `model` into `directory` under peft's default names, so
    `PeftModel.from_pretrained(base, directory)` loads it whatever it was called in training."""
    tensors = get_peft_model_state_dict(model, adapter_name=adapter)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        directory / WEIGHTS,
        metadata={"format": "pt"},
    )
    config = copy.deepcopy(model.peft_config[adapter])
    config.inference_mode = True
    config.save_pretrained(str(directory))


class Registry:
    """Versioned adapters under `root`.

    claim(name, version) -> bool: reserves a version number with whoever else can register adapters
    of the same names (the shared artifact store: cltune.artifact_sync.claim_version); a number it
    refuses is skipped. None: this directory is the only writer.
    """

    def __init__(self, root: str | Path, claim: Callable[[str, int], bool] | None = None) -> None:
        self.root = Path(root)
        self.claim = claim

    # -- queries

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions_of(p.name))

    def versions_of(self, name: str) -> list[int]:
        d = self.root / check_name(name, "adapter name")
        if not d.is_dir():
            return []
        out = [int(p.name[1:]) for p in d.iterdir() if p.name.startswith("v") and p.name[1:].isdigit()]
        return sorted(v for v in out if (d / f"v{v}" / RECORD).exists())

    def path(self, name: str, version: int | None = None) -> Path:
        versions = self.versions_of(name)
        if not versions:
            raise NotFoundError(f"no adapter named {name!r}", name=name)
        v = versions[-1] if version is None else version
        if v not in versions:
            raise NotFoundError(f"adapter {name!r} has no version {v}; versions: {versions}", name=name)
        return self.root / name / f"v{v}"

    def get(self, ref: str, version: int | None = None) -> AdapterRecord:
        name, v = parse_ref(ref)
        p = self.path(name, v if v is not None else version)
        return AdapterRecord.model_validate_json((p / RECORD).read_text())

    def list(self) -> list[AdapterRecord]:
        """The latest version of every adapter."""
        return [self.get(n) for n in self.names()]

    def history(self, name: str) -> builtins.list[AdapterRecord]:
        return [self.get(name, v) for v in self.versions_of(name)]

    def method_state(self, ref: str) -> MethodState | None:
        name, v = parse_ref(ref)
        return MethodState.load(self.path(name, v))

    # -- writes

    def save(
        self,
        model: PeftModel,
        adapter: str,
        record: dict[str, Any],
        state: MethodState | None = None,
        extra_files: dict[str, bytes] | None = None,
    ) -> AdapterRecord:
        """Write peft adapter `adapter` of `model` as the next version of `record["name"]`.

        Returns the stored record (with its version). Raises InvalidNameError for unsafe names.
        """
        name = check_name(record["name"], "adapter name")
        (self.root / name).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root / name, prefix=".tmp-"))
        try:
            write_peft(model, adapter, tmp)
            if state is not None:
                state.save(tmp)
            for fname, data in (extra_files or {}).items():
                (tmp / check_name(fname, "file name")).write_bytes(data)
            return self._publish(tmp, name, record)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def save_files(self, src: Path, record: dict[str, Any]) -> AdapterRecord:
        """Publish the peft files in `src` (adapter_config.json, adapter_model.safetensors and, when
        present, a method state) as the next version of `record["name"]`: a checkpoint kept by a run,
        or an adapter trained elsewhere. The caller has checked that they fit the base model."""
        name = check_name(record["name"], "adapter name")
        (self.root / name).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root / name, prefix=".tmp-"))
        try:
            for fname in (*PEFT_FILES, *STATE_FILES):
                if (src / fname).exists():
                    shutil.copyfile(src / fname, tmp / fname)
            missing = [f for f in PEFT_FILES if not (tmp / f).exists()]
            if missing:
                raise NotFoundError(f"{src.name}: missing {', '.join(missing)}", name=name)
            return self._publish(tmp, name, record)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _high_water(self, name: str) -> int:
        """The highest version ever deleted: numbers are never reused, so `name@N` always means one thing."""
        return high_water(self.root, name)

    def _publish(self, tmp: Path, name: str, record: dict[str, Any]) -> AdapterRecord:
        version = 0
        for _ in range(1000):
            version = max(version, (self.versions_of(name) or [0])[-1], self._high_water(name)) + 1
            if self.claim is not None and not self.claim(name, version):
                continue  # taken on another host: try the next number
            rec = AdapterRecord.model_validate({**record, "name": name, "version": version})
            (tmp / RECORD).write_text(rec.model_dump_json(indent=1))
            try:
                os.rename(tmp, self.root / name / f"v{version}")  # fails if that version exists
                return rec
            except OSError:
                continue  # another writer took this version: try the next
        raise ConflictError(f"could not allocate a new version for adapter {name!r}")

    def delete(self, name: str, version: int | None = None) -> builtins.list[int]:
        """Delete one version, or every version when `version` is None. Returns the deleted versions."""
        versions = self.versions_of(name)
        if not versions or (version is not None and version not in versions):
            raise NotFoundError(
                f"no adapter {name!r}" + (f" version {version}" if version else ""), name=name
            )
        gone = versions if version is None else [version]
        remove_versions(self.root, name, gone)
        return gone
