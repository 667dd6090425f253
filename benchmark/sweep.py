"""Sweep launcher: SFT -> RM -> PPO -> judge (-> DPO) for every model size x seed.

One small wrapper, not a framework. Two modes:

  real      Pythia 1B / 2.8B / 6.9B on GPUs, every training stage through
            `accelerate launch --config_file deepspeed_zero2.yaml` with the per-size settings of DETAILS.md
            (Detail 29 batch arithmetic, Detail 30 DeepSpeed + offload for 6.9B).
  embedded  the offline embedded task (tiny GPT-NeoX sizes s, m, l) on CPU, plain `python`.

    python benchmark/sweep.py --mode real --dry_run            # print every command with its arguments
    python benchmark/sweep.py --mode real                      # plain sequential loop on one 8-GPU node
    python benchmark/sweep.py --mode real --slurm              # one sbatch per stage run, chained by afterok
    python benchmark/sweep.py --mode embedded --jobs 2         # CPU sweep, 2 chains in parallel

Output folders: {out_dir}/{stage}_{model}_{seed} (sft_1b_44413, rm_1b_44413, ppo_1b_44413, judge_ppo_1b_44413,
dpo_1b_44413, judge_dpo_1b_44413), so every stage finds its inputs and benchmark/report.py finds all of them.
A stage whose last-written file (metrics.json; feedback.json and meta.json for the rater round and its preference
set) already exists is skipped (rerun the same command to resume a sweep).
"""

import dataclasses
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Tuple

import tyro

PAPER_SEEDS = "44413,55513,66613,77713"  # the paper's four seeds

# Per-size settings for the real runs (8 GPUs per run).
# Detail 29: PPO per-GPU micro-batch x gradient accumulation on 8 GPUs (1B 16x4, 2.8B 4x16, 6.9B 1x64) and
# the rollout forward-pass batch per GPU (64 / 32 / 4).
# Detail 30: ZeRO-2 bf16 for the trained models; reference + reward model offloaded to the CPU for 6.9B.
# SFT / RM / DPO micro-batches are a memory choice (not in DETAILS.md); their totals are fixed
# (Detail 12: 128, Detail 16: 64, Detail 32: 64) and the accumulation follows from micro x 8 GPUs.
REAL_SIZES: Dict[str, dict] = {
    "1b": dict(model="EleutherAI/pythia-1b-deduped", ppo_preset="paper", ppo_micro=16, ppo_accum=4, rollout_batch=64,
               offload=False, sft_micro=16, rm_micro=8, dpo_micro=8),
    "2.8b": dict(model="EleutherAI/pythia-2.8b-deduped", ppo_preset="paper-2.8b", ppo_micro=4, ppo_accum=16,
                 rollout_batch=32, offload=False, sft_micro=4, rm_micro=4, dpo_micro=4),
    "6.9b": dict(model="EleutherAI/pythia-6.9b-deduped", ppo_preset="paper-6.9b", ppo_micro=1, ppo_accum=64,
                 rollout_batch=4, offload=True, sft_micro=2, rm_micro=1, dpo_micro=1),
}
# DETAILS.md values shared by every size
PAPER = dict(
    lr=3e-6,  # Detail 8
    sft_total_batch=128, sft_epochs=1,  # Detail 12
    rm_total_batch=64, rm_epochs=1,  # Detail 16
    ppo_total_episodes=1_000_000, ppo_batch=512, ppo_epochs=4, ppo_mini_batches=1,  # Detail 29
    ppo_temperature=0.7,  # Detail 20
    kl_coef=0.05,  # Detail 25
    eval_temperature=0.01, response_length=53,  # Detail 13
    dpo_beta=0.05, dpo_total_batch=64, dpo_epochs=1,  # Detail 32
    judge_model="gpt-3.5-turbo-0125",  # Detail 33
)

EMBEDDED_SIZES = ("s", "m", "l", "xl")  # size order; the sweep runs s, m, l unless --sizes names xl
EMBEDDED_DEFAULT_SIZES = ("s", "m", "l")


