"""What an output was made from, so a rerun into the same place never returns another run's result.

Every resumable output records a `made_from` tree beside its manifest: a checkpoint its recipe,
data, captions and init; a caption set its captioner, prompts and input dataset; a model
repository the checkpoints it serves. A run that finds an output made from something else stops
with one line naming what differs, unless the user asked to start over (`--no-resume`,
`--overwrite`, `--replace`): a stale result is never returned with exit 0.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sharegpt4v.errors import PlatformError


class OutputMismatch(PlatformError):
    """The output location holds a result made from other inputs, recipe or model."""


def content_digest(tree: Any) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [2]} -> {"a.b": 1, "c.0": 2}: the paths a difference is named by."""
    if isinstance(tree, dict):
        if not tree and prefix:
            return {prefix: {}}
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, (list, tuple)):
        if not tree and prefix:
            return {prefix.rstrip("."): []}
        out = {}
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): tree}


def _short(value: Any) -> str:
    if value is None:
        return "none"
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a sha256: its first 12 hex digits tell two apart
    return text if len(text) <= 40 else text[:37] + "..."


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every leaf that differs (missing on one side shows as `none`)."""
    a, b = flatten(old), flatten(new)
    keys = dict.fromkeys([*b, *a])  # in the order the new tree names them: its most telling parts first
    return [f"{key}: {_short(a.get(key))} -> {_short(b.get(key))}" for key in keys if a.get(key) != b.get(key)]


def refuse_if_different(where: str, what: str, old: dict[str, Any] | None, new: dict[str, Any], start_over: str) -> None:
    """Raise OutputMismatch (one line) when `old` (what `where` was made from) differs from `new`.

    `old` None: an output written before provenance was recorded; it is accepted as it is.
    """
    if old is None:
        return
    diffs = differences(old, new)
    if not diffs:
        return
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    raise OutputMismatch(
        f"{where}: holds {what} made from something else ({'; '.join(diffs[:3])}{more}); "
        f"pass {start_over} to start over there, or choose another output"
    )
