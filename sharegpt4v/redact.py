"""Credentials out of URLs before they are logged or recorded (MLflow params and tags, log lines).

`redact_url` drops the userinfo (`user:password@`) and replaces the values of query (and fragment)
parameters that carry secrets (`sig`, `token`, `api_key`, `X-Amz-Signature`, ...) with `REDACTED`;
`redact_text` does that to every URL inside a longer text. Anything that is not a URL is returned
as it is, so both are safe to apply to any value.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus, urlsplit, urlunsplit

REDACTED = "REDACTED"

# Query parameter names (lower case, `-` read as `_`) whose values are credentials.
SECRET_PARAMS = frozenset({
    "sig", "signature", "token", "key", "api_key", "apikey", "password", "passwd", "pwd", "secret",
    "client_secret", "access_token", "refresh_token", "id_token", "auth", "authorization", "code",
    "credential", "credentials", "session_token", "security_token", "private_token", "sas", "sv_sig",
    "x_amz_signature", "x_amz_credential", "x_amz_security_token", "x_goog_signature", "x_goog_credential",
})
# ... and any name containing one of these words (`db_password`, `github_token`, `AWSAccessKeyId`...).
_SECRET_WORDS = ("password", "passwd", "secret", "token", "signature", "credential", "apikey", "api_key",
                 "accesskey", "access_key")

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
_USERINFO = re.compile(r"(?<=//)[^/?#@\s]*@")


def is_secret_param(name: str) -> bool:
    key = unquote_plus(name).strip().lower().replace("-", "_")
    return key in SECRET_PARAMS or any(word in key for word in _SECRET_WORDS)


def _redact_params(query: str) -> str:
    """`a=1&sig=xyz` -> `a=1&sig=REDACTED`, keeping every other byte (order, encoding) as it was."""
    if not query:
        return query
    out = []
    for pair in re.split(r"([&;])", query):
        name, eq, _ = pair.partition("=")
        out.append(f"{name}={REDACTED}" if eq and is_secret_param(name) else pair)
    return "".join(out)


def redact_url(url: str) -> str:
    """`url` without userinfo and with secret-looking query values replaced by `REDACTED`."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: still never show the userinfo
        return _USERINFO.sub("", url)
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    query, fragment = _redact_params(parts.query), _redact_params(parts.fragment)
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return url  # nothing secret: the URL exactly as given
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def redact_text(text: str) -> str:
    """`text` with every URL in it passed through `redact_url`."""
    if "://" not in text:
        return text
    def one(match: re.Match[str]) -> str:
        url = match.group(0).rstrip(".,;:!?)]}")  # punctuation after a URL is the sentence's, not the URL's
        return redact_url(url) + match.group(0)[len(url):]

    return _URL.sub(one, text)
