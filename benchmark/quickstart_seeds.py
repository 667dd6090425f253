"""The quickstart over several seeds: runs `quickstart.py` once per seed (skipping seeds already done), then writes
mean ± std over seeds, each seed's paired PPO-minus-SFT confidence interval and PPO's win rate minus SFT's per
summary-length bin (Detail 34, pooled over seeds) to a JSON file, and the README's results table from that file.

    python benchmark/quickstart_seeds.py --seeds 1,2,3          # ~11 min a seed at s on 2 idle CPU cores
    python benchmark/quickstart_seeds.py --no-run               # only re-read finished runs and rewrite the outputs

Each seed's pipeline lands in `{out_root}/seed{N}` (its `summary.json` is what is read).
"""

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import run_bin_counts  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (summary.json key, label in the README table); the judge keys are the gold judge's paired comparison
METRICS = [
    ("sft_gold_win_rate", "SFT win rate vs references"),
    ("ppo_gold_win_rate", "PPO win rate vs references"),
    ("judge_diff_win_rate", "PPO minus SFT win rate (paired)"),
    ("sft_gold_score", "SFT mean gold score"),
    ("ppo_gold_score", "PPO mean gold score"),
    ("rm_val_accuracy", "RM validation accuracy"),
    ("rm_gold_corr_sft_samples", "RM-gold correlation on SFT samples"),
    ("ppo_final_kl", "PPO final KL"),
    ("first_command_seconds", "`python quickstart.py` wall time (s)"),
    ("wall_seconds", "wall time with the optional DPO stage (s)"),
]
START, END = "<!-- quickstart-seeds:start (benchmark/quickstart_seeds.py) -->", "<!-- quickstart-seeds:end -->"


@dataclass
class Args:
    seeds: str = "1,2,3"
    size: str = "s"
    """embedded base model size passed to quickstart.py"""
    out_root: str = "runs/quickstart_seeds"
    num_threads: int = 0
    """torch threads of every stage (0: the library default)"""
    run: bool = True
    """run quickstart.py for the seeds without a summary.json (False: only read what is there)"""
    json_out: str = "docs/quickstart_seeds.json"
    readme: Optional[str] = "README.md"
    """file whose marked block receives the table (None: no README)"""


