"""Tests of ppo.py on a tiny random GPT-NeoX, a tiny ScalarModel and a fake data set in the SPEC schema.

Each test names the Detail(s) of DETAILS.md it pins. The end-to-end runs (resume by killing a run, the
non-finite stop, two processes with gloo) run ppo.py in subprocesses on the same fake task.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ppo  # noqa: E402

torch.set_num_threads(1)

QUERY_LEN, RESP_LEN = 12, 8
VOCAB = 64  # tokenizer: EOS 0, 60 word tokens, [PAD] 61 (no resize needed)


# ------------------------------------------------------------------------------------------------------------
# fixtures: a fake SFT dir, RM dir and data set
# ------------------------------------------------------------------------------------------------------------
def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0}
    for i in range(1, 61):
        vocab[f"w{i}"] = i
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", unk_token="w1")
    tok.add_special_tokens({"pad_token": "[PAD]"})
    assert tok.pad_token_id == 61 and tok.eos_token_id == 0
    return tok


def tiny_config(dropout=0.0):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, eos_token_id=0, bos_token_id=0,
                         hidden_dropout=dropout, attention_dropout=dropout)


def make_rm(policy, seed=1):
    torch.manual_seed(seed)
    cfg = ppo.ScalarModelConfig(base_config=policy.config.to_dict(), hidden_size=policy.config.hidden_size,
                                base_model="tiny")
    rm = ppo.ScalarModel(cfg)
    rm.trunk.load_state_dict(policy.gpt_neox.state_dict())
    with torch.no_grad():
        rm.scalar_head.weight.normal_(std=1 / math.sqrt(33))
        rm.scalar_head.bias.zero_()
    return rm


def build_task(root, n_train=64, n_val=16, seed=0):
    """SFT dir (GPTNeoXForCausalLM + tokenizer with [PAD]), RM dir (ScalarModel), dataset dir (SPEC schema)."""
    from datasets import Dataset, DatasetDict
    from transformers import GPTNeoXForCausalLM

    tok = make_tokenizer()
    pad, eos = tok.pad_token_id, tok.eos_token_id
    torch.manual_seed(seed)
    policy = GPTNeoXForCausalLM(tiny_config())
    with torch.no_grad():  # make EOS likely enough that some responses end within RESP_LEN tokens
        policy.gpt_neox.final_layer_norm.bias.add_(0.5)
        policy.get_output_embeddings().weight[0] = 0.5
    sft_dir, rm_dir, data_dir = (os.path.join(root, n) for n in ("sft", "rm", "dataset"))
    policy.save_pretrained(sft_dir)
    tok.save_pretrained(sft_dir)
    make_rm(policy).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    rng = np.random.default_rng(seed)

    def rows(n, start):
        out = {k: [] for k in ("id", "subreddit", "title", "post", "summary", "query", "query_token",
                               "reference_response", "reference_response_token", "reference_response_token_len",
                               "query_reference_response", "query_reference_response_token",
                               "query_reference_response_token_len")}
        for i in range(n):
            q = rng.integers(1, 61, size=int(rng.integers(4, QUERY_LEN + 1))).tolist()
            r = rng.integers(1, 61, size=int(rng.integers(1, RESP_LEN))).tolist() + [eos]
            qtext, rtext = tok.decode(q), " " + tok.decode(r[:-1])
            out["id"].append(f"p{start + i}")
            out["subreddit"].append("test")
            out["title"].append("t")
            out["post"].append(qtext)
            out["summary"].append(rtext.strip())
            out["query"].append(qtext)
            out["query_token"].append([pad] * (QUERY_LEN - len(q)) + q)
            out["reference_response"].append(rtext + "<|endoftext|>")
            out["reference_response_token"].append(r + [pad] * (RESP_LEN - len(r)))
            out["reference_response_token_len"].append(len(r))
            out["query_reference_response"].append(qtext + rtext + "<|endoftext|>")
            out["query_reference_response_token"].append(q + r + [pad] * (QUERY_LEN + RESP_LEN - len(q) - len(r)))
            out["query_reference_response_token_len"].append(len(q) + len(r))
        return Dataset.from_dict(out)

    DatasetDict({"train": rows(n_train, 0), "validation": rows(n_val, 10_000), "test": rows(4, 20_000)}).save_to_disk(
        os.path.join(data_dir, "sft"))
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump({"query_length": QUERY_LEN, "sft_response_length": RESP_LEN, "pad_token_id": pad,
                   "eos_token_id": eos}, f)
    return sft_dir, rm_dir, data_dir


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return build_task(str(tmp_path_factory.mktemp("ppo_task")))


@pytest.fixture(scope="module")
def models(task):
    sft_dir, rm_dir, _ = task
    tok = ppo.load_tokenizer(sft_dir)
    return tok, ppo.load_policy(sft_dir, tok), ppo.load_scalar_model(rm_dir)


def random_query_responses(tok, n=6, seed=0):
    """Left-padded queries of various lengths + responses truncated after a first EOS at various places."""
    g = torch.Generator().manual_seed(seed)
    pad = tok.pad_token_id
    q = torch.randint(1, 61, (n, QUERY_LEN), generator=g)
    r = torch.randint(1, 61, (n, RESP_LEN), generator=g)
    for i in range(n):
        q[i, : i % 5] = pad
        if i % 3:
            r[i, (2 * i) % RESP_LEN] = tok.eos_token_id
    r = ppo.truncate_response(r, tok.eos_token_id, pad)
    return q, r, torch.cat([q, r], 1)


# ------------------------------------------------------------------------------------------------------------
# pure functions
# ------------------------------------------------------------------------------------------------------------
def test_detail21_truncate_after_first_eos():
    """Detail 21: every token after the first EOS becomes [PAD]; the EOS is kept; no EOS -> unchanged;
    a sampled [PAD] ends the response there."""
    eos, pad = 0, 9
    r = torch.tensor([[5, 0, 6, 0, 7], [5, 6, 7, 8, 4], [0, 3, 3, 3, 3], [5, 9, 6, 0, 7]])
    out = ppo.truncate_response(r, eos, pad)
    assert out.tolist() == [[5, 0, 9, 9, 9], [5, 6, 7, 8, 4], [0, 9, 9, 9, 9], [5, 9, 9, 9, 9]]
    s = ppo.first_true_indices(out == pad) - 1
    assert s.tolist() == [1, 4, 0, 0]
    assert ppo.first_true_indices(torch.tensor([[False, False], [False, True]])).tolist() == [2, 1]


def test_detail22_temperature_scaling():
    """Detail 22: logprobs come from logits / (T + 1e-7); T = 1 gives the raw log-softmax."""
    torch.manual_seed(0)
    logits, tokens = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    for t in (0.7, 1.0):
        expect = torch.log_softmax(logits / (t + 1e-7), -1).gather(-1, tokens[..., None])[..., 0]
        torch.testing.assert_close(ppo.logprobs_from_logits(logits, tokens, t), expect, rtol=0, atol=1e-5)
    assert not torch.allclose(ppo.logprobs_from_logits(logits, tokens, 0.7), ppo.logprobs_from_logits(logits, tokens, 1.0))
    ent = ppo.entropy_from_logits(logits, 0.7)
    p = torch.softmax(logits / 0.7, -1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1), rtol=0, atol=1e-5)


def test_detail24_masks_invalid_logprob_and_values():
    """Detail 24: logprobs after s are INVALID_LOGPROB (1.0), values after s + 1 are 0."""
    assert ppo.INVALID_LOGPROB == 1.0
    s = torch.tensor([0, 2, 4])
    pm, pm1 = ppo.padding_masks(s, 5)
    assert pm.int().tolist() == [[0, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]
    assert pm1.int().tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]]


def test_detail23_missing_eos_penalty():
    """Detail 23: no EOS -> score replaced by -1 (default), or -1 added ('add'), or untouched ('none')."""
    scores, has_eos = torch.tensor([2.0, 3.0, -0.5]), torch.tensor([True, False, False])
    assert ppo.apply_missing_eos_penalty(scores, has_eos, "replace", -1.0).tolist() == [2.0, -1.0, -1.0]
    assert ppo.apply_missing_eos_penalty(scores, has_eos, "add", -1.0).tolist() == [2.0, 2.0, -1.5]
    assert ppo.apply_missing_eos_penalty(scores, has_eos, "none", -1.0).tolist() == [2.0, 3.0, -0.5]
    assert ppo.Args().missing_eos_penalty == "replace" and ppo.Args().penalty_reward_value == -1.0
    with pytest.raises(ValueError, match="missing_eos_penalty"):
        ppo.apply_missing_eos_penalty(scores, has_eos, "bogus", -1.0)


def test_detail25_per_token_reward_score_placement():
    """Detail 25: reward = -beta * (logprob - ref_logprob) per token; the score at s + 1 when it exists (else s),
    or at s with score_placement='eos'."""
    R, beta = 5, 0.05
    s = torch.tensor([1, 4, 3])  # s + 1 exists for rows 0 and 2; row 1 ends at the last slot
    pm, _ = ppo.padding_masks(s, R)
    torch.manual_seed(0)
    lp = torch.randn(3, R).masked_fill(pm, ppo.INVALID_LOGPROB)
    ref = torch.randn(3, R).masked_fill(pm, ppo.INVALID_LOGPROB)
    scores = torch.tensor([10.0, 20.0, 30.0])
    rewards, kl, nsr = ppo.per_token_rewards(lp, ref, scores, s, beta, "after_eos")
    torch.testing.assert_close(kl, lp - ref)
    assert (kl[pm] == 0).all()  # padding contributes exactly 0 KL
    expect = -beta * (lp - ref)
    expect[0, 2] += 10.0
    expect[1, 4] += 20.0
    expect[2, 4] += 30.0
    torch.testing.assert_close(rewards, expect)
    rewards_eos, _, _ = ppo.per_token_rewards(lp, ref, scores, s, beta, "eos")
    expect = -beta * (lp - ref)
    expect[0, 1] += 10.0
    expect[1, 4] += 20.0
    expect[2, 3] += 30.0
    torch.testing.assert_close(rewards_eos, expect)
    assert ppo.Args().score_placement == "after_eos" and ppo.Args().kl_coef == 0.05


def _loop_whiten(xs, shift_mean=True):
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / n  # Detail 27: population variance
    return [(x - mean) / math.sqrt(var + 1e-8) + (0 if shift_mean else mean) for x in xs]


def test_detail26_27_gae_and_whitening_against_loop():
    """Detail 27 (and 26's whitening): GAE (gamma 1, lambda 0.95) backward, returns = A + V, advantages whitened
    over valid positions and 0 at padding, checked against plain python loops."""
    torch.manual_seed(0)
    B, R, gamma, lam = 3, 6, 1.0, 0.95
    s = torch.tensor([2, 5, 0])
    pm, pm1 = ppo.padding_masks(s, R)
    rewards = torch.randn(B, R).masked_fill(pm1, 0.0)
    values = torch.randn(B, R).masked_fill(pm1, 0.0)
    adv, ret = ppo.compute_advantages(rewards, values, pm, gamma, lam)
    raw = [[0.0] * R for _ in range(B)]
    for b in range(B):
        last = 0.0
        for t in range(R - 1, -1, -1):
            nv = values[b, t + 1].item() if t + 1 < R else 0.0
            delta = rewards[b, t].item() + gamma * nv - values[b, t].item()
            last = delta + gamma * lam * last
            raw[b][t] = last
    torch.testing.assert_close(ret, torch.tensor(raw) + values, rtol=1e-5, atol=1e-5)
    valid = [(b, t) for b in range(B) for t in range(R) if t <= s[b]]
    white = _loop_whiten([raw[b][t] for b, t in valid])
    expect = torch.zeros(B, R)
    for (b, t), w in zip(valid, white):
        expect[b, t] = w
    torch.testing.assert_close(adv, expect, rtol=1e-4, atol=1e-5)
    # reward whitening (Detail 26, off by default) keeps the mean
    x = torch.randn(B, R)
    got = ppo.masked_whiten(x, ~pm1, shift_mean=False)
    valid1 = [(b, t) for b in range(B) for t in range(R) if t <= s[b] + 1]
    for (b, t), w in zip(valid1, _loop_whiten([x[b, t].item() for b, t in valid1], shift_mean=False)):
        assert abs(got[b, t].item() - w) < 1e-4
    assert ppo.Args().whiten_rewards is False and ppo.Args().gamma == 1.0 and ppo.Args().lam == 0.95


def test_detail27_whitening_uses_population_variance_hand_computed():
    """Detail 27 / 26: whitening divides by sqrt(biased variance + 1e-8) of the valid entries (as released)."""
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0, 100.0]])
    mask = torch.tensor([[True, True, True, True, False]])  # the last entry is padding: ignored
    # mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5 (the unbiased one would be 14 / 3)
    expect = torch.tensor([-2.0, -1.0, 0.0, 3.0]) / math.sqrt(3.5 + 1e-8)
    torch.testing.assert_close(ppo.masked_whiten(x, mask)[0, :4], expect)
    torch.testing.assert_close(ppo.masked_whiten(x, mask, shift_mean=False)[0, :4], expect + 3.0)
    adv, _ = ppo.compute_advantages(x[:, :4].flip(1), torch.zeros(1, 4), ~mask[:, :4], 1.0, 0.0)  # lambda 0: A = r
    torch.testing.assert_close(adv[0], expect.flip(0))


def test_detail28_clipped_losses_hand_computed():
    """Detail 28: policy loss max(-A r, -A clip(r, 0.8, 1.2)), value loss 0.5 max((v-R)^2, (v_clip-R)^2),
    total = pg + 0.1 vf, masked means, on hand-computed numbers."""
    lp_old = torch.zeros(1, 3)
    lp_new = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1.0 (the last one masked out)
    adv = torch.tensor([[1.0, 1.0, 7.0]])
    pm = torch.tensor([[False, False, True]])
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5  -> mean -0.85
    v_old, v_new, ret = torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.1, 5.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    pm1 = torch.tensor([[False, False, True]])
    # token 0: v 1.0 -> clipped 0.2: max(1.0, 0.04) = 1.0; token 1: v 0.1 (unclipped) max(0.81, 0.81) = 0.81
    loss, st = ppo.ppo_losses(lp_new, lp_old, adv, v_new, v_old, ret, pm, pm1, 0.2, 0.2, 0.1)
    assert abs(st["loss/policy"].item() - (-0.85)) < 1e-6
    assert abs(st["loss/value"].item() - 0.5 * (1.0 + 0.81) / 2) < 1e-6
    assert abs(loss.item() - (-0.85 + 0.1 * 0.5 * 1.81 / 2)) < 1e-6
    assert abs(st["policy/clipfrac"].item() - 0.5) < 1e-6  # token 0 clipped, token 1 not
    assert abs(st["val/clipfrac"].item() - 0.0) < 1e-6
    assert abs(st["val/ratio"].item() - 1.0) < 1e-6 and abs(st["val/ratio_max"].item() - 1.5) < 1e-6
    a = ppo.Args()
    assert (a.cliprange, a.cliprange_value, a.vf_coef) == (0.2, 0.2, 0.1)


def test_detail8_29_defaults_batch_arithmetic_and_errors():
    """Detail 8 (lr 3e-6, AdamW eps 1e-5) and Detail 29: 512 episodes / update on 8 GPUs = 8 x 16 x 4 (1B), 8 x 4 x 16 (2.8B), 8 x 1 x 64 (6.9B);
    1,953 updates; inconsistent sizes are rejected naming what does not divide."""
    for preset, micro, ga, fwd in (("paper", 16, 4, 64), ("paper-2.8b", 4, 16, 32), ("paper-6.9b", 1, 64, 4)):
        a = ppo.parse_args(["--preset", preset])
        sz = ppo.batch_arithmetic(a, 8)
        assert (a.per_device_train_batch_size, sz.gradient_accumulation_steps, a.local_rollout_forward_batch_size) == (micro, ga, fwd)
        assert sz.num_updates == 1953 and sz.local_batch_size == 64
    a = ppo.parse_args([])
    assert (a.lr, a.eps, a.num_ppo_epochs, a.num_mini_batches, a.temperature, a.response_length) == (3e-6, 1e-5, 4, 1, 0.7, 53)
    with pytest.raises(ValueError, match=r"batch_size \(512\) does not divide .*num_processes \(3\)"):
        ppo.batch_arithmetic(a, 3)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps \(8\) is inconsistent"):
        ppo.batch_arithmetic(ppo.parse_args(["--gradient_accumulation_steps", "8"]), 8)
    with pytest.raises(ValueError, match="local_rollout_forward_batch_size"):
        ppo.batch_arithmetic(ppo.parse_args(["--local_rollout_forward_batch_size", "48"]), 8)
    with pytest.raises(ValueError, match="preset"):
        ppo.parse_args(["--preset", "nope"])


def test_detail9_linear_lr_schedule():
    """Detail 9: lr at update u of U is (1 - (u - 1) / U) * lr, as produced by the LambdaLR used in the loop."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=3e-6)
    U = 7
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda done: 1.0 - done / U)
    for u in range(1, U + 1):
        assert abs(sched.get_last_lr()[0] - (1 - (u - 1) / U) * 3e-6) < 1e-15
        opt.step()
        sched.step()


