"""PPO throughput, side by side: this project's ppo.py against Hugging Face TRL's PPOTrainer.

    python benchmark/throughput.py                                    # CPU, embedded-task-shaped models
    python benchmark/throughput.py --model_size tiny --num_updates 2  # a few seconds (what the test runs)
    python benchmark/throughput.py --device cuda --model_size 1b      # Pythia-1B-shaped, bf16 autocast, one GPU
    pip install -r requirements-trl.txt                               # TRL 0.29.x, the last release with PPO

One invocation builds one task in a temporary directory (a random-weight GPT-NeoX policy saved as the SFT model,
a ScalarModel with the same trunk saved as the reward model, a data set in the SPEC schema with random-token
queries of random lengths), then runs the same number of PPO updates of ppo.py and of TRL's PPOTrainer on it, one
after the other, each in its own process (so that the peak memory of one does not hide the other's), with the same
models, data, batch size, micro-batch, minibatches, PPO epochs, rollout forward batch, query/response lengths,
temperature and learning rate. It prints, for each: episodes per second, the time per phase (generation, rollout
forward passes, PPO training) and the peak memory; for ppo.py also the achieved FLOP/s as a fraction of the
machine's matrix-multiply peak, measured in the same run. Everything goes to {output_dir}/throughput.json too.

Identical settings, and where the two differ by design:
- Both generate exactly `response_length` tokens (TRL's early stop at EOS is switched off, as in ppo.py: Detail 20)
  and truncate after the first EOS (TRL: stop_token="eos"; ppo.py: Detail 21). The policy's EOS probability is
  set to ~3% per token so that responses end at different lengths, as with a real SFT model.
- Missing EOS: ppo.py replaces the score by -1 (Detail 23), TRL subtracts 1 (same cost). KL estimator k1 in both.
- TRL takes the rollout log-probabilities from the generation scores; ppo.py recomputes them with a forward pass
  (exactly what training recomputes, so the first PPO ratio is exactly 1). That is each script's own algorithm.
- fp32 on CPU (TRL's bf16 default is switched off); on CUDA both run bf16 autocast with fp32 weights.
Timed: updates after `warmup_updates`, from the start of generation to the last optimizer step of the update
(logging, evaluation and checkpointing excluded on both sides). Peak memory: on CPU the process's peak RSS and
its growth over the RSS right after the imports (which excludes the libraries: TRL imports more of them); on CUDA
torch.cuda.max_memory_allocated.
FLOPs (ppo.py only) are counted analytically for the work ppo.py does on the shapes it runs (queries trimmed to the
batch's longest one, `context`, plus `response_length` tokens): per token and layer 2 x (4 H^2 + 2 H I) for the
matmuls plus 4 H x (keys attended) for causal attention, plus 2 H V per position where the policy's logits are
needed (response positions only); backward = 2 x forward. Generation = prefill of the context + response_length - 1
one-token steps with the KV cache; rollout = policy, reference, value and reward forwards; training = epochs x
(policy + value) forward + backward. The peak is the best of several timings of a large matmul in the same dtype
with the same number of threads.
"""

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Pythia-shaped configs (hidden, layers, heads); this benchmark's own names: its "s" is embedded_task.py's base-s, its
# "m" (the default) embedded_task.py's base-l (the 1.4M model, named m there before 2026-12-07), its "l" a 6-layer
# 256-wide model. Intermediate = 4 x hidden, rotary on 25% of the head dims, as Pythia.
MODEL_SIZES = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "s": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4),
    "m": dict(hidden_size=128, num_hidden_layers=5, num_attention_heads=4),
    "l": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8),
}


