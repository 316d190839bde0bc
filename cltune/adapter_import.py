"""Adapters trained elsewhere: unpack an archive safely, check that its peft files fit a base model
served here, and publish them in the registry as `method: imported`.

Accepted: a tar.gz or zip holding `adapter_config.json` and `adapter_model.safetensors` (optionally
cltune's `record.json`) in one folder or at its root, e.g. what `GET /v1/adapters/{name}/download`
writes. Other regular files (a method state, a README) are skipped. Refused, each with its reason:
  archive   absolute paths, '..', links, devices, more than MAX_MEMBERS members, a member over the
            size limit (declared or actual), encrypted zip members, two copies of one file
  config    not a JSON object, peft_type other than LORA, LoRA variants that the serving engine
            (service/inference/lora.py: plain A/B per Linear layer, scale alpha/r) or cltune's training cannot
            reproduce (UNSUPPORTED), base-changing initialisations (PiSSA, OLoRA, LoftQ, CorDA)
  weights   no pickle is ever read: safetensors only, float dtypes, keys of the form
            `base_model.model.<module>.lora_A|lora_B.weight`, a module that is no Linear layer of the base
            model or that target_modules does not select, shapes other than A [r, in] and B [out, r],
            NaN or infinite values
  base      a model that is not served here; a record.json whose base_fingerprint is another model's
"""

from __future__ import annotations

import functools
import json
import re
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open

from cltune.adapter_files import CONFIG, RECORD, WEIGHTS
from cltune.config import LoraConfig, check_name
from cltune.data import file_sha256
from cltune.errors import ConflictError, InvalidAdapterError
from cltune.models import CATALOG, ModelStructure, base_fingerprint, model_structure
from cltune.registry import AdapterRecord, Registry

WANTED = (CONFIG, WEIGHTS, RECORD)
MAX_MEMBERS = 16  # a download holds 3-5 files; a handful more is a README, never thousands
MAX_JSON_BYTES = 1024 * 1024  # adapter_config.json and record.json are a few hundred bytes
IMPORTED = "imported"  # the record's method
KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
LAYOUT = f"an adapter archive holds {CONFIG} and {WEIGHTS} (optionally {RECORD}) at its root or in one folder"
# adapter_config.json keys that are refused when set: the engine serves plain A/B matrices per Linear
# layer scaled by alpha/r, and cltune trains one r and alpha for every module
UNSUPPORTED = {
    "use_dora": "DoRA (magnitude vectors): the mixed-batch engine serves plain LoRA only",
    "use_rslora": "rsLoRA scales by alpha/sqrt(r), cltune by alpha/r: save it with "
    "lora_alpha = alpha * sqrt(r) and use_rslora false",
    "rank_pattern": "per-module ranks: cltune uses one r for every module",
    "alpha_pattern": "per-module alphas: cltune uses one lora_alpha for every module",
    "modules_to_save": "trained copies of whole base modules: only LoRA A/B matrices are served",
    "lora_bias": "LoRA biases: only A/B matrices are served",
    "fan_in_fan_out": "Conv1D (GPT-2 style) weights: these base models have Linear layers",
    "layer_replication": "replicated layers change the base model",
    "target_parameters": "LoRA on raw parameters (not Linear modules) is not served",
    "trainable_token_indices": "trained token embeddings are not served",
    "use_qalora": "QA-LoRA pooling is not served",
    "alora_invocation_tokens": "activated LoRA (invocation tokens) is not served",
    "megatron_config": "Megatron-parallel layers are not served",
}
BASE_CHANGING_INIT = ("pissa", "olora", "loftq", "corda")  # init_lora_weights that rewrite base weights


def _bad(message: str, **details: Any) -> InvalidAdapterError:
    return InvalidAdapterError(message, **details)


# ---------------------------------------------------------------- unpacking


Member = tuple[str, str, int, Callable[[], IO[bytes]]]  # name, kind (file|dir|link|special), size, open
# what tarfile, gzip and zipfile raise on a damaged archive (NotImplementedError: a zip compression
# method Python lacks; ValueError: a malformed header field)
UNREADABLE = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,
)


