"""Small helpers shared by the benchmarks: timing, a printed table with ratios, a tiny captioner."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


def tiny_captioner(model_config: Any, n_images: int) -> tuple[Any, Any, list[Any]]:
    """A tiny LLaVA built from `model_config` (random weights, seed 0), its tokenizer trained on the
    synthetic world's captions and the captioning prompt, and `n_images` world images (PIL)."""
    from sharegpt4v.captioning.records import CAPTION_INSTRUCTION
    from sharegpt4v.config import WorldConfig
    from sharegpt4v.modeling.builder import build_tiny
    from sharegpt4v.modeling.templates import SYSTEM_PROMPT
    from sharegpt4v.modeling.tokenizer import train_tokenizer
    from sharegpt4v.world import make_sample

    samples = [make_sample(0, i, WorldConfig()) for i in range(max(300, n_images))]
    texts = [s.metadata["detailed_caption"] for s in samples] + [s.metadata["brief_caption"] for s in samples]
    texts += [f"{SYSTEM_PROMPT} USER: {CAPTION_INSTRUCTION} ASSISTANT:"] * 20
    model, processor = build_tiny(model_config, train_tokenizer(texts, model_config.language.vocab_size), seed=0)
    return model, processor, [s.image for s in samples[:n_images]]


def run_load(call: Callable[[Any, bytes], int], connect: Callable[[], Any], images: list[bytes],
             clients: int) -> dict[str, float]:
    """`len(images)` requests from `clients` threads at once; `call` returns the generated tokens."""
    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()
    start = threading.Barrier(clients)
    work = iter(range(len(images)))

    def worker() -> None:
        nonlocal tokens
        connection = connect()
        start.wait()
        while True:
            with lock:
                i = next(work, None)
            if i is None:
                if hasattr(connection, "close"):
                    connection.close()
                return
            began = time.perf_counter()
            generated = call(connection, images[i])
            with lock:
                latencies.append(time.perf_counter() - began)
                tokens += generated

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(worker) for _ in range(clients)]:
            future.result()
    seconds = time.perf_counter() - began
    assert len(latencies) == len(images)
    return {"req/s": len(images) / seconds, "tokens/s": tokens / seconds,
            "p50 ms": _percentile(latencies, 50) * 1000, "p99 ms": _percentile(latencies, 99) * 1000}


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))