@dataclass
class Args:
    device: Literal["cpu", "cuda"] = "cpu"
    """cpu: fp32, CUDA hidden from both runs; cuda: bf16 autocast (fp32 weights) on one GPU"""
    model_size: Literal["tiny", "s", "m", "l", "1b"] = "m"
    """shape of the four random-weight GPT-NeoX models (1b = Pythia-1B: hidden 2048, 16 layers)"""
    vocab_size: Optional[int] = None
    """tokenizer size incl. EOS and [PAD] (default: 1,700 like the embedded task; 50,279 for 1b)"""
    ppo_path: str = "ppo.py"
    """the ppo.py to measure (relative to the repository root): compare a modified copy against the original"""
    sides: str = "ppo,trl"
    """which implementations to run, comma-separated"""
    num_updates: int = 4
    """PPO updates per implementation (the first warmup_updates are not timed)"""
    warmup_updates: int = 1
    batch_size: int = 64
    """episodes per update"""
    per_device_train_batch_size: int = 16
    """micro-batch of the PPO epochs"""
    num_mini_batches: int = 2
    num_ppo_epochs: int = 4
    local_rollout_forward_batch_size: int = 64
    query_length: Optional[int] = None
    """queries are left-padded to this (default 256 as the embedded task, 512 for 1b as the paper); real lengths
    are drawn like the embedded task's (see query_lengths)"""
    response_length: int = 53
    temperature: float = 0.7
    lr: float = 3e-6
    eos_prob: float = 0.03
    """per-token probability of EOS under the random policy at `temperature`"""
    repeats: int = 1
    """runs per implementation, interleaved (ppo, trl, trl, ppo, ...); medians are reported"""
    num_threads: int = 1
    """torch threads of every run (CPU)"""
    matmul_size: int = 2048
    """n of the n x n x n matmul that measures the peak (CUDA: 8192)"""
    seed: int = 1
    output_dir: str = "runs/benchmark"
    """throughput.json and the two runs' logs go here"""
    keep_task: bool = False
    """keep the generated models and data set in {output_dir}/task"""


def parse_args(argv=None) -> Args:
    import tyro

    args = tyro.cli(Args, args=argv)
    if args.vocab_size is None:
        args = replace(args, vocab_size=50279 if args.model_size == "1b" else 1700)
    if args.query_length is None:
        args = replace(args, query_length=512 if args.model_size == "1b" else 256)
    if args.device == "cuda" and args.matmul_size == 2048:
        args = replace(args, matmul_size=8192)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or any(s not in ("ppo", "trl") for s in sides):
        raise ValueError(f"--sides must name ppo and/or trl, got {args.sides!r}")
    if args.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {args.repeats}")
    if args.num_updates <= args.warmup_updates:
        raise ValueError(f"num_updates ({args.num_updates}) must exceed warmup_updates ({args.warmup_updates})")
    per_step = args.per_device_train_batch_size * args.num_mini_batches
    if args.batch_size % per_step or args.batch_size % args.local_rollout_forward_batch_size:
        raise ValueError(f"batch_size ({args.batch_size}) must divide by per_device_train_batch_size x "
                         f"num_mini_batches ({per_step}) and by local_rollout_forward_batch_size "
                         f"({args.local_rollout_forward_batch_size})")
    return args


# ----------------------------------------------------------------------------------------------------------------
# FLOP counting and the matmul peak
# ----------------------------------------------------------------------------------------------------------------
def forward_flops(cfg: dict, n_seq: int, new_tokens: int, past: int = 0, head_positions: int = 0,
                  causal: bool = True) -> float:
    """Matmul FLOPs of one forward of `n_seq` sequences feeding `new_tokens` tokens each after `past` cached
    tokens: 2 x (4 H^2 + 2 H I) per token and layer, attention 4 H x keys (causal: token p sees p + 1 keys; else
    all past + new_tokens), and the LM head 2 H V at `head_positions` positions per sequence."""
    h, n_layers, inter, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    dense = 2 * (4 * h * h + 2 * h * inter) * new_tokens
    if causal:  # sum over p = past .. past + new - 1 of (p + 1) keys
        keys = new_tokens * past + new_tokens * (new_tokens + 1) / 2
    else:
        keys = new_tokens * (past + new_tokens)
    return n_seq * (n_layers * (dense + 4 * h * keys) + 2 * h * vocab * head_positions)


