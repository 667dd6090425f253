"""Tests of embedded_diagnostics.py (the reward model's gold-judge diagnostics on the embedded task)."""

import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import embedded_diagnostics as D  # noqa: E402
import reward  # noqa: E402

torch.set_num_threads(1)


def test_spearman_and_pearson():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert D.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert D.spearman(x, x ** 3) == pytest.approx(1.0)
    assert D.spearman(x, -x) == pytest.approx(-1.0)
    assert list(D.rankdata([3.0, 1.0, 3.0])) == [1.5, 0.0, 1.5]


def test_detail21_truncate_after_first_eos():
    """Detail 21 (used for the SFT samples of the gold correlation): tokens after the first EOS become pad."""
    r = torch.tensor([[5, 0, 6, 0], [5, 6, 7, 8]])
    assert D.truncate_after_eos(r, 0, 99).tolist() == [[5, 0, 99, 99], [5, 6, 7, 8]]


def test_own_post_preference_separates_readers_from_ignorers():
    """own_post_preference: 1.0 for a model that checks the summary against the post, 0.5 for one that ignores it."""
    pad = 99

    class Stub(torch.nn.Module):
        def __init__(self, reads_post):
            super().__init__()
            self.reads_post = reads_post

        def forward(self, input_ids, attention_mask, position_ids):
            first = input_ids.gather(1, attention_mask.argmax(1, keepdim=True))  # first real token = the post's
            last = input_ids.gather(1, (attention_mask.cumsum(1).argmax(1, keepdim=True)))  # last real token
            value = (first == last).float() if self.reads_post else last.float()
            return value.expand(-1, input_ids.shape[1])

    # post i starts with token 10 + i; its summary ends with the same token (right-padded to one width)
    queries = torch.tensor([[pad] * (i % 2) + [10 + i, 5, 6] + [5] * (1 - i % 2) for i in range(6)])
    responses = torch.tensor([[7, 10 + i] + [pad] * (i % 2) if i % 2 else [7, 8, 10 + i] for i in range(6)])
    assert D.own_post_preference(Stub(True), queries, responses, pad, batch_size=4) == 1.0
    assert D.own_post_preference(Stub(False), queries, responses, pad, batch_size=4) == 0.5
    # the caller's own rewards replace the own-post scoring; a wrong `own` changes the answer
    assert D.own_post_preference(Stub(True), queries, responses, pad, batch_size=4, own=torch.ones(6)) == 1.0
    assert D.own_post_preference(Stub(True), queries, responses, pad, batch_size=4, own=torch.zeros(6)) == 0.5


def test_near_miss_accuracy_separates_checkers_from_constant(tmp_path):
    """gold_near_miss_accuracy: a stand-in RM that rewards summary tokens copied from the post prefers the right
    narrator age (the wrong one is a number the post does not contain); a constant RM never wins (ties are losses)."""
    import embedded_task as et

    data = et.generate_data(et.GenConfig(seed=3, n_sft_train=60, n_sft_val=40, n_sft_test=5, n_cmp_train=10,
                                         n_cmp_val=5, n_pretrain_posts=50))
    tok_dir = str(tmp_path / "tok")
    et.train_tokenizer(data["pretrain_texts"] + [r["summary"] for r in data["sft_train"]], 600, tok_dir)
    tok = reward.load_tokenizer(tok_dir)
    pad = tok.pad_token_id
    judge = et.GoldJudge(data["records"])
    rows = data["sft_validation"]
    queries = [et.format_query(r["subreddit"], r["title"], r["post"]) for r in rows]
    ids = [tok(q, add_special_tokens=False)["input_ids"] for q in queries]
    width = max(map(len, ids))
    query_tokens = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # left-padded like the data sets

    marker = tok("\n\nTL;DR:", add_special_tokens=False)["input_ids"]  # the query's last tokens (Detail 1)

    class CopyChecker(torch.nn.Module):
        def forward(self, input_ids, attention_mask, position_ids):
            out = torch.zeros(input_ids.shape, dtype=torch.float)
            for b in range(input_ids.shape[0]):
                real = input_ids[b][attention_mask[b].bool()].tolist()
                n_query = max(i + len(marker) for i in range(len(real)) if real[i:i + len(marker)] == marker)
                post, summary = set(real[:n_query]), real[n_query:]
                out[b] = sum(t in post for t in summary) / max(1, len(summary))
            return out

    class Constant(torch.nn.Module):
        def forward(self, input_ids, attention_mask, position_ids):
            return torch.zeros(input_ids.shape)

    checker = D.near_miss_accuracy(CopyChecker(), judge, queries, query_tokens, tok, pad, batch_size=16, seed=0)
    assert checker["gold_near_miss_accuracy/narrator_age"] > 0.7
    constant = D.near_miss_accuracy(Constant(), judge, queries, query_tokens, tok, pad, batch_size=16, seed=0)
    assert constant == {"gold_near_miss_accuracy/narrator_age": 0.0, "gold_near_miss_accuracy/duration": 0.0,
                        "gold_near_miss_accuracy/feeling": 0.0, "gold_near_miss_accuracy": 0.0}


def test_detail13_generate_greedy_exact_length_even_when_eos_comes_first():
    """Detail 13: exactly `response_length` new tokens, near-greedy (T 0.01 = argmax here), and the model's own EOS
    does not stop generation (it is lifted for the call and restored afterwards)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    policy = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=64, max_position_embeddings=64)).eval()
    with torch.no_grad():
        policy.get_output_embeddings().weight.mul_(100.0)  # logit gaps far above T=0.01, so sampling is the argmax
    pad, length = 39, 6
    queries = torch.tensor([[pad, 3, 4, 5], [6, 7, 8, 9]])
    mask = queries != pad
    greedy = policy.generate(input_ids=queries.masked_fill(~mask, 0), attention_mask=mask.long(), do_sample=False,
                             max_new_tokens=length, eos_token_id=None, pad_token_id=pad)[:, 4:]
    # make each row's first greedy token the model's EOS: without the lift, generation would stop after one token
    policy.generation_config.eos_token_id = greedy[:, 0].tolist()
    out = D.generate_greedy(policy, queries, pad, length, temperature=0.01)
    assert out.shape == (2, length)
    assert out.tolist() == greedy.tolist()
    assert policy.generation_config.eos_token_id == greedy[:, 0].tolist()
