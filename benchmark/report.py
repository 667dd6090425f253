"""Figures and a results table from a sweep's JSON outputs (no wandb needed).

    python benchmark/report.py --sweep_dir runs/sweep_embedded --out_dir docs/figures --table docs/embedded_sweep.md
    python benchmark/report.py --quickstart_runs runs/qs/seed1,runs/qs/seed2,runs/qs_m/seed1   # quickstart.py folders
    python benchmark/report.py --seed_files docs/quickstart_seeds.json,docs/quickstart_seeds_m.json  # their JSON files

Reads the run folders written by benchmark/sweep.py, named {stage}_{model}_{seed}:
  rm_*/metrics.json         val_accuracy, val_accuracy/confidence_{k}, gold_agreement
  sft_*/metrics.json        gold_win_rate (embedded task) - fallback for the SFT win rate
  ppo_*/metrics.json(l)     gold_win_rate, final_kl; per update objective/scores, objective/kl, objective/response_length
  dpo_*/metrics.json        val_reward_accuracy, gold_win_rate
  judge_ppo_* / judge_dpo_* eval_gpt_judge.py: win_rate (candidate vs reference), compare_win_rate (SFT vs
                            reference on the same queries), len_bin{i}_{lo,hi,n,win_rate} (Detail 34)
Writes rm_accuracy.png, win_rate_vs_size.png, win_rate_by_length.png, ppo_curves.png, a markdown table
(mean ± std over seeds per size, with the number of seeds) and the same numbers as JSON (`--json_out`), which
README's results table is generated from.
"""

import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import tyro

RUN_RE = re.compile(r"^(sft|feedback|rm|ppo|dpo|judge_ppo|judge_dpo)_(.+)_(\d+)$")
SIZE_ORDER = ["s", "m", "l", "xl", "1b", "2.8b", "6.9b"]


@dataclass
class Args:
    sweep_dir: str = "runs/sweep_embedded"
    out_dir: str = "docs/figures"
    """where the PNGs go"""
    table: Optional[str] = "docs/embedded_sweep.md"
    """markdown table path (None: print only)"""
    title: str = "embedded task (offline, tiny GPT-NeoX models; NOT the real TL;DR)"
    prefix: str = "embedded_"
    """file name prefix of the PNGs"""
    len_bins: int = 6
    """common bins of log(len(candidate)/len(reference)) used to pool the judge's per-run length bins"""
    json_out: Optional[str] = "docs/embedded_sweep.json"
    """the sweep's numbers as JSON (None: not written)"""
    readme: Optional[str] = None
    """file (README.md) whose block between README_START and README_END receives the by-size table of the JSON"""
    quickstart_runs: Optional[str] = None
    """comma-separated quickstart.py output folders to report instead of --sweep_dir (size and seed from each
    summary.json; unlike sweep.py's runs, each seed there has its own task data and base model)"""
    seed_files: Optional[str] = None
    """comma-separated JSON files of benchmark/quickstart_seeds.py (one size each, seeds of a size may be split over
    files): they keep each seed's headline numbers, not the training curves of the PPO figure"""
    rm_cross_eval: Optional[str] = None
    """JSON of benchmark/rm_cross_eval.py: each run's RM accuracy on the task's fixed validation pairs (the same
    pairs for every size of a seed, like the paper's human validation set), added to the figure and the JSON"""


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_jsonl(path: str) -> List[dict]:
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass  # a half-written last line of a running job
    except OSError:
        pass
    return rows


def size_key(s: str):
    return (SIZE_ORDER.index(s), s) if s in SIZE_ORDER else (len(SIZE_ORDER), s)


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_run(stage: str, path: str) -> Optional[dict]:
    """One finished run folder of `stage` as {"metrics": dict[, "samples", "history"]}; None while unfinished."""
    if stage == "feedback":  # the rater round: its validation pairs' statistics (collect_feedback.py's feedback.json)
        metrics = (read_json(os.path.join(path, "feedback.json")) or {}).get("validation")
        return {"metrics": dict(metrics)} if metrics else None
    metrics = read_json(os.path.join(path, "metrics.json"))
    if metrics is None:
        return None
    entry = {"metrics": dict(metrics)}
    if stage in ("sft", "ppo", "dpo"):
        # mean gold score of the eval samples (embedded task: the judge's continuous score), when recorded
        rows = read_jsonl(os.path.join(path, "eval_samples.jsonl"))
        entry["samples"] = [(r["response_token_len"], r["gold_score"]) for r in rows
                            if finite(r.get("gold_score")) and finite(r.get("response_token_len"))]
        for key, out in (("gold_score", "eval_gold_score"), ("gold_reference_score", "eval_gold_reference_score")):
            xs = [r[key] for r in rows if finite(r.get(key))]
            if xs:
                entry["metrics"][out] = float(np.mean(xs))
    if stage == "ppo":
        entry["history"] = read_jsonl(os.path.join(path, "metrics.jsonl"))
    return entry


