from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.tiny_model import build_tiny_model


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end tests run last, as in pygls's own suite."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


# What the servers the tests start generate with: torch, unless `make test`'s second pass
# runs the server's own end-to-end tests on onnxruntime. Read before any fixture clears
# the GHOSTLOOP_ variables. Tests of the default (auto) name it.
TEST_BACKEND = os.environ.get("GHOSTLOOP_TEST_BACKEND", "torch")


@pytest.fixture(autouse=True)
def isolated_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own data dir and sees none of the developer's settings."""
    for key in list(os.environ):
        if key.startswith("GHOSTLOOP_"):
            monkeypatch.delenv(key)
    data_dir = tmp_path / "data"
    monkeypatch.setenv("GHOSTLOOP_DATA_DIR", str(data_dir))
    monkeypatch.setenv("GHOSTLOOP_CONFIG", "")
    monkeypatch.setenv("GHOSTLOOP_BACKEND", TEST_BACKEND)
    return data_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def endless_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model without an end token: only cancellation or a limit stops it."""
    return build_tiny_model(tmp_path_factory.mktemp("endless-model"), with_eos=False)


POSTGRES_ADMIN_URL = os.environ.get(
    "GHOSTLOOP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session on the real server, dropped after.

    CI has the server (.ci/run starts it); elsewhere a missing server skips these tests.
    """
    yield from _temporary_database()


@pytest.fixture
def empty_postgres_url() -> Iterator[str]:
    """A PostgreSQL database of this test's own: nothing another test wrote is in it."""
    yield from _temporary_database()


def _temporary_database() -> Iterator[str]:
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"ghostloop_test_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {error}")
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


class PrivateCluster:
    """A PostgreSQL server of the test's own, so a test can stop and start it.

    Run as the ``postgres`` OS user when the tests run as root (initdb refuses root).
    """

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        self.bin = found[-1].parent if found else None

    def _run(self, *args: str) -> None:
        assert self.bin is not None
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["su", "postgres", "-c", shlex.join(command)]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.root / "data"), "-A", "trust", "-U", "postgres")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        data, log_file = str(self.root / "data"), str(self.root / "log")
        self._run("pg_ctl", "-D", data, "-o", options, "-l", log_file, "-w", "start")

    def stop(self) -> None:
        """As a crash or a kill would: no checkpoint, connections cut."""
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")


@pytest.fixture
def private_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(tempfile.mkdtemp(prefix="ghostloop-pg-"))
    cluster = PrivateCluster(root, port)
    if cluster.bin is None or (os.geteuid() == 0 and shutil.which("su") is None):
        if os.environ.get("CI"):
            raise RuntimeError("PostgreSQL server binaries (pg_ctl, initdb) are not installed")
        pytest.skip("PostgreSQL server binaries are not installed")
    cluster.init()
    cluster.start()
    yield cluster
    with contextlib.suppress(subprocess.CalledProcessError):
        cluster.stop()
    shutil.rmtree(root, ignore_errors=True)
