"""Reward-model stage of the TL;DR RLHF pipeline (CleanRL style, one self-contained file).

The SFT model's trunk plus a `Linear(hidden, 1)` head, trained for one epoch on the pairwise preferences with
`-logsigmoid(r_chosen - r_rejected)`, each training pair seen exactly once. The reward is then shifted so that
the SFT training references score 0 on average (through the head's bias, so the saved model carries it), and
validation accuracy is reported overall, by confidence, by policy pair and on CNN/DM.

    python reward.py --preset embedded --sft_model_path runs/quickstart/sft \
        --dataset_path runs/quickstart/dataset --output_dir runs/quickstart/rm
    accelerate launch --num_processes 8 reward.py --sft_model_path models/sft_pythia-1b-deduped ...

total_batch_size = per_device_train_batch_size x gradient_accumulation_steps x processes (the accumulation steps
are derived). `--gold_task_dir` (embedded task only) adds the gold-judge metrics of embedded_diagnostics.py.
"""

import json
import math
import os
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from datasets import Dataset, DatasetDict, load_from_disk
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

INVALID_PAD_ID = 0  # Detail 3: pad ids are replaced by this valid id before the embedding


@dataclass
class Args:
    # experiment
    exp_name: str = "reward"
    """the name of this experiment"""
    preset: str = "paper"
    """`paper` (DETAILS.md values, Pythia) or `embedded` (small CPU values for the offline task)"""
    seed: int = 44413
    """seed of the experiment (model init identical on every process, Detail 10)"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without network)"""
    wandb_project_name: str = "tldr_rlhf"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    run_name: Optional[str] = None
    """the run name (default: exp_name__seed__time)"""

    # models and data
    base_model: str = "EleutherAI/pythia-1b-deduped"
    """the pretrained base model the SFT model came from (recorded for provenance; names the default folders)"""
    sft_model_path: Optional[str] = None
    """directory of the SFT policy written by sft.py (GPTNeoXForCausalLM + tokenizer); the RM trunk starts here.
    None: models/sft_{base model name}"""
    dataset_path: str = "data/tldr"
    """directory written by tldr_dataset.py (holds sft/, preference/ and meta.json)"""
    output_dir: Optional[str] = None
    """where the reward model, tokenizer, args.json and metrics.json are written; None: models/reward_{base model
    name} (where ppo.py looks)"""

    # optimisation (Details 8, 9, 16)
    lr: float = 3e-6
    """learning rate (Detail 8)"""
    eps: float = 1e-5
    """AdamW epsilon (Detail 8)"""
    total_batch_size: int = 64
    """pairs per update across all processes (Detail 16)"""
    per_device_train_batch_size: int = 8
    """pairs per micro-batch per process; gradient_accumulation_steps = total / (micro x processes)"""
    num_train_epochs: int = 1
    """epochs over the preference training split (Detail 16: one)"""
    num_train_pairs: Optional[int] = None
    """use a seeded random subset of N training pairs (after dropping identical pairs); None = all"""
    bf16: bool = True
    """bf16 mixed precision when CUDA is available (ignored on CPU unless --bf16_on_cpu)"""
    bf16_on_cpu: bool = False
    """take the bf16 autocast path without CUDA too (slow; lets the tests run it on CPU)"""
    identical_pairs: str = "skip"
    """pairs with chosen == rejected: `skip` (count, warn, skip) or `error` (ValueError)"""
    group_pairs_by_post: bool = False
    """micro-batches take the pairs of whole posts in a row (the posts in a seeded shuffle, every pair still once:
    Detail 16), and each distinct query and summary of a micro-batch runs once (`forward_pair` with `query_lens`).
    For many comparisons per post (`collect_feedback.py --all_pairs`: 15 of a post's 6 samples, as InstructGPT
    batched a prompt's comparisons). Off: the pairs in a seeded shuffle (the paper)"""

    # evaluation and normalisation (Details 17, 18)
    per_device_eval_batch_size: int = 16
    """sequences per forward pass in evaluation / normalisation"""
    num_val_pairs: Optional[int] = None
    """use a seeded random subset of N pairs of each validation split; None = all"""
    fixed_val_dataset_path: Optional[str] = None
    """another preference data set (tldr_dataset.py output) whose validation split is scored too, as `val_fixed_*`:
    pairs that stay the same when the training comparisons come from each model size's own policy, as the paper's
    human validation set does for every size (the embedded quickstart passes the task's generated comparisons)"""
    norm_num_samples: Optional[int] = None
    """number of SFT train (query, reference) sequences for the reward normalisation; None = all"""
    norm_recompute_samples: Optional[int] = None
    """after the shift, re-score this many of the normalisation sequences (None = all) to check the saved bias;
    with a subset, the after-normalisation mean/std are `before - mean` over the whole set"""
    num_table_rows: int = 4
    """validation pairs shown in the rich table"""
    gold_task_dir: Optional[str] = None
    """embedded task only: its directory; adds the gold-judge metrics of embedded_diagnostics.py (gold_agreement,
    correlations), which needs that file and embedded_task.py beside reward.py"""
    num_gold_samples: int = 256
    """embedded task only (with --gold_task_dir): SFT validation posts for the RM-vs-gold correlations"""
    save_seen_ids: bool = False
    """debug: write the training pair indices each rank saw (and its initial head weights) to
    output_dir/seen_ids_rank{r}.json"""
    log_every: int = 10
    """log the running train loss / accuracy every this many updates"""