def embedded_by_size(script: str, table: str, size: str):
    """A stage script's per-size value of its embedded preset, the one quickstart.py passes: reward.py's
    EMBEDDED_LR_BY_SIZE (the RM's learning rate), ppo.py's EMBEDDED_EPISODES_BY_SIZE."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    return getattr(importlib.import_module(script), table)[size]


@dataclass
class Args:
    mode: Literal["real", "embedded"] = "real"
    sizes: str = ""
    """comma-separated sizes (real: 1b,2.8b,6.9b; embedded: s,m,l and xl); empty = the mode's three (embedded: s,m,l)"""
    seeds: str = ""
    """comma-separated seeds (empty: the paper's 44413,55513,66613,77713 for real, 1,2,3 for embedded)"""
    stages: str = ""
    """subset of data,sft,feedback,rm,ppo,judge,dpo (dpo adds DPO + its judge); data is built once for the sweep.
    Empty: sft,rm,ppo,judge (real) or data,sft,feedback,rm,ppo,judge,dpo (embedded: data builds the task and its data
    set, a no-op for the parts already built; feedback = collect_feedback.py's rater round on each SFT model's own
    samples, which the run's RM, PPO and DPO then read, as in the quickstart)"""
    out_dir: str = ""
    """sweep folder (default runs/sweep for real, runs/sweep_embedded for embedded)"""
    dry_run: bool = False
    """print every command with its arguments, run nothing"""
    jobs: int = 1
    """(size, seed) chains run in parallel (local runs; embedded: 2 on a shared CPU box)"""

    # real mode
    accelerate_config: str = "deepspeed_zero2.yaml"
    """Detail 30: the repo's DeepSpeed ZeRO-2 config (deepspeed_zero3.yaml for models that do not fit)"""
    num_processes: int = 8
    """GPUs per run (the paper: 8); batch sizes of DETAILS.md assume 8"""
    dataset_dir: str = ""
    """tokenized data set (default {out_dir}/dataset, built by the `data` stage with tldr_dataset.py)"""
    judge_max_samples: Optional[int] = None
    """judge only the first N PPO eval samples (cost control for the OpenAI judge)"""
    slurm: bool = False
    """write one sbatch script per stage run into {out_dir}/slurm and submit them chained with afterok"""
    slurm_partition: Optional[str] = None
    slurm_time: str = "48:00:00"
    slurm_extra: str = ""
    """extra lines for the sbatch header, separated by ';' (e.g. '#SBATCH --account=abc')"""

    # embedded mode: every stage runs its `embedded` preset, exactly as in quickstart.py; a shrink flag below is
    # passed only when set (recorded in {out_dir}/sweep_args.json)
    task_dir: str = ""
    """embedded task folder (default {out_dir}/task); the `data` stage builds it with embedded_task.py (base models
    of the swept sizes only, each with the task seed's pretraining seed, so base-m is the quickstart's base-m)"""
    task_seed: int = 1
    """seed of the embedded task's data (fixed across the sweep: the seeds vary training, not the data)"""
    max_rows: Optional[int] = None
    """tldr_dataset.py --max_rows for the embedded data sets (None: every row, as the quickstart)"""
    rm_train_pairs: Optional[int] = None
    rm_val_pairs: Optional[int] = None
    ppo_total_episodes: Optional[int] = None
    """embedded PPO episodes (None: ppo.py's EMBEDDED_EPISODES_BY_SIZE for the size, as quickstart.py)"""
    order: Literal["seed", "size"] = "size"
    """chain order: size-major (the largest size's seeds first; with --jobs 2 the short chains fill the gaps at the
    end: 7,103 s instead of the 7,353 s measured seed-major, replaying the chain times of the 3 x 3 embedded sweep of
    2026-12-07, docs/embedded_task.md) or seed-major (complete seeds first)"""
    claim: bool = False
    """claim each chain with a file in {out_dir}/claims before running it, so that several sweep processes
    started on the same folder share the chains without running one twice"""
    dpo_train_pairs: Optional[int] = None
    feedback_posts: Optional[int] = None
    """embedded feedback stage: posts whose SFT samples the raters compare (None: collect_feedback.py's default)"""
    feedback_all_pairs: bool = True
    """embedded: the raters compare every pair of a post's 6 samples and the RM batches them by post, as
    quickstart.py --feedback_all_pairs (its default); --no-feedback-all-pairs: 3 disjoint pairs a post"""
    threads: int = 1
    """OMP_NUM_THREADS / torch threads of every embedded process of a chain; the task build, which runs alone before
    the chains, gets threads x jobs"""
    precision: Literal["fp32", "bf16"] = "fp32"
    """embedded: bf16 trains every stage and pretrains the base models under CPU bf16 autocast (quickstart.py --precision)"""


