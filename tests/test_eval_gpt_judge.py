"""eval_gpt_judge.py against a REAL chat-completions HTTP server on 127.0.0.1 (tests/fake_openai_server.py):
retries (429 + Retry-After, 500, timeouts, dropped connections), unparsed verdicts, order un-swapping, a run
stopped by --max_requests and a run SIGKILLed half-way then resumed (nothing lost, nothing paid twice), the
gold backend, the statistics on hand-made data (Details 33, 34) and the Detail 13 sampling of --model_path."""

import csv
import json
import math
import os
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

import eval_gpt_judge as E
from fake_openai_server import FakeJudgeServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "GOODWORD"


@pytest.fixture
def server():
    srv = FakeJudgeServer(marker=MARK, retry_after=0.05, sleep_s=1.0).start()
    yield srv
    srv.unfreeze()
    srv.stop()


def write_samples(path, n, winners=None, suffix=None, lens=None, ref_len=20):
    """Items p0..p{n-1}; the candidate of every id in `winners` carries the judge's marker word, the
    reference of every other id carries it: the server's verdict is then fully determined."""
    winners = set(range(n)) if winners is None else set(winners)
    suffix = suffix or {}
    rows = []
    for i in range(n):
        rows.append(dict(
            id=f"p{i}",
            query=f"SUBREDDIT: r/test\n\nTITLE: title {i}\n\nPOST: a post about thing {i}, with details.\n\nTL;DR:",
            response=f"summary of thing {i}" + (f" {MARK}" if i in winners else "") + suffix.get(i, ""),
            reference=f"reference for thing {i}" + ("" if i in winners else f" {MARK}"),
            response_token_len=(lens[i] if lens else 10 + i),
            reference_token_len=ref_len,
        ))
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def args_for(srv, samples, out, **kw):
    base = dict(samples=samples, base_url=srv.base_url, output_dir=str(out), backoff_base=0.01, backoff_max=0.05,
                request_timeout=5.0, concurrency=4, max_retries=4, seed=3)
    base.update(kw)
    return E.Args(**base)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------
# Pure functions: verdict parsing, the prompt, CI, length bins
# ---------------------------------------------------------------------------------------------------------
def test_detail33_parse_verdict_strict():
    ok = {
        "Comparison: A is better.\nPreferred: A": "A",
        "Comparison: x\nPreferred: B\n": "B",
        "Comparison: x\n  preferred:   \"b\"  ": "B",
        "Comparison: x\nPREFERRED: 'A'": "A",
        "Comparison: x\nPreferred: \u201cA\u201d": "A",
        "Preferred: A\nPreferred: A": "A",
    }
    for text, v in ok.items():
        assert E.parse_verdict(text) == v, text
    bad = ["", None, "Comparison: A is better.", "Preferred: Summary A", "Preferred: A is better", "Preferred: C",
           "Preferred: A\nPreferred: B", "I prefer A", "Comparison: x Preferred: A", "Preferred: AB"]
    for text in bad:
        assert E.parse_verdict(text) is None, text