PRESETS: Dict[str, Args] = {
    "paper": Args(),
    "embedded": Args(
        preset="embedded",
        seed=1,
        base_model="runs/quickstart/task/base-m",
        sft_model_path="runs/quickstart/sft",
        dataset_path="runs/quickstart/dataset",
        output_dir="runs/quickstart/rm",
        lr=1e-3,  # tiny, briefly pre-trained models need a far larger step than Pythia's 3e-6
        total_batch_size=8,  # many small steps: on the tiny task batches of 8 agree with the gold judge more than 32
        per_device_train_batch_size=8,
        num_train_pairs=None,
        per_device_eval_batch_size=64,
        num_val_pairs=500,
        norm_num_samples=256,
        norm_recompute_samples=64,
        num_gold_samples=128,
        gold_task_dir=None,
        bf16=False,
    ),
}


# The embedded preset's learning rate by base-model size (quickstart.py and benchmark/sweep.py pass it): 1e-3 was chosen
# at s and kept at m and l (the 1.4M model); the 4.0M-parameter xl RM at 1e-3 reached validation accuracy 0.568, at
# 3e-4 0.612 with gold agreement 0.787 against 0.736 (one seed, the same rater pairs, earlier PPO preset; it was named
# l before 2026-12-07; docs/embedded_task.md)
EMBEDDED_LR_BY_SIZE = {"s": 1e-3, "m": 1e-3, "l": 1e-3, "xl": 3e-4}


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
                   output_dir=args.output_dir or os.path.join("models", f"reward_{name}"))


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
class ScalarModelConfig(PretrainedConfig):
    """Config of the scalar reward model: the trunk's own config (as a dict) plus provenance."""

    model_type = "tldr_scalar_model"

    def __init__(self, base_config: Optional[dict] = None, hidden_size: int = 0, base_model: str = "", **kwargs):
        self.base_config = dict(base_config or {})
        self.hidden_size = int(hidden_size or self.base_config.get("hidden_size", 0))
        self.base_model = base_model
        super().__init__(**kwargs)


class ScalarModel(PreTrainedModel):
    """Trunk (AutoModel, GPT-NeoX) + `Linear(hidden, 1)` head; forward returns one scalar per position (B, T).

    `ScalarModel.from_sft(path)` builds it from an SFT checkpoint; `save_pretrained` / `from_pretrained`
    round-trip every weight (trunk and head, bias included) without needing the SFT directory again.
    """

    config_class = ScalarModelConfig
    base_model_prefix = "trunk"

    def __init__(self, config: ScalarModelConfig, trunk: Optional[nn.Module] = None):
        super().__init__(config)
        if trunk is None:
            trunk = AutoModel.from_config(AutoConfig.for_model(**config.base_config))
        self.trunk = trunk
        self.scalar_head = nn.Linear(config.hidden_size, 1)
        init_reward_head(self.scalar_head)
        self.post_init()

    def _init_weights(self, module):
        if module is self.scalar_head:
            init_reward_head(module)

    @classmethod
    def from_sft(cls, sft_model_path: str, base_model: str = "") -> "ScalarModel":
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the LM head (embed_out) is expectedly unused: silence the load report
        try:
            trunk = AutoModel.from_pretrained(sft_model_path)  # GPTNeoXModel from the GPTNeoXForCausalLM checkpoint
        finally:
            hf_logging.set_verbosity(verbosity)
        config = ScalarModelConfig(
            base_config=trunk.config.to_dict(), hidden_size=trunk.config.hidden_size, base_model=base_model
        )
        return cls(config, trunk=trunk)

    def forward(self, input_ids, attention_mask=None, position_ids=None, suffix_ids=None, suffix_mask=None,
                suffix_position_ids=None, suffix_prefix_index=None):
        """One scalar per position (B, T). With `suffix_*`, the rows of `input_ids` are prefixes and suffix row j
        continues prefix row `suffix_prefix_index[j]`: the trunk runs over each prefix once and over the suffixes with
        the prefixes' key/value cache, and the suffixes' scalars (one row per suffix) are returned: the values of the
        full sequences, for less work."""
        shared = suffix_ids is not None
        out = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=shared)
        if not shared:
            return self.scalar_head(out.last_hidden_state).squeeze(-1)
        out.cache.batch_select_indices(suffix_prefix_index)  # differentiable: a prefix's gradient sums over its suffixes
        mask = torch.cat([attention_mask[suffix_prefix_index], suffix_mask], dim=1)
        hidden = self.trunk(input_ids=suffix_ids, attention_mask=mask, position_ids=suffix_position_ids,
                            cache=out.cache, use_cache=True).last_hidden_state
        return self.scalar_head(hidden).squeeze(-1)


def init_reward_head(head: nn.Linear) -> None:
    # Detail 14: head weight ~ N(0, std = 1/sqrt(hidden + 1)), bias 0
    with torch.no_grad():
        head.weight.normal_(mean=0.0, std=1.0 / math.sqrt(head.in_features + 1))
        head.bias.zero_()


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


def last_non_pad_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True of each row of `mask` (B, T), whatever the padding side; -1 for an empty row."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=-1).values