def parse_list(s: str, default: str) -> List[str]:
    return [x.strip() for x in (s or default).split(",") if x.strip()]


def run_name(stage: str, model: str, seed) -> str:
    return f"{stage}_{model}_{seed}"


def accel(args: Args, script: str) -> List[str]:
    return ["accelerate", "launch", "--config_file", args.accelerate_config, "--num_processes", str(args.num_processes),
            script]


def real_commands(args: Args, size: str, seed: int, stages: List[str]) -> List[Tuple[str, List[str]]]:
    """Commands of one (size, seed) chain of the real sweep: [(run name, argv)]."""
    if size not in REAL_SIZES:
        raise ValueError(f"--sizes: unknown real size {size!r}; choose from {sorted(REAL_SIZES)}")
    c, p, o = REAL_SIZES[size], PAPER, args.out_dir
    data = args.dataset_dir or os.path.join(o, "dataset")
    d = {st: os.path.join(o, run_name(st, size, seed)) for st in ("sft", "rm", "ppo", "dpo", "judge_ppo", "judge_dpo")}
    seed_args = ["--seed", str(seed)]
    cmds = []
    if "sft" in stages:
        cmds.append((run_name("sft", size, seed), accel(args, "sft.py") + [
            "--preset", "paper", "--base_model", c["model"], "--dataset_path", data, "--output_dir", d["sft"], *seed_args,
            "--lr", str(p["lr"]), "--total_batch_size", str(p["sft_total_batch"]),
            "--per_device_train_batch_size", str(c["sft_micro"]), "--num_train_epochs", str(p["sft_epochs"]),
            "--eval_temperature", str(p["eval_temperature"]), "--response_length", str(p["response_length"])]))
    if "rm" in stages:
        cmds.append((run_name("rm", size, seed), accel(args, "reward.py") + [
            "--preset", "paper", "--base_model", c["model"], "--sft_model_path", d["sft"], "--dataset_path", data,
            "--output_dir", d["rm"], *seed_args, "--lr", str(p["lr"]), "--total_batch_size", str(p["rm_total_batch"]),
            "--per_device_train_batch_size", str(c["rm_micro"]), "--num_train_epochs", str(p["rm_epochs"])]))
    if "ppo" in stages:
        cmds.append((run_name("ppo", size, seed), accel(args, "ppo.py") + [
            "--preset", c["ppo_preset"], "--base_model", c["model"], "--sft_model_path", d["sft"], "--reward_model_path", d["rm"],
            "--dataset_path", data, "--output_dir", d["ppo"], *seed_args, "--lr", str(p["lr"]),
            "--total_episodes", str(p["ppo_total_episodes"]), "--total_batch_size", str(p["ppo_batch"]),
            "--per_device_train_batch_size", str(c["ppo_micro"]), "--gradient_accumulation_steps", str(c["ppo_accum"]),
            "--num_ppo_epochs", str(p["ppo_epochs"]), "--num_mini_batches", str(p["ppo_mini_batches"]),
            "--local_rollout_forward_batch_size", str(c["rollout_batch"]), "--temperature", str(p["ppo_temperature"]),
            "--kl_coef", str(p["kl_coef"]), "--eval_temperature", str(p["eval_temperature"]),
            "--response_length", str(p["response_length"]), "--offload" if c["offload"] else "--no-offload"]))
    judge_common = ["--judge", "openai", "--judge_model", p["judge_model"], "--cache_path", os.path.join(o, "judge_cache.jsonl"),
                    *seed_args] + ([] if args.judge_max_samples is None else ["--max_samples", str(args.judge_max_samples)])
    if "judge" in stages:
        cmds.append((run_name("judge_ppo", size, seed), ["python", "eval_gpt_judge.py", "--preset", "paper",
                     "--samples", os.path.join(d["ppo"], "eval_samples.jsonl"),
                     "--compare_samples", os.path.join(d["sft"], "eval_samples.jsonl"),
                     "--output_dir", d["judge_ppo"], *judge_common]))
    if "dpo" in stages:
        cmds.append((run_name("dpo", size, seed), accel(args, "dpo.py") + [
            "--preset", "paper", "--base_model", c["model"], "--sft_model_path", d["sft"], "--dataset_path", data,
            "--output_dir", d["dpo"], *seed_args,
            "--lr", str(p["lr"]), "--beta", str(p["dpo_beta"]), "--total_batch_size", str(p["dpo_total_batch"]),
            "--per_device_train_batch_size", str(c["dpo_micro"]), "--num_train_epochs", str(p["dpo_epochs"]),
            "--eval_temperature", str(p["eval_temperature"]), "--response_length", str(p["response_length"])]))
        if "judge" in stages:
            cmds.append((run_name("judge_dpo", size, seed), ["python", "eval_gpt_judge.py", "--preset", "paper",
                         "--samples", os.path.join(d["dpo"], "eval_samples.jsonl"),
                         "--compare_samples", os.path.join(d["sft"], "eval_samples.jsonl"),
                         "--output_dir", d["judge_dpo"], *judge_common]))
    return cmds


