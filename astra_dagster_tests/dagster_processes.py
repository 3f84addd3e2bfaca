"""Start dagster-webserver and dagster-daemon on a private instance for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def wait_for_webserver(port: int, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    """Until http://127.0.0.1:PORT/server_info answers; fails with the log's tail if ``proc``
    (the process that starts the webserver) exits first or the (generous) timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("webserver did not start:\n" + log.read_text()[-3000:]) from None
            time.sleep(1)


@contextmanager
def dagster_services(module: str, env: dict[str, str], log_dir: Path, *, webserver: bool = True,
                     daemon: bool = True) -> Iterator[str | None]:
    """Run the webserver and/or daemon for ``module``; yields the GraphQL URL (or None)."""
    full_env = {**os.environ, **env}
    procs: list[subprocess.Popen] = []
    url = None
    logs = ExitStack()
    try:
        if webserver:
            port = free_port()
            url = f"http://127.0.0.1:{port}/graphql"
            procs.append(subprocess.Popen(
                [_bin("dagster-webserver"), "-m", module, "-h", "127.0.0.1", "-p", str(port)],
                env=full_env, stdout=logs.enter_context(open(log_dir / "webserver.log", "w")),  # noqa: SIM115 - ExitStack closes it
                stderr=subprocess.STDOUT))
            wait_for_webserver(port, procs[-1], log_dir / "webserver.log", timeout=120)
        if daemon:
            procs.append(subprocess.Popen(
                [_bin("dagster-daemon"), "run", "-m", module],
                env=full_env, stdout=logs.enter_context(open(log_dir / "daemon.log", "w")),  # noqa: SIM115 - ExitStack closes it
                stderr=subprocess.STDOUT))
        yield url
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        logs.close()
