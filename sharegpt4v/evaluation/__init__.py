"""Evaluation: benchmarks (questions loader + scorer), answerers, `evaluate` and `score_answers`.

Benchmarks are independent of the model; an `Answerer` (a model behind `InferenceEngine`, or
any object with `answer(questions) -> list[str]`) produces the answers. Registered benchmarks:
`world-vqa` (the synthetic world's questions, the default), `mme`, `mmbench`, `scienceqa`,
`gqa`, `textvqa` (user-supplied files in the layouts they ship in). Scorers follow the
reference scripts; on LLaVA-1.5-13B's released answers they give MME perception 1531.3 and
MMBench-dev circular 67.7.

Compute modules import only the standard library, pandas, PIL, numpy and torch at module
level; object storage and MLflow are imported inside the functions that use them.
"""

from sharegpt4v.evaluation.benchmark import Benchmark
from sharegpt4v.evaluation.common import (
    MULTIPLE_CHOICE_PROMPT,
    SHORT_ANSWER_PROMPT,
    Answerer,
    BenchmarkError,
    EngineAnswerer,
    Question,
    answer_record,
    infer_option,
    normalize_short,
    parse_jsonl,
    parse_yes_no,
)
from sharegpt4v.evaluation.registry import BENCHMARKS, get_benchmark
from sharegpt4v.evaluation.run import as_answerer, evaluate, flat_metrics, score_answers

__all__ = [
    "BENCHMARKS", "MULTIPLE_CHOICE_PROMPT", "SHORT_ANSWER_PROMPT",
    "Answerer", "Benchmark", "BenchmarkError", "EngineAnswerer", "Question",
    "answer_record", "as_answerer", "evaluate", "flat_metrics", "get_benchmark", "infer_option",
    "normalize_short", "parse_jsonl", "parse_yes_no", "score_answers",
]
