import threading

import pytest

from lsp_server.fair_queue import FairQueue, QueueClosed


def test_documents_are_served_in_turn():
    queue: FairQueue[str] = FairQueue()
    for i in range(3):
        queue.put("busy", f"busy{i}")
    queue.put("quiet", "quiet0")
    order = [queue.get() for _ in range(4)]
    assert order == ["busy0", "quiet0", "busy1", "busy2"]


def test_close_wakes_a_waiting_consumer():
    queue: FairQueue[str] = FairQueue()
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            queue.get()
        except QueueClosed as error:
            errors.append(error)

    thread = threading.Thread(target=consume)
    thread.start()
    queue.close()
    thread.join(timeout=5)
    assert not thread.is_alive() and len(errors) == 1
    with pytest.raises(QueueClosed):
        queue.get()