def embedded_commands(args: Args, size: str, seed: int, stages: List[str]) -> List[Tuple[str, List[str]]]:
    if size not in EMBEDDED_SIZES:
        raise ValueError(f"--sizes: unknown embedded size {size!r}; choose from {EMBEDDED_SIZES}")
    o, py = args.out_dir, sys.executable
    task = args.task_dir or os.path.join(o, "task")
    data = args.dataset_dir or os.path.join(o, "dataset")
    d = {st: os.path.join(o, run_name(st, size, seed))
         for st in ("sft", "feedback", "fdata", "rm", "ppo", "dpo", "judge_ppo", "judge_dpo")}
    common = ["--dataset_path", data, "--gold_task_dir", task, "--seed", str(seed)]
    # with the feedback stage, the RM and PPO read the preference set built from the SFT model's own samples
    rl_common = ["--dataset_path", d["fdata"], *common[2:]] if "feedback" in stages else common
    opt = lambda flag, v: [] if v is None else [flag, str(v)]  # noqa: E731
    bf16 = ["--bf16_on_cpu"] if args.precision == "bf16" else []  # the training stages' precision
    all_pairs = args.feedback_all_pairs and "feedback" in stages  # every pair of a post's samples, RM batched by post
    cmds = []
    if "sft" in stages:
        cmds.append((run_name("sft", size, seed), [py, "sft.py", "--preset", "embedded", "--base_model",
                     os.path.join(task, f"base-{size}"), "--output_dir", d["sft"], *common, "--save_every", "0",
                     "--no-eval-base", *bf16]))
    if "feedback" in stages:
        cmds.append((run_name("feedback", size, seed), [py, "collect_feedback.py", "--task_dir", task, "--policy_path",
                     d["sft"], "--output_dir", d["feedback"], *opt("--num_train_posts", args.feedback_posts),
                     "--seed", str(seed), "--num_threads", str(args.threads), *(["--all_pairs"] if all_pairs else [])]))
        cmds.append((run_name("fdata", size, seed), [py, "tldr_dataset.py", "--source", "embedded", "--task_dir", task,
                     "--comparisons_dir", d["feedback"], "--output_dir", d["fdata"], *opt("--max_rows", args.max_rows)]))
    if "rm" in stages:
        cmds.append((run_name("rm", size, seed), [py, "reward.py", "--preset", "embedded", "--base_model",
                     os.path.join(task, f"base-{size}"), "--sft_model_path", d["sft"], "--output_dir", d["rm"], *rl_common,
                     "--lr", str(embedded_by_size("reward", "EMBEDDED_LR_BY_SIZE", size)),
                     # also scored on the task's generated comparisons: the same pairs for every size and seed
                     *(["--fixed_val_dataset_path", data] if "feedback" in stages else []),
                     *opt("--num_train_pairs", args.rm_train_pairs), *opt("--num_val_pairs", args.rm_val_pairs), *bf16,
                     *(["--group_pairs_by_post", "--total_batch_size", "32", "--per_device_train_batch_size", "32"]
                       if all_pairs else [])]))
    if "ppo" in stages:
        cmds.append((run_name("ppo", size, seed), [py, "ppo.py", "--preset", "embedded", "--sft_model_path", d["sft"],
                     "--reward_model_path", d["rm"], "--output_dir", d["ppo"], *rl_common,
                     "--total_episodes", str(args.ppo_total_episodes or embedded_by_size("ppo", "EMBEDDED_EPISODES_BY_SIZE", size)),
                     "--save_every", "0", "--no-save-model", "--num_threads", str(args.threads), *bf16]))
    judge = lambda cand, out: [py, "eval_gpt_judge.py", "--preset", "embedded", "--judge", "gold",  # noqa: E731
                               "--gold_task_dir", task, "--samples", os.path.join(cand, "eval_samples.jsonl"),
                               "--compare_samples", os.path.join(d["sft"], "eval_samples.jsonl"),
                               "--output_dir", out, "--seed", str(seed), "--head_to_head"]
    if "judge" in stages:
        cmds.append((run_name("judge_ppo", size, seed), judge(d["ppo"], d["judge_ppo"])))
    if "dpo" in stages:
        cmds.append((run_name("dpo", size, seed), [py, "dpo.py", "--preset", "embedded", "--sft_model_path", d["sft"],
                     "--output_dir", d["dpo"], *rl_common, *opt("--num_train_pairs", args.dpo_train_pairs),
                     "--no-eval-reference", *bf16]))
        if "judge" in stages:
            cmds.append((run_name("judge_dpo", size, seed), judge(d["dpo"], d["judge_dpo"])))
    return cmds


