"""dpo.py: Detail 32 (DPO loss, response log-probabilities, implicit reward) and the shared details it uses
(3, 7, 8, 9, 11, 13, 21) on a tiny random GPT-NeoX, plus a short end-to-end run on the real data path."""

import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dpo
import tldr_dataset as td
from helpers import WORDS, tiny_model, write_sft_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok(pythia_tokenizer_dir):
    return dpo.load_tokenizer(pythia_tokenizer_dir)


# ------------------------------------------------------------------------------------------------------
# Detail 32: the loss and the implicit reward on hand-made numbers
# ------------------------------------------------------------------------------------------------------
def test_detail32_dpo_loss_hand_computed():
    # pi_c - ref_c = 2, pi_r - ref_r = -1; beta 0.05 -> rewards 0.1 and -0.05, logit 0.15.
    losses, cr, rr = dpo.dpo_loss(torch.tensor([-10.0]), torch.tensor([-15.0]), torch.tensor([-12.0]), torch.tensor([-14.0]), 0.05)
    torch.testing.assert_close(cr, torch.tensor([0.1]))
    torch.testing.assert_close(rr, torch.tensor([-0.05]))
    # -logsigmoid(0.15) = log(1 + exp(-0.15)) = 0.620957...
    assert losses.item() == pytest.approx(0.6209570477895321, abs=1e-6)
    # A pair the policy ranks the wrong way costs more; beta scales the logit.
    worse, _, _ = dpo.dpo_loss(torch.tensor([-12.0]), torch.tensor([-14.0]), torch.tensor([-10.0]), torch.tensor([-15.0]), 0.05)
    assert worse.item() == pytest.approx(math.log1p(math.exp(0.15)), abs=1e-6)
    assert dpo.Args().beta == 0.05


def test_detail32_implicit_reward_accuracy_hand_made():
    chosen = [0.3, -0.1, 0.0, 0.2]
    rejected = [0.1, 0.2, 0.0, -0.4]  # right, wrong, tie (counts as wrong: strictly greater), right
    s = dpo.reward_stats(chosen, rejected)
    assert s["reward_accuracy"] == 0.5
    assert s["reward_margin"] == pytest.approx((0.2 - 0.3 + 0.0 + 0.6) / 4)
    assert s["chosen_reward"] == pytest.approx(0.1) and s["rejected_reward"] == pytest.approx(-0.025)


def test_detail32_validation_metrics_overall_and_by_confidence():
    import datasets

    beta = 0.05
    # implicit rewards: beta * (pi - ref): chosen 0.05, 0.0, -0.05 ; rejected 0.0, 0.05, -0.1
    lp = {"pi_c": np.array([1.0, 0.0, -1.0]), "ref_c": np.zeros(3), "pi_r": np.array([0.0, 1.0, -2.0]), "ref_r": np.zeros(3)}
    ds = datasets.Dataset.from_dict({"confidence": [9, 9, 3], "policies": ["a vs b", "a vs b", "a vs c"]})
    m = dpo.validation_metrics("val", lp, ds, beta)
    assert m["val_reward_accuracy"] == pytest.approx(2 / 3)
    assert m["val_reward_margin"] == pytest.approx((0.05 - 0.05 + 0.05) / 3)
    assert m["val_reward_accuracy/confidence_9"] == 0.5 and m["val_reward_accuracy/confidence_3"] == 1.0
    assert m["val_count/confidence_9"] == 2
    assert m["val_reward_accuracy/policies_a_vs_c"] == 1.0
    expected_loss = np.mean([math.log1p(math.exp(-x)) for x in (0.05, -0.05, 0.05)])
    assert m["val_loss"] == pytest.approx(expected_loss)
    assert m["val_chosen_logprob"] == pytest.approx(0.0) and m["val_rejected_logprob"] == pytest.approx(-1 / 3)


