"""sft.py: the SFT-side details on a tiny random GPT-NeoX, and a short end-to-end run (real data path)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import sft
import tldr_dataset as td
from helpers import tiny_model, write_sft_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok(pythia_tokenizer_dir):
    return sft.load_tokenizer(pythia_tokenizer_dir)


def test_detail7_dropout_off(tok, tmp_path):
    tiny_model(tok, dropout=0.5, path=str(tmp_path))
    model = sft.load_policy(str(tmp_path), tok)
    model.train()
    assert model.config.attention_dropout == 0.0 and model.config.hidden_dropout == 0.0
    ids = torch.randint(0, 100, (2, 12))
    a, b = sft.forward(model, ids, tok.pad_token_id).logits, sft.forward(model, ids, tok.pad_token_id).logits
    assert torch.equal(a, b)


def test_detail3_detail11_left_padding_same_logits(tok):
    model = tiny_model(tok).eval()
    pad = tok.pad_token_id
    seq = torch.tensor([[5, 6, 7, 8, 9]])
    padded = torch.tensor([[pad, pad, pad, 5, 6, 7, 8, 9]])
    a = sft.forward(model, seq, pad).logits
    b = sft.forward(model, padded, pad).logits[:, 3:]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # The positions handed to the model start at 0 on the first real token (rotary attention is
    # shift-invariant, so a model with absolute positions is where this matters most).
    seen = {}
    model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    sft.forward(model, padded, pad)
    assert seen["position_ids"].tolist() == [[0, 0, 0, 0, 1, 2, 3, 4]]


def test_detail3_pad_token_distinct_and_embedding_fits(tok, tmp_path):
    assert tok.pad_token == "[PAD]" and tok.pad_token_id != tok.eos_token_id
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok) - 1, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64)).save_pretrained(str(tmp_path))
    model = sft.load_policy(str(tmp_path), tok)  # one row short: resized so [PAD] has an embedding
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_detail12_labels_mask_pads_and_optionally_the_query():
    pad = 99
    ids = torch.tensor([[1, 2, 3, 4, pad, pad]])
    assert sft.sft_labels(ids, pad).tolist() == [[1, 2, 3, 4, -100, -100]]
    assert sft.sft_labels(ids, pad, torch.tensor([2])).tolist() == [[-100, -100, 3, 4, -100, -100]]


def test_detail12_loss_matches_manual(tok):
    model = tiny_model(tok).eval()
    pad = tok.pad_token_id
    ids = torch.tensor([[5, 6, 7, 8, pad, pad], [9, 10, 11, 12, 13, 14]])
    logp = torch.log_softmax(sft.forward(model, ids, pad).logits, -1)
    per_seq = [torch.stack([-logp[b, t, ids[b, t + 1]] for t in range(5) if ids[b, t + 1] != pad]).mean() for b in range(2)]
    torch.testing.assert_close(sft.sft_loss(model, ids, pad), torch.stack(per_seq).mean())
    # trimming the all-pad columns changes nothing
    torch.testing.assert_close(sft.sft_loss(model, sft.trim_right(torch.cat([ids, torch.full((2, 3), pad)], 1), pad), pad),
                               sft.sft_loss(model, ids, pad))


def test_detail12_response_loss_projects_only_from_the_shortest_query_on(tok):
    """With query lengths, the vocabulary projection starts at the shortest query's last token: the losses and
    gradients of full logits, from fewer projected positions."""
    model = tiny_model(tok).eval()
    pad = tok.pad_token_id
    ids = torch.tensor([[5, 6, 7, 8, 9, pad, pad], [9, 10, 11, 12, 13, 14, 15], [7, 8, 9, 10, 11, 12, pad]])
    query_lens = torch.tensor([3, 5, 4])
    logp = torch.log_softmax(sft.forward(model, ids, pad).logits.double(), -1)
    expected = torch.stack([torch.stack([-logp[b, t, ids[b, t + 1]] for t in range(int(query_lens[b]) - 1, 6)
                                         if ids[b, t + 1] != pad]).mean() for b in range(3)]).float()
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: rows.append(a[0].shape[1]))
    losses = sft.sequence_losses(model, ids, pad, query_lens)
    handle.remove()
    torch.testing.assert_close(losses, expected, atol=1e-6, rtol=1e-5)
    assert rows == [7 - 2]  # positions 2..6: from the last token of the shortest query (3 tokens)
    losses.mean().backward()
    grad = model.gpt_neox.embed_in.weight.grad.clone()
    model.zero_grad()
    full = sft.forward(model, ids, pad).logits[:, :-1].float()
    labels = sft.sft_labels(ids, pad, query_lens)[:, 1:]
    ce = torch.nn.functional.cross_entropy(full.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    (ce.sum(1) / (labels != -100).sum(1)).mean().backward()
    torch.testing.assert_close(grad, model.gpt_neox.embed_in.weight.grad, atol=1e-6, rtol=1e-5)


def test_detail12_loss_is_mean_of_per_sequence_means_at_any_micro_batch(tok):
    """Detail 12: as released, the update's loss is the mean over its sequences of each sequence's token-mean (not one
    token-mean over the batch), whatever the micro-batch size and the accumulation."""
    model = tiny_model(tok).eval()
    pad = tok.pad_token_id
    ids = torch.tensor([[5, 6, pad, pad, pad, pad, pad], [9, 10, 11, 12, 13, 14, 15], [7, 8, 9, pad, pad, pad, pad],
                        [20, 21, 22, 23, 24, pad, pad]])
    logp = torch.log_softmax(sft.forward(model, ids, pad).logits.double(), -1)
    terms = [[-logp[b, t, ids[b, t + 1]] for t in range(ids.shape[1] - 1) if ids[b, t + 1] != pad] for b in range(4)]
    mean_of_means = torch.stack([torch.stack(t).mean() for t in terms]).mean().float()
    token_mean = torch.stack([x for t in terms for x in t]).mean().float()
    assert abs(mean_of_means - token_mean) > 1e-3  # the two weightings differ on this batch
    loss = sft.sft_loss(model, ids, pad)
    torch.testing.assert_close(loss, mean_of_means, atol=1e-6, rtol=1e-5)
    # micro-batch 1 with accumulation 4 (the released setting) and 2 x 2 give the same update loss and gradient
    for micro in (1, 2):
        model.zero_grad()
        acc = sum(sft.sft_loss(model, ids[i : i + micro], pad) / (4 // micro) for i in range(0, 4, micro))
        acc.backward()
        grad = model.gpt_neox.embed_in.weight.grad.clone()
        model.zero_grad()
        loss = sft.sft_loss(model, ids, pad)
        loss.backward()
        torch.testing.assert_close(acc, loss, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad, model.gpt_neox.embed_in.weight.grad, atol=1e-6, rtol=1e-5)


def test_detail21_truncate_after_first_eos():
    eos, pad = 0, 99
    r = torch.tensor([[3, 0, 4, 0, 5], [3, 4, 5, 6, 7], [0, 1, 2, 3, 4], [3, 99, 4, 0, 5]])
    # a sampled [PAD] ends the response too (as in PPO's truncate_response): no tokens after it are kept
    assert sft.truncate_response(r, eos, pad).tolist() == [[3, 0, 99, 99, 99], [3, 4, 5, 6, 7], [0, 99, 99, 99, 99],
                                                            [3, 99, 99, 99, 99]]


def test_detail13_generation_exact_length_eos_does_not_stop(tok):
    model = tiny_model(tok).eval()

    def eos_likely(module, inputs, output):  # make EOS the most likely token: generation must still run on
        output.logits[..., tok.eos_token_id] += 100.0
        return output

    handle = model.register_forward_hook(eos_likely)
    pad = tok.pad_token_id
    queries = torch.tensor([[pad, pad, 5, 6, 7], [5, 6, 7, 8, 9]])
    torch.manual_seed(0)
    out = sft.generate(model, queries, tok, response_length=7, temperature=0.01)
    assert out.shape == (2, 7)
    # EOS was sampled first and everything after it is [PAD] (Detail 21), yet 7 tokens were generated.
    assert out[:, 0].tolist() == [tok.eos_token_id] * 2 and (out[:, 1:] == tok.pad_token_id).all()
    handle.remove()
    out = sft.generate(model, queries, tok, response_length=7, temperature=1e-6)
    # Detail 13 + 11: the left-padded query continues exactly as a greedy decode of the unpadded query.
    seq = torch.tensor([[5, 6, 7]])
    for _ in range(7):
        seq = torch.cat([seq, sft.forward(model, seq, tok.pad_token_id).logits[:, -1:].argmax(-1)], 1)
    assert out[0].tolist() == sft.truncate_response(seq[:, 3:], tok.eos_token_id, tok.pad_token_id)[0].tolist()


def test_static_cache_samples_equal_dynamic_cache(tok):
    """generate's static KV cache (a speed-up) draws the same sampled tokens as the default dynamic cache."""
    from transformers import GenerationConfig

    model = tiny_model(tok, seed=3).eval()
    pad = tok.pad_token_id
    queries = torch.tensor([[pad, pad, 5, 6, 7], [5, 6, 7, 8, 9], [pad, 9, 8, 7, 6]])
    torch.manual_seed(11)
    static = sft.generate(model, queries, tok, response_length=9, temperature=1.0)
    config = GenerationConfig(max_new_tokens=9, temperature=1.0, top_k=0, top_p=1.0, do_sample=True, eos_token_id=None,
                              pad_token_id=pad)
    mask = queries != pad
    model.generation_config.eos_token_id = None
    torch.manual_seed(11)
    out = model.generate(input_ids=queries.masked_fill(~mask, 0), attention_mask=mask.long(), generation_config=config)
    dynamic = sft.truncate_response(out[:, queries.shape[1]:], tok.eos_token_id, pad)
    assert static.tolist() == dynamic.tolist()
    assert len(set(map(tuple, static.tolist()))) > 1  # real samples, not one repeated sequence


