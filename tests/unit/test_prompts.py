from pathlib import Path

import pytest

from ghostloop.models import HFTokenizer
from ghostloop.prompts import (
    TEMPLATES,
    Snippet,
    build_prompt,
    detect_template,
    fit_repository,
    heal_prefix,
    render_snippets,
    trim_prefix,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> HFTokenizer:
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))


@pytest.mark.parametrize(
    ("vocabulary", "expected"),
    [
        ({"<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"}, "qwen2.5-coder"),
        ({"<fim_prefix>", "<fim_suffix>", "<fim_middle>"}, "starcoder2"),
        ({"<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"}, "deepseek-coder"),
        ({"<PRE>", "<SUF>", "<MID>"}, "codellama"),
        ({"<|im_start|>", "<|im_end|>"}, "prefix-only"),
    ],
)
def test_template_is_detected_from_the_tokenizer_vocabulary(vocabulary, expected):
    assert detect_template(vocabulary).name == expected


def test_fim_templates_put_prefix_then_suffix_then_middle():
    rendered = TEMPLATES["starcoder2"].render("a = ", "\nb")
    assert rendered == "<fim_prefix>a = <fim_suffix>\nb<fim_middle>"
    assert TEMPLATES["codellama"].render("x", "y") == "<PRE> x <SUF>y <MID>"
    assert TEMPLATES["prefix-only"].render("x", "y") == "x"


def test_after_indentation_one_space_is_healed(tokenizer):
    ids, healed = heal_prefix(tokenizer, "def f():\n        ")
    assert healed == " "
    assert tokenizer.decode_ids(ids) == "def f():\n       "


@pytest.mark.parametrize("blank_lines", [0, 1, 2])
def test_at_column_zero_the_prompt_ends_as_the_document_tokenizes_there(tokenizer, blank_lines):
    # "\n\n" at the end of a text is one token that documents follow only with another
    # newline; before a line's first character they hold "\n", "\n": healing with the
    # merged token made the model write a blank line and suggest nothing at column 0
    prefix = "import os\n" + "\n" * blank_lines
    ids, healed = heal_prefix(tokenizer, prefix)
    assert healed == ""
    in_document = tokenizer.encode_text(prefix + "def main():\n")
    assert ids == in_document[: len(ids)]
    assert tokenizer.decode_ids(ids) == prefix


def test_mid_word_the_partial_token_is_healed(tokenizer):
    prefix = "    return self.wordsep_simple_re.spl"
    ids, healed = heal_prefix(tokenizer, prefix)
    assert healed and prefix.endswith(healed)
    assert tokenizer.decode_ids(ids) + healed == prefix


@pytest.mark.parametrize(
    ("prefix", "healed"),
    [
        ("    total = order.subtotal + zorvex_shipping_sur", " zorvex_shipping_sur"),
        ("    ref = entry.vellum_ta", "vellum_ta"),
        ("x=zorvex_ship", "zorvex_ship"),
    ],
)
def test_a_partial_name_is_healed_from_its_start(tokenizer, prefix, healed):
    # a name typed in another tokenization than the context's defeats copying it: the
    # model writes the whole name again, in its own tokens
    ids, got = heal_prefix(tokenizer, prefix)
    assert len(tokenizer.encode_text(healed)) > 1, "the case must span several tokens"
    assert got == healed
    assert ids == tokenizer.encode_text(prefix[: -len(healed)])


def test_a_name_longer_than_the_limit_heals_one_token(tokenizer):
    prefix = "value = " + "very_long_name_" * 4
    ids, healed = heal_prefix(tokenizer, prefix)
    assert 0 < len(healed) < 15
    assert tokenizer.decode_ids(ids) + healed == prefix


def test_the_healing_tokens_cover_the_rest_or_a_part_of_its_start(tokenizer, tiny_model_dir):
    from ghostloop.prompts import TokenPrefixIndex

    texts = [tokenizer.decode_ids([i]) for i in range(len(tokenizer))]
    index = TokenPrefixIndex(texts, set())
    allowed = index.healing("_shipping")
    assert allowed
    for token in allowed:
        text = texts[token]
        assert text.startswith("_shipping") or "_shipping".startswith(text)
    parts = {texts[t] for t in allowed}
    assert "_" in parts  # a one-character start is always a way on


def test_prefix_trimmed_to_budget_starts_at_a_line(tokenizer):
    prefix = "".join(f"line_{i} = {i}\n" for i in range(400)) + "value = "
    kept = trim_prefix(tokenizer, prefix, budget=60)
    assert len(tokenizer.encode_text(kept)) <= 60
    assert prefix.endswith(kept) and prefix[-len(kept) - 1] == "\n"