def collect(sweep_dir: str) -> Dict[str, Dict[str, Dict[int, dict]]]:
    """runs[stage][size][seed] = {"metrics": dict, "history": list (ppo only)}; unfinished runs are left out."""
    runs: Dict[str, Dict[str, Dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    if not os.path.isdir(sweep_dir):
        raise ValueError(f"--sweep_dir: {sweep_dir!r} is not a folder")
    for name in sorted(os.listdir(sweep_dir)):
        m = RUN_RE.match(name)
        entry = m and load_run(m.group(1), os.path.join(sweep_dir, name))
        if entry:
            runs[m.group(1)][m.group(2)][int(m.group(3))] = entry
    return runs


# a quickstart.py output folder: the stage folders under their quickstart names
QUICKSTART_STAGES = {"sft": "sft", "feedback": "feedback", "rm": "rm", "ppo": "ppo", "dpo": "dpo", "judge_ppo": "judge"}


def collect_quickstart(dirs: List[str]):
    """The same runs[stage][size][seed] from quickstart.py output folders (size and seed from each summary.json),
    and their timing: the summed wall seconds and the machines named by the summaries."""
    runs: Dict[str, Dict[str, Dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    wall, machines, task_seeds = 0.0, [], set()
    for d in dirs:
        summary = read_json(os.path.join(d, "summary.json"))
        if summary is None or "size" not in summary or "seed" not in summary:
            raise ValueError(f"--quickstart_runs: {d!r} has no summary.json with size and seed (run quickstart.py there)")
        size, seed = str(summary["size"]), int(summary["seed"])
        if seed in runs["sft"].get(size, {}):
            raise ValueError(f"--quickstart_runs: size {size} seed {seed} appears twice ({d!r})")
        for stage, sub in QUICKSTART_STAGES.items():
            entry = load_run(stage, os.path.join(d, sub))
            if entry:
                runs[stage][size][seed] = entry
        wall += float(summary.get("wall_seconds") or 0.0)
        task_seeds.add(summary.get("task_seed", seed))  # before --task_seed, a run's task came from its seed
        if summary.get("machine") and summary["machine"] not in machines:
            machines.append(summary["machine"])
    return runs, {"wall_seconds": round(wall, 1), "machine": "; ".join(machines) or None,
                  "source": f"quickstart.py runs (each builds its task: task seeds {sorted(task_seeds)})", "runs": list(dirs)}


def values(runs, stage: str, size: str, key: str) -> List[float]:
    return [r["metrics"][key] for r in runs.get(stage, {}).get(size, {}).values() if finite(r["metrics"].get(key))]


def win_rates(runs, size: str) -> Dict[str, List[float]]:
    """Per model, the seeds' win rates against the references. The judge run's numbers come first (the same
    judge for SFT and the candidate, on the same queries); the stage's own gold_win_rate is the fallback."""
    out = {}
    jp = runs.get("judge_ppo", {}).get(size, {})
    jd = runs.get("judge_dpo", {}).get(size, {})
    sft = [r["metrics"]["compare_win_rate"] for r in jp.values() if finite(r["metrics"].get("compare_win_rate"))]
    out["SFT"] = sft or values(runs, "sft", size, "gold_win_rate")
    out["PPO"] = [r["metrics"]["win_rate"] for r in jp.values() if finite(r["metrics"].get("win_rate"))] \
        or values(runs, "ppo", size, "gold_win_rate")
    out["DPO"] = [r["metrics"]["win_rate"] for r in jd.values() if finite(r["metrics"].get("win_rate"))] \
        or values(runs, "dpo", size, "gold_win_rate")
    out["PPO vs SFT"] = [r["metrics"]["h2h_win_rate"] for r in jp.values() if finite(r["metrics"].get("h2h_win_rate"))]
    out["DPO vs SFT"] = [r["metrics"]["h2h_win_rate"] for r in jd.values() if finite(r["metrics"].get("h2h_win_rate"))]
    return out


def mean_std(xs: List[float]) -> str:
    if not xs:
        return "-"
    return f"{np.mean(xs):.3f} ± {np.std(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def errbar(ax, x, xs_list, label, **kw):
    """Mean with min-max whiskers; the seeds as dots."""
    pts = [(xi, xs) for xi, xs in zip(x, xs_list) if xs]
    if not pts:
        return
    xx = np.array([p[0] for p in pts], dtype=float)
    mu = np.array([np.mean(p[1]) for p in pts])
    lo = np.clip(mu - np.array([np.min(p[1]) for p in pts]), 0, None)
    hi = np.clip(np.array([np.max(p[1]) for p in pts]) - mu, 0, None)
    line = ax.errorbar(xx, mu, yerr=[lo, hi], marker="o", capsize=4, label=label, **kw)
    for xi, xs in pts:
        ax.scatter([xi] * len(xs), xs, s=10, alpha=0.4, color=line[0].get_color())


def run_bin_counts(m: dict, prefix: str, edges: np.ndarray):
    """One judge run's Detail 34 bins (per-run edges) re-pooled onto common edges by their centres: (wins, counts)."""
    wins, counts = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)
    i = 0
    while f"{prefix}len_bin{i}_n" in m:
        n, wr = m[f"{prefix}len_bin{i}_n"], m.get(f"{prefix}len_bin{i}_win_rate")
        if n and finite(wr):
            c = 0.5 * (m[f"{prefix}len_bin{i}_lo"] + m[f"{prefix}len_bin{i}_hi"])
            b = int(np.clip(np.searchsorted(edges, c, side="right") - 1, 0, len(edges) - 2))
            wins[b] += wr * n
            counts[b] += n
        i += 1
    return wins, counts


def pooled_length_bins(judge_runs: Dict[int, dict], prefix: str, edges: np.ndarray) -> List[List[float]]:
    """Per common bin, the seeds' win rates (count-weighted within a seed)."""
    per_bin: List[List[float]] = [[] for _ in range(len(edges) - 1)]
    for r in judge_runs.values():
        wins, counts = run_bin_counts(r["metrics"], prefix, edges)
        for b in range(len(edges) - 1):
            if counts[b] >= 3:  # a bin with one or two items is noise
                per_bin[b].append(wins[b] / counts[b])
    return per_bin


GOLD_LEN_EDGES = [0, 15, 25, 35, 45, 54]


def gold_by_length(by_seed: Dict[int, dict], edges: np.ndarray) -> List[List[float]]:
    """Per length bin (tokens), the seeds' mean gold score of the eval samples in that bin (bins with >= 3)."""
    per_bin: List[List[float]] = [[] for _ in range(len(edges) - 1)]
    for r in by_seed.values():
        pts = np.array(r.get("samples") or [], dtype=float).reshape(-1, 2)
        idx = np.clip(np.searchsorted(edges, pts[:, 0], side="right") - 1, 0, len(edges) - 2)
        for b in range(len(edges) - 1):
            sel = idx == b
            if sel.sum() >= 3:
                per_bin[b].append(float(pts[sel, 1].mean()))
    return per_bin


def length_range(runs) -> Optional[tuple]:
    lo, hi = math.inf, -math.inf
    for stage in ("judge_ppo", "judge_dpo"):
        for by_seed in runs.get(stage, {}).values():
            for r in by_seed.values():
                for k, v in r["metrics"].items():
                    if re.search(r"len_bin\d+_(lo|hi)$", k) and finite(v):
                        lo, hi = min(lo, v), max(hi, v)
    return (lo, hi) if lo < hi else None


def history_curves(ppo_runs: Dict[int, dict], key: str):
    """(updates, per-seed value arrays aligned on the updates every seed has)."""
    series = []
    for r in ppo_runs.values():
        pts = {h["update"]: h[key] for h in r.get("history", []) if "update" in h and finite(h.get(key))}
        if pts:
            series.append(pts)
    if not series:
        return None, None
    common = sorted(set.intersection(*[set(s) for s in series]))
    if not common:
        return None, None
    return np.array(common), np.array([[s[u] for u in common] for s in series])


def make_figures(runs, args: Args) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out_dir, exist_ok=True)
    sizes = sorted({s for st in runs.values() for s in st}, key=size_key)
    x = np.arange(len(sizes))
    written = []

    def save(fig, name):
        path = os.path.join(args.out_dir, f"{args.prefix}{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # 1. RM validation accuracy vs size, and by labeller confidence (Detail 18)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    errbar(axes[0], x, [values(runs, "rm", s, "val_accuracy") for s in sizes], "RM validation accuracy")
    errbar(axes[0], x, [values(runs, "rm", s, "gold_agreement") for s in sizes], "RM agreement with the gold judge")
    if any(values(runs, "rm", s, "val_fixed_accuracy") for s in sizes):  # benchmark/rm_cross_eval.py
        errbar(axes[0], x, [values(runs, "rm", s, "val_fixed_accuracy") for s in sizes],
               "RM accuracy, fixed pairs (the same for every size)")
        errbar(axes[0], x, [values(runs, "rm", s, "fixed_gold_agreement") for s in sizes],
               "RM agreement with gold, fixed pairs")
    errbar(axes[0], x, [values(runs, "dpo", s, "val_reward_accuracy") for s in sizes], "DPO implicit reward accuracy")
    axes[0].set_xticks(x, sizes)
    axes[0].set_xlabel("model size")
    axes[0].set_ylabel("accuracy")
    axes[0].axhline(0.5, color="gray", ls=":", lw=1)
    axes[0].legend(fontsize=8)
    axes[0].set_title("reward model accuracy vs size")
    confs = sorted({int(k.split("_")[-1]) for st in runs.get("rm", {}).values() for r in st.values()
                    for k in r["metrics"] if k.startswith("val_accuracy/confidence_")})
    for s in sizes:
        errbar(axes[1], confs, [values(runs, "rm", s, f"val_accuracy/confidence_{c}") for c in confs], f"size {s}")
    axes[1].axhline(0.5, color="gray", ls=":", lw=1)
    axes[1].set_xlabel("labeller confidence")
    axes[1].set_ylabel("RM validation accuracy")
    axes[1].set_title("RM accuracy by confidence")
    if confs:
        axes[1].legend(fontsize=8)
    fig.suptitle(args.title, fontsize=9)
    save(fig, "rm_accuracy")

    # 2. win rate against the references vs size (+ head-to-head vs SFT; + the gold score when recorded)
    has_gold = any(values(runs, st, s, "eval_gold_score") for st in ("sft", "ppo", "dpo") for s in sizes)
    fig, axes = plt.subplots(1, 2 if has_gold else 1, figsize=(11 if has_gold else 6, 4), squeeze=False)
    ax = axes[0][0]
    wr = {s: win_rates(runs, s) for s in sizes}
    for j, model in enumerate(("SFT", "PPO", "DPO", "PPO vs SFT", "DPO vs SFT")):
        kw = {"ls": ":"} if " vs " in model else {}
        label = f"{model} (head-to-head)" if " vs " in model else f"{model} vs reference"
        errbar(ax, x + (j - 2) * 0.05, [wr[s][model] for s in sizes], label, **kw)
    ax.axhline(0.5, color="gray", ls="--", lw=1, label="50%")
    ax.set_xticks(x, sizes)
    ax.set_xlabel("model size")
    ax.set_ylabel("judge win rate")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("judge win rate vs size", fontsize=9)
    if has_gold:
        ax = axes[0][1]
        for j, (st, model) in enumerate((("sft", "SFT"), ("ppo", "PPO"), ("dpo", "DPO"))):
            errbar(ax, x + (j - 1) * 0.05, [values(runs, st, s, "eval_gold_score") for s in sizes], model)
        ref = [v for s in sizes for v in values(runs, "sft", s, "eval_gold_reference_score")]
        if ref:
            ax.axhline(float(np.mean(ref)), color="gray", ls="--", lw=1, label="reference summaries")
        ax.set_xticks(x, sizes)
        ax.set_xlabel("model size")
        ax.set_ylabel("mean gold-judge score of eval samples")
        ax.legend(fontsize=7)
        ax.set_title("gold score vs size", fontsize=9)
    fig.suptitle(args.title, fontsize=9)
    save(fig, "win_rate_vs_size")

    def length_panels(centers, series, xlabel: str, ylabel: str, name: str, title: str, half_line: bool):
        """One panel per size; series(size) yields (label, per-bin values across seeds)."""
        fig, axes = plt.subplots(1, max(1, len(sizes)), figsize=(4 * max(1, len(sizes)), 3.6), sharey=True,
                                 squeeze=False)
        for ax, s in zip(axes[0], sizes):
            lines = series(s)
            for label, per_bin in lines:
                errbar(ax, centers, per_bin, label)
            if half_line:
                ax.axhline(0.5, color="gray", ls="--", lw=1)
            ax.set_title(f"size {s}")
            ax.set_xlabel(xlabel)
            if lines:
                ax.legend(fontsize=8)
        axes[0][0].set_ylabel(ylabel)
        fig.suptitle(f"{title} - {args.title}", fontsize=9)
        save(fig, name)

    # 3. win rate by summary length (Detail 34), SFT vs PPO per size
    rng = length_range(runs)
    edges = np.linspace(rng[0], rng[1], args.len_bins + 1) if rng else np.zeros(1)
    judged = (("judge_ppo", "compare_", "SFT"), ("judge_ppo", "", "PPO"), ("judge_dpo", "", "DPO"))
    length_panels(0.5 * (edges[1:] + edges[:-1]),
                  lambda s: [(label, pooled_length_bins(runs[st][s], prefix, edges)) for st, prefix, label in judged
                             if rng and runs.get(st, {}).get(s)],
                  "log(len(summary) / len(reference))", "win rate vs reference", "win_rate_by_length",
                  "win rate by summary length", half_line=True)

    # 3b. mean gold score by summary length (tokens), from the eval samples (embedded task)
    if any(r.get("samples") for st in ("sft", "ppo", "dpo") for by in runs.get(st, {}).values() for r in by.values()):
        edges = np.array(GOLD_LEN_EDGES, dtype=float)
        length_panels(0.5 * (edges[1:] + edges[:-1]),
                      lambda s: [(label, gold_by_length(runs[st][s], edges)) for st, label in
                                 (("sft", "SFT"), ("ppo", "PPO"), ("dpo", "DPO")) if runs.get(st, {}).get(s)],
                      "summary length (tokens)", "mean gold-judge score", "gold_score_by_length",
                      "gold score by summary length", half_line=False)

    # 4. PPO training curves (run folders; the seed files of benchmark/quickstart_seeds.py keep none)
    if any(r.get("history") for by in runs.get("ppo", {}).values() for r in by.values()):
        keys = [("objective/scores", "RM score (after EOS penalty)"), ("objective/kl", "KL(policy || SFT)"),
                ("objective/response_length", "response length (tokens)"),
                # held-out evaluations: the gold judge should follow the RM; a falling gold curve under a rising
                # RM curve is over-optimisation of the RM
                ("eval/rm_score", "held-out RM score"), ("eval/gold_score", "held-out gold-judge score")]
        fig, axes = plt.subplots(1, len(keys), figsize=(4.3 * len(keys), 3.6))
        for ax, (key, label) in zip(axes, keys):
            for s in sizes:
                u, arr = history_curves(runs.get("ppo", {}).get(s, {}), key)
                if u is None:
                    continue
                mu = arr.mean(0)
                (ln,) = ax.plot(u, mu, label=f"size {s} ({len(arr)} seeds)")
                ax.fill_between(u, arr.min(0), arr.max(0), alpha=0.2, color=ln.get_color())
            ax.set_xlabel("PPO update")
            ax.set_title(label)
            ax.legend(fontsize=7)
        fig.suptitle(f"PPO curves (mean, min-max over seeds) - {args.title}", fontsize=9)
        save(fig, "ppo_curves")
    return written


def rm_confidence(runs, size: str, levels) -> List[float]:
    """Per seed, the RM validation accuracy pooled over these labeller confidence levels (count-weighted)."""
    out = []
    for r in runs.get("rm", {}).get(size, {}).values():
        m = r["metrics"]
        pairs = [(m.get(f"val_accuracy/confidence_{c}"), m.get(f"val_count/confidence_{c}")) for c in levels]
        pairs = [(a, n) for a, n in pairs if finite(a) and finite(n) and n > 0]
        if pairs:
            out.append(sum(a * n for a, n in pairs) / sum(n for _, n in pairs))
    return out


TABLE_COLUMNS = [
    ("RM val accuracy", lambda r, s: values(r, "rm", s, "val_accuracy")),
    ("RM acc., confidence 1-4", lambda r, s: rm_confidence(r, s, range(1, 5))),
    ("RM acc., confidence 6-9", lambda r, s: rm_confidence(r, s, range(6, 10))),
    ("RM gold agreement", lambda r, s: values(r, "rm", s, "gold_agreement")),
    ("SFT win rate", lambda r, s: win_rates(r, s)["SFT"]),
    ("PPO win rate", lambda r, s: win_rates(r, s)["PPO"]),
    ("DPO win rate", lambda r, s: win_rates(r, s)["DPO"]),
    ("DPO reward accuracy", lambda r, s: values(r, "dpo", s, "val_reward_accuracy")),
    ("PPO vs SFT head-to-head", lambda r, s: win_rates(r, s)["PPO vs SFT"]),
    ("DPO vs SFT head-to-head", lambda r, s: win_rates(r, s)["DPO vs SFT"]),
    ("SFT gold score", lambda r, s: values(r, "sft", s, "eval_gold_score")),
    ("PPO gold score", lambda r, s: values(r, "ppo", s, "eval_gold_score")),
    ("DPO gold score", lambda r, s: values(r, "dpo", s, "eval_gold_score")),
    ("reference gold score", lambda r, s: values(r, "sft", s, "eval_gold_reference_score")),
    ("PPO final KL", lambda r, s: values(r, "ppo", s, "final_kl")),
    ("SFT / PPO length (tokens)", None),
]


def table_markdown(runs) -> str:
    sizes = sorted({s for st in runs.values() for s in st}, key=size_key)
    cols = [c for c in TABLE_COLUMNS if c[1] is None or any(c[1](runs, s) for s in sizes)]
    lines = ["| size | seeds (sft/rm/ppo/judge) | " + " | ".join(c[0] for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for s in sizes:
        n = "/".join(str(len(runs.get(st, {}).get(s, {}))) for st in ("sft", "rm", "ppo", "judge_ppo"))
        cells = []
        for name, fn in cols:
            if fn is None:
                jp = runs.get("judge_ppo", {}).get(s, {})
                ls = [r["metrics"].get("compare_mean_candidate_token_len") for r in jp.values()]
                lp = [r["metrics"].get("mean_candidate_token_len") for r in jp.values()]
                ls, lp = [v for v in ls if finite(v)], [v for v in lp if finite(v)]
                cells.append(f"{np.mean(ls):.1f} / {np.mean(lp):.1f}" if ls and lp else "-")
            else:
                cells.append(mean_std(fn(runs, s)))
        lines.append(f"| {s} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_table_markdown(runs) -> str:
    """One row per size and seed: the gold win rates, PPO's paired gain over SFT with its 95% CI, the RM on its own
    and on the fixed pairs, its gold near-miss probe and PPO's final KL, each read from that seed's metrics.json."""
    def get(stage, s, seed, key, fmt="{:.3f}"):
        v = runs.get(stage, {}).get(s, {}).get(seed, {}).get("metrics", {}).get(key)
        return fmt.format(v) if finite(v) else "-"

    lines = ["| size | seed | SFT | PPO | PPO - SFT (paired 95% CI) | DPO | RM own pairs / fixed pairs | RM near misses "
             "| final KL |", "|---|---|---|---|---|---|---|---|---|"]
    sizes = sorted({s for st in runs.values() for s in st}, key=size_key)
    for s in sizes:
        for seed in sorted(runs.get("judge_ppo", {}).get(s, {})):
            m = runs["judge_ppo"][s][seed]["metrics"]
            gain = (f"{m['diff_win_rate']:+.3f} ({m['diff_win_rate_ci_low']:+.3f}..{m['diff_win_rate_ci_high']:+.3f})"
                    if all(finite(m.get(k)) for k in ("diff_win_rate", "diff_win_rate_ci_low", "diff_win_rate_ci_high"))
                    else "-")
            lines.append(f"| {s} | {seed} | {get('judge_ppo', s, seed, 'compare_win_rate')} | "
                         f"{get('judge_ppo', s, seed, 'win_rate')} | {gain} | {get('judge_dpo', s, seed, 'win_rate')} | "
                         f"{get('rm', s, seed, 'val_accuracy')} / {get('rm', s, seed, 'val_fixed_accuracy')} | "
                         f"{get('rm', s, seed, 'gold_near_miss_accuracy', '{:.2f}')} | "
                         f"{get('ppo', s, seed, 'final_kl', '{:.2f}')} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def pooled_bin_rates(runs, stage: str, prefix: str, edges: np.ndarray):
    """Per common bin, (wins, count) summed over every size and seed of `stage`'s judge runs."""
    wins, counts = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)
    for by_seed in runs.get(stage, {}).values():
        for r in by_seed.values():
            w, n = run_bin_counts(r["metrics"], prefix, edges)
            wins, counts = wins + w, counts + n
    return wins, counts


def bin_differences(pw, pn, sw, sn):
    """Per length bin, PPO's win rate minus SFT's, its 95% CI and the two counts. The bins hold different items for the
    two policies (each policy's summaries fall in the bin of their own length), so the interval is the unpaired
    Agresti-Caffo one (one win and one loss added to each side), which stays honest in the thin bins at the ends."""
    diffs, cis, ns = [], [], []
    for b in range(len(pn)):
        ns.append([int(round(pn[b])), int(round(sn[b]))])
        if not (pn[b] and sn[b]):
            diffs.append(None)
            cis.append(None)
            continue
        diffs.append(float(pw[b] / pn[b] - sw[b] / sn[b]))
        p1, p2 = (pw[b] + 1) / (pn[b] + 2), (sw[b] + 1) / (sn[b] + 2)
        half = 1.96 * math.sqrt(p1 * (1 - p1) / (pn[b] + 2) + p2 * (1 - p2) / (sn[b] + 2))
        cis.append([float(p1 - p2 - half), float(p1 - p2 + half)])
    return diffs, cis, ns


def sweep_summary(runs, sweep_dir: str, num_bins: int = 10, timing: Optional[dict] = None) -> dict:
    """The sweep's headline numbers, per size (mean and std over seeds) and pooled over sizes and seeds."""
    sizes = sorted({s for st in runs.values() for s in st}, key=size_key)

    def stat(xs):
        return (float(np.mean(xs)), float(np.std(xs))) if xs else (None, None)

    out = {"sizes": {}}
    for s in sizes:
        wr = win_rates(runs, s)
        entry = {}
        for key, xs in (("rm_val_accuracy", values(runs, "rm", s, "val_accuracy")),
                        ("rm_fixed_val_accuracy", values(runs, "rm", s, "val_fixed_accuracy")),
                        ("rm_fixed_gold_agreement", values(runs, "rm", s, "fixed_gold_agreement")),
                        # the RM's agreement with the gold judge on its own validation pairs (the raters' labels' truth)
                        ("rm_gold_agreement", values(runs, "rm", s, "gold_agreement")),
                        # the raters' agreement with the gold judge on those pairs: the ceiling of rm_val_accuracy,
                        # lower where the SFT model's samples are closer in quality
                        ("rm_val_label_agreement", values(runs, "feedback", s, "label_agreement")),
                        ("sft_win_rate", wr["SFT"]),
                        ("ppo_win_rate", wr["PPO"]), ("dpo_win_rate", wr["DPO"]),
                        ("final_kl", values(runs, "ppo", s, "final_kl")),
                        ("sft_gold_score", values(runs, "sft", s, "eval_gold_score")),
                        ("ppo_gold_score", values(runs, "ppo", s, "eval_gold_score"))):
            entry[f"{key}_mean"], entry[f"{key}_std"] = stat(xs)
        jp = runs.get("judge_ppo", {}).get(s, {})
        # one paired-CI lower bound (PPO minus SFT win rate against the references) per seed, in seed order
        # and each seed's paired difference itself, so that a per-seed gain quoted anywhere comes from this file
        entry["ppo_minus_sft_per_seed"] = {str(k): jp[k]["metrics"]["diff_win_rate"] for k in sorted(jp)
                                           if finite(jp[k]["metrics"].get("diff_win_rate"))}
        entry["ppo_vs_sft_ci_low"] = [jp[k]["metrics"]["diff_win_rate_ci_low"] for k in sorted(jp)
                                      if finite(jp[k]["metrics"].get("diff_win_rate_ci_low"))]
        entry["seeds"] = {st: sorted(runs.get(st, {}).get(s, {})) for st in ("sft", "rm", "ppo", "dpo", "judge_ppo")}
        entry["seeds"]["rm_fixed"] = sorted(k for k, r in runs.get("rm", {}).get(s, {}).items()
                                           if finite(r["metrics"].get("val_fixed_accuracy")))
        entry["seeds"]["rm_gold"] = sorted(k for k, r in runs.get("rm", {}).get(s, {}).items()
                                          if finite(r["metrics"].get("gold_agreement")))
        out["sizes"][s] = entry
    # Detail 34 length bins, pooled over sizes and seeds: PPO's win rate minus SFT's in each bin
    rng = length_range(runs)
    bins = []
    if rng:
        edges = np.linspace(rng[0], rng[1], num_bins + 1)
        pw, pn = pooled_bin_rates(runs, "judge_ppo", "", edges)
        sw, sn = pooled_bin_rates(runs, "judge_ppo", "compare_", edges)
        bins, out["ppo_minus_sft_by_length_bin_ci95"], out["ppo_minus_sft_by_length_bin_n"] = bin_differences(pw, pn, sw, sn)
        out["length_bin_edges"] = [float(e) for e in edges]
        # the same bins per size, pooled over that size's seeds (Detail 34 as the paper draws it: one curve a size)
        for s, entry in out["sizes"].items():
            one = {"judge_ppo": {s: runs.get("judge_ppo", {}).get(s, {})}}
            d, ci, n = bin_differences(*pooled_bin_rates(one, "judge_ppo", "", edges),
                                       *pooled_bin_rates(one, "judge_ppo", "compare_", edges))
            entry["ppo_minus_sft_by_length_bin"], entry["ppo_minus_sft_by_length_bin_ci95"] = d, ci
            entry["ppo_minus_sft_by_length_bin_n"] = n
    out["ppo_minus_sft_by_length_bin"] = bins
    out["seeds"] = sorted({k for st in runs.values() for by in st.values() for k in by})
    timing = timing if timing is not None else (read_json(os.path.join(sweep_dir, "sweep_timing.json")) or {})
    out["wall_seconds"] = timing.get("wall_seconds")
    out["machine"] = timing.get("machine")
    for key in ("source", "runs"):
        if key in timing:
            out[key] = timing[key]
    return out


# the numbers a rerun of a seed must reproduce (same seed, same presets: the same result on any machine measured so far)
RERUN_KEYS = ("sft_gold_win_rate", "ppo_gold_win_rate", "rm_val_accuracy", "ppo_minus_sft_ci")


def merge_rerun(runs, size: str, seed: int, r: dict, path: str) -> None:
    """A seed file's rerun of a seed read already: its headline numbers must be the same (else an error naming both);
    what the first file lacks (DPO, the RM's fixed-pair accuracy and gold agreement) is taken from the rerun. Its time
    and length bins are not counted again."""
    judge = runs["judge_ppo"][size][seed]["metrics"]
    first = {"sft_gold_win_rate": judge["compare_win_rate"], "ppo_gold_win_rate": judge["win_rate"],
             "rm_val_accuracy": runs["rm"][size][seed]["metrics"]["val_accuracy"],
             "ppo_minus_sft_ci": judge["diff_win_rate_ci_low"]}
    again = dict(r, ppo_minus_sft_ci=(r.get("ppo_minus_sft_ci") or [None])[0])
    differ = [k for k in RERUN_KEYS if first[k] is not None and again.get(k) is not None
              and abs(float(first[k]) - float(again[k])) > 1e-9]
    if differ:
        raise ValueError(f"--seed_files: size {size} seed {seed} appears twice with different results ({differ}; {path!r})")
    rm = runs["rm"][size][seed]["metrics"]
    for key, name in (("val_fixed_accuracy", "rm_fixed_val_accuracy"), ("gold_agreement", "rm_gold_agreement")):
        if rm.get(key) is None and r.get(name) is not None:
            rm[key] = r[name]
    if seed not in runs["dpo"].get(size, {}) and r.get("dpo_gold_win_rate") is not None:
        runs["dpo"][size][seed] = {"metrics": {"gold_win_rate": r["dpo_gold_win_rate"]}}
    if seed not in runs["feedback"].get(size, {}) and r.get("rm_val_label_agreement") is not None:
        runs["feedback"][size][seed] = {"metrics": {"label_agreement": r["rm_val_label_agreement"]}}


def collect_seed_files(files: List[str]):
    """The same runs[stage][size][seed] from benchmark/quickstart_seeds.py outputs (one size a file; the seeds of a
    size may be split over files) and their timing. The files keep each seed's headline numbers, not its training
    curves; each file's length bins (Detail 34, already pooled over its seeds) go with the judge entry of its first
    seed, so that they pool by count with the other files'."""
    runs: Dict[str, Dict[str, Dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    wall, machines = 0.0, []
    for f in files:
        d = read_json(f)
        if d is None or "size" not in d or not isinstance(d.get("per_seed"), dict):
            raise ValueError(f"--seed_files: {f!r} is not a JSON file written by benchmark/quickstart_seeds.py")
        size = str(d["size"])
        known = [int(k) for k in d["per_seed"] if int(k) in runs["judge_ppo"].get(size, {})]
        if known:  # a rerun of seeds read already (another machine, or with DPO added): it must reproduce them
            if len(known) < len(d["per_seed"]):
                raise ValueError(f"--seed_files: {f!r} mixes seeds of size {size} read already ({known}) with new ones")
            for seed in known:
                merge_rerun(runs, size, seed, d["per_seed"][str(seed)], f)
            continue
        for j, (seed, r) in enumerate(sorted(d["per_seed"].items(), key=lambda kv: int(kv[0]))):
            seed = int(seed)
            runs["rm"][size][seed] = {"metrics": {"val_accuracy": r.get("rm_val_accuracy"),
                                                  "val_fixed_accuracy": r.get("rm_fixed_val_accuracy"),
                                                  "gold_agreement": r.get("rm_gold_agreement")}}
            runs["sft"][size][seed] = {"metrics": {"gold_win_rate": r.get("sft_gold_win_rate"),
                                                   "eval_gold_score": r.get("sft_gold_score")}}
            runs["ppo"][size][seed] = {"metrics": {"gold_win_rate": r.get("ppo_gold_win_rate"), "final_kl": r.get("ppo_final_kl"),
                                                   "eval_gold_score": r.get("ppo_gold_score")}, "history": []}
            if r.get("dpo_gold_win_rate") is not None:
                runs["dpo"][size][seed] = {"metrics": {"gold_win_rate": r["dpo_gold_win_rate"]}}
            if r.get("rm_val_label_agreement") is not None:
                runs["feedback"][size][seed] = {"metrics": {"label_agreement": r["rm_val_label_agreement"]}}
            judge = {"win_rate": r.get("ppo_gold_win_rate"), "compare_win_rate": r.get("sft_gold_win_rate"),
                     "diff_win_rate": r.get("judge_diff_win_rate"),
                     "diff_win_rate_ci_low": (r.get("ppo_minus_sft_ci") or [None])[0]}
            b = d.get("by_length_bin") or {}
            for i, (lo, hi) in enumerate(zip(b.get("edges", [])[:-1], b.get("edges", [])[1:])) if j == 0 else ():
                for prefix, name in (("", "ppo"), ("compare_", "sft")):
                    judge.update({f"{prefix}len_bin{i}_lo": lo, f"{prefix}len_bin{i}_hi": hi,
                                  f"{prefix}len_bin{i}_n": b[f"{name}_n"][i], f"{prefix}len_bin{i}_win_rate": b[name][i]})
            runs["judge_ppo"][size][seed] = {"metrics": judge}
            wall += float(r.get("wall_seconds") or 0.0)
        if d.get("machine") and d["machine"] not in machines:
            machines.append(d["machine"])
    return runs, {"wall_seconds": round(wall, 1), "machine": "; ".join(machines) or None,
                  "source": "benchmark/quickstart_seeds.py files (quickstart.py runs, each with its own task build)",
                  "runs": list(files)}


def add_rm_cross_eval(runs, path: str) -> None:
    """Each run's RM accuracy and gold agreement on the task's fixed validation pairs (benchmark/rm_cross_eval.py)
    into runs["rm"][size][seed]["metrics"] as val_fixed_accuracy / fixed_gold_agreement."""
    d = read_json(path)
    if not isinstance(d, dict) or not isinstance(d.get("runs"), list):
        raise ValueError(f"--rm_cross_eval: {path!r} is not a JSON file written by benchmark/rm_cross_eval.py")
    for r in d["runs"]:
        entry = runs["rm"][str(r["size"])].setdefault(int(r["seed"]), {"metrics": {}})
        entry["metrics"]["val_fixed_accuracy"] = r["task"]["accuracy"]
        entry["metrics"]["fixed_gold_agreement"] = r["task"]["gold_agreement"]


def main(args: Args) -> None:
    timing, num_bins = None, 10
    if args.seed_files:  # their length bins are already pooled into 5 per file
        runs, timing = collect_seed_files([f for f in args.seed_files.split(",") if f.strip()])
        num_bins = 5
    elif args.quickstart_runs:
        runs, timing = collect_quickstart([d for d in args.quickstart_runs.split(",") if d.strip()])
    else:
        runs = collect(args.sweep_dir)
    if args.rm_cross_eval:
        add_rm_cross_eval(runs, args.rm_cross_eval)
    written = make_figures(runs, args)
    table = table_markdown(runs)
    print(table)
    for p in written:
        print("wrote", p)
    if args.table:
        write_table(args.table, table, args, seed_table_markdown(runs))
        print("wrote", args.table)
    if args.json_out:
        os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
        summary = sweep_summary(runs, args.sweep_dir, num_bins=num_bins, timing=timing)
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=1)
        print("wrote", args.json_out)
        if args.readme:
            write_readme_block(args.readme, summary, args.json_out)
            print("wrote", args.readme)


START, END = "<!-- table:start (benchmark/report.py) -->", "<!-- table:end -->"


def write_table(path: str, table: str, args: Args, seeds: str = "") -> None:
    """Write the table between the markers of `path`, keeping the hand-written text around them."""
    settings = read_json(os.path.join(args.sweep_dir, "sweep_args.json"))
    block = f"{START}\n{table}\n\nMean ± std over seeds ({args.title}).\n"
    if seeds:
        block += f"\nPer seed (each run's metrics.json):\n\n{seeds}\n\n"
    source = args.seed_files or args.quickstart_runs
    if source:
        block += f"From quickstart.py runs (each seed with its own task data and base model): `{source}`\n"
    if settings:
        skip = {"sizes", "seeds", "stages", "out_dir", "dry_run", "jobs", "claim", "order", "slurm", "slurm_time", "slurm_partition",
                "slurm_extra", "dataset_dir", "task_dir"}
        if settings.get("mode") == "embedded":
            skip |= {"accelerate_config", "num_processes", "judge_max_samples"}
        kept = {k: v for k, v in settings.items() if v not in ("", None) and k not in skip}
        block += "Sweep settings (benchmark/sweep.py flags): `" + json.dumps(kept) + "`\n"
    block += END
    old = open(path).read() if os.path.exists(path) else f"# Sweep results: {args.title}\n\n{START}\n{END}\n"
    if START in old and END in old:
        new = old[: old.index(START)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(new)

README_START, README_END = "<!-- embedded-sweep:start (benchmark/report.py) -->", "<!-- embedded-sweep:end -->"


def write_readme_block(path: str, summary: dict, json_path: str) -> None:
    """The JSON's per-size means ± stds and per-seed CI lower bounds as a markdown table between the markers."""
    text = open(path).read()
    if README_START not in text or README_END not in text:
        raise ValueError(f"--readme: {path} lacks the markers {README_START!r} ... {README_END!r}")
    def cell(e, key, seeds="ppo"):
        mu, sd, got = e.get(f"{key}_mean"), e.get(f"{key}_std"), e["seeds"].get(seeds, [])
        if mu is None:
            return "-"
        text = f"{mu:.3f} ± {sd:.3f}" if len(got) > 1 else f"{mu:.3f}"
        # a metric that only some seeds have says which
        return text if got == e["seeds"]["ppo"] else f"{text} [seed{'s' if len(got) > 1 else ''} {','.join(map(str, got))}]"

    fixed = any(e.get("rm_fixed_val_accuracy_mean") is not None for e in summary["sizes"].values())
    gold = any(e.get("rm_gold_agreement_mean") is not None for e in summary["sizes"].values())
    lines = ["| size | seeds | RM val accuracy" + (" (fixed pairs)" if fixed else "") + (" | RM gold agreement" if gold else "")
             + " | SFT win rate | PPO win rate | DPO win rate | PPO - SFT, paired CI low per seed | final KL |",
             "|---|---|---|" + ("---|" if gold else "") + "---|---|---|---|---|"]
    for size, e in summary["sizes"].items():
        lows = ", ".join(f"{x:+.3f}" for x in e["ppo_vs_sft_ci_low"]) or "-"
        seeds = ",".join(map(str, e["seeds"]["ppo"]))
        rm = cell(e, "rm_val_accuracy") + (f" ({cell(e, 'rm_fixed_val_accuracy', 'rm_fixed')})" if fixed else "")
        rm += f" | {cell(e, 'rm_gold_agreement', 'rm_gold')}" if gold else ""
        lines.append(f"| {size} | {seeds} | {rm} | {cell(e, 'sft_win_rate')} | {cell(e, 'ppo_win_rate')} | "
                     f"{cell(e, 'dpo_win_rate', 'dpo')} | {lows} | {cell(e, 'final_kl')} |")
    diffs, cis = summary.get("ppo_minus_sft_by_length_bin", []), summary.get("ppo_minus_sft_by_length_bin_ci95") or []
    ns = summary.get("ppo_minus_sft_by_length_bin_n") or []
    bins = ", ".join("-" if b is None else f"{b:+.2f}" for b in diffs)
    # a bin where PPO is below SFT is shown with its items (PPO / SFT summaries) and its unpaired 95% CI
    below = [f"bin {i + 1}: {b:+.2f}, n {ns[i][0]} / {ns[i][1]}, CI {cis[i][0]:+.2f}..{cis[i][1]:+.2f}"
             for i, b in enumerate(diffs) if b is not None and b < 0 and i < len(cis) and cis[i] and i < len(ns)]
    lines.append(f"\nMean ± std over seeds from `{json_path}` ({summary.get('machine')}); PPO minus SFT win rate per "
                 f"length bin (Detail 34, shortest first, pooled): {bins}"
                 + (f" (below 0: {'; '.join(below)})." if below else "."))
    new = text[: text.index(README_START) + len(README_START)] + "\n" + "\n".join(lines) + "\n" + text[text.index(README_END):]
    with open(path, "w") as f:
        f.write(new)


if __name__ == "__main__":
    main(tyro.cli(Args))