# ------------------------------------------------------------------------------------------------------
# Detail 32 + 3 + 11: response log-probabilities
# ------------------------------------------------------------------------------------------------------
def test_detail32_logprobs_sum_response_tokens_only_hand_made():
    pad, V = 9, 4
    ids = torch.tensor([[1, 2, 3, 0, pad, pad]])  # query [1, 2], response [3, 0(EOS)], then pads
    logits = torch.zeros(1, 6, V + 6)  # uniform over 10 ids
    logits[0, 1, 3] = math.log(7.0)  # makes p(3 | prefix) = 7 / 16 at position 1 (which predicts token 2's successor)
    out = dpo.sequence_logprobs(logits, ids, torch.tensor([2]), pad)
    # response tokens: 3 (predicted at position 1) and 0 (predicted at position 2); pads and the query excluded.
    assert out.item() == pytest.approx(math.log(7 / 16) + math.log(1 / 10), abs=1e-6)
    assert dpo.response_mask(ids, torch.tensor([2]), pad).tolist() == [[False, False, True, True, False, False]]
    # The same pair left-padded: the query is still the first two REAL tokens.
    left = torch.tensor([[pad, pad, 1, 2, 3, 0]])
    left_logits = torch.zeros(1, 6, V + 6)
    left_logits[0, 3, 3] = math.log(7.0)
    assert dpo.response_mask(left, torch.tensor([2]), pad).tolist() == [[False, False, False, False, True, True]]
    assert dpo.sequence_logprobs(left_logits, left, torch.tensor([2]), pad).item() == pytest.approx(out.item(), abs=1e-6)


def test_detail32_detail11_logprobs_match_manual_and_padding_side(tok):
    model = tiny_model(tok).eval()
    pad = tok.pad_token_id
    query, response = [5, 6, 7, 8], [9, 10, 11, tok.eos_token_id]
    right = torch.tensor([query + response + [pad] * 3])
    left = torch.tensor([[pad] * 3 + query + response])
    qlen = torch.tensor([len(query)])
    a = dpo.sequence_logprobs(dpo.forward(model, right, pad).logits, right, qlen, pad)
    b = dpo.sequence_logprobs(dpo.forward(model, left, pad).logits, left, qlen, pad)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # Detail 11: same positions -> same log-probs
    # Manual: log p(response token t | everything before it) from the unpadded sequence, summed.
    seq = torch.tensor([query + response])
    logp = torch.log_softmax(dpo.forward(model, seq, pad).logits, -1)
    manual = sum(logp[0, t - 1, seq[0, t]] for t in range(len(query), seq.shape[1]))
    torch.testing.assert_close(a[0], manual, atol=1e-5, rtol=1e-5)


def test_detail32_chosen_and_rejected_in_one_forward(tok):
    model = tiny_model(tok).eval()
    pad = tok.pad_token_id
    calls = []
    model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    chosen = torch.tensor([[5, 6, 7, 0, pad, pad], [5, 6, 8, 9, 10, 0]])
    rejected = torch.tensor([[5, 6, 11, 12, 0, pad], [5, 6, 13, 0, pad, pad]])
    qlen = torch.tensor([2, 2])
    c, r = dpo.pair_logprobs(model, chosen, rejected, qlen, pad)
    assert len(calls) == 1 and calls[0][0] == 4  # one forward pass with both halves
    # Each equals its own separate computation (the extra pad columns change nothing).
    for ids, got in ((chosen, c), (rejected, r)):
        alone = dpo.sequence_logprobs(dpo.forward(model, ids, pad).logits, ids, qlen, pad)
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


def test_detail32_pair_logprobs_project_only_from_the_earliest_response_token(tok):
    """Rows with queries of 3 and 5 tokens: the vocabulary projection covers positions 2.. (the shortest query's last
    token on), and the log-probabilities and their gradients are those of full logits."""
    model = tiny_model(tok).eval()
    pad = tok.pad_token_id
    chosen = torch.tensor([[5, 6, 7, 8, 0, pad, pad, pad], [5, 6, 7, 8, 9, 10, 11, 0]])
    rejected = torch.tensor([[5, 6, 7, 12, 13, 0, pad, pad], [5, 6, 7, 8, 9, 14, 0, pad]])
    qlen = torch.tensor([3, 5])
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: rows.append(a[0].shape[1]))
    c, r = dpo.pair_logprobs(model, chosen, rejected, qlen, pad)
    handle.remove()
    assert rows == [8 - 2]
    (c - r).sum().backward()
    grad = model.gpt_neox.embed_in.weight.grad.clone()
    model.zero_grad()
    full = [dpo.sequence_logprobs(dpo.forward(model, ids, pad).logits, ids, qlen, pad) for ids in (chosen, rejected)]
    torch.testing.assert_close(c, full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r, full[1], atol=1e-5, rtol=1e-5)
    (full[0] - full[1]).sum().backward()
    torch.testing.assert_close(grad, model.gpt_neox.embed_in.weight.grad, atol=1e-5, rtol=1e-5)