def test_trimmed_start_stays_put_while_typing_at_the_end(tokenizer):
    """The KV cache of the previous keystroke stays usable: the kept prefix only grows."""
    prefix = "".join(f"line_{i} = {i}\n" for i in range(400))
    typed = "value = compute(line_1, line_2) + line_3"
    starts = []
    for end in range(len(typed) + 1):
        text = prefix + typed[:end]
        kept = trim_prefix(tokenizer, text, budget=120)
        assert len(tokenizer.encode_text(kept)) <= 120
        starts.append(len(text) - len(kept))
    distinct = sorted(set(starts))
    assert len(distinct) <= 2  # moved at most once over 40 keystrokes, and then by a lot
    assert distinct[-1] - distinct[0] in (0, *range(60, 10_000))


def test_fim_prompt_keeps_nearest_suffix_within_share(tokenizer):
    template = TEMPLATES["starcoder2"]
    markers = {
        m: [1000 + i]
        for i, m in enumerate(
            (template.prefix_marker, template.suffix_marker, template.middle_marker)
        )
    }
    suffix = "".join(f"after_{i}()\n" for i in range(300))
    prompt = build_prompt(
        tokenizer,
        template,
        "x = 1\ny = ",
        suffix,
        context_tokens=100,
        suffix_share=0.25,
        marker_ids=markers,
    )
    assert prompt.input_ids[0] == 1000 and prompt.input_ids[-1] == 1002
    assert suffix.startswith(prompt.suffix) and prompt.suffix.endswith("\n")
    assert len(tokenizer.encode_text(prompt.suffix)) <= 25


def test_user_text_cannot_inject_special_tokens(tokenizer):
    ids = tokenizer.encode_text("x = '<|endoftext|>'")
    assert 0 not in ids  # id 0 is the tiny model's end token


def _first_fitting_start(tokenizer, prefix: str, budget: int) -> str:
    """trim_prefix's rule tried candidate by candidate, as it was first written."""
    step = max(32, budget)
    start = max(0, len(prefix) - budget * 8)
    start -= start % step
    while True:
        if start <= 0:
            cut = 0
        else:
            newline = prefix.find("\n", start - 1)
            cut = newline + 1 if newline >= 0 else start
        window = prefix[cut:]
        if not window or len(tokenizer.encode_text(window)) <= budget:
            return window
        start += step


def test_trim_prefix_keeps_the_first_start_that_fits(tokenizer):
    """The guess-and-walk search returns what trying every candidate in turn returns, on
    real code of several densities, long lines and none at all."""
    import random

    from ghostloop.corpus import stdlib_dir

    rng = random.Random(5)
    sources = [
        (stdlib_dir() / name).read_text(encoding="utf-8")
        for name in ("textwrap.py", "calendar.py", "ipaddress.py", "json/decoder.py")
    ]
    sources.append("x = 1; " * 3000)  # one long line: the cut falls mid-line
    checked = 0
    for source in sources:
        for _ in range(25):
            end = rng.randrange(1, len(source))
            for budget in (16, 60, 256, 512):
                assert trim_prefix(tokenizer, source[:end], budget) == _first_fitting_start(
                    tokenizer, source[:end], budget
                ), (end, budget)
                checked += 1
    assert checked == 500


def test_snippets_are_comment_lines_under_their_path_in_the_documents_language():
    snippet = Snippet("pkg/rates.py", 3, "RATES = {\n    'winter': 4,\n}")
    [python] = render_snippets([snippet], "python")
    assert python == "# Path: pkg/rates.py\n# RATES = {\n#     'winter': 4,\n# }\n"
    [rust] = render_snippets([snippet], "rust")
    assert rust.startswith("// Path: pkg/rates.py\n// RATES = {")
    [lua] = render_snippets([snippet], "lua")
    assert lua.startswith("-- Path: pkg/rates.py\n")


def test_the_repository_part_keeps_the_best_snippets_that_fit_the_best_last(tokenizer):
    blocks = render_snippets(
        [
            Snippet("best.py", 0, "best_match = 1"),
            Snippet("long.py", 0, "\n".join(f"filler_{i} = {i}" for i in range(200))),
            Snippet("third.py", 0, "third_match = 3"),
        ],
        "python",
    )
    kept = fit_repository(tokenizer, blocks, budget=60)
    assert kept == blocks[2] + blocks[0], "the long one does not fit; the best is nearest"
    assert len(tokenizer.encode_text(kept)) <= 60
    assert fit_repository(tokenizer, blocks, budget=0) == ""


def test_the_repository_goes_before_the_prefix_and_leaves_its_tokens_alone(tokenizer):
    template = detect_template(set())
    common = {"context_tokens": 64, "suffix_share": 0.25, "marker_ids": {}}
    alone = build_prompt(tokenizer, template, "def f():\n    return ", "", **common)
    repository = "# Path: a.py\n# x = 1\n"
    both = build_prompt(
        tokenizer, template, "def f():\n    return ", "", repository=repository, **common
    )
    ids = tokenizer.encode_text(repository)
    assert both.input_ids == tuple(ids) + alone.input_ids
    assert (both.prefix, both.healed, both.repository) == (alone.prefix, alone.healed, repository)