def test_detail33_prompt_and_order():
    msgs = E.build_messages("  SUBREDDIT: r/x\n\nTITLE: t\n\nPOST: the post\n\nTL;DR: \n", " first<|endoftext|>[PAD]", "second\n")
    assert msgs[0] == {"role": "system", "content": "You are a helpful assistant."}
    # Detail 33: the released template byte for byte (a raw string: it starts with a newline and keeps the backslash
    # and newline after "explaining which"); the post is the whole stored query stripped, TL;DR: included; the
    # summaries are stripped, without EOS and pads
    expect = (
        "\nWhich of the following summaries does a better job of summarizing the most important points in the given "
        "forum post, without including unimportant or irrelevant details? Judge based on accuracy, coverage, and "
        "coherence.\n\n### Post:\nSUBREDDIT: r/x\n\nTITLE: t\n\nPOST: the post\n\nTL;DR:\n\n### Summary A:\nfirst\n\n"
        "### Summary B:\nsecond\n\n### Instructions:\nFIRST provide a one-sentence comparison of the two summaries, "
        "explaining which \\\nyou prefer and why. SECOND, on a new line, state only \"A\" or \"B\" to indicate your "
        "choice. Your response should use the format:\nComparison: <one-sentence comparison and explanation>\n"
        "Preferred: <\"A\" or \"B\">\n"
    )
    assert msgs[1]["content"] == expect
    assert "explaining which \\\nyou" in msgs[1]["content"]  # a literal backslash, then a newline
    # the order is random per item, reproducible from (seed, id), about half each way
    orders = [E.candidate_is_a(1, f"id{i}") for i in range(400)]
    assert orders == [E.candidate_is_a(1, f"id{i}") for i in range(400)]
    assert 150 < sum(orders) < 250
    assert orders != [E.candidate_is_a(2, f"id{i}") for i in range(400)]
    # un-swap
    assert E.outcome_of("A", True) == "win" and E.outcome_of("B", True) == "loss"
    assert E.outcome_of("B", False) == "win" and E.outcome_of("A", False) == "loss"
    assert E.outcome_of(None, True) == "unparsed" and E.outcome_of("tie", False) == "tie"


def test_wilson_and_paired_ci_on_hand_made_data():
    lo, hi = E.wilson_ci(8, 10)  # textbook values: 0.490, 0.943
    assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3
    lo, hi = E.wilson_ci(0, 10)
    assert lo == 0.0 and abs(hi - 0.2775) < 1e-3
    assert all(math.isnan(v) for v in E.wilson_ci(0, 0))
    mean, lo, hi = E.paired_diff_ci([1, 1, 0, 1], [0, 1, 0, 0])  # d = 1,0,0,1: sd 0.57735, se 0.288675
    assert mean == 0.5 and abs(lo - (0.5 - 1.959964 * 0.288675)) < 1e-5 and abs(hi - (0.5 + 1.959964 * 0.288675)) < 1e-5


def test_detail34_length_bins_on_hand_made_data():
    centres = np.arange(10) / 10 + 0.05  # one item in the middle of each of 10 bins over [0, 1]
    ratios = np.concatenate([[0.0, 1.0], centres, centres[:3]])
    wins = np.concatenate([[1, 0], [1, 1, 0, 0, 1, 0, 1, 0, 1, 1], [0, 0, 0]])
    bins = E.length_bins(ratios, wins, 10)
    assert len(bins) == 10
    assert [round(b["lo"], 6) for b in bins] == [round(x, 6) for x in np.arange(10) / 10]
    assert [b["n"] for b in bins] == [3, 2, 2, 1, 1, 1, 1, 1, 1, 2]  # min in bin 0, max in (closed) bin 9
    assert [b["win_rate"] for b in bins] == [2 / 3, 0.5, 0.0, 0, 1, 0, 1, 0, 1, 0.5]
    # summarize(): Detail 34 ratio from the *_token_len fields, log(len(candidate) / len(reference))
    rows = [dict(outcome=o, verdict="A", candidate_position="A", candidate_token_len=c, reference_token_len=20,
                 log_len_ratio=E.log_len_ratio(c, 20)) for o, c in [("win", 40), ("loss", 10), ("tie", 20), ("unparsed", 5)]]
    m = E.summarize(rows, n_bins=2)
    assert m["n_judged"] == 3 and m["n_unparsed"] == 1 and m["win_rate"] == pytest.approx(1 / 3)
    assert m["win_rate_ties_half"] == pytest.approx(0.5)
    assert m["len_bin0_lo"] == pytest.approx(math.log(0.5)) and m["len_bin1_hi"] == pytest.approx(math.log(2))
    # bins are half-open [lo, hi) except the last: the tie at ratio 0 sits on the edge -> bin 1
    assert (m["len_bin0_n"], m["len_bin1_n"]) == (1, 2) and (m["len_bin0_win_rate"], m["len_bin1_win_rate"]) == (0.0, 0.5)
    assert E.log_len_ratio(0, 20) == math.log(1 / 20)