def data_commands(args: Args, sizes: List[str]) -> List[Tuple[str, List[str]]]:
    o = args.out_dir
    data = args.dataset_dir or os.path.join(o, "dataset")
    if args.mode == "real":
        # one data set for every size: the Pythia sizes share one tokenizer
        return [("data", ["python", "tldr_dataset.py", "--source", "hub", "--base_model", REAL_SIZES["1b"]["model"],
                          "--output_dir", data])]
    task = args.task_dir or os.path.join(o, "task")
    py = sys.executable
    # the task build runs alone, before the chains: it gets every chain's threads (2 x 1 on two cores: the quickstart's
    # 2 pretraining threads, hence its base models, bit for bit, for task seed = quickstart seed)
    build_sizes = ",".join(s for s in EMBEDDED_SIZES if s in sizes)
    return [("task", [py, "embedded_task.py", "--out_dir", task, "--seed", str(args.task_seed), "--sizes", build_sizes,
                      "--num_threads", str(args.threads * max(1, args.jobs)),
                      *(["--bf16"] if args.precision == "bf16" else [])]),
            ("data", [py, "tldr_dataset.py", "--source", "embedded", "--task_dir", task, "--output_dir", data]
             + ([] if args.max_rows is None else ["--max_rows", str(args.max_rows)]))]


