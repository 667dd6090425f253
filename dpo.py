"""Direct Preference Optimisation (DPO) of the SFT policy on the TL;DR preference pairs.

    accelerate launch dpo.py                                     # the paper: Pythia-1B SFT model, real data
    accelerate launch --config_file deepspeed_zero2.yaml dpo.py --sft_model_path models/sft_pythia-6.9b-deduped
    python dpo.py --preset embedded                              # the embedded offline task on CPU

Detail 32: the policy starts from the SFT model and the reference policy is a frozen copy of the SFT model
(eval mode, no gradients). The log-probability of a summary is the sum of the per-token log-probabilities
over the response tokens only (query and pads excluded). For a pair (chosen c, rejected r):

    loss = -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))       beta = 0.05

and the implicit reward of a summary is `beta * (pi - ref)`; its accuracy (share of validation pairs whose
chosen summary gets the larger implicit reward) is DPO's counterpart of the reward model's validation
accuracy (Detail 18). One epoch over the preference training pairs, batch 64, lr 3e-6, cosine, dropout off.

Reads the data set built by `tldr_dataset.py` (preference/ for training and validation, sft/ validation
queries for the evaluation samples). Writes to `--output_dir`: the policy and tokenizer (`save_pretrained`),
args.json, metrics.json, metrics.jsonl (per update), eval_samples.jsonl, and `checkpoint/` (every
`--save_every` updates; `--resume` continues from it).
"""

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from accelerate import Accelerator
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()


@dataclass
class Args:
    preset: str = "paper"
    """`paper` (the defaults below) or `embedded` (the offline task on CPU); explicit flags override it"""
    exp_name: str = "dpo"
    seed: int = 44413
    """the first of the paper's seeds (44413, 55513, 66613, 77713)"""
    base_model: str = "EleutherAI/pythia-1b-deduped"
    """names the default folders below (the SFT model trained from it)"""
    sft_model_path: Optional[str] = None
    """the SFT policy written by sft.py: the initial policy AND the frozen reference (Detail 32); None:
    models/sft_{base model name}"""
    dataset_path: str = "data/tldr"
    """folder written by tldr_dataset.py (holds sft/, preference/, meta.json)"""
    output_dir: Optional[str] = None
    """None: models/dpo_{base model name}"""
    beta: float = 0.05
    """Detail 32: the KL coefficient of the DPO loss and of the implicit reward"""
    lr: float = 3e-6
    """Detail 8: one learning rate for SFT, RM, PPO and DPO"""
    eps: float = 1e-5
    """Detail 8: AdamW epsilon"""
    total_batch_size: int = 64
    """Detail 32: pairs per update over all processes (= per_device_train_batch_size x accumulation x processes)"""
    per_device_train_batch_size: int = 8
    num_train_epochs: int = 1
    """Detail 32: one epoch over the preference training pairs"""
    num_train_pairs: Optional[int] = None
    """train on N of the training pairs (None: all), a subset drawn with --seed: a rater round that compares every pair
    of a post's samples writes its 15 pairs in a row, so the first 1,024 rows would cover 68 posts, a draw ~900"""
    bf16: bool = True
    """mixed precision bf16 where there is a GPU (ignored on CPU unless --bf16_on_cpu)"""
    bf16_on_cpu: bool = False
    """take the bf16 autocast path without CUDA too (slow; lets the tests run it on CPU)"""
    split: str = "validation"
    """the SFT split whose queries are sampled for evaluation (Detail 13): `validation` as released, or `test`"""
    eval_every: int = 100
    """implicit-reward validation every N updates (0: only at the start and the end)"""
    num_val_pairs: Optional[int] = None
    """use only the first N pairs of each validation split (None: all)"""
    per_device_eval_batch_size: int = 16
    """pairs per forward pass in validation (proportionally fewer for rows wider than 638 tokens: validation_cnndm)"""
    num_eval_samples: int = 256
    """validation queries sampled at the end (Detail 13), judged by the gold judge on the embedded task"""
    eval_batch_size: int = 32
    """queries per generate() call"""
    response_length: int = 53
    """Detail 13: exactly this many new tokens at evaluation (the released DPO evaluation used 128)"""
    eval_temperature: float = 0.01
    """Detail 13: near-greedy evaluation sampling"""
    gold_task_dir: Optional[str] = None
    """the embedded task folder: enables the hidden gold judge's win rates"""
    eval_reference: bool = True
    """also sample the reference (SFT) policy with the same queries and seed (sft_gold_win_rate)"""
    save_every: int = 0
    """checkpoint every N updates (0: never)"""
    resume: bool = False
    """continue from `{output_dir}/checkpoint`"""
    track: bool = False
    """log to wandb (WANDB_MODE=offline works without network)"""
    wandb_project_name: str = "tldr_rlhf"


