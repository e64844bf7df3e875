"""Fixtures: real `caroni-node` processes on free loopback ports.

The binaries are found in ``$CARONI_BIN_DIR``, else in
``$CARGO_TARGET_DIR/debug``, else in the repository's ``target/debug``
(``cargo build --workspace --bins`` makes them). Every node is killed when
its fixture ends; every wait is bounded.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

from caroni_client import CaroniError, Client

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples"


def bin_dir() -> Path:
    if os.environ.get("CARONI_BIN_DIR"):
        return Path(os.environ["CARONI_BIN_DIR"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug"


def binary(name: str) -> Path:
    p = bin_dir() / name
    if not p.is_file():
        pytest.fail(
            f"{p} is missing: build the workspace first (cargo build --workspace --bins) "
            "or point CARONI_BIN_DIR at the directory holding caroni-node"
        )
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One caroni-node process; ``client`` talks to its API."""

    def __init__(self, data_dir: Path, role: str, extra: Optional[List[str]] = None):
        self.data_dir = data_dir
        self.role = role
        self.extra = extra or []
        self.log = data_dir.with_suffix(".log")
        self.proc: Optional[subprocess.Popen] = None
        token = None
        if "--api-token" in self.extra:
            token = self.extra[self.extra.index("--api-token") + 1]
        self.token = token
        for attempt in range(3):
            self.api = free_port()
            try:
                self._start()
                break
            except RuntimeError as e:
                self.kill()
                if "cannot listen" not in str(e) or attempt == 2:
                    raise
        self.url = f"http://127.0.0.1:{self.api}"
        self.client = Client(self.url, token=self.token, timeout=20)

    def _start(self) -> None:
        args = [
            str(binary("caroni-node")),
            "--data-dir", str(self.data_dir),
            "--role", self.role,
            "--api-listen", f"127.0.0.1:{self.api}",
            "--peer-listen", f"127.0.0.1:{free_port()}",
            "--p2p-listen", f"/ip4/127.0.0.1/tcp/{free_port()}",
            "--mdns", "false",
            "--console-listen", "off",
            *self.extra,
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "RUST_LOG": "info"},
            )
        probe = Client(f"http://127.0.0.1:{self.api}", token=self.token, timeout=2)
        deadline = time.monotonic() + 60
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"caroni-node exited with {self.proc.returncode}:\n{self.log_text()}"
                    )
                try:
                    probe.node_info()
                    return
                except CaroniError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"caroni-node not ready in 60 s:\n{self.log_text()}")
                time.sleep(0.1)
        finally:
            probe.close()

    def restart(self) -> None:
        """SIGKILL, then start again on the same API port and data."""
        self.kill()
        self._start()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def cli(self, *args: str) -> str:
        """Runs the `caroni` CLI against this node (bounded to 60 s)."""
        cmd = [str(binary("caroni")), "--node", self.url]
        if self.token:
            cmd += ["--token", self.token]
        out = subprocess.run(
            [*cmd, *args], capture_output=True, text=True, timeout=60, check=False
        )
        if out.returncode != 0:
            raise AssertionError(f"caroni {args} failed: {out.stderr}{out.stdout}")
        return out.stdout

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="session")
def node(tmp_path_factory) -> Iterator[Node]:
    """A manager and agent in one process, with the demo job types."""
    n = Node(tmp_path_factory.mktemp("nodes") / "both", "both")
    try:
        for f in ("foojob0.yaml", "foojob1.yaml", "foojob2.yaml"):
            n.cli("jobtype", "add", str(EXAMPLES / "jobtypes" / f))
        yield n
    finally:
        n.client.close()
        n.kill()


@pytest.fixture(scope="session")
def client(node: Node) -> Client:
    return node.client


@pytest.fixture(scope="session")
def demo_cwl() -> str:
    return (EXAMPLES / "templates" / "test_simple.cwl").read_text()
