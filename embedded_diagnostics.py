"""Embedded-task diagnostics of a trained reward model: how it relates to the task's noiseless gold judge.

They need the hidden evaluator of the offline task (`embedded_task.GoldJudge`), so they live beside the embedded
task, not in the RM stage. `reward.py --gold_task_dir DIR` calls `reward_model_gold_metrics` once after training
and adds its keys to metrics.json:

- `gold_agreement`, `label_gold_agreement`: does the RM (and do the noisy labels) agree with the gold judge on the
  validation pairs?
- `gold_corr_reference_*`, `gold_corr_sft_*`: Pearson / Spearman correlation of RM and gold scores on the
  validation references and on SFT near-greedy samples (Detail 13) -- the samples PPO starts from.
- `reference_own_post_preferred`, `sft_sample_own_post_preferred`: does the RM score a summary higher after its
  own post than after another one (0.5 = it ignores the post)?
- `gold_near_miss_accuracy[/detail]`: does it prefer a complete summary to the same words with one hard detail
  replaced by a plausible near miss (0.5 = it does not check that detail)?
"""

import random
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, GenerationConfig

from embedded_task import HARD_DETAILS, GoldJudge, near_miss_pair
from reward import INVALID_PAD_ID, disable_dropout, get_reward, maybe_resize, trim_padding


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman's correlation)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def pearson(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a, b) -> float:
    return pearson(rankdata(a), rankdata(b))


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    # Detail 21: every token after the first EOS -> pad
    is_eos = responses == eos_id
    after_first = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return responses.masked_fill(after_first, pad_id)


@torch.no_grad()
def generate_greedy(policy, queries: torch.Tensor, pad_id: int, response_length: int, temperature: float):
    # Detail 13: near-greedy evaluation sampling (T=0.01, top_k 0, top_p 1, exactly R new tokens, EOS does not stop)
    config = GenerationConfig(max_new_tokens=response_length, min_new_tokens=None, temperature=temperature,
                              top_k=0, top_p=1.0, do_sample=True, eos_token_id=None, pad_token_id=pad_id)
    mask = queries != pad_id
    # `generate` fills the config's unset (None) fields from the model's own generation config: lift its EOS too,
    # or generation stops early once every row has emitted EOS.
    saved_eos, policy.generation_config.eos_token_id = policy.generation_config.eos_token_id, None
    try:
        out = policy.generate(input_ids=queries.masked_fill(~mask, INVALID_PAD_ID), attention_mask=mask.long(),
                              generation_config=config)
    finally:
        policy.generation_config.eos_token_id = saved_eos
    return out[:, queries.shape[1]:]


def own_post_preference(model: nn.Module, queries: torch.Tensor, responses: torch.Tensor, pad_id: int,
                        batch_size: int, own: Optional[torch.Tensor] = None) -> float:
    """Share of summaries scored higher after their own post than after the previous row's post (ties count half).
    A reward model that ignores the post sits at 0.5: a cheap check that it compares summary and post at all.
    `queries` are left-padded to one width, `responses` right-padded to one width; `own` are the rewards of
    (queries, responses) when the caller already has them (then only the swapped pairs are scored)."""
    others = torch.roll(queries, 1, dims=0)
    own_parts, swapped = [], []
    with torch.no_grad():
        for i in range(0, queries.shape[0], batch_size):
            r = responses[i:i + batch_size]
            if own is None:
                pair = torch.cat([queries[i:i + batch_size], r], 1)
                own_parts.append(get_reward(model, trim_padding(pair, pad_id), pad_id))
            swapped.append(get_reward(model, trim_padding(torch.cat([others[i:i + batch_size], r], 1), pad_id), pad_id))
    swapped = torch.cat(swapped)
    own = torch.cat(own_parts) if own is None else own.to(swapped.device, swapped.dtype)
    return float(((own > swapped).float() + 0.5 * (own == swapped).float()).mean())


def near_miss_accuracy(rm: nn.Module, judge, queries: List[str], query_tokens: torch.Tensor, tokenizer, pad_id: int,
                       batch_size: int, seed: int) -> Dict[str, float]:
    """For every post and each detail that small policies get wrong (narrator age, duration, feeling), the share of
    minimal pairs -- a complete summary vs the same words with that detail a plausible near miss
    (`embedded_task.near_miss_pair`) -- in which the RM scores the right one higher. 0.5 means the RM does not
    check that detail against the post, so PPO cannot learn to get it right from this RM."""
    if tokenizer.pad_token_id != pad_id:
        raise ValueError(f"near_miss_accuracy: tokenizer pads with {tokenizer.pad_token_id}, the RM with {pad_id}")
    rng = random.Random(seed)
    records = [judge.record(q) for q in queries]
    out: Dict[str, float] = {}
    eos = tokenizer.eos_token
    for detail in HARD_DETAILS:
        wins = []
        for i in range(0, len(queries), batch_size):
            pairs = [near_miss_pair(rec, detail, rng) for rec in records[i:i + batch_size]]
            texts = [" " + t + eos for pair in pairs for t in pair]  # Detail 4: the summary starts with a space
            resp = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")["input_ids"]
            q = query_tokens[i:i + batch_size].repeat_interleave(2, dim=0)
            ids = torch.cat([q, resp.to(q.device)], 1)  # left-padded query, right-padded summary (Details 11, 15)
            with torch.no_grad():
                r = get_reward(rm, trim_padding(ids, pad_id), pad_id).view(-1, 2)
            wins.append((r[:, 0] > r[:, 1]).float().cpu())
        out[f"gold_near_miss_accuracy/{detail}"] = float(torch.cat(wins).mean())
    out["gold_near_miss_accuracy"] = float(np.mean([out[f"gold_near_miss_accuracy/{d}"] for d in HARD_DETAILS]))
    return out


