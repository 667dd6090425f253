"""A round of human feedback on the policy's own samples, for the embedded offline task.

OpenAI's TL;DR comparisons (the reward model's data in the paper) were collected on samples of OpenAI's own
policies: raters compared pairs of summaries that those models wrote. The embedded task's generated comparisons
come from hand-written "policies" instead, whose mistakes are not the mistakes our tiny SFT model makes (when it
samples a feeling or a question it is often the wrong one; a hand-written policy's wrong fact looks different).
A reward model trained on them did not rank the SFT model's own summaries (correlation with the gold score about 0 on SFT
samples, version 3 of the task), so PPO against it could not beat SFT.

This script plays the rater round that the real data already went through: for posts of the task's comparison
splits it samples pairs of summaries from the policy (3 disjoint pairs per post, at PPO's rollout temperature)
and lets the task's Bradley-Terry rater (the hidden gold judge plus calibrated noise, the same rater that labelled
the generated comparisons) choose one. It writes
`comparisons_{train,validation}.jsonl` in OpenAI's raw schema, which `tldr_dataset.py --comparisons_dir` turns into
the preference set that `reward.py` reads.

    python collect_feedback.py --task_dir runs/quickstart/task --policy_path runs/quickstart/sft \
        --output_dir runs/quickstart/feedback
    accelerate launch --multi_gpu --num_processes 2 collect_feedback.py ...   # posts split over 2 processes

Under `accelerate launch` each process samples every N-th batch of posts (its own sampling seed, Detail 10) and the
main process labels and writes them all, in post order.
"""

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List

import torch
import tyro
from accelerate import Accelerator
from accelerate.utils import gather_object
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig, StaticCache

import embedded_task as et

console = Console()


@dataclass
class Args:
    task_dir: str = "runs/quickstart/task"
    """embedded task folder (raw comparisons, gold records, the rater's temperature in task.json)"""
    policy_path: str = "runs/quickstart/sft"
    """the policy whose samples are compared (sft.py's output)"""
    output_dir: str = "runs/quickstart/feedback"
    """where comparisons_{train,validation}.jsonl and feedback.json are written"""
    num_train_posts: int = 3000
    """posts of the task's comparison training split to sample (`pairs_per_post` pairs each)"""
    num_validation_posts: int = 300
    """posts of the task's comparison validation split to sample (`pairs_per_post` pairs each)"""
    pairs_per_post: int = 3
    """disjoint pairs of samples per post (2 x this many samples of each post)"""
    temperature: float = 0.7
    """sampling temperature: 0.7 is PPO's rollout temperature (Detail 20), so the raters judge the summaries PPO will
    explore. At 1.0 the samples differ mostly in wrong facts that a tiny RM cannot check against the post (quickstart,
    seed 1: RM correlation with gold on SFT samples 0.08 at 1.0 with 2,500 pairs, 0.35 at 0.7 with 3 pairs per post)"""
    response_length: int = 53
    """new tokens per sample (Detail 5: the SFT response length)"""
    query_length: int = 256
    """queries longer than this many tokens are an error (the embedded data set's query length)"""
    all_pairs: bool = False
    """training posts: compare every pair of a post's 2 x pairs_per_post samples (15 pairs of 6), not only the disjoint
    pairs (3 of 6): more rater labels from the same samples, each an independent rater draw. Validation stays disjoint"""
    batch_size: int = 50
    """posts per generate call (2 x pairs_per_post samples each)"""
    seed: int = 1
    num_threads: int = 0
    """torch threads (0: the library default)"""


def unique_posts(rows: List[dict], n: int) -> List[dict]:
    """The first `n` distinct posts (`info` dicts) of raw comparison rows, in file order."""
    seen, posts = set(), []
    for r in rows:
        if r["info"]["id"] not in seen:
            seen.add(r["info"]["id"])
            posts.append(r["info"])
    if len(posts) < n:
        raise ValueError(f"asked for {n} posts but the comparison split has only {len(posts)} distinct posts")
    return posts[:n]