def get_reward(model: nn.Module, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Scalar reward of each sequence in `ids` (B, T), left- or right-padded with `pad_id`."""
    mask = ids != pad_id  # Detail 3: attention mask from the pad id
    input_ids = ids.masked_fill(~mask, INVALID_PAD_ID)  # Detail 3: pad ids -> a valid id before the embedding
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # Detail 11: positions from the attention mask
    values = model(input_ids=input_ids, attention_mask=mask.long(), position_ids=position_ids)
    last = last_non_pad_index(mask)  # Detail 15: read the reward at the last non-pad token (the EOS)
    if (last < 0).any():
        raise ValueError("get_reward: a sequence consists only of pad tokens")
    return values[torch.arange(ids.shape[0], device=ids.device), last].float()


def trim_padding(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop the columns that are pad in every row (both ends), a pure speed-up: rewards do not change."""
    keep = (ids != pad_id).any(0).nonzero()
    if keep.numel() == 0:
        return ids
    return ids[:, int(keep.min()) : int(keep.max()) + 1]


def pairwise_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor):
    # Detail 16: loss -logsigmoid(r_chosen - r_rejected); accuracy = share with r_chosen > r_rejected
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    accuracy = (chosen_rewards > rejected_rewards).float().mean()
    return loss, accuracy


def forward_pair(model: nn.Module, chosen: torch.Tensor, rejected: torch.Tensor, pad_id: int,
                 query_lens: Optional[torch.Tensor] = None):
    """Chosen and rejected rows go through ONE forward pass (Detail 16); returns (r_chosen, r_rejected).

    `chosen` and `rejected` (B, T) are query + response, right-padded. A pair's two sequences share their query (and
    any opening words the two summaries have in common): the model runs over that common prefix once and over the two
    remainders with its key/value cache (`ScalarModel.forward`'s suffix arguments). Causal attention makes the
    rewards those of the two full sequences (to float rounding) for fewer tokens: a pair of the embedded task (a 120-token
    query, two 25-token summaries) 290 -> 170 tokens, of the TL;DR (512 and two 53) 1,130 -> 618.

    With `query_lens` (B,), each row's number of query tokens, the prefix is the query, and a micro-batch's distinct
    queries and each query's distinct summaries run once: the 15 pairs of a post's 6 samples (`--group_pairs_by_post`)
    cost one query and 6 summaries."""
    width = max(chosen.shape[1], rejected.shape[1])
    chosen = F.pad(chosen, (0, width - chosen.shape[1]), value=pad_id)
    rejected = F.pad(rejected, (0, width - rejected.shape[1]), value=pad_id)
    real = torch.stack([chosen != pad_id, rejected != pad_id], 1)  # (B, 2, T)
    if (real[..., 1:] > real[..., :-1]).any():
        raise ValueError("forward_pair: rows must be right-padded (query + response, then pads), as the preference "
                         "set stores them")
    lengths = real.sum(-1)  # (B, 2)
    if (lengths == 0).any():
        raise ValueError("forward_pair: a sequence consists only of pad tokens")
    cols = torch.arange(width, device=chosen.device)
    if query_lens is None:
        # prefix: the leading tokens both rows share, at most all but one token of the shorter (each keeps a suffix)
        same = (chosen == rejected) & (chosen != pad_id)
        prefix = torch.minimum(same.long().cumprod(1).sum(1), lengths.min(1).values - 1)  # (B,)
        if (prefix == 0).any():  # a pair with nothing in common (no query): the two full sequences, side by side
            rewards = get_reward(model, trim_padding(torch.cat([chosen, rejected]), pad_id), pad_id)
            return rewards[: len(chosen)], rewards[len(chosen) :]
    else:
        prefix = query_lens.to(chosen.device).long()
        if ((prefix < 1) | (prefix >= lengths.min(1).values)).any():
            raise ValueError("forward_pair: query_lens must leave every row a query and a response")
        if ((chosen != rejected) & (cols < prefix[:, None])).any():
            raise ValueError("forward_pair: chosen and rejected differ within their query (query_lens)")
    # the prefixes, left-padded to the longest one (Detail 11: positions from the mask, so the padding side is free)
    p_width = int(prefix.max())
    src = cols[:p_width] - (p_width - prefix[:, None])  # column of `chosen` for each prefix slot, < 0 for padding
    prefix_tokens = torch.gather(chosen, 1, src.clamp(min=0)).masked_fill(src < 0, pad_id)
    # the suffixes, rows [chosen 0, rejected 0, chosen 1, ...], right-padded to the longest one
    both = torch.stack([chosen, rejected], 1).flatten(0, 1)  # (2B, width)
    starts, ends = prefix.repeat_interleave(2), lengths.flatten()
    s_width = int((ends - starts).max())
    src = starts[:, None] + cols[:s_width]
    suffix_tokens = torch.gather(both, 1, src.clamp(max=width - 1)).masked_fill(src >= ends[:, None], pad_id)
    prefix_index = torch.arange(len(chosen), device=chosen.device).repeat_interleave(2)
    row = torch.arange(len(both), device=both.device)  # each sequence's suffix row
    if query_lens is not None:  # each distinct query once, each distinct (query, summary) once
        prefix_tokens, prefix_of = torch.unique(prefix_tokens, dim=0, return_inverse=True)
        keyed, row = torch.unique(torch.cat([prefix_of[prefix_index, None], suffix_tokens], 1), dim=0,
                                  return_inverse=True)
        prefix_index, suffix_tokens = keyed[:, 0], keyed[:, 1:]
        prefix = (prefix_tokens != pad_id).sum(1)
    prefix_mask, suffix_mask = prefix_tokens != pad_id, suffix_tokens != pad_id
    # Detail 11: positions count the real tokens before each one (the prefix's, then the suffix's)
    prefix_pos = (prefix_mask.long().cumsum(1) - 1).clamp(min=0)
    suffix_pos = prefix[prefix_index, None] + torch.arange(suffix_tokens.shape[1], device=both.device)
    values = model(input_ids=prefix_tokens.masked_fill(~prefix_mask, INVALID_PAD_ID),  # Detail 3
                   attention_mask=prefix_mask.long(), position_ids=prefix_pos,
                   suffix_ids=suffix_tokens.masked_fill(~suffix_mask, INVALID_PAD_ID),  # Detail 3
                   suffix_mask=suffix_mask.long(), suffix_position_ids=suffix_pos, suffix_prefix_index=prefix_index)
    # Detail 15: the reward at each sequence's last real token (its EOS), here the last real token of its suffix
    rewards = values[torch.arange(len(values), device=both.device), suffix_mask.sum(1) - 1].float()
    rewards = rewards[row].view(-1, 2)
    return rewards[:, 0], rewards[:, 1]  # Detail 16: one forward for both


