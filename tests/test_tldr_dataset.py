"""The data builder on hand-written rows in the raw published schemas (real path, Pythia's own tokenizer)."""

import json
import os

import pytest

import tldr_dataset as td

POST_LONG = (
    "My boyfriend (24M) and I (23F) have been together for three years. Last week he told me he wants to "
    "move to Berlin for a job — without asking me first.\n\n"
    + "I don't know what to think. Café conversations keep going in circles, and I'm exhausted. " * 30
    + "\nAnyway, here's the thing: I love him.\n"
    + "Should I go with him or stay? 🙂 " * 40
)
SFT_ROW = dict(id="t3_a", subreddit="relationships", title="Boyfriend wants to move abroad", post=POST_LONG,
               summary="bf wants to move to Berlin without asking me, should I follow him?")
SHORT_ROW = dict(id="t3_b", subreddit="AskReddit", title="Tiny post", post="Line one.\nLine two, with ünïcödé.",
                 summary="a tiny post")


def cmp_row(choice=0, batch="batch3", texts=(" bf moving to Berlin", " I like trains"), post=SHORT_ROW["post"], **kw):
    row = dict(
        info=dict(id="t3_c", post=post, title="Tiny post", subreddit="AskReddit", site=None, article=None),
        summaries=[dict(text=texts[0], policy="sup2", note=None), dict(text=texts[1], policy="ref", note=None)],
        choice=choice, worker="w1", batch=batch, split="train", extra=dict(confidence=7),
    )
    row.update(kw)
    return row


# A CNN/DM row of OpenAI's comparisons: post = subreddit = null, the text in `article` (Detail 6).
ARTICLE = "\n".join(
    f"Paragraph {i}: the storm reached the coast on Tuesday night, officials said, and thousands of residents in "
    f"county {i} lost power as winds of up to {60 + i} miles per hour brought down lines and trees. " * 4
    for i in range(30)
)


def cnndm_info(article=ARTICLE):
    return dict(id="cnn_1", post=None, title="Storm hits the coast", subreddit=None, site="cnn", article=article)


@pytest.fixture(scope="module")
def tok(pythia_tokenizer_dir):
    return td.load_tokenizer(pythia_tokenizer_dir)


def test_detail1_query_format():
    assert td.format_query("tifu", "T", "P\nQ") == "SUBREDDIT: r/tifu\n\nTITLE: T\n\nPOST: P\nQ\n\nTL;DR:"


def test_detail3_pad_token_added_and_distinct(tok):
    assert tok.pad_token == "[PAD]"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.eos_token == "<|endoftext|>"


def test_detail2_smart_truncation_cuts_at_newlines(tok):
    args = td.Args()
    row = td.process_sft_row(SFT_ROW, tok, args)
    q = row["query_token"]
    assert len(q) == 512
    real = [t for t in q if t != tok.pad_token_id]
    assert len(real) <= 512 and q[: 512 - len(real)] == [tok.pad_token_id] * (512 - len(real))
    # The post was cut back to a newline: the kept query is format(post up to some newline), byte for byte.
    text = row["query"]
    assert text.startswith("SUBREDDIT: r/relationships\n\nTITLE: Boyfriend wants to move abroad\n\nPOST: My boyfriend")
    assert text.endswith("\n\nTL;DR:")
    kept_post = text[len("SUBREDDIT: r/relationships\n\nTITLE: Boyfriend wants to move abroad\n\nPOST: "): -len("\n\nTL;DR:")]
    assert POST_LONG.startswith(kept_post) and POST_LONG[len(kept_post)] == "\n"
    # ...and it is the longest such cut: the next newline's prefix would not fit.
    nxt = POST_LONG.find("\n", len(kept_post) + 1)
    longer = td.format_query("relationships", SFT_ROW["title"], POST_LONG[:nxt])
    assert len(tok.encode(longer, add_special_tokens=False)) > 512
    assert tok.decode(real) == text