def left_pad(seqs: List[List[int]], pad_id: int) -> torch.Tensor:
    width = max(map(len, seqs))
    return torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])


@torch.no_grad()
def sample_pairs(model, tokenizer, queries: List[str], args: Args, all_pairs: bool = False) -> List[List[tuple]]:
    """`pairs_per_post` disjoint pairs of sampled summaries per query (with `all_pairs`, every pair of those samples;
    text before the first EOS, stripped)."""
    pad_id = tokenizer.pad_token_id
    ids = tokenizer(queries, add_special_tokens=False)["input_ids"]
    too_long = [i for i, x in enumerate(ids) if len(x) > args.query_length]
    if too_long:
        raise ValueError(f"{len(too_long)} queries exceed --query_length {args.query_length} tokens (first: row {too_long[0]})")
    k = 2 * args.pairs_per_post
    q1 = left_pad(ids, pad_id)  # Detail 3: left padding with the pad token
    q = q1.repeat_interleave(k, dim=0)
    mask = q != pad_id
    config = GenerationConfig(max_new_tokens=args.response_length, temperature=args.temperature, top_k=0, top_p=1.0,
                              do_sample=True, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
    # speed: the k samples of a post share its prompt, so the prompt (all but its last token) runs once per post and
    # its KV cache is repeated k times; generate then starts at the last prompt token. The same tokens as k separate
    # prompts (tests/test_collect_feedback.py); 300 size-s samples 3.0 s -> 1.9 s (prefill was 40% of the time).
    # speed: the repeated prefix goes into a preallocated ("static") cache, which each new token fills in place instead
    # of the dynamic cache's concatenation of every layer at every step. The same tokens (tests); 900 size-s samples
    # 8.3 -> 5.2 s, 600 size-m 13.9 -> 6.5 s, 600 size-l 38.5 -> 12.6 s (one thread, EPYC without AVX-512)
    cache = StaticCache(config=model.config, max_cache_len=q.shape[1] + args.response_length)
    if q1.shape[1] > 1:
        m1 = q1[:, :-1] != pad_id
        positions = (m1.long().cumsum(1) - 1).clamp(min=0)  # Detail 11: positions count real tokens only
        prefix = DynamicCache(config=model.config)
        model(input_ids=q1[:, :-1].masked_fill(~m1, 0), attention_mask=m1.long(), position_ids=positions, cache=prefix,
              use_cache=True)
        for i, layer in enumerate(prefix.layers):
            cache.update(layer.keys.repeat_interleave(k, dim=0), layer.values.repeat_interleave(k, dim=0), i)
    # positions follow the attention mask inside generate (Detail 11); pads become a valid id before the embedding
    out = model.generate(input_ids=q.masked_fill(~mask, 0), attention_mask=mask.long(), cache=cache, generation_config=config)
    texts = []
    for resp in out[:, q.shape[1]:].tolist():
        if tokenizer.eos_token_id in resp:  # Detail 21: the summary ends at the first EOS
            resp = resp[: resp.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode([t for t in resp if t != pad_id]).strip())
    if all_pairs:
        index_pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    else:
        index_pairs = [(2 * j, 2 * j + 1) for j in range(args.pairs_per_post)]
    return [[(texts[k * i + a], texts[k * i + b]) for a, b in index_pairs] for i in range(len(queries))]


def collect(args: Args, split: str, n_posts: int, model, tokenizer, records: Dict[str, dict], temperature: float,
            progress: Progress, accelerator: Accelerator) -> tuple:
    rows = et.read_jsonl(os.path.join(args.task_dir, "raw", f"comparisons_{split}.jsonl"))
    posts = unique_posts(rows, n_posts)
    mine = []  # (batch start, [(post id, a, b), ...]) of this process's batches: every num_processes-th one
    step = args.batch_size * accelerator.num_processes
    task = progress.add_task(f"sampling ({split})", total=len(posts))
    for i in range(accelerator.process_index * args.batch_size, len(posts), step):
        chunk = posts[i:i + args.batch_size]
        queries = [et.format_query(p["subreddit"], p["title"], p["post"]) for p in chunk]  # Detail 1
        pairs = sample_pairs(model, tokenizer, queries, args, all_pairs=args.all_pairs and split == "train")
        mine.append((i, [(p["id"], a, b) for p, ps in zip(chunk, pairs) for a, b in ps]))
        progress.update(task, completed=min(len(posts), i + step))  # the main process shows every rank's round
    batches = sorted(gather_object(mine), key=lambda b: b[0]) if accelerator.num_processes > 1 else mine  # post order
    if not accelerator.is_main_process:
        return None, None
    drafts, identical = [], 0
    for _, triples in batches:
        for pid, a, b in triples:
            if a == b:  # nothing to compare (counted, like the data set's identical pairs)
                identical += 1
                continue
            drafts.append(dict(rec=records[pid], pa="sft_sample", pb="sft_sample", sa=a, sb=b, k=len(drafts)))
    # the task's own rater: Bradley-Terry draw on the gold scores at the calibrated temperature, noisy workers
    labelled, stats = et.label_comparisons(drafts, args.seed, f"feedback_{split}", temperature)
    for row in labelled:
        row["split"] = "train" if split == "train" else "valid1"  # the raw data's split names
    stats["identical_pairs_skipped"] = identical
    outcomes, seen = [], {}  # per sample of a pair (a sample is in several pairs: its outcome is computed once)
    for d in drafts:
        for s in (d["sa"], d["sb"]):
            key = (d["rec"]["id"], s)
            if key not in seen:
                seen[key] = et.fact_outcomes(d["rec"], s)
            outcomes.append(seen[key])
    stats["sample_fact_rates"] = {k: {o: sum(x[k] == o for x in outcomes) / max(1, len(outcomes))
                                      for o in ("right", "wrong", "missing")} for k in et.SALIENT}
    return labelled, stats


def main(args: Args) -> dict:
    t0 = time.time()
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # one process, or DDP-launched ranks over gloo
    torch.manual_seed(args.seed + accelerator.process_index * 100003)  # Detail 10: each process samples differently
    task_json = os.path.join(args.task_dir, "task.json")
    if not os.path.exists(task_json):
        raise FileNotFoundError(f"{task_json} not found: build the task first (python embedded_task.py --out_dir {args.task_dir})")
    temperature = json.load(open(task_json))["stats"]["rater_temperature"]
    records = {r["id"]: r for r in et.read_jsonl(os.path.join(args.task_dir, "gold", "records.jsonl"))}
    tokenizer = AutoTokenizer.from_pretrained(args.policy_path)
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # Detail 3: every stage's [PAD] (the SFT policy's has it)
    model = AutoModelForCausalLM.from_pretrained(args.policy_path).to(accelerator.device).eval()
    os.makedirs(args.output_dir, exist_ok=True)
    summary: Dict[str, object] = dict(args=asdict(args), rater_temperature=temperature,
                                      num_processes=accelerator.num_processes)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not accelerator.is_main_process) as progress:
        for split, n in (("train", args.num_train_posts), ("validation", args.num_validation_posts)):
            rows, stats = collect(args, split, n, model, tokenizer, records, temperature, progress, accelerator)
            if accelerator.is_main_process:
                et.write_jsonl(os.path.join(args.output_dir, f"comparisons_{split}.jsonl"), rows)
                summary[split] = stats
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return summary
    summary["seconds"] = time.time() - t0
    with open(os.path.join(args.output_dir, "feedback.json"), "w") as f:
        json.dump(summary, f, indent=2)
    tr = summary["train"]
    console.print(f"feedback: {tr['n']} training pairs of policy samples (label agreement with gold "
                  f"{tr['label_agreement']:.3f}, {tr['identical_pairs_skipped']} identical skipped); "
                  f"{summary['validation']['n']} validation pairs; {summary['seconds']:.0f}s -> {args.output_dir}")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a launched rank ends here, skipping interpreter finalization: a gloo worker thread still alive then
        # aborts the rank ("terminate called without an active exception")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
