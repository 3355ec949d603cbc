import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feedback.redaction import _redact_assignments, redact

KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----"


@pytest.mark.parametrize(
    ("secret", "kind"),
    [
        (KEY, "private_key"),
        ("AKIAIOSFODNN7EXAMPLE", "aws_key"),
        ("ghp_" + "a1B2c3D4e5" * 4, "github_token"),
        ("glpat-" + "x1Y2z3" * 4, "gitlab_token"),
        ("xoxb-123456789012-abcdefghij", "slack_token"),
        ("sk-proj-" + "Ab1" * 10, "openai_key"),
    ],
)
def test_known_secret_formats_are_redacted(secret: str, kind: str):
    result = redact(f"value = connect({secret!r})\n")
    assert secret not in result.text
    assert f"<redacted:{kind}>" in result.text and result.count >= 1


def test_password_assignment_keeps_the_name_and_hides_the_value():
    result = redact("db_password = \"hunter2-extra\"\nAPI_TOKEN: 'abc123def'\n")
    assert "hunter2" not in result.text and "abc123def" not in result.text
    assert 'db_password = "<redacted:assignment>"' in result.text
    assert result.count == 2


def test_url_credentials_are_redacted():
    result = redact("url = 'postgresql://admin:s3cr3t@db.internal/prod'")
    assert "s3cr3t" not in result.text and "admin" not in result.text
    assert "db.internal/prod" in result.text


def test_high_entropy_strings_are_redacted_but_ordinary_code_is_not():
    code = "def compute_total_for_every_customer_account(items):\n    return sum(items)\n"
    assert redact(code) == type(redact(code))(code, 0)
    blob = "k = 'q8Zr2Lw9Xv4Tn7Bm1Kc6Hs3Pd5Fy0Gj2'"
    result = redact(blob)
    assert "q8Zr2Lw9" not in result.text and result.count == 1


# The assignment rule as it was written first: one regex, re.sub. Right, but quadratic to
# cubic in a long run of name characters; the rule now must redact exactly what it did.
_FIRST_ASSIGNMENT = re.compile(
    r"""(?ix)
    (?P<name>[\w.-]*(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|auth)[\w.-]*)
    (?P<sep>\s*[:=]\s*)
    (?P<quote>["'])(?P<value>[^"'\n]{4,})(?P=quote)
    """
)


def _first_rule(text: str) -> str:
    return _FIRST_ASSIGNMENT.sub(
        lambda m: (
            f"{m['name']}{m['sep']}{m['quote']}<redacted:assignment>{m['quote']}"
            if not m["value"].startswith("<redacted:")
            else m.group(0)
        ),
        text,
    )


_NAMES = ["password", "Token", "api_key", "auth", "pwd", "Secret", "passwd", "ACCESS-KEY"]
_NAMES += ["apikey", "x", "_", ".", "-", "é", "user"]
_name = st.lists(st.sampled_from(_NAMES), min_size=1, max_size=3).map("".join)
_value = st.lists(st.sampled_from(["abcd", "x", " ", "<redacted:x>", "é", "'", '"']), max_size=4)
_assignment = st.tuples(
    _name, st.sampled_from(["=", " = ", ":", ": "]), st.sampled_from(["'", '"']), _value
).map(lambda t: f"{t[0]}{t[1]}{t[2]}{''.join(t[3])}{t[2]}")
_noise = st.sampled_from(["\n", " ", "=", '"', "'", "x", "password", "abcd"])


@settings(max_examples=3000, deadline=None)
@given(text=st.lists(st.one_of(_assignment, _noise), max_size=8).map("".join))
def test_assignments_are_redacted_exactly_as_by_the_first_rule(text: str) -> None:
    assert _redact_assignments(text, lambda kind: f"<redacted:{kind}>") == _first_rule(text)


def test_redaction_is_linear_in_a_long_run_of_name_characters() -> None:
    # the first rule took minutes on this; the test's timeout would stop a regression
    assert redact("password" * 20_000).text == "password" * 20_000


def test_lone_surrogates_are_stored_as_replacement_characters() -> None:
    assert redact("a\ud800b").text == "a\ufffdb"