def test_detail2_truncation_without_newline_drops_characters(tok):
    post = "word " * 600
    tokens, cut = td.truncated_query_tokens(tok, "s", "t", post, 64)
    assert cut and len(tokens) <= 64
    text = tok.decode(tokens)
    kept = text[len("SUBREDDIT: r/s\n\nTITLE: t\n\nPOST: "): -len("\n\nTL;DR:")]
    assert post.startswith(kept)
    one_more = td.format_query("s", "t", post[: len(kept) + 1])
    assert len(tok.encode(one_more, add_special_tokens=False)) > 64


def test_detail2_title_never_cut(tok):
    with pytest.raises(td.Dropped, match="even with an empty post"):
        td.build_query(tok, dict(subreddit="s", title="very long title " * 200, post="x"), td.Args())


def test_detail4_detail5_sft_response(tok):
    row = td.process_sft_row(SHORT_ROW, tok, td.Args())
    assert row["reference_response"] == " a tiny post<|endoftext|>"
    ref = tok.encode(" a tiny post", add_special_tokens=False) + [tok.eos_token_id]
    assert row["reference_response_token"][: len(ref)] == ref
    assert row["reference_response_token_len"] == len(ref)
    assert len(row["reference_response_token"]) == 53
    assert set(row["reference_response_token"][len(ref):]) == {tok.pad_token_id}
    q = tok.encode(td.format_query("AskReddit", "Tiny post", SHORT_ROW["post"]), add_special_tokens=False)
    joint = row["query_reference_response_token"]
    assert len(joint) == 562 and joint[: len(q) + len(ref)] == q + ref
    assert row["query_reference_response_token_len"] == len(q) + len(ref)
    assert row["query"] == "SUBREDDIT: r/AskReddit\n\nTITLE: Tiny post\n\nPOST: Line one.\nLine two, with ünïcödé.\n\nTL;DR:"
    assert row["query_reference_response"] == row["query"] + " a tiny post<|endoftext|>"


def test_detail4_detail5_preference_row(tok):
    row = td.process_preference_row(cmp_row(choice=1), tok, td.Args())
    assert row["chosen"] == " I like trains<|endoftext|>" and row["rejected"] == " bf moving to Berlin<|endoftext|>"
    assert row["chosen_policy"] == "ref" and row["rejected_policy"] == "sup2" and row["policies"] == "ref vs sup2"
    assert len(row["chosen_token"]) == 169 and len(row["query_chosen_token"]) == 638
    c = tok.encode(" I like trains<|endoftext|>", add_special_tokens=False)
    assert c[-1] == tok.eos_token_id and row["chosen_token"][: len(c)] == c and row["chosen_token_len"] == len(c)
    assert row["confidence"] == 7 and row["choice"] == 1


def test_detail5_too_long_response_dropped(tok):
    long = dict(SHORT_ROW, summary="word " * 80)
    with pytest.raises(td.Dropped, match="longer than 53"):
        td.process_sft_row(long, tok, td.Args())


@pytest.mark.parametrize(
    "row,reason",
    [
        (dict(SHORT_ROW, post=None), "missing field 'post'"),
        ({k: v for k, v in SHORT_ROW.items() if k != "title"}, "missing field 'title'"),
        (dict(SHORT_ROW, post="   "), "empty post"),
        (dict(SHORT_ROW, summary=""), "empty summary"),
    ],
)
def test_bad_sft_rows_are_reported(tok, row, reason):
    out, dropped = td.process_split([SHORT_ROW, row], td.process_sft_row, tok, td.Args(), "x")
    assert len(out) == 1 and dropped == {reason: 1}


def test_bad_preference_rows_are_reported(tok):
    rows = [cmp_row(), cmp_row(choice=2), cmp_row(texts=(" same", " same")), cmp_row(texts=(" a", " b " * 200))]
    out, dropped = td.process_split(rows, td.process_preference_row, tok, td.Args(), "x")
    assert len(out) == 1
    assert dropped == {"choice not 0/1": 1, "identical summaries": 1, "rejected response longer than 169 tokens": 1}


def test_empty_split_is_an_error(tok):
    with pytest.raises(ValueError, match="split 'sft/test'"):
        td.process_split([], td.process_sft_row, tok, td.Args(), "sft/test")