def unpack(archive: Path, dest: Path, limit: int) -> list[str]:
    """Extract the adapter files of a tar.gz or zip `archive` into `dest` (flat), checking every member
    before anything is written, and never more than `limit` bytes for a member. Returns the names of
    the files it skipped.

    Raises:
        InvalidAdapterError: not such an archive, or a member that is unsafe or too large.
    """
    with archive.open("rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":
        members, fmt = _tar_members(archive), "tar.gz"
    elif magic in (b"PK\x03\x04", b"PK\x05\x06"):
        members, fmt = _zip_members(archive), "zip"
    else:
        raise _bad(f"the upload is not a tar.gz or zip archive (it starts with {magic!r}); {LAYOUT}")
    try:
        return _extract(members, dest, limit)
    except UNREADABLE as e:
        raise _bad(f"the {fmt} archive cannot be read ({e}); {LAYOUT}") from None


def _tar_members(path: Path) -> Iterator[Member]:
    with tarfile.open(path, "r:gz") as tar:
        for m in tar:  # one header at a time: a bomb of members stops at MAX_MEMBERS
            yield m.name, _tar_kind(m), m.size, lambda m=m: tar.extractfile(m)  # type: ignore[misc]


def _tar_kind(m: tarfile.TarInfo) -> str:
    if m.isreg():
        return "file"
    if m.isdir():
        return "dir"
    return "link" if m.issym() or m.islnk() else "special"


def _zip_members(path: Path) -> Iterator[Member]:
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise _bad(f"the archive has {len(infos)} members, more than {MAX_MEMBERS}; {LAYOUT}")
        for info in infos:
            kind = _zip_kind(info)
            if kind == "file" and info.flag_bits & 0x1:
                raise _bad(f"member {info.filename[:100]!r} is encrypted; send an unencrypted archive")
            yield info.filename, kind, info.file_size, functools.partial(zf.open, info)


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16  # the unix mode when the zip was made on unix, else 0
    if stat.S_ISLNK(mode):
        return "link"
    if info.is_dir():
        return "dir"
    return "special" if stat.S_IFMT(mode) and not stat.S_ISREG(mode) else "file"


def _safe_parts(name: str) -> list[str]:
    """The path components of member `name`; refuses names that could leave the extraction folder."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if (
        not parts
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or re.match(r"[A-Za-z]:", name)
        or ".." in parts
    ):
        raise _bad(
            f"member {name[:100]!r} has an absolute path, '..' or a backslash: archive members must be "
            "relative paths inside the archive"
        )
    return parts


def _extract(members: Iterator[Member], dest: Path, limit: int) -> list[str]:
    """Every member is checked, skipped ones too: a skipped member is still decompressed to pass it."""
    folders: dict[str, str] = {}  # wanted file -> the folder it was in
    skipped: list[str] = []
    total = 0  # declared bytes of every file: bounds the decompression work
    for count, (name, kind, size, open_member) in enumerate(members, 1):
        if count > MAX_MEMBERS:
            raise _bad(f"the archive has more than {MAX_MEMBERS} members; {LAYOUT}")
        parts = _safe_parts(name)
        if kind in ("link", "special"):
            what = "a symbolic or hard link" if kind == "link" else "a device, FIFO or other special file"
            raise _bad(f"member {name[:100]!r} is {what}: only regular files and folders are accepted")
        if kind == "dir":
            continue
        total += size
        cap = min(limit, MAX_JSON_BYTES) if parts[-1] in (CONFIG, RECORD) else limit
        if size > cap:
            raise _bad(
                f"member {name[:100]!r} declares {size} bytes, over the limit of {cap} bytes", limit_bytes=cap
            )
        if total > limit + 2 * MAX_JSON_BYTES:
            raise _bad(f"the archive's files declare {total} bytes in all, over the limit of {limit} bytes")
        if parts[-1] not in WANTED:
            skipped.append(parts[-1])  # files an adapter does not need (a method state, a README)
            continue
        if parts[-1] in folders:
            raise _bad(f"the archive holds {parts[-1]} twice; {LAYOUT}")
        folders[parts[-1]] = "/".join(parts[:-1])
        _copy(open_member(), dest / parts[-1], name, min(size, cap))
    if len(set(folders.values())) > 1:
        where = ", ".join(f"{f} in {d or 'the root'!r}" for f, d in sorted(folders.items()))
        raise _bad(f"the adapter files are in different folders ({where}); {LAYOUT}")
    return skipped


def _copy(src: IO[bytes], dest: Path, name: str, most: int) -> None:
    """Copy one member, refusing it as soon as it holds more than it declared (zip bombs lie)."""
    written = 0
    with src, dest.open("wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > most:
                raise _bad(f"member {name[:100]!r} holds more than its declared size of {most} bytes")
            out.write(chunk)


# ---------------------------------------------------------------- checking


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(f"{path.name} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise _bad(f"{path.name} must hold a JSON object, not {type(data).__name__}")
    return data


def check_config(config: dict[str, Any]) -> None:
    """Refuse a peft config that is not plain LoRA as cltune serves and trains it (all problems at once)."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise _bad(
            f"{CONFIG}: peft_type {peft_type!r} is not supported; only LoRA adapters (peft_type 'LORA') "
            "can be imported",
            field="peft_type",
        )
    problems = [f"{key}: {why}" for key, why in UNSUPPORTED.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config['bias']!r}: trained biases are not served; use bias 'none'")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INIT):
        problems.append(
            f"init_lora_weights {init!r} rewrites the base weights, so the adapter fits only the rewritten "
            "base: convert it to plain LoRA first (peft's path_initial_model_for_weight_conversion)"
        )
    if problems:
        raise _bad(f"{CONFIG} uses what cannot be served here: " + "; ".join(problems), problems=problems)