def ppo_update_flops(cfg: dict, batch: int, context: int, response: int, epochs: int) -> dict:
    """FLOPs of one ppo.py update per phase (see the module docstring)."""
    seq = context + response
    gen = forward_flops(cfg, batch, context, head_positions=1)  # prefill: logits of the last position only
    gen += sum(forward_flops(cfg, batch, 1, past=context + k, head_positions=1) for k in range(response - 1))
    policy = forward_flops(cfg, batch, seq, head_positions=response)  # logits at response positions only
    trunk = forward_flops(cfg, batch, seq)  # value and reward: trunk + a 1-wide head (negligible)
    rollout = 2 * policy + 2 * trunk  # policy, reference, value, reward
    training = epochs * 3 * (policy + trunk)  # forward + backward (2 x forward) of policy and value
    return {"generation": gen, "rollout_forward": rollout, "training": training}


def matmul_peak(n: int, device: str, reps: int = 7) -> dict:
    """Best and median FLOP/s of an n x n @ n x n matmul (fp32 on CPU, bf16 on CUDA) over `reps` timings."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    inner = 20 if device == "cuda" else 1
    for _ in range(2):
        a @ b
    sync()
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync()
        rates.append(inner * 2 * n**3 / (time.perf_counter() - t0))
    return {"best": max(rates), "median": statistics.median(rates), "n": n, "dtype": str(dtype).split(".")[-1]}


# ----------------------------------------------------------------------------------------------------------------
# The task: random-weight models and a data set in the SPEC schema
# ----------------------------------------------------------------------------------------------------------------
def make_tokenizer(vocab_size: int):
    """Word-level tokenizer: EOS `<|endoftext|>` id 0, words w1..w{V-2}, `[PAD]` last (Detail 3: pad != EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab_size - 1)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", unk_token="w1")
    tok.add_special_tokens({"pad_token": "[PAD]"})
    return tok


def query_lengths(n: int, query_length: int, gen) -> list:
    """Real query lengths shaped like the embedded task's TL;DR-style queries (114-231 tokens of 256, median
    173): normal with mean 0.68 and sd 0.1 of query_length, clipped to [0.45, 0.9] x query_length."""
    import torch

    x = (0.68 + 0.1 * torch.randn(n, generator=gen)).clamp(0.45, 0.9)
    return [max(1, int(round(float(v) * query_length))) for v in x]


