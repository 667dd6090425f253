"""The whole pipeline on the embedded offline task, on CPU, in one command:

    python quickstart.py

embedded task (data + gold judge + tokenizer + tiny Pythia-architecture base model) -> data sets -> SFT
-> reward model -> PPO -> judge. Each stage is the same script a GPU user runs (`--preset embedded`
only changes sizes and paths). Results land in `runs/quickstart/`; the summary of every stage is
`runs/quickstart/summary.json`, whose path is printed last. The sampling and training stages start under
`accelerate launch --num_processes 2` (gloo on CPU, one thread a process: `--num_processes`).
"""

import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal

import tyro
from rich.console import Console
from rich.table import Table

console = Console()
STAGES = ("task", "data", "sft", "feedback", "rm", "ppo", "judge", "dpo")
LAUNCHED = ("sft", "feedback", "rm", "ppo", "dpo")  # the stages that sample or train: `launcher`, threads split


@dataclass
class Args:
    out_dir: str = "runs/quickstart"
    seed: int = 1
    """seed of the training stages (SFT, rater round, RM, PPO, DPO): what a seed of the paper varies"""
    task_seed: int = 1
    """seed of the embedded task (posts, references, rater labels, tokenizer, base model): fixed across training seeds,
    as the paper's seeds share one data set and one Pythia and as `benchmark/sweep.py --task_seed` does"""
    size: str = "s"
    """embedded base model size: s (0.42M parameters; the whole pipeline in 9-13 minutes on 2 CPU cores), m (0.78M), l
    (1.43M, about 25-35 minutes), xl (4.0M, about 50-60)"""
    num_threads: int = 0
    """torch threads for every stage, split between a stage's processes (0: two, or one on a one-core machine, a fixed
    number so that a seed gives the same result on the same machine; 1 on a busy machine)"""
    num_processes: int = 2
    """processes per sampling and training stage: `accelerate launch --multi_gpu --num_processes N` on CPU (gloo, the
    multi-GPU code path), threads split between them; 1 runs each stage as a plain `python X.py`. At size s two
    one-thread processes train 1.46x as many sequences per second as one two-thread process (docs/embedded_task.md)"""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16: CPU bf16 autocast in pretraining, SFT, RM, PPO and DPO (the GPU runs' mixed precision, end to end; the
    feedback sampling stays fp32). Not faster here: at m seed 1 the pipeline took 1,163 s against 1,229 s (docs/embedded_task.md)"""
    rm_lr: float = 0.0
    """reward model learning rate (0: reward.py's EMBEDDED_LR_BY_SIZE for --size)"""
    feedback_all_pairs: bool = True
    """the rater round compares every pair of a training post's 6 samples (15), not 3 disjoint pairs
    (collect_feedback.py --all_pairs), and the reward model batches them by post (reward.py --group_pairs_by_post).
    s seeds 1-3: PPO minus SFT +0.145 / +0.110 / +0.210 against +0.150 / +0.010 / +0.195 with 3 pairs, every RM closer
    to the gold judge, about 40 s more (seeds 2-3: 713 -> 767, 732 -> 760 s; docs/embedded_task.md)"""
    stages: str = "task,data,sft,feedback,rm,ppo,judge"
    """comma-separated subset of task,data,sft,feedback,rm,ppo,judge,dpo (dpo is optional: add it to run DPO too)"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(num_processes: int) -> list:
    """How a sampling or training stage starts: plain python, or accelerate's DDP launcher over gloo."""
    if num_processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


def split_micro_batches(num_processes: int) -> dict:
    """Per-process micro-batch flags that keep each training stage's global micro-batches (and so its accumulation
    steps and batch arithmetic) those of its embedded preset: the preset's micro-batches divided over the processes."""
    import importlib

    fields = {"sft": ("sft", ["per_device_train_batch_size"]), "rm": ("reward", ["per_device_train_batch_size"]),
              "ppo": ("ppo", ["per_device_train_batch_size", "local_rollout_forward_batch_size"]),
              "dpo": ("dpo", ["per_device_train_batch_size"])}
    flags = {}
    for stage, (module, names) in fields.items():
        preset = importlib.import_module(module).PRESETS["embedded"]
        flags[stage] = []
        for name in names:
            micro = getattr(preset, name)
            if micro % num_processes:
                raise SystemExit(f"--num_processes {num_processes} does not divide {module}.py's embedded {name} ({micro})")
            flags[stage] += [f"--{name}", str(micro // num_processes)]
    return flags


def cpu_model() -> str:
    """The CPU's model name (Linux), else the architecture: which machine a summary's times are from."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run(stage: str, cmds: list, log_dir: str, env: dict) -> float:
    """Runs a stage's command(s) in order; output streams to the terminal and to the stage's log file."""
    console.rule(f"[bold]{stage}")
    start = time.time()
    with open(os.path.join(log_dir, f"{stage}.log"), "w") as log:
        for cmd in cmds:
            console.print(" ".join(cmd), style="dim")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            if proc.wait() != 0:
                raise SystemExit(f"stage {stage!r} failed (exit {proc.returncode}); its log: {log.name}")
    return time.time() - start


def read(path: str) -> dict:
    return json.load(open(path)) if os.path.exists(path) else {}


def fact_rates(judge, run_dir: str) -> dict:
    """Per-fact right / wrong / missing shares of a run's evaluation samples under the gold judge ({} if absent)."""
    path = os.path.join(run_dir, "eval_samples.jsonl")
    if judge is None or not os.path.exists(path):
        return {}
    rows = [json.loads(line) for line in open(path)]
    return judge.fact_rates([r["query"] for r in rows], [r["response"] for r in rows])


def run_paths(o: str) -> tuple:
    """The stage folders of a run: task, dataset, sft, rm, ppo, dpo, feedback, dataset_feedback."""
    return tuple(os.path.join(o, x) for x in ("task", "dataset", "sft", "rm", "ppo", "dpo", "feedback", "dataset_feedback"))


def stage_commands(args: Args) -> tuple:
    """Every stage's command line(s), the environment, and the torch threads of each process of a `LAUNCHED` stage."""
    o = args.out_dir
    task, data, sft, rm, ppo, dpo, feedback, fdata = run_paths(o)
    if args.num_processes < 1:
        raise SystemExit(f"--num_processes must be at least 1 (got {args.num_processes})")
    py, go = sys.executable, launcher(args.num_processes)  # go: the stages that sample or train
    threads = args.num_threads or min(2, os.cpu_count() or 1)
    per_process = max(1, threads // args.num_processes)
    common = ["--seed", str(args.seed)]
    import ppo as ppo_stage
    import reward

    if args.size not in reward.EMBEDDED_LR_BY_SIZE:
        raise SystemExit(f"--size: unknown embedded size {args.size!r}; choose from {sorted(reward.EMBEDDED_LR_BY_SIZE)}")
    rm_lr = args.rm_lr or reward.EMBEDDED_LR_BY_SIZE[args.size]
    commands = {
        "task": [py, "embedded_task.py", "--out_dir", task, "--seed", str(args.task_seed), "--sizes", args.size],
        "data": [py, "tldr_dataset.py", "--source", "embedded", "--task_dir", task, "--output_dir", data],
        "sft": [*go, "sft.py", "--preset", "embedded", "--base_model", os.path.join(task, f"base-{args.size}"),
                "--dataset_path", data, "--output_dir", sft, "--gold_task_dir", task, *common],
        # a round of rater comparisons on the SFT policy's own samples (collect_feedback.py explains why); the
        # reward model and PPO read the preference set built from them
        "feedback": [[*go, "collect_feedback.py", "--task_dir", task, "--policy_path", sft, "--output_dir", feedback, *common],
                     [py, "tldr_dataset.py", "--source", "embedded", "--task_dir", task, "--comparisons_dir", feedback,
                      "--output_dir", fdata]],
        "rm": [*go, "reward.py", "--preset", "embedded", "--sft_model_path", sft, "--dataset_path", fdata,
               "--output_dir", rm, "--gold_task_dir", task, *common, "--lr", str(rm_lr),
               # also scored on the task's generated comparisons: the same pairs for every size and seed of a task
               "--fixed_val_dataset_path", data],
        "ppo": [*go, "ppo.py", "--preset", "embedded", "--sft_model_path", sft, "--reward_model_path", rm,
                "--dataset_path", fdata, "--output_dir", ppo, "--gold_task_dir", task, *common,
                "--total_episodes", str(ppo_stage.EMBEDDED_EPISODES_BY_SIZE[args.size])],
        "judge": [py, "eval_gpt_judge.py", "--judge", "gold", "--gold_task_dir", task,
                  "--samples", os.path.join(ppo, "eval_samples.jsonl"),
                  "--compare_samples", os.path.join(sft, "eval_samples.jsonl"), "--output_dir", os.path.join(o, "judge")],
        # DPO learns from the same rater comparisons as the reward model (the SFT policy's own samples)
        "dpo": [*go, "dpo.py", "--preset", "embedded", "--sft_model_path", sft, "--dataset_path", fdata,
                "--output_dir", dpo, "--gold_task_dir", task, *common],
    }
    env = dict(os.environ)
    if args.num_threads:
        env["OMP_NUM_THREADS"] = str(args.num_threads)
        commands["task"] += ["--num_threads", str(args.num_threads)]
    commands["ppo"] += ["--num_threads", str(per_process)]
    if args.precision == "bf16":
        commands["task"] += ["--bf16"]
        for stage in ("sft", "rm", "ppo", "dpo"):
            commands[stage] += ["--bf16_on_cpu"]
    if args.num_processes > 1:
        for stage, flags in split_micro_batches(args.num_processes).items():
            commands[stage] += flags
    if args.feedback_all_pairs:
        # 15 comparisons a post: the RM's micro-batches hold whole posts, whose query and 6 summaries run once; 32 pairs
        # (about 2 posts) an update keep the number of updates near that of 3 pairs a post in updates of 8
        commands["feedback"][0] += ["--all_pairs"]
        commands["rm"] += ["--group_pairs_by_post", "--total_batch_size", "32",
                           "--per_device_train_batch_size", str(32 // args.num_processes)]
    return commands, env, per_process


def main(args: Args):
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"--stages: unknown {sorted(unknown)}; choose from {STAGES}")
    o = args.out_dir
    task, data, sft, rm, ppo, dpo, feedback, fdata = run_paths(o)
    commands, env, per_process = stage_commands(args)
    os.makedirs(o, exist_ok=True)
    start = time.time()
    seconds = {}
    for stage in STAGES:
        if stage in stages:
            cmds = commands[stage] if isinstance(commands[stage][0], list) else [commands[stage]]
            stage_env = dict(env, OMP_NUM_THREADS=str(per_process)) if stage in LAUNCHED else env
            seconds[f"{stage}_seconds"] = round(run(stage, cmds, o, stage_env), 1)

    summary = {k: v for k, v in read(os.path.join(o, "summary.json")).items() if "len_bin" not in k}
    meta = read(os.path.join(data, "meta.json"))
    for key, n in meta.get("counts", {}).items():
        summary[f"data_{key.replace('/', '_')}_rows"] = n
    s, r, p, d, j = (read(os.path.join(x, "metrics.json")) for x in (sft, rm, ppo, dpo, os.path.join(o, "judge")))
    fb = read(os.path.join(feedback, "feedback.json"))
    pick = {
        "sft_val_loss": s.get("val_loss"), "sft_gold_win_rate": s.get("gold_win_rate"),
        "base_gold_win_rate": s.get("base_gold_win_rate"), "sft_rougeL": s.get("sft_rougeL"),
        "base_gold_score": s.get("base_gold_score"), "sft_gold_score": s.get("sft_gold_score"),
        "ppo_gold_score": p.get("gold_score"), "dpo_gold_score": d.get("dpo_gold_score"),
        "rm_val_accuracy": r.get("val_accuracy"), "rm_gold_agreement": r.get("gold_agreement"),
        "rm_fixed_val_accuracy": r.get("val_fixed_accuracy"),
        "rm_gold_corr_sft_samples": r.get("gold_corr_sft_pearson"), "rm_near_miss_accuracy": r.get("gold_near_miss_accuracy"),
        "ppo_gold_win_rate": p.get("gold_win_rate"), "ppo_final_kl": p.get("final_kl"),
        "ppo_final_score": p.get("final_score"), "ppo_episodes_per_second": p.get("episodes_per_second"),
        "feedback_train_pairs": fb.get("train", {}).get("n"), "feedback_label_agreement": fb.get("train", {}).get("label_agreement"),
        "dpo_gold_win_rate": d.get("gold_win_rate"), "dpo_val_reward_accuracy": d.get("val_reward_accuracy"),
    }
    summary.update({k: v for k, v in pick.items() if v is not None})
    # which facts the summaries get right, invent wrongly or leave out (the gold judge's view of grounding)
    judge = None
    if os.path.exists(os.path.join(task, "gold", "records.jsonl")):
        from embedded_task import GoldJudge

        judge = GoldJudge.from_dir(task)
    facts = {name: fact_rates(judge, run) for name, run in (("sft", sft), ("ppo", ppo), ("dpo", dpo))}
    for name, rates in facts.items():
        if rates:
            for outcome in ("right", "wrong"):
                summary[f"{name}_facts_{outcome}"] = sum(r[outcome] for r in rates.values()) / len(rates)
    # the judge's headline statistics (its per-length-bin figures stay in judge/metrics.json)
    summary.update({f"judge_{k}": v for k, v in j.items() if isinstance(v, (int, float)) and "len_bin" not in k})
    summary.update(seconds)
    # the pipeline's wall time: every stage's seconds, also those of stages run by an earlier invocation
    summary["wall_seconds"] = round(sum(v for k, v in summary.items() if k.endswith("_seconds") and k[: -len("_seconds")] in STAGES), 1)
    # the time of `python quickstart.py` as the README gives it: the default stages only (not the optional DPO)
    default_stages = Args.__dataclass_fields__["stages"].default.split(",")
    summary["first_command_seconds"] = round(sum(summary.get(f"{st}_seconds", 0.0) for st in default_stages), 1)
    summary["seed"], summary["task_seed"], summary["size"] = args.seed, args.task_seed, args.size
    summary["num_processes"] = args.num_processes
    summary["precision"] = args.precision
    summary["machine"] = f"{platform.node()} ({os.cpu_count()} cores, {cpu_model()})"
    with open(os.path.join(o, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    table = Table(title="Embedded TL;DR task: gold-judge win rate against the reference summaries")
    for col in ("model", "gold win rate", "mean gold score", "other"):
        table.add_column(col)
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    table.add_row(f"base-{args.size} (pretrained only)", fmt(summary.get("base_gold_win_rate")), fmt(summary.get("base_gold_score")), "")
    table.add_row("SFT", fmt(summary.get("sft_gold_win_rate")), fmt(summary.get("sft_gold_score")), f"val loss {fmt(summary.get('sft_val_loss'))}")
    if "rm_val_accuracy" in summary:
        table.add_row("reward model", "", "", f"val accuracy {fmt(summary['rm_val_accuracy'])} (fixed pairs "
                      f"{fmt(summary.get('rm_fixed_val_accuracy'))}), gold agreement {fmt(summary.get('rm_gold_agreement'))}")
    if "ppo_gold_win_rate" in summary:
        table.add_row("PPO", fmt(summary["ppo_gold_win_rate"]), fmt(summary.get("ppo_gold_score")),
                      f"final KL {fmt(summary.get('ppo_final_kl'))}, RM score {fmt(summary.get('ppo_final_score'))}, "
                      f"{fmt(summary.get('ppo_episodes_per_second'))} episodes/s")
    if "dpo_gold_win_rate" in summary:
        table.add_row("DPO", fmt(summary["dpo_gold_win_rate"]), fmt(summary.get("dpo_gold_score")), f"implicit reward accuracy {fmt(summary.get('dpo_val_reward_accuracy'))}")
    console.print(table)
    if any(facts.values()):
        ft = Table(title="Facts of the post in the evaluation summaries (share right / share wrong, i.e. invented)")
        names = [n for n in ("sft", "ppo", "dpo") if facts[n]]
        ft.add_column("fact")
        for n in names:
            ft.add_column(f"{n.upper()} right")
            ft.add_column(f"{n.upper()} wrong")
        for slot in facts[names[0]]:
            ft.add_row(slot, *[f"{facts[n][slot][o]:.2f}" for n in names for o in ("right", "wrong")])
        ft.add_row("mean", *[f"{summary[f'{n}_facts_{o}']:.2f}" for n in names for o in ("right", "wrong")])
        console.print(ft)
    times = Table(title="Wall time per stage (s)")
    for stage in STAGES:
        if f"{stage}_seconds" in summary:
            times.add_column(stage)
    times.add_column("total")
    times.add_row(*[f"{summary[f'{st}_seconds']:.0f}" for st in STAGES if f"{st}_seconds" in summary],
                  f"{summary['wall_seconds']:.0f}")
    console.print(times)
    print(os.path.abspath(os.path.join(o, "summary.json")))


if __name__ == "__main__":
    main(tyro.cli(Args))
