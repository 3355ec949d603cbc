"""Team servers for end-to-end tests: real `ghostloop serve --tcp` processes."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from evaluation.client import GhostloopClient
from feedback.database import open_engine, upgrade
from feedback.tokens import add_token
from tests.e2e.conftest import listening


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TeamServer:
    """One `ghostloop serve --tcp` process."""

    def __init__(self, model: Path, data_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.log = data_dir.parent / f"server-{self.port}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GHOSTLOOP_")},
            "GHOSTLOOP_MODEL": str(model),
            "GHOSTLOOP_DATA_DIR": str(data_dir),
            "GHOSTLOOP_DEADLINE_MS": "120000",
            "GHOSTLOOP_SURVIVAL_WINDOWS_S": "0.2",
            "GHOSTLOOP_ADAPTER_POLL_S": "0",
            **env,
        }
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ghostloop", "serve", "--tcp", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 120
        while not listening(self.port):
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the team server did not listen"
            time.sleep(0.1)

    async def connect(
        self, token: str | None = None, tls: ssl.SSLContext | None = None, **options: object
    ) -> GhostloopClient:
        client = await GhostloopClient.connect(
            "127.0.0.1", self.port, token=token, initialization_options=options, tls=tls
        )
        await client.wait_ready(120)
        return client

    def stop(self) -> str:
        """Stop it as an admin would (SIGTERM: the recorder flushes); returns its log."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)
        return self.log.read_text()


def tokens(url: str, *users: str) -> dict[str, str]:
    engine = open_engine(url)
    upgrade(engine)
    made = {user: add_token(engine, user)[1] for user in users}
    engine.dispose()
    return made


def tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """(certificate, key, CA certificate) PEM files for 127.0.0.1 from a throwaway CA."""
    import trustme

    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1", "localhost")
    cert, key, ca = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    authority.cert_pem.write_to_path(str(ca))
    return cert, key, ca


def trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def tls_team_server(model: Path, directory: Path, user: str) -> tuple[TeamServer, str, Path]:
    """A team server that speaks TLS only and wants tokens: (server, ``user``'s token, the
    CA's PEM to trust). Its database is ``directory / "team-data" / "ghostloop.db"``."""
    cert, key, ca = tls_files(directory)
    data = directory / "team-data"
    token = tokens(f"sqlite:///{data / 'ghostloop.db'}", user)[user]
    server = TeamServer(
        model,
        data,
        GHOSTLOOP_TLS_CERT=str(cert),
        GHOSTLOOP_TLS_KEY=str(key),
        GHOSTLOOP_TCP_AUTH="required",
    )
    return server, token, ca
