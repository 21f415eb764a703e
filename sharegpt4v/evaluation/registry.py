"""The benchmark registry: name -> class. A new benchmark subclasses `Benchmark` and is added here."""

from __future__ import annotations

from sharegpt4v.evaluation.benchmark import Benchmark
from sharegpt4v.evaluation.common import BenchmarkError
from sharegpt4v.evaluation.gqa import GQA
from sharegpt4v.evaluation.mmbench import MMBench
from sharegpt4v.evaluation.mme import MME
from sharegpt4v.evaluation.scienceqa import ScienceQA
from sharegpt4v.evaluation.textvqa import TextVQA
from sharegpt4v.evaluation.world_vqa import WorldVQA

BENCHMARKS: dict[str, type[Benchmark]] = {cls.name: cls for cls in (WorldVQA, MME, MMBench, ScienceQA, GQA, TextVQA)}


def get_benchmark(name: str, source: str | None = None, limit: int | None = None, split: str = "test") -> Benchmark:
    """A benchmark over `source` (its folder or file; for `world-vqa` the dataset URI)."""
    cls = BENCHMARKS.get(name)
    if cls is None:
        raise BenchmarkError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    return cls(source, limit=limit, split=split)
