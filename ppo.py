"""PPO for RLHF on TL;DR summarization, following "The N+ Implementation Details of RLHF with PPO"
(Huang et al., 2024). One self-contained script: read it top to bottom.

    accelerate launch --config_file deepspeed_zero2.yaml ppo.py --seed 1        # the paper's run (8 GPUs)
    python ppo.py --preset embedded --sft_model_path ... --reward_model_path ... --dataset_path ...   # CPU

Layout: Args and presets -> the small pure functions of PPO (each detail of DETAILS.md commented with its
number where it happens) -> models -> checkpoints -> evaluation -> `main`, the training loop: rollout, rewards and
advantages, PPO epochs, logging, evaluation, checkpointing.
"""

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import tyro
from accelerate import Accelerator
from rich.console import Console
from rich.pretty import pprint
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)

# Detail 24: the log-probability written at padding positions (after the response's EOS). Any constant works as
# long as policy and reference get the same one: their difference (the KL) is then exactly 0 there.
INVALID_LOGPROB = 1.0


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Args:
    # experiment
    exp_name: str = "ppo"
    """name of this experiment (wandb run name prefix)"""
    seed: int = 44413
    """the first of the paper's seeds (44413, 55513, 66613, 77713): model init is identical on all processes, sampling uses seed + rank * 100003 (Detail 10)"""
    preset: str = "paper"
    """'paper' (Pythia 1B, Detail 29), 'paper-2.8b', 'paper-6.9b', or 'embedded' (tiny CPU task)"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project_name: str = "tldr_rlhf"
    wandb_entity: Optional[str] = None
    output_dir: Optional[str] = None
    """metrics.jsonl, metrics.json, eval_samples.jsonl, checkpoints/ and the final policy go here; None:
    models/ppo_{base model name} (where eval_gpt_judge.py looks)"""
    num_threads: Optional[int] = None
    """torch.set_num_threads (CPU runs)"""

    # models and data
    base_model: str = "EleutherAI/pythia-1b-deduped"
    """the base model of the SFT and reward models: names the default folders; a Pythia size without --preset picks
    that size's preset (pythia-2.8b-deduped: paper-2.8b, pythia-6.9b-deduped: paper-6.9b)"""
    sft_model_path: Optional[str] = None
    """policy and reference policy start from here (save_pretrained dir of sft.py, with its tokenizer); None:
    models/sft_{base model name}"""
    reward_model_path: Optional[str] = None
    """reward model and value model start from here (ScalarModel dir of reward.py); None: models/reward_{base
    model name}"""
    dataset_path: str = "data/tldr"
    """tldr_dataset.py output: {dataset_path}/sft with query_token (left-padded)"""
    gold_task_dir: Optional[str] = None
    """embedded task only: the gold judge gives the win rate against the references at evaluation"""
    response_length: int = 53
    """Detail 20: exactly this many new tokens are sampled"""

    # batch arithmetic (Detail 29)
    total_episodes: int = 1_000_000
    """number of (query, response) episodes in the run; num_updates = total_episodes // total_batch_size"""
    total_batch_size: int = 512
    """episodes per update, summed over all processes"""
    per_device_train_batch_size: int = 16
    """micro-batch per process in the PPO epochs (1B: 16, 2.8B: 4, 6.9B: 1)"""
    gradient_accumulation_steps: Optional[int] = None
    """micro-batches per optimizer step; derived as total_batch_size / (processes * micro-batch * num_mini_batches)
    when None (1B on 8 GPUs: 4), else checked against that"""
    num_mini_batches: int = 1
    """optimizer steps per PPO epoch"""
    num_ppo_epochs: int = 4
    """passes over each rollout batch"""
    local_rollout_forward_batch_size: int = 64
    """per-process batch of the no-grad generation and forward passes (1B: 64, 2.8B: 32, 6.9B: 4)"""
    trim_query_padding: bool = True
    """drop the query columns that are padding in the whole rollout batch (same results, less compute)"""

    # optimisation (Detail 8, 9)
    lr: float = 3e-6
    eps: float = 1e-5
    anneal_lr: bool = True
    """Detail 9: linear decay lr_u = (1 - (u - 1) / U) * lr"""

    # PPO (Details 20-28)
    temperature: float = 0.7
    """Detail 20: rollout sampling temperature"""
    logprobs_use_temperature: bool = True
    """Detail 22: log-probabilities from logits / (T + 1e-7); False uses the raw logits (ablation)"""
    kl_coef: float = 0.05
    """Detail 25: beta, fixed"""
    score_placement: Literal["after_eos", "eos"] = "after_eos"
    """Detail 25: add the score at s + 1 (released code; falls back to s when s + 1 is past the end) or at s"""
    missing_eos_penalty: Literal["replace", "add", "none"] = "replace"
    """Detail 23: a response without EOS gets score := penalty_reward_value ('replace', released), score +=
    penalty_reward_value ('add'), or nothing ('none')"""
    penalty_reward_value: float = -1.0
    whiten_rewards: bool = False
    """Detail 26: whiten the per-token rewards (off in the released runs)"""
    gamma: float = 1.0
    lam: float = 0.95
    """Detail 27: GAE"""
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    """Detail 28"""

    # evaluation (Detail 13, 31)
    split: str = "validation"
    """the SFT split whose queries are sampled at evaluation: `validation` as released, or `test`"""
    eval_every: int = 200
    """evaluate every this many updates (0: only at the end)"""
    eval_at_start: bool = False
    """evaluate the SFT policy before the first update too"""
    num_eval_samples: Optional[int] = None
    """validation queries used at each evaluation (None: all)"""
    eval_temperature: float = 0.01
    """Detail 13: near-greedy"""
    eval_batch_size: int = 64
    """per-process generation batch at evaluation"""
    num_sample_rows: int = 4
    """rows of the rich table of samples printed at evaluation"""

    # checkpointing
    save_every: int = 200
    """save a resumable checkpoint every this many updates (0: never; always on non-finite loss)"""
    keep_checkpoints: int = 2
    resume: bool = False
    """continue from the newest checkpoint in {output_dir}/checkpoints"""
    save_model: bool = True
    """save the final policy (save_pretrained) and tokenizer to output_dir"""

    # DeepSpeed (Detail 30)
    offload: bool = False
    """run the reference and reward models on the CPU (ZeRO-3 parameter offload under DeepSpeed), as for 6.9B"""
    bf16_on_cpu: bool = False
    """bf16 mixed precision without CUDA too (elsewhere it comes from the launch config; lets the tests run it on CPU)"""

    # debugging and tests
    debug_stop_after_update: Optional[int] = None
    """simulate a crash: exit (code 17) right after the checkpoint of this update is written"""
    debug_nan_at_update: Optional[int] = None
    """inject a NaN into the loss at this update (tests the non-finite stop)"""


