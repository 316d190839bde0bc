"""Domain errors raised by the library. Only the service maps them to HTTP status codes."""

from __future__ import annotations

from typing import Any


class CLTuneError(Exception):
    """Base class: every error the library raises on purpose."""

    kind = "cltune_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "message": self.message, **self.details}


class ConfigError(CLTuneError):
    """A run configuration is invalid; `details["errors"]` lists every problem at once."""

    kind = "invalid_config"


class DataError(CLTuneError):
    """A dataset file is malformed; details name the file, the 1-based line and the field."""

    kind = "invalid_data"

    def __init__(
        self, message: str, *, file: str, line: int | None = None, field: str | None = None, **extra: Any
    ) -> None:
        where = file if line is None else f"{file}:{line}"
        if field:
            where += f" (field {field!r})"
        super().__init__(f"{where}: {message}", file=file, line=line, field=field, **extra)


class UnknownNameError(CLTuneError):
    """A name (method, model, scorer, adapter) that is not registered; lists the valid choices."""

    kind = "unknown_name"

    def __init__(self, what: str, name: str, choices: list[str] | None = None) -> None:
        msg = f"unknown {what} {name!r}"
        if choices is not None:
            msg += f"; valid: {', '.join(sorted(choices))}"
        super().__init__(msg, what=what, name=name, choices=sorted(choices) if choices else None)


class InvalidNameError(CLTuneError):
    """A user-given name that could escape its directory or is otherwise unusable."""

    kind = "invalid_name"


class NotFoundError(CLTuneError):
    """A stored object (adapter version, checkpoint) does not exist."""

    kind = "not_found"


class ConflictError(CLTuneError):
    """The operation clashes with stored state (e.g. writing an existing immutable version)."""

    kind = "conflict"


class InvalidAdapterError(CLTuneError):
    """An adapter from elsewhere (an uploaded archive) that cltune cannot store, serve or train on;
    the message names what does not fit and what would."""

    kind = "invalid_adapter"


class MissingDependencyError(CLTuneError):
    """An optional package is needed for the requested feature."""

    kind = "missing_dependency"


class StoreError(CLTuneError):
    """The artifact store failed (unreachable, access denied, missing bucket)."""

    kind = "artifact_store_error"


class ExportError(CLTuneError):
    """The adapter uses a feature the target server cannot load; the message says which."""

    kind = "export_error"


class EngineError(CLTuneError):
    """The inference engine could not serve a request (e.g. more pinned adapters than slots)."""

    kind = "engine_error"


class StopRequested(CLTuneError):  # noqa: N818 - a signal, not a failure
    """Raised by the training loop when the cooperative `should_stop` callback fires."""

    kind = "stopped"