def test_detail6_build_from_local_files(tok, pythia_tokenizer_dir, tmp_path):
    import datasets

    sft_dir, cmp_dir = tmp_path / "sft_raw", tmp_path / "cmp_raw"
    sft_dir.mkdir(), cmp_dir.mkdir()
    for split in ("train", "validation", "test"):
        with open(sft_dir / f"{split}.jsonl", "w") as f:
            for row in (SFT_ROW, SHORT_ROW, dict(SHORT_ROW, post="")):
                f.write(json.dumps(row) + "\n")
    for split in ("train", "validation"):
        with open(cmp_dir / f"{split}.jsonl", "w") as f:
            f.write(json.dumps(cmp_row()) + "\n")
            f.write(json.dumps(cmp_row(choice=1, batch="cnndm2", info=cnndm_info("A short article.\nTwo lines."))) + "\n")
    args = td.Args(sft_dataset=str(sft_dir), preference_dataset=str(cmp_dir), base_model=pythia_tokenizer_dir, output_dir=str(tmp_path / "out"))
    meta = td.build(args)
    assert meta["counts"]["sft/train"] == 2 and meta["dropped"]["sft/train"] == {"empty post": 1}
    assert meta["counts"]["preference/validation"] == 1 and meta["counts"]["preference/validation_cnndm"] == 1
    # Detail 6: only validation has a CNN/DM split; a CNN/DM row elsewhere is dropped and counted, by name.
    assert meta["counts"]["preference/train"] == 1
    assert meta["dropped"]["preference/train"] == {"CNN/DM row (article, null post) outside the CNN/DM validation batches "
                                                   "['batch0_cnndm', 'cnndm0', 'cnndm2']": 1}
    assert meta["pad_token_id"] == tok.pad_token_id
    sft = datasets.load_from_disk(str(tmp_path / "out" / "sft"))
    pref = datasets.load_from_disk(str(tmp_path / "out" / "preference"))
    assert set(sft) == {"train", "validation", "test"}
    assert set(pref) == {"train", "validation", "validation_cnndm"}
    assert pref["validation_cnndm"][0]["query"] == "Article:\nA short article.\nTwo lines.\n\nTL;DR:\n"
    assert sft["train"][1]["summary"] == SHORT_ROW["summary"]
    assert json.load(open(os.path.join(args.output_dir, "meta.json")))["query_length"] == 512


def test_cli_help_names_task_dir_and_comparisons_dir():
    """Each embedded option carries its own help (a misplaced docstring would give one field the other's text)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "tldr_dataset.py", "--help"], cwd=root, capture_output=True, text=True,
                         check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    task_help = out[out.index("--task-dir"): out.index("--comparisons-dir")]
    assert "embedded task folder" in task_help
    comparisons_help = out[out.index("--comparisons-dir"): out.index("--base-model")]
    assert "collect_feedback.py" in comparisons_help and "embedded task folder" not in comparisons_help


# ------------------------------------------------------------------------------------------------ Pythia's tokenizer
def test_detail3_pythia_pad_is_added_as_id_50277_in_every_stage(pythia_tokenizer_dir, tmp_path):
    """Pythia's tokenizer reports a pad of its own (<|padding|>, id 1) under transformers 5; every stage adds [PAD]
    anyway, as released (id 50277), and adding it to a tokenizer saved with it changes nothing."""
    from transformers import AutoTokenizer

    import dpo
    import ppo
    import reward
    import sft

    fresh = AutoTokenizer.from_pretrained(pythia_tokenizer_dir)
    assert fresh.eos_token_id == 0 and len(fresh) == 50277
    for load in (td.load_tokenizer, sft.load_tokenizer, reward.load_tokenizer, ppo.load_tokenizer, dpo.load_tokenizer):
        t = load(pythia_tokenizer_dir)
        assert (t.pad_token, t.pad_token_id, t.eos_token_id, len(t)) == ("[PAD]", 50277, 0, 50278), load.__module__
    td.load_tokenizer(pythia_tokenizer_dir).save_pretrained(tmp_path)
    for load in (td.load_tokenizer, sft.load_tokenizer, reward.load_tokenizer, ppo.load_tokenizer, dpo.load_tokenizer):
        t = load(str(tmp_path))
        assert (t.pad_token_id, len(t)) == (50277, 50278), load.__module__


def test_detail3_embedded_tokenizer_pad_is_idempotent(tmp_path):
    """The embedded task's BPE has no pad: [PAD] is added once, at the next id, and loading the saved copy keeps it."""
    import embedded_task as et

    et.train_tokenizer(["a tiny corpus of words, words and more words"] * 20, 300, str(tmp_path / "raw"))
    first = td.load_tokenizer(str(tmp_path / "raw"))
    n = len(first)
    first.save_pretrained(str(tmp_path / "saved"))
    again = td.load_tokenizer(str(tmp_path / "saved"))
    assert first.pad_token == again.pad_token == "[PAD]"
    assert first.pad_token_id == again.pad_token_id == n - 1 and len(again) == n


