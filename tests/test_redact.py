"""Credentials never reach a log line or an MLflow param: userinfo and secret query values are cut out of URLs."""

from __future__ import annotations

import pytest

from sharegpt4v.redact import redact_text, redact_url


@pytest.mark.parametrize("url, expected", [
    ("https://user:pass@teacher.example.com/v1", "https://teacher.example.com/v1"),
    ("https://user:pass@teacher.example.com:8443/v1?sig=abc&model=x",
     "https://teacher.example.com:8443/v1?sig=REDACTED&model=x"),
    ("https://token@github.com/org/repo.git", "https://github.com/org/repo.git"),
    ("https://u:p%40ss@h.example/", "https://h.example/"),
    ("https://bucket.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2024"
     "&X-Amz-Signature=deadbeef&X-Amz-Security-Token=tok&X-Amz-Expires=60",
     "https://bucket.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=REDACTED"
     "&X-Amz-Signature=REDACTED&X-Amz-Security-Token=REDACTED&X-Amz-Expires=60"),
    ("https://acct.blob.core.windows.net/c/b?sv=2022&sig=xyz%3D&se=2030", "https://acct.blob.core.windows.net/c/b?sv=2022&sig=REDACTED&se=2030"),
    ("http://h/x?api_key=1&apikey=2&token=3&key=4&password=5&secret=6&access_token=7&code=8&signature=9&page=2",
     "http://h/x?api_key=REDACTED&apikey=REDACTED&token=REDACTED&key=REDACTED&password=REDACTED&secret=REDACTED"
     "&access_token=REDACTED&code=REDACTED&signature=REDACTED&page=2"),
    ("http://h/x?DB_PASSWORD=1&Api-Key=2&flag", "http://h/x?DB_PASSWORD=REDACTED&Api-Key=REDACTED&flag"),
    ("https://app.example/cb#access_token=abc&state=1", "https://app.example/cb#access_token=REDACTED&state=1"),
    ("postgresql://mlflow:hunter2@postgres:5432/mlflow", "postgresql://postgres:5432/mlflow"),
])
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize("value", [
    "s3://bucket/data/manifest.json", "/local/folder", "http://127.0.0.1:5000", "synthetic", "$OPENAI_BASE_URL",
    "models:/sharegpt4v-chat@champion", "https://h/x?model=gpt&page=2", "", "3e-4",
])
def test_values_without_secrets_are_unchanged(value: str) -> None:
    assert redact_url(value) == value
    assert redact_text(value) == value


def test_redact_text_finds_every_url_in_a_longer_text() -> None:
    text = "teacher https://u:p@a.example/v1?sig=s, fallback http://b.example/v1?token=t and s3://c/d"
    assert redact_text(text) == ("teacher https://a.example/v1?sig=REDACTED, fallback http://b.example/v1?"
                                 "token=REDACTED and s3://c/d")


def test_a_url_that_does_not_parse_still_loses_its_userinfo() -> None:
    assert redact_url("http://user:pw@[::1/x") == "http://[::1/x"


def test_teacher_error_details_carry_no_url_credentials() -> None:
    """What the teacher's server quotes back (a presigned URL, an endpoint with userinfo) is redacted in
    the detail lines of results and logs, like the API key."""
    from sharegpt4v.captioning.teacher import TeacherClient
    from sharegpt4v.config import TeacherConfig

    teacher = TeacherClient(TeacherConfig(model="m"), base_url="http://127.0.0.1:9/v1", api_key="sk-key-1234")
    detail = teacher._redact("HTTP 400: cannot fetch https://u:pw@img.example/a.png?X-Amz-Signature=ab (key sk-key-1234)")
    assert detail == "HTTP 400: cannot fetch https://img.example/a.png?X-Amz-Signature=REDACTED (key ***)"
    assert teacher.name == "teacher:m@127.0.0.1:9"