PRESETS = {
    "paper": Args(),
    # Detail 29: per-size micro-batch x accumulation on 8 GPUs and rollout forward batch
    "paper-2.8b": Args(base_model="EleutherAI/pythia-2.8b-deduped", per_device_train_batch_size=4,
                       local_rollout_forward_batch_size=32),
    "paper-6.9b": Args(base_model="EleutherAI/pythia-6.9b-deduped", per_device_train_batch_size=1,
                       local_rollout_forward_batch_size=4, offload=True),
    # tiny models on 2 CPU cores: small batches, a larger lr (the tiny models need it), few updates
    "embedded": Args(
        seed=1,
        output_dir="runs/quickstart/ppo",
        sft_model_path="runs/quickstart/sft",
        reward_model_path="runs/quickstart/rm",
        dataset_path="runs/quickstart/dataset",
        # 48 updates of 32 episodes at lr 1e-4 and beta 0.08, measured on the quickstart's s seeds 1-3 (SFT, RM fixed;
        # gold win rate of PPO): lr 3e-5, beta 0.05, 80 updates 0.40 / 0.285 / 0.595 (seed 2's RM score stalls at 0.33);
        # lr 1e-4, beta 0.05: seed 2 peaks at 0.49 after 30 updates, then over-optimises to 0.275 (KL 4.5); lr 1e-4,
        # beta 0.15: 0.29 (held back); lr 6e-5, beta 0.05: seed 2 0.485 but seed 1 0.30 (KL 4.0, over-optimised);
        # lr 1e-4, beta 0.08, 80 updates: 0.37 / 0.48 (seed 1 past its peak); 48 updates: 0.40 / 0.435 / 0.57
        total_episodes=1536,
        kl_coef=0.08,  # Detail 25: a fixed beta (no controller); 0.05 lets seed 1 over-optimise at this lr
        total_batch_size=32,
        per_device_train_batch_size=16,
        num_mini_batches=2,  # 2 optimizer steps per PPO epoch
        num_ppo_epochs=2,  # fewer passes than the paper's 4: the training passes dominate the CPU time
        local_rollout_forward_batch_size=32,
        lr=1e-4,  # tiny models from a brief pre-training need a larger step than Pythia's 3e-6
        eval_every=10,
        eval_at_start=True,
        num_eval_samples=200,  # the first 200 validation queries, as sft.py's embedded preset
        eval_batch_size=100,
        save_every=10,
        num_threads=2,
    ),
}


# The embedded preset's episodes by base-model size (quickstart.py and benchmark/sweep.py pass it), measured on the
# gold judge over seeds 1-3 of the sweep's chains and of the quickstart (docs/embedded_task.md). m's PPO win rate is
# level from update 10 on: 24 updates (768 episodes) gave 0.680 against 0.678 at 48 in half the stage's time. s (two
# heads of 32) climbs within 10 updates on some seeds and then over-optimises, and on others still climbs at 30: at 24
# updates the sweep's seed 1 gained +0.09, at 32 every seed of both gained at least +0.155 (+0.14 to +0.43 at 48).
# l still climbs at update 48 and keeps 48.
EMBEDDED_EPISODES_BY_SIZE = {"s": 1024, "m": 768, "l": 1536, "xl": 1536}


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
                   reward_model_path=args.reward_model_path or os.path.join("models", f"reward_{name}"),
                   output_dir=args.output_dir or os.path.join("models", f"ppo_{name}"))


@dataclass
class BatchSizes:
    world_size: int
    gradient_accumulation_steps: int
    local_batch_size: int  # episodes per update on one process
    local_mini_batch_size: int  # episodes per optimizer step on one process
    num_updates: int