# ---------------------------------------------------------------------------------------------------------
# Against the loopback chat-completions server
# ---------------------------------------------------------------------------------------------------------
def test_retries_429_500_timeout_drop_then_right_results(server, tmp_path):
    server.retry_after = 0.25
    n = 12
    faults = {0: " [fault=429x2]", 1: " [fault=500x2]", 2: " [fault=timeoutx1]", 3: " [fault=dropx1]", 11: " [fault=500x99]"}
    winners = [0, 1, 2, 3, 4, 5, 6, 11]
    path = write_samples(tmp_path / "s.jsonl", n, winners=winners, suffix=faults)
    t0 = time.time()
    m = E.main(args_for(server, path, tmp_path / "out", max_retries=4, request_timeout=0.4))  # the server sleeps 1 s
    elapsed = time.time() - t0
    assert elapsed >= 0.5  # two Retry-After waits of 0.25 s for item 0 (backoff alone would be ~0.05 s)
    assert m["n_rate_limited"] == 2 and m["n_timeouts"] >= 1 and m["n_connection_errors"] >= 1  # >=: a loaded CI box
    assert m["n_server_errors"] == 2 + 5  # item 1 twice, item 11 on every one of its 5 attempts
    expected = n + 2 + 2 + 1 + 1 + 4  # one per item + the injected failures' retries
    assert expected <= server.n_requests <= expected + m["n_timeouts"] - 1 + m["n_connection_errors"] - 1
    # item 11 never got an answer: an error, reported, not a win nor a loss
    assert m["n_errors"] == 1 and m["n_judged"] == 11 and m["n_wins"] == 7 and m["n_losses"] == 4
    assert m["win_rate"] == pytest.approx(7 / 11)
    rows = {r["id"]: r for r in read_csv(tmp_path / "out" / "judgements.csv")}
    assert rows["p11"]["outcome"] == "error" and "gave up" in rows["p11"]["error"]
    assert all(rows[f"p{i}"]["outcome"] == "win" for i in range(7))


def test_unparsed_verdicts_are_retried_then_counted_never_wins(server, tmp_path):
    n = 10
    suffix = {0: " [fault=malformed]", 1: " [fault=malformedx1]"}
    path = write_samples(tmp_path / "s.jsonl", n, suffix=suffix)  # every candidate carries the marker
    args = args_for(server, path, tmp_path / "out", max_unparsed_retries=2)
    m = E.main(args)
    assert m["n_unparsed"] == 1 and m["n_judged"] == 9 and m["n_losses"] == 0 and m["win_rate"] == 1.0
    assert m["unparsed_rate"] == pytest.approx(0.1)
    rows = {r["id"]: r for r in read_csv(tmp_path / "out" / "judgements.csv")}
    assert rows["p0"]["outcome"] == "unparsed" and rows["p0"]["verdict"] == "unparsed" and rows["p0"]["attempts"] == "3"
    assert rows["p1"]["outcome"] == "win" and rows["p1"]["attempts"] == "2"  # malformed once, then parsed
    assert server.n_requests == n + 2 + 1
    # a re-run is free and gives the same numbers (the final unparsed verdict is cached too)
    server.reset_counts()
    m2 = E.main(args)
    assert server.n_requests == 0 and m2["n_cache_hits"] == n and m2["n_requests"] == 0
    assert {k: m2[k] for k in ("win_rate", "n_unparsed", "n_judged")} == {k: m[k] for k in ("win_rate", "n_unparsed", "n_judged")}


def test_detail33_request_is_the_paper_protocol(server, tmp_path):
    path = write_samples(tmp_path / "s.jsonl", 1)
    E.main(args_for(server, path, tmp_path / "a", judge_model="gpt-4-0125-preview"))
    body = server.last_body
    assert body["model"] == "gpt-4-0125-preview" and body["temperature"] == 0.0 and body["max_tokens"] == 256
    assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    assert body["messages"][1]["content"].startswith("\nWhich of the following summaries")  # Detail 33: as released
    E.main(args_for(server, path, tmp_path / "b", judge_model="o-model", judge_temperature=None, max_completion_tokens_param=True))
    body = server.last_body
    assert "temperature" not in body and "max_tokens" not in body and body["max_completion_tokens"] == 256