def test_detail1_detail4_detail5_real_tokens_and_limits(tok):
    """With Pythia's tokens: EOS in the response text is the single id 0, pads are 50277, and a reference of exactly
    53 tokens is kept while one of 54 is dropped (Detail 5)."""
    row = td.process_sft_row(SHORT_ROW, tok, td.Args())
    q = tok.encode("SUBREDDIT: r/AskReddit\n\nTITLE: Tiny post\n\nPOST: Line one.\nLine two, with ünïcödé.\n\nTL;DR:",
                   add_special_tokens=False)
    assert row["query_token"] == [50277] * (512 - len(q)) + q
    ref = row["reference_response_token"][: row["reference_response_token_len"]]
    assert ref == tok.encode(" a tiny post", add_special_tokens=False) + [0]
    assert row["reference_response_token"][len(ref):] == [50277] * (53 - len(ref))
    assert row["query_reference_response_token"] == q + ref + [50277] * (562 - len(q) - len(ref))
    n = next(k for k in range(1, 80) if len(tok.encode(" " + "word " * k + "<|endoftext|>", add_special_tokens=False)) == 53)
    kept = td.process_sft_row(dict(SHORT_ROW, summary="word " * n), tok, td.Args())
    assert kept["reference_response_token_len"] == 53 and 50277 not in kept["reference_response_token"]
    with pytest.raises(td.Dropped, match="reference response longer than 53 tokens"):
        td.process_sft_row(dict(SHORT_ROW, summary="word " * (n + 1)), tok, td.Args())


# ------------------------------------------------------------------------------------------------ CNN/DM (Detail 6)
def test_detail6_cnndm_query_format_truncation_and_limits(tok):
    """A CNN/DM row: query `Article:\\n{article}\\n\\nTL;DR:\\n`, the article cut back to a newline until the query
    fits 1,919 tokens, left-padded to 1,919; responses right-padded to 155, query + response to 2,021."""
    assert len(tok.encode(td.format_cnndm_query(ARTICLE), add_special_tokens=False)) > 1919
    row = cmp_row(batch="cnndm0", info=cnndm_info(), texts=(" Storm cuts power to thousands.", " A storm."))
    out = td.process_preference_row(row, tok, td.Args(), cnndm=True)
    pad = tok.pad_token_id
    text = out["query"]
    assert text.startswith("Article:\nParagraph 0: the storm") and text.endswith("\n\nTL;DR:\n")
    kept = text[len("Article:\n"): -len("\n\nTL;DR:\n")]
    assert ARTICLE.startswith(kept) and ARTICLE[len(kept)] == "\n"
    longer = td.format_cnndm_query(ARTICLE[: ARTICLE.find("\n", len(kept) + 1)])
    assert len(tok.encode(longer, add_special_tokens=False)) > 1919  # the longest cut that fits
    q = tok.encode(td.format_cnndm_query(kept), add_special_tokens=False)
    assert out["query_token"] == [pad] * (1919 - len(q)) + q
    c = tok.encode(" Storm cuts power to thousands.<|endoftext|>", add_special_tokens=False)
    assert c[-1] == 0 and out["chosen"] == " Storm cuts power to thousands.<|endoftext|>"
    assert out["chosen_token"] == c + [pad] * (155 - len(c)) and out["chosen_token_len"] == len(c)
    assert out["query_chosen_token"] == q + c + [pad] * (2021 - len(q) - len(c))
    assert out["query_chosen_token_len"] == len(q) + len(c)
    assert (out["post"], out["subreddit"], out["site"], out["article"]) == ("", "", "cnn", ARTICLE)
    # a response that fits TL;DR's 169 tokens but not CNN/DM's 155 is dropped
    long = " " + "storm " * 160
    assert 155 < len(tok.encode(long + "<|endoftext|>", add_special_tokens=False)) <= 169
    with pytest.raises(td.Dropped, match="chosen response longer than 155 tokens"):
        td.process_preference_row(cmp_row(batch="cnndm0", info=cnndm_info(), texts=(long, " a")), tok, td.Args(), cnndm=True)
    with pytest.raises(td.Dropped, match="missing field 'info.article'"):
        td.process_preference_row(cmp_row(batch="cnndm0", info=dict(cnndm_info(), article=None)), tok, td.Args(), cnndm=True)


