"""Tests of reward.py (the reward-model stage) on a tiny random GPT-NeoX and a fake data set in the SPEC schema."""

import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import reward  # noqa: E402

torch.set_num_threads(1)

# fake task geometry (the embedded task uses 256 / 53 / 64; the paper 512 / 53 / 169)
QUERY_LEN, SFT_RESP_LEN, RM_RESP_LEN = 24, 10, 12
SFT_QR_LEN, RM_QR_LEN = QUERY_LEN + SFT_RESP_LEN, QUERY_LEN + RM_RESP_LEN
CHARS = list("abcdefghijklmnopqrstuvwxyz .,:;!?\nRTPSLD/()'-0123456789ABCEFGHIJKMNOQUVWXYZ")


def make_tokenizer(with_pad=True):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    vocab["?"] = len(vocab) if "?" not in vocab else vocab["?"]
    tk = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", unk_token="?")
    if with_pad:
        tok.add_special_tokens({"pad_token": "[PAD]"})
    return tok


def tiny_config(vocab_size=100):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128, hidden_dropout=0.1,
                         attention_dropout=0.1, classifier_dropout=0.1)


def make_sft_dir(path, seed=0):
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(seed)
    tok = make_tokenizer()
    model = GPTNeoXForCausalLM(tiny_config())
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return tok


def _pad_right(ids, n, pad):
    assert len(ids) <= n
    return ids + [pad] * (n - len(ids))


def make_dataset_dir(path, tok, n_train=96, n_val=32, n_sft=40, seed=0, identical=0, cnndm=8):
    """A DatasetDict pair (sft/, preference/) + meta.json in the SPEC schema; the preference rule is learnable:
    the chosen summary is the longer one ('good' summaries carry more 'a' characters)."""
    from datasets import Dataset, DatasetDict

    rng = np.random.default_rng(seed)
    pad, eos = tok.pad_token_id, tok.eos_token_id

    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    def query_of(i):
        post = "".join(rng.choice(list("bcdfg hjk"), size=int(rng.integers(3, 8))))
        return post, f"SUBREDDIT: r/x\n\nTITLE: t{i % 10}\n\nPOST: {post}\n\nTL;DR:"

    def sft_rows(n, off):
        rows = []
        for i in range(n):
            post, q = query_of(off + i)
            qt = enc(q)[-QUERY_LEN:]
            summary = "".join(rng.choice(list("aaz"), size=int(rng.integers(2, 7))))
            rr = " " + summary + "<|endoftext|>"
            rt = enc(" " + summary) + [eos]
            rows.append(dict(id=f"s{off + i}", subreddit="x", title=f"t{i % 10}", post=post, summary=summary,
                             query=q, query_token=[pad] * (QUERY_LEN - len(qt)) + qt, reference_response=rr,
                             reference_response_token=_pad_right(rt, SFT_RESP_LEN, pad),
                             reference_response_token_len=len(rt), query_reference_response=q + rr,
                             query_reference_response_token=_pad_right(qt + rt, SFT_QR_LEN, pad),
                             query_reference_response_token_len=len(qt) + len(rt)))
        return rows

    def pref_rows(n, off, split, n_identical=0):
        rows = []
        pols = ["ppo_xl", "sup2", "ref"]
        for i in range(n):
            post, q = query_of(off + i)
            qt = enc(q)[-QUERY_LEN:]
            good = " " + "a" * int(rng.integers(4, 9))
            bad = " " + "z" * int(rng.integers(1, 4))
            if i < n_identical:
                bad = good
            c, r = good + "<|endoftext|>", bad + "<|endoftext|>"
            ct, rt = enc(good) + [eos], enc(bad) + [eos]
            p1, p2 = pols[i % 3], pols[(i + 1) % 3]
            rows.append(dict(id=f"p{off + i}", post=post, title=f"t{i % 10}", subreddit="x", query=q,
                             query_token=[pad] * (QUERY_LEN - len(qt)) + qt, chosen=c, rejected=r,
                             chosen_token=_pad_right(ct, RM_RESP_LEN, pad),
                             rejected_token=_pad_right(rt, RM_RESP_LEN, pad), chosen_token_len=len(ct),
                             rejected_token_len=len(rt), query_chosen_token=_pad_right(qt + ct, RM_QR_LEN, pad),
                             query_rejected_token=_pad_right(qt + rt, RM_QR_LEN, pad),
                             query_chosen_token_len=len(qt) + len(ct), query_rejected_token_len=len(qt) + len(rt),
                             choice=i % 2, chosen_policy=p1, rejected_policy=p2, policies=" vs ".join(sorted([p1, p2])),
                             confidence=int(i % 3) + 7 if split != "train" else -1, batch="b1", split=split,
                             worker="w"))
        return rows

    sft = DatasetDict({"train": Dataset.from_list(sft_rows(n_sft, 0)),
                       "validation": Dataset.from_list(sft_rows(16, 1000)),
                       "test": Dataset.from_list(sft_rows(8, 2000))})
    splits = {"train": Dataset.from_list(pref_rows(n_train, 0, "train", identical)),
              "validation": Dataset.from_list(pref_rows(n_val, 5000, "valid1"))}
    if cnndm:
        splits["validation_cnndm"] = Dataset.from_list(pref_rows(cnndm, 9000, "valid2"))
    pref = DatasetDict(splits)
    os.makedirs(path, exist_ok=True)
    sft.save_to_disk(os.path.join(path, "sft"))
    pref.save_to_disk(os.path.join(path, "preference"))
    meta = dict(query_length=QUERY_LEN, sft_response_length=SFT_RESP_LEN, sft_query_response_length=SFT_QR_LEN,
                rm_response_length=RM_RESP_LEN, rm_query_response_length=RM_QR_LEN, tokenizer="fake",
                pad_token_id=pad, eos_token_id=eos, source="fake", counts={}, dropped={})
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    return sft, pref


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    sft_dir, data_dir = str(root / "sft"), str(root / "dataset")
    tok = make_sft_dir(sft_dir)
    make_dataset_dir(data_dir, tok)
    return types.SimpleNamespace(root=root, sft=sft_dir, data=data_dir, tok=tok)