def build_task(args: Args, task_dir: str) -> dict:
    """sft/ (GPTNeoXForCausalLM + tokenizer), rm/ (ppo.py's ScalarModel on the same trunk), dataset/ (SPEC
    schema, `sft` splits train/validation) under task_dir. Returns facts about the task."""
    import math

    import torch
    from datasets import Dataset, DatasetDict
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    sys.path.insert(0, ROOT)
    import ppo

    tok = make_tokenizer(args.vocab_size)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    s = MODEL_SIZES[args.model_size]
    rows = int(math.ceil((len(tok) + 8) / 64) * 64)  # spare embedding rows, like Pythia's 50,304 (no resize)
    cfg = GPTNeoXConfig(vocab_size=rows, intermediate_size=4 * s["hidden_size"],
                        max_position_embeddings=max(2048, args.query_length + args.response_length),
                        rotary_pct=0.25, use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0,
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, **s)
    torch.manual_seed(args.seed)
    policy = GPTNeoXForCausalLM(cfg)
    with torch.no_grad():
        # EOS with probability ~eos_prob per token: the final layer norm's output sums to 0 over the hidden dims
        # before its bias, so a constant bias b and an EOS row w/H give the EOS logit exactly w*b for any input.
        policy.gpt_neox.final_layer_norm.bias.fill_(1.0)
        target = args.temperature * (math.log(len(tok)) + math.log(args.eos_prob / (1 - args.eos_prob)))
        policy.get_output_embeddings().weight[eos] = target / cfg.hidden_size
    sft_dir, rm_dir, data_dir = (os.path.join(task_dir, n) for n in ("sft", "rm", "dataset"))
    policy.save_pretrained(sft_dir)
    tok.save_pretrained(sft_dir)
    rm_cfg = ppo.ScalarModelConfig(base_config=cfg.to_dict(), hidden_size=cfg.hidden_size, base_model="random")
    rm = ppo.ScalarModel(rm_cfg)
    rm.trunk.load_state_dict(policy.gpt_neox.state_dict())  # Detail 19: value/reward start from the RM
    with torch.no_grad():
        rm.scalar_head.weight.normal_(std=1 / math.sqrt(cfg.hidden_size + 1))  # Detail 14
        rm.scalar_head.bias.zero_()
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    n_params = sum(p.numel() for p in policy.parameters())
    del policy, rm

    gen = torch.Generator().manual_seed(args.seed)
    q_len, r_len = args.query_length, 8

    def split(n: int, name: str) -> Dataset:
        lengths = query_lengths(n, q_len, gen)
        cols = {k: [] for k in ("id", "subreddit", "title", "post", "summary", "query", "query_token",
                                "reference_response", "reference_response_token", "reference_response_token_len",
                                "query_reference_response", "query_reference_response_token",
                                "query_reference_response_token_len")}
        for i, ql in enumerate(lengths):
            q = torch.randint(1, len(tok) - 1, (ql,), generator=gen).tolist()
            r = torch.randint(1, len(tok) - 1, (r_len - 1,), generator=gen).tolist() + [eos]
            q_text, r_text = tok.decode(q), " " + tok.decode(r[:-1]) + tok.eos_token
            cols["id"].append(f"{name}_{i}")
            cols["subreddit"].append("random")
            cols["title"].append("random")
            cols["post"].append(q_text)
            cols["summary"].append(tok.decode(r[:-1]))
            cols["query"].append(q_text)
            cols["query_token"].append([pad] * (q_len - ql) + q)  # left-padded to query_length
            cols["reference_response"].append(r_text)
            cols["reference_response_token"].append(r)
            cols["reference_response_token_len"].append(r_len)
            cols["query_reference_response"].append(q_text + r_text)
            cols["query_reference_response_token"].append(q + r)
            cols["query_reference_response_token_len"].append(ql + r_len)
        return Dataset.from_dict(cols)

    n_train = args.batch_size * args.num_updates
    DatasetDict({"train": split(n_train, "train"), "validation": split(8, "validation")}).save_to_disk(
        os.path.join(data_dir, "sft"))
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump({"query_length": q_len, "sft_response_length": r_len, "pad_token_id": pad, "eos_token_id": eos,
                   "source": "random", "tokenizer": "word-level random"}, f)
    return {"model_config": {k: cfg.to_dict()[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                           "intermediate_size", "vocab_size")},
            "params_per_model": n_params,
            "sft_dir": sft_dir, "rm_dir": rm_dir, "dataset_dir": data_dir, "pad_id": pad, "eos_id": eos}


# ----------------------------------------------------------------------------------------------------------------
# Workers: one process per implementation
# ----------------------------------------------------------------------------------------------------------------
def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak RSS of this process image (VmHWM). Not getrusage's ru_maxrss: that one keeps the parent's RSS at
    fork time across exec, so every worker would report at least the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux (macOS: bytes)


def phase_summary(updates: list, warmup: int, batch: int) -> dict:
    """updates: per-update dicts of phase seconds. Episodes/s over the timed updates; per-phase medians."""
    timed = updates[warmup:]
    total = sum(u["generation"] + u["rollout_forward"] + u["training"] for u in timed)
    return {"episodes_per_second": batch * len(timed) / total, "timed_updates": len(timed),
            "seconds_per_update": total / len(timed),
            **{f"median_{k}_s": statistics.median(u[k] for u in timed)
               for k in ("generation", "rollout_forward", "training")},
            "per_update": updates}