def plan(args: Args) -> Tuple[List[Tuple[str, List[str]]], List[List[Tuple[str, List[str]]]]]:
    """(setup commands, one command chain per (size, seed)) in launch order: larger sizes first, then by seed
    (--order size) or seed by seed (--order seed)."""
    stages = parse_list(args.stages, "sft,rm,ppo,judge" if args.mode == "real" else "data,sft,feedback,rm,ppo,judge,dpo")
    bad = set(stages) - {"data", "sft", "feedback", "rm", "ppo", "judge", "dpo"}
    if bad:
        raise ValueError(f"--stages: unknown {sorted(bad)}")
    if args.mode == "real" and "feedback" in stages:
        raise ValueError("--stages: feedback (collect_feedback.py) exists for the embedded task only")
    default_sizes = ",".join(REAL_SIZES) if args.mode == "real" else ",".join(EMBEDDED_DEFAULT_SIZES)
    sizes = parse_list(args.sizes, default_sizes)
    seeds = [int(s) for s in parse_list(args.seeds, PAPER_SEEDS if args.mode == "real" else "1,2,3")]
    order = list(REAL_SIZES) if args.mode == "real" else list(EMBEDDED_SIZES)
    sizes = sorted(sizes, key=lambda s: -order.index(s) if s in order else 0)
    build = real_commands if args.mode == "real" else embedded_commands
    setup = data_commands(args, sizes) if "data" in stages else []
    if args.order == "size":
        chains = [build(args, size, seed, stages) for size in sizes for seed in seeds]
    else:
        chains = [build(args, size, seed, stages) for seed in seeds for size in sizes]
    return setup, chains


def fmt(argv: List[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def env_for(args: Args, setup: bool = False) -> dict:
    env = dict(os.environ)
    if args.mode == "embedded":
        n = str(args.threads * (max(1, args.jobs) if setup else 1))  # the setup runs alone, the chains side by side
        env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, TOKENIZERS_PARALLELISM="false")
    return env


# the file a stage writes last, by the prefix of its run name (metrics.json for the others): a sweep started again on
# its folder skips every stage that finished, the rater round (minutes at l) and its preference set included
DONE_FILES = {"feedback": "feedback.json", "fdata": "meta.json"}


def done_file(name: str) -> str:
    return DONE_FILES.get(name.split("_")[0], "metrics.json")


def run_one(args: Args, name: str, argv: List[str]) -> bool:
    out = os.path.join(args.out_dir, name)
    done = done_file(name)
    if name not in ("task", "data") and os.path.exists(os.path.join(out, done)):
        print(f"[skip] {name}: {done} exists", flush=True)
        return True
    os.makedirs(os.path.join(args.out_dir, "logs"), exist_ok=True)
    log_path = os.path.join(args.out_dir, "logs", f"{name}.log")
    t0 = time.time()
    print(f"[start {time.strftime('%H:%M:%S')}] {name}: {fmt(argv)}", flush=True)
    with open(log_path, "w") as log:
        rc = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, env=env_for(args, setup=name in ("task", "data")))
    print(f"[{'done' if rc == 0 else 'FAILED'} {time.strftime('%H:%M:%S')}] {name} in {time.time() - t0:.0f}s"
          + ("" if rc == 0 else f" (exit {rc}; log {log_path})"), flush=True)
    return rc == 0


def run_chain(args: Args, chain: List[Tuple[str, List[str]]], seconds: Optional[Dict[str, float]] = None) -> bool:
    """Run a chain's stages in order; its wall seconds go to `seconds[first stage's name]` when given."""
    t0 = time.time()
    ok = _run_chain(args, chain)
    if seconds is not None and chain:
        seconds[chain[0][0]] = round(time.time() - t0, 1)
    return ok


