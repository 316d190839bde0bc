"""The files of one stored adapter version: peft's two, and cltune's record (written last, so a version
whose record exists is complete; the artifact store publishes it last for the same reason).

A leaf module (standard library only), so the store, the registry, export, import and serving share the
names and the local unpublishing without loading torch."""

import os
import shutil
from pathlib import Path

CONFIG = "adapter_config.json"  # peft's LoraConfig
WEIGHTS = "adapter_model.safetensors"  # peft's tensors
RECORD = "record.json"  # cltune.registry.AdapterRecord
PEFT_FILES = (CONFIG, WEIGHTS)
HIGH_WATER = ".deleted_up_to"  # per adapter name: the highest version ever deleted (numbers are never reused)


def high_water(root: Path, name: str) -> int:
    """The highest version of `name` ever deleted from the registry at `root` (0: none)."""
    f = root / name / HIGH_WATER
    return int(f.read_text()) if f.is_file() else 0


def remove_versions(root: Path, name: str, versions: list[int]) -> None:
    """Delete versions of `name` from the registry directory `root`: the high-water mark first (so the
    numbers are never given again), then each version unpublished with one rename and its files removed."""
    if not versions:
        return
    (root / name / HIGH_WATER).write_text(str(max(max(versions), high_water(root, name))))
    for v in versions:
        trash = root / name / f".del-v{v}"
        try:
            os.rename(root / name / f"v{v}", trash)  # unpublish first, then remove the files
        except FileNotFoundError:
            continue  # already gone (a concurrent delete)
        shutil.rmtree(trash, ignore_errors=True)