def test_detail10_local_seed_and_data_slices():
    """Detail 10 (data side): every process computes the same global batch of query indices (seeded with the
    run seed), takes its own slice, and a resumed run recomputes the same indices from the update number."""
    a = ppo.update_batch_indices(3, 100, 16, seed=1)
    assert torch.equal(a, ppo.update_batch_indices(3, 100, 16, seed=1))
    assert len(set(a.tolist())) == 16
    first_pass = torch.cat([ppo.update_batch_indices(u, 100, 16, seed=1) for u in range(6)])
    assert len(set(first_pass.tolist())) == 96  # no query repeats within a pass over the data


# ------------------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------------------
def test_detail7_dropout_off(task):
    """Detail 7: after loading, dropout is 0 everywhere: two forwards in train mode are identical."""
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    m = GPTNeoXForCausalLM(tiny_config(dropout=0.5)).train()
    x = torch.randint(1, 60, (2, 10))
    assert not torch.equal(m(x).logits, m(x).logits)  # dropout really is on before
    ppo.disable_dropout(m)
    assert torch.equal(m(x).logits, m(x).logits)
    assert m.config.hidden_dropout == 0.0 and m.config.attention_dropout == 0.0
    rm = make_rm(m)
    rm.config.base_config["hidden_dropout"] = 0.5
    ppo.disable_dropout(rm.train())
    assert torch.equal(rm(input_ids=x), rm(input_ids=x)) and rm.config.base_config["hidden_dropout"] == 0.0