def batch_arithmetic(args: Args, world_size: int) -> BatchSizes:
    """Detail 29: total_batch_size = processes x micro-batch x accumulation x minibatches; reject what does not divide."""
    micro, nmb = args.per_device_train_batch_size, args.num_mini_batches
    for name in ("total_batch_size", "per_device_train_batch_size", "num_mini_batches", "num_ppo_epochs",
                 "local_rollout_forward_batch_size", "response_length", "total_episodes"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}")
    per_step = world_size * micro * nmb
    if args.total_batch_size % per_step:
        raise ValueError(
            f"total_batch_size ({args.total_batch_size}) does not divide into num_processes ({world_size}) x "
            f"per_device_train_batch_size ({micro}) x num_mini_batches ({nmb}) = {per_step}: "
            f"{args.total_batch_size} % {per_step} = {args.total_batch_size % per_step}")
    ga = args.total_batch_size // per_step
    if args.gradient_accumulation_steps is not None and args.gradient_accumulation_steps != ga:
        raise ValueError(
            f"gradient_accumulation_steps ({args.gradient_accumulation_steps}) is inconsistent: total_batch_size "
            f"({args.total_batch_size}) / (num_processes ({world_size}) x per_device_train_batch_size ({micro}) x "
            f"num_mini_batches ({nmb})) = {ga}")
    local_batch_size = args.total_batch_size // world_size
    if local_batch_size % args.local_rollout_forward_batch_size:
        raise ValueError(
            f"local batch (total_batch_size {args.total_batch_size} / num_processes {world_size} = {local_batch_size}) does "
            f"not divide by local_rollout_forward_batch_size ({args.local_rollout_forward_batch_size})")
    if args.total_episodes < args.total_batch_size:
        raise ValueError(f"total_episodes ({args.total_episodes}) is smaller than total_batch_size ({args.total_batch_size})")
    return BatchSizes(world_size, ga, local_batch_size, local_batch_size // nmb, args.total_episodes // args.total_batch_size)


# ----------------------------------------------------------------------------------------------------------------
# The pieces of PPO, as small pure functions
# ----------------------------------------------------------------------------------------------------------------
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


def forward(model: nn.Module, ids: torch.Tensor, pad_id: int, **kwargs):
    """Detail 3 and 11: attention mask from the pad id, pads replaced by a valid id (0) before the embedding, and
    positions that count real tokens only (cumsum - 1), so a left-padded sequence gets the positions it has alone."""
    mask = ids != pad_id  # Detail 3: attention mask from the pad id
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # Detail 11: positions from the mask
    return model(input_ids=ids.masked_fill(~mask, 0), attention_mask=mask.long(), position_ids=position_ids, **kwargs)


def policy_response_logits(policy: nn.Module, query_responses: torch.Tensor, pad_id: int, context_length: int):
    """Logits that predict the response tokens only (logits_to_keep: no vocab projection of the query)."""
    response_length = query_responses.size(1) - context_length
    logits = forward(policy, query_responses, pad_id, logits_to_keep=response_length + 1).logits
    return logits[:, :-1]


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Detail 22: log-probabilities of `tokens` under softmax(logits / (T + 1e-7)) (T = 1 -> raw logits)."""
    logits = logits.float() / (temperature + 1e-7)
    token_logits = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return token_logits - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float() / (temperature + 1e-7)
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def padding_masks(sequence_lengths: torch.Tensor, response_length: int):
    """Detail 24: s = index of the last real response token (its EOS). Returns (padding_mask: positions > s,
    where logprobs are INVALID_LOGPROB and the policy loss ignores; padding_mask_p1: positions > s + 1, where
    values are 0 and the value loss ignores)."""
    idx = torch.arange(response_length, device=sequence_lengths.device)
    return idx > sequence_lengths.unsqueeze(1), idx > (sequence_lengths + 1).unsqueeze(1)


def apply_missing_eos_penalty(scores: torch.Tensor, contain_eos: torch.Tensor, mode: str, value: float):
    """Detail 23: a response with no EOS within its tokens gets its score replaced by `value` (-1, released),
    or `value` added ('add'), or is left alone ('none')."""
    if mode == "replace":
        return torch.where(contain_eos, scores, torch.full_like(scores, value))
    if mode == "add":
        return torch.where(contain_eos, scores, scores + value)
    if mode == "none":
        return scores
    raise ValueError(f"missing_eos_penalty must be 'replace', 'add' or 'none', got {mode!r}")


def per_token_rewards(logprobs, ref_logprobs, scores, sequence_lengths, kl_coef: float, score_placement: str):
    """Detail 25: reward_t = -beta * (logprob_t - ref_logprob_t), plus the score at the end of the response:
    at s + 1 (the slot after EOS, as released) when it exists, else at s; or at s ('eos').
    Returns (rewards, kl, non_score_reward)."""
    kl = logprobs - ref_logprobs  # exactly 0 at padding: both are INVALID_LOGPROB there (Detail 24)
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    response_length = rewards.size(1)
    if score_placement == "after_eos":
        at = torch.where(sequence_lengths + 1 < response_length, sequence_lengths + 1, sequence_lengths)
    elif score_placement == "eos":
        at = sequence_lengths
    else:
        raise ValueError(f"score_placement must be 'after_eos' or 'eos', got {score_placement!r}")
    at = at.clamp(min=0)  # an empty response (s = -1) gets its score at the first slot
    rewards[torch.arange(rewards.size(0), device=rewards.device), at] += scores
    return rewards, kl, non_score_reward


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance over the masked entries; shift_mean=False keeps the mean."""
    # Detail 27 (and 26): the population (biased) variance of the valid entries, + 1e-8 inside the root, as released
    mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased=False)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def compute_advantages(rewards, values, padding_mask, gamma: float, lam: float):
    """Detail 27: GAE backward over the response, returns = advantages + values; then the advantages are
    whitened over the valid positions (mean shifted) and set to 0 at padding."""
    response_length = rewards.size(1)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(response_length)):
        next_values = values[:, t + 1] if t + 1 < response_length else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    advantages = masked_whiten(advantages, ~padding_mask)
    advantages = advantages.masked_fill(padding_mask, 0.0)
    return advantages, returns


def ppo_losses(new_logprobs, old_logprobs, advantages, new_values, old_values, returns, padding_mask,
               padding_mask_p1, cliprange: float, cliprange_value: float, vf_coef: float):
    """Detail 28: clipped policy loss (masked by padding_mask) and clipped value loss (masked by padding_mask_p1);
    loss = policy loss + vf_coef * value loss. Returns (loss, dict of detached statistics)."""
    valid, valid_v = ~padding_mask, ~padding_mask_p1
    values_clipped = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    vf_losses1 = (new_values - returns) ** 2
    vf_losses2 = (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), valid_v)
    logratio = new_logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses1, pg_losses2), valid)
    loss = pg_loss + vf_coef * vf_loss
    with torch.no_grad():
        ratio_mean = masked_mean(ratio, valid)
        stats = {
            "loss/policy": pg_loss.detach(),
            "loss/value": vf_loss.detach(),
            "loss/total": loss.detach(),
            "policy/clipfrac": masked_mean((pg_losses2 > pg_losses1).float(), valid),
            "val/clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), valid_v),
            "policy/approxkl": 0.5 * masked_mean(logratio**2, valid),
            "val/ratio": ratio_mean,
            "val/ratio_std": masked_mean((ratio - ratio_mean) ** 2, valid).sqrt(),
            "val/ratio_max": torch.where(valid, ratio, -math.inf).max(),
            "val/ratio_min": torch.where(valid, ratio, math.inf).min(),
            "val/vpred": masked_mean(new_values, valid_v),
        }
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
class ScalarModelConfig(PretrainedConfig):
    """Config of the scalar reward model: the trunk's own config (as a dict) plus provenance."""

    model_type = "tldr_scalar_model"

    def __init__(self, base_config: Optional[dict] = None, hidden_size: int = 0, base_model: str = "", **kwargs):
        self.base_config = dict(base_config or {})
        self.hidden_size = int(hidden_size or self.base_config.get("hidden_size", 0))
        self.base_model = base_model
        super().__init__(**kwargs)