def test_detail33_released_request_and_accounting_switches(server, tmp_path):
    """Detail 33: --released_request sends neither temperature nor max_tokens; the released accounting counts a
    verdict that is not exactly A/B for the reference and draws a reply without Comparison:/Preferred: at random;
    both win rates and their difference are reported whichever accounting is the headline."""
    n = 10  # every candidate carries the marker: a well-formed verdict always prefers it
    suffix = {0: " [fault=malformed]", 1: " [fault=malformed]", 2: " [fault=garbled]"}
    path = write_samples(tmp_path / "s.jsonl", n, suffix=suffix)
    m = E.main(args_for(server, path, tmp_path / "strict", released_request=True, max_unparsed_retries=1))
    body = server.last_body
    assert "temperature" not in body and "max_tokens" not in body and "max_completion_tokens" not in body
    # item 2's random verdict: reproducible from (seed, set, id); the candidate wins when it names its letter
    random_letter = E.released_verdict("no markers", 3, "candidate:p2")
    random_win = int(random_letter == ("A" if E.candidate_is_a(3, "p2") else "B"))
    assert m["accounting_released"] == 0 and m["n_unparsed"] == 3 and m["win_rate"] == 1.0  # 7 of 7 parsed
    assert m["strict_win_rate"] == 1.0 and m["released_n_judged"] == 10
    assert m["released_win_rate"] == pytest.approx((7 + random_win) / 10)  # "Summary A is better" -> reference
    assert m["accounting_win_rate_diff"] == pytest.approx((7 + random_win) / 10 - 1.0)
    assert server.n_requests == n + 3  # strict: one retry per unparsed reply
    server.reset_counts()
    r = E.main(args_for(server, path, tmp_path / "released", accounting="released", judge_temperature=None,
                        judge_max_tokens=None))
    assert server.n_requests == n  # released: one request per item, no retry
    assert r["accounting_released"] == 1 and r["n_unparsed"] == 0 and r["n_judged"] == 10
    assert r["win_rate"] == pytest.approx((7 + random_win) / 10) == r["released_win_rate"]
    assert r["strict_win_rate"] == 1.0 and r["n_accounting_disagreements"] == 3  # unparsed (strict) vs counted
    rows = {row["id"]: row for row in read_csv(tmp_path / "released" / "judgements.csv")}
    assert rows["p0"]["strict_outcome"] == "unparsed" and rows["p0"]["outcome"] == "loss"
    assert rows["p0"]["released_verdict"] == "Summary A is better" or rows["p0"]["released_verdict"] == "Summary B is better"
    assert E.released_verdict("Comparison: x\nPreferred:  B \n", 0, "i") == "B"
    assert E.released_outcome("A", True) == "win" and E.released_outcome('"A"', True) == "loss"


def test_detail33_order_randomisation_unswaps(server, tmp_path):
    n = 40
    path = write_samples(tmp_path / "s.jsonl", n)  # the judge prefers the candidate whatever its position
    m = E.main(args_for(server, path, tmp_path / "a", concurrency=8))
    cand_first = sum(E.candidate_is_a(3, f"p{i}") for i in range(n))
    assert 5 < cand_first < n - 5  # both orders occur
    assert m["win_rate"] == 1.0 and m["win_rate_candidate_first"] == 1.0 and m["win_rate_candidate_second"] == 1.0
    assert m["position_a_preferred_rate"] == pytest.approx(cand_first / n)
    for r in read_csv(tmp_path / "a" / "judgements.csv"):
        assert r["verdict"] == r["candidate_position"] and r["outcome"] == "win"
    # a judge that always answers "A": the candidate wins exactly where it was shown first
    server.always = "A"
    m = E.main(args_for(server, path, tmp_path / "b", judge_model="always-a"))
    assert m["win_rate"] == pytest.approx(cand_first / n) and m["position_a_preferred_rate"] == 1.0
    assert m["win_rate_candidate_first"] == 1.0 and m["win_rate_candidate_second"] == 0.0
    assert server.models["always-a"] == n


