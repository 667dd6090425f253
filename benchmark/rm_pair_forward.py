"""The reward model's pair forward, timed: the shared-prefix forward of `reward.forward_pair` (a pair's query runs
once, its two summaries with the query's key/value cache) against the two full sequences side by side.

    python benchmark/rm_pair_forward.py                       # embedded s / m / l shapes, CPU, one thread
    python benchmark/rm_pair_forward.py --sizes 1b --device cuda --query_tokens 512 --response_tokens 53 --batch 8

Also a post's 15 pairs (all pairs of 6 samples, `collect_feedback.py --all_pairs`) in one micro-batch: pair by
pair (`forward_pair`) against each distinct query and summary once (`forward_pair` with `query_lens`, as
`reward.py --group_pairs_by_post` trains). Random-weight GPT-NeoX trunks of the embedded task's sizes (or
Pythia-1B's shape) with the reward head; random pairs as the preference set stores them (query + response,
right-padded), queries of 75-100% of `query_tokens` (a post's: all of them), responses of 40-100% of
`response_tokens`. Each timing is forward + backward of the pairwise loss on one micro-batch, the median of
`repeats` after one warm-up; the paths see the same pairs and their rewards are checked to agree. Prints the figures
and writes them as JSON (--json_out).
"""

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from quickstart import cpu_model  # noqa: E402
from reward import ScalarModel, ScalarModelConfig, get_reward, pairwise_loss, trim_padding, forward_pair  # noqa: E402

from embedded_task import MODEL_SIZES  # noqa: E402

# hidden, layers, heads: the embedded base models, read from embedded_task.py, and Pythia-1B
SHAPES = {name: (s["hidden_size"], s["num_hidden_layers"], s["num_attention_heads"]) for name, s in MODEL_SIZES.items()}
SHAPES["1b"] = (2048, 16, 8)


@dataclass
class Args:
    sizes: str = "s,m,l"
    batch: int = 8
    """pairs per micro-batch (the embedded preset's per process)"""
    query_tokens: int = 128
    """longest query (the embedded task's are about 90-130 tokens; the TL;DR's 512)"""
    response_tokens: int = 30
    """longest summary with its EOS (the embedded SFT's are about 25; the TL;DR's up to 53)"""
    vocab: int = 1728
    repeats: int = 10
    threads: int = 1
    device: str = "cpu"
    json_out: Optional[str] = None


def random_pairs(args: Args, pad: int, gen: torch.Generator):
    rows = []
    for _ in range(args.batch):
        q = torch.randint(1, pad, (int(args.query_tokens * (0.75 + 0.25 * torch.rand((), generator=gen))),), generator=gen)
        pair = []
        for _ in range(2):
            n = max(1, int(args.response_tokens * (0.4 + 0.6 * torch.rand((), generator=gen))))
            pair.append(torch.cat([q, torch.randint(1, pad, (n,), generator=gen)]))
        rows.append(pair)
    width = max(len(x) for pair in rows for x in pair)
    pad_row = lambda x: F.pad(x, (0, width - len(x)), value=pad)  # noqa: E731
    return (torch.stack([pad_row(c) for c, _ in rows]), torch.stack([pad_row(r) for _, r in rows]))


def post_pairs(args: Args, pad: int, gen: torch.Generator, samples: int = 6):
    """Every pair of `samples` summaries of one post (15 of 6), as `collect_feedback.py --all_pairs` writes them."""
    q = torch.randint(1, pad, (args.query_tokens,), generator=gen)
    outs = [torch.randint(1, pad, (max(1, int(args.response_tokens * (0.4 + 0.6 * torch.rand((), generator=gen))),),),
                          generator=gen) for _ in range(samples)]
    pairs = [(torch.cat([q, outs[a]]), torch.cat([q, outs[b]])) for a in range(samples) for b in range(a + 1, samples)]
    width = max(len(x) for pair in pairs for x in pair)
    pad_row = lambda x: F.pad(x, (0, width - len(x)), value=pad)  # noqa: E731
    chosen = torch.stack([pad_row(c) for c, _ in pairs])
    return chosen, torch.stack([pad_row(r) for _, r in pairs]), torch.full((len(pairs),), args.query_tokens)


