"""The server's Prometheus endpoint counts what a real session did."""

from __future__ import annotations

import asyncio
import socket

import httpx
from lsprotocol import types

from tests.e2e.conftest import StartServer, inline_params, open_document
from tests.e2e.test_recording import insert
from tests.e2e.test_server import MID_LINE, lines_of


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sample(text: str, name: str) -> float:
    """The value of the sample line that starts with ``name`` (labels included)."""
    [line] = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.rsplit(" ", 1)[1])


async def test_metrics_count_requests_accepts_rejects_survival_and_the_adapter(
    start_server: StartServer,
):
    port = free_port()
    client = await start_server(
        env={"GHOSTLOOP_METRICS_PORT": str(port), "GHOSTLOOP_SURVIVAL_WINDOWS_S": "0.2"}
    )
    position = inline_params(open_document(client, MID_LINE, "a.py"), *lines_of(MID_LINE))
    taken = (await client.text_document_inline_completion_async(position)).items[0]
    insert(client, "file:///workspace/a.py", 2, *lines_of(MID_LINE), taken.insert_text)
    await client.workspace_execute_command_async(
        types.ExecuteCommandParams(command="ghostloop.accept", arguments=taken.command.arguments)
    )
    other = inline_params(open_document(client, MID_LINE, "b.py"), *lines_of(MID_LINE))
    thrown = (await client.text_document_inline_completion_async(other)).items[0]
    client.protocol.notify(
        "ghostloop/feedback", {"completionId": thrown.command.arguments[0], "kind": "rejected"}
    )
    survival = 'ghostloop_survival_ratio_count{window_s="0.2"}'
    async with httpx.AsyncClient() as http:
        for _ in range(600):  # until the accepted one's survival check has run
            response = await http.get(f"http://127.0.0.1:{port}/metrics")
            if f"\n{survival} " in response.text:
                break
            await asyncio.sleep(0.05)
    assert response.status_code == 200
    status = await client.protocol.send_request_async("ghostloop/status", None)
    assert status.metrics.url == f"http://127.0.0.1:{port}/metrics"
    text = response.text
    assert sample(text, 'ghostloop_completion_requests_total{result="served"}') == 2
    assert sample(text, 'ghostloop_completion_latency_seconds_count{adapter="base"}') == 2
    assert sample(text, 'ghostloop_feedback_events_total{kind="accepted"}') == 1
    assert sample(text, 'ghostloop_feedback_events_total{kind="rejected"}') == 1
    assert sample(text, 'ghostloop_survival_ratio_count{window_s="0.2"}') == 1
    assert sample(text, 'ghostloop_survival_ratio_sum{window_s="0.2"}') == 1.0
    assert sample(text, 'ghostloop_adapter_serving{arm="active",version="base"}') == 1


async def test_a_taken_metrics_port_does_not_stop_completions(start_server: StartServer):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        client = await start_server(env={"GHOSTLOOP_METRICS_PORT": str(port)})
        position = inline_params(open_document(client, MID_LINE), *lines_of(MID_LINE))
        result = await client.text_document_inline_completion_async(position)
        assert result.items
        status = await client.protocol.send_request_async("ghostloop/status", None)
    assert status.metrics.url is None
    assert f"metrics not served on 127.0.0.1:{port}" in status.metrics.error
