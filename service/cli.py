"""The `cltune` console command: the library commands (train | eval | demo) plus the service's."""

from __future__ import annotations

from cltune.cli import main as library_main


def main(argv: list[str] | None = None) -> int:
    return library_main(argv)
