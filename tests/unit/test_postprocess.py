from ghostloop.postprocess import (
    CursorContext,
    completion_mode,
    cut_block,
    finish_suggestion,
)


def finish(prefix: str, suffix: str, generated: str, max_lines: int = 8) -> str:
    context = CursorContext(prefix, suffix)
    return finish_suggestion(generated, context, completion_mode(context, max_lines))


def test_mid_line_completion_stops_at_end_of_line():
    assert finish("x = foo(", ")\n", "a, b)\ny = 2") == "a, b"


def test_mid_line_never_repeats_text_after_cursor():
    assert finish("print(", ")\nnext()\n", '"hello")') == '"hello"'


def test_empty_line_plain_statement_is_one_line():
    assert finish("def f():\n    ", "\n", "x = 1\n    y = 2\n") == "x = 1"


def test_empty_line_block_opener_brings_its_body_and_stops_at_dedent():
    generated = "for item in items:\n        total += item\n        count += 1\n    return total"
    expected = "for item in items:\n        total += item\n        count += 1"
    assert finish("def f(items):\n    ", "\n", generated) == expected


def test_after_block_opener_suggests_indented_body():
    generated = "\n    return a + b\n\ndef g():\n    pass"
    assert finish("def add(a, b):", "\n", generated) == "\n    return a + b"


def test_block_respects_max_lines():
    generated = "if x:\n" + "".join(f"    a{i} = {i}\n" for i in range(10))
    assert finish("", "\n", generated, max_lines=3).count("\n") == 2


def test_block_drops_lines_that_already_follow_in_the_document():
    generated = "if ready:\n    start()\nfinish()\n"
    suffix = "\nfinish()\n"
    assert finish("", suffix, generated) == "if ready:\n    start()"


def test_whitespace_only_suggestion_is_dropped():
    assert finish("x = ", "\n", "   \n\n") == ""
    assert finish("def f():\n    ", "\n", "\n\n    \n") == ""


def test_trailing_whitespace_is_trimmed():
    assert finish("x = ", "\n", "compute()   ") == "compute()"


def test_cut_block_reports_when_generation_can_stop():
    context = CursorContext("value = ", "\n")
    mode = completion_mode(context, 8)
    assert cut_block("1 +", mode) == ("1 +", False)
    assert cut_block("1 + 2\n", mode) == ("1 + 2", True)


def test_one_line_allowed_is_a_single_line_mode_even_on_an_empty_line():
    """The survival tracker reads what was typed instead by the mode: a block only when a
    block could have been suggested (a replay with one-line completions cut its labels)."""
    for prefix in ("def f(x):\n    ", "    for x in y:"):
        context = CursorContext(prefix, "\n    return x\n")
        assert completion_mode(context, 8).multiline
        single = completion_mode(context, 1)
        assert not single.multiline and single.max_lines == 1
        assert finish(prefix, "\n    return x\n", "use(x)\n    more(x)\n", 1) == "use(x)"
