"""collect_feedback.py: rater comparisons of the policy's own samples on the embedded task."""

import itertools
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


def test_all_pairs_compares_every_pair_of_the_same_samples(setup, tmp_path):
    """--all_pairs: the training posts' 6 samples give 15 comparisons (the 3 disjoint ones among them, the samples
    unchanged); validation keeps its disjoint pairs."""
    disjoint = cf.main(_args(setup, tmp_path / "d", pairs_per_post=3))
    every = cf.main(_args(setup, tmp_path / "a", pairs_per_post=3, all_pairs=True))
    rows = lambda d, split: et.read_jsonl(tmp_path / d / f"comparisons_{split}.jsonl")  # noqa: E731
    texts = lambda rs: {(r["info"]["id"], frozenset(s["text"] for s in r["summaries"])) for r in rs}  # noqa: E731
    assert len(rows("a", "train")) + every["train"]["identical_pairs_skipped"] == 15 * 12
    assert texts(rows("d", "train")) < texts(rows("a", "train"))  # the disjoint pairs are a strict subset
    samples = lambda rs: {(r["info"]["id"], s["text"]) for r in rs for s in r["summaries"]}  # noqa: E731
    assert samples(rows("d", "train")) <= samples(rows("a", "train"))  # the same samples, more pairs of them
    assert max(sum(1 for p, _ in samples(rows("a", "train")) if p == post) for post, _ in texts(rows("a", "train"))) <= 6
    assert texts(rows("a", "validation")) == texts(rows("d", "validation"))
    assert every["validation"]["n"] == disjoint["validation"]["n"]
    # the sample fact rates (each sample's outcome computed once, though it is in up to 5 pairs) are those of every
    # summary of every written pair against its own post
    records = {r["id"]: r for r in et.read_jsonl(os.path.join(setup[0], "gold", "records.jsonl"))}
    outcomes = [et.fact_outcomes(records[r["info"]["id"]], s["text"][1:]) for r in rows("a", "train") for s in r["summaries"]]
    expect = {k: {o: sum(x[k] == o for x in outcomes) / len(outcomes) for o in ("right", "wrong", "missing")} for k in et.SALIENT}
    got = every["train"]["sample_fact_rates"]
    assert set(got) == set(expect) and all(got[k] == pytest.approx(expect[k]) for k in expect)


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


def test_two_processes_cover_every_post_once_in_post_order(setup, tmp_path):
    """Under `accelerate launch --num_processes 2` (CPU, gloo) the ranks sample alternate batches of posts and the
    main process writes them all, in the posts' order, as one process would; rank 0 (seed + 0, Detail 10) samples
    its first batch exactly as the one-process run does."""
    one = cf.main(_args(setup, tmp_path / "one", pairs_per_post=2))
    task, policy, _ = setup
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29700 + os.getpid() % 200),
           os.path.join(ROOT, "collect_feedback.py"), "--task_dir", task, "--policy_path", policy, "--output_dir",
           str(tmp_path / "two"), "--num_train_posts", "12", "--num_validation_posts", "5", "--batch_size", "5",
           "--response_length", "12", "--num_threads", "1", "--pairs_per_post", "2"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    two = json.load(open(tmp_path / "two" / "feedback.json"))
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    for split, n_posts in (("train", 12), ("validation", 5)):
        raw = et.read_jsonl(os.path.join(task, "raw", f"comparisons_{split}.jsonl"))
        expected = [p["id"] for p in cf.unique_posts(raw, n_posts)]
        for d, summary in (("one", one), ("two", two)):
            ids = [r["info"]["id"] for r in et.read_jsonl(tmp_path / d / f"comparisons_{split}.jsonl")]
            assert len(ids) + summary[split]["identical_pairs_skipped"] == 2 * n_posts
            # the posts' order, each post's pairs together (identical pairs are skipped)
            assert list(dict.fromkeys(ids)) == [x for x in expected if x in set(ids)] and len(set(ids)) >= n_posts - 1
            assert [k for k, _ in itertools.groupby(ids)] == list(dict.fromkeys(ids))
    def texts(d):
        by_post = {}
        for r in et.read_jsonl(tmp_path / d / "comparisons_train.jsonl"):
            by_post.setdefault(r["info"]["id"], []).extend(s["text"] for s in r["summaries"])
        return by_post
    first = [p["id"] for p in cf.unique_posts(et.read_jsonl(os.path.join(task, "raw", "comparisons_train.jsonl")), 5)]
    a, b = texts("one"), texts("two")
    assert [a.get(x) for x in first] == [b.get(x) for x in first]  # batch 1: rank 0, the same stream
    assert a != b  # the later batches come from other streams (rank 1's own seed, rank 0's third batch)


def test_shared_prompt_prefill_samples_the_tokens_of_separate_prompts(setup):
    """sample_pairs runs each prompt once and repeats its KV cache into a preallocated (static) cache: the samples
    equal those of generate with its default dynamic cache on the prompt repeated k times (left padding of different
    lengths included), seed for seed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    task, policy, _ = setup
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    rows = et.read_jsonl(os.path.join(task, "raw", "comparisons_train.jsonl"))
    queries = [et.format_query(p["subreddit"], p["title"], p["post"]) for p in cf.unique_posts(rows, 4)]
    args = cf.Args(response_length=12, pairs_per_post=2, temperature=1.0)
    torch.manual_seed(3)
    pairs = cf.sample_pairs(model, tok, queries, args)
    ids = tok(queries, add_special_tokens=False)["input_ids"]
    assert len({len(x) for x in ids}) > 1  # the prompts are padded
    q = cf.left_pad(ids, tok.pad_token_id).repeat_interleave(4, dim=0)
    mask = q != tok.pad_token_id
    config = GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, do_sample=True,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(3)
    with torch.no_grad():
        out = model.generate(input_ids=q.masked_fill(~mask, 0), attention_mask=mask.long(), generation_config=config)
    texts = []
    for resp in out[:, q.shape[1]:].tolist():
        resp = resp[: resp.index(tok.eos_token_id)] if tok.eos_token_id in resp else resp
        texts.append(tok.decode([t for t in resp if t != tok.pad_token_id]).strip())
    assert [t for post in pairs for pair in post for t in pair] == texts
    assert len(set(texts)) > 4  # sampled, not one repeated string
