"""collect_feedback.py: rater comparisons of the policy's own samples on the embedded task."""

import json
import os
import subprocess
import sys

import pytest

import collect_feedback as cf
import embedded_task as et
from helpers import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("feedback")
    task = str(root / "task")
    et.build(et.Args(out_dir=task, sizes="", n_sft_train=40, n_sft_val=10, n_sft_test=5, n_cmp_train=40, n_cmp_val=20,
                     n_pretrain_posts=40, vocab_size=3000), log=lambda *a: None)
    tok = AutoTokenizer.from_pretrained(os.path.join(task, "tokenizer"))
    tok.add_special_tokens({"pad_token": "[PAD]"})  # Detail 3: a dedicated pad token
    policy = str(root / "policy")
    tiny_model(tok, path=policy)
    return task, policy, root


def _args(setup, out, **kw):
    task, policy, _ = setup
    return cf.Args(**{**dict(task_dir=task, policy_path=policy, output_dir=str(out), num_train_posts=12,
                             num_validation_posts=5, batch_size=5, response_length=12, num_threads=1, pairs_per_post=1), **kw})


def test_pairs_of_policy_samples_in_the_raw_schema(setup, tmp_path):
    summary = cf.main(_args(setup, tmp_path / "fb"))
    records = {r["id"]: r for r in et.read_jsonl(os.path.join(setup[0], "gold", "records.jsonl"))}
    for split, n_posts, name in (("train", 12, "train"), ("validation", 5, "valid1")):
        rows = et.read_jsonl(tmp_path / "fb" / f"comparisons_{split}.jsonl")
        assert len(rows) == summary[split]["n"] and len(rows) + summary[split]["identical_pairs_skipped"] == n_posts
        assert len({r["info"]["id"] for r in rows}) == len(rows)  # one pair per post
        for r in rows:
            assert r["info"]["id"] in records and r["split"] == name and r["choice"] in (0, 1)
            assert [s["policy"] for s in r["summaries"]] == ["sft_sample", "sft_sample"]
            a, b = (s["text"] for s in r["summaries"])
            assert a != b and a.startswith(" ") and b.startswith(" ")  # Detail 4: summaries start with a space
            assert "<|endoftext|>" not in a + b  # Detail 21: cut at the first EOS
    rates = summary["train"]["sample_fact_rates"]
    assert set(rates) == set(et.SALIENT) and all(abs(sum(v.values()) - 1) < 1e-9 for v in rates.values())
    assert json.load(open(tmp_path / "fb" / "feedback.json"))["rater_temperature"] > 0


def test_several_disjoint_pairs_per_post(setup, tmp_path):
    summary = cf.main(_args(setup, tmp_path / "fb", pairs_per_post=3))
    rows = et.read_jsonl(tmp_path / "fb" / "comparisons_train.jsonl")
    assert len(rows) + summary["train"]["identical_pairs_skipped"] == 3 * 12
    by_post = {}
    for r in rows:
        by_post.setdefault(r["info"]["id"], []).extend(s["text"] for s in r["summaries"])
    assert len(by_post) == 12 and max(len(v) for v in by_post.values()) == 6  # six samples, three pairs a post


def test_same_seed_same_comparisons(setup, tmp_path):
    cf.main(_args(setup, tmp_path / "a"))
    cf.main(_args(setup, tmp_path / "b"))
    cf.main(_args(setup, tmp_path / "c", seed=2))
    read = lambda d: open(tmp_path / d / "comparisons_train.jsonl").read()  # noqa: E731
    assert read("a") == read("b")
    assert read("a") != read("c")


def test_too_many_posts_is_a_clear_error(setup, tmp_path):
    with pytest.raises(ValueError, match="asked for 500 posts but the comparison split has only"):
        cf.main(_args(setup, tmp_path / "x", num_train_posts=500))
    with pytest.raises(ValueError, match="queries exceed --query_length 10 tokens"):
        cf.main(_args(setup, tmp_path / "y", query_length=10))


def test_dataset_builder_reads_the_feedback_comparisons(setup, tmp_path):
    from datasets import load_from_disk

    task = setup[0]
    cf.main(_args(setup, tmp_path / "fb"))
    out = tmp_path / "data"
    subprocess.run([sys.executable, "tldr_dataset.py", "--source", "embedded", "--task_dir", task, "--comparisons_dir",
                    str(tmp_path / "fb"), "--output_dir", str(out)], cwd=ROOT, check=True, capture_output=True)
    pref = load_from_disk(str(out / "preference"))
    n_train = len(et.read_jsonl(tmp_path / "fb" / "comparisons_train.jsonl"))
    assert len(pref["train"]) == n_train and set(pref["train"]["policies"]) == {"sft_sample vs sft_sample"}