def tensor_specs(path: Path) -> dict[str, tuple[str, list[int]]]:
    """key -> (dtype, shape) from the safetensors header alone (no tensor data is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise _bad(f"{WEIGHTS} is not a safetensors file ({e}); save the adapter with safetensors") from None


def lora_modules(specs: dict[str, tuple[str, list[int]]]) -> dict[str, dict[str, list[int]]]:
    """module name in the base model -> {"A": shape, "B": shape}, from peft's tensor keys."""
    bad = [k for k in specs if not KEY.fullmatch(k)]
    if bad:
        raise _bad(
            f"{WEIGHTS} holds {len(bad)} tensor(s) that are not LoRA A/B matrices of a Linear layer "
            f"(e.g. {bad[0][:120]!r}); keys must read base_model.model.<module>.lora_A.weight / .lora_B.weight",
            tensors=bad[:20],
        )
    if not specs:
        raise _bad(f"{WEIGHTS} holds no tensors")
    dtypes = sorted({d for d, _ in specs.values()} - set(FLOAT_DTYPES))
    if dtypes:
        raise _bad(
            f"{WEIGHTS} holds {', '.join(dtypes)} tensors; LoRA weights must be floats ({', '.join(FLOAT_DTYPES)})"
        )
    out: dict[str, dict[str, list[int]]] = {}
    for key, (_, shape) in specs.items():
        m = KEY.fullmatch(key)
        assert m is not None
        out.setdefault(m["module"], {})[m["ab"]] = shape
    return out


def lora_of(config: dict[str, Any], modules: Collection[str]) -> dict[str, Any]:
    """The adapter's LoRA settings in cltune's LoraConfig shape (what its record and a run starting from
    it use). A regex target_modules or a custom layers_pattern becomes the list of adapted modules."""
    targets, layers = config.get("target_modules"), config.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    if not (isinstance(targets, list) or targets == "all-linear") or config.get("layers_pattern"):
        targets, layers = sorted(modules), None
    elif isinstance(targets, list):
        targets = sorted(targets)  # peft saves a set: its order means nothing
    fields = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}  # ours -> peft's
    try:
        return LoraConfig(
            r=config.get("r"),
            alpha=config.get("lora_alpha"),
            dropout=config.get("lora_dropout") or 0.0,
            target_modules=targets,
            layers_to_transform=layers,
        ).model_dump(mode="json")
    except ValidationError as e:
        problems = [
            f"{fields.get(str(err['loc'][0]), str(err['loc'][0]))}: {err['msg']} (got {err.get('input')!r})"
            for err in e.errors()
        ]
        raise _bad(f"{CONFIG} is not a LoRA config cltune can use: " + "; ".join(problems)) from None