def test_detail32_step0_policy_equals_reference_loss_is_log2(tok, tmp_path):
    tiny_model(tok, dropout=0.1, path=str(tmp_path))
    policy = dpo.load_policy(str(tmp_path), tok)
    ref = dpo.load_reference(str(tmp_path), tok)
    policy.train()  # train mode: with dropout off it must still equal the eval-mode reference exactly
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    pad = tok.pad_token_id
    chosen = torch.tensor([[5, 6, 7, 0, pad, pad], [5, 6, 8, 9, 10, 0]])
    rejected = torch.tensor([[5, 6, 11, 12, 0, pad], [5, 6, 13, 0, pad, pad]])
    qlen = torch.tensor([2, 2])
    pc, pr = dpo.pair_logprobs(policy, chosen, rejected, qlen, pad)
    with torch.no_grad():
        rc, rr = dpo.pair_logprobs(ref, chosen, rejected, qlen, pad)
    losses, cr, rrew = dpo.dpo_loss(pc, pr, rc, rr, 0.05)
    assert torch.equal(cr, torch.zeros(2)) and torch.equal(rrew, torch.zeros(2))
    assert losses.mean().item() == pytest.approx(math.log(2), abs=1e-7)
    losses.mean().backward()  # gradients flow to the policy only
    assert policy.get_input_embeddings().weight.grad is not None


# ------------------------------------------------------------------------------------------------------
# Shared details as used by dpo.py
# ------------------------------------------------------------------------------------------------------
def test_detail7_dropout_off(tok, tmp_path):
    tiny_model(tok, dropout=0.5, path=str(tmp_path))
    for model in (dpo.load_policy(str(tmp_path), tok), dpo.load_reference(str(tmp_path), tok)):
        model.train()
        assert model.config.attention_dropout == 0.0 and model.config.hidden_dropout == 0.0
        assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
        ids = torch.randint(0, 100, (2, 12))
        assert torch.equal(dpo.forward(model, ids, tok.pad_token_id).logits, dpo.forward(model, ids, tok.pad_token_id).logits)


def test_detail3_pad_token_distinct(tok):
    assert tok.pad_token == "[PAD]" and tok.pad_token_id != tok.eos_token_id


def test_detail8_detail9_optimizer_and_cosine_schedule(tok):
    model = tiny_model(tok)
    args = dpo.Args()
    assert args.lr == 3e-6 and args.total_batch_size == 64 and args.num_train_epochs == 1  # Detail 32 / 8
    opt, sched = dpo.make_optimizer(model, args, num_updates=10)
    assert opt.defaults["eps"] == 1e-5 and opt.defaults["lr"] == 3e-6 and isinstance(opt, torch.optim.AdamW)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(3e-6) and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_detail13_detail21_eval_generation_exact_length(tok):
    model = tiny_model(tok).eval()
    pad = tok.pad_token_id
    queries = torch.tensor([[pad, pad, 5, 6, 7], [5, 6, 7, 8, 9]])
    torch.manual_seed(0)
    out = dpo.generate(model, queries, tok, response_length=7, temperature=1e-6)
    assert out.shape == (2, 7)
    seq = torch.tensor([[5, 6, 7]])  # Detail 11: the left-padded query decodes like the unpadded one
    for _ in range(7):
        seq = torch.cat([seq, dpo.forward(model, seq, pad).logits[:, -1:].argmax(-1)], 1)
    assert out[0].tolist() == dpo.truncate_response(seq[:, 3:], tok.eos_token_id, pad)[0].tolist()
    assert dpo.truncate_response(torch.tensor([[3, 0, 4, 0]]), 0, 99).tolist() == [[3, 0, 99, 99]]
    assert dpo.Args().response_length == 53 and dpo.Args().eval_temperature == 0.01


def test_presets_flags_and_bad_input():
    args = dpo.parse_args(["--preset", "embedded", "--lr", "0.5", "--response_length", "128"])
    assert args.preset == "embedded" and args.lr == 0.5 and args.response_length == 128
    assert dpo.parse_args([]).lr == 3e-6
    with pytest.raises(ValueError, match="--preset"):
        dpo.parse_args(["--preset", "nope"])
    with pytest.raises(ValueError, match="total_batch_size=64 is not divisible"):
        dpo.check_batch_arithmetic(dpo.Args(per_device_train_batch_size=12), 1)
    import datasets

    with pytest.raises(ValueError, match="query_rejected_token"):
        dpo.check_preference_split(datasets.Dataset.from_dict({"query_token": [[1]], "query_chosen_token": [[1]]}), "train")


