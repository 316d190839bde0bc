"""The package's public API: every name in `cltune.__all__` resolves, and importing it stays cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest

import cltune


@pytest.mark.parametrize("name", [n for n in cltune.__all__ if n != "__version__"])
def test_every_public_name_resolves_to_its_module_s_object(name: str) -> None:
    module = cltune._EXPORTS[name]
    obj = getattr(cltune, name)
    assert obj is getattr(sys.modules[module], name)


def test_all_lists_exactly_the_lazy_exports() -> None:
    assert sorted(cltune.__all__) == sorted(["__version__", *cltune._EXPORTS])


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cltune.nope  # noqa: B018


def test_importing_the_package_and_its_errors_does_not_load_torch() -> None:
    code = "import sys, cltune, cltune.errors; cltune.ConfigError; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
