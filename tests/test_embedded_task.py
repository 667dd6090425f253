"""The embedded offline task: generator, gold judge, comparisons, tokenizer and tiny base models."""

import json
import os
import re

import pytest

import embedded_task as et

SMALL = dict(n_sft_train=300, n_sft_val=60, n_sft_test=20, n_cmp_train=400, n_cmp_val=60, n_pretrain_posts=300)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A small task with the tokenizer and a very short-pretrained base-s model."""
    out = str(tmp_path_factory.mktemp("task"))
    args = et.Args(out_dir=out, seed=3, sizes="s", vocab_size=1000, pretrain_steps=3, pretrain_batch_size=4,
                   pretrain_block=64, num_threads=1, **SMALL)
    et.build(args, log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def data():
    return et.generate_data(et.GenConfig(seed=5, n_sft_train=400, n_sft_val=100, n_sft_test=10, n_cmp_train=3000,
                                         n_cmp_val=100, n_pretrain_posts=10))


@pytest.fixture(scope="module")
def judge(data):
    return et.GoldJudge(data["records"])


def _query(r):
    return et.format_query(r["subreddit"], r["title"], r["post"])


def test_determinism_same_seed_same_rows():
    cfg = et.GenConfig(seed=11, n_sft_train=50, n_sft_val=5, n_sft_test=5, n_cmp_train=40, n_cmp_val=10, n_pretrain_posts=5)
    a, b = et.generate_data(cfg), et.generate_data(cfg)
    for k in ("sft_train", "sft_validation", "sft_test", "comparisons_train", "comparisons_validation", "pretrain_texts", "records"):
        assert a[k] == b[k], k
    c = et.generate_data(et.GenConfig(**{**cfg.__dict__, "seed": 12}))
    assert a["sft_train"] != c["sft_train"]


def test_determinism_files_and_idempotent_build(task_dir, tmp_path):
    """Same seed -> identical files; a re-run with the same config rebuilds nothing."""
    args = et.Args(out_dir=str(tmp_path), seed=3, sizes="", vocab_size=1000, **SMALL)
    et.build(args, log=lambda *a: None)
    for f in ("raw/sft_train.jsonl", "raw/comparisons_train.jsonl", "gold/records.jsonl", "tokenizer/tokenizer.json"):
        assert open(os.path.join(task_dir, f), "rb").read() == open(os.path.join(tmp_path, f), "rb").read(), f
    logs = []
    et.build(args, log=logs.append)
    assert logs == ["data: up to date", "tokenizer: up to date"]


def test_raw_schemas(task_dir):
    """Rows are in the real SFT schema and OpenAI's comparison schema (Detail 6); summaries start with a space (Detail 4)."""
    sft = et.read_jsonl(os.path.join(task_dir, "raw/sft_train.jsonl"))
    assert len(sft) == SMALL["n_sft_train"]
    assert set(sft[0]) == {"id", "subreddit", "title", "post", "summary"}
    assert not sft[0]["summary"].startswith(" ")
    assert any("\n" in r["post"] for r in sft)
    cmp_rows = et.read_jsonl(os.path.join(task_dir, "raw/comparisons_train.jsonl"))
    assert len(cmp_rows) == SMALL["n_cmp_train"]
    for r in cmp_rows:
        assert set(r) == {"info", "summaries", "choice", "worker", "batch", "split", "extra"}
        assert set(r["info"]) == {"id", "post", "title", "subreddit"}
        assert r["choice"] in (0, 1)
        assert 1 <= r["extra"]["confidence"] <= 9 and isinstance(r["extra"]["confidence"], int)
        assert len(r["summaries"]) == 2 and all(s["text"].startswith(" ") for s in r["summaries"])
        assert all(set(s) == {"text", "policy", "note"} for s in r["summaries"])
    task = json.load(open(os.path.join(task_dir, "task.json")))
    assert 0.6 < task["stats"]["comparisons_train"]["label_agreement"] < 0.9