def test_detail8_detail9_optimizer_and_cosine_schedule(tok):
    model = tiny_model(tok)
    opt, sched = sft.make_optimizer(model, sft.Args(), num_updates=10)
    assert opt.defaults["eps"] == 1e-5 and opt.defaults["lr"] == 3e-6 and isinstance(opt, torch.optim.AdamW)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(3e-6)  # no warm-up
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # decays to 0


def test_batch_arithmetic_error_names_sizes():
    with pytest.raises(ValueError, match="total_batch_size=128 is not divisible by per_device_train_batch_size=12"):
        sft.check_batch_arithmetic(sft.Args(per_device_train_batch_size=12), 1)
    assert sft.check_batch_arithmetic(sft.Args(), 8) == 1


def test_presets_and_flags_override():
    args = sft.parse_args(["--preset", "embedded", "--lr", "0.5"])
    assert args.preset == "embedded" and args.lr == 0.5 and args.total_batch_size == 32
    assert sft.parse_args([]).lr == 3e-6
    with pytest.raises(ValueError, match="--preset"):
        sft.parse_args(["--preset", "nope"])


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory, pythia_tokenizer_dir, tok):
    """A tiny real-path data set (raw rows -> tldr_dataset.build) and a tiny base model."""
    root = tmp_path_factory.mktemp("sft_e2e")
    raw = root / "raw"
    write_sft_rows(raw, {"train": 64, "validation": 16, "test": 8})
    cmp = root / "cmp"
    cmp.mkdir()
    for split in ("train", "validation"):
        with open(cmp / f"{split}.jsonl", "w") as f:
            f.write(json.dumps(dict(info=dict(id="c", post="p", title="t", subreddit="s"), summaries=[dict(text=" a", policy="x"), dict(text=" b", policy="y")], choice=0)) + "\n")
    data = root / "data"
    td.build(td.Args(sft_dataset=str(raw), preference_dataset=str(cmp), base_model=pythia_tokenizer_dir, output_dir=str(data),
                     query_length=48, sft_response_length=12, sft_query_response_length=60, rm_response_length=12, rm_query_response_length=60))
    model_dir = root / "base"
    tiny_model(tok, path=str(model_dir))
    return data, model_dir