def reward_model_gold_metrics(args, rm: nn.Module, tokenizer, val_ds, val_scores, sft_ds, meta: dict, pad_id: int,
                              accelerator, progress, gen_batch_size: int = 64,
                              temperature: float = 0.01) -> Dict[str, float]:
    """The gold metrics of a trained RM (main process only). `args` is reward.py's Args; read from it:
    gold_task_dir, num_gold_samples, sft_model_path (the policy sampled for the correlation), seed and
    per_device_eval_batch_size. `val_scores` = (r_chosen, r_rejected) of `val_ds`, already computed by the stage."""
    judge = GoldJudge.from_dir(args.gold_task_dir)
    out: Dict[str, float] = {}
    device = accelerator.device
    batch_size = args.per_device_eval_batch_size
    # agreement with the noiseless judge on the held-out validation pairs (ties excluded)
    if val_ds is not None:
        c, r = val_scores
        gold = np.array([judge.compare(q, a, b) for q, a, b in zip(val_ds["query"], val_ds["chosen"], val_ds["rejected"])])
        decided = gold != 0.5
        rm_prefers_chosen = c > r
        gold_prefers_chosen = gold > 0.5
        out["gold_agreement"] = float((rm_prefers_chosen == gold_prefers_chosen)[decided].mean()) if decided.any() else float("nan")
        out["gold_num_pairs"] = int(decided.sum())
        out["gold_ties"] = int((~decided).sum())
        # how often the (noisy) labels themselves agree with the noiseless judge: the ceiling of val_accuracy
        out["label_gold_agreement"] = float(gold_prefers_chosen[decided].mean()) if decided.any() else float("nan")
    if sft_ds is None or "validation" not in sft_ds:
        return out
    sv = sft_ds["validation"]
    n = min(args.num_gold_samples, len(sv))
    sv = sv.select(range(n))
    # correlation of RM scores and gold scores on the validation references
    ref_rm = []
    with torch.no_grad():
        for i in range(0, n, batch_size):
            ids = torch.tensor(sv[i:i + batch_size]["query_reference_response_token"], device=device)
            with accelerator.autocast():
                ref_rm.append(get_reward(rm, trim_padding(ids, pad_id), pad_id).cpu())
    ref_rm = torch.cat(ref_rm).numpy()
    ref_gold = np.array([judge.score(q, s) for q, s in zip(sv["query"], sv["reference_response"])])
    out["gold_corr_reference_pearson"] = pearson(ref_rm, ref_gold)
    out["gold_corr_reference_spearman"] = spearman(ref_rm, ref_gold)
    with accelerator.autocast():
        out["reference_own_post_preferred"] = own_post_preference(
            rm, torch.tensor(sv["query_token"], device=device), torch.tensor(sv["reference_response_token"], device=device),
            pad_id, batch_size)
        out.update(near_miss_accuracy(rm, judge, sv["query"], torch.tensor(sv["query_token"], device=device), tokenizer,
                                      pad_id, batch_size, args.seed))
    # correlation on SFT near-greedy samples (Detail 13): the distribution PPO starts from
    policy = AutoModelForCausalLM.from_pretrained(args.sft_model_path).to(device)
    maybe_resize(policy, tokenizer)
    disable_dropout(policy)  # Detail 7
    policy.eval()
    torch.manual_seed(args.seed + accelerator.process_index * 100003)  # Detail 10: sampling seed per process
    resp_len = int(meta.get("sft_response_length", 53))
    eos_id = tokenizer.eos_token_id
    sample_rm, sample_gold, lengths, sample_queries, sample_responses = [], [], [], [], []
    task = progress.add_task("gold: SFT samples", total=n)
    for i in range(0, n, gen_batch_size):
        rows = sv[i:i + gen_batch_size]
        queries = torch.tensor(rows["query_token"], device=device)
        with torch.no_grad(), accelerator.autocast():
            responses = generate_greedy(policy, queries, pad_id, resp_len, temperature)
        responses = truncate_after_eos(responses, eos_id, pad_id)  # Detail 21
        sample_queries.append(queries), sample_responses.append(responses)
        with torch.no_grad(), accelerator.autocast():
            # left-padded query + right-padded response: Details 11 and 15 make the padding harmless
            sample_rm.append(get_reward(rm, torch.cat([queries, responses], 1), pad_id).cpu())
        for q, resp in zip(rows["query"], responses.tolist()):
            tokens = [t for t in resp if t != pad_id]
            lengths.append(len(tokens))
            sample_gold.append(judge.score(q, tokenizer.decode(tokens, skip_special_tokens=False)))
        progress.advance(task, len(rows["query"]))
    progress.remove_task(task)
    sample_rm = torch.cat(sample_rm).numpy()
    sample_gold = np.array(sample_gold)
    out["gold_corr_sft_pearson"] = pearson(sample_rm, sample_gold)
    out["gold_corr_sft_spearman"] = spearman(sample_rm, sample_gold)
    with accelerator.autocast():  # the samples' own rewards are sample_rm: only the swapped pairs are scored
        out["sft_sample_own_post_preferred"] = own_post_preference(
            rm, torch.cat(sample_queries), torch.cat(sample_responses), pad_id, batch_size,
            own=torch.from_numpy(sample_rm))
    out["gold_num_sft_samples"] = int(n)
    out["sft_sample_mean_reward"] = float(sample_rm.mean())
    out["sft_sample_mean_token_len"] = float(np.mean(lengths))
    out["reference_mean_reward_val"] = float(ref_rm.mean())
    del policy
    return out