def test_posts_mention_exactly_their_facts(data):
    """Lexicon hygiene: the judge reads from every post exactly the record's values (no stray facts)."""
    for r in data["records"]:
        f = et.extract_facts(r["title"] + "\n" + r["post"])
        for slot in ("other", "event", "feeling", "question"):
            assert set(f[slot]) == {r[slot]}, (slot, f[slot], r["post"])
        assert set(f["durations"]) == {r["duration"]}, r["post"]
        assert set(f["distractor"]) == set(r["distractors"])
        assert set(f["ages"]) <= {(r["narrator_age"], r["narrator_gender"]), (r["other_age"], r["other_gender"])}


def test_judge_prefers_reference_to_other_posts_reference(data, judge):
    rows = data["sft_validation"]
    wins = sum(judge.prefers(_query(r), r["summary"], rows[(i + 1) % len(rows)]["summary"]) == 0
               for i, r in enumerate(rows))
    assert wins / len(rows) > 0.97


def test_judge_penalises_invented_facts_and_repetition(data, judge):
    rec = data["records"][0]
    q = _query(rec)
    good = et.compose_summary(rec, et._rng(0, "t"), concise=True)
    wrong = et.compose_summary(et.wrong_record(rec, et._rng(1, "w")), et._rng(0, "t"), concise=True)
    assert judge.score(q, good) > judge.score(q, wrong) + 1.0
    # a summary that ends on a function word without punctuation ("... and move on") reads as cut off (-0.3), which an
    # appended detail would repair; compare details against the punctuated summary
    good = good if good.rstrip().endswith((".", "?", "!")) else good + "?"
    other_detail = next(k for k in et.DISTRACTORS if k not in rec["distractors"])
    assert judge.score(q, good + ". " + et.DISTRACTORS[other_detail]["summ"]) < judge.score(q, good) - 0.5
    own_detail = rec["distractors"][0]
    assert judge.score(q, good + ". " + et.DISTRACTORS[own_detail]["summ"]) < judge.score(q, good) - 0.5
    assert judge.score(q, (good + " ") * 4) < judge.score(q, good) - 3
    assert judge.score(q, good + " qzxv blorf") < judge.score(q, good)
    assert judge.score(q, good) > 0.9 * sum(getattr(et.JudgeWeights(), k) for k in et.SALIENT) - 0.5


def test_judge_not_fooled_by_degenerate_text(data, judge):
    rec = data["records"][1]
    q = _query(rec)
    good = et.compose_summary(rec, et._rng(0, "t"), concise=True)
    every_value = " ".join(list(et.OTHERS) + [v["summ"][0] for v in et.EVENTS.values()] + list(et.FEELINGS)
                           + ["1 year, 2 years, 3 years, 6 months"] + [v["summ"][0] for v in et.QUESTIONS.values()])
    assert judge.score(q, every_value) < 0
    assert judge.score(q, rec["post"]) < judge.score(q, good) - 3
    # copying the whole post loses to the post's own human reference (the posts are 45-90 words, so a copy
    # is over-long but not always below 0)
    rows = data["sft_train"]
    assert sum(judge.score(r["post"], r["post"]) < judge.score(r["post"], r["summary"]) for r in rows) / len(rows) > 0.98
    assert judge.score(q, rec["title"] + " " + rec["post"][:400]) < judge.score(q, good) - 3
    assert judge.score(q, "") < judge.score(q, good)
    assert judge.score(q, "bf bf bf bf bf bf birthday birthday birthday") < 2
    rec_words = et.compose_summary(rec, et._rng(0, "t"), concise=True)
    salad = " ".join(w for w in et._TOKEN_RE.findall(rec_words.lower()) if w not in et.GLUE_WORDS)
    assert judge.score(q, salad) < judge.score(q, good) - 2  # keyword salad is not a summary