def test_max_requests_stops_cleanly_then_resumes_without_paying_twice(server, tmp_path):
    n = 20
    path = write_samples(tmp_path / "s.jsonl", n, winners=range(0, n, 2))
    m_full = E.main(args_for(server, path, tmp_path / "full"))
    server.reset_counts()
    m1 = E.main(args_for(server, path, tmp_path / "out", max_requests=7))
    assert m1["n_requests"] == 7 and server.n_paid == 7
    assert m1["n_missing"] == n - 7 and m1["complete"] == 0 and m1["n_judged"] == 7
    m2 = E.main(args_for(server, path, tmp_path / "out"))
    assert m2["complete"] == 1 and m2["n_cache_hits"] == 7 and m2["n_new_judgements"] == n - 7
    assert server.n_paid == n and set(server.paid.values()) == {1}  # every prompt paid exactly once
    assert m2["win_rate"] == m_full["win_rate"] == 0.5
    assert m1["cost_usd"] > 0 and m2["cost_usd_estimated"] > 0
    # the cost guard: with one request at a time, the run stops as soon as the measured cost reaches the cap
    server.reset_counts()
    m3 = E.main(args_for(server, path, tmp_path / "cost", concurrency=1, max_cost_usd=1e-9, price_input_per_mtok=1.0))
    assert m3["n_requests"] == 1 and server.n_paid == 1 and m3["n_missing"] == n - 1 and m3["cost_usd"] > 1e-9


def test_killed_run_resumes_nothing_lost_nothing_paid_twice(server, tmp_path):
    """The CLI in a subprocess is SIGKILLed half-way (by the server, after 15 paid answers), then resumed."""
    n, kill_after = 40, 15
    path = write_samples(tmp_path / "s.jsonl", n, winners=[i for i in range(n) if i % 3 != 0])
    holder = []

    def hook(srv, n_paid):
        if n_paid >= kill_after and not srv.frozen.is_set():
            srv.freeze()  # nothing more is answered; the client gets 0.5 s to write what it received
            time.sleep(0.5)
            holder[0].kill()

    server.hook = hook
    cmd = [sys.executable, os.path.join(ROOT, "eval_gpt_judge.py"), "--samples", path, "--base_url", server.base_url,
           "--output_dir", str(tmp_path / "out"), "--concurrency", "4", "--backoff_base", "0.01", "--seed", "3"]
    env = dict(os.environ, OPENAI_API_KEY="sk-test")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    holder.append(proc)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -9, out.decode()[-2000:]
    assert not (tmp_path / "out" / "metrics.json").exists()
    paid_before = server.n_paid
    assert kill_after <= paid_before < n
    with open(tmp_path / "out" / "judge_cache.jsonl") as f:
        assert sum(1 for line in f if line.strip()) == paid_before  # every paid answer reached the cache
    server.hook = None
    server.unfreeze()
    m = E.main(args_for(server, path, tmp_path / "out"))
    assert m["complete"] == 1 and m["n_judged"] == n and m["n_cache_hits"] == paid_before
    assert server.n_paid == n and set(server.paid.values()) == {1}  # no judgement lost, none paid twice
    # same result as an uninterrupted run
    server.reset_counts()
    m_full = E.main(args_for(server, path, tmp_path / "full"))
    assert m["win_rate"] == m_full["win_rate"] == pytest.approx(26 / 40)
    a = {r["id"]: r["outcome"] for r in read_csv(tmp_path / "out" / "judgements.csv")}
    b = {r["id"]: r["outcome"] for r in read_csv(tmp_path / "full" / "judgements.csv")}
    assert a == b


