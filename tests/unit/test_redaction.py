import pytest

from feedback.redaction import redact

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
