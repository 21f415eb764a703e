"""Evaluation throughput: world-vqa questions answered and scored per second by eval batch size,
and the time to score LLaVA-1.5-13B's released MME and MMBench answers.

Same tiny model (random weights, so every answer runs to `--tokens`), same world test split.

Run: .venv/bin/python bench/bench_eval.py [--images 6] [--tokens 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, timed  # noqa: E402
from sharegpt4v.config import WorldConfig, load_recipe  # noqa: E402
from sharegpt4v.evaluation import evaluate, get_benchmark, score_answers  # noqa: E402
from sharegpt4v.modeling.builder import build_tiny  # noqa: E402
from sharegpt4v.modeling.tokenizer import train_tokenizer  # noqa: E402
from sharegpt4v.world import make_sample  # noqa: E402
from sharegpt4v.world.generate import generate_world  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference-scores" / "llava-v1.5-13b"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    recipe = load_recipe("tiny", [f"eval.max_new_tokens={args.tokens}"])
    corpus = []
    for i in range(200):
        m = make_sample(0, i, WorldConfig()).metadata
        corpus += [m["detailed_caption"], *(f"{q['question']} {q['answer']}" for q in m["vqa"])]
    model, processor = build_tiny(recipe.model, train_tokenizer(corpus, recipe.model.language.vocab_size))
    with tempfile.TemporaryDirectory() as tmp:
        world = f"{tmp}/world"
        generate_world(world, args.images, 1, WorldConfig(splits={"test": 1.0}), progress=False)
        n = len(get_benchmark("world-vqa", world).questions())
        rows = []
        for batch in (1, 8, 32):
            recipe.eval.batch_size = batch
            seconds, _ = timed(lambda: evaluate((model, processor), recipe, world))
            rows.append({"name": f"batch {batch}", "questions/s": n / seconds, "seconds": seconds})
    print(f"world-vqa: {n} prompts ({args.images} images), {args.tokens} new tokens each, machine cores: 2 expected")
    print_table("Evaluation throughput (tiny model, CPU)", rows, baseline="batch 1", rate_key="questions/s")
    if REFERENCE.is_dir():
        mme = REFERENCE / "MME"
        xlsx = REFERENCE / "MMBench" / "mmbench_answers_upload_mmbench_dev_20230712_llava-v1.5-13b.xlsx"
        seconds_mme, r_mme = timed(lambda: score_answers("mme", str(mme / "MME_answers_llava-v1.5-13b.jsonl"),
                                                         str(mme / "ground_truth")), repeats=3)
        seconds_mmb, r_mmb = timed(lambda: score_answers("mmbench", str(xlsx)), repeats=3)
        print("\n## Scoring LLaVA-1.5-13B's released answers\n")
        print("| benchmark | rows | result | seconds |\n|---|---|---|---|")
        print(f"| MME | {r_mme['questions']} | perception {r_mme['perception']:.2f}, cognition {r_mme['cognition']:.2f} "
              f"| {seconds_mme:.2f} |")
        print(f"| MMBench dev | {r_mmb['questions']} | circular {100 * r_mmb['circular']:.2f}, "
              f"vanilla {100 * r_mmb['vanilla']:.2f} | {seconds_mmb:.2f} |")


if __name__ == "__main__":
    main()
