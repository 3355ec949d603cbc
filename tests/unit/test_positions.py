import pytest

from lsp_server.positions import PositionError, offset_at

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
