"""Small helpers shared by the benchmarks: timing and a printed table with ratios."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """Best wall time over `repeats` runs (the least disturbed by the machine), and the result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def print_table(title: str, rows: list[dict[str, Any]], baseline: str, rate_key: str) -> None:
    """Rows of {"name", rate_key, ...}; prints each rate and its ratio to the baseline row."""
    base = next(r[rate_key] for r in rows if r["name"] == baseline)
    columns = [k for k in rows[0] if k != "name"]
    print(f"\n## {title}\n")
    print("| case | " + " | ".join(columns) + f" | ratio vs {baseline} |")
    print("|---" * (len(columns) + 2) + "|")
    for row in rows:
        cells = [f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print(f"| {row['name']} | " + " | ".join(cells) + f" | {row[rate_key] / base:.2f}x |")
