"""The data builder on hand-written rows in the raw published schemas (real path, GPT-2 BPE as Pythia's stand-in)."""

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
        info=dict(id="t3_c", post=post, title="Tiny post", subreddit="AskReddit"),
        summaries=[dict(text=texts[0], policy="sup2", note=None), dict(text=texts[1], policy="ref", note=None)],
        choice=choice, worker="w1", batch=batch, split="train", extra=dict(confidence=7),
    )
    row.update(kw)
    return row


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer_dir):
    return td.load_tokenizer(gpt2_tokenizer_dir)


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


def test_detail6_build_from_local_files(tok, gpt2_tokenizer_dir, tmp_path):
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
            f.write(json.dumps(cmp_row(choice=1, batch="batch_cnndm_1")) + "\n")
    args = td.Args(sft_dataset=str(sft_dir), preference_dataset=str(cmp_dir), base_model=gpt2_tokenizer_dir, output_dir=str(tmp_path / "out"))
    meta = td.build(args)
    assert meta["counts"]["sft/train"] == 2 and meta["dropped"]["sft/train"] == {"empty post": 1}
    assert meta["counts"]["preference/validation"] == 1 and meta["counts"]["preference/validation_cnndm"] == 1
    assert meta["pad_token_id"] == tok.pad_token_id
    sft = datasets.load_from_disk(str(tmp_path / "out" / "sft"))
    pref = datasets.load_from_disk(str(tmp_path / "out" / "preference"))
    assert set(sft) == {"train", "validation", "test"}
    assert set(pref) == {"train", "validation", "train_cnndm", "validation_cnndm"}
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