class ScalarModel(PreTrainedModel):
    """Detail 14: the SFT trunk (`trunk`, AutoModel) with a scalar head `Linear(hidden, 1)` (`scalar_head`), the
    same class and state-dict keys as reward.py's. Returns one score per position, shape (batch, length)."""

    config_class = ScalarModelConfig
    base_model_prefix = "trunk"

    def __init__(self, config: ScalarModelConfig):
        super().__init__(config)
        self.trunk = AutoModel.from_config(AutoConfig.for_model(**config.base_config))
        self.scalar_head = nn.Linear(config.hidden_size, 1)  # Detail 14: Linear(hidden, 1), loaded from the RM
        self.post_init()

    def _init_weights(self, module):  # every weight comes from the reward model checkpoint
        pass

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state
        return self.scalar_head(hidden).squeeze(-1)


class PolicyAndValue(nn.Module):
    """Detail 19: policy and value are separate networks, wrapped in one module so that one optimizer (and one
    DDP / DeepSpeed engine) trains both."""

    def __init__(self, policy: nn.Module, value_model: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    def forward(self, query_responses: torch.Tensor, pad_id: int, context_length: int):
        logits = policy_response_logits(self.policy, query_responses, pad_id, context_length)
        # value of the state before each response token: hidden states at context_length - 1 ... L - 2
        values = forward(self.value_model, query_responses, pad_id)[:, context_length - 1 : -1]
        return logits, values


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


def load_policy(path: str, tokenizer) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path)
    maybe_resize(model, tokenizer)
    model.generation_config.eos_token_id = None  # SPEC: generation never stops at EOS (Detail 20)
    return disable_dropout(model)


def load_scalar_model(path: str) -> nn.Module:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"reward_model_path {path!r} has no config.json (expected reward.py's output dir)")
    return disable_dropout(ScalarModel.from_pretrained(path))


def inference_ds_config(offload: bool, bf16: bool) -> dict:
    """Detail 30: DeepSpeed config of the frozen reference and reward models: plain bf16 inference engines, or
    ZeRO-3 with the parameters offloaded to the CPU (the paper's 6.9B setting)."""
    return {
        "train_micro_batch_size_per_gpu": 1,  # required by DeepSpeed, unused for inference
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}} if offload else {"stage": 0},
    }


def prepare_inference_model(model: nn.Module, accelerator: Accelerator, offload: bool) -> nn.Module:
    """Detail 19/30: frozen, eval mode. Under DeepSpeed an inference engine (bf16; ZeRO-3 with CPU parameter
    offload when --offload); otherwise on the accelerator, or on the CPU with --offload."""
    model.eval().requires_grad_(False)
    if accelerator.state.deepspeed_plugin is not None:
        import deepspeed

        ds_config = inference_ds_config(offload, bf16=accelerator.mixed_precision == "bf16")
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
        engine.input_device = accelerator.device  # inputs go to the GPU even when the weights are offloaded
        return engine
    model.input_device = torch.device("cpu") if offload else accelerator.device
    return model.to(model.input_device)


def zero_stages(*models) -> Optional[list]:
    """The ZeRO stage of each DeepSpeed engine (None when not under DeepSpeed), recorded in args.json."""
    stages = [m.zero_optimization_stage() for m in models if hasattr(m, "zero_optimization_stage")]
    return stages or None


def model_device(model: nn.Module) -> torch.device:
    """Where a model's inputs must be (set by prepare_inference_model; else where its weights are)."""
    return getattr(model, "input_device", None) or next(model.parameters()).device


@torch.no_grad()
def generate(policy: nn.Module, queries: torch.Tensor, pad_id: int, generation_config: GenerationConfig):
    """Detail 20 / 13: HF generate on left-padded queries (pads replaced by 0, attention mask given); with
    eos_token_id=None exactly max_new_tokens tokens come back. Returns query + response tokens."""
    mask = queries != pad_id
    # Speed: a preallocated ("static") KV cache instead of the default dynamic one, which concatenates every layer's
    # keys and values at every new token (38% of the generation time on CPU). Same logits, same samples; measured on
    # the benchmark's rollout batch (64 x 230-token queries, 53 tokens, 1 CPU thread): 8.2 s -> 6.0 s.
    out = policy.generate(input_ids=queries.masked_fill(~mask, 0), attention_mask=mask,
                          generation_config=generation_config, cache_implementation="static")
    return torch.cat([queries, out[:, queries.size(1):]], dim=1)


def decode_responses(tokenizer, responses: torch.Tensor):
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return [t.strip() for t in texts]


@torch.no_grad()
def reward_scores(reward_model: nn.Module, query_responses: torch.Tensor, pad_id: int, context_length: int):
    """Detail 15: the score is the head's output at the last non-pad token (the response's EOS)."""
    device = model_device(reward_model)
    out = forward(reward_model, query_responses.to(device), pad_id).to(query_responses.device)
    # Detail 15: the query is left-padded, so the last real token is just before the response's first pad
    last = first_true_indices(query_responses[:, context_length:] == pad_id) - 1 + context_length
    return out[torch.arange(out.size(0), device=out.device), last]


# ----------------------------------------------------------------------------------------------------------------
# Bookkeeping: data stream, checkpoints
# ----------------------------------------------------------------------------------------------------------------
def update_batch_indices(update: int, num_rows: int, batch_size: int, seed: int) -> torch.Tensor:
    """Global row indices of the queries of `update` (0-based): a fresh permutation per pass over the data
    (seeded with seed + pass, identical on every process); rank r takes its slice. The data position is a pure
    function of the update number, so a resumed run sees the same queries."""
    per_pass = num_rows // batch_size
    data_pass, pos = divmod(update, per_pass)
    perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + data_pass))
    return perm[pos * batch_size : (pos + 1) * batch_size]