def run_sft(data, model_dir, out, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "sft.py"), "--preset", "embedded", "--base_model", str(model_dir),
           "--dataset_path", str(data), "--output_dir", str(out), "--gold_task_dir", "None", "--total_batch_size", "8",
           "--per_device_train_batch_size", "4", "--num_eval_samples", "8", "--eval_batch_size", "8", "--response_length", "6",
           "--eval_every", "4", "--save_every", "4", "--lr", "3e-3", "--num_train_epochs", "1", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.load(open(out / "metrics.json"))


def test_sft_end_to_end_and_resume(tiny_run_inputs, tmp_path):
    data, model_dir = tiny_run_inputs
    m = run_sft(data, model_dir, tmp_path / "a")
    assert m["updates"] == 8 and m["val_loss"] < 10.5  # below ln(50k) = 10.8, the loss of a uniform guess and "sft_rougeL" in m
    for name in ("args.json", "metrics.jsonl", "eval_samples.jsonl", "config.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).exists(), name
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    # The saved model loads back with from_pretrained and scores the same.
    tokenizer = sft.load_tokenizer(str(tmp_path / "a"))
    assert tokenizer.pad_token == "[PAD]"
    sft.load_policy(str(tmp_path / "a"), tokenizer)
    # Resume: a run stopped after its update-4 checkpoint and resumed ends where the uninterrupted one does.
    b = tmp_path / "b"
    run_sft(data, model_dir, b, "--save_every", "4")
    ckpt = json.load(open(b / "checkpoint" / "progress.json"))
    assert ckpt["update"] == 4
    m2 = run_sft(data, model_dir, b, "--resume")
    assert m2["val_loss"] == pytest.approx(m["val_loss"], rel=1e-5)


def test_bf16_autocast_loss_has_fp32_log_softmax(tok):
    """Under bf16 autocast (the CUDA branch, here on CPU) the model computes in bf16 but the loss's log-softmax
    runs in fp32: it matches a float64 log-softmax of the same bf16 logits far closer than bf16 rounding (~1e-2)."""
    model = tiny_model(tok).eval()
    pad = tok.pad_token_id
    ids = torch.tensor([[5, 6, 7, 8, pad, pad], [9, 10, 11, 12, 13, 14]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = sft.forward(model, ids, pad).logits
        loss = sft.sft_loss(model, ids, pad)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    logp = torch.log_softmax(logits.double(), -1)
    per_seq = [torch.stack([-logp[b, t, ids[b, t + 1]] for t in range(5) if ids[b, t + 1] != pad]).mean() for b in range(2)]
    assert abs(loss.item() - torch.stack(per_seq).mean().item()) < 1e-5


def test_bf16_on_cpu_run_and_test_split(tiny_run_inputs, tmp_path):
    """The bf16 branch of sft.py end to end on CPU (--bf16_on_cpu): it trains with finite losses and saves a model
    that loads; --split test samples the test split's queries."""
    data, model_dir = tiny_run_inputs
    out = tmp_path / "bf16"
    m = run_sft(data, model_dir, out, "--bf16_on_cpu", "--split", "test", "--save_every", "0", "--eval_every", "0")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert m["updates"] == 8 and all(math.isfinite(r["train/loss"]) for r in rows) and math.isfinite(m["val_loss"])
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    samples = [json.loads(line) for line in open(out / "eval_samples.jsonl")]
    assert len(samples) == 8 and all(s["id"].startswith("test") for s in samples)
    model = sft.load_policy(str(out), sft.load_tokenizer(str(out)))
    assert model.get_input_embeddings().weight.dtype == torch.float32


def test_main_in_process_returns_metrics_and_gold_seam(tiny_run_inputs, tmp_path, monkeypatch):
    """sft.main(args) runs in-process and returns the metrics it writes. With --gold_task_dir the only contact with
    the embedded task is GoldJudge.from_dir and one judge.sample_metrics call per evaluation: its metrics come back
    prefixed (base_, sft_, and gold_win_rate) and its per-row scores land in eval_samples.jsonl."""
    import types

    from accelerate.state import AcceleratorState

    calls = []

    class StandInJudge:
        @classmethod
        def from_dir(cls, task_dir):
            calls.append(("from_dir", task_dir))
            return cls()

        def sample_metrics(self, queries, responses, references):
            calls.append(("sample_metrics", len(queries)))
            rows = [{"gold_score": float(len(r)), "gold_reference_score": -1.0} for r in responses]
            return {"gold_win_rate": 0.25, "gold_score": sum(r["gold_score"] for r in rows) / len(rows)}, rows

    monkeypatch.setitem(sys.modules, "embedded_task", types.SimpleNamespace(GoldJudge=StandInJudge))
    data, model_dir = tiny_run_inputs
    out = tmp_path / "inproc"
    args = sft.parse_args(["--preset", "embedded", "--base_model", str(model_dir), "--dataset_path", str(data),
                           "--output_dir", str(out), "--gold_task_dir", "some/task", "--total_batch_size", "8",
                           "--per_device_train_batch_size", "4", "--num_eval_samples", "4", "--eval_batch_size", "4",
                           "--response_length", "4", "--eval_every", "0", "--save_every", "0", "--num_train_epochs", "1"])
    AcceleratorState._reset_state(True)
    try:
        metrics = sft.main(args)
    finally:
        AcceleratorState._reset_state(True)
    assert metrics == {**json.load(open(out / "metrics.json")), "wall_seconds": metrics["wall_seconds"]}
    assert calls == [("from_dir", "some/task"), ("sample_metrics", 4), ("sample_metrics", 4)]
    assert metrics["base_gold_win_rate"] == metrics["sft_gold_win_rate"] == metrics["gold_win_rate"] == 0.25
    samples = [json.loads(line) for line in open(out / "eval_samples.jsonl")]
    assert [s["gold_score"] for s in samples] == [float(len(s["response"])) for s in samples]
    assert all(s["gold_reference_score"] == -1.0 for s in samples)
    assert metrics["sft_gold_score"] == pytest.approx(sum(s["gold_score"] for s in samples) / 4)


def test_length_grouped_batches_cover_each_row_once_and_cut_padding():
    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 200, (1000,), generator=rng).tolist()
    s = sft.SeededBatches(lengths, batch_size=16, per_update=2, group=5, seed=1)
    epoch0 = list(s)
    assert len(epoch0) == len(s) == 2 * (1000 // 32) and all(len(b) == 16 for b in epoch0)
    flat = [i for b in epoch0 for i in b]
    assert len(set(flat)) == len(flat) == 1000 // 32 * 32  # no row twice; only the last partial update is dropped
    assert list(s) == epoch0  # seeded: the same order again
    s.set_epoch(1)
    assert list(s) != epoch0
    # the micro-batches of an update are consecutive in a sorted run: their padded lengths stay near the mean
    padded = sum(max(lengths[i] for i in b) for b in epoch0) / len(epoch0)
    plain = list(sft.SeededBatches(lengths, batch_size=16, per_update=2, group=0, seed=1))
    assert sorted(i for b in plain for i in b) == sorted(flat)
    padded_plain = sum(max(lengths[i] for i in b) for b in plain) / len(plain)
    mean = sum(lengths[i] for i in flat) / len(flat)
    assert padded < mean + 0.2 * (padded_plain - mean)


@pytest.mark.parametrize("group", ["0", "2"])
def test_sft_resume_with_and_without_length_groups(tiny_run_inputs, tmp_path, group):
    data, model_dir = tiny_run_inputs
    m = run_sft(data, model_dir, tmp_path / "a", "--group_by_length", group, "--num_train_epochs", "2")
    b = tmp_path / "b"
    run_sft(data, model_dir, b, "--group_by_length", group, "--num_train_epochs", "2", "--save_every", "12")
    assert json.load(open(b / "checkpoint" / "progress.json"))["update"] == 12  # in the second epoch
    m2 = run_sft(data, model_dir, b, "--group_by_length", group, "--num_train_epochs", "2", "--resume")
    assert m2["val_loss"] == pytest.approx(m["val_loss"], rel=1e-5)
