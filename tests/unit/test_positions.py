import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lsprotocol import types

from lsp_server.positions import PositionError, apply_change, offset_at

TEXT = "ab\n😀x\r\nlast"


def test_utf16_positions_count_astral_characters_as_two_units():
    assert offset_at(TEXT, 1, 0) == 3
    assert offset_at(TEXT, 1, 2) == 4  # after the emoji
    assert offset_at(TEXT, 1, 3) == 5


def test_utf8_and_utf32_encodings():
    assert offset_at(TEXT, 1, 4, "utf-8") == 4
    assert offset_at(TEXT, 1, 1, "utf-32") == 4


def test_position_inside_a_surrogate_pair_is_an_error():
    with pytest.raises(PositionError, match="falls inside"):
        offset_at(TEXT, 1, 1)


def test_line_past_the_end_is_an_error():
    with pytest.raises(PositionError, match=r"past the end.*3 lines"):
        offset_at(TEXT, 3, 0)


def test_character_past_line_end_means_line_end_and_crlf_is_not_text():
    assert offset_at(TEXT, 1, 99) == 5
    assert offset_at(TEXT, 2, 99) == len(TEXT)


def test_negative_positions_are_errors():
    with pytest.raises(PositionError):
        offset_at(TEXT, -1, 0)


# Line breaks are \n, \r\n and \r only; the others here split lines for str.splitlines.
_PIECES = ["a", "é", "€", "😀", " ", "\t", "\n", "\r", "\r\n", "\f", "\x0b", "\x1c", "\x85"]
_PIECES += ["\u2028", "\u2029"]
_texts = st.lists(st.sampled_from(_PIECES), max_size=40).map("".join)
_LSP_BREAK = re.compile(r"\r\n|\r|\n")


def reference_position(text: str, offset: int) -> types.Position:
    """The LSP position of ``offset``, worked out from the other side: lines counted by
    the spec's three breaks, columns in UTF-16 code units."""
    before = text[:offset]
    breaks = list(_LSP_BREAK.finditer(before))
    line_start = breaks[-1].end() if breaks else 0
    column = len(before[line_start:].encode("utf-16-le")) // 2
    return types.Position(line=len(breaks), character=column)


def boundaries(text: str) -> list[int]:
    """Offsets a client can name: not between the \r and \n of one line break."""
    return [
        i for i in range(len(text) + 1) if not (0 < i < len(text) and text[i - 1 : i + 1] == "\r\n")
    ]


@settings(max_examples=1500, deadline=None)
@given(text=_texts, data=st.data(), new=_texts)
def test_a_range_edit_lands_where_the_client_meant(
    text: str, data: st.DataObject, new: str
) -> None:
    start, end = sorted(
        data.draw(st.lists(st.sampled_from(boundaries(text)), min_size=2, max_size=2))
    )
    change = types.TextDocumentContentChangePartial(
        range=types.Range(start=reference_position(text, start), end=reference_position(text, end)),
        text=new,
    )
    assert apply_change(text, change) == text[:start] + new + text[end:]


@settings(max_examples=500, deadline=None)
@given(text=_texts, data=st.data())
def test_every_position_maps_back_to_its_offset_in_each_encoding(
    text: str, data: st.DataObject
) -> None:
    offset = data.draw(st.sampled_from(boundaries(text)))
    position = reference_position(text, offset)
    breaks = list(_LSP_BREAK.finditer(text[:offset]))
    column = text[breaks[-1].end() if breaks else 0 : offset]
    assert offset_at(text, position.line, position.character, "utf-16") == offset
    assert offset_at(text, position.line, len(column.encode()), "utf-8") == offset
    assert offset_at(text, position.line, len(column), "utf-32") == offset


def test_a_lone_carriage_return_ends_a_line() -> None:
    assert offset_at("ab\rcd\r\nef", 1, 1) == 4
    assert offset_at("ab\rcd\r\nef", 2, 2) == 9
    with pytest.raises(PositionError, match="past the end"):
        offset_at("ab\rcd", 2, 0)


def test_form_feed_and_unicode_separators_do_not_end_lines() -> None:
    text = "a\fb\u2028c\x85d\ne"
    assert offset_at(text, 0, 7) == 7
    assert offset_at(text, 1, 0) == 8


def test_a_position_inside_a_surrogate_pair_is_refused() -> None:
    with pytest.raises(PositionError, match="inside the character"):
        offset_at("x😀y", 0, 2)
    assert offset_at("x😀y", 0, 3) == 2


def test_a_two_megabyte_line_maps_in_linear_time() -> None:
    line = "é" * 2_000_000
    assert offset_at(line, 0, 1_999_999) == 1_999_999  # C-speed encode, not a Python loop