def make_optimizer_and_scheduler(params, lr: float, eps: float, num_updates: int):
    # Detail 8: AdamW, eps 1e-5, weight decay at the library default, no gradient clipping
    optimizer = torch.optim.AdamW(params, lr=lr, eps=eps)
    # Detail 9: cosine decay to 0 over the run, no warm-up; lr at update u (0-based) = lr * 0.5 (1 + cos(pi u / U))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda u: 0.5 * (1.0 + math.cos(math.pi * min(u, num_updates) / max(1, num_updates)))
    )
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
PREF_COLUMNS = ["query_chosen_token", "query_rejected_token", "chosen", "rejected",
                "query_chosen_token_len", "query_rejected_token_len", "chosen_token_len", "rejected_token_len"]


def read_meta(dataset_path: str) -> dict:
    path = os.path.join(dataset_path, "meta.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def check_preference_split(ds: Dataset, split: str, rm_response_length: int, rm_query_response_length: int,
                           identical_pairs: str = "skip", console: Optional[Console] = None):
    """Validate one preference split; return (dataset without identical pairs, number of identical pairs)."""
    if len(ds) == 0:
        raise ValueError(f"preference split '{split}' is empty")
    missing = [c for c in PREF_COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"preference split '{split}' lacks column(s) {missing}")
    for side in ("chosen", "rejected"):
        lens = np.asarray(ds[f"{side}_token_len"])
        bad = np.nonzero(lens > rm_response_length)[0]
        if len(bad):
            raise ValueError(
                f"preference split '{split}', field '{side}_token_len': {len(bad)} pair(s) exceed the response limit "
                f"{rm_response_length} (first: row {int(bad[0])}, {int(lens[bad[0]])} tokens)")
        qlens = np.asarray(ds[f"query_{side}_token_len"])
        bad = np.nonzero((qlens > rm_query_response_length) | (qlens < 1))[0]
        if len(bad):
            raise ValueError(
                f"preference split '{split}', field 'query_{side}_token_len': {len(bad)} pair(s) outside "
                f"[1, {rm_query_response_length}] (first: row {int(bad[0])}, {int(qlens[bad[0]])} tokens)")
        widths = pc.list_value_length(ds.with_format("arrow")[f"query_{side}_token"]).to_numpy()
        if widths.max() > rm_query_response_length:
            raise ValueError(f"preference split '{split}', field 'query_{side}_token': rows of {widths.max()} tokens "
                             f"exceed rm_query_response_length {rm_query_response_length}")
    same = [i for i, (c, r) in enumerate(zip(ds["chosen"], ds["rejected"])) if c == r]
    if same:
        msg = (f"preference split '{split}': {len(same)} pair(s) have identical chosen and rejected summaries "
               f"(first: row {same[0]})")
        if identical_pairs == "error":
            raise ValueError(msg + "; pass --identical_pairs skip to drop them")
        if identical_pairs != "skip":
            raise ValueError(f"--identical_pairs must be 'skip' or 'error', got {identical_pairs!r}")
        warnings.warn(msg + "; skipped")
        same_set = set(same)
        ds = ds.select([i for i in range(len(ds)) if i not in same_set])
        if len(ds) == 0:
            raise ValueError(f"preference split '{split}' is empty after skipping identical pairs")
    return ds, len(same)


def eval_batch_size(ds: Dataset, batch_size: int, reference_width: int) -> int:
    """`batch_size` for rows up to `reference_width` tokens wide; proportionally fewer (at least 1) for wider rows."""
    width = max(len(ds[0]["query_chosen_token"]), len(ds[0]["query_rejected_token"])) if len(ds) else reference_width
    return max(1, batch_size * reference_width // max(width, reference_width))


def tensor_loader(ds: Dataset, columns: List[str], batch_size: int, shuffle: bool = False, seed: int = 0,
                  drop_last: bool = False):
    ds = ds.with_format("torch", columns=columns)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       drop_last=drop_last)