def test_detail3_11_logprobs_padded_batch_equal_alone(models):
    """Detail 3 and 11: logprobs (and values) of a left-padded batch with right padding after EOS equal those
    of each sequence run alone without any padding."""
    tok, policy, rm = models
    pad = tok.pad_token_id
    q, r, qr = random_query_responses(tok)
    with torch.no_grad():
        logits = ppo.policy_response_logits(policy, qr, pad, QUERY_LEN)
        lp = ppo.logprobs_from_logits(logits, r, 0.7)
        values = ppo.PolicyAndValue(policy, rm)(qr, pad, QUERY_LEN)[1]
        for i in range(qr.size(0)):
            qi, ri = q[i][q[i] != pad], r[i][r[i] != pad]
            alone = torch.cat([qi, ri])[None]
            la = policy(input_ids=alone).logits[0, len(qi) - 1 : -1]
            lpa = ppo.logprobs_from_logits(la, ri, 0.7)
            torch.testing.assert_close(lp[i, : len(ri)], lpa, rtol=0, atol=1e-5)
            va = rm(input_ids=alone)[0, len(qi) - 1 : -1]
            torch.testing.assert_close(values[i, : len(ri)], va, rtol=0, atol=1e-5)
            assert torch.isfinite(lp[i]).all()


def test_detail15_reward_read_at_last_real_token(models):
    """Detail 15: the score is the RM output at the last non-pad token (the EOS), equal to running alone."""
    tok, _, rm = models
    pad = tok.pad_token_id
    q, r, qr = random_query_responses(tok)
    scores = ppo.reward_scores(rm, qr, pad, QUERY_LEN)
    with torch.no_grad():
        for i in range(qr.size(0)):
            alone = torch.cat([q[i][q[i] != pad], r[i][r[i] != pad]])[None]
            assert abs(scores[i].item() - rm(input_ids=alone)[0, -1].item()) < 1e-5