def selects(lora: dict[str, Any], module: str) -> bool:
    """Whether `lora` (cltune's shape) adapts `module`, as peft matches target_modules."""
    targets = lora["target_modules"]
    if targets == "all-linear":
        hit = module.rsplit(".", 1)[-1] != "lm_head"  # peft leaves the output layer out
    else:
        hit = any(module == t or module.endswith("." + t) for t in targets)
    layers = lora.get("layers_to_transform")
    if hit and layers is not None:
        index = re.search(r"\.(\d+)\.", module)
        hit = index is not None and int(index.group(1)) in layers
    return hit


def check_fit(
    modules: dict[str, dict[str, list[int]]], lora: dict[str, Any], base: str, st: ModelStructure
) -> None:
    """Each module must be a Linear layer of the base that target_modules selects, with A [r, in] and
    B [out, r]. Raises InvalidAdapterError listing every problem."""
    r, problems = lora["r"], []
    shapes = dict(zip(st.linear, st.features, strict=True))
    for module, ab in sorted(modules.items()):
        features = shapes.get(module)
        if features is None:
            problems.append(f"{module!r} is no Linear layer of {base!r}")
            continue
        if not selects(lora, module):
            problems.append(f"{module!r} is not selected by target_modules {lora['target_modules']}")
        fan_in, fan_out = features
        want = {"A": [r, fan_in], "B": [fan_out, r]}
        for part in ("A", "B"):
            if part not in ab:
                problems.append(f"{module!r} has no lora_{part}")
            elif ab[part] != want[part]:
                problems.append(
                    f"{module}.lora_{part} has shape {ab[part]}, expected {want[part]} "
                    f"({'[r, in_features]' if part == 'A' else '[out_features, r]'} with r={r})"
                )
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        unknown = any("is no Linear layer" in p for p in problems)
        hint = (
            f" (its Linear layers read like {st.linear[0]}: {', '.join(st.linear_names)})" if unknown else ""
        )
        raise _bad(
            f"{WEIGHTS} does not fit base model {base!r}: " + "; ".join(problems[:5]) + more + hint,
            problems=problems[:50],
        )


def check_finite(path: Path) -> None:
    """Refuse NaN or infinite weights, one tensor in memory at a time."""
    with safe_open(str(path), framework="pt") as f:
        bad = [k for k in f.keys() if not bool(torch.isfinite(f.get_tensor(k)).all())]  # noqa: SIM118
    if bad:
        raise _bad(
            f"{WEIGHTS}: {len(bad)} tensor(s) hold NaN or infinite values (e.g. {bad[0]})", tensors=bad[:20]
        )


def adapter_lora(directory: Path) -> dict[str, Any]:
    """The LoRA settings (cltune's shape) of a peft adapter folder, after checking cltune can use it."""
    config = read_json(directory / CONFIG)
    check_config(config)
    return lora_of(config, lora_modules(tensor_specs(directory / WEIGHTS)))


# ---------------------------------------------------------------- the base model and the record


def choose_base(asked: str | None, record: dict[str, Any], default: str, served: Collection[str]) -> str:
    """The base model: as asked, else the one the archive's record.json names, else `default`."""
    base, source = asked, "asked for"
    if not base:
        base, source = record.get("base_model"), "named by the archive's record.json"
    if not base:
        base, source = default, "default"
    if base not in served:
        raise _bad(
            f"base model {str(base)[:100]!r} ({source}) is not served here; valid: {', '.join(sorted(served))} "
            "(pass base_model=...)",
            field="base_model",
        )
    return str(base)