def parse_seeds(text: str) -> List[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ValueError("--seeds: no seed given")
    return seeds


def run_seed(args: Args, seed: int, run_dir: str) -> None:
    cmd = [sys.executable, os.path.join(ROOT, "quickstart.py"), "--seed", str(seed), "--size", args.size,
           "--out_dir", run_dir, "--num_threads", str(args.num_threads)]
    print(" ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise SystemExit(f"quickstart.py failed for seed {seed}; its logs: {run_dir}")


def summarise(per_seed: Dict[int, dict], machine: str) -> dict:
    """Mean and population std over seeds of each headline metric, and each seed's paired CI of PPO minus SFT."""
    out = {"seeds": sorted(per_seed), "machine": machine, "mean": {}, "std": {}, "per_seed": {}}
    for key, _ in METRICS:
        xs = [float(s[key]) for s in per_seed.values() if isinstance(s.get(key), (int, float))]
        out["mean"][key] = float(np.mean(xs)) if xs else None
        out["std"][key] = float(np.std(xs)) if xs else None
    for seed, s in sorted(per_seed.items()):
        out["per_seed"][str(seed)] = {k: s.get(k) for k, _ in METRICS}
        # kept where the run has them, not in the README table: the optional DPO stage; the RM on the task's fixed pairs
        # and its agreement with the gold judge on its own validation pairs (newer runs)
        for key in ("dpo_gold_win_rate", "rm_fixed_val_accuracy", "rm_gold_agreement", "rm_val_label_agreement"):
            if s.get(key) is not None:
                out["per_seed"][str(seed)][key] = s[key]
        out["per_seed"][str(seed)].update(ppo_minus_sft_ci=[s.get("judge_diff_win_rate_ci_low"),
                                                            s.get("judge_diff_win_rate_ci_high")])
    lows = [s.get("judge_diff_win_rate_ci_low") for s in per_seed.values()]
    out["every_seed_ci_above_zero"] = bool(lows) and all(isinstance(x, (int, float)) and x > 0 for x in lows)
    return out


def length_bins(judge_metrics: List[dict], num_bins: int = 5) -> dict:
    """Detail 34 pooled over seeds: each policy's summaries in the judge's bins of log(len(summary) / len(reference)),
    re-pooled on common edges; PPO's win rate against the references minus SFT's per bin (None where either policy
    has no summary)."""
    ends = [m[k] for m in judge_metrics for k in m if k.startswith(("len_bin", "compare_len_bin")) and k.endswith(("_lo", "_hi"))]
    if not ends:
        return {"edges": [], "ppo_minus_sft": []}
    edges = np.linspace(min(ends), max(ends), num_bins + 1)
    rates = {}
    for name, prefix in (("ppo", ""), ("sft", "compare_")):
        wins, counts = np.zeros(num_bins), np.zeros(num_bins)
        for m in judge_metrics:
            w, n = run_bin_counts(m, prefix, edges)
            wins, counts = wins + w, counts + n
        rates[name] = [float(w / n) if n else None for w, n in zip(wins, counts)]
        rates[f"{name}_n"] = [int(n) for n in counts]
    diff = [p - q if p is not None and q is not None else None for p, q in zip(rates["ppo"], rates["sft"])]
    return {"edges": [float(e) for e in edges], "ppo_minus_sft": diff, **rates}


def fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3f}"


def table_markdown(summary: dict) -> str:
    seeds = [str(s) for s in summary["seeds"]]
    lines = ["| metric | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    for key, label in METRICS:
        mu, sd = summary["mean"][key], summary["std"][key]
        if key == "wall_seconds" and all(summary["per_seed"][s].get("wall_seconds") == summary["per_seed"][s].get(
                "first_command_seconds") for s in seeds):
            continue  # no seed ran the optional DPO stage: the row would repeat the first command's time
        cells = [fmt(summary["per_seed"][s][key]) for s in seeds]
        sd_text = f"{sd:.0f}" if key.endswith("_seconds") and sd is not None else fmt(sd)  # seconds: whole numbers
        lines.append(f"| {label} | {fmt(mu)} ± {sd_text} | " + " | ".join(cells) + " |")
    cis = [summary["per_seed"][s]["ppo_minus_sft_ci"] for s in seeds]
    lines.append("| paired 95% CI, PPO minus SFT | | " + " | ".join(
        f"{lo:+.3f} to {hi:+.3f}" if lo is not None and hi is not None else "-" for lo, hi in cis) + " |")
    return "\n".join(lines)


def write_block(path: str, block: str) -> None:
    text = open(path).read()
    if START not in text or END not in text:
        raise ValueError(f"{path}: the markers {START!r} ... {END!r} are missing")
    new = text[: text.index(START) + len(START)] + "\n" + block + "\n" + text[text.index(END):]
    with open(path, "w") as f:
        f.write(new)


def main(args: Args) -> dict:
    per_seed = {}
    for seed in parse_seeds(args.seeds):
        run_dir = os.path.join(args.out_root, f"seed{seed}")
        path = os.path.join(run_dir, "summary.json")
        if not os.path.exists(path) and args.run:
            run_seed(args, seed, run_dir)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: run without --no-run, or check that seed's logs")
        with open(path) as f:
            per_seed[seed] = json.load(f)
        # the raters' agreement with the gold judge on the RM's validation pairs: the ceiling of its accuracy there
        feedback = os.path.join(run_dir, "feedback", "feedback.json")
        if os.path.exists(feedback):
            with open(feedback) as f:
                per_seed[seed]["rm_val_label_agreement"] = json.load(f).get("validation", {}).get("label_agreement")
    # the machine the runs recorded (quickstart.py writes it), else this one
    recorded = sorted({s["machine"] for s in per_seed.values() if s.get("machine")})
    machine = "; ".join(recorded) or f"{platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    summary = summarise(per_seed, machine)
    judged = [os.path.join(args.out_root, f"seed{seed}", "judge", "metrics.json") for seed in sorted(per_seed)]
    summary["by_length_bin"] = length_bins([json.load(open(p)) for p in judged if os.path.exists(p)])
    summary["written"] = time.strftime("%Y-%m-%d")
    summary["size"] = args.size
    os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
    with open(args.json_out, "w") as f:
        json.dump(summary, f, indent=1)
    table = table_markdown(summary)
    print(table)
    print("wrote", args.json_out)
    if args.readme:
        caption = (f"\nMean ± std over seeds {', '.join(map(str, summary['seeds']))} (base size `{args.size}`), "
                   f"from `{args.json_out}` ({summary['written']}, {machine}).")
        write_block(args.readme, table + "\n" + caption)
        print("wrote", args.readme)
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
