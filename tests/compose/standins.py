"""Stand-ins for the official images the compose file uses, built from Debian's packages.

No image registry is reachable on the project's machines, so ``python:3.11-slim``,
``rabbitmq:3.12-management`` and ``postgres:15`` cannot be pulled. ``images/`` defines images with
the same interface (environment variables, data directories, health-check commands, ports):

* ``debian``: ``debootstrap --variant=minbase bookworm``, then ``docker import``;
* ``python``, ``rabbitmq``, ``postgres``: Dockerfiles ``FROM`` that base (build argument ``BASE``).

Each image is tagged ``zstack-mn-standin/<name>:<hash>``, where the hash covers the files of its
definition, its base's tag, and (for ``python``) the machine's CA bundle that the image trusts. An
image whose tag exists is not built again; a changed definition gets a new tag and is built, and
the older tags of that name are removed.

``python -m tests.compose.standins`` builds them and prints the compose file's variables.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
IMAGES = HERE / "images"
REPOSITORY = "zstack-mn-standin"
CA_BUNDLE = Path(os.environ.get("ZSTACK_MN_STANDIN_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"))
LOCK = Path(tempfile.gettempdir()) / "zstack-mn-standins.lock"
BUILD_TIMEOUT = 1200.0

# The compose file's variable for each stand-in.
COMPOSE_VARIABLES = {
    "python": "ZSTACK_MN_PYTHON_IMAGE",
    "rabbitmq": "ZSTACK_MN_RABBITMQ_IMAGE",
    "postgres": "ZSTACK_MN_POSTGRES_IMAGE",
}

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _docker_env() -> dict[str, str]:
    # The classic builder: the Debian engine has no BuildKit front end to fall back on, and a
    # newer CLI would otherwise look for the buildx plugin.
    return {**os.environ, "DOCKER_BUILDKIT": "0"}


def _run(args: list[str], *, timeout: float = BUILD_TIMEOUT, stdin: IO[bytes] | None = None) -> str:
    """Run a command; its output is returned, and included in the error when it fails."""
    done = subprocess.run(args, stdin=stdin, capture_output=True, timeout=timeout, env=_docker_env())
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).decode(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{' '.join(args[:3])} … failed with exit code {done.returncode}:\n{tail}")
    return done.stdout.decode(errors="replace")


def _digest(name: str, base: str | None) -> str:
    h = hashlib.sha256()
    h.update(f"{name}\0{base or ''}\0".encode())
    for path in sorted(p for p in (IMAGES / name).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(IMAGES)).encode() + b"\0" + path.read_bytes() + b"\0")
    if name == "python":
        h.update(b"ca-bundle\0" + CA_BUNDLE.read_bytes())
    return h.hexdigest()[:16]


def _exists(tag: str) -> bool:
    done = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, timeout=60, env=_docker_env())
    return done.returncode == 0


def _drop_older(name: str, keep: str, log: Log) -> None:
    """Remove the other tags of this stand-in (older definitions); one still in use stays."""
    listed = _run(["docker", "image", "ls", f"{REPOSITORY}/{name}", "--format", "{{.Repository}}:{{.Tag}}"], timeout=60)
    for tag in listed.split():
        if tag != keep:
            done = subprocess.run(["docker", "image", "rm", tag], capture_output=True, timeout=120, env=_docker_env())
            log(f"standins: {'removed' if done.returncode == 0 else 'kept (in use)'} older image {tag}")


def _build_debian(tag: str) -> None:
    with tempfile.TemporaryDirectory(prefix="zstack-mn-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run([str(IMAGES / "debian" / "mkrootfs.sh"), str(rootfs)])
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        try:
            _run(
                [
                    "docker",
                    "import",
                    "--change",
                    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "--change",
                    'CMD ["/bin/bash"]',
                    "-",
                    tag,
                ],
                stdin=tar.stdout,
            )
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            if tar.wait(timeout=60) != 0:
                raise RuntimeError(f"tar of {rootfs} failed")


def _build_dockerfile(name: str, base: str, tag: str) -> None:
    with tempfile.TemporaryDirectory(prefix=f"zstack-mn-{name}-") as tmp:
        context = Path(tmp) / "context"
        shutil.copytree(IMAGES / name, context)
        if name == "python":
            shutil.copyfile(CA_BUNDLE, context / "ca-bundle.crt")
        _run(["docker", "build", "--quiet", "--build-arg", f"BASE={base}", "--tag", tag, str(context)])


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """One builder at a time on this machine; a second waits, then finds the images built."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure(log: Log = _stderr) -> dict[str, str]:
    """Build what is missing; returns the compose variables that select the stand-ins."""
    with _exclusive(LOCK):
        base = f"{REPOSITORY}/debian:{_digest('debian', None)}"
        tags = {"debian": base}
        for name in ("python", "rabbitmq", "postgres"):
            tags[name] = f"{REPOSITORY}/{name}:{_digest(name, base)}"
        for name, tag in tags.items():
            if _exists(tag):
                continue
            log(f"standins: building {tag}")
            started = time.monotonic()
            if name == "debian":
                _build_debian(tag)
            else:
                _build_dockerfile(name, base, tag)
            log(f"standins: built {tag} in {time.monotonic() - started:.0f} s")
            _drop_older(name, tag, log)
    return {var: tags[name] for name, var in COMPOSE_VARIABLES.items()}


if __name__ == "__main__":
    for variable, image in ensure().items():
        print(f"export {variable}={image}")
