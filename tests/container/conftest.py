"""The container image, built with podman for the tests in this folder.

These tests build the Dockerfile (a few minutes the first time; podman's layer cache makes a
rebuild take seconds) and run the image next to the session's Postgres, so they run only when
``LISTENER_CONTAINER_TEST=1`` (``.ci/container-test`` sets it); then a missing podman is an
error, not a skip.

Environment:
    LISTENER_CONTAINER_TEST: ``1`` to run them.
    PODMAN: the podman command (default ``podman --runtime runc --cgroup-manager cgroupfs``:
        no systemd, cgroup v1 machines).
    CONTAINERS_CONF: podman's containers.conf; when unset, one is written that drops podman's
        default ulimits (which a nested container may not raise).
    LISTENER_IMAGE: the tag to build (default ``localhost/listener:ci``).
    BASE_IMAGE: the Dockerfile's base (default ``python:3.11-slim``; ``.ci/container-base``
        provides it, building a stand-in with debootstrap when no registry serves it).

Fixtures:
    podman_env: the environment every podman command runs with.
    podman_cmd: the podman command as a list.
    image: the built image's tag.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PODMAN = "podman --runtime runc --cgroup-manager cgroupfs"
ENABLED = os.environ.get("LISTENER_CONTAINER_TEST") == "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip this folder's tests unless LISTENER_CONTAINER_TEST=1."""
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="builds the image with podman: set LISTENER_CONTAINER_TEST=1")
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def podman_cmd() -> list[str]:
    """``PODMAN`` split into words; fails when its executable is not installed."""
    cmd = shlex.split(os.environ.get("PODMAN", DEFAULT_PODMAN))
    if shutil.which(cmd[0]) is None:
        pytest.fail(f"{cmd[0]} is not installed (apt-get install podman runc debootstrap)")
    return cmd


@pytest.fixture(scope="session")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``os.environ`` plus a CONTAINERS_CONF with no default ulimits (unless one is set)."""
    env = dict(os.environ)
    if "CONTAINERS_CONF" not in env:
        conf = tmp_path_factory.mktemp("podman") / "containers.conf"
        conf.write_text("[containers]\ndefault_ulimits = []\n")
        env["CONTAINERS_CONF"] = str(conf)
    return env


def _timed(args: list[str], env: dict[str, str], what: str, log: Path) -> None:
    started = time.monotonic()
    with log.open("wb") as out:
        result = subprocess.run(args, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    elapsed = time.monotonic() - started
    print(f"{what}: {elapsed:.1f} s")
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        pytest.fail(f"{what} failed (exit {result.returncode}):\n{tail}")


@pytest.fixture(scope="session")
def image(
    podman_cmd: list[str], podman_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Build the Dockerfile (docker format, so the HEALTHCHECK is kept); yields its tag."""
    tag = os.environ.get("LISTENER_IMAGE", "localhost/listener:ci")
    logs = tmp_path_factory.mktemp("build")
    env = {**podman_env, "PODMAN": shlex.join(podman_cmd)}
    _timed([str(ROOT / ".ci" / "container-base")], env, "base image", logs / "base.log")
    build = [*podman_cmd, "build", "--isolation=chroot", "--format=docker", "-t", tag]
    if base := os.environ.get("BASE_IMAGE"):
        build += ["--build-arg", f"PYTHON_IMAGE={base}"]
    _timed([*build, str(ROOT)], env, "image build", logs / "build.log")
    size = subprocess.run(
        [*podman_cmd, "image", "inspect", "--format", "{{.Size}}", tag],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(f"image {tag}: {int(size) / 1e6:.0f} MB")
    yield tag