def latest_checkpoint(output_dir: str) -> Optional[str]:
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    done = [d for d in os.listdir(root) if d.startswith("update_")
            and os.path.isfile(os.path.join(root, d, "trainer_state.json"))]
    return os.path.join(root, max(done)) if done else None


def save_checkpoint(accelerator: Accelerator, output_dir: str, name: str, trainer_state: dict, keep: int):
    """Policy + value, optimizer, scheduler, RNG states of every process (python, numpy, torch CPU/CUDA: the
    sampling generator is the per-rank seeded torch generator) via accelerate, plus the data position.
    trainer_state.json is written last: a checkpoint without it is incomplete and ignored by --resume."""
    path = os.path.join(output_dir, "checkpoints", name)
    if accelerator.is_main_process and os.path.isdir(path):
        shutil.rmtree(path)
    accelerator.wait_for_everyone()
    accelerator.save_state(path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            json.dump(trainer_state, f, indent=1)
        root = os.path.join(output_dir, "checkpoints")
        old = sorted(d for d in os.listdir(root) if d.startswith("update_"))
        for d in old[: max(0, len(old) - keep)] if name.startswith("update_") else []:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


class NonFiniteLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------------
# Evaluation (Detail 31)
# ----------------------------------------------------------------------------------------------------------------
def evaluate(args, accelerator, policy, reward_model, tokenizer, eval_data, judge, console, update: int):
    """Detail 31 / 13: near-greedy samples (T = 0.01, exactly response_length tokens, Detail 21 truncation) on
    validation queries, their RM score and, with a judge, the win rate against the references. Sampling uses a
    fixed per-rank seed inside fork_rng: evaluation never disturbs the training sampler."""
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    queries_all = eval_data["query_token"]
    n, world, rank = queries_all.size(0), accelerator.num_processes, accelerator.process_index
    per_rank = math.ceil(n / world)
    rows = torch.arange(rank * per_rank, (rank + 1) * per_rank).clamp(max=n - 1)  # pad with the last row
    # Detail 13: T = 0.01, top_k 0, top_p 1, exactly response_length new tokens (EOS does not stop generation)
    config = GenerationConfig(max_new_tokens=args.response_length, temperature=args.eval_temperature, top_k=0,
                              top_p=1.0, do_sample=True, eos_token_id=None, pad_token_id=pad_id)
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    responses, scores = [], []
    with torch.random.fork_rng(devices=devices), accelerator.autocast():
        torch.manual_seed(args.seed + rank * 100003 + 999_983)
        for i in range(0, per_rank, args.eval_batch_size):
            queries = queries_all[rows[i : i + args.eval_batch_size]]
            queries = (trim_left_padding(queries, pad_id) if args.trim_query_padding else queries).to(accelerator.device)
            qr = generate(policy, queries, pad_id, config)
            response = truncate_response(qr[:, queries.size(1):], eos_id, pad_id)  # Detail 21
            qr = torch.cat([queries, response], 1)
            responses.append(response)
            scores.append(reward_scores(reward_model, qr, pad_id, queries.size(1)).float())
    responses = accelerator.gather(torch.cat(responses)).cpu()[:n] if world > 1 else torch.cat(responses).cpu()
    scores = accelerator.gather(torch.cat(scores)).cpu()[:n] if world > 1 else torch.cat(scores).cpu()
    # gather concatenates the ranks' contiguous slices in rank order, so row j is validation row j
    metrics = {}
    if accelerator.is_main_process:
        lengths = first_true_indices(responses == pad_id)
        contain_eos = (responses == eos_id).any(1)
        texts = decode_responses(tokenizer, responses)  # no EOS, no pads
        references = [ref.replace(tokenizer.eos_token, "").strip() for ref in eval_data["reference_response"]]
        metrics = {
            "eval/rm_score": scores.mean().item(),
            "eval/response_length": lengths.float().mean().item(),
            "eval/non_eos_rate": 1.0 - contain_eos.float().mean().item(),
        }
        gold_rows = None
        if judge is not None:  # Detail 31: the judge's win rate against the references (the embedded task's)
            gold, gold_rows = judge.sample_metrics(eval_data["query"], texts, references)
            metrics.update({f"eval/{k}": v for k, v in gold.items()})
        with open(os.path.join(args.output_dir, "eval_samples.jsonl"), "w") as f:
            for j in range(n):
                f.write(json.dumps({
                    "id": eval_data["id"][j], "query": eval_data["query"][j], "response": texts[j],
                    "reference": references[j], "response_token_len": int(lengths[j]),
                    "reference_token_len": int(eval_data["reference_response_token_len"][j]),
                    "score": scores[j].item(), "update": update,
                    **(gold_rows[j] if gold_rows else {})}) + "\n")
        table = Table(title=f"eval samples after update {update}", show_lines=True)
        for col in ("query (end)", "response", "reference", "score"):
            table.add_column(col)
        for j in range(min(args.num_sample_rows, n)):
            table.add_row("..." + eval_data["query"][j][-120:], texts[j], references[j], f"{scores[j].item():.2f}")
        console.print(table)
        console.print({k: round(v, 4) for k, v in metrics.items()})
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_gold_judge(args: Args):
    """The embedded task's hidden judge with --gold_task_dir, else None. Imported here only, so that the stage
    runs without embedded_task.py."""
    if not args.gold_task_dir:
        return None
    from embedded_task import GoldJudge

    return GoldJudge.from_dir(args.gold_task_dir)


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


def main(args: Args):
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    sizes = batch_arithmetic(args, world_size)  # fail before any model is loaded
    accelerator = make_accelerator(mixed_precision="bf16" if args.bf16_on_cpu else None)
    console = Console(force_terminal=False) if accelerator.is_main_process else Console(quiet=True)
    rank = accelerator.process_index
    os.makedirs(args.output_dir, exist_ok=True)

    # ---- data --------------------------------------------------------------------------------------------------
    from datasets import load_from_disk

    sft_dir = os.path.join(args.dataset_path, "sft")
    if not os.path.isdir(sft_dir):
        raise ValueError(f"dataset_path {args.dataset_path!r} has no 'sft' DatasetDict (tldr_dataset.py output)")
    data = load_from_disk(sft_dir)
    for split in ("train", args.split):
        if split not in data or "query_token" not in data[split].column_names:
            raise ValueError(f"{sft_dir}: split {split!r} with a 'query_token' column is required")
    train_queries = torch.tensor(data["train"]["query_token"], dtype=torch.long)
    if train_queries.size(0) < args.total_batch_size:
        raise ValueError(f"{sft_dir} train has {train_queries.size(0)} rows, fewer than total_batch_size {args.total_batch_size}")
    val = data[args.split]  # Detail 31: the evaluation queries (validation as released, or --split test)
    n_eval = len(val) if args.num_eval_samples is None else min(args.num_eval_samples, len(val))
    val = val.select(range(n_eval))
    eval_data = {k: val[k] for k in ("id", "query", "reference_response", "reference_response_token_len")}
    eval_data["query_token"] = torch.tensor(val["query_token"], dtype=torch.long)
    meta_path = os.path.join(args.dataset_path, "meta.json")
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}

    # ---- models -------------------------------------------------------------------------------------------------
    # Detail 19: four separate networks: policy and reference from SFT, value and reward from the RM
    tokenizer = load_tokenizer(args.sft_model_path)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if "pad_token_id" in meta and meta["pad_token_id"] != pad_id:
        raise ValueError(f"{meta_path}: pad_token_id {meta['pad_token_id']} != the SFT tokenizer's {pad_id}")
    set_seed(args.seed)  # Detail 10: identical model init on every process (all weights are loaded)
    policy = load_policy(args.sft_model_path, tokenizer)
    ref_policy = load_policy(args.sft_model_path, tokenizer)
    value_model = load_scalar_model(args.reward_model_path)  # value model starts from the RM (normalised bias)
    reward_model = load_scalar_model(args.reward_model_path)
    model = PolicyAndValue(policy, value_model)
    # Detail 8: one AdamW (eps 1e-5, default weight decay) over policy and value, no gradient clipping
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=args.eps)
    # Detail 9: linear decay, lr at update u (1-based) of U = (1 - (u - 1) / U) * lr; stepped once per update
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: 1.0 - done / sizes.num_updates if args.anneal_lr else 1.0)
    # no dataloader is prepared: DeepSpeed gets the micro-batch and accumulation of one optimizer step (Detail 29)
    configure_deepspeed(accelerator, args.per_device_train_batch_size, sizes.gradient_accumulation_steps)
    model, optimizer = accelerator.prepare(model, optimizer)  # Detail 30: ZeRO-2 bf16 engine under DeepSpeed
    accelerator.register_for_checkpointing(scheduler)
    ref_policy = prepare_inference_model(ref_policy, accelerator, args.offload)
    reward_model = prepare_inference_model(reward_model, accelerator, args.offload)
    judge = load_gold_judge(args) if accelerator.is_main_process else None  # evaluation judges on rank 0

    # Detail 10: sampling differs per process; the global torch generator is the sampling generator
    set_seed(args.seed + rank * 100003)
    start_update, metrics_history = 0, []
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    if args.resume:
        ckpt = latest_checkpoint(args.output_dir)
        if ckpt is None:
            console.print(f"[resume] no complete checkpoint in {args.output_dir}/checkpoints: starting afresh")
        else:
            accelerator.load_state(ckpt)  # weights, optimizer, scheduler, RNG states of this process
            state = json.load(open(os.path.join(ckpt, "trainer_state.json")))
            start_update = state["update"]
            if state["num_updates"] != sizes.num_updates or state["total_batch_size"] != args.total_batch_size:
                raise ValueError(f"{ckpt} was written with num_updates {state['num_updates']} / total_batch_size "
                                 f"{state['total_batch_size']}; this run has {sizes.num_updates} / {args.total_batch_size}")
            if os.path.isfile(metrics_path):
                metrics_history = [json.loads(l) for l in open(metrics_path)]
                metrics_history = [m for m in metrics_history if m["update"] <= start_update]
            console.print(f"[resume] continuing after update {start_update} from {ckpt}")
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump({**asdict(args), "num_processes": accelerator.num_processes,
                       "gradient_accumulation_steps": sizes.gradient_accumulation_steps,
                       "num_updates": sizes.num_updates, "zero_stages": zero_stages(model, ref_policy, reward_model)},
                      f, indent=1)
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in metrics_history)
        pprint({**asdict(sizes)})
    tracker = None
    if args.track and accelerator.is_main_process:
        import wandb

        tracker = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args),
                             name=f"{args.exp_name}__{args.seed}__{int(time.time())}", resume="allow")

    unwrapped = accelerator.unwrap_model(model)
    # Detail 20: T = 0.7, top_k 0, top_p 1, exactly response_length tokens (EOS does not stop generation)
    generation_config = GenerationConfig(max_new_tokens=args.response_length, temperature=args.temperature,
                                         top_k=0, top_p=1.0, do_sample=True, eos_token_id=None, pad_token_id=pad_id)
    logprob_temperature = args.temperature if args.logprobs_use_temperature else 1.0  # Detail 22 switch
    device, fwd_bs = accelerator.device, args.local_rollout_forward_batch_size
    micro, ga = args.per_device_train_batch_size, sizes.gradient_accumulation_steps
    stat_shape = (args.num_ppo_epochs, args.num_mini_batches, ga)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    eval_metrics = {}
    if args.eval_at_start and start_update == 0:
        eval_metrics = evaluate(args, accelerator, unwrapped.policy, reward_model, tokenizer, eval_data, judge,
                                console, update=0)
        if accelerator.is_main_process:
            initial = {"update": 0, "episodes": 0, **eval_metrics}
            metrics_history.append(initial)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(initial) + "\n")

    progress = Progress(TextColumn("[bold]PPO"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.description}"), console=console,
                        disable=not accelerator.is_main_process)
    task = progress.add_task("", total=sizes.num_updates, completed=start_update)
    progress.start()
    model.train()
    for update in range(start_update + 1, sizes.num_updates + 1):
        # ============ rollout ============
        idx = update_batch_indices(update - 1, train_queries.size(0), args.total_batch_size, args.seed)
        queries = train_queries[idx[rank * sizes.local_batch_size : (rank + 1) * sizes.local_batch_size]]
        if args.trim_query_padding:
            queries = trim_left_padding(queries, pad_id)
        queries = queries.to(device)
        context_length = queries.size(1)
        sync(); t0 = time.perf_counter()
        with torch.no_grad(), accelerator.autocast():
            query_responses = torch.cat([generate(unwrapped.policy, queries[i : i + fwd_bs], pad_id, generation_config)
                                         for i in range(0, queries.size(0), fwd_bs)])
        responses = truncate_response(query_responses[:, context_length:], eos_id, pad_id)  # Detail 21
        query_responses = torch.cat([queries, responses], 1)
        sync(); t1 = time.perf_counter()
        logprobs, ref_logprobs, values, raw_scores = [], [], [], []
        with torch.no_grad(), accelerator.autocast():
            for i in range(0, queries.size(0), fwd_bs):
                qr, resp = query_responses[i : i + fwd_bs], responses[i : i + fwd_bs]
                logits, value = unwrapped(qr, pad_id, context_length)
                logprobs.append(logprobs_from_logits(logits, resp, logprob_temperature))  # Detail 22
                del logits
                ref_device = model_device(ref_policy)
                ref_logits = policy_response_logits(ref_policy, qr.to(ref_device), pad_id, context_length)
                ref_logprobs.append(logprobs_from_logits(ref_logits, resp.to(ref_device), logprob_temperature).to(device))
                del ref_logits
                values.append(value.float())
                raw_scores.append(reward_scores(reward_model, qr, pad_id, context_length).float())
        logprobs, ref_logprobs = torch.cat(logprobs), torch.cat(ref_logprobs)
        values, raw_scores = torch.cat(values), torch.cat(raw_scores)

        # ============ per-token rewards and advantages ============
        contain_eos = (responses == eos_id).any(1)
        sequence_lengths = first_true_indices(responses == pad_id) - 1  # s: index of the last real token
        padding_mask, padding_mask_p1 = padding_masks(sequence_lengths, args.response_length)
        scores = apply_missing_eos_penalty(raw_scores, contain_eos, args.missing_eos_penalty,
                                           args.penalty_reward_value)  # Detail 23
        logprobs = logprobs.masked_fill(padding_mask, INVALID_LOGPROB)  # Detail 24
        ref_logprobs = ref_logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
        values = values.masked_fill(padding_mask_p1, 0.0)
        rewards, kl, non_score_reward = per_token_rewards(logprobs, ref_logprobs, scores, sequence_lengths,
                                                          args.kl_coef, args.score_placement)  # Detail 25
        if args.whiten_rewards:  # Detail 26: off by default
            rewards = masked_whiten(rewards, ~padding_mask_p1, shift_mean=False).masked_fill(padding_mask_p1, 0.0)
        advantages, returns = compute_advantages(rewards, values, padding_mask, args.gamma, args.lam)  # Detail 27
        sync(); t2 = time.perf_counter()

        # ============ PPO epochs ============
        lr_used = scheduler.get_last_lr()[0]
        stats = {}
        nonfinite = torch.zeros((), device=device)
        for epoch in range(args.num_ppo_epochs):
            perm = torch.randperm(sizes.local_batch_size)
            for mb, mb_start in enumerate(range(0, sizes.local_batch_size, sizes.local_mini_batch_size)):
                mb_inds = perm[mb_start : mb_start + sizes.local_mini_batch_size]
                for acc, micro_start in enumerate(range(0, sizes.local_mini_batch_size, micro)):
                    with accelerator.accumulate(model):
                        inds = mb_inds[micro_start : micro_start + micro].to(device)
                        pm, pm1 = padding_mask[inds], padding_mask_p1[inds]
                        logits, new_values = model(query_responses[inds], pad_id, context_length)
                        new_logprobs = logprobs_from_logits(logits, responses[inds], logprob_temperature)
                        new_logprobs = new_logprobs.masked_fill(pm, INVALID_LOGPROB)
                        new_values = new_values.float().masked_fill(pm1, 0.0)
                        loss, mstats = ppo_losses(new_logprobs, logprobs[inds], advantages[inds], new_values,
                                                  values[inds], returns[inds], pm, pm1, args.cliprange,
                                                  args.cliprange_value, args.vf_coef)  # Detail 28
                        if update == args.debug_nan_at_update:
                            loss = loss * float("nan")
                        with torch.no_grad():
                            mstats["policy/entropy"] = masked_mean(entropy_from_logits(logits, logprob_temperature), ~pm)
                        del logits
                        nonfinite += (~torch.isfinite(loss.detach())).float()
                        if acc == ga - 1:  # one check per optimizer step, before the step can happen
                            if accelerator.reduce(nonfinite, "sum").item() > 0:
                                path = save_checkpoint(accelerator, args.output_dir, f"nonfinite_update_{update:06d}",
                                                       {"update": update - 1, "note": "non-finite loss"}, 0)
                                raise NonFiniteLossError(
                                    f"non-finite loss at update {update}, PPO epoch {epoch}, minibatch {mb}: stopping "
                                    f"before the optimizer step; state (weights before this step) saved in {path}. "
                                    "Lower --lr or check the reward model's scores.")
                        accelerator.backward(loss)
                        optimizer.step()
                        optimizer.zero_grad()
                    for k, v in mstats.items():
                        stats.setdefault(k, torch.zeros(stat_shape, device=device))[epoch, mb, acc] = v
        scheduler.step()
        sync(); t3 = time.perf_counter()

        # ============ logging (statistics gathered across processes) ============
        with torch.no_grad():
            mean_kl = kl.sum(1).mean()
            log_ratio_ref = ref_logprobs - logprobs  # 0 at padding
            rollout_stats = {
                "objective/scores": scores.mean(),
                "objective/rm_scores": raw_scores.mean(),
                "objective/non_eos_rate": 1.0 - contain_eos.float().mean(),
                "objective/kl": mean_kl,  # the estimator in the reward, summed over tokens
                "objective/kl_k3": (torch.expm1(log_ratio_ref) - log_ratio_ref).sum(1).mean(),
                "objective/entropy": (-logprobs.masked_fill(padding_mask, 0.0)).sum(1).mean(),
                "objective/non_score_reward": non_score_reward.sum(1).mean(),
                "objective/rlhf_reward": scores.mean() - args.kl_coef * mean_kl,
                "objective/response_length": (sequence_lengths + 1).float().mean(),
                "val/advantages": masked_mean(advantages, ~padding_mask),
                "val/returns": masked_mean(returns, ~padding_mask_p1),
                "val/values": masked_mean(values, ~padding_mask_p1),
            }
            means = {k: v.mean() for k, v in stats.items() if k not in ("val/ratio_max", "val/ratio_min")}
            means.update(rollout_stats)
            keys = list(means)
            reduced = accelerator.reduce(torch.stack([means[k].float() for k in keys]), "mean").tolist()
            # with dropout off the first minibatch of the first epoch recomputes the rollout logprobs: ratio == 1
            first_mb = stats["val/ratio_max"][0, 0], stats["val/ratio_min"][0, 0]
            extremes = torch.stack([stats["val/ratio_max"].max(), -stats["val/ratio_min"].min(),
                                    torch.maximum(first_mb[0] - 1.0, 1.0 - first_mb[1]).max()])
            ratio_max, neg_ratio_min, first_mb_dev = accelerator.reduce(extremes, "max").tolist()
        phase_time = {"time/generation": t1 - t0, "time/rollout_forward": t2 - t1, "time/training": t3 - t2}
        episodes = update * args.total_batch_size
        metrics = {"update": update, "episodes": episodes, **dict(zip(keys, reduced)), "val/ratio_max": ratio_max,
                   "val/ratio_min": -neg_ratio_min, "debug/first_minibatch_ratio_dev": first_mb_dev,
                   "lr": lr_used, "eps": args.total_batch_size / (t3 - t0), **phase_time}

        # ============ evaluation, checkpoint ============
        if (args.eval_every and update % args.eval_every == 0) or update == sizes.num_updates:  # Detail 31
            model.eval()
            eval_metrics = evaluate(args, accelerator, unwrapped.policy, reward_model, tokenizer, eval_data, judge,
                                    console, update)
            model.train()
            metrics.update(eval_metrics)
        if accelerator.is_main_process:
            metrics_history.append(metrics)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if tracker is not None:
                tracker.log(metrics, step=update)
            progress.update(task, completed=update, description=(
                f"score {metrics['objective/scores']:.3f} kl {metrics['objective/kl']:.3f} "
                f"len {metrics['objective/response_length']:.1f} eps {metrics['eps']:.1f}"))
        if args.save_every and (update % args.save_every == 0) and update < sizes.num_updates:
            save_checkpoint(accelerator, args.output_dir, f"update_{update:06d}",
                            {"update": update, "episodes": episodes, "data_position": episodes,
                             "num_updates": sizes.num_updates, "total_batch_size": args.total_batch_size}, args.keep_checkpoints)
            if update == args.debug_stop_after_update:
                progress.stop()
                console.print(f"[debug] stopping after the checkpoint of update {update}")
                sys.stdout.flush()
                os._exit(17)
    progress.stop()

    # ============ final metrics and model ============
    if accelerator.is_main_process:
        last = metrics_history[-1]
        trained = [m for m in metrics_history if "objective/kl" in m]
        final = {
            "final_kl": last["objective/kl"],
            "final_score": last["objective/scores"],
            "final_rm_score": last["objective/rm_scores"],
            "final_non_eos_rate": last["objective/non_eos_rate"],
            "final_response_length": last["objective/response_length"],
            "episodes_per_second": sum(args.total_batch_size for _ in trained) / max(
                1e-9, sum(m["time/generation"] + m["time/rollout_forward"] + m["time/training"] for m in trained)),
            "num_updates": sizes.num_updates,
            "episodes": sizes.num_updates * args.total_batch_size,
            "eval_rm_score": eval_metrics.get("eval/rm_score"),
            "eval_response_length": eval_metrics.get("eval/response_length"),
            "eval_non_eos_rate": eval_metrics.get("eval/non_eos_rate"),
        }
        if "eval/gold_win_rate" in eval_metrics:
            final["gold_win_rate"] = eval_metrics["eval/gold_win_rate"]
            final["gold_score"] = eval_metrics["eval/gold_score"]
        first_eval = next((m for m in metrics_history if m.get("update") == 0 and "eval/rm_score" in m), None)
        if first_eval is not None:
            final["initial_eval_rm_score"] = first_eval["eval/rm_score"]
            if "eval/gold_win_rate" in first_eval:
                final["initial_gold_win_rate"] = first_eval["eval/gold_win_rate"]
                final["initial_gold_score"] = first_eval["eval/gold_score"]
        final = {k: v for k, v in final.items() if v is not None}
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump(final, f, indent=1)
        console.print(final)
        if tracker is not None:
            tracker.summary.update(final)
            tracker.finish()
    if args.save_model:
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            policy_state = {k[len("policy."):]: v for k, v in state_dict.items() if k.startswith("policy.")}
            unwrapped.policy.save_pretrained(args.output_dir, state_dict=policy_state)
            tokenizer.save_pretrained(args.output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_without_finalization():
    """End a multi-process rank once every output is written. After a DDP wrapper was built, torch keeps the gloo
    process group and its worker threads alive past destroy_process_group; a worker still busy when the interpreter
    finalizes aborts the rank ("terminate called without an active exception"). os._exit skips that phase."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(parse_args())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_without_finalization()
