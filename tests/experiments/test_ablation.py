"""The ablation in miniature, at toy size: its arms, controls, blind rows, captioner chain, MLflow layout
and results table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sharegpt4v.config import load_recipe
from sharegpt4v.experiments.ablation import (
    ABLATION_OVERRIDES,
    ARMS,
    EXPERIMENT,
    AblationPlan,
    ablation_recipe,
    run_ablation,
)
from sharegpt4v.experiments.controls import ShuffledCaptioner, derangement
from sharegpt4v.experiments.summary import BLIND_IMAGE, BLIND_MAJORITY, log_summary, results_table, targets

TOY = [*ABLATION_OVERRIDES, "foundations.vision_steps=3", "foundations.language_steps=3", "pretrain.max_steps=2",
       "captioner.max_steps=2", "sft.max_steps=2", "pretrain.max_samples=64", "sft.max_samples=64",
       "captioner.max_samples=32", "captioning.max_new_tokens=8", "world.splits.train=0.6", "world.splits.val=0.2",
       "world.splits.test=0.2"]


def test_arms_change_only_what_they_should() -> None:
    base = load_recipe("tiny", list(ABLATION_OVERRIDES))
    recipes = {arm: ablation_recipe(base, arm, 7) for arm in ARMS}
    assert recipes["A"].pretrain.caption_field == "brief_caption"
    assert recipes["B"].pretrain.caption_field == recipes["C"].pretrain.caption_field == "detailed_caption"
    c = recipes["C"].pretrain
    assert c.train_llm is False and c.vit_unfreeze_from is None and c.train_projector
    assert recipes["B"].pretrain == recipes["D"].pretrain == recipes["shuffled"].pretrain  # only their captions differ
    assert ARMS["D"]["captions"] == "captioner" and ARMS["shuffled"]["captions"] == "shuffled"
    assert {r.seed for r in recipes.values()} == {7}
    assert len({json.dumps(r.sft.__dict__, default=str, sort_keys=True) for r in recipes.values()}) == 1
    assert len({json.dumps(r.eval.__dict__, default=str, sort_keys=True) for r in recipes.values()}) == 1


def test_plan_refuses_unknown_arms_and_empty_seeds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown"):
        AblationPlan(out=str(tmp_path), arms=("A", "Z"))
    with pytest.raises(ValueError, match="at least one"):
        AblationPlan(out=str(tmp_path), seeds=())


def test_shuffled_captions_describe_another_image(tmp_path: Path) -> None:
    from sharegpt4v.captioning.records import CaptionRequest
    from sharegpt4v.data.shards import open_dataset, sample_meta
    from sharegpt4v.world import Scene, score_caption
    from sharegpt4v.world.generate import generate_world

    world = str(tmp_path / "world")
    generate_world(world, 40, 3, load_recipe("tiny", list(ABLATION_OVERRIDES)).world, progress=False)
    samples = [sample_meta(s) for s in open_dataset(world).samples("train")]
    mapping = derangement([s["id"] for s in samples], 0)
    assert sorted(mapping.values()) == sorted(mapping) and all(k != v for k, v in mapping.items())
    captioner = ShuffledCaptioner(world, "train", seed=0)
    results = captioner.caption_batch([CaptionRequest(s["id"], b"", "photo", "") for s in samples])
    by_id = {s["id"]: s for s in samples}
    own = [score_caption(s["detailed_caption"], Scene.from_dict(s["scene"])).recall for s in samples]
    shuffled = [score_caption(r.caption, Scene.from_dict(by_id[r.id]["scene"])).recall for r in results]
    assert min(own) == 1.0 and sum(shuffled) / len(shuffled) < 0.6  # words of a caption, not of this image
    assert {r.caption for r in results} == {s["detailed_caption"] for s in samples}  # the same captions, moved


def test_targets_read_the_paper_s_claims_off_the_rows() -> None:
    def row(p: float, short: float | None = None, **cats: float) -> dict:
        values = {"world-vqa.perception": {"mean": p, "std": 0.0}}
        if short is not None:
            values["world-vqa.short.acc"] = {"mean": short, "std": 0.0}
        values.update({f"world-vqa.yesno.categories.{c}.score": {"mean": v, "std": 0.0} for c, v in cats.items()})
        return {"values": values}

    cats = dict(existence=60.0, count=85.0, position=70.0, colour=75.0)
    summary = {"rows": {"A": row(40.0, 0.4), "B": row(70.0, 0.6, **cats), "D": row(64.0, 0.5), "shuffled": row(38.0),
                        BLIND_MAJORITY: row(30.0, existence=27.0, count=80.0, position=30.0, colour=25.0),
                        BLIND_IMAGE: row(28.0, existence=30.0, count=86.0, position=35.0, colour=25.0)}}
    t = targets(summary)
    assert t["B - A perception"] == {"value": 30.0, "met": True}
    assert t["D share of B's gain"]["value"] == pytest.approx(0.8) and t["D share of B's gain"]["met"]
    assert t["shuffled <= A"]["met"]
    # B must beat the stronger blind row in every category: count (86 blank-image) is not beaten.
    assert t["B above blind"]["value"]["count"] == pytest.approx(-1.0) and not t["B above blind"]["met"]
    # short answers are reported beside the targets, never counted as met
    assert t["B - A short answers"] == {"value": pytest.approx(0.2), "met": None}
    assert t["D share of B's short-answer gain"]["value"] == pytest.approx(0.5)
    # A gain within the noise has no share to keep: B 1 point over A, each ± 1.2, D 4 over A.
    noisy = {arm: {**row(p, **cats), "se": {"world-vqa.perception": 1.2}, "seeds": [0]}
             for arm, p in (("A", 27.6), ("B", 28.6), ("D", 31.6))}
    share = targets({"rows": {**summary["rows"], **noisy}})["D share of B's gain"]
    assert share["value"] == pytest.approx(4.0) and not share["met"]


@pytest.mark.slow
def test_toy_ablation_end_to_end(tmp_path: Path, mlflow_sqlite: str) -> None:
    recipe = load_recipe("tiny", TOY)
    plan = AblationPlan(out=str(tmp_path / "ablation"), images=120, arms=("A", "B", "D", "shuffled", "none"),
                        seeds=(0, 1), lanes=2)
    before = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    summary = run_ablation(recipe, plan, progress=False)
    log_summary(summary)
    assert os.environ.get("MLFLOW_EXPERIMENT_NAME") == before  # nothing leaks into later runs of this process
    rows = summary["rows"]
    assert set(rows) == {"A", "B", "D", "shuffled", "none", BLIND_MAJORITY, BLIND_IMAGE}
    for name in ("A", "B", "D", "shuffled", "none"):
        assert sorted(rows[name]["seeds"]) == [0, 1]
        assert 0.0 <= rows[name]["values"]["world-vqa.perception"]["mean"] <= 100.0
    # The captioner chain: trained from A's pretraining (first seed), scored beside the teacher.
    captioner = summary["captioner"]
    assert captioner["base"].endswith("runs/A-seed-0/pretrain/final")
    assert captioner["sets"]["teacher"]["recall"] == 1.0 and captioner["sets"]["teacher"]["false_per_caption"] == 0.0
    assert {"captioner", "brief", "captioner (blank image)"} <= set(captioner["sets"])
    assert set(summary["targets"]) >= {"B - A perception", "B above blind", "D share of B's gain", "shuffled <= A",
                                       "captioner recall / teacher's"}
    table = (tmp_path / "ablation" / "results.md").read_text()
    assert table == results_table(summary) and "| B: teacher-detailed captions | 2 |" in table
    assert "| B - A short answers | (reported) |" in table  # reported beside the targets, never "met"

    client = MlflowClient(mlflow_sqlite)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    names = {r.info.run_name for r in runs}
    assert {"arm-A-seed-0", "arm-B-seed-1", "arm-D-seed-1", "captioner-chain", "ablation-summary"} <= names
    arm_d = next(r for r in runs if r.info.run_name == "arm-D-seed-1")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == arm_d.info.run_id]
    assert {r.info.run_name for r in children} >= {"pretrain", "sft"}
    summary_run = next(r for r in runs if r.info.run_name == "ablation-summary")
    artifacts = {a.path for a in client.list_artifacts(summary_run.info.run_id, "ablation")}
    assert {"ablation/results.md", "ablation/perception.png", "ablation/results.json"} <= artifacts

    # a rerun keeps finished arms and the captioner instead of training them again
    again = run_ablation(recipe, plan, progress=False)
    assert again["rows"]["D"]["perception_by_seed"] == rows["D"]["perception_by_seed"]

    # probes on the finished ablation: SFT with other settings from the arms' pretrained models, and a
    # vision tower trained with other foundations settings beside the ablation's own
    from sharegpt4v.data.shards import open_dataset, sample_meta
    from sharegpt4v.experiments.probes import sft_probe, sft_probe_table, vision_probe

    probe = sft_probe(plan.out, load_recipe("tiny", [*TOY, "sft.learning_rate=1e-4", "sft.yes_no_reasons=before"]),
                      ("A", "none"), str(tmp_path / "probe"), seed=1)
    assert [r["arm"] for r in probe] == ["A", "none"]
    # with reasons, each yes/no test question is also asked at length and its reason checked
    test_items = [i for s in open_dataset(f"{plan.out}/world").samples("test") for i in sample_meta(s)["vqa"]]
    for r in probe:
        categories = r["reasons"]["categories"]
        assert set(categories) == {"existence", "count", "position", "colour"}
        assert sum(row["questions"] for row in categories.values()) == sum(i["kind"] == "yesno" for i in test_items)
        # the answer words after the reasons, scored MME's way (acc + acc+ per pair) like the headline
        assert all(0.0 <= row["score"] <= 100.0 for row in categories.values())
        assert r["reasons"]["perception"] == pytest.approx(sum(row["score"] for row in categories.values()) / 4)
    assert all(0.0 <= r["metrics"]["world-vqa.perception"] <= 100.0 for r in probe)
    assert "| A | " in sft_probe_table(probe)
    made = {arm: json.loads((tmp_path / "probe" / arm / "sft" / "final" / "manifest.json").read_text())
            for arm in ("A", "none")}
    assert made["A"]["init"] == f"{plan.out}/runs/A-seed-1/pretrain/final" and made["none"]["init"] is None
    assert made["A"]["made_from"]["recipe"]["sft"]["learning_rate"] == 1e-4  # the probe's SFT, not the ablation's
    assert made["A"]["made_from"]["recipe"]["seed"] == 1  # the seed the ablation trained those models with
    with pytest.raises(ValueError, match="no finished pretraining"):
        sft_probe(plan.out, recipe, ("C",), str(tmp_path / "probe-c"))  # C was not in this ablation
    towers = vision_probe(plan.out, load_recipe("tiny", [*TOY, "foundations.vision_alt_text=names"]), train_images=40)
    assert set(towers) == {"ablation's tower", "recipe's tower"}
    assert all(0.0 <= acc <= 1.0 for tower in towers.values() for acc in tower.values())


def test_linear_probe_reads_a_separable_label_and_not_noise() -> None:
    import torch

    from sharegpt4v.experiments.probes import linear_probe

    torch.manual_seed(0)
    x = torch.randn(400, 16)
    labels = ["a" if v > 0 else "b" for v in x[:, 3].tolist()]
    assert linear_probe(x[:300], labels[:300], x[300:], labels[300:]) > 0.9
    noise = ["a" if v > 0 else "b" for v in torch.randn(400).tolist()]
    assert linear_probe(x[:300], noise[:300], x[300:], noise[300:]) < 0.7


def test_reason_scores_tell_seeing_from_comparing() -> None:
    from sharegpt4v.evaluation.world_vqa import item_questions
    from sharegpt4v.experiments.probes import reason_table, score_answer_words, score_reasons

    red = {"category": "colour", "question": "Is the circle in the center red?", "reason": "it is red", "answer": "yes"}
    blue = {**red, "question": "Is the circle in the center blue?", "answer": "no"}
    two = {"category": "count", "question": "Are there exactly 3 objects in the image?", "reason": "there are 2 objects",
           "answer": "no"}
    # sees red and says so, but answers "yes" to both: the reason is right, the comparison is not
    scores = score_reasons([red, blue, two, two], ["yes, it is red.", "yes, it is red.", "no, there are 2 objects.",
                                                   "yes"])
    assert scores["colour"] == {"questions": 2, "answer": 0.5, "reason": 1.0, "agrees": 0.5}
    assert scores["count"] == {"questions": 2, "answer": 0.5, "reason": 0.5, "agrees": 0.5}  # "yes" alone: no reason
    table = reason_table([{"arm": "B", "reasons": {"perception": 25.0, "categories": scores}}])
    assert "| B | colour | 2 | 0.500 | 1.000 | 0.500 | nan |" in table and "| B | perception (0-100) | | | | | 25.0 |" in table
    # the reason first ("it is red, so no."): the answer word is the one after it
    first = score_reasons([red, blue, two], ["it is red, so yes.", "it is red, so no.", "there are 3 objects, so yes."])
    assert first["colour"] == {"questions": 2, "answer": 1.0, "reason": 1.0, "agrees": 1.0}
    # a wrong reason, and an answer word that follows from it
    assert first["count"] == {"questions": 1, "answer": 0.0, "reason": 0.0, "agrees": 1.0}
    # the answer words after the reasons, scored MME's way: the pair (red: yes, blue: no) is right
    pair = [{**red, "qid": "s-q0", "kind": "yesno", "pair": "s-pcolour"}, {**blue, "qid": "s-q1", "kind": "yesno", "pair": "s-pcolour"}]
    questions = [q for item in pair for q in item_questions(item, None)]
    assert score_answer_words(questions, ["it is red, so yes.", "it is red, so no."])["perception"] == 100.0
    assert score_answer_words(questions, ["it is red, so yes.", "it is red, so yes."])["perception"] == 25.0