def check_fingerprint(record: dict[str, Any], base: str, fingerprint: str) -> None:
    theirs = record.get("base_fingerprint")
    if theirs and theirs != fingerprint:
        raise ConflictError(
            f"the archive's record.json says the adapter was trained on {record.get('base_model')!r} with "
            f"fingerprint {theirs}; base model {base!r} here has fingerprint {fingerprint}: other weights, "
            "so the adapter would not behave as it did there",
            base_model=base,
        )


def imported_record(
    name: str,
    base: str,
    fingerprint: str,
    lora: dict[str, Any],
    source: dict[str, Any],
    filename: str | None,
    sha256: str,
    created_by: str,
) -> dict[str, Any]:
    """The registry record of an imported adapter: no task, no data, its own routing group with an
    empty codebook (model="auto" cannot route to it; name it explicitly)."""
    origin = None
    if source.get("name") and source.get("version"):
        origin = f"{source['name']}@{source['version']}" + (
            f" ({source['method']})" if source.get("method") else ""
        )
    return {
        "name": name,
        "base_model": base,
        "base_fingerprint": fingerprint,
        "method": IMPORTED,
        "method_params": {},
        "lora": lora,
        "task": None,
        "group": name,
        "codebook": [],
        "notes": {"imported_from": filename, "sha256": sha256, "source_record": origin},
        "created_by": created_by,
    }


def import_adapter(
    registry: Registry,
    archive: Path,
    name: str,
    *,
    limit: int,
    base_model: str | None = None,
    default_base: str = "smollm2-135m",
    served: Collection[str] | None = None,
    cache_dir: str | Path | None = None,
    filename: str | None = None,
    sha256: str | None = None,
    created_by: str = "cli",
    scratch: Path | None = None,
) -> AdapterRecord:
    """Check the adapter in `archive` against its base model and publish it as the next version of `name`.

    served: the base models adapters may be for (default: the catalog and `default_base`).
    Raises:
        InvalidNameError: `name` is not a safe name.
        InvalidAdapterError: the archive, its config or its weights (the message says which and why).
        ConflictError: its record.json names other base weights than `base_model`'s.
    """
    check_name(name, "adapter name")
    served = set(served) if served is not None else {*CATALOG, default_base}
    with tempfile.TemporaryDirectory(prefix="import-", dir=scratch) as tmp:
        src = Path(tmp)
        skipped = unpack(archive, src, limit)
        missing = [f for f in (CONFIG, WEIGHTS) if not (src / f).is_file()]
        if missing:
            pickle = " (adapter_model.bin is a pickle and is never loaded: save with safetensors)"
            raise _bad(
                f"the archive has no {' and no '.join(missing)}"
                + (pickle if "adapter_model.bin" in skipped else "")
                + f"; {LAYOUT}",
                missing=missing,
            )
        config = read_json(src / CONFIG)
        source = read_json(src / RECORD) if (src / RECORD).is_file() else {}
        check_config(config)
        base = choose_base(base_model, source, default_base, served)
        fingerprint = base_fingerprint(base, cache_dir)
        check_fingerprint(source, base, fingerprint)
        lora = check_weights(src / WEIGHTS, config, base, cache_dir)
        (src / RECORD).unlink(missing_ok=True)  # the registry writes its own
        record = imported_record(
            name, base, fingerprint, lora, source, filename, sha256 or file_sha256(archive), created_by
        )
        return registry.save_files(src, record)


def check_weights(
    path: Path, config: dict[str, Any], base: str, cache_dir: str | Path | None
) -> dict[str, Any]:
    """Check the weights against base model `base`: their header first (keys, dtypes, shapes), then
    their values (finite). Returns the adapter's LoRA settings in cltune's shape."""
    structure = model_structure(base, str(cache_dir) if cache_dir is not None else None)
    if structure is None:
        raise _bad(
            f"the layers of base model {base!r} are not known on this host: its shapes cannot be checked"
        )
    modules = lora_modules(tensor_specs(path))
    lora = lora_of(config, modules)
    check_fit(modules, lora, base, structure)
    check_finite(path)
    return lora