def _run_chain(args: Args, chain: List[Tuple[str, List[str]]]) -> bool:
    if args.claim and chain:
        os.makedirs(os.path.join(args.out_dir, "claims"), exist_ok=True)
        try:
            os.close(os.open(os.path.join(args.out_dir, "claims", chain[0][0]), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            print(f"[claimed elsewhere] {chain[0][0]}", flush=True)
            return True
    for name, argv in chain:
        if not run_one(args, name, argv):
            return False  # later stages need this one's output
    return True


SBATCH = """#!/bin/bash
#SBATCH --job-name={name}
#SBATCH --nodes=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --exclusive
#SBATCH --time={time}
#SBATCH --output={log}
{extra}
set -euo pipefail
cd {repo}
{cmd}
"""


def write_sbatch(args: Args, name: str, argv: List[str]) -> str:
    sdir = os.path.join(args.out_dir, "slurm")
    os.makedirs(sdir, exist_ok=True)
    extra = [f"#SBATCH --partition={args.slurm_partition}"] if args.slurm_partition else []
    extra += [x.strip() for x in args.slurm_extra.split(";") if x.strip()]
    path = os.path.join(sdir, f"{name}.sbatch")
    with open(path, "w") as f:
        f.write(SBATCH.format(name=name, gpus=args.num_processes, time=args.slurm_time, extra="\n".join(extra),
                              log=os.path.abspath(os.path.join(sdir, f"{name}.%j.log")), repo=os.getcwd(), cmd=fmt(argv)))
    return path


def submit(args: Args, setup, chains) -> None:
    """One sbatch per stage run; each waits (afterok) for the job whose output it reads."""
    def sbatch(name, argv, dep: Optional[str]) -> str:
        path = write_sbatch(args, name, argv)
        cmd = ["sbatch", "--parsable"] + ([f"--dependency=afterok:{dep}"] if dep else []) + [path]
        if args.dry_run:
            print(fmt(cmd))
            return f"<{name}>"
        return subprocess.check_output(cmd, text=True).strip().split(";")[0]

    data_job = None
    for name, argv in setup:
        data_job = sbatch(name, argv, data_job)
    for chain in chains:
        dep, by_stage = data_job, {}
        for name, argv in chain:
            stage = name.split("_")[0] if not name.startswith("judge_") else "judge"
            # judge_dpo / dpo depend on their own model; ppo on rm; rm on sft
            src = {"sft": data_job, "rm": by_stage.get("sft"), "ppo": by_stage.get("rm"), "dpo": by_stage.get("sft"),
                   "judge": by_stage.get("dpo" if name.startswith("judge_dpo") else "ppo")}.get(stage, dep)
            by_stage[stage if stage != "judge" else name] = sbatch(name, argv, src)
        print(f"submitted {[n for n, _ in chain]}", flush=True)


def main(args: Args) -> None:
    if not args.out_dir:
        args.out_dir = "runs/sweep" if args.mode == "real" else "runs/sweep_embedded"
    setup, chains = plan(args)
    if args.slurm:
        if args.mode != "real":
            raise ValueError("--slurm is for --mode real")
        submit(args, setup, chains)
        return
    if args.dry_run:
        for name, argv in setup + [c for chain in chains for c in chain]:
            print(f"# {name}\n{fmt(argv)}")
        return
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "sweep_args.json"), "w") as f:
        json.dump(dataclasses.asdict(args), f, indent=2)
    t0 = time.time()
    for name, argv in setup:
        if not run_one(args, name, argv):
            raise SystemExit(f"{name} failed")
    t1 = time.time()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        chain_seconds: Dict[str, float] = {}
        ok = list(pool.map(lambda ch: run_chain(args, ch, chain_seconds), chains))
    t2 = time.time()
    print(f"sweep finished in {t2 - t0:.0f}s (setup {t1 - t0:.0f}s, chains {t2 - t1:.0f}s): "
          f"{sum(ok)}/{len(ok)} chains complete", flush=True)
    # the wall time (setup included; stages skipped on a resumed sweep cost nothing) and the machine, for
    # benchmark/report.py's JSON summary
    with open(os.path.join(args.out_dir, "sweep_timing.json"), "w") as f:
        json.dump({"wall_seconds": round(t2 - t0, 1), "setup_seconds": round(t1 - t0, 1),
                   "chains_seconds": round(t2 - t1, 1), "jobs": args.jobs, "threads": args.threads,
                   # each chain's own wall time, by its first stage (sft_l_1, ...): what another order would take
                   "chain_seconds": {c[0][0]: chain_seconds[c[0][0]] for c in chains if c and c[0][0] in chain_seconds},
                   "sizes": args.sizes, "seeds": args.seeds, "chains_complete": sum(ok), "chains": len(ok),
                   "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"}, f)
    if not all(ok):
        raise SystemExit(1)


if __name__ == "__main__":
    main(tyro.cli(Args))