def test_judge_api(data, judge):
    rec = data["records"][2]
    q = _query(rec)
    good = et.compose_summary(rec, et._rng(0, "t"), concise=True)
    assert judge.score(q, " " + good + "<|endoftext|> garbage garbage garbage") == judge.score(rec["post"], good)
    assert judge.score(q, good + "<|endoftext|>[PAD][PAD]") == judge.score(q, good)
    assert judge.compare(q, good, good) == 0.5 and judge.prefers(q, good, good) == 1
    assert judge.compare(q, good, "nothing") == 1.0 and judge.prefers(q, good, "nothing") == 0
    assert judge.win_rate([q, q], [good, "nothing"], ["nothing", good]) == 0.5
    # a smart-truncated post (Detail 2 cuts the post back to a newline) still finds its record
    cut = rec["post"][: rec["post"].rfind("\n")] if "\n" in rec["post"] else rec["post"][:-5]
    assert judge.record(et.format_query(rec["subreddit"], rec["title"], cut))["id"] == rec["id"]
    assert judge.record(et.format_query(rec["subreddit"], rec["title"], rec["post"][:20] + "\n"))["id"] == rec["id"]
    assert judge.record("[PAD][PAD]" + _query(rec))["id"] == rec["id"]
    with pytest.raises(KeyError, match="unknown post"):
        judge.score("SUBREDDIT: r/x\n\nTITLE: y\n\nPOST: nothing like this\n\nTL;DR:", "x")


def test_fact_outcomes_and_rates(data, judge):
    """Per-fact diagnosis: every fact right in a complete summary, a contradicted one wrong, a dropped one missing."""
    rec = data["records"][3]
    q = _query(rec)
    good = et.compose_summary(rec, et._rng(0, "t"), concise=True)
    assert et.fact_outcomes(rec, good) == {k: "right" for k in et.SALIENT}
    bad_rec = et.wrong_record(rec, et._rng(5, "w"))
    changed = [k for k in ("other", "duration", "event", "feeling", "question") if bad_rec[k] != rec[k]]
    changed += ["narrator"] if bad_rec["narrator_age"] != rec["narrator_age"] else []
    assert len(changed) == 1
    out = et.fact_outcomes(rec, et.compose_summary(bad_rec, et._rng(0, "t"), concise=True))
    assert out[changed[0]] == "wrong" and sum(v == "right" for v in out.values()) == 5
    dropped = et.fact_outcomes(rec, et.compose_summary(rec, et._rng(0, "t"), drop=["feeling", "question"]))
    assert dropped["feeling"] == dropped["question"] == "missing" and dropped["event"] == "right"
    rates = judge.fact_rates([q, q], [good, "nothing"])
    assert rates["event"] == {"right": 0.5, "wrong": 0.0, "missing": 0.5}
    with pytest.raises(ValueError, match="same length"):
        judge.fact_rates([q], [])


def test_judge_is_fast(data, judge):
    import time
    rows = data["sft_train"][:300]
    t = time.time()
    for r in rows * 3:
        judge.score(_query(r), r["summary"])
    assert 900 / (time.time() - t) > 1000  # calls per second


def test_label_agreement_band_and_hard_pairs(data):
    """Labels agree with the noiseless judge 65-85% of the time; some pairs are hard (close scores)."""
    recs = {r["id"]: r for r in data["records"]}
    agree = n = hard = 0
    for row in data["comparisons_train"]:
        rec = recs[row["info"]["id"]]
        a, b = (et.score_against_record(rec, s["text"]) for s in row["summaries"])
        if abs(a - b) > 1e-9:
            n += 1
            agree += (row["choice"] == 0) == (a > b)
        hard += abs(a - b) < 0.5
        assert row["choice"] in (0, 1) and 1 <= row["extra"]["confidence"] <= 9
    assert n > 2500
    assert 0.65 <= agree / n <= 0.85
    assert hard / len(data["comparisons_train"]) > 0.15
    policies = {s["policy"] for row in data["comparisons_train"] for s in row["summaries"]}
    assert {"ref", "ref_missing_fact", "ref_wrong_fact", "ref_padded_irrelevant", "ref_truncated", "ref_repetitive",
            "other_post_ref", "concise_all_facts"} <= policies


