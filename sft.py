"""Supervised fine-tuning of a Pythia (GPT-NeoX) model on TL;DR query + reference summary.

    accelerate launch sft.py                                     # the paper: Pythia-1B, real TL;DR data
    accelerate launch --config_file deepspeed_zero2.yaml sft.py --base_model EleutherAI/pythia-6.9b-deduped
    python sft.py --preset embedded                              # the embedded offline task on CPU

Reads the data set built by `tldr_dataset.py`. Writes to `--output_dir`: the model and tokenizer
(`save_pretrained`), args.json, metrics.json, metrics.jsonl (per update), eval_samples.jsonl, and
`checkpoint/` (every `--save_every` updates; `--resume` continues from it).
"""

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
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
    exp_name: str = "sft"
    seed: int = 44413
    """the first of the paper's seeds (44413, 55513, 66613, 77713)"""
    base_model: str = "EleutherAI/pythia-1b-deduped"
    dataset_path: str = "data/tldr"
    """folder written by tldr_dataset.py (holds sft/, preference/, meta.json)"""
    output_dir: Optional[str] = None
    """None: models/sft_{base model name}, e.g. models/sft_pythia-1b-deduped (where reward.py, ppo.py, dpo.py look)"""
    lr: float = 3e-6
    """Detail 8: one learning rate for SFT, RM, PPO and DPO"""
    eps: float = 1e-5
    """Detail 8: AdamW epsilon"""
    total_batch_size: int = 128
    """Detail 12: episodes per update over all processes (= per_device_train_batch_size x accumulation x processes)"""
    per_device_train_batch_size: int = 16
    num_train_epochs: int = 1
    loss_on_query: bool = True
    """Detail 12: as released, the query tokens are in the loss too; False restricts it to the response"""
    bf16: bool = True
    """mixed precision bf16 where there is a GPU (ignored on CPU unless --bf16_on_cpu)"""
    bf16_on_cpu: bool = False
    """take the bf16 autocast path without CUDA too (slow; lets the tests run it on CPU)"""
    split: str = "validation"
    """the SFT split whose queries are sampled for evaluation (Detail 13): `validation` as released, or `test`"""
    eval_every: int = 100
    """validation loss every N updates (0: only at the end)"""
    num_eval_samples: int = 256
    """validation queries sampled at the end (Detail 13), judged by the gold judge on the embedded task"""
    eval_batch_size: int = 32
    response_length: int = 53
    """Detail 13: exactly this many new tokens at evaluation"""
    eval_temperature: float = 0.01
    """Detail 13: near-greedy evaluation sampling"""
    max_val_batches: Optional[int] = None
    """cap on validation-loss batches (None: the whole split)"""
    gold_task_dir: Optional[str] = None
    """the embedded task folder: enables the hidden gold judge's win rates"""
    eval_base: bool = True
    """also sample the base model before training and judge it (base_gold_win_rate)"""
    save_every: int = 200
    """checkpoint every N updates (0: never)"""
    group_by_length: int = 0
    """0: plain shuffled batches (as released). N > 0: shuffle, sort each run of N updates' sequences by length and
    cut it into micro-batches, so that `trim_right` drops more padding (same data per epoch, less compute)"""
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
        base_model="runs/quickstart/task/base-m",
        dataset_path="runs/quickstart/dataset",
        output_dir="runs/quickstart/sft",
        # tiny models from a brief pre-training need a far larger step than Pythia's 3e-6 and several epochs to learn
        # to copy facts from the post (task version 3, base-s: 1 epoch at 1e-3 gold score -6.5, 4 at 3e-3 +1.4, 8 +2.6,
        # 10 +3.9). Version 4, quickstart s seed 2: 8 epochs SFT win rate 0.245 and PPO (this preset) 0.435; 5 epochs (-80 s) SFT 0.10,
        # RM at chance on the fixed pairs (0.41), PPO 0.11: the RM starts from the SFT model and needs the 8.
        lr=3e-3,
        num_train_epochs=8,
        total_batch_size=32,
        per_device_train_batch_size=16,
        eval_every=250,  # the validation loss is a curve for the user, not a stopping rule: a few points are enough
        num_eval_samples=200,
        eval_batch_size=50,
        max_val_batches=8,
        gold_task_dir="runs/quickstart/task",
        save_every=250,
        # 16-row micro-batches of random posts are padded to 182 tokens on average for a mean of 152; sorted within
        # runs of 20 updates they are padded to about the mean: base-s SFT 325 s -> 278-304 s (seeds 1-4, 6-15% faster)
        group_by_length=20,
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
    # every stage derives the same folder from --base_model, so the stages find each other without path flags
    return replace(args, output_dir=args.output_dir or os.path.join("models", f"sft_{model_name(args.base_model)}"))


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
    disable_dropout(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def forward(model: nn.Module, ids: torch.Tensor, pad_id: int, **kwargs):
    """Detail 3 and 11: attention mask from the pad id, pads replaced by a valid id (0) before the embedding, and
    positions that count real tokens only (cumsum - 1), so a left-padded sequence gets the positions it has alone."""
    mask = ids != pad_id  # Detail 3: attention mask from the pad id
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # Detail 11: positions from the mask
    return model(input_ids=ids.masked_fill(~mask, 0), attention_mask=mask.long(), position_ids=position_ids, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Loss and validation
# ----------------------------------------------------------------------------------------------------
def sft_labels(ids: torch.Tensor, pad_id: int, query_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    # Detail 12: next-token cross-entropy; pad positions are ignored (label -100).
    labels = ids.masked_fill(ids == pad_id, -100)
    if query_lens is not None:  # Detail 12 switch: only the response tokens in the loss
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        labels = labels.masked_fill(positions < query_lens[:, None], -100)
    return labels


def sequence_losses(model, ids: torch.Tensor, pad_id: int, query_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each sequence's own token-mean cross-entropy, shape (batch,)."""
    labels = sft_labels(ids, pad_id, query_lens)[:, 1:]
    # speed, with the loss on the response only (--no-loss-on-query): vocabulary logits from the first position that
    # predicts a response token (the shortest query's last token) on, the same losses (embedded s, random micro-batches
    # of 16: 80 of 182 positions projected, forward + backward 180 -> 150 ms on one thread). The default loss on query
    # and response projects every position.
    start = max(int(query_lens.min()) - 1, 0) if query_lens is not None else 0
    labels = labels[:, start:]
    # fp32 logits: the log-softmax runs in fp32 also under bf16 autocast (CPU autocast would keep it in bf16)
    logits = forward(model, ids, pad_id, logits_to_keep=ids.shape[1] - start).logits[:, :-1].float()
    # flattened to (tokens, vocab): the log-softmax then runs over a contiguous last dimension, ~3x faster on CPU than
    # over the class dimension of the (batch, vocab, length) layout, with the same values
    token_losses = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                               reduction="none").view_as(labels)
    return token_losses.sum(1) / (labels != -100).sum(1).clamp(min=1)


def sft_loss(model, ids: torch.Tensor, pad_id: int, query_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    # Detail 12: as released (one sequence per micro-batch, then accumulation), the loss is the mean over the
    # sequences of each one's token-mean, at any micro-batch size: with equal micro-batches, accumulation's
    # average of these means is the mean over all the update's sequences.
    return sequence_losses(model, ids, pad_id, query_lens).mean()


def trim_right(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drops the all-pad columns on the right (right-padded batch): the same outputs for less compute."""
    real = (ids != pad_id).any(0).nonzero()
    return ids[:, : int(real.max()) + 1] if len(real) else ids


@torch.no_grad()
def validation_loss(model, loader, pad_id: int, accelerator, max_batches: Optional[int]) -> float:
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        ids = trim_right(batch["query_reference_response_token"], pad_id)
        total += sequence_losses(model, ids, pad_id).sum()  # Detail 12: the mean of per-sequence token-means
        count += ids.shape[0]
    model.train()
    total, count = accelerator.reduce(total), accelerator.reduce(count)
    return (total / count).item()


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
class SeededBatches:
    """Batch sampler whose order is a function of (seed, epoch) alone, so that `--resume` mid-run replays the same
    batches: per epoch a seeded permutation of the rows, rows past the last full update dropped (as drop_last). With
    `group` > 0 each run of `group` updates is sorted by length (longest first) before it is cut into micro-batches,
    and the updates (each `per_update` consecutive micro-batches, dealt one per process by accelerate) are shuffled."""

    def __init__(self, lengths, batch_size: int, per_update: int, group: int, seed: int):
        self.lengths, self.batch_size, self.per_update, self.group = np.asarray(lengths), batch_size, per_update, group
        self.seed, self.epoch = seed, 0
        self.num_updates = len(self.lengths) // (batch_size * per_update)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.num_updates * self.per_update

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        rows = self.batch_size * self.per_update
        perm = rng.permutation(len(self.lengths))[: self.num_updates * rows]
        if self.group:
            runs = [perm[i : i + rows * self.group] for i in range(0, len(perm), rows * self.group)]
            perm = np.concatenate([r[np.argsort(-self.lengths[r], kind="stable")] for r in runs])
            perm = perm.reshape(self.num_updates, rows)[rng.permutation(self.num_updates)].reshape(-1)
        for i in range(0, len(perm), self.batch_size):
            yield perm[i : i + self.batch_size].tolist()


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

    # ---- data: the SFT split written by tldr_dataset.py
    sft_path = os.path.join(args.dataset_path, "sft")
    if not os.path.isdir(sft_path):
        raise FileNotFoundError(f"{sft_path} not found: build the data set first with tldr_dataset.py")
    data = datasets.load_from_disk(sft_path)
    for split in ("train", "validation", args.split):
        if split not in data or len(data[split]) == 0:
            raise ValueError(f"{sft_path}: split {split!r} is missing or empty")
    tokenizer = load_tokenizer(args.base_model)
    check_meta(args.dataset_path, tokenizer, args.base_model)
    pad_id = tokenizer.pad_token_id
    judge = load_gold_judge(args)

    # ---- model
    set_seed(args.seed)  # Detail 10: identical model initialisation on every process
    model = load_policy(args.base_model, tokenizer)
    metrics = {}
    if args.eval_base and judge is not None and not args.resume:
        set_seed(args.seed + accelerator.process_index * 100003)  # Detail 10: sampling differs per process
        base_metrics, _ = sample_and_judge(model, data[args.split], tokenizer, args, accelerator, judge, tag="base")
        metrics.update(base_metrics)
        if accelerator.is_main_process:
            console.print(f"base model: gold win rate {base_metrics['base_gold_win_rate']:.3f}")

    cols = ["query_reference_response_token", "query_reference_response_token_len", "query_token"]
    train = data["train"].with_format("torch", columns=cols)
    # rows of an update are dealt one micro-batch per process, `grad_accum` micro-batches each
    sampler = SeededBatches(data["train"]["query_reference_response_token_len"], args.per_device_train_batch_size,
                            grad_accum * accelerator.num_processes, args.group_by_length, args.seed)
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler)
    val_loader = torch.utils.data.DataLoader(data["validation"].with_format("torch", columns=cols), batch_size=args.eval_batch_size)
    num_updates = args.num_train_epochs * (len(train) // args.total_batch_size)
    if num_updates == 0:
        raise ValueError(f"train split has {len(train)} rows, fewer than one update of total_batch_size={args.total_batch_size}")
    optimizer, scheduler = make_optimizer(model, args, num_updates)
    model, optimizer, loader, val_loader, scheduler = accelerator.prepare(model, optimizer, loader, val_loader, scheduler)
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
    log = open(os.path.join(args.output_dir, "metrics.jsonl"), "a") if accelerator.is_main_process else None

    # ---- training loop
    model.train()
    micro_per_epoch = num_updates // args.num_train_epochs * grad_accum
    progress = Progress(TextColumn("[bold]SFT"), BarColumn(), TextColumn("{task.completed}/{task.total} updates"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                        disable=not accelerator.is_main_process)
    row = {}
    with progress:
        task = progress.add_task("sft", total=num_updates, completed=update, info="")
        micro, loss_sum = update * grad_accum, torch.zeros((), device=accelerator.device)
        for epoch in range(args.num_train_epochs):
            if micro >= (epoch + 1) * micro_per_epoch:
                continue
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            sampler.set_epoch(epoch)
            skip = micro - epoch * micro_per_epoch  # resume: the data position within the epoch
            epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
            for batch in epoch_loader:
                if micro >= (epoch + 1) * micro_per_epoch:
                    break
                with accelerator.accumulate(model):
                    ids = trim_right(batch["query_reference_response_token"], pad_id)
                    query_lens = None if args.loss_on_query else (batch["query_token"] != pad_id).sum(1)
                    loss = sft_loss(model, ids, pad_id, query_lens)
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                loss_sum += loss.detach()
                micro += 1
                if micro % grad_accum:
                    continue
                update += 1
                row = {"update": update, "train/loss": accelerator.reduce(loss_sum, "mean").item() / grad_accum,
                       "lr": scheduler.get_last_lr()[0], "episodes": update * args.total_batch_size}
                loss_sum.zero_()
                if args.eval_every and update % args.eval_every == 0 and update < num_updates:
                    row["val/loss"] = validation_loss(model, val_loader, pad_id, accelerator, args.max_val_batches)
                if not math.isfinite(row["train/loss"]):
                    raise RuntimeError(f"non-finite training loss at update {update}; last checkpoint: {ckpt_dir}")
                if log:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                if args.track and accelerator.is_main_process:
                    wandb.log(row, step=update)
                progress.update(task, completed=update, info=f"loss {row['train/loss']:.3f}")
                if args.save_every and update % args.save_every == 0 and update < num_updates:
                    accelerator.save_state(ckpt_dir)
                    if accelerator.is_main_process:
                        json.dump({"update": update, "metrics": metrics}, open(os.path.join(ckpt_dir, "progress.json"), "w"))

    # ---- final validation loss and samples (Detail 13)
    metrics["val_loss"] = validation_loss(model, val_loader, pad_id, accelerator, args.max_val_batches)
    metrics["train_loss"] = row.get("train/loss", float("nan"))
    metrics["updates"] = update
    set_seed(args.seed + accelerator.process_index * 100003)  # Detail 10
    eval_metrics, rows = sample_and_judge(model, data[args.split], tokenizer, args, accelerator, judge, tag="sft")
    metrics.update(eval_metrics)
    if judge is not None:
        metrics["gold_win_rate"] = metrics["sft_gold_win_rate"]
    metrics["wall_seconds"] = time.time() - start_time

    # ---- save
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
        print_samples(rows, f"SFT samples ({args.split}, near-greedy)")
        console.print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
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