def load_ppo(path: str = "ppo.py"):
    """Import the ppo.py at `path` (relative to the repository root) as the module `ppo`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ppo", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules["ppo"] = module
    spec.loader.exec_module(module)
    return module


def worker_ppo(args: Args, task: dict, run_dir: str) -> dict:
    import torch

    ppo = load_ppo(args.ppo_path)
    base_rss = rss_now_mb()
    widths = []  # (rows, query width) of every rollout generation: FLOPs follow the batch's trimmed context
    original_generate = ppo.generate

    def recording_generate(policy, queries, pad_id, generation_config):
        if generation_config.temperature == args.temperature:
            widths.append((queries.size(0), queries.size(1)))
        return original_generate(policy, queries, pad_id, generation_config)

    ppo.generate = recording_generate
    argv = ["--preset", "paper", "--sft_model_path", task["sft_dir"], "--reward_model_path", task["rm_dir"],
            "--dataset_path", task["dataset_dir"], "--output_dir", run_dir,
            "--total_episodes", str(args.batch_size * args.num_updates), "--total_batch_size", str(args.batch_size),
            "--per_device_train_batch_size", str(args.per_device_train_batch_size),
            "--num_mini_batches", str(args.num_mini_batches), "--num_ppo_epochs", str(args.num_ppo_epochs),
            "--local_rollout_forward_batch_size", str(args.local_rollout_forward_batch_size),
            "--response_length", str(args.response_length), "--temperature", str(args.temperature),
            "--lr", str(args.lr), "--seed", str(args.seed), "--eval_every", "0", "--num_eval_samples", "8",
            "--eval_batch_size", "8", "--save_every", "0", "--no-save-model", "--num_sample_rows", "0"]
    if args.device == "cpu":
        argv += ["--num_threads", str(args.num_threads)]
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ppo.main(ppo.parse_args(argv))
    metrics = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    metrics = [m for m in metrics if "time/generation" in m]
    updates = [{"generation": m["time/generation"], "rollout_forward": m["time/rollout_forward"],
                "training": m["time/training"]} for m in metrics]
    # group the generation calls into updates (rows add up to batch_size per update)
    contexts, rows = [], 0
    for n, w in widths:
        if rows == 0:
            contexts.append(w)
        rows = (rows + n) % args.batch_size
    out = phase_summary(updates, args.warmup_updates, args.batch_size)
    out.update(contexts=contexts[: len(updates)], response_length_mean=statistics.mean(
        m["objective/response_length"] for m in metrics), peak_rss_mb=peak_rss_mb(), base_rss_mb=base_rss,
        # update 1 before any optimizer step: ratio 1 on the first minibatch, KL 0 to the identical reference
        first_minibatch_ratio_dev=metrics[0]["debug/first_minibatch_ratio_dev"], first_update_kl=metrics[0]["objective/kl"])
    if args.device == "cuda":
        out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def worker_trl(args: Args, task: dict, run_dir: str) -> dict:
    import warnings

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    warnings.filterwarnings("ignore")
    try:
        import trl
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError as e:
        return {"missing": f"{type(e).__name__}: {e}"}
    import numpy as np
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    sys.path.insert(0, ROOT)
    import ppo  # for its ScalarModel: the very same reward / value model class

    trainer_module = sys.modules[PPOTrainer.__module__]
    base_rss = rss_now_mb()
    if args.device == "cpu":
        torch.set_num_threads(args.num_threads)

    class TRLScalarModel(ppo.ScalarModel):
        """TRL reads `model.score(hidden)` after `getattr(model, model.base_model_prefix)` (the trunk)."""

        @property
        def score(self):
            return self.scalar_head

    tok = AutoTokenizer.from_pretrained(task["sft_dir"], padding_side="left")
    policy = GPTNeoXForCausalLM.from_pretrained(task["sft_dir"])
    ref_policy = GPTNeoXForCausalLM.from_pretrained(task["sft_dir"])
    value_model = TRLScalarModel.from_pretrained(task["rm_dir"])
    reward_model = TRLScalarModel.from_pretrained(task["rm_dir"])
    data = load_from_disk(os.path.join(task["dataset_dir"], "sft"))
    pad = tok.pad_token_id

    def unpadded(split):
        return data[split].map(lambda r: {"input_ids": [t for t in r["query_token"] if t != pad]},
                               remove_columns=data[split].column_names)

    # TRL's batch = per_device_train_batch_size x gradient_accumulation_steps, then split into num_mini_batches;
    # so its accumulation steps are batch / micro-batch (same forward/backward passes as ppo.py; with more than one
    # minibatch accelerate then steps TRL's optimizer once per epoch instead of once per minibatch: TRL's quirk).
    ga = args.batch_size // args.per_device_train_batch_size
    config = PPOConfig(
        output_dir=run_dir, seed=args.seed, learning_rate=args.lr, adam_epsilon=1e-5,
        per_device_train_batch_size=args.per_device_train_batch_size, gradient_accumulation_steps=ga,
        num_mini_batches=args.num_mini_batches, num_ppo_epochs=args.num_ppo_epochs,
        total_episodes=args.batch_size * args.num_updates,
        local_rollout_forward_batch_size=args.local_rollout_forward_batch_size,
        response_length=args.response_length, temperature=args.temperature, stop_token="eos",
        missing_eos_penalty=1.0, kl_coef=0.05, kl_estimator="k1", cliprange=0.2, cliprange_value=0.2,
        vf_coef=0.1, gamma=1.0, lam=0.95, whiten_rewards=False, num_sample_generations=0,
        per_device_eval_batch_size=8, save_strategy="no", report_to="none", logging_steps=1,
        disable_tqdm=True, bf16=args.device == "cuda", fp16=False, use_cpu=args.device == "cpu",
        dataloader_num_workers=0)
    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, value_model=value_model, train_dataset=unpadded("train"),
                         eval_dataset=unpadded("validation"))
    # Detail 20 in both: exactly response_length tokens (no early stop when every row has sampled EOS); the
    # truncation after the first EOS (Detail 21) stays on through trainer.stop_token_id.
    trainer.policy_model.generation_config.eos_token_id = None

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    marks = []  # one dict per update: gen_start, gen_end, train_start, train_end

    original_batch_generation = trainer_module.batch_generation

    def timed_batch_generation(*a, **k):
        sync()
        marks.append({"gen_start": time.perf_counter(), "context": a[1].size(1)})
        out = original_batch_generation(*a, **k)
        sync()
        marks[-1]["gen_end"] = time.perf_counter()
        return out

    trainer_module.batch_generation = timed_batch_generation

    def first_training_forward(module, inputs):  # the wrapper runs only in the PPO epochs
        if torch.is_grad_enabled() and "train_start" not in marks[-1]:
            sync()
            marks[-1]["train_start"] = time.perf_counter()

    trainer.model.register_forward_pre_hook(first_training_forward)
    original_step = trainer.optimizer.step

    def timed_step(*a, **k):
        out = original_step(*a, **k)
        sync()
        marks[-1]["train_end"] = time.perf_counter()
        return out

    trainer.optimizer.step = timed_step
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    np.random.seed(args.seed)
    trainer.train()
    updates = [{"generation": m["gen_end"] - m["gen_start"], "rollout_forward": m["train_start"] - m["gen_end"],
                "training": m["train_end"] - m["train_start"]} for m in marks]
    out = phase_summary(updates, args.warmup_updates, args.batch_size)
    if trainer.args.batch_size != args.batch_size or trainer.args.local_mini_batch_size != args.batch_size // args.num_mini_batches:
        raise RuntimeError(f"TRL ran batch {trainer.args.batch_size} / minibatch {trainer.args.local_mini_batch_size}, "
                           f"not {args.batch_size} / {args.batch_size // args.num_mini_batches}")
    out.update(contexts=[m["context"] for m in marks], trl_version=trl.__version__, peak_rss_mb=peak_rss_mb(),
               base_rss_mb=base_rss)
    if args.device == "cuda":
        out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_worker(argv: list) -> None:
    side, args_path, task_path, run_dir, result_path = argv
    args = Args(**json.load(open(args_path)))
    task = json.load(open(task_path))
    result = (worker_ppo if side == "ppo" else worker_trl)(args, task, run_dir)
    with open(result_path, "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def aggregate(runs: list) -> dict:
    """Medians over the repeats of one side (peak memory: the largest); every run is kept under 'runs'."""
    if "missing" in runs[0]:
        return runs[0]
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    out = {k: med(k) for k in ("episodes_per_second", "seconds_per_update", "median_generation_s",
                                "median_rollout_forward_s", "median_training_s", "base_rss_mb")}
    out.update({k: max(r[k] for r in runs) for k in ("peak_rss_mb", "peak_gpu_memory_mb") if k in runs[0]})
    out["episodes_per_second_all"] = [r["episodes_per_second"] for r in runs]
    out["runs"] = runs
    return out


def fmt_rate(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}FLOP/s"
    return f"{x:.0f} FLOP/s"


def main(args: Args) -> dict:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no GPU")
    if args.device == "cpu":
        torch.set_num_threads(args.num_threads)
    os.makedirs(args.output_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="throughput_")
    task_dir = os.path.join(args.output_dir, "task") if args.keep_task else os.path.join(work, "task")
    if os.path.isdir(task_dir):
        shutil.rmtree(task_dir)
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    if args.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(args.num_threads),
                   ACCELERATE_MIXED_PRECISION="no")
    else:
        env.update(ACCELERATE_MIXED_PRECISION="bf16")
    load = os.getloadavg()
    print(f"[throughput] device {args.device}, model {args.model_size}, threads {args.num_threads}, "
          f"load average {load[0]:.2f} on {os.cpu_count()} cores", flush=True)
    peak_before = matmul_peak(args.matmul_size, args.device)
    t0 = time.perf_counter()
    task = build_task(args, task_dir)
    print(f"[throughput] task built in {time.perf_counter() - t0:.1f} s: {task['model_config']}", flush=True)
    paths = {"args": os.path.join(work, "args.json"), "task": os.path.join(work, "task.json")}
    json.dump(asdict(args), open(paths["args"], "w"))
    json.dump(task, open(paths["task"], "w"))

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    runs = {side: [] for side in sides}
    for rep in range(args.repeats):
        # interleaved, order alternating per repeat, so that a change of machine load hits both sides alike
        for side in (sides if rep % 2 == 0 else sides[::-1]):
            if runs[side] and "missing" in runs[side][0]:
                continue
            run_dir = os.path.join(work, f"run_{side}_{rep}")
            result_path = os.path.join(work, f"result_{side}_{rep}.json")
            log_path = os.path.join(args.output_dir, f"{side}.log")
            print(f"[throughput] running {'ppo.py' if side == 'ppo' else 'TRL PPOTrainer'} ({args.num_updates} "
                  f"updates, repeat {rep + 1}/{args.repeats}, load {os.getloadavg()[0]:.2f}, log: {log_path}) ...",
                  flush=True)
            t0 = time.perf_counter()
            with open(log_path, "w") as log:
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "_worker", side, paths["args"],
                                       paths["task"], run_dir, result_path], stdout=log, stderr=subprocess.STDOUT,
                                      env=env, cwd=ROOT)
            if proc.returncode != 0 or not os.path.isfile(result_path):
                tail = open(log_path).read()[-3000:]
                raise RuntimeError(f"the {side} run failed (exit {proc.returncode}); end of {log_path}:\n{tail}")
            result = json.load(open(result_path))
            result["wall_s"] = time.perf_counter() - t0
            runs[side].append(result)
    results = {side: aggregate(r) for side, r in runs.items()}
    peak_after = matmul_peak(args.matmul_size, args.device)
    peak = max(peak_before["best"], peak_after["best"])

    summary = {"args": asdict(args), "model_config": task["model_config"],
               "params_per_model": task["params_per_model"], "load_average_start": load[0],
               "load_average_end": os.getloadavg()[0],
               "matmul_peak": {"flops_per_second": peak, "before": peak_before, "after": peak_after},
               "results": results}
    ppo_res = results.get("ppo")
    if ppo_res:
        for run in ppo_res["runs"]:
            per_update = run["per_update"]
            flops = [ppo_update_flops(task["model_config"], args.batch_size, c, args.response_length,
                                      args.num_ppo_epochs) for c in run["contexts"]]
            timed = range(args.warmup_updates, len(per_update))
            run["flops_per_update"] = statistics.mean(sum(f.values()) for f in flops)
            run["achieved_flops_per_second"] = (sum(sum(flops[i].values()) for i in timed)
                                                / sum(sum(per_update[i].values()) for i in timed))
            run["phase_flops_per_second"] = {k: sum(flops[i][k] for i in timed) / sum(per_update[i][k] for i in timed)
                                             for k in ("generation", "rollout_forward", "training")}
        ppo_res["flops_per_update"] = statistics.median(r["flops_per_update"] for r in ppo_res["runs"])
        ppo_res["achieved_flops_per_second"] = statistics.median(r["achieved_flops_per_second"] for r in ppo_res["runs"])
        ppo_res["fraction_of_matmul_peak"] = ppo_res["achieved_flops_per_second"] / peak
        ppo_res["phase_fraction_of_peak"] = {k: statistics.median(r["phase_flops_per_second"][k] for r in ppo_res["runs"])
                                             / peak for k in ("generation", "rollout_forward", "training")}
    trl_res = results.get("trl")
    if trl_res and "missing" not in trl_res and ppo_res:
        summary["speedup_ppo_over_trl"] = ppo_res["episodes_per_second"] / trl_res["episodes_per_second"]
        key = "peak_gpu_memory_mb" if args.device == "cuda" else "peak_rss_mb"
        summary["memory_ratio_ppo_over_trl"] = ppo_res[key] / trl_res[key]
    with open(os.path.join(args.output_dir, "throughput.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print_report(args, summary)
    shutil.rmtree(work, ignore_errors=True)
    return summary


def print_report(args: Args, s: dict) -> None:
    cfg = s["model_config"]
    print(f"\n== PPO throughput: {args.device}, GPT-NeoX hidden {cfg['hidden_size']} x {cfg['num_hidden_layers']} layers,"
          f" vocab {cfg['vocab_size']}; batch {args.batch_size}, micro-batch {args.per_device_train_batch_size}, "
          f"{args.num_mini_batches} minibatches, {args.num_ppo_epochs} PPO epochs, queries <= {args.query_length} "
          f"tokens, {args.response_length} response tokens, T {args.temperature}; {args.num_updates} updates "
          f"({args.warmup_updates} warm-up not timed); load average {s['load_average_start']:.2f} -> "
          f"{s['load_average_end']:.2f}")
    mem_key = "peak_gpu_memory_mb" if args.device == "cuda" else "peak_rss_mb"
    header = f"{'':16}{'episodes/s':>11}{'s/update':>10}{'generation':>12}{'rollout fwd':>12}{'training':>10}" \
             f"{'peak MiB':>10}{'(+ over imports)':>17}"
    print(header)
    for side, name in (("ppo", "ppo.py"), ("trl", "TRL PPOTrainer")):
        r = s["results"].get(side)
        if r is None:
            continue
        if "missing" in r:
            print(f"{name:16}TRL is missing ({r['missing']}): pip install -r requirements-trl.txt")
            continue
        extra = "" if args.device == "cuda" else f"{r['peak_rss_mb'] - r['base_rss_mb']:>17.0f}"
        print(f"{name:16}{r['episodes_per_second']:>11.2f}{r['seconds_per_update']:>10.2f}"
              f"{r['median_generation_s']:>12.2f}{r['median_rollout_forward_s']:>12.2f}{r['median_training_s']:>10.2f}"
              f"{r[mem_key]:>10.0f}{extra}")
    if args.repeats > 1:
        print("episodes/s of each run: " + "; ".join(
            f"{side}: " + ", ".join(f"{x:.2f}" for x in r["episodes_per_second_all"])
            for side, r in s["results"].items() if "runs" in r) + f" (medians above, {args.repeats} interleaved runs)")
    if "speedup_ppo_over_trl" in s:
        print(f"ppo.py / TRL: {s['speedup_ppo_over_trl']:.2f}x episodes/s, {s['memory_ratio_ppo_over_trl']:.2f}x peak memory")
    r = s["results"].get("ppo")
    if r:
        pk = s["matmul_peak"]
        print(f"ppo.py model FLOPs: {r['flops_per_update'] / 1e9:.1f} GFLOP/update, achieved "
              f"{fmt_rate(r['achieved_flops_per_second'])} = {100 * r['fraction_of_matmul_peak']:.1f}% of the measured "
              f"{pk['before']['dtype']} matmul peak {fmt_rate(pk['flops_per_second'])} ({pk['before']['n']}^3, best of "
              f"{2 * 7}); by phase: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["phase_fraction_of_peak"].items()))
    print(f"(details: {os.path.join(args.output_dir, 'throughput.json')})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        run_worker(sys.argv[2:])
    else:
        main(parse_args())