@pytest.fixture(scope="module")
def rm(fake_run):
    model = reward.ScalarModel.from_sft(fake_run.sft)
    reward.disable_dropout(model)
    return model


def _args(fake_run, out, **kw):
    return reward.Args(**{**vars(reward.PRESETS["embedded"]), "sft_model_path": fake_run.sft,
                          "dataset_path": fake_run.data, "output_dir": str(out), "total_batch_size": 16,
                          "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16,
                          "num_gold_samples": 8, "norm_num_samples": None, **kw})


# ------------------------------------------------------------------------------------------------ Detail 15 / 11
def test_detail15_reward_read_at_last_non_pad_token_left_and_right_padding(rm):
    """Detail 15 (and 11, 3): the reward is the head output at the last non-pad token whatever the padding side,
    and equals the reward of the same sequence without any padding."""
    pad = 99
    torch.manual_seed(0)
    seqs = [torch.randint(1, 60, (n,)) for n in (5, 9, 7)]
    unpadded = torch.stack([reward.get_reward(rm, s[None], pad)[0] for s in seqs])
    right = torch.stack([F.pad(s, (0, 12 - len(s)), value=pad) for s in seqs])
    left = torch.stack([F.pad(s, (12 - len(s), 0), value=pad) for s in seqs])
    both = torch.stack([F.pad(s, (2, 10 - len(s)), value=pad) for s in seqs])  # pads on both sides
    for ids in (right, left, both):
        assert torch.allclose(reward.get_reward(rm, ids, pad), unpadded, atol=1e-5)
    # the index used is the last non-pad position, never a pad position
    assert reward.last_non_pad_index(right != pad).tolist() == [4, 8, 6]
    assert reward.last_non_pad_index(left != pad).tolist() == [11, 11, 11]
    # and it equals the full per-token output at that index
    mask = right != pad
    vals = rm(input_ids=right.masked_fill(~mask, 0), attention_mask=mask.long(),
              position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    assert torch.allclose(reward.get_reward(rm, right, pad), vals[torch.arange(3), torch.tensor([4, 8, 6])])


def test_detail11_trim_padding_does_not_change_rewards(rm):
    """Detail 11/15: dropping all-pad columns (speed-up) leaves the rewards unchanged."""
    pad = 99
    ids = torch.tensor([[5, 6, 7, pad, pad, pad], [8, 9, pad, pad, pad, pad]])
    assert reward.trim_padding(ids, pad).shape == (2, 3)
    assert torch.allclose(reward.get_reward(rm, ids, pad), reward.get_reward(rm, reward.trim_padding(ids, pad), pad))


def test_detail3_all_pad_sequence_is_an_error(rm):
    """Detail 3/15: a sequence of pads has no reward position: clear error."""
    with pytest.raises(ValueError, match="only of pad"):
        reward.get_reward(rm, torch.tensor([[99, 99]]), 99)


# ------------------------------------------------------------------------------------------------ Detail 14
def test_detail14_head_init_std_and_zero_bias():
    """Detail 14: head weight ~ N(0, 1/sqrt(hidden+1)), bias 0 (checked statistically on a wide head)."""
    torch.manual_seed(0)
    hidden = 4095
    head = torch.nn.Linear(hidden, 1)
    reward.init_reward_head(head)
    w = head.weight.detach().flatten()
    expected = 1 / math.sqrt(hidden + 1)
    assert abs(w.std().item() / expected - 1) < 0.05  # sampling error of the std ~ 1/sqrt(2n) = 1.1%
    assert abs(w.mean().item()) < 4 * expected / math.sqrt(hidden)
    assert head.bias.item() == 0.0


def test_detail14_scalar_model_from_sft_uses_trunk_and_inits_head(fake_run):
    """Detail 14: the RM trunk carries the SFT weights; the head is freshly initialised (bias 0)."""
    from transformers import AutoModelForCausalLM

    sft = AutoModelForCausalLM.from_pretrained(fake_run.sft)
    model = reward.ScalarModel.from_sft(fake_run.sft)
    assert torch.equal(model.trunk.embed_in.weight, sft.gpt_neox.embed_in.weight)
    assert torch.equal(model.trunk.layers[1].mlp.dense_4h_to_h.weight, sft.gpt_neox.layers[1].mlp.dense_4h_to_h.weight)
    assert model.scalar_head.bias.item() == 0.0
    assert model.scalar_head.weight.shape == (1, 32)


# ------------------------------------------------------------------------------------------------ Detail 16
def test_detail16_pairwise_loss_hand_computed():
    """Detail 16: loss = mean(-logsigmoid(rc - rr)), accuracy = share of rc > rr."""
    rc = torch.tensor([2.0, 0.0, -1.0])
    rr = torch.tensor([1.0, 0.0, 1.0])
    loss, acc = reward.pairwise_loss(rc, rr)
    # -log(sigmoid(1)) = log(1 + e^-1); -log(sigmoid(0)) = log 2; -log(sigmoid(-2)) = log(1 + e^2)
    expected = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(2))) / 3
    assert abs(loss.item() - expected) < 1e-6
    assert abs(acc.item() - 1 / 3) < 1e-7