def full_sequences(model, chosen, rejected, pad):
    rewards = get_reward(model, trim_padding(torch.cat([chosen, rejected]), pad), pad)
    return rewards[: len(chosen)], rewards[len(chosen):]


def time_path(fn, model, chosen, rejected, pad, repeats: int, device: str) -> float:
    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            rc, rr = fn(model, chosen, rejected, pad)
        pairwise_loss(rc, rr)[0].backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t)
        model.zero_grad()
    return statistics.median(times)


def machine() -> str:
    """Cores, CPU model (quickstart.cpu_model) and whether it has AVX-512: the figures depend on it."""
    try:
        avx512 = "with" if "avx512f" in open("/proc/cpuinfo").read() else "without"
    except OSError:
        avx512 = "unknown"
    return f"{os.cpu_count()} cores, {cpu_model()}, AVX-512: {avx512}"


def main(args: Args) -> dict:
    torch.set_num_threads(args.threads)
    results = {}
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        if size not in SHAPES:
            raise SystemExit(f"--sizes: unknown size {size!r} (choose from {sorted(SHAPES)})")
        hidden, layers, heads = SHAPES[size]
        torch.manual_seed(0)
        base = dict(model_type="gpt_neox", vocab_size=args.vocab, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, intermediate_size=4 * hidden, rotary_pct=0.25,
                    max_position_embeddings=2048, hidden_dropout=0.0, attention_dropout=0.0)
        model = ScalarModel(ScalarModelConfig(base_config=base, hidden_size=hidden)).to(args.device).train()
        pad = args.vocab - 1
        chosen, rejected = (x.to(args.device) for x in random_pairs(args, pad, torch.Generator().manual_seed(1)))
        with torch.no_grad():
            a, b = full_sequences(model, chosen, rejected, pad), forward_pair(model, chosen, rejected, pad)
        max_diff = max(float((a[0] - b[0]).abs().max()), float((a[1] - b[1]).abs().max()))
        full = time_path(full_sequences, model, chosen, rejected, pad, args.repeats, args.device)
        shared = time_path(forward_pair, model, chosen, rejected, pad, args.repeats, args.device)
        # the 15 pairs of one post's 6 samples in one micro-batch: pair by pair, or each query and summary once
        pc, pr, ql = (x.to(args.device) for x in post_pairs(args, pad, torch.Generator().manual_seed(2)))
        post_pair = time_path(forward_pair, model, pc, pr, pad, args.repeats, args.device)
        grouped = lambda m, c, r, p: forward_pair(m, c, r, p, ql)  # noqa: E731
        post_grouped = time_path(grouped, model, pc, pr, pad, args.repeats, args.device)
        with torch.no_grad():
            g = grouped(model, pc, pr, pad), full_sequences(model, pc, pr, pad)
        max_diff = max(max_diff, float((g[0][0] - g[1][0]).abs().max()), float((g[0][1] - g[1][1]).abs().max()))
        results[size] = dict(full_seconds=full, shared_prefix_seconds=shared, speedup=full / shared,
                             post_15_pairs_seconds=post_pair, post_15_pairs_grouped_seconds=post_grouped,
                             grouped_speedup=post_pair / post_grouped, max_abs_reward_diff=max_diff,
                             params=sum(p.numel() for p in model.parameters()))
        print(f"{size:>3}: {args.batch} pairs: full sequences {full * 1e3:7.1f} ms, shared prefix {shared * 1e3:7.1f} ms "
              f"({full / shared:.2f}x); a post's 15 pairs: pair by pair {post_pair * 1e3:7.1f} ms, each query and "
              f"summary once {post_grouped * 1e3:7.1f} ms ({post_pair / post_grouped:.2f}x); rewards agree to {max_diff:.1e}")
    out = dict(args=vars(args), results=results, torch=torch.__version__, machine=machine())
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