PRESETS = {
    "paper": Args(),
    "embedded": Args(
        preset="embedded",
        seed=1,
        sft_model_path="runs/quickstart/sft",
        dataset_path="runs/quickstart/dataset",
        output_dir="runs/quickstart/dpo",
        # Tiny models need a far larger step than Pythia's 3e-6. Measured on the embedded task (a base-m SFT, 1024
        # pairs): lr 1e-4 -> implicit reward accuracy 0.574 and a better gold score than the SFT model; 3e-4 ->
        # 0.608 on that SFT but 0.56 with degenerate, repetitive samples on another; 1e-3 -> val loss above log 2.
        lr=1e-4,
        total_batch_size=32,
        per_device_train_batch_size=16,
        num_train_pairs=1024,  # about 2-3 CPU minutes at s; the rater round's ~45,000 pairs would take ~40x longer
        eval_every=0,
        num_val_pairs=500,
        per_device_eval_batch_size=50,
        num_eval_samples=200,
        eval_batch_size=50,
        gold_task_dir="runs/quickstart/task",
        eval_reference=False,  # the SFT run already judged the same queries with the same seed
    ),
}


def parse_args(argv: Optional[list] = None) -> Args:
    """Peek --preset (or, without it, the preset of --base_model's size), then let tyro parse the rest with that
    preset as the defaults; the folders left unset are derived from the base model."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = None
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            name = argv[i + 1]
        elif a.startswith("--preset="):
            name = a.split("=", 1)[1]
        elif name is None and (a == "--base_model" and i + 1 < len(argv) or a.startswith("--base_model=")):
            model = argv[i + 1] if a == "--base_model" else a.split("=", 1)[1]
            # by the model's name, so that a local snapshot (/ckpt/EleutherAI/pythia-6.9b-deduped) gets its size's preset
            name = next((k for k, p in PRESETS.items() if k.startswith("paper") and model_name(p.base_model) == model_name(model)), None)
    name = name or "paper"
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r} unknown; choose one of {sorted(PRESETS)}")
    return default_paths(tyro.cli(Args, default=replace(PRESETS[name], preset=name), args=argv))


def model_name(base_model: str) -> str:
    """`EleutherAI/pythia-1b-deduped` -> `pythia-1b-deduped`: the stages name their default folders after it."""
    return os.path.basename(os.path.normpath(base_model))


def default_paths(args: Args) -> Args:
    # every stage derives the same folders from --base_model, so the stages find each other without path flags
    name = model_name(args.base_model)
    return replace(args, sft_model_path=args.sft_model_path or os.path.join("models", f"sft_{name}"),
                   output_dir=args.output_dir or os.path.join("models", f"dpo_{name}"))


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------
def disable_dropout(model: nn.Module) -> nn.Module:
    """Detail 7: every dropout probability 0: nn.Dropout modules, the float attributes modules copy from their
    config at init (GPT-NeoX attention applies `self.attention_dropout` functionally in train mode), and the config
    fields, also those of a trunk config kept as a dict (the reward model's), so a saved model reloads without it."""

    def is_dropout(key, value) -> bool:
        return isinstance(key, str) and key.endswith(("dropout", "pdrop")) and isinstance(value, float)

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for key, value in list(vars(module).items()):
            if is_dropout(key, value):
                setattr(module, key, 0.0)
        config = getattr(module, "config", None)
        for key, value in list(vars(config).items()) if hasattr(config, "to_dict") else []:
            if is_dropout(key, value):
                setattr(config, key, 0.0)
            elif isinstance(value, dict):
                value.update({k: 0.0 for k, v in value.items() if is_dropout(k, v)})
    return model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    # Detail 3: a dedicated [PAD], never EOS, added whatever pad the tokenizer reports (Pythia's: <|padding|>),
    # as released; Pythia's [PAD] is id 50277. Idempotent on a tokenizer saved with [PAD] by an earlier stage.
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(f"{path}: the pad token equals EOS ({tokenizer.eos_token_id}); Detail 3 forbids this")
    return tokenizer


def maybe_resize(model_trunk: nn.Module, tokenizer) -> None:
    # Detail 3: resize only when the tokenizer has more tokens than the embedding has rows (not for Pythia)
    rows = model_trunk.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model_trunk.resize_token_embeddings(len(tokenizer))


def load_policy(path: str, tokenizer, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    maybe_resize(model, tokenizer)
    disable_dropout(model)  # Detail 7 (Detail 32: dropout off for the policy and the reference)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def load_reference(path: str, tokenizer, dtype=torch.float32):
    # Detail 32: the reference policy is the SFT model itself, frozen and in eval mode.
    ref = load_policy(path, tokenizer, dtype)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def forward(model: nn.Module, ids: torch.Tensor, pad_id: int, **kwargs):
    """Detail 3 and 11: attention mask from the pad id, pads replaced by a valid id (0) before the embedding, and
    positions that count real tokens only (cumsum - 1), so a left-padded sequence gets the positions it has alone."""
    mask = ids != pad_id  # Detail 3: attention mask from the pad id
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # Detail 11: positions from the mask
    return model(input_ids=ids.masked_fill(~mask, 0), attention_mask=mask.long(), position_ids=position_ids, **kwargs)


# ----------------------------------------------------------------------------------------------------
# DPO: log-probabilities, loss, implicit reward
# ----------------------------------------------------------------------------------------------------
def response_mask(ids: torch.Tensor, query_lens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """True at the response tokens of `query + response` rows, left- or right-padded with `pad_id`."""
    mask = ids != pad_id
    # Detail 11 / 32: count real tokens only, so the first `query_len` real tokens are the query whatever
    # the padding side; pads are never response tokens.
    real_index = mask.long().cumsum(-1) - 1
    return mask & (real_index >= query_lens[:, None])


def sequence_logprobs(logits: torch.Tensor, ids: torch.Tensor, query_lens: torch.Tensor, pad_id: int,
                      start: int = 0) -> torch.Tensor:
    """Detail 32: sum of log p(token) over the response tokens only (query and pads excluded), per row.

    `logits` are the model's outputs on `ids` (B, T, V) at positions `start` to T - 1; token t is predicted by the
    logits at t - 1.
    """
    logits = logits[:, :-1].float()
    targets = ids[:, start + 1:].masked_fill(ids[:, start + 1:] == pad_id, 0)  # a valid id for gather; masked out below
    token_logp = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    keep = response_mask(ids, query_lens, pad_id)[:, start + 1:]
    return torch.where(keep, token_logp, torch.zeros_like(token_logp)).sum(-1)  # Detail 32: pads excluded


def trim_right(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drops the all-pad columns on the right (right-padded batch): the same outputs for less compute."""
    real = (ids != pad_id).any(0).nonzero()
    return ids[:, : int(real.max()) + 1] if len(real) else ids


def pair_logprobs(model, chosen: torch.Tensor, rejected: torch.Tensor, query_lens: torch.Tensor, pad_id: int):
    """Summed response log-probabilities of chosen and rejected rows, both in ONE forward pass (Detail 32)."""
    width = max(chosen.shape[1], rejected.shape[1])
    both = torch.cat([F.pad(chosen, (0, width - chosen.shape[1]), value=pad_id),
                      F.pad(rejected, (0, width - rejected.shape[1]), value=pad_id)], 0)
    both = trim_right(both, pad_id)
    lens = torch.cat([query_lens, query_lens])
    # speed: vocabulary logits from the position before the earliest response token on (the queries' common part is
    # never scored): the same log-probabilities, a fraction of the projection (a TL;DR query is most of a row)
    first = response_mask(both, lens, pad_id).float().argmax(1).min()
    start = max(int(first) - 1, 0)
    logits = forward(model, both, pad_id, logits_to_keep=both.shape[1] - start).logits
    logp = sequence_logprobs(logits, both, lens, pad_id, start)
    n = chosen.shape[0]
    return logp[:n], logp[n:]


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float):
    """Detail 32: per-pair loss -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) and implicit rewards."""
    chosen_rewards = beta * (pi_chosen - ref_chosen)  # Detail 32: implicit reward beta * (pi - ref)
    rejected_rewards = beta * (pi_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards, rejected_rewards


def reward_stats(chosen_rewards, rejected_rewards) -> Dict[str, float]:
    """Detail 32: implicit-reward accuracy (chosen strictly above rejected) and mean margin."""
    chosen_rewards, rejected_rewards = np.asarray(chosen_rewards, np.float64), np.asarray(rejected_rewards, np.float64)
    margin = chosen_rewards - rejected_rewards
    return {"reward_accuracy": float((margin > 0).mean()), "reward_margin": float(margin.mean()),
            "chosen_reward": float(chosen_rewards.mean()), "rejected_reward": float(rejected_rewards.mean())}


def subset_pairs(ds, n: int, seed: int):
    """`n` rows of `ds` drawn with `seed`, in their file order (all rows if `n` >= len(ds))."""
    keep = np.random.default_rng(seed).permutation(len(ds))[:n]
    return ds.select(np.sort(keep).tolist())


def safe_key(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in str(s)).strip("_")


def validation_metrics(prefix: str, lp: Dict[str, np.ndarray], ds, beta: float) -> Dict[str, float]:
    """Loss, implicit-reward accuracy / margin (overall, by confidence, by policy pair) and mean log-probs."""
    losses, cr, rr = dpo_loss(*(torch.as_tensor(lp[k], dtype=torch.float64) for k in ("pi_c", "pi_r", "ref_c", "ref_r")), beta)
    cr, rr = cr.numpy(), rr.numpy()
    m = {f"{prefix}_loss": float(losses.mean())}
    m.update({f"{prefix}_{k}": v for k, v in reward_stats(cr, rr).items()})
    m[f"{prefix}_chosen_logprob"] = float(lp["pi_c"].mean())
    m[f"{prefix}_rejected_logprob"] = float(lp["pi_r"].mean())
    m[f"{prefix}_num_pairs"] = int(len(cr))
    for column in ("confidence", "policies"):
        if column not in ds.column_names:
            continue
        values = np.asarray(list(ds[column])[: len(cr)], dtype=object)
        for v in sorted(set(values.tolist()), key=str):
            sel = values == v
            s = reward_stats(cr[sel], rr[sel])
            m[f"{prefix}_reward_accuracy/{column}_{safe_key(v)}"] = s["reward_accuracy"]
            m[f"{prefix}_reward_margin/{column}_{safe_key(v)}"] = s["reward_margin"]
            m[f"{prefix}_count/{column}_{safe_key(v)}"] = int(sel.sum())
    return m


PAIR_COLUMNS = ["query_token", "query_chosen_token", "query_rejected_token"]
TLDR_QUERY_RESPONSE_LENGTH = 638  # Detail 5: the width of a TL;DR preference row


def batch_tensors(batch, pad_id: int):
    query_lens = (batch["query_token"] != pad_id).sum(1)  # the query length, from its left-padded tokens
    return batch["query_chosen_token"], batch["query_rejected_token"], query_lens


@torch.no_grad()
def pairs_logprobs(model, ds, pad_id: int, batch_size: int, accelerator) -> Dict[str, np.ndarray]:
    """Summed response log-probabilities of every pair of `ds` (sharded over processes, gathered in order)."""
    from accelerate.utils import gather_object

    was_training = model.training
    model.eval()
    out = []
    rank, world = accelerator.process_index, accelerator.num_processes
    # Detail 6: validation_cnndm rows are 2,021 tokens wide: proportionally fewer pairs per forward, so that their
    # vocabulary-wide logits take no more memory than a batch of 638-token TL;DR rows
    width = max(len(ds[0]["query_chosen_token"]), len(ds[0]["query_rejected_token"])) if len(ds) else 0
    batch_size = max(1, batch_size * TLDR_QUERY_RESPONSE_LENGTH // max(width, TLDR_QUERY_RESPONSE_LENGTH))
    for start in range(rank * batch_size, len(ds), batch_size * world):
        part = ds.select(range(start, min(start + batch_size, len(ds)))).with_format("torch", columns=PAIR_COLUMNS)[:]
        batch = {k: part[k].to(accelerator.device) for k in PAIR_COLUMNS}
        c, r = pair_logprobs(model, *batch_tensors(batch, pad_id), pad_id)
        out += [(start + i, a, b) for i, (a, b) in enumerate(zip(c.float().tolist(), r.float().tolist()))]
    if was_training:
        model.train()
    out = sorted(gather_object(out) if world > 1 else out)
    return {"c": np.array([o[1] for o in out]), "r": np.array([o[2] for o in out])}


def validate(policy, val_splits, ref_val, pad_id: int, args: Args, accelerator) -> Dict[str, float]:
    """Detail 32: DPO loss and implicit-reward metrics of `policy` on each validation split (`ref_val`: the frozen
    reference's log-probabilities of the same pairs, computed once)."""
    out = {}
    for key, ds in val_splits.items():
        lp = pairs_logprobs(policy, ds, pad_id, args.per_device_eval_batch_size, accelerator)
        out.update(validation_metrics(key, {"pi_c": lp["c"], "pi_r": lp["r"], "ref_c": ref_val[key]["c"], "ref_r": ref_val[key]["r"]}, ds, args.beta))
    return out


def check_preference_split(ds, name: str):
    missing = [c for c in PAIR_COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"preference split {name!r} lacks the column(s) {missing} (rebuild it with tldr_dataset.py)")
    if len(ds) == 0:
        raise ValueError(f"preference split {name!r} is empty")


# ----------------------------------------------------------------------------------------------------
# Sampling and judging (Detail 13)
# ----------------------------------------------------------------------------------------------------
def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True of each row, or the row length where there is none."""
    row_len = bools.size(-1)
    idx = torch.arange(row_len, device=bools.device)
    return torch.where(bools, idx, row_len).min(-1).values


def truncate_response(responses: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Detail 21: every token after the first EOS becomes [PAD] (the EOS itself is kept).
    A [PAD] sampled by the policy (the token exists in the vocabulary) also ends the response there, without
    EOS, so that masks, reward and the missing-EOS penalty all see the same response."""
    idx = torch.arange(responses.size(1), device=responses.device)
    eos_at = first_true_indices(responses == eos_id).unsqueeze(1)
    pad_at = first_true_indices(responses == pad_id).unsqueeze(1)
    keep = (idx <= eos_at) & (idx < pad_at)
    return torch.where(keep, responses, pad_id)


def trim_left_padding(queries: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop the leading columns that are [PAD] in every row: a pure speed-up (positions come from the mask,
    Detail 11, so every logit stays the same), large when queries are much shorter than query_length."""
    first = int((queries != pad_id).any(0).long().argmax())  # one host sync per batch
    return queries[:, first:]


@torch.no_grad()
def generate(model, queries: torch.Tensor, tokenizer, response_length: int, temperature: float) -> torch.Tensor:
    from transformers import GenerationConfig

    # Detail 13: temperature 0.01, top_k 0, top_p 1, exactly `response_length` new tokens: eos_token_id=None
    # so EOS does not stop generation (min_new_tokens would forbid EOS instead).
    config = GenerationConfig(
        max_new_tokens=response_length, temperature=temperature, top_k=0, top_p=1.0, do_sample=True,
        eos_token_id=None, pad_token_id=tokenizer.pad_token_id,
        cache_implementation="static",  # speed: a preallocated KV cache, the same logits as the dynamic one
    )
    queries = trim_left_padding(queries, tokenizer.pad_token_id)
    mask = queries != tokenizer.pad_token_id
    # `generate` fills unset (None) fields from the model's own generation config, so its EOS is lifted too.
    saved_eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    try:
        out = model.generate(input_ids=queries.masked_fill(~mask, 0), attention_mask=mask.long(), generation_config=config)
    finally:
        model.generation_config.eos_token_id = saved_eos
    return truncate_response(out[:, queries.shape[1] :], tokenizer.eos_token_id, tokenizer.pad_token_id)  # Detail 21


def decode_responses(tokenizer, responses: torch.Tensor):
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return [t.strip() for t in texts]


def sample_and_judge(model, dataset, tokenizer, args: Args, accelerator, judge, tag: str):
    """Detail 13 samples on the queries of `dataset` (--split), their ROUGE-L against the references and, with the
    embedded task's gold judge (`judge`, None otherwise), its metrics: `{tag}_rougeL`, `{tag}_gold_win_rate`, ..."""
    from rouge_score import rouge_scorer

    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    n = min(args.num_eval_samples, len(dataset))
    rows = []
    for start in range(accelerator.process_index * args.eval_batch_size, n, args.eval_batch_size * accelerator.num_processes):
        part = dataset.select(range(start, min(start + args.eval_batch_size, n)))
        queries = torch.tensor(part["query_token"], device=accelerator.device)
        responses = generate(unwrapped, queries, tokenizer, args.response_length, args.eval_temperature)
        lens = (responses != tokenizer.pad_token_id).sum(1).tolist()
        for i, text in enumerate(decode_responses(tokenizer, responses)):
            rows.append(dict(
                id=part[i]["id"], query=part[i]["query"], response=text, reference=part[i]["summary"],
                response_token_len=lens[i], reference_token_len=part[i]["reference_response_token_len"],
            ))
    if was_training:
        unwrapped.train()
    from accelerate.utils import gather_object

    rows = gather_object(rows) if accelerator.num_processes > 1 else rows
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    metrics = {
        f"{tag}_rougeL": float(np.mean([scorer.score(r["reference"], r["response"])["rougeL"].fmeasure for r in rows])),
        f"{tag}_mean_response_len": float(np.mean([r["response_token_len"] for r in rows])),
    }
    if judge is not None:
        gold, per_row = judge.sample_metrics([r["query"] for r in rows], [r["response"] for r in rows], [r["reference"] for r in rows])
        metrics.update({f"{tag}_{k}": v for k, v in gold.items()})
        for r, scores in zip(rows, per_row):
            r.update(scores)
    return metrics, rows


def print_samples(rows, title: str, k: int = 4):
    table = Table(title=title, show_lines=True)
    table.add_column("query (end)", max_width=50)
    table.add_column("model summary", max_width=45)
    table.add_column("reference", max_width=45)
    for r in rows[:k]:
        table.add_row("…" + r["query"][-160:], r["response"], r["reference"])
    console.print(table)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
def make_optimizer(model, args: Args, num_updates: int):
    from transformers import get_cosine_schedule_with_warmup

    # Detail 8: AdamW with eps 1e-5 and the library's default weight decay; no gradient clipping anywhere.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=args.eps)
    # Detail 9: cosine decay to 0 over the run, no warm-up.
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=num_updates)
    return optimizer, scheduler


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_accelerator(**kwargs) -> Accelerator:
    """The Accelerator for `python X.py`, `accelerate launch` (DDP) and `accelerate launch --config_file
    deepspeed_zero2.yaml` (Detail 30), on GPUs or on a CPU-only machine."""
    from accelerate.utils import InitProcessGroupKwargs

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    handlers = []
    if deepspeed and launched and not torch.cuda.is_available():
        # accelerate names no process-group backend for DeepSpeed without CUDA and then reports 1 process while
        # DeepSpeed runs WORLD_SIZE of them (wrong batch arithmetic); naming gloo makes it read the real world size
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    # without CUDA (and without DeepSpeed, which has its own CPU accelerator) a launched run is DDP over gloo
    accelerator = Accelerator(cpu=not torch.cuda.is_available() and not deepspeed, kwargs_handlers=handlers, **kwargs)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != world:
        raise RuntimeError(f"WORLD_SIZE={world} but accelerate runs {accelerator.num_processes} process(es)")
    return accelerator


def configure_deepspeed(accelerator: Accelerator, micro_batch: int, grad_accum: int):
    """Detail 30: DeepSpeed checks train_batch_size == micro-batch x accumulation x processes. Give it our batch
    arithmetic before `prepare` instead of leaving 'auto' to accelerate (it takes the micro-batch from the prepared
    dataloaders, the smallest one, and the accumulation from the Accelerator)."""
    accelerator.gradient_accumulation_steps = grad_accum
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=grad_accum,
                                       train_batch_size=micro_batch * grad_accum * accelerator.num_processes)


def prepare_reference(ref_model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Detail 32: the frozen reference on the accelerator. Under DeepSpeed a plain inference engine in the training
    engine's precision (bf16 with the ZeRO-2 config), so that policy and reference compute the same log-probabilities
    at the first update, and outside accelerate's models (its checkpoints hold the trained engine only)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return accelerator.prepare_model(ref_model, evaluation_mode=True)
    import deepspeed

    bf16 = plugin.deepspeed_config.get("bf16", {}).get("enabled", False) is True or accelerator.mixed_precision == "bf16"
    config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": bf16}, "zero_optimization": {"stage": 0}}
    engine, *_ = deepspeed.initialize(model=ref_model, config=config)  # 1: required by DeepSpeed, unused here
    engine.eval()
    return engine


def check_batch_arithmetic(args: Args, world_size: int) -> int:
    per_step = args.per_device_train_batch_size * world_size
    if args.total_batch_size % per_step != 0:
        raise ValueError(
            f"total_batch_size={args.total_batch_size} is not divisible by per_device_train_batch_size="
            f"{args.per_device_train_batch_size} x processes={world_size} (= {per_step})"
        )
    return args.total_batch_size // per_step


def check_meta(dataset_path: str, tokenizer, model_path: str):
    """The data set must be tokenized with the model's tokenizer: same [PAD] and EOS ids as its meta.json."""
    meta_path = os.path.join(dataset_path, "meta.json")
    if os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        if meta["pad_token_id"] != tokenizer.pad_token_id or meta["eos_token_id"] != tokenizer.eos_token_id:
            raise ValueError(f"{meta_path}: pad/eos ids {meta['pad_token_id']}/{meta['eos_token_id']} differ from the tokenizer of {model_path}")


def load_gold_judge(args: Args):
    """The embedded task's hidden judge with --gold_task_dir, else None. Imported here only, so that the stage
    runs without embedded_task.py."""
    if not args.gold_task_dir:
        return None
    from embedded_task import GoldJudge

    return GoldJudge.from_dir(args.gold_task_dir)


def exit_without_finalization():
    """End a multi-process rank once every output is written. After a DDP wrapper was built, torch keeps the gloo
    process group and its worker threads alive past destroy_process_group; a worker still busy when the interpreter
    finalizes aborts the rank ("terminate called without an active exception"). os._exit skips that phase."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(args: Args) -> dict:
    import datasets

    use_bf16 = args.bf16 and (torch.cuda.is_available() or args.bf16_on_cpu)
    accelerator = make_accelerator(mixed_precision="bf16" if use_bf16 else "no")
    grad_accum = check_batch_arithmetic(args, accelerator.num_processes)
    configure_deepspeed(accelerator, args.per_device_train_batch_size, grad_accum)
    os.makedirs(args.output_dir, exist_ok=True)
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
    start_time = time.time()

    # Data: the preference pairs (training, validation) and the SFT validation queries (evaluation samples).
    pref_path, sft_path = os.path.join(args.dataset_path, "preference"), os.path.join(args.dataset_path, "sft")
    for path in (pref_path, sft_path):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path} not found: build the data set first with tldr_dataset.py")
    pref = datasets.load_from_disk(pref_path)
    for split in ("train", "validation"):
        if split not in pref:
            raise ValueError(f"{pref_path}: split {split!r} is missing")
        check_preference_split(pref[split], split)
    sft_data = datasets.load_from_disk(sft_path)
    if args.split not in sft_data or len(sft_data[args.split]) == 0:
        raise ValueError(f"{sft_path}: split {args.split!r} (--split) is missing or empty")
    sft_val = sft_data[args.split]  # the evaluation queries (Detail 13)
    tokenizer = load_tokenizer(args.sft_model_path)
    check_meta(args.dataset_path, tokenizer, args.sft_model_path)
    pad_id = tokenizer.pad_token_id
    judge = load_gold_judge(args)

    train = pref["train"]
    if args.num_train_pairs is not None:
        train = subset_pairs(train, args.num_train_pairs, args.seed)
    val_splits = {"val": pref["validation"]}
    if "validation_cnndm" in pref and len(pref["validation_cnndm"]):
        check_preference_split(pref["validation_cnndm"], "validation_cnndm")
        val_splits["val_cnndm"] = pref["validation_cnndm"]
    if args.num_val_pairs is not None:
        val_splits = {k: v.select(range(min(args.num_val_pairs, len(v)))) for k, v in val_splits.items()}

    set_seed(args.seed)  # Detail 10: identical model initialisation on every process
    model = load_policy(args.sft_model_path, tokenizer)  # Detail 32: the policy starts from the SFT model
    ref_model = load_reference(args.sft_model_path, tokenizer)  # Detail 32: frozen SFT reference, eval mode
    ref_model = prepare_reference(ref_model, accelerator)
    metrics = {}

    # The reference is frozen: its validation log-probabilities are computed once.
    ref_val = {k: pairs_logprobs(ref_model, ds, pad_id, args.per_device_eval_batch_size, accelerator) for k, ds in val_splits.items()}

    if args.eval_reference and judge is not None and not args.resume:
        set_seed(args.seed + accelerator.process_index * 100003)  # Detail 10: sampling differs per process
        ref_metrics, _ = sample_and_judge(ref_model, sft_val, tokenizer, args, accelerator, judge, tag="sft")
        metrics.update(ref_metrics)
        console.print(f"reference (SFT) policy: gold win rate {ref_metrics['sft_gold_win_rate']:.3f}")

    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(train.with_format("torch", columns=PAIR_COLUMNS), batch_size=args.per_device_train_batch_size,
                                         shuffle=True, drop_last=True, generator=generator)
    num_updates = args.num_train_epochs * (len(train) // args.total_batch_size)
    if num_updates == 0:
        raise ValueError(f"preference train split has {len(train)} pairs, fewer than one update of total_batch_size={args.total_batch_size}")
    optimizer, scheduler = make_optimizer(model, args, num_updates)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    scheduler.split_batches = True  # the scheduler steps once per update (not per process / micro-batch)

    ckpt_dir = os.path.join(args.output_dir, "checkpoint")
    update = 0
    if args.resume:
        if not os.path.isdir(ckpt_dir):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_dir}")
        accelerator.load_state(ckpt_dir)
        state = json.load(open(os.path.join(ckpt_dir, "progress.json")))
        update, metrics = state["update"], state["metrics"]
        console.print(f"resumed from {ckpt_dir} at update {update}")
    if args.track and accelerator.is_main_process:
        import wandb

        wandb.init(project=args.wandb_project_name, name=f"{args.exp_name}_{args.seed}", config=asdict(args))
    log = open(os.path.join(args.output_dir, "metrics.jsonl"), "a" if args.resume else "w") if accelerator.is_main_process else None

    model.train()
    micro_per_epoch = num_updates // args.num_train_epochs * grad_accum
    stat_keys = ["loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logprob", "rejected_logprob"]
    progress = Progress(TextColumn("[bold]DPO"), BarColumn(), TextColumn("{task.completed}/{task.total} updates"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                        disable=not accelerator.is_main_process)
    row = {}
    with progress:
        task = progress.add_task("dpo", total=num_updates, completed=update, info="")
        micro = update * grad_accum
        sums = torch.zeros(len(stat_keys), device=accelerator.device)
        for epoch in range(args.num_train_epochs):
            if micro >= (epoch + 1) * micro_per_epoch:
                continue
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            skip = micro - epoch * micro_per_epoch  # resume: the data position within the epoch
            epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
            for batch in epoch_loader:
                if micro >= (epoch + 1) * micro_per_epoch:
                    break
                chosen, rejected, query_lens = batch_tensors(batch, pad_id)
                with torch.no_grad():
                    ref_c, ref_r = pair_logprobs(ref_model, chosen, rejected, query_lens, pad_id)
                with accelerator.accumulate(model):
                    pi_c, pi_r = pair_logprobs(model, chosen, rejected, query_lens, pad_id)  # Detail 32: one forward
                    losses, cr, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, args.beta)
                    loss = losses.mean()
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                with torch.no_grad():
                    sums += torch.stack([loss.detach(), (cr > rr).float().mean(), (cr - rr).mean(), cr.mean(), rr.mean(),
                                         pi_c.detach().mean(), pi_r.detach().mean()])
                micro += 1
                if micro % grad_accum:
                    continue
                update += 1
                means = (accelerator.reduce(sums, "mean") / grad_accum).tolist()
                sums.zero_()
                row = {"update": update, **{f"train/{k}": v for k, v in zip(stat_keys, means)},
                       "lr": scheduler.get_last_lr()[0], "pairs": update * args.total_batch_size,
                       "elapsed_s": time.time() - start_time}
                if update == 1:  # Detail 32: the policy equals the reference on the first update: loss log(2)
                    metrics["initial_train_loss"] = row["train/loss"]
                if args.eval_every and update % args.eval_every == 0 and update < num_updates:
                    val = validate(model, val_splits, ref_val, pad_id, args, accelerator)
                    row.update({f"val/{k[4:]}": v for k, v in val.items() if k.startswith("val_") and "/" not in k})
                if not math.isfinite(row["train/loss"]):
                    raise RuntimeError(f"non-finite training loss at update {update}; last checkpoint: {ckpt_dir}")
                if log:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                if args.track and accelerator.is_main_process:
                    wandb.log(row, step=update)
                progress.update(task, completed=update, info=f"loss {row['train/loss']:.4f} acc {row['train/reward_accuracy']:.2f}")
                if args.save_every and update % args.save_every == 0 and update < num_updates:
                    accelerator.save_state(ckpt_dir)
                    if accelerator.is_main_process:
                        json.dump({"update": update, "metrics": metrics}, open(os.path.join(ckpt_dir, "progress.json"), "w"))

    metrics.update(validate(model, val_splits, ref_val, pad_id, args, accelerator))
    metrics["train_loss"] = row.get("train/loss", float("nan"))
    metrics["train_reward_accuracy"] = row.get("train/reward_accuracy", float("nan"))
    metrics["updates"] = update
    metrics["train_pairs"] = update * args.total_batch_size
    set_seed(args.seed + accelerator.process_index * 100003)  # Detail 10
    eval_metrics, rows = sample_and_judge(model, sft_val, tokenizer, args, accelerator, judge, tag="dpo")
    metrics.update(eval_metrics)
    if judge is not None:
        metrics["gold_win_rate"] = metrics["dpo_gold_win_rate"]
    metrics["wall_seconds"] = time.time() - start_time

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save, state_dict=accelerator.get_state_dict(model))
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "eval_samples.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        print_samples(rows, f"DPO samples ({args.split}, near-greedy)")
        console.print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if "/" not in k})
        if args.track:
            wandb.log({f"final/{k}": v for k, v in metrics.items()})
            wandb.finish()
    if log:
        log.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group of a multi-process run
    return metrics


if __name__ == "__main__":
    main(parse_args())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_without_finalization()