def test_detail14_19_loads_reward_py_checkpoint(task, tmp_path):
    """Detail 14/19: ppo.py's ScalarModel copy loads what reward.py saves (same keys, same config), and the value
    and reward models are separate networks from the RM checkpoint."""
    sft_dir, rm_dir, _ = task
    reward = pytest.importorskip("reward")
    theirs = reward.ScalarModel.from_sft(sft_dir)
    theirs.save_pretrained(str(tmp_path / "rm"))
    mine = ppo.load_scalar_model(str(tmp_path / "rm"))
    assert set(mine.state_dict()) == set(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(mine.state_dict()[k], v), k
    x = torch.randint(1, 60, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(mine(input_ids=x), theirs.eval()(input_ids=x))
    assert type(mine.config).model_type == type(theirs.config).model_type
    v, rmod = ppo.load_scalar_model(rm_dir), ppo.load_scalar_model(rm_dir)
    assert v.scalar_head.weight.data_ptr() != rmod.scalar_head.weight.data_ptr()


def test_detail20_11_generate_exact_length_positions(models):
    """Detail 20 / SPEC generation: exactly R new tokens even after EOS is sampled (eos_token_id=None), and the
    logits generate uses under left padding equal a forward with Detail 11 positions."""
    from transformers import GenerationConfig

    tok, policy, _ = models
    pad = tok.pad_token_id
    q, _, _ = random_query_responses(tok)
    gc = GenerationConfig(max_new_tokens=RESP_LEN, temperature=0.7, top_k=0, top_p=1.0, do_sample=True,
                          eos_token_id=None, pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
    torch.manual_seed(0)
    mask = q != pad
    out = policy.generate(input_ids=q.masked_fill(~mask, 0), attention_mask=mask, generation_config=gc)
    seq = out.sequences
    assert seq.shape == (q.size(0), QUERY_LEN + RESP_LEN)
    resp = seq[:, QUERY_LEN:]
    eos_pos = ppo.first_true_indices(resp == 0)
    assert (eos_pos < RESP_LEN - 1).any()  # EOS was sampled ...
    after_eos = torch.arange(RESP_LEN)[None] > eos_pos[:, None]
    assert ((resp != pad) & after_eos).any()  # ... and generation went on after it (real tokens, not pads)
    qr = torch.cat([q, resp], 1)
    with torch.no_grad():
        logits = ppo.forward(policy, qr, pad).logits[:, QUERY_LEN - 1 : -1]
    gen_logits = torch.stack(out.logits, 1)
    keep = resp != pad  # a sampled [PAD] is masked by the forward (it ends the response, Detail 21)
    first_pad = ppo.first_true_indices(~keep)
    for i in range(q.size(0)):
        n = first_pad[i].item() + 1
        torch.testing.assert_close(logits[i, :n], gen_logits[i, :n].float(), rtol=0, atol=1e-4)
    # ppo.generate returns query + exactly R tokens too
    torch.manual_seed(0)
    gc2 = GenerationConfig(max_new_tokens=RESP_LEN, temperature=0.7, top_k=0, top_p=1.0, do_sample=True,
                           eos_token_id=None, pad_token_id=pad)
    assert ppo.generate(policy, q, pad, gc2).shape == (q.size(0), QUERY_LEN + RESP_LEN)


# ------------------------------------------------------------------------------------------------------------
# end to end (subprocesses)
# ------------------------------------------------------------------------------------------------------------
def ppo_cmd(task, out_dir, *extra, launcher=None):
    sft_dir, rm_dir, data_dir = task
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, "ppo.py"), "--preset", "embedded",
                                            "--sft_model_path", sft_dir, "--reward_model_path", rm_dir,
                                            "--dataset_path", data_dir, "--output_dir", str(out_dir),
                                            "--response_length", str(RESP_LEN), "--total_episodes", "64",
                                            "--total_batch_size", "16", "--per_device_train_batch_size", "4",
                                            "--num_mini_batches", "2", "--local_rollout_forward_batch_size", "4",
                                            "--eval_every", "2", "--save_every", "2", "--no-eval-at-start",
                                            "--num_eval_samples", "8", "--eval_batch_size", "4", "--num_threads", "1",
                                            "--lr", "1e-3", "--no-save-model"]
    return cmd + list(extra)


def run(cmd, expect_rc=0, timeout=240, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", **(env or {})}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == expect_rc, f"rc {p.returncode}\nSTDOUT\n{p.stdout[-3000:]}\nSTDERR\n{p.stderr[-5000:]}"
    return p


def read_jsonl(path):
    return [json.loads(l) for l in open(path)]


TIMING_KEYS = ("eps", "time/", "episodes_per_second")


def strip_timing(d):
    return {k: v for k, v in d.items() if not k.startswith(TIMING_KEYS)}


@pytest.fixture(scope="module")
def full_run(task, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_full")
    run(ppo_cmd(task, out))
    return out


def test_detail13_31_end_to_end_metrics_eval_samples(full_run):
    """Detail 13/31: a short run evaluates near-greedy samples (T 0.01) periodically and at the end; it writes args.json, metrics.jsonl (one record per update with the documented keys),
    eval_samples.jsonl (SPEC schema) and metrics.json with the keys quickstart reads (Detail 9, 19-31)."""
    recs = read_jsonl(full_run / "metrics.jsonl")
    assert [r["update"] for r in recs] == [1, 2, 3, 4]
    for key in ("objective/scores", "objective/rm_scores", "objective/non_eos_rate", "objective/kl", "objective/kl_k3",
                "objective/entropy", "loss/policy", "loss/value", "policy/clipfrac", "val/clipfrac",
                "policy/approxkl", "val/ratio", "val/ratio_std", "val/ratio_max", "objective/response_length", "lr",
                "episodes", "eps", "time/generation", "time/rollout_forward", "time/training", "policy/entropy"):
        assert key in recs[0] and math.isfinite(recs[0][key]), key
    # Detail 9: linear decay, lr_u = (1 - (u - 1) / U) * lr
    assert [round(r["lr"], 12) for r in recs] == [round(1e-3 * (1 - u / 4), 12) for u in range(4)]
    assert [r["episodes"] for r in recs] == [16, 32, 48, 64]
    # Detail 19/25: at the first rollout policy == reference, so the KL is exactly 0
    assert recs[0]["objective/kl"] == 0.0 and recs[0]["objective/kl_k3"] == 0.0
    # the policy moved away from the reference afterwards
    assert recs[-1]["objective/kl"] != 0.0
    assert "eval/rm_score" in recs[1] and "eval/rm_score" in recs[3] and "eval/rm_score" not in recs[0]
    final = json.load(open(full_run / "metrics.json"))
    for key in ("final_kl", "final_score", "episodes_per_second", "eval_rm_score"):
        assert key in final and math.isfinite(final[key])
    assert final["final_kl"] == recs[-1]["objective/kl"]
    rows = read_jsonl(full_run / "eval_samples.jsonl")
    assert len(rows) == 8
    for key in ("id", "query", "response", "reference", "response_token_len", "reference_token_len", "score"):
        assert key in rows[0]
    assert all("<|endoftext|>" not in r["response"] and "[PAD]" not in r["response"] for r in rows)
    args = json.load(open(full_run / "args.json"))
    assert args["gradient_accumulation_steps"] == 2 and args["num_updates"] == 4
    assert args["eval_temperature"] == 0.01 and args["temperature"] == 0.7
    assert all(r["response_token_len"] <= RESP_LEN for r in rows)


def test_detail30_deepspeed_configs():
    """Detail 30: ZeRO-2 bf16 accelerate config for the trained models; reference and reward models as inference
    engines, ZeRO-3 with CPU parameter offload under --offload (the 6.9B preset turns it on)."""
    import yaml

    z2 = yaml.safe_load(open(os.path.join(ROOT, "deepspeed_zero2.yaml")))
    assert z2["distributed_type"] == "DEEPSPEED" and z2["mixed_precision"] == "bf16"
    assert z2["deepspeed_config"]["zero_stage"] == 2 and z2["deepspeed_config"]["gradient_clipping"] == 0.0
    z3 = yaml.safe_load(open(os.path.join(ROOT, "deepspeed_zero3.yaml")))
    assert z3["deepspeed_config"]["zero_stage"] == 3
    off = ppo.inference_ds_config(offload=True, bf16=True)
    assert off["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}} and off["bf16"]["enabled"]
    assert ppo.inference_ds_config(offload=False, bf16=True)["zero_optimization"]["stage"] == 0
    assert ppo.parse_args(["--preset", "paper-6.9b"]).offload and not ppo.parse_args([]).offload


def test_detail19_28_ratio_exactly_one_first_minibatch(full_run):
    """Detail 7/19/28: with dropout off, the first minibatch of the first PPO epoch recomputes the rollout's
    logprobs exactly: importance ratio exactly 1 (and the rollout KL to the identical reference exactly 0)."""
    recs = read_jsonl(full_run / "metrics.jsonl")
    assert recs[0]["debug/first_minibatch_ratio_dev"] == 0.0
    assert recs[0]["objective/kl"] == 0.0


def test_resume_after_kill_equals_uninterrupted(task, full_run, tmp_path):
    """Checkpoint + --resume: a run killed right after the checkpoint of update 2 (exit 17, like a SIGKILL: no
    cleanup) and resumed gives the same final metrics and per-update metrics as the uninterrupted run."""
    out = tmp_path / "killed"
    run(ppo_cmd(task, out, "--debug_stop_after_update", "2"), expect_rc=17)
    assert len(read_jsonl(out / "metrics.jsonl")) == 2
    ckpt = ppo.latest_checkpoint(str(out))
    assert ckpt.endswith("update_000002")
    state = json.load(open(os.path.join(ckpt, "trainer_state.json")))
    assert state["update"] == 2 and state["data_position"] == 32
    run(ppo_cmd(task, out, "--resume"))
    a, b = read_jsonl(full_run / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [strip_timing(r) for r in a] == [strip_timing(r) for r in b]
    fa, fb = json.load(open(full_run / "metrics.json")), json.load(open(out / "metrics.json"))
    assert strip_timing(fa) == strip_timing(fb)
    assert read_jsonl(full_run / "eval_samples.jsonl") == read_jsonl(out / "eval_samples.jsonl")


def test_nonfinite_loss_stops_with_checkpoint(task, tmp_path):
    """A non-finite loss stops the run before the optimizer step with a clear message and a checkpoint."""
    p = run(ppo_cmd(task, tmp_path, "--debug_nan_at_update", "2"), expect_rc=1)
    assert "non-finite loss at update 2" in p.stderr
    assert os.path.isfile(tmp_path / "checkpoints" / "nonfinite_update_000002" / "trainer_state.json")


def test_detail29_bad_batch_arithmetic_fails_at_startup(task, tmp_path):
    """Detail 29: main() rejects inconsistent sizes before loading anything, naming the sizes."""
    argv = ppo_cmd(task, tmp_path, "--total_batch_size", "20")[2:]
    with pytest.raises(ValueError, match=r"batch_size \(20\) does not divide .*per_device_train_batch_size \(4\)"):
        ppo.main(ppo.parse_args(argv))
    assert not os.path.exists(tmp_path / "args.json")


def test_detail10_two_processes_gloo(task, tmp_path):
    """Multi-process on CPU: `accelerate launch --multi_gpu --num_processes 2` (gloo) runs, statistics are gathered,
    and the two ranks sample with different seeds (Detail 10: seed + rank * 100003) -> different RNG states."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                str(29500 + os.getpid() % 1000)]
    # 2 processes x micro-batch 4 x 2 minibatches x 2 accumulation steps = 32 episodes per update
    out = tmp_path / "run"
    # One run, no rerun: the ranks end without interpreter finalization (exit_without_finalization), where a gloo
    # worker thread that torch keeps alive after destroy_process_group could abort a rank. An atexit hook in every
    # rank (sitecustomize) would only run in that finalization: it must not run.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "if 'RANK' in os.environ:\n"
        f"    atexit.register(lambda: open(os.path.join({str(tmp_path)!r}, 'finalized_' + os.environ['RANK']), 'w').close())\n")
    env = {"PYTHONPATH": os.pathsep.join([str(hook)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    p = run(ppo_cmd(task, out, "--total_episodes", "96", "--total_batch_size", "32", launcher=launcher), timeout=300, env=env)
    assert "terminate called" not in p.stderr
    assert not list(tmp_path.glob("finalized_*"))
    recs = read_jsonl(out / "metrics.jsonl")
    assert [r["update"] for r in recs] == [1, 2, 3]
    ckpt = out / "checkpoints" / "update_000002"
    states = [torch.load(ckpt / f"random_states_{r}.pkl", weights_only=False) for r in (0, 1)]
    assert not torch.equal(states[0]["torch_manual_seed"], states[1]["torch_manual_seed"])
    assert recs[0]["objective/kl"] == 0.0
    args = json.load(open(out / "args.json"))
    assert args["num_processes"] == 2 and args["gradient_accumulation_steps"] == 2
    assert len(read_jsonl(out / "eval_samples.jsonl")) == 8
    final = json.load(open(out / "metrics.json"))
    assert math.isfinite(final["final_kl"])


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps its state per process: a run with another mixed precision needs a fresh one (and leaves one)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_bf16_autocast_path_on_cpu_and_test_split(task, tmp_path, monkeypatch, fresh_accelerate_state):
    """The bf16 branch (taken under CUDA) run on CPU with --bf16_on_cpu: rollout and training forwards under bf16
    autocast, log-probabilities (log-softmax) in fp32, finite losses, a saved policy that loads; --split test
    evaluates on the test split's queries."""
    seen = []
    original = ppo.logprobs_from_logits

    def recording(logits, tokens, temperature):
        out = original(logits, tokens, temperature)
        seen.append((logits.dtype, out.dtype))
        return out

    monkeypatch.setattr(ppo, "logprobs_from_logits", recording)
    out = tmp_path / "bf16"
    argv = ppo_cmd(task, out, "--bf16_on_cpu", "--split", "test", "--total_episodes", "32", "--save-model")[2:]
    ppo.main(ppo.parse_args(argv))
    # the reference policy's logits come straight from a bf16 autocast forward; every log-probability is fp32
    assert (torch.bfloat16, torch.float32) in seen and all(o == torch.float32 for _, o in seen)
    recs = read_jsonl(out / "metrics.jsonl")
    assert len(recs) == 2 and all(math.isfinite(r["loss/total"]) and math.isfinite(r["loss/policy"]) for r in recs)
    samples = read_jsonl(out / "eval_samples.jsonl")
    assert len(samples) == 4 and all(s["id"].startswith("p2") for s in samples)  # the 4 test rows (p20000...)
    tok = ppo.load_tokenizer(str(out))
    policy = ppo.load_policy(str(out), tok)
    assert policy.get_input_embeddings().weight.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in policy.parameters())
