"""What the recorder stores after the cursor: what the night's labels need to see."""

from __future__ import annotations

from lsp_server.recording import stored_suffix

DOCUMENT = "def f(x):\n    total = sum(x\n\n    \n    return total\n\ndef g():\n    pass\n"


def test_a_prefix_only_prompt_stores_the_rest_of_the_line_and_the_next_line_of_code() -> None:
    cursor = DOCUMENT.index("sum(x") + len("sum(x")
    # the blank and whitespace-only lines are skipped; the next line with code ends it
    assert stored_suffix("", DOCUMENT, cursor) == "\n\n    \n    return total"


def test_text_after_the_cursor_on_its_line_is_kept_for_the_labels() -> None:
    cursor = DOCUMENT.index("sum(") + len("sum(")
    assert stored_suffix("", DOCUMENT, cursor) == "x\n\n    \n    return total"


def test_a_fim_prompt_stores_its_own_suffix() -> None:
    cursor = DOCUMENT.index("sum(x") + len("sum(x")
    assert stored_suffix(")\n    return total\n", DOCUMENT, cursor) == ")\n    return total\n"


def test_the_end_of_the_document_stores_what_is_left() -> None:
    assert stored_suffix("", DOCUMENT, len(DOCUMENT)) == ""
    assert stored_suffix("", "x = 1\n\n  ", 5) == "\n\n  "
    assert stored_suffix("", "x = (1", 5) == "1"