# ------------------------------------------------------------------------------------------------------
# End to end: raw rows -> tldr_dataset.build -> dpo.py (subprocess)
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory, pythia_tokenizer_dir, tok):
    root = tmp_path_factory.mktemp("dpo_e2e")
    words = WORDS
    raw = root / "raw"
    write_sft_rows(raw, {"train": 8, "validation": 8, "test": 4})
    cmp = root / "cmp"
    cmp.mkdir()
    for split, n in (("train", 64), ("validation", 16)):
        with open(cmp / f"{split}.jsonl", "w") as f:
            for i in range(n):
                w = words[i % len(words)]
                good, bad = f" {w} all day", f" nothing about {words[(i + 3) % len(words)]}"
                choice = i % 2
                summaries = [dict(text=good, policy="ref"), dict(text=bad, policy="sup1")]
                if choice:
                    summaries = summaries[::-1]
                f.write(json.dumps(dict(info=dict(id=f"{split}c{i}", post=f"I keep thinking about {w}.", title=f"about {w}", subreddit="test"),
                                        summaries=summaries, choice=choice, worker="w", batch="b1", split="valid1" if split == "validation" else "train",
                                        extra=dict(confidence=1 + i % 3))) + "\n")
    data = root / "data"
    td.build(td.Args(sft_dataset=str(raw), preference_dataset=str(cmp), base_model=pythia_tokenizer_dir, output_dir=str(data),
                     query_length=48, sft_response_length=12, sft_query_response_length=60, rm_response_length=12, rm_query_response_length=60))
    model_dir = root / "sft"
    tiny_model(tok, path=str(model_dir))
    return data, model_dir


