"""The team server: real `ghostloop serve --tcp` processes sharing the real PostgreSQL,
clients over TCP (pygls through evaluation.client, and raw sockets for the bad ones)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pygls.exceptions import JsonRpcException
from sqlalchemy import create_engine, text

from evaluation.client import GhostloopClient
from feedback.tokens import digest
from ghostloop.settings import Settings
from tests.e2e.conftest import listening
from tests.e2e.team_servers import TeamServer, free_port, tokens
from tests.publishing import publish_adapter

SOURCE = "import os\n\n\ndef read(path):\n    with open(path) as handle:\n        return "
CURSOR = (5, 15)


@pytest.fixture
def team_servers(tiny_model_dir: Path, tmp_path: Path) -> Iterator[list[TeamServer]]:
    servers: list[TeamServer] = []
    yield servers
    for server in servers:
        server.stop()


def count(url: str, query: str) -> int:
    return int(scalar(url, query))  # type: ignore[call-overload]


async def suggest(client: GhostloopClient, uri: str) -> str:
    client.open(uri, SOURCE)
    suggestion = await client.inline(uri, *CURSOR)
    assert suggestion.completion_id, "the tiny model suggested nothing"
    return suggestion.completion_id


async def refused(port: int, token: str | None, **kwargs: object) -> str:
    with pytest.raises(JsonRpcException) as refusal:
        await GhostloopClient.connect("127.0.0.1", port, token=token, **kwargs)  # type: ignore[arg-type]
    return str(refusal.value)


async def test_two_servers_one_database_tokens_decide_the_user(
    team_servers: list[TeamServer], tiny_model_dir: Path, tmp_path: Path, empty_postgres_url: str
) -> None:
    url = empty_postgres_url
    made = tokens(url, "alice", "bob")
    for name in ("a", "b"):
        team_servers.append(
            TeamServer(
                tiny_model_dir,
                tmp_path / name,
                GHOSTLOOP_DATABASE_URL=url,
                GHOSTLOOP_TCP_AUTH="required",
            )
        )
    first, second = team_servers

    # No token, a wrong one, a malformed one: refused before any document is read.
    assert "needs an access token" in await refused(first.port, None)
    assert "not valid" in await refused(first.port, "glt_" + "x" * 43)
    assert "must be a string" in await refused(
        first.port, None, initialization_options={"token": 7}
    )

    # alice claims to be mallory: the token decides.
    alice = await first.connect(made["alice"], user="mallory")
    bob = await second.connect(made["bob"])
    bob_on_first = await first.connect(made["bob"])
    alices = await suggest(alice, "file:///home/alice/a.py")
    bobs = await suggest(bob, "file:///home/bob/b.py")
    await alice.accept(alices)
    await bob.accept(bobs, 3)

    # bob cannot write feedback on alice's completion, on the server that served it either
    with pytest.raises(JsonRpcException, match="never served it"):
        await bob_on_first.accept(alices, 1)
    bob_on_first.feedback(alices, "dismissed")
    await bob_on_first.status()  # the notification is handled before this answer
    # alice's second editor cannot take it a second time either
    alice_again = await first.connect(made["alice"])
    with pytest.raises(JsonRpcException, match="already accepted"):
        await alice_again.accept(alices)

    # One adapter published once: both servers serve it.
    settings = Settings.of(
        model=str(tiny_model_dir), database_url=url, data_dir=tmp_path / "shared"
    )
    publish_adapter(settings, tiny_model_dir, "v-team-1", seed=3)
    for client in (alice, bob):
        assert (await client.reload_adapters())["adapter"] == "v-team-1"
        assert (await client.status())["adapter"] == "v-team-1"
    after = await suggest(alice, "file:///home/alice/c.py")

    for client in (alice, bob, bob_on_first, alice_again):
        await client.stop()
    for server in team_servers:
        server.stop()

    assert count(url, "select count(*) from completions where \"user\" = 'alice'") == 2
    assert count(url, "select count(*) from completions where \"user\" = 'bob'") == 1
    assert count(url, 'select count(distinct "user") from completions') == 2  # no mallory
    # (a survival check is recorded too unless the connection closed before its window)
    decided = {"accepted", "partial", "rejected", "dismissed", "shown"}
    assert events(url, alices).keys() & decided == {"accepted"}  # not bob's dismissal
    assert events(url, alices)["accepted"] == 1
    assert events(url, bobs).keys() & decided == {"partial"}
    served = f"select adapter_version from completions where id = '{after}'"
    assert scalar(url, served) == "v-team-1"


def events(url: str, completion_id: str) -> dict[str, int]:
    engine = create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(
            text("select kind, count(*) from events where completion_id = :c group by kind"),
            {"c": completion_id},
        ).all()
    engine.dispose()
    return {kind: int(n) for kind, n in rows}


def scalar(url: str, query: str) -> object:
    engine = create_engine(url)
    with engine.connect() as connection:
        value = connection.execute(text(query)).scalar_one()
    engine.dispose()
    return value


async def send_raw(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(data)
    return sock


def rpc(message_id: int, method: str, params: object) -> bytes:
    body = json.dumps({"jsonrpc": "2.0", "id": message_id, "method": method, "params": params})
    return b"Content-Length: %d\r\n\r\n" % len(body) + body.encode()


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """True once the server has closed ``sock`` (reads reach the end)."""
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.close()
    return True


async def test_bad_clients_are_cut_off_and_others_keep_being_served(
    team_servers: list[TeamServer], tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = TeamServer(
        tiny_model_dir,
        tmp_path / "data",
        GHOSTLOOP_MAX_MESSAGE_BYTES="65536",
        GHOSTLOOP_MESSAGE_TIMEOUT_S="2",
        GHOSTLOOP_MAX_OPEN_DOCUMENTS="2",
    )
    team_servers.append(server)
    good = await server.connect()
    await suggest(good, "file:///w/first.py")

    oversize = await send_raw(server.port, b"Content-Length: 10000000\r\n\r\n{")
    never_ending = await send_raw(server.port, b'Content-Length: 100\r\n\r\n{"jsonrpc"')
    garbage = await send_raw(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    binary = await send_raw(server.port, os.urandom(20000))
    # asks and asks, and never reads an answer
    flood = [rpc(1, "initialize", {"capabilities": {}, "processId": None, "rootUri": None})]
    flood += [rpc(2 + i, "ghostloop/status", None) for i in range(20000)]
    deaf = socket.create_connection(("127.0.0.1", server.port))
    deaf.settimeout(60)
    with contextlib.suppress(OSError):  # the server may cut it off while it still sends
        deaf.sendall(b"".join(flood))

    # served while the bad ones hang on
    await suggest(good, "file:///w/second.py")
    loop = asyncio.get_running_loop()
    results = await asyncio.gather(
        *(
            loop.run_in_executor(None, closed_by_server, sock, 30)
            for sock in (oversize, never_ending, garbage, binary)
        )
    )
    assert results == [True, True, True, True]
    log = server.log.read_text()
    assert "over max_message_bytes=65536" in log
    assert "did not arrive whole within message_timeout_s=2" in log
    assert "not an LSP header line" in log or "bad Content-Length" in log
    deadline = time.monotonic() + 60
    while "the client stopped reading" not in server.log.read_text():
        assert time.monotonic() < deadline, "a client that never reads was not cut off"
        await asyncio.sleep(0.2)
    deaf.close()

    # a third open document is over max_open_documents=2: not held, not completed
    good.open("file:///w/third.py", SOURCE)
    with pytest.raises(JsonRpcException, match="is not open"):
        await good.inline("file:///w/third.py", *CURSOR)
    await suggest(good, "file:///w/first.py")  # the good client is still served
    status = await good.status()
    assert status["team"]["connections"] == 1
    await good.stop()


async def test_a_client_that_disconnects_mid_request_frees_its_work(
    team_servers: list[TeamServer], endless_model_dir: Path, tmp_path: Path
) -> None:
    server = TeamServer(
        endless_model_dir,
        tmp_path / "data",
        GHOSTLOOP_MAX_NEW_TOKENS="100000",
        GHOSTLOOP_MAX_LINES="100000",
    )
    team_servers.append(server)
    leaving = await server.connect()
    staying = await server.connect()
    leaving.open("file:///w/a.py", SOURCE)
    request = asyncio.create_task(leaving.inline("file:///w/a.py", *CURSOR))
    await asyncio.sleep(1.0)  # generating now: 100000 tokens would take minutes
    assert (await staying.status())["stats"]["cancelled"] == 0
    leaving.lsp.protocol.writer.close()  # gone, without $/cancelRequest or shutdown
    request.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(leaving.lsp.stop(), 5)
    # Without the disconnect stopping it, the generation runs to its 120 s deadline.
    deadline = time.monotonic() + 60
    while (status := await staying.status())["stats"]["cancelled"] == 0:
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.2)
    assert status["stats"]["last_stop_reason"] == "cancelled"
    assert status["team"]["connections"] == 1
    await staying.stop()


async def test_rate_limit_is_per_user(
    team_servers: list[TeamServer], tiny_model_dir: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'team.db'}"
    made = tokens(url, "alice", "bob")
    server = TeamServer(
        tiny_model_dir,
        tmp_path / "data",
        GHOSTLOOP_DATABASE_URL=url,
        GHOSTLOOP_RATE_LIMIT_PER_MINUTE="6",  # a burst of one
    )
    team_servers.append(server)
    alice = await server.connect(made["alice"])
    alice_again = await server.connect(made["alice"])  # a second editor of hers
    bob = await server.connect(made["bob"])
    await suggest(alice, "file:///w/a.py")
    alice_again.open("file:///w/b.py", SOURCE)
    with pytest.raises(JsonRpcException, match="rate limit: 6 completions a minute"):
        await alice_again.inline("file:///w/b.py", *CURSOR)
    await suggest(bob, "file:///w/c.py")
    for client in (alice, alice_again, bob):
        await client.stop()


def test_an_exposed_server_needs_tokens(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GHOSTLOOP_")},
        "GHOSTLOOP_MODEL": str(tiny_model_dir),
        "GHOSTLOOP_DATA_DIR": str(tmp_path / "data"),
    }
    port = free_port()
    command = [sys.executable, "-m", "ghostloop", "serve", "--tcp", "--host", "0.0.0.0"]
    refused = subprocess.run(
        [*command, "--port", str(port)], env=env, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2
    assert "ghostloop users add NAME" in refused.stderr
    assert not listening(port)

    # with a token made through the CLI, it starts
    made = subprocess.run(
        [sys.executable, "-m", "ghostloop", "users", "add", "carol", "--note", "laptop"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    token = made.stdout.strip()
    assert token.startswith("glt_") and "not shown again" in made.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "ghostloop", "users", "list"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "carol" in listed.stdout and "laptop" in listed.stdout and token not in listed.stdout
    stored = count(
        f"sqlite:///{tmp_path / 'data' / 'ghostloop.db'}",
        f"select count(*) from access_tokens where token_sha256 = '{digest(token)}'",
    )
    assert stored == 1  # its digest, not the token
    process = subprocess.Popen(
        [*command, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not listening(port):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(30)


async def test_tls_and_revoked_tokens(
    team_servers: list[TeamServer], tiny_model_dir: Path, tmp_path: Path
) -> None:
    import trustme

    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.cert_chain_pems[0].write_to_path(str(cert))
    certificate.private_key_pem.write_to_path(str(key))
    url = f"sqlite:///{tmp_path / 'team.db'}"
    made = tokens(url, "dana")
    server = TeamServer(
        tiny_model_dir,
        tmp_path / "data",
        GHOSTLOOP_DATABASE_URL=url,
        GHOSTLOOP_TLS_CERT=str(cert),
        GHOSTLOOP_TLS_KEY=str(key),
        GHOSTLOOP_TCP_AUTH="required",
    )
    team_servers.append(server)
    trusted = ssl.create_default_context()
    authority.configure_trust(trusted)
    dana = await server.connect(made["dana"], tls=trusted)
    await suggest(dana, "file:///w/a.py")

    # plain TCP to a TLS server gets nowhere
    plain = await send_raw(server.port, b"Content-Length: 2\r\n\r\n{}")
    assert await asyncio.get_running_loop().run_in_executor(None, closed_by_server, plain, 30)
    # a client that does not trust the certificate refuses it
    with pytest.raises(ssl.SSLCertVerificationError):
        await GhostloopClient.connect(
            "127.0.0.1", server.port, token=made["dana"], tls=ssl.create_default_context()
        )

    revoked = subprocess.run(
        [sys.executable, "-m", "ghostloop", "users", "revoke", "dana"],
        env=server.env,
        capture_output=True,
        text=True,
    )
    assert revoked.returncode == 0, revoked.stderr
    assert "not valid" in await refused(server.port, made["dana"], tls=trusted)
    await dana.stop()