class PostBatches:
    """Batch sampler for `--group_pairs_by_post`: per epoch a permutation of the posts seeded by (seed, epoch), each
    post's pairs in a row, cut into micro-batches of `batch_size` pairs; pairs past the last full update (of
    `per_update` micro-batches, dealt over the processes by accelerate) are dropped, as with drop_last (Detail 16)."""

    def __init__(self, post_ids, batch_size: int, per_update: int, seed: int):
        _, post = np.unique(np.asarray(post_ids), return_inverse=True)
        order = np.argsort(post, kind="stable")  # rows grouped by post, file order within a post
        self.posts = np.split(order, np.cumsum(np.bincount(post))[:-1])
        self.batch_size, self.per_update, self.seed, self.epoch = batch_size, per_update, seed, 0
        self.num_updates = len(order) // (batch_size * per_update)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.num_updates * self.per_update

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        rows = np.concatenate([self.posts[i] for i in rng.permutation(len(self.posts))])
        rows = rows[: self.num_updates * self.batch_size * self.per_update]
        for i in range(0, len(rows), self.batch_size):
            yield rows[i : i + self.batch_size].tolist()


@torch.no_grad()
def score_sequences(accelerator: Accelerator, model: nn.Module, ds: Dataset, column: str, pad_id: int,
                    batch_size: int, progress: Optional[Progress] = None, desc: str = "scoring") -> np.ndarray:
    """RM score of every row of `ds[column]` (distributed over processes, returned in row order on every rank)."""
    ds = ds.add_column("_row", list(range(len(ds))))
    loader = accelerator.prepare(tensor_loader(ds, [column, "_row"], batch_size))
    task = progress.add_task(desc, total=len(loader)) if progress is not None else None
    rows, scores = [], []
    for batch in loader:
        with accelerator.autocast():
            r = get_reward(model, trim_padding(batch[column], pad_id), pad_id)
        r, idx = accelerator.gather_for_metrics((r.float(), batch["_row"]))
        rows.append(idx.cpu()), scores.append(r.cpu())
        if task is not None:
            progress.advance(task)
    if task is not None:
        progress.remove_task(task)
    out = np.zeros(len(ds), dtype=np.float64)
    out[torch.cat(rows).numpy()] = torch.cat(scores).double().numpy()
    return out


@torch.no_grad()
def score_pairs(accelerator: Accelerator, model: nn.Module, ds: Dataset, pad_id: int, batch_size: int,
                progress: Optional[Progress] = None, desc: str = "validation"):
    ds = ds.add_column("_row", list(range(len(ds))))
    loader = accelerator.prepare(tensor_loader(ds, ["query_chosen_token", "query_rejected_token", "_row"], batch_size))
    task = progress.add_task(desc, total=len(loader)) if progress is not None else None
    rows, rc, rr = [], [], []
    for batch in loader:
        with accelerator.autocast():
            c, r = forward_pair(model, batch["query_chosen_token"], batch["query_rejected_token"], pad_id)
        c, r, idx = accelerator.gather_for_metrics((c.float(), r.float(), batch["_row"]))
        rows.append(idx.cpu()), rc.append(c.cpu()), rr.append(r.cpu())
        if task is not None:
            progress.advance(task)
    if task is not None:
        progress.remove_task(task)
    order = torch.cat(rows).numpy()
    chosen = np.zeros(len(ds)); rejected = np.zeros(len(ds))
    chosen[order] = torch.cat(rc).double().numpy(); rejected[order] = torch.cat(rr).double().numpy()
    return chosen, rejected


def safe_key(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in str(s)).strip("_")


def validation_metrics(prefix: str, chosen: np.ndarray, rejected: np.ndarray, ds: Dataset) -> Dict[str, float]:
    # Detail 18: accuracy overall, by confidence, by policy pair; plus loss and reward margin
    correct = chosen > rejected
    margin = chosen - rejected
    m = {
        f"{prefix}_accuracy": float(correct.mean()),
        f"{prefix}_loss": float(np.mean(np.logaddexp(0.0, -margin))),
        f"{prefix}_reward_margin": float(margin.mean()),
        f"{prefix}_num_pairs": int(len(correct)),
    }
    if "confidence" in ds.column_names:
        conf = np.asarray(ds["confidence"])
        for c in sorted(set(conf.tolist())):
            sel = conf == c
            m[f"{prefix}_accuracy/confidence_{c}"] = float(correct[sel].mean())
            m[f"{prefix}_count/confidence_{c}"] = int(sel.sum())
    if "policies" in ds.column_names:
        pol = np.asarray(ds["policies"], dtype=object)
        for p in sorted(set(pol.tolist())):
            sel = pol == p
            m[f"{prefix}_accuracy/policies_{safe_key(p)}"] = float(correct[sel].mean())
            m[f"{prefix}_count/policies_{safe_key(p)}"] = int(sel.sum())
    return m