def test_dpo_end_to_end_writes_metrics(tiny_run_inputs, tmp_path):
    data, model_dir = tiny_run_inputs
    out = tmp_path / "dpo"
    cmd = [sys.executable, os.path.join(ROOT, "dpo.py"), "--preset", "embedded", "--sft_model_path", str(model_dir),
           "--dataset_path", str(data), "--output_dir", str(out), "--gold_task_dir", "None", "--total_batch_size", "8",
           "--per_device_train_batch_size", "4", "--num_eval_samples", "8", "--eval_batch_size", "8", "--response_length", "6",
           "--eval_every", "4", "--lr", "3e-3", "--per_device_eval_batch_size", "16"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    m = json.load(open(out / "metrics.json"))
    assert m["updates"] == 8
    assert m["initial_train_loss"] == pytest.approx(math.log(2), abs=1e-6)  # Detail 32: policy == reference at start
    for key in ("val_loss", "val_reward_accuracy", "val_reward_margin", "val_chosen_logprob", "val_rejected_logprob",
                "val_reward_accuracy/confidence_1", "dpo_mean_response_len"):
        assert key in m, key
    # The chosen summaries are trivially separable: the policy learns them within 8 updates.
    assert m["val_loss"] < math.log(2) and m["val_reward_accuracy"] > 0.5 and m["val_reward_margin"] > 0
    for name in ("args.json", "metrics.jsonl", "eval_samples.jsonl", "config.json", "tokenizer_config.json"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 8 and "train/chosen_logprob" in rows[0] and "val/reward_accuracy" in rows[3]
    sample = json.loads(open(out / "eval_samples.jsonl").readline())
    assert {"id", "query", "response", "reference", "response_token_len", "reference_token_len"} <= set(sample)
    # The saved policy loads back and differs from the SFT model it started from.
    tokenizer = dpo.load_tokenizer(str(out))
    assert tokenizer.pad_token == "[PAD]"
    new, old = dpo.load_policy(str(out), tokenizer), dpo.load_policy(str(model_dir), tokenizer)
    assert not torch.equal(new.get_input_embeddings().weight, old.get_input_embeddings().weight)


def test_bf16_autocast_logprobs_in_fp32(tok):
    """Under bf16 autocast (the CUDA branch, here on CPU) the forward runs in bf16, the response log-probabilities
    (log-softmax) in fp32: they match a float64 log-softmax of the same bf16 logits far below bf16 rounding."""
    model = tiny_model(tok).eval()
    pad = tok.pad_token_id
    chosen = torch.tensor([[5, 6, 7, 0, pad, pad], [5, 6, 8, 9, 10, 0]])
    rejected = torch.tensor([[5, 6, 11, 12, 0, pad], [5, 6, 13, 0, pad, pad]])
    qlen = torch.tensor([2, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c, r = dpo.pair_logprobs(model, chosen, rejected, qlen, pad)
        logits = dpo.forward(model, chosen, pad).logits
    assert logits.dtype == torch.bfloat16 and c.dtype == torch.float32 and r.dtype == torch.float32
    logp = torch.log_softmax(logits.double(), -1)
    manual = [sum(logp[b, t - 1, chosen[b, t]] for t in range(2, 6) if chosen[b, t] != pad) for b in range(2)]
    torch.testing.assert_close(c.double(), torch.stack(manual), atol=1e-5, rtol=0)
    losses, _, _ = dpo.dpo_loss(c, r, c.detach(), r.detach(), 0.05)
    assert losses.dtype == torch.float32 and torch.allclose(losses, torch.full_like(losses, math.log(2)))


def test_bf16_on_cpu_run_and_test_split(tiny_run_inputs, tmp_path):
    """dpo.py's bf16 branch end to end on CPU (--bf16_on_cpu): finite losses, a policy that loads; --split test
    samples the test split's queries."""
    data, model_dir = tiny_run_inputs
    out = tmp_path / "dpo_bf16"
    cmd = [sys.executable, os.path.join(ROOT, "dpo.py"), "--preset", "embedded", "--sft_model_path", str(model_dir),
           "--dataset_path", str(data), "--output_dir", str(out), "--gold_task_dir", "None", "--total_batch_size", "8",
           "--per_device_train_batch_size", "4", "--num_train_pairs", "32", "--num_val_pairs", "8", "--num_eval_samples", "8", "--eval_batch_size", "8",
           "--response_length", "6", "--lr", "3e-3", "--per_device_eval_batch_size", "16", "--bf16_on_cpu", "--split", "test"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    m = json.load(open(out / "metrics.json"))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert m["updates"] == 4 and all(math.isfinite(r["train/loss"]) for r in rows) and math.isfinite(m["val_loss"])
    assert m["initial_train_loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference (bf16 forwards)
    samples = [json.loads(line) for line in open(out / "eval_samples.jsonl")]
    assert len(samples) == 4 and all(s["id"].startswith("test") for s in samples)
    policy = dpo.load_policy(str(out), dpo.load_tokenizer(str(out)))
    assert policy.get_input_embeddings().weight.dtype == torch.float32


def test_detail6_validation_cnndm_scored_in_width_scaled_batches(tok):
    """validation_cnndm rows are 2,021 tokens wide (Detail 6): dpo.py scores them in proportionally fewer pairs per
    forward (16 x 638 // 2,021 = 5), TL;DR rows in the full batch, with the same log-probabilities as one pair at a time."""
    import datasets
    from types import SimpleNamespace

    model = tiny_model(tok).eval()
    pad = tok.pad_token_id
    calls = []
    model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    accelerator = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))

    def pairs(n, query_width, width):
        rows = []
        for i in range(n):
            query = [5 + i, 6, 7]
            rows.append(dict(query_token=[pad] * (query_width - 3) + query,
                             query_chosen_token=(query + [8 + i, 0] + [pad] * width)[:width],
                             query_rejected_token=(query + [20 + i, 21, 0] + [pad] * width)[:width]))
        return datasets.Dataset.from_list(rows)

    cnndm = pairs(12, 1919, 2021)
    lp = dpo.pairs_logprobs(model, cnndm, pad, 16, accelerator)
    assert calls == [10, 10, 4]  # pairs of 5, 5 and 2 (chosen and rejected in one forward)
    calls.clear()
    one = dpo.pairs_logprobs(model, cnndm, pad, 1, accelerator)
    np.testing.assert_allclose(lp["c"], one["c"], rtol=1e-5), np.testing.assert_allclose(lp["r"], one["r"], rtol=1e-5)
    calls.clear()
    dpo.pairs_logprobs(model, pairs(12, 512, 638), pad, 16, accelerator)
    assert calls == [24]


def test_num_train_pairs_draws_pairs_across_posts():
    """A rater round writes a post's 15 pairs in a row: --num_train_pairs draws its subset with the seed (about as many
    posts as pairs), not the first rows (a fifteenth as many posts)."""
    from datasets import Dataset

    ds = Dataset.from_dict({"id": [f"p{i // 15}" for i in range(15000)], "row": list(range(15000))})
    sub = dpo.subset_pairs(ds, 64, seed=1)
    assert len(sub) == 64 and sub["row"] == sorted(sub["row"]) and len(set(sub["row"])) == 64
    assert len(set(sub["id"])) > 50  # the first 64 rows would be 5 posts
    assert sub["row"] == dpo.subset_pairs(ds, 64, seed=1)["row"] != dpo.subset_pairs(ds, 64, seed=2)["row"]
    assert dpo.subset_pairs(ds, 20000, seed=1)["row"] == list(range(15000))