def test_detail16_chosen_and_rejected_in_one_forward(rm):
    """Detail 16: chosen and rejected rows go through a single forward; results equal separate forwards."""
    pad = 99
    calls = []
    handle = rm.register_forward_hook(lambda m, i, o: calls.append(1))
    chosen = torch.tensor([[1, 2, 3, pad], [4, 5, 6, 7]])
    rejected = torch.tensor([[1, 2, pad, pad, pad], [4, 5, 9, pad, pad]])
    try:
        rc, rr = reward.forward_pair(rm, chosen, rejected, pad)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert torch.allclose(rc, reward.get_reward(rm, chosen, pad), atol=1e-5)
    assert torch.allclose(rr, reward.get_reward(rm, rejected, pad), atol=1e-5)


def test_detail16_shared_prefix_forward_equals_full_sequences(rm):
    """Detail 16, the shared-prefix forward: a pair's common query (and common opening) runs once, the two remainders
    with its key/value cache. Rewards AND gradients equal those of the two full sequences run separately, for pairs
    that share a query of varying length, a common first response word, or nothing at all (the plain fallback)."""
    pad, gen = 99, torch.Generator().manual_seed(0)
    rows_c, rows_r = [], []
    for q_len, common, len_c, len_r in [(7, 0, 3, 5), (3, 2, 4, 4), (11, 1, 2, 6), (5, 0, 1, 1)]:
        q = torch.randint(1, 60, (q_len,), generator=gen).tolist()
        opening = torch.randint(1, 60, (common,), generator=gen).tolist()
        c = opening + torch.randint(60, 80, (len_c,), generator=gen).tolist()  # the responses differ after `common`
        r = opening + torch.randint(80, 98, (len_r,), generator=gen).tolist()
        rows_c.append(q + c), rows_r.append(q + r)
    width = max(map(len, rows_c + rows_r)) + 2
    chosen = torch.tensor([x + [pad] * (width - len(x)) for x in rows_c])
    rejected = torch.tensor([x + [pad] * (width - 1 - len(x)) for x in rows_r])  # another width than chosen

    def grads(fn):
        rm.zero_grad()
        rc, rr = fn()
        (rc.sum() - 2 * rr.sum()).backward()
        return rc.detach(), rr.detach(), [p.grad.clone() for p in rm.parameters() if p.grad is not None]

    def separate():
        return reward.get_reward(rm, chosen, pad), reward.get_reward(rm, rejected, pad)

    rm.train()
    try:
        sc, sr, s_grads = grads(separate)
        pc, pr, p_grads = grads(lambda: reward.forward_pair(rm, chosen, rejected, pad))
        no_query = (torch.tensor([[5, 6, pad], [7, 8, 9]]), torch.tensor([[6, 6, 6], [7, 1, pad]]))  # row 0: none in common
        fc, fr = reward.forward_pair(rm, *no_query, pad)
    finally:
        rm.zero_grad()
        rm.eval()
    assert torch.allclose(pc, sc, atol=1e-5) and torch.allclose(pr, sr, atol=1e-5)
    assert len(p_grads) == len(s_grads) == len(list(rm.parameters()))
    for a, b in zip(p_grads, s_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert torch.allclose(fc, reward.get_reward(rm, no_query[0], pad), atol=1e-5)
    assert torch.allclose(fr, reward.get_reward(rm, no_query[1], pad), atol=1e-5)
    with pytest.raises(ValueError, match="right-padded"):  # a left-padded row would be split at the wrong column
        reward.forward_pair(rm, torch.tensor([[pad, 1, 2]]), torch.tensor([[1, 3, pad]]), pad)


def test_detail16_query_lens_forward_runs_each_query_and_summary_once(rm):
    """forward_pair with query_lens (--group_pairs_by_post): the pairs of one post (all pairs of its 3 samples, one
    repeated pair) and of another post in one micro-batch give the rewards and gradients of the full sequences; the
    model sees each distinct query once and each distinct (query, summary) once; bad query_lens are refused."""
    pad, gen = 99, torch.Generator().manual_seed(1)
    qa, qb = torch.randint(1, 60, (9,), generator=gen).tolist(), torch.randint(1, 60, (4,), generator=gen).tolist()
    sa = [[61, 62, 63], [61, 64], [70, 71, 72, 73]]  # post a's samples; the first two share an opening word
    sb = [[80, 81], [82]]
    pairs = [(qa, sa[0], sa[1]), (qa, sa[0], sa[2]), (qa, sa[2], sa[1]), (qb, sb[0], sb[1]), (qa, sa[0], sa[1])]
    width = 16
    row = lambda q, x: q + x + [pad] * (width - len(q) - len(x))  # noqa: E731
    chosen = torch.tensor([row(q, c) for q, c, _ in pairs])
    rejected = torch.tensor([row(q, r) for q, _, r in pairs])
    query_lens = torch.tensor([len(q) for q, _, _ in pairs])
    seen = []
    handle = rm.trunk.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["input_ids"].shape),
                                            with_kwargs=True)
    rm.train()
    try:
        rm.zero_grad()
        pc, pr = reward.forward_pair(rm, chosen, rejected, pad, query_lens)
        (pc.sum() - 2 * pr.sum()).backward()
        p_grads = [p.grad.clone() for p in rm.parameters()]
        handle.remove()
        rm.zero_grad()
        sc, sr = reward.get_reward(rm, chosen, pad), reward.get_reward(rm, rejected, pad)
        (sc.sum() - 2 * sr.sum()).backward()
        s_grads = [p.grad.clone() for p in rm.parameters()]
    finally:
        handle.remove()
        rm.zero_grad()
        rm.eval()
    assert torch.allclose(pc, sc, atol=1e-5) and torch.allclose(pr, sr, atol=1e-5)
    for a, b in zip(p_grads, s_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert [shape[0] for shape in seen] == [2, 5]  # 2 queries, then 3 + 2 distinct summaries (of 10 sequences)
    with pytest.raises(ValueError, match="query_lens"):
        reward.forward_pair(rm, chosen, rejected, pad, query_lens + 2)  # would cut into a summary
    with pytest.raises(ValueError, match="query_lens must"):
        reward.forward_pair(rm, chosen, rejected, pad, torch.full_like(query_lens, 0))


def test_post_batches_keep_posts_together_and_each_pair_once():
    """--group_pairs_by_post's sampler: a post's pairs come in a row, every pair at most once an epoch (the remainder
    past the last full update dropped), the order a function of (seed, epoch)."""
    posts = [f"p{i % 7}" for i in range(40)]  # 7 posts of 5-6 pairs, interleaved in the file
    sampler = reward.PostBatches(posts, batch_size=4, per_update=2, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 10 and all(len(b) == 4 for b in batches)
    rows = [r for b in batches for r in b]
    assert sorted(rows) == list(range(40))  # 40 pairs = 5 updates of 8: every pair once, none dropped
    runs = [posts[r] for i, r in enumerate(rows) if i == 0 or posts[r] != posts[rows[i - 1]]]
    assert len(runs) == len(set(runs)) == 7  # each post's pairs in one run
    assert batches == list(reward.PostBatches(posts, 4, 2, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    short = reward.PostBatches(posts[:37], batch_size=4, per_update=2, seed=3)  # 37 pairs: 4 updates, 5 dropped
    assert len([r for b in short for r in b]) == len({r for b in short for r in b}) == 32


# ------------------------------------------------------------------------------------------------ Detail 7
def test_detail7_dropout_off(fake_run):
    """Detail 7: dropout probabilities 0 in the configs and modules; two train-mode forwards are identical."""
    model = reward.ScalarModel.from_sft(fake_run.sft)
    assert model.trunk.config.hidden_dropout == 0.1  # the fake SFT config has dropout on
    reward.disable_dropout(model)
    assert model.trunk.config.hidden_dropout == 0.0 and model.trunk.config.attention_dropout == 0.0
    assert model.trunk.config.classifier_dropout == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    model.config.base_config = model.trunk.config.to_dict()
    assert all(v == 0.0 for k, v in model.config.base_config.items() if k.endswith("dropout"))
    model.train()
    ids = torch.randint(1, 60, (3, 10))
    assert torch.equal(reward.get_reward(model, ids, 99), reward.get_reward(model, ids, 99))


# ------------------------------------------------------------------------------------------------ Detail 8 / 9
def test_detail8_detail9_optimizer_and_cosine_schedule():
    """Detail 8: AdamW eps 1e-5, default weight decay, lr 3e-6 (paper preset); Detail 9: cosine to 0, no warm-up."""
    paper = reward.PRESETS["paper"]
    assert paper.lr == 3e-6 and paper.eps == 1e-5 and paper.total_batch_size == 64 and paper.num_train_epochs == 1
    p = torch.nn.Parameter(torch.zeros(2))
    opt, sched = reward.make_optimizer_and_scheduler([p], lr=3e-6, eps=1e-5, num_updates=10)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["eps"] == 1e-5 and opt.defaults["weight_decay"] == torch.optim.AdamW([p]).defaults["weight_decay"]
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert lrs[0] == pytest.approx(3e-6)  # no warm-up
    for u, lr in enumerate(lrs):
        assert lr == pytest.approx(3e-6 * 0.5 * (1 + math.cos(math.pi * u / 10)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-20)  # decays to 0 at the end


def test_presets_and_parse_args():
    """SPEC presets: --preset embedded changes the defaults; explicit flags still override them."""
    a = reward.parse_args(["--preset", "embedded", "--lr", "1e-3"])
    assert a.preset == "embedded" and a.lr == 1e-3 and a.total_batch_size == reward.PRESETS["embedded"].total_batch_size
    assert reward.parse_args([]).lr == 3e-6
    with pytest.raises(ValueError, match="preset"):
        reward.parse_args(["--preset", "nope"])


# ------------------------------------------------------------------------------------------------ Detail 17 / save
def test_detail17_normalisation_and_save_reload_identical_rewards(fake_run, tmp_path):
    """Detail 17: after subtracting the mean reference reward through the bias, references score 0 on average;
    save_pretrained / from_pretrained give identical rewards, bias included."""
    from accelerate import Accelerator
    from datasets import load_from_disk

    torch.manual_seed(1)
    model = reward.ScalarModel.from_sft(fake_run.sft)
    reward.disable_dropout(model)
    with torch.no_grad():
        model.scalar_head.bias.fill_(0.37)  # a non-trivial bias so the normalisation has something to do
    model.eval()
    acc = Accelerator()
    refs = load_from_disk(os.path.join(fake_run.data, "sft"))["train"]
    pad = fake_run.tok.pad_token_id
    before = reward.score_sequences(acc, model, refs, "query_reference_response_token", pad, 16)
    with torch.no_grad():
        model.scalar_head.bias -= float(before.mean())
    after = reward.score_sequences(acc, model, refs, "query_reference_response_token", pad, 16)
    assert abs(after.mean()) < 1e-5
    assert np.allclose(after, before - before.mean(), atol=1e-5)
    model.save_pretrained(tmp_path / "rm")
    loaded = reward.ScalarModel.from_pretrained(tmp_path / "rm")
    reward.disable_dropout(loaded).eval()
    assert loaded.scalar_head.bias.item() == pytest.approx(0.37 - before.mean())
    again = reward.score_sequences(acc, loaded, refs, "query_reference_response_token", pad, 16)
    assert np.array_equal(again, after)


# ------------------------------------------------------------------------------------------------ Detail 18
def test_detail18_validation_breakdown():
    """Detail 18: accuracy overall, by confidence and by policy pair; margin; loss."""
    from datasets import Dataset

    ds = Dataset.from_dict({"confidence": [1, 1, 9, 9], "policies": ["a vs b", "a vs b", "a vs c", "a vs b"]})
    c = np.array([1.0, 0.0, 2.0, 0.0])
    r = np.array([0.0, 1.0, 0.0, 1.0])
    m = reward.validation_metrics("val", c, r, ds)
    assert m["val_accuracy"] == 0.5 and m["val_reward_margin"] == pytest.approx(0.25)
    assert m["val_accuracy/confidence_1"] == 0.5 and m["val_accuracy/confidence_9"] == 0.5
    assert m["val_accuracy/policies_a_vs_b"] == pytest.approx(1 / 3) and m["val_accuracy/policies_a_vs_c"] == 1.0
    assert m["val_loss"] == pytest.approx(np.mean(np.log1p(np.exp(-(c - r)))))


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_reported_clearly(fake_run, tmp_path):
    """Identical pairs (skip+warn or error), too-long responses and empty splits raise/warn naming split and field."""
    from datasets import load_from_disk

    ds = load_from_disk(os.path.join(fake_run.data, "preference"))["train"]
    with pytest.raises(ValueError, match="'train' is empty"):
        reward.check_preference_split(ds.select([]), "train", RM_RESP_LEN, RM_QR_LEN)
    with pytest.raises(ValueError, match="'validation', field 'chosen_token_len'"):
        reward.check_preference_split(ds, "validation", 3, RM_QR_LEN)
    with pytest.raises(ValueError, match="field 'query_chosen_token"):
        reward.check_preference_split(ds, "train", RM_RESP_LEN, 10)
    dup = ds.map(lambda row, i: {"rejected": row["chosen"]} if i < 3 else {}, with_indices=True)
    with pytest.warns(UserWarning, match="3 pair"):
        kept, n = reward.check_preference_split(dup, "train", RM_RESP_LEN, RM_QR_LEN, "skip")
    assert n == 3 and len(kept) == len(ds) - 3
    with pytest.raises(ValueError, match="'train': 3 pair"):
        reward.check_preference_split(dup, "train", RM_RESP_LEN, RM_QR_LEN, "error")
    with pytest.raises(ValueError, match="lacks column"):
        reward.check_preference_split(ds.remove_columns(["chosen"]), "train", RM_RESP_LEN, RM_QR_LEN)


# ------------------------------------------------------------------------------------------------ end to end
def test_end_to_end_in_process_with_fake_gold_judge(fake_run, tmp_path, monkeypatch):
    """Short in-process run with a stand-in GoldJudge: trains, normalises (Detail 17), validates (Detail 18),
    computes gold agreement/correlations, saves a model that reloads with the same rewards."""

    class FakeJudge:
        @classmethod
        def from_dir(cls, d):
            return cls()

        def score(self, query, summary):
            return float(summary.split("<|endoftext|>")[0].count("a"))

        def compare(self, query, a, b):
            sa, sb = self.score(query, a), self.score(query, b)
            return 0.5 if sa == sb else float(sa > sb)

        def record(self, query):
            return {}

    import embedded_diagnostics

    # the near-miss pairs of the stand-in task: the judge's "right" summary has more a's
    monkeypatch.setattr(embedded_diagnostics, "GoldJudge", FakeJudge)
    monkeypatch.setattr(embedded_diagnostics, "HARD_DETAILS", ("x",))
    monkeypatch.setattr(embedded_diagnostics, "near_miss_pair", lambda rec, detail, rng: ("a a a", "b"))
    out = tmp_path / "rm"
    metrics = reward.main(_args(fake_run, out, gold_task_dir=str(tmp_path), lr=1e-3))
    on_disk = json.load(open(out / "metrics.json"))
    for k in ("val_accuracy", "gold_agreement", "val_reward_margin", "reward_mean_before_norm",
              "reward_std_before_norm", "reward_mean_after_norm", "reward_std_after_norm", "val_cnndm_accuracy",
              "gold_corr_reference_pearson", "gold_corr_sft_spearman", "val_accuracy/confidence_7",
              "gold_near_miss_accuracy", "gold_near_miss_accuracy/x"):
        assert k in on_disk, k
    assert 0.0 <= on_disk["gold_near_miss_accuracy"] <= 1.0
    assert abs(on_disk["reward_mean_after_norm"]) < 1e-4
    assert on_disk["num_updates"] == 96 // 16 and on_disk["train_pairs_seen"] == 96
    assert metrics["val_accuracy"] > 0.8  # the fake preference rule is easy
    assert json.load(open(out / "args.json"))["lr"] == 1e-3
    loaded = reward.ScalarModel.from_pretrained(out)
    assert loaded.scalar_head.bias.item() == pytest.approx(on_disk["head_bias"], abs=1e-6)


def test_end_to_end_subprocess_embedded_preset(fake_run, tmp_path):
    """`python reward.py --preset embedded ... --track` runs on the fake data, writes args.json + metrics.json and
    an offline wandb run."""
    out = tmp_path / "rm_cli"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline",
           "WANDB_DIR": str(tmp_path)}
    cmd = [sys.executable, os.path.join(ROOT, "reward.py"), "--preset", "embedded", "--sft_model_path", fake_run.sft,
           "--dataset_path", fake_run.data, "--output_dir", str(out), "--total_batch_size", "16",
           "--per_device_train_batch_size", "8", "--norm_num_samples", "20", "--track",
           "--num_train_pairs", "90", "--num_val_pairs", "20"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "wandb").is_dir()  # --track logged an (offline) wandb run
    metrics = json.load(open(out / "metrics.json"))
    # 90 pairs = 5 updates of 16 + a remainder of 10 that is dropped (never a duplicated pair)
    assert metrics["num_updates"] == 5 and metrics["train_pairs_dropped_remainder"] == 10
    assert metrics["val_num_pairs"] == 20 and "val_accuracy" in metrics
    assert (out / "args.json").exists() and (out / "config.json").exists()


def test_reward_py_copied_alone_runs_without_the_embedded_modules(fake_run, tmp_path):
    """reward.py copied alone into another folder imports, prints --help and trains; only --gold_task_dir needs
    embedded_diagnostics.py / embedded_task.py, and without them it says so after the model and metrics are saved."""
    import shutil

    alone = tmp_path / "project"
    alone.mkdir()
    shutil.copy(os.path.join(ROOT, "reward.py"), alone / "reward.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    # one interpreter (imports dominate the cost): the embedded modules are unreachable, --help works, then a tiny run
    script = ("import contextlib, io, sys, importlib.util as u\n"
              "assert u.find_spec('embedded_task') is None and u.find_spec('embedded_diagnostics') is None\n"
              "import reward\n"
              "buf = io.StringIO()\n"
              "with contextlib.redirect_stdout(buf):\n"
              "    try:\n"
              "        reward.parse_args(['--help'])\n"
              "    except SystemExit as e:\n"
              "        assert e.code == 0, e.code\n"
              "assert '--gold-task-dir' in buf.getvalue(), buf.getvalue()\n"
              "reward.main(reward.parse_args(sys.argv[1:]))\n")
    out = alone / "rm"
    res = subprocess.run([sys.executable, "-c", script, "--preset", "embedded", "--sft_model_path", fake_run.sft,
                          "--dataset_path", fake_run.data, "--output_dir", str(out), "--total_batch_size", "8",
                          "--per_device_train_batch_size", "8", "--num_train_pairs", "16", "--num_val_pairs", "8",
                          "--norm_num_samples", "8", "--gold_task_dir", str(tmp_path / "task")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=alone)
    assert "--gold_task_dir needs embedded_diagnostics.py" in res.stderr, res.stdout[-2000:] + res.stderr[-2000:]
    assert json.load(open(out / "metrics.json"))["num_updates"] == 2  # trained and saved before the gold metrics
    assert (out / "config.json").exists()


@pytest.mark.parametrize("grouped", [False, True])
def test_detail16_detail10_accelerate_two_processes_see_every_pair_once(fake_run, tmp_path, grouped):
    """Detail 16: with `accelerate launch --num_processes 2` (CPU, gloo) every training pair is seen exactly once
    across the ranks, and the run completes, also with the pairs grouped by post; Detail 10: the model
    initialisation is identical on both ranks."""
    import socket

    out = tmp_path / "rm_ddp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # ACCELERATE_USE_CPU makes `--multi_gpu` run DDP over gloo on a machine without CUDA
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           os.path.join(ROOT, "reward.py"), "--preset", "embedded", "--sft_model_path", fake_run.sft,
           "--dataset_path", fake_run.data, "--output_dir", str(out), "--total_batch_size", "32",
           "--per_device_train_batch_size", "8", "--norm_num_samples", "20", "--save_seen_ids"]
    cmd += ["--group_pairs_by_post"] if grouped else []
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    records = [json.load(open(out / f"seen_ids_rank{r}.json")) for r in range(2)]
    assert records[0]["init_head_weight"] == records[1]["init_head_weight"]  # Detail 10: identical init on all ranks
    seen = [r["rows"] for r in records]
    assert len(seen[0]) == len(seen[1]) == 48
    allseen = seen[0] + seen[1]
    assert len(allseen) == len(set(allseen)) == 96  # 96 pairs = 3 updates of 32: every pair exactly once
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["world_size"] == 2 and metrics["gradient_accumulation_steps"] == 2 and metrics["num_updates"] == 3


# ------------------------------------------------------------------------------------------------ Pythia's tokenizer
def test_detail3_pythia_pad_and_too_small_embedding_is_resized(pythia_tokenizer_dir):
    """Detail 3 with Pythia's tokenizer: [PAD] is id 50277, so Pythia's 50,304 embedding rows stay as they are and
    an embedding one row short of the tokenizer is resized (its existing rows kept)."""
    from transformers import GPTNeoXConfig, GPTNeoXModel

    tok = reward.load_tokenizer(pythia_tokenizer_dir)
    assert tok.pad_token_id == 50277 and len(tok) == 50278
    for rows, expected in ((50304, 50304), (50277, 50278)):
        torch.manual_seed(0)
        trunk = GPTNeoXModel(GPTNeoXConfig(vocab_size=rows, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=16))
        before = trunk.get_input_embeddings().weight.detach().clone()
        reward.maybe_resize(trunk, tok)
        weight = trunk.get_input_embeddings().weight
        assert weight.shape[0] == expected and torch.equal(weight[:rows], before)


# ------------------------------------------------------------------------------------------------ Detail 18, CNN/DM
def test_eval_batch_size_scales_with_row_width():
    from datasets import Dataset

    ds = Dataset.from_dict({"query_chosen_token": [[1] * 2021], "query_rejected_token": [[1] * 2021]})
    assert reward.eval_batch_size(ds, 16, 638) == 5  # 16 x 638 tokens / 2,021 per row
    narrow = Dataset.from_dict({"query_chosen_token": [[1] * 638], "query_rejected_token": [[1] * 638]})
    assert reward.eval_batch_size(narrow, 16, 638) == 16 and reward.eval_batch_size(ds, 1, 638) == 1


def test_detail18_validation_cnndm_reported_separately(pythia_tokenizer_dir, tmp_path):
    """Data built by tldr_dataset.py from rows in the published schema (TL;DR and CNN/DM validation rows, nulls
    included), Pythia's tokenizer and a tiny Pythia-shaped model: reward.py checks validation_cnndm against the
    CNN/DM limits in meta.json (wider than TL;DR's) and reports its accuracy apart; the batched scores equal the
    pair-by-pair rewards of the saved model."""
    from datasets import load_from_disk
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    import tldr_dataset as td

    sft_raw, cmp_raw = tmp_path / "sft_raw", tmp_path / "cmp_raw"
    sft_raw.mkdir(), cmp_raw.mkdir()
    for split, n in (("train", 8), ("validation", 4), ("test", 2)):
        with open(sft_raw / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps(dict(id=f"{split}{i}", subreddit="test", title=f"title {i}",
                                        post="a post about words " * (1 + i), summary=f"words {i}")) + "\n")

    def comparison(i, batch, cnndm=False):
        info = (dict(id=f"c{i}", post=None, title=f"news {i}", subreddit=None, site="dailymail",
                     article=f"Line one of story {i}.\n" + "More of the story, with details. " * (10 + i))
                if cnndm else dict(id=f"t{i}", post=f"post {i} " * 5, title=f"title {i}", subreddit="s", site=None,
                                   article=None))
        return dict(info=info, summaries=[dict(text=f" good summary {i}", policy="sup2", note=None),
                                          dict(text=" bad", policy="ref", note=None)],
                    choice=i % 2, worker="w", batch=batch, split="valid1", extra=dict(confidence=i % 3 + 7))

    with open(cmp_raw / "train.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps(comparison(i, "batch3")) + "\n")
    with open(cmp_raw / "validation.jsonl", "w") as f:  # TL;DR rows first (article null), CNN/DM rows later
        for i in range(4):
            f.write(json.dumps(comparison(i, "batch5")) + "\n")
        for i, b in enumerate(("batch0_cnndm", "cnndm0", "cnndm2", "cnndm0", "cnndm2")):
            f.write(json.dumps(comparison(i, b, cnndm=True)) + "\n")
    data = tmp_path / "data"
    td.build(td.Args(sft_dataset=str(sft_raw), preference_dataset=str(cmp_raw), base_model=pythia_tokenizer_dir,
                     output_dir=str(data), query_length=48, sft_response_length=12, sft_query_response_length=60,
                     rm_response_length=12, rm_query_response_length=60, cnndm_query_length=96,
                     cnndm_rm_response_length=16, cnndm_rm_query_response_length=112))
    cnn = load_from_disk(str(data / "preference"))["validation_cnndm"]
    assert len(cnn) == 5 and len(cnn[0]["query_token"]) == 96 and len(cnn[0]["query_chosen_token"]) == 112
    assert cnn[0]["query"].startswith("Article:\nLine one of story 0.")

    sft_dir = tmp_path / "sft"
    tok = td.load_tokenizer(pythia_tokenizer_dir)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128)).save_pretrained(sft_dir)
    tok.save_pretrained(sft_dir)
    out = tmp_path / "rm"
    args = reward.Args(**{**vars(reward.PRESETS["embedded"]), "sft_model_path": str(sft_dir),
                          "dataset_path": str(data), "output_dir": str(out), "norm_num_samples": 8})
    metrics = reward.main(args)
    assert metrics["val_num_pairs"] == 4 and metrics["val_cnndm_num_pairs"] == 5
    rm = reward.disable_dropout(reward.ScalarModel.from_pretrained(out)).eval()
    with torch.no_grad():
        margins = [float(reward.get_reward(rm, torch.tensor([row["query_chosen_token"]]), 50277)
                         - reward.get_reward(rm, torch.tensor([row["query_rejected_token"]]), 50277)) for row in cnn]
    assert metrics["val_cnndm_accuracy"] == pytest.approx(np.mean([m > 0 for m in margins]))
    assert metrics["val_cnndm_reward_margin"] == pytest.approx(np.mean(margins), abs=1e-4)
    assert "val_cnndm_accuracy/confidence_7" in metrics and "val_cnndm_accuracy/policies_ref_vs_sup2" in metrics

    # --fixed_val_dataset_path: another data set's validation split scored as val_fixed_* (here the same pairs again:
    # the same numbers); a folder without one, or one built with another tokenizer, is an error naming the flag
    import shutil

    swapped = tmp_path / "swapped"  # the same pairs with chosen and rejected exchanged: the margins change sign
    shutil.copytree(data, swapped)
    pref = load_from_disk(str(data / "preference"))
    val = pref["validation"].rename_columns({"query_chosen_token": "_c", "query_rejected_token": "query_chosen_token"})
    val = val.rename_columns({"_c": "query_rejected_token"})
    shutil.rmtree(swapped / "preference")
    type(pref)({"train": pref["train"], "validation": val}).save_to_disk(str(swapped / "preference"))
    fixed = reward.main(reward.Args(**{**vars(args), "output_dir": str(tmp_path / "rm_fixed"), "fixed_val_dataset_path": str(swapped)}))
    assert fixed["val_fixed_num_pairs"] == 4 and fixed["val_fixed_reward_margin"] == pytest.approx(-fixed["val_reward_margin"])
    assert fixed["val_reward_margin"] != 0
    with pytest.raises(ValueError, match="--fixed_val_dataset_path"):
        reward.main(reward.Args(**{**vars(args), "fixed_val_dataset_path": str(tmp_path / "sft_raw")}))

    shutil.copytree(data, tmp_path / "other")
    meta = json.loads((tmp_path / "other" / "meta.json").read_text())
    (tmp_path / "other" / "meta.json").write_text(json.dumps({**meta, "pad_token_id": 7}))
    with pytest.raises(ValueError, match="--fixed_val_dataset_path: meta.json field 'pad_token_id'"):
        reward.main(reward.Args(**{**vars(args), "fixed_val_dataset_path": str(tmp_path / "other")}))


def test_bf16_on_cpu_head_loss_and_save(fake_run, tmp_path):
    """reward.py's bf16 branch (taken under CUDA) on CPU with --bf16_on_cpu: the trunk and the RM head run under bf16
    autocast, the pairwise loss is finite, and the saved model (fp32 weights, normalised bias) loads back."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # accelerate keeps one mixed-precision setting per process
    head_dtypes = []
    original = reward.ScalarModel.from_sft

    def from_sft(*a, **kw):
        model = original(*a, **kw)
        model.scalar_head.register_forward_hook(lambda m, i, o: head_dtypes.append(o.dtype))
        return model

    reward.ScalarModel.from_sft = from_sft
    try:
        out = tmp_path / "rm_bf16"
        metrics = reward.main(_args(fake_run, out, bf16=True, bf16_on_cpu=True, num_train_pairs=48, num_val_pairs=16))
    finally:
        reward.ScalarModel.from_sft = original
        AcceleratorState._reset_state(True)
    assert head_dtypes and set(head_dtypes) == {torch.bfloat16}
    assert metrics["num_updates"] == 3 and math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
    loaded = reward.ScalarModel.from_pretrained(out)
    assert loaded.scalar_head.weight.dtype == torch.float32
    assert loaded.scalar_head.bias.item() == pytest.approx(metrics["head_bias"], abs=1e-6)