def pairs_table(ds: Dataset, chosen: np.ndarray, rejected: np.ndarray, n: int, title: str) -> Table:
    table = Table(title=title, show_lines=True)
    for col in ("post (start)", "policies", "chosen", "rejected", "r_chosen", "r_rejected"):
        table.add_column(col, overflow="fold")
    for i in range(min(n, len(ds))):
        row = ds[i]
        post = " ".join(str(row.get("post") or row["query"]).split())
        table.add_row(post[:120] + ("..." if len(post) > 120 else ""), str(row.get("policies", "")),
                      row["chosen"].replace("<|endoftext|>", ""), row["rejected"].replace("<|endoftext|>", ""),
                      f"{chosen[i]:+.3f}", f"{rejected[i]:+.3f}")
    return table


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


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
def main(args: Args) -> Dict[str, float]:
    start_time = time.time()
    if args.identical_pairs not in ("skip", "error"):
        raise ValueError(f"--identical_pairs must be 'skip' or 'error', got {args.identical_pairs!r}")
    accelerator_probe = torch.cuda.is_available()
    mixed = "bf16" if (args.bf16 and (accelerator_probe or args.bf16_on_cpu)) else "no"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = args.per_device_train_batch_size
    if args.total_batch_size % (micro * world) != 0:
        raise ValueError(f"total_batch_size {args.total_batch_size} is not divisible by per_device_train_batch_size "
                         f"{micro} x processes {world}")
    grad_accum = args.total_batch_size // (micro * world)
    # Detail 16: a seedable sampler gives every rank the same shuffle, of which each rank takes a disjoint share
    accelerator = make_accelerator(mixed_precision=mixed,
                                   dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    configure_deepspeed(accelerator, micro, grad_accum)
    console = Console(width=None if sys.stdout.isatty() else 150, quiet=not accelerator.is_main_process)
    run_name = args.run_name or f"{args.exp_name}__{args.seed}__{int(time.time())}"
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump({**asdict(args), "gradient_accumulation_steps": grad_accum, "world_size": world}, f, indent=2)
    tracker = None
    if args.track and accelerator.is_main_process:
        import wandb

        tracker = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_name,
                             config={**asdict(args), "gradient_accumulation_steps": grad_accum, "world_size": world},
                             save_code=True)

    # ---------------- data
    meta = read_meta(args.dataset_path)
    pref_path = os.path.join(args.dataset_path, "preference")
    if not os.path.isdir(pref_path):
        raise ValueError(f"--dataset_path: {pref_path} does not exist (run tldr_dataset.py first)")
    pref: DatasetDict = load_from_disk(pref_path)
    # Detail 5: RM limits, responses <= 169 tokens and query + response <= 638 (paper; meta.json when present)
    rm_resp_len = int(meta.get("rm_response_length", 169))
    rm_qr_len = int(meta.get("rm_query_response_length", 638))
    if "train" not in pref or "validation" not in pref:
        raise ValueError(f"{pref_path}: needs splits 'train' and 'validation', has {list(pref.keys())}")
    train_ds, n_identical_train = check_preference_split(pref["train"], "train", rm_resp_len, rm_qr_len,
                                                         args.identical_pairs)
    if args.num_train_pairs is not None and args.num_train_pairs < len(train_ds):
        # a seeded random subset (the split may be ordered by post / batch), kept in the split's order
        keep = np.random.default_rng(args.seed).choice(len(train_ds), size=args.num_train_pairs, replace=False)
        train_ds = train_ds.select(np.sort(keep).tolist())
    # Detail 6: validation_cnndm has its own limits, responses <= 155 and query + response <= 2,021 tokens
    cnndm_limits = (int(meta.get("cnndm_rm_response_length", 155)), int(meta.get("cnndm_rm_query_response_length", 2021)))
    val_splits = {}
    n_identical_val = 0
    for split in [s for s in pref.keys() if s.startswith("validation")]:
        limits = cnndm_limits if split == "validation_cnndm" else (rm_resp_len, rm_qr_len)
        ds, n_same = check_preference_split(pref[split], split, *limits, "skip")
        n_identical_val += n_same
        if args.num_val_pairs is not None and args.num_val_pairs < len(ds):  # seeded random subset, split order
            keep = np.random.default_rng(args.seed + 1).choice(len(ds), size=args.num_val_pairs, replace=False)
            ds = ds.select(np.sort(keep).tolist())
        val_splits[split] = ds
    if args.fixed_val_dataset_path is not None:
        fixed_path = os.path.join(args.fixed_val_dataset_path, "preference")
        fixed_pref = load_from_disk(fixed_path) if os.path.isdir(fixed_path) else {}
        if "validation" not in fixed_pref:
            raise ValueError(f"--fixed_val_dataset_path: {fixed_path} has no 'validation' split (run tldr_dataset.py there)")
        fixed_meta = read_meta(args.fixed_val_dataset_path)
        for key in ("tokenizer", "pad_token_id", "eos_token_id"):  # token ids must mean the same as in --dataset_path
            if key in fixed_meta and key in meta and fixed_meta[key] != meta[key]:
                raise ValueError(f"--fixed_val_dataset_path: meta.json field {key!r} is {fixed_meta[key]!r}, "
                                 f"{meta[key]!r} in --dataset_path: build both with the same tokenizer")
        ds, n_same = check_preference_split(fixed_pref["validation"], "validation_fixed", rm_resp_len,
                                            rm_qr_len, "skip")
        if args.num_val_pairs is not None and args.num_val_pairs < len(ds):
            keep = np.random.default_rng(args.seed + 2).choice(len(ds), size=args.num_val_pairs, replace=False)
            ds = ds.select(np.sort(keep).tolist())
        val_splits["validation_fixed"] = ds  # reported as val_fixed_* (below)
    num_updates = (len(train_ds) // args.total_batch_size) * args.num_train_epochs
    if num_updates == 0:
        raise ValueError(f"preference split 'train' has {len(train_ds)} pairs, fewer than one batch of "
                         f"{args.total_batch_size}")
    dropped = len(train_ds) % args.total_batch_size
    sft_path = os.path.join(args.dataset_path, "sft")
    sft_ds = load_from_disk(sft_path) if os.path.isdir(sft_path) else None

    # ---------------- model
    tokenizer = load_tokenizer(args.sft_model_path)
    pad_id = tokenizer.pad_token_id
    if "pad_token_id" in meta and meta["pad_token_id"] != pad_id:
        raise ValueError(f"{args.dataset_path}/meta.json pad_token_id {meta['pad_token_id']} != tokenizer's {pad_id} "
                         f"({args.sft_model_path})")
    torch.manual_seed(args.seed)  # Detail 10: model init identical on every process
    model = ScalarModel.from_sft(args.sft_model_path, base_model=args.base_model)  # Detail 14: SFT trunk + scalar head
    maybe_resize(model.trunk, tokenizer)
    disable_dropout(model)  # Detail 7
    model.config.base_config = model.trunk.config.to_dict()  # the saved config rebuilds this trunk (resized, no dropout)
    model.config.pad_token_id = pad_id
    init_head_weight = model.scalar_head.weight.detach().flatten()[:8].tolist()  # Detail 10: same on every rank
    optimizer, scheduler = make_optimizer_and_scheduler(model.parameters(), args.lr, args.eps, num_updates)
    # The scheduler is stepped by hand once per update (not prepared: accelerate would step it once per process).
    columns = ["query_chosen_token", "query_rejected_token", "_row"]
    rows = train_ds.add_column("_row", list(range(len(train_ds))))
    if args.group_pairs_by_post:
        if "id" not in train_ds.column_names or "query_token" not in train_ds.column_names:
            raise ValueError("--group_pairs_by_post: the preference split 'train' needs columns 'id' and 'query_token'")
        sampler = PostBatches(train_ds["id"], micro, grad_accum * world, args.seed)
        train_loader = torch.utils.data.DataLoader(rows.with_format("torch", columns=columns + ["query_token"]),
                                                   batch_sampler=sampler)
    else:
        train_loader = tensor_loader(rows, columns, micro, shuffle=True, seed=args.seed, drop_last=True)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    console.print(f"[bold]reward model[/bold]: {len(train_ds)} train pairs, {num_updates} updates of "
                  f"{args.total_batch_size} = {micro} x {grad_accum} accum x {world} proc; dropped remainder {dropped}; "
                  f"identical pairs skipped: train {n_identical_train}, validation {n_identical_val}")

    # ---------------- training (Detail 16)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, disable=not accelerator.is_main_process)
    model.train()
    seen_rows: List[int] = []
    update = 0
    micro_per_update = grad_accum
    running_loss, running_acc, epoch_loss, epoch_acc, n_micro = [], [], 0.0, 0.0, 0
    t_train = time.time()
    with progress:
        task = progress.add_task("train RM", total=num_updates)
        for epoch in range(args.num_train_epochs):
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            if args.group_pairs_by_post:
                sampler.set_epoch(epoch)
            micro_in_epoch = 0
            for batch in train_loader:
                if micro_in_epoch >= (num_updates // args.num_train_epochs) * micro_per_update:
                    break  # the incomplete last update is dropped: no pair is repeated to fill it (Detail 16)
                micro_in_epoch += 1
                seen_rows.extend(batch["_row"].tolist())
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        query_lens = (batch["query_token"] != pad_id).sum(1) if args.group_pairs_by_post else None
                        rc, rr = forward_pair(model, batch["query_chosen_token"], batch["query_rejected_token"], pad_id,
                                              query_lens)
                    loss, acc = pairwise_loss(rc, rr)
                    accelerator.backward(loss)  # Detail 8: no gradient clipping
                    optimizer.step()
                    optimizer.zero_grad()
                running_loss.append(loss.detach()), running_acc.append(acc.detach())
                if accelerator.sync_gradients:
                    update += 1
                    lr_now = scheduler.get_last_lr()[0]
                    scheduler.step()  # Detail 9: one cosine step per update
                    progress.advance(task)
                    stats = accelerator.gather(torch.stack([torch.stack(running_loss).mean(),
                                                            torch.stack(running_acc).mean()])[None]).mean(0)
                    epoch_loss += float(stats[0]); epoch_acc += float(stats[1]); n_micro += 1
                    running_loss, running_acc = [], []
                    if update % args.log_every == 0 or update == num_updates:
                        progress.update(task, description=f"train RM loss {stats[0]:.3f} acc {stats[1]:.3f}")
                        if not console.is_terminal:  # no live bar in a log file: print a line instead
                            console.print(f"update {update}/{num_updates} loss {stats[0]:.4f} acc {stats[1]:.3f} "
                                          f"lr {lr_now:.2e} {time.time() - t_train:.0f}s")
                        if tracker is not None:
                            tracker.log({"train/loss": float(stats[0]), "train/accuracy": float(stats[1]),
                                         "train/lr": lr_now, "train/epoch": epoch + update / num_updates},
                                        step=update)
    train_seconds = time.time() - t_train
    if args.save_seen_ids:
        with open(os.path.join(args.output_dir, f"seen_ids_rank{accelerator.process_index}.json"), "w") as f:
            json.dump({"rows": seen_rows, "init_head_weight": init_head_weight}, f)
    metrics: Dict[str, float] = {
        "train_loss": epoch_loss / max(1, n_micro), "train_accuracy": epoch_acc / max(1, n_micro),
        "train_pairs": len(train_ds), "train_pairs_seen": num_updates * args.total_batch_size,
        "train_pairs_dropped_remainder": dropped, "train_identical_pairs_skipped": n_identical_train,
        "val_identical_pairs_skipped": n_identical_val, "num_updates": update, "train_seconds": train_seconds,
        "world_size": world, "gradient_accumulation_steps": grad_accum,
    }
    model.eval()
    unwrapped: ScalarModel = accelerator.unwrap_model(model)

    with progress:
        # ---------------- normalisation (Detail 17)
        if sft_ds is not None and "train" in sft_ds and len(sft_ds["train"]) > 0:
            ref_ds = sft_ds["train"]
            if args.norm_num_samples is not None:
                ref_ds = ref_ds.select(range(min(args.norm_num_samples, len(ref_ds))))
            before = score_sequences(accelerator, model, ref_ds, "query_reference_response_token", pad_id,
                                     args.per_device_eval_batch_size, progress, "normalise: reference rewards")
            mean_before = float(before.mean())
            with torch.no_grad():
                # Detail 17: subtract the mean reference reward through the head's bias (the saved model carries it)
                unwrapped.scalar_head.bias -= mean_before
            unwrapped.config.reward_norm_shift = mean_before
            # re-score after the shift: the whole set, or (speed) its first N rows compared with `before - mean`
            n_check = len(ref_ds) if args.norm_recompute_samples is None else min(args.norm_recompute_samples, len(ref_ds))
            rescored = score_sequences(accelerator, model, ref_ds.select(range(n_check)),
                                       "query_reference_response_token", pad_id, args.per_device_eval_batch_size,
                                       progress, "normalise: check")
            expected = before - mean_before
            diff = float(np.abs(rescored - expected[:n_check]).max())
            after = rescored if n_check == len(ref_ds) else expected
            if diff > 1e-2 * max(1.0, float(np.abs(before).max())):
                raise RuntimeError(f"reward normalisation: re-scored rewards differ from before - mean by {diff}")
            metrics.update({"reward_mean_before_norm": mean_before, "reward_std_before_norm": float(before.std()),
                            "reward_mean_after_norm": float(after.mean()), "reward_std_after_norm": float(after.std()),
                            "norm_num_samples": len(ref_ds), "norm_check_samples": n_check,
                            "norm_check_max_abs_diff": diff, "head_bias": float(unwrapped.scalar_head.bias.item())})
            console.print(f"reward on {len(ref_ds)} SFT train references: mean {mean_before:+.4f} std {before.std():.4f}"
                          f" before, mean {after.mean():+.4f} std {after.std():.4f} after normalisation")
        else:
            warnings.warn(f"{sft_path} (split 'train') not found: reward normalisation (Detail 17) skipped")

        # ---------------- validation (Detail 18)
        val_scores = {}
        for split, ds in val_splits.items():
            # longer rows (validation_cnndm's 2,021 tokens) go in smaller batches: about as many tokens per forward
            batch_size = eval_batch_size(ds, args.per_device_eval_batch_size, rm_qr_len)
            c, r = score_pairs(accelerator, model, ds, pad_id, batch_size, progress, split)
            val_scores[split] = (c, r)
            # Detail 18: validation_cnndm (when present) is reported separately under val_cnndm_*
            prefix = "val" if split == "validation" else f"val_{split[len('validation_'):]}"
            metrics.update(validation_metrics(prefix, c, r, ds))
        if "validation" in val_scores:
            c, r = val_scores["validation"]
            console.print(pairs_table(val_splits["validation"], c, r, args.num_table_rows, "validation pairs"))

    accelerator.wait_for_everyone()

    # ---------------- save (before the gold evaluation, so a failure there loses neither model nor metrics)
    def write_metrics():
        metrics["total_seconds"] = time.time() - start_time
        usage = resource.getrusage(resource.RUSAGE_SELF)
        metrics["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # load-independent cost of this process (main rank)
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)

    state_dict = accelerator.get_state_dict(model)  # every rank takes part (ZeRO-3 gathers the weights here)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(args.output_dir, save_function=accelerator.save, state_dict=state_dict)
        tokenizer.save_pretrained(args.output_dir)
        write_metrics()

    # ---------------- gold judge (embedded task only; lazy, so reward.py runs without the embedded modules)
    if args.gold_task_dir is not None and accelerator.is_main_process:
        try:
            from embedded_diagnostics import reward_model_gold_metrics
        except ImportError as e:
            raise ImportError(f"--gold_task_dir needs embedded_diagnostics.py and embedded_task.py beside reward.py "
                              f"({e})") from e
        with progress:
            metrics.update(reward_model_gold_metrics(args, unwrapped, tokenizer, val_splits.get("validation"),
                                                     val_scores.get("validation"), sft_ds, meta, pad_id, accelerator,
                                                     progress))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_metrics()
        summary = Table(title="reward model metrics")
        summary.add_column("metric"), summary.add_column("value")
        for k, v in metrics.items():
            if "/" not in k:
                summary.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        console.print(summary)
        if tracker is not None:
            tracker.log({f"final/{k}": v for k, v in metrics.items()}, step=update)
            tracker.finish()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


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