def test_detail6_split_cnndm_by_batch_name():
    rows = [cmp_row(batch=b) for b in ("batch5", "batch0_cnndm", "cnndm0", "cnndm2", "cnndm_other", None)]
    out = td.split_cnndm({"train": rows[:2], "validation": rows})
    assert list(out) == ["train", "validation", "validation_cnndm"]
    assert [r["batch"] for r in out["validation_cnndm"]] == ["batch0_cnndm", "cnndm0", "cnndm2"]
    assert [r["batch"] for r in out["validation"]] == ["batch5", "cnndm_other", None]
    assert out["train"] == rows[:2]


# ------------------------------------------------------------------------------------------------ local files, nulls
def test_detail6_local_jsonl_keeps_null_then_string(tmp_path):
    """A nullable field null in every row of the first 10 MB and a string later (as in OpenAI's files): datasets' json
    builder types the column null from the first block and fails ("Couldn't cast array of type string to null")."""
    d = tmp_path / "cmp"
    d.mkdir()
    post = "a long post line\n" * 2600  # ~44 kB per row, 260 rows: the TL;DR rows fill more than 10 MB
    with open(d / "validation.jsonl", "w") as f:
        for i in range(260):
            f.write(json.dumps(cmp_row(info=dict(id=f"t{i}", post=post, title="t", subreddit="s", site=None, article=None))) + "\n")
        f.write(json.dumps(cmp_row(batch="cnndm0", info=cnndm_info("news text"))) + "\n")
    assert os.path.getsize(d / "validation.jsonl") > 11 << 20
    rows = td.load_rows(str(d))["validation"]
    assert len(rows) == 261
    assert rows[0]["info"]["article"] is None and rows[0]["info"]["site"] is None and rows[0]["info"]["post"] == post
    assert rows[-1]["info"] == cnndm_info("news text")


def test_local_jsonl_bad_line_names_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(cmp_row()) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"train\.jsonl, line 3: not valid JSON"):
        td.load_rows(str(tmp_path))
    (tmp_path / "train.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"train\.jsonl, line 1: expected a JSON object, got list"):
        td.load_rows(str(tmp_path))


def test_a_post_and_a_summary_are_tokenized_once_across_comparisons(tok):
    """Speed: the rows of one post (15 comparisons a post in the embedded rater round) share its cut query and each
    summary's tokens; the rows are those of a fresh tokenization, and a changed post is tokenized anew."""
    class Counting:  # the tokenizer, counting encode calls
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def encode(self, *a, **kw):
            self.calls += 1
            return self.inner.encode(*a, **kw)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    counting = Counting(tok)
    rows = [cmp_row(texts=t) for t in [(" bf moving", " trains"), (" trains", " a third one"), (" bf moving", " a third one")]]
    built = [td.process_preference_row(r, counting, td.Args()) for r in rows]
    assert counting.calls == 1 + 3  # one query, three distinct summaries
    assert built == [td.process_preference_row(r, tok, td.Args()) for r in rows]
    td.process_preference_row(cmp_row(texts=(" bf moving", " trains"), post=SHORT_ROW["post"] + " More."), counting, td.Args())
    assert counting.calls == 1 + 3 + 1  # a new post: its query only; its summaries were seen
    assert built[0]["query_token"] is not built[1]["query_token"]  # each row its own lists