def test_references_imperfect_and_beatable(data):
    cfg = et.GenConfig(seed=5)
    st = et.summary_stats(data, cfg)
    rates = st["reference_fact_rates"]
    # humans lose on coverage and focus: the question and the feeling are often left out, one more fact now and
    # then, an irrelevant detail in some; a stated fact is never wrong
    assert all(rates[k]["wrong"] == 0 for k in et.SALIENT)
    assert abs(rates["question"]["right"] - cfg.p_ref_question) < 0.08
    assert abs(rates["feeling"]["right"] - cfg.p_ref_feeling) < 0.08
    missed = sum(rates[k]["missing"] for k in ("narrator", "duration", "other", "event"))
    assert abs(missed - cfg.p_ref_miss) < 0.08
    assert abs(st["reference_irrelevant_rate"] - cfg.p_ref_irrelevant) < 0.08
    assert st["win_rate_concise_all_facts_vs_reference"] > 0.5
    assert st["policy_mean_score"]["ref"] > st["policy_mean_score"]["ref_missing_fact"] > st["policy_mean_score"]["other_post_ref"]


def test_detail1_queries_fit_256_tokens(task_dir):
    """Detail 1 queries of the embedded task fit the query length 256 (>= 99%), so Detail 2 rarely cuts."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(task_dir, "tokenizer"))
    rows = et.read_jsonl(os.path.join(task_dir, "raw/sft_train.jsonl"))
    lens = [len(x) for x in tok([_query(r) for r in rows], add_special_tokens=False)["input_ids"]]
    assert sum(n <= 256 for n in lens) / len(lens) >= 0.99
    summ = [len(x) for x in tok([" " + r["summary"] for r in rows], add_special_tokens=False)["input_ids"]]
    assert sum(n + 1 <= 53 for n in summ) / len(summ) >= 0.99  # Detail 5: responses fit 53 tokens with EOS


def test_detail3_tokenizer_eos_id0_no_pad(task_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(task_dir, "tokenizer"))
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.pad_token is None
    text = "SUBREDDIT: r/relationships\n\nTITLE: Ünïcödé?\n\nPOST: a\nb  c\n\nTL;DR: x"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok("hi", add_special_tokens=False)["input_ids"][-1] != 0  # no EOS appended automatically


def test_detail3_detail7_base_model_reload_identical_logits(task_dir):
    """The base model has spare embedding rows for [PAD] (Detail 3), dropout 0 (Detail 7) and reloads exactly."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXForCausalLM
    d = os.path.join(task_dir, "base-s")
    model = GPTNeoXForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    assert model.config.vocab_size > len(tok)  # [PAD] fits without a resize
    assert model.config.hidden_dropout == 0 and model.config.attention_dropout == 0
    assert model.config.use_parallel_residual
    tok.add_special_tokens({"pad_token": "[PAD]"})
    assert tok.pad_token_id < model.config.vocab_size and tok.pad_token_id != tok.eos_token_id
    x = torch.tensor([tok("SUBREDDIT: r/Advice\n\nTITLE: hi", add_special_tokens=False)["input_ids"]])
    model.train()
    a, b = model(x).logits, model(x).logits
    assert torch.equal(a, b)
    import tempfile
    with tempfile.TemporaryDirectory() as t:
        model.save_pretrained(t)
        again = GPTNeoXForCausalLM.from_pretrained(t)
        assert torch.equal(again(x).logits, a)
    info = json.load(open(os.path.join(d, "pretrain.json")))
    assert info["n_params"] == sum(p.numel() for p in model.parameters())