def test_compare_samples_paired_difference_head_to_head_and_outputs(server, tmp_path):
    n = 10
    ppo = write_samples(tmp_path / "ppo.jsonl", n, winners=range(8), lens=[30] * n)
    sft = write_samples(tmp_path / "sft.jsonl", n + 3, winners=range(4), lens=[15] * (n + 3))  # 3 ids PPO lacks
    m = E.main(args_for(server, ppo, tmp_path / "out", compare_samples=sft, head_to_head=True, plot=True))
    assert m["win_rate"] == 0.8 and m["compare_win_rate"] == 0.4 and m["compare_n_items"] == n  # same queries only
    x, y = np.array([1] * 8 + [0] * 2), np.array([1] * 4 + [0] * 6)
    mean, lo, hi = E.paired_diff_ci(x, y)
    assert m["diff_win_rate"] == pytest.approx(0.4) and m["diff_n_pairs"] == n
    assert (m["diff_win_rate_ci_low"], m["diff_win_rate_ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert (m["diff_both_win"], m["diff_only_candidate_wins"], m["diff_only_compare_wins"]) == (4, 4, 0)
    assert m["mean_candidate_token_len"] == 30 and m["compare_mean_candidate_token_len"] == 15
    h2h = {r["id"]: r["outcome"] for r in read_csv(tmp_path / "out" / "judgements.csv") if r["set"] == "h2h"}
    assert len(h2h) == n and all(h2h[f"p{i}"] == "win" for i in range(4, 8))
    assert m["h2h_n_judged"] == n
    for name in ("metrics.json", "judgements.csv", "args.json", "judge_plot.png", "judge_cache.jsonl"):
        assert (tmp_path / "out" / name).exists(), name
    flat = json.load(open(tmp_path / "out" / "metrics.json"))
    assert all(v is None or isinstance(v, (int, float)) for v in flat.values())
    assert {"win_rate", "compare_win_rate", "diff_win_rate", "win_rate_ci_low", "len_bin9_n"} <= set(flat)


def test_bad_inputs_raise_clear_errors(server, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "query": "q", "response": "r", "reference": "x"}) + "\n")
    with pytest.raises(ValueError, match="response_token_len"):
        E.main(args_for(server, str(bad), tmp_path / "o"))
    with pytest.raises(ValueError, match="--samples"):
        E.main(E.Args(output_dir=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="gold_task_dir"):
        E.main(E.Args(samples=write_samples(tmp_path / "s.jsonl", 2), judge="gold", output_dir=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="--preset"):
        E.parse_args(["--preset", "nope"])
    assert E.parse_args(["--preset", "embedded"]).judge == "gold"
    assert E.parse_args(["--judge_model", "gpt-4-0125-preview"]).judge_model == "gpt-4-0125-preview"
    # an endpoint that does not know the model / rejects the key stops the run with a clear message
    with pytest.raises(E.FatalJudgeError, match="404"):
        E.main(args_for(server, write_samples(tmp_path / "s.jsonl", 2), tmp_path / "o", base_url=server.base_url + "/nope"))


class FakeGold:
    """Same API as embedded_task.GoldJudge: a summary's score = how many times it says 'good'."""

    @classmethod
    def from_dir(cls, d):
        return cls()

    def score(self, query, summary):
        return summary.split("<|endoftext|>")[0].count("good")

    def compare(self, query, a, b):
        sa, sb = self.score(query, a), self.score(query, b)
        return 1.0 if sa > sb else (0.0 if sa < sb else 0.5)

    def prefers(self, query, a, b):
        return 0 if self.compare(query, a, b) == 1.0 else 1

    def win_rate(self, queries, cands, refs):
        return float(np.mean([self.prefers(q, c, r) == 0 for q, c, r in zip(queries, cands, refs)]))


def test_gold_backend_same_statistics_interface(server, tmp_path, monkeypatch):
    mod = types.ModuleType("embedded_task")
    mod.GoldJudge = FakeGold
    monkeypatch.setitem(sys.modules, "embedded_task", mod)
    rows = []
    for i in range(12):  # 6 better, 3 equal (ties), 3 worse
        cand = "good good" if i < 6 else ("good" if i < 9 else "")
        rows.append(dict(id=f"g{i}", query=f"POST: p{i}\n\nTL;DR:", response=f"c {cand} {MARK if i < 6 else ''}",
                         reference="r good", response_token_len=5 + i, reference_token_len=8))
    path = tmp_path / "gold.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gold_dir = tmp_path / "task"
    gold_dir.mkdir()
    m = E.main(E.Args(samples=str(path), judge="gold", gold_task_dir=str(gold_dir), output_dir=str(tmp_path / "g")))
    g = FakeGold()
    assert m["win_rate"] == pytest.approx(g.win_rate([r["query"] for r in rows], [r["response"] for r in rows], [r["reference"] for r in rows]))
    assert m["win_rate"] == 0.5 and m["n_ties"] == 3 and m["n_losses"] == 3 and m["win_rate_ties_half"] == pytest.approx(7.5 / 12)
    assert m["n_requests"] == 0 and m["complete"] == 1
    m_oa = E.main(args_for(server, str(path), tmp_path / "o"))
    stat_keys = lambda d: {k for k in d if not k.startswith("n_r") and k not in ("n_timeouts", "n_server_errors", "n_connection_errors")}
    assert stat_keys(m) == stat_keys(m_oa)  # the same statistics, whichever judge


# ---------------------------------------------------------------------------------------------------------
# --model_path: Detail 13 evaluation sampling on the dataset's queries
# ---------------------------------------------------------------------------------------------------------
def test_detail13_model_path_generates_then_judges(tmp_path, pythia_tokenizer_dir, monkeypatch):
    """Detail 13 (temperature 0.01, top_k 0, top_p 1, exactly R tokens, EOS does not stop), Detail 21 (pads
    after the first EOS), Detail 11 (left padding changes nothing), Detail 7 (dropout off), then judging."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    import tldr_dataset as td

    torch.set_num_threads(1)
    cfg = E.eval_generation_config(53, 0.01, pad_id=7)
    assert (cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.do_sample) == (53, 0.01, 0, 1.0, True)
    assert cfg.eos_token_id is None and cfg.pad_token_id == 7 and not cfg.min_new_tokens
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, n in (("train", 4), ("validation", 6), ("test", 2)):
        with open(raw / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps(dict(id=f"{split}{i}", subreddit="test", title=f"title {i}",
                                        post="word " * (3 + 4 * i), summary=f"short {i}")) + "\n")
    cmp = tmp_path / "cmp"
    cmp.mkdir()
    for split in ("train", "validation"):
        (cmp / f"{split}.jsonl").write_text(json.dumps(dict(info=dict(id="c", post="p", title="t", subreddit="s"),
                                                            summaries=[dict(text=" a", policy="x"), dict(text=" b", policy="y")], choice=0)) + "\n")
    data = tmp_path / "data"
    td.build(td.Args(sft_dataset=str(raw), preference_dataset=str(cmp), base_model=pythia_tokenizer_dir, output_dir=str(data),
                     query_length=48, sft_response_length=12, sft_query_response_length=60, rm_response_length=12, rm_query_response_length=60))
    tok = AutoTokenizer.from_pretrained(pythia_tokenizer_dir)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok) + 8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, max_position_embeddings=128, hidden_dropout=0.1))
    model_dir = tmp_path / "policy"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    # Detail 13 + 11: exactly R new tokens even when EOS is the likeliest token; a left-padded query gives
    # the same near-greedy tokens as the unpadded one
    model.eval()
    eos = tok.eos_token_id
    pad = len(tok)
    q = torch.tensor([[pad, pad, pad, 11, 12, 13, 14]])
    cfg = E.eval_generation_config(9, 0.01, pad)
    torch.manual_seed(1)
    padded = E.generate(model, q, pad, cfg)
    torch.manual_seed(1)
    unpadded = E.generate(model, q[:, 3:], pad, cfg)
    assert padded.shape == (1, 9) and torch.equal(padded, unpadded)
    bias = torch.zeros(model.config.vocab_size)
    bias[eos] = 50.0
    h = model.get_output_embeddings().register_forward_hook(lambda mod, inp, out: out + bias)
    r = E.generate(model, q, pad, cfg)
    h.remove()
    assert r.shape == (1, 9) and (r == eos).all()  # EOS did not stop generation
    E.disable_dropout(model)  # Detail 7: the config said hidden_dropout=0.1
    model.train()
    assert model.config.hidden_dropout == 0.0 and torch.equal(model(q[:, 3:]).logits, model(q[:, 3:]).logits)
    assert E.truncate_after_eos(r, eos, pad).tolist() == [[eos] + [pad] * 8]  # Detail 21
    # end to end: generate on the validation queries, then judge with the (fake) gold judge
    mod = types.ModuleType("embedded_task")
    mod.GoldJudge = FakeGold
    monkeypatch.setitem(sys.modules, "embedded_task", mod)
    out = tmp_path / "judge"
    m = E.main(E.Args(model_path=str(model_dir), dataset_path=str(data), split="validation", response_length=12,
                      judge="gold", gold_task_dir=str(tmp_path), output_dir=str(out), max_samples=5))
    samples = [json.loads(line) for line in open(out / "eval_samples.jsonl")]
    assert len(samples) == 5 and m["n_items"] == 5
    for s in samples:
        assert set(E.SAMPLE_FIELDS) <= set(s) and 1 <= s["response_token_len"] <= 12
        assert "<|endoftext|>" not in s["response"] and "[PAD]" not in s["response"]
    assert samples[0]["reference"] == "short 0" and samples[0]["query"].endswith("TL;DR:")
    # --split test samples the test split's queries (validation is the default, as released)
    assert E.Args().split == "validation"
    E.main(E.Args(model_path=str(model_dir), dataset_path=str(data), split="test", response_length=4, judge="gold",
                  gold_task_dir=str(tmp_path), output_dir=str(tmp_path / "judge_test")))
    ids = [json.loads(line)["id"] for line in open(tmp_path / "judge_test" / "eval_samples.jsonl")]
    assert ids == ["test0", "test1"]


def test_real_gold_judge_of_the_embedded_task(tmp_path):
    """`--judge gold` with the real embedded_task.GoldJudge agrees with GoldJudge.win_rate (ties -> no win)."""
    et = pytest.importorskip("embedded_task")
    task = tmp_path / "task"
    et.build(et.Args(out_dir=str(task), seed=1, sizes="", n_sft_train=20, n_sft_val=24, n_sft_test=4, n_cmp_train=20,
                     n_cmp_val=10, n_pretrain_posts=60, vocab_size=300), log=lambda *a, **k: None)
    raw = [json.loads(line) for line in open(task / "raw" / "sft_validation.jsonl")]
    rows = []
    for i, r in enumerate(raw):
        full, half = r["summary"], " ".join(r["summary"].split()[: max(1, len(r["summary"].split()) // 2)])
        cand, ref = [(full, full), (full, half), (half, full)][i % 3]  # a tie, a likely win, a likely loss
        rows.append(dict(id=r["id"], query=et.format_query(r["subreddit"], r["title"], r["post"]), response=cand,
                         reference=ref, response_token_len=len(cand.split()), reference_token_len=len(ref.split())))
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = E.main(E.Args(samples=str(path), judge="gold", gold_task_dir=str(task), output_dir=str(tmp_path / "j")))
    judge = et.GoldJudge.from_dir(str(task))
    q, c, ref = ([r[k] for r in rows] for k in ("query", "response", "reference"))
    assert m["win_rate"] == pytest.approx(judge.win_rate(q, c, ref))
    assert m["n_ties"] == sum(judge.compare(a, b, d) == 0.5 for a, b, d in zip(q, c, ref)) >= len(rows) // 3
    assert m["n_judged"] == len(rows) and m["n_unparsed"] == 0 and m["n_wins"] >= 4 and m["n_losses"] >= 4