def test_pretraining_reduces_loss_and_is_deterministic(tmp_path):
    from transformers import AutoTokenizer
    texts = [et.format_pretrain_text(r["subreddit"], r["title"], r["post"])
             for r in (et.make_post(2, "pre", i, set()) for i in range(120))]
    tok = et.train_tokenizer(texts, 600, str(tmp_path / "tok"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    kw = dict(seed=1, steps=30, batch_size=4, block=64, log=lambda *x: None, num_threads=1)
    a = et.pretrain("s", tok, texts, str(tmp_path / "a"), **kw)
    b = et.pretrain("s", tok, texts, str(tmp_path / "b"), **kw)
    assert a["val_loss"] < a["val_loss_init"] - 0.5
    assert a["val_loss"] == b["val_loss"] and a["final_train_loss"] == b["final_train_loss"]


def test_near_miss_pairs_differ_in_that_detail_only(data):
    """The RM diagnostic's minimal pairs: the right side states every fact right, the wrong side differs in exactly
    the one hard detail (a plausible near miss), and the gold judge prefers the right side."""
    for i, rec in enumerate(data["records"][:150]):
        detail = et.HARD_DETAILS[i % 3]
        right, wrong = et.near_miss_pair(rec, detail, et._rng(3, "pair", i))
        o_right, o_wrong = et.fact_outcomes(rec, right), et.fact_outcomes(rec, wrong)
        assert all(v == "right" for v in o_right.values()), right
        slot = {"narrator_age": "narrator", "duration": "duration", "feeling": "feeling"}[detail]
        assert [k for k in et.SALIENT if o_right[k] != o_wrong[k]] == [slot] and o_wrong[slot] == "wrong", (right, wrong)
        if detail == "narrator_age":  # the same words but the number
            assert [w for w in right.split() if not w[:2].isdigit()] == [w for w in wrong.split() if not w[:2].isdigit()]
        assert et.score_against_record(rec, right) > et.score_against_record(rec, wrong) + 2.0


def test_near_misses_are_plausible_values(data):
    for i, rec in enumerate(data["records"][:100]):
        rng = et._rng(4, "near", i)
        age = et.near_miss(rec, "narrator_age", rng)
        assert 18 <= age <= 39 and 0 < abs(age - rec["narrator_age"]) <= 6 and age != rec["other_age"]
        assert et.near_miss(rec, "duration", rng) in set(et.DURATIONS_MONTHS) - {rec["duration"]}
        assert et.near_miss(rec, "feeling", rng) in set(et.FEELINGS) - {rec["feeling"]}
    with pytest.raises(ValueError, match="unknown detail 'event'"):
        et.near_miss(data["records"][0], "event", et._rng(0))


def test_sample_metrics_is_the_stages_gold_seam(judge, data):
    """GoldJudge.sample_metrics, the one call a stage makes with --gold_task_dir: the win rate and mean score of the
    samples, and each sample's score and its reference's score, as the judge's own win_rate / score give them."""
    recs = data["sft_validation"][:6]
    queries = [_query(r) for r in recs]
    references = [r["summary"] for r in recs]
    responses = [r["summary"] if i % 2 else "nothing at all" for i, r in enumerate(recs)]
    metrics, rows = judge.sample_metrics(queries, responses, references)
    assert list(metrics) == ["gold_win_rate", "gold_score"]
    assert metrics["gold_win_rate"] == judge.win_rate(queries, responses, references)
    assert [r["gold_score"] for r in rows] == [judge.score(q, s) for q, s in zip(queries, responses)]
    assert [r["gold_reference_score"] for r in rows] == [judge.score(q, s) for q, s in zip(queries, references)]
    assert metrics["gold_score"] == pytest.approx(sum(r["gold_score"] for r in rows) / 6)
    assert rows[0]["gold_score"] < rows[0]["gold_reference_score"]
    with pytest.raises(ValueError, match="same length"):
        judge.sample_metrics(queries, responses[:-1], references)


def test_references_copy_the_posts_words_for_hard_facts(data):
    """The narrator, the duration and the feeling are stated in the post's own words: facts a small model can copy."""
    recs = {r["id"]: r for r in data["records"]}
    n = {"duration": 0, "feeling": 0, "narrator": 0, "question": 0}
    for row in data["sft_train"]:
        rec, summ = recs[row["id"]], row["summary"].lower()
        post = rec["post"].lower()
        if rec["duration_form"].lower() in summ:
            n["duration"] += rec["duration_form"].lower() in post
        if re.search(r"\b" + re.escape(rec["feeling_form"]) + r"\b", summ):
            n["feeling"] += rec["feeling_form"] in post
        me = f"{rec['narrator_age']}{rec['narrator_gender']}".lower()
        n["narrator"] += me in summ and me in post
        n["question"] += et._question_phrase(rec["question_form"]).lower() in summ
    out = [et.fact_outcomes(recs[r["id"]], r["summary"]) for r in data["sft_train"]]
    for k, slot in (("duration", "duration"), ("feeling", "feeling"), ("narrator", "narrator"), ("question", "question")):
        stated = sum(o[slot] == "right" for o in out)
        assert stated > 0 and n[k] == stated, (k, n[k], stated)


def test_pretraining_edits_restate_the_posts_own_facts():
    """With p_pretrain_edit 0.5, half of the pretraining posts end with an "EDIT:" whose facts are the post's own (retrieval practice for the
    base model), in the post's words; the other half end with the post."""
    cfg = et.GenConfig(seed=4, n_sft_train=2, n_sft_val=1, n_sft_test=1, n_cmp_train=2, n_cmp_val=2, n_pretrain_posts=200,
                       p_pretrain_edit=0.5)
    texts = et.generate_data(cfg)["pretrain_texts"]
    edits = [t.rsplit("\n\n", 1)[1] for t in texts if "\n\n" in t and t.rsplit("\n\n", 1)[1].split(" ")[0] in
             ("EDIT:", "Edit:", "Update:")]
    assert 0.35 < len(edits) / len(texts) < 0.65
    for t in texts:
        post = t.split("\n\nPOST: ", 1)[1]
        body, _, last = post.rpartition("\n\n")
        if last in edits:
            found, in_post = et.extract_facts(last), et.extract_facts(body)
            for slot in ("other", "event", "feeling", "question"):
                assert set(found[slot]) <= set(in_post[slot]), (slot, last)
            assert set(found["durations"]) <= set(in_post["durations"]) and set(found["ages"]) <= set(in_post["ages"])
    assert all("TL;DR" not in t for t in texts)


def test_bf16_pretraining_runs_under_autocast(tmp_path, monkeypatch):
    """bf16=True pretrains under CPU bf16 autocast: the matrix products run in bf16 (a different, still falling loss
    from the fp32 run of the same seed), the weights stay fp32, and pretrain.json records the precision."""
    import torch
    from transformers import AutoTokenizer
    texts = [et.format_pretrain_text(r["subreddit"], r["title"], r["post"])
             for r in (et.make_post(2, "pre", i, set()) for i in range(120))]
    et.train_tokenizer(texts, 600, str(tmp_path / "tok"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    seen = []
    real_linear = torch.nn.functional.linear
    def linear(x, w, b=None):
        out = real_linear(x, w, b)
        seen.append(out.dtype)
        return out
    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    kw = dict(seed=1, steps=20, batch_size=4, block=64, log=lambda *x: None, num_threads=1)
    a = et.pretrain("s", tok, texts, str(tmp_path / "a"), bf16=True, **kw)
    assert torch.bfloat16 in seen
    seen.clear()
    b = et.pretrain("s", tok, texts, str(tmp_path / "b"), **kw)
    assert torch.bfloat16 not in seen
    assert a["bf16"] is True and b["bf16"] is False
    assert a["val_loss"] < a["val_loss_init"] - 0.5 and a["final_train_loss"] != b["final_train_loss"]
    from transformers import GPTNeoXForCausalLM
    assert GPTNeoXForCausalLM.from_pretrained(str(tmp_path / "a")).gpt_neox.embed_in.weight.dtype == torch.float32


def test_rater_round_scores_each_distinct_sample_once(data, monkeypatch):
    """label_comparisons scores a (post, summary) once however many pairs it is in (a 15-pair rater round repeats each
    sample 5 times), and its rows are those of labelling each pair on its own (the same rater draw per pair)."""
    by_id = {r["id"]: r for r in data["records"]}
    rows = data["sft_train"][:20]
    recs = [by_id[r["id"]] for r in rows]
    samples = [[r["summary"], r["summary"] + " and more", "nothing here"] for r in rows]
    triples = [(rec, s[i], s[j]) for rec, s in zip(recs, samples) for i, j in ((0, 1), (0, 2), (1, 2))]
    drafts = [dict(rec=rec, pa="sft_sample", pb="sft_sample", sa=a, sb=b, k=k) for k, (rec, a, b) in enumerate(triples)]
    alone = [et.label_comparisons([d], 7, "feedback_train", 0.5)[0][0] for d in drafts]
    calls = []
    real = et.score_against_record
    monkeypatch.setattr(et, "score_against_record", lambda rec, s, w=et.JudgeWeights(): calls.append(1) or real(rec, s, w))
    rows, stats = et.label_comparisons(drafts, 7, "feedback_train", 0.5)
    assert len(calls) == 3 * len(recs) < 2 * len(drafts)
    assert rows == alone and stats["n"] == len(drafts)


def test_base_model_seed_does_not_depend_on_the_other_sizes_built(tmp_path, monkeypatch):
    """Every size pretrains with the task seed's pretraining seed whatever --sizes lists, so a sweep that builds s,m,l
    in one task holds the same base-m as a quickstart that builds m alone (same seed, same threads)."""
    seeds = {}

    def fake_pretrain(size, tok, texts, mdir, seed, **kw):
        seeds.setdefault(size, []).append(seed)
        os.makedirs(mdir, exist_ok=True)
        return {"config": {}}

    monkeypatch.setattr(et, "pretrain", fake_pretrain)
    for i, sizes in enumerate(("m", "s,m,l")):
        et.build(et.Args(out_dir=str(tmp_path / f"t{i}"), seed=4, sizes=sizes, vocab_size=600, num_threads=1,
                         **SMALL), log=lambda *a: None)
    assert seeds == {"m": [4000, 4000], "s": [4000], "l": [4000]}


def test_model_sizes_grow_in_parameters_and_width():
    """s < m < l < xl in parameters (at the task's vocabulary) and hidden width: the sweep's sizes are a ladder, and m
    lies between s and l (0.42M / 0.78M / 1.43M / 4.04M with a 1,728-row embedding)."""
    from transformers import GPTNeoXForCausalLM

    names = list(et.MODEL_SIZES)
    assert names == ["s", "m", "l", "xl"]
    counts = [sum(p.numel() for p in GPTNeoXForCausalLM(et.make_config(n, 1728)).parameters()) for n in names]
    assert counts == sorted(counts) and len(set(counts)) == 4
    assert [round(c / 1e6, 2) for c in counts] == [0.42, 0.78, 1.43, 4.04]
    widths = [et.MODEL_SIZES[n]["hidden_size"] for n in names]
    assert widths == sorted(widths)
    for spec in et.MODEL_SIZES.values():  # every head has an integer width, as GPT-NeoX needs
        assert spec["hidden_size"] % spec["num_attention_heads"] == 0
    # heads 32 wide at every size: s with four heads of 16 copied ages and durations wrongly in a fifth to a third of
    # its summaries, and m with four heads of 24 gained no more from PPO than s (docs/embedded_task.md)
    assert {n: s["hidden_size"] // s["num_attention_heads"] for n, s in et.MODEL_SIZES.items()} == dict.fromkeys(names, 32)
