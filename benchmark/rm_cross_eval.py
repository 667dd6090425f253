"""Reward models of several sizes scored on the SAME validation pairs (embedded task, quickstart.py run folders).

`reward.py`'s validation accuracy is measured on the validation pairs of its own feedback round: comparisons of
samples of the SFT policy of its own size. A larger SFT policy writes samples closer in quality, whose rater
labels are noisier, so the accuracies of different sizes are not measured on the same test. The paper measures
every size on one human validation set. Here that set is the task's generated comparisons between ten named
policies (`dataset/preference/validation` of a run), the same pairs for every size of one seed. For every run
this script scores its RM on that set, on its own feedback round and on the feedback rounds of the other runs of
the same seed, and reports accuracy against the rater labels, agreement with the noiseless gold judge (ties left
out) and how often the labels themselves agree with the gold judge (the ceiling of the accuracy):

    python benchmark/rm_cross_eval.py --runs runs/qs_s/seed1,runs/qs_m/seed1,runs/qs_l/seed1 --json_out docs/rm_cross_eval.json

`by_size` in the JSON has the means and stds over seeds that `benchmark/report.py --rm_cross_eval` adds to
`docs/embedded_sweep.json` and to its RM accuracy figure.
"""
import json
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import embedded_task as et  # noqa: E402
from reward import ScalarModel, forward_pair, load_tokenizer  # noqa: E402


@dataclass
class Args:
    runs: str
    """comma-separated quickstart.py output folders (each with summary.json, task/, dataset/, dataset_feedback/, rm/)"""
    max_pairs: Optional[int] = None
    """score only the first this many pairs of each split (None: all)"""
    batch_size: int = 64
    num_threads: int = 2
    json_out: Optional[str] = None
    """write the results here as JSON (None: print only)"""


def read_run(path: str) -> dict:
    """size, seed and the folders of one quickstart.py run; a clear error for what is missing."""
    summary_path = os.path.join(path, "summary.json")
    if not os.path.isfile(summary_path):
        raise FileNotFoundError(f"--runs: {summary_path} not found (a quickstart.py output folder is expected)")
    summary = json.load(open(summary_path))
    if "size" not in summary or "seed" not in summary:
        raise ValueError(f"--runs: {summary_path} has no size and seed")
    run = {"dir": path, "size": str(summary["size"]), "seed": int(summary["seed"])}
    for key, sub in (("task", "task"), ("rm", "rm"), ("task_val", "dataset/preference/validation"),
                     ("feedback_val", "dataset_feedback/preference/validation")):
        run[key] = os.path.join(path, sub)
        if not os.path.isdir(run[key]):
            raise FileNotFoundError(f"--runs: {run[key]} not found (run the stages up to rm there)")
    return run


@torch.no_grad()
def rm_margins(model, ds, pad_id: int, batch_size: int) -> np.ndarray:
    """r(chosen) - r(rejected) of every row, in row order."""
    out = []
    for i in range(0, len(ds), batch_size):
        rows = ds[i:i + batch_size]
        c, r = forward_pair(model, torch.tensor(rows["query_chosen_token"]), torch.tensor(rows["query_rejected_token"]), pad_id)
        out.append((c - r).double().numpy())
    return np.concatenate(out)


def pair_metrics(margin: np.ndarray, gold: np.ndarray) -> Dict[str, float]:
    """Accuracy against the labels (row order: chosen first), agreement with gold and the labels' own agreement."""
    decided = gold != 0.5
    gold_chosen = gold > 0.5
    return {"accuracy": float((margin > 0).mean()),
            "gold_agreement": float(((margin > 0) == gold_chosen)[decided].mean()) if decided.any() else float("nan"),
            "label_gold_agreement": float(gold_chosen[decided].mean()) if decided.any() else float("nan"),
            "num_pairs": int(len(margin)), "gold_ties": int((~decided).sum())}


def mean_std(xs: List[float]) -> Dict[str, Optional[float]]:
    return {"mean": float(np.mean(xs)) if xs else None, "std": float(np.std(xs)) if xs else None}


def main(args: Args) -> dict:
    import datasets

    torch.set_num_threads(args.num_threads)
    runs = [read_run(p) for p in filter(None, (s.strip() for s in args.runs.split(",")))]
    if not runs:
        raise ValueError("--runs: nothing given")
    if len({(r["size"], r["seed"]) for r in runs}) < len(runs):
        raise ValueError("--runs: a size and seed appears twice")

    def load(path):
        ds = datasets.load_from_disk(path)
        return ds.select(range(min(args.max_pairs, len(ds)))) if args.max_pairs is not None else ds

    vocabs = {r["dir"]: load_tokenizer(r["rm"]).get_vocab() for r in runs}
    cache = {}  # split path -> (pairs, gold verdicts): each split is loaded and judged once, not once per RM
    results = []
    for run in runs:
        same_seed = [r for r in runs if r["seed"] == run["seed"]]
        splits = {"task": run["task_val"], **{f"feedback_{r['size']}": r["feedback_val"] for r in same_seed}}
        judge = et.GoldJudge.from_dir(run["task"])
        tokenizer = load_tokenizer(run["rm"])
        for r in same_seed:  # the same task seed: the same tokenizer, or the token ids mean other things
            if vocabs[r["dir"]] != vocabs[run["dir"]]:
                raise ValueError(f"--runs: {r['dir']} and {run['dir']} have seed {run['seed']} but different tokenizers")
        model = ScalarModel.from_pretrained(run["rm"]).eval()
        out = {"dir": run["dir"], "size": run["size"], "seed": run["seed"]}
        for name, path in splits.items():
            if path not in cache:  # a split belongs to one seed, whose task (and judge) every run of it shares
                ds = load(path)
                cache[path] = (ds, np.array([judge.compare(q, a, b) for q, a, b in zip(ds["query"], ds["chosen"], ds["rejected"])]))
            ds, gold = cache[path]
            out[name] = pair_metrics(rm_margins(model, ds, tokenizer.pad_token_id, args.batch_size), gold)
        out["own_feedback"] = out[f"feedback_{run['size']}"]
        results.append(out)
        print(f"size {run['size']} seed {run['seed']}: " + ", ".join(
            f"{k} accuracy {v['accuracy']:.3f} / gold agreement {v['gold_agreement']:.3f} (labels {v['label_gold_agreement']:.3f})"
            for k, v in out.items() if isinstance(v, dict) and k != "own_feedback"))
    by_size = {}
    for size in sorted({r["size"] for r in results}, key=lambda s: "sml".find(s) if s in "sml" else 9):
        rs = [r for r in results if r["size"] == size]
        by_size[size] = {"seeds": [r["seed"] for r in rs]}
        for split in ("task", "own_feedback"):
            for key in ("accuracy", "gold_agreement", "label_gold_agreement"):
                ms = mean_std([r[split][key] for r in rs])
                by_size[size][f"{split}_{key}_mean"], by_size[size][f"{split}_{key}_std"] = ms["mean"], ms["std"]
    print("| size | seeds | accuracy, task's fixed pairs | gold agreement, fixed pairs | accuracy, own feedback | gold agreement, own feedback |")
    print("|---|---|---|---|---|---|")
    for size, e in by_size.items():
        cells = [f"{e[f'{s}_{k}_mean']:.3f} ± {e[f'{s}_{k}_std']:.3f}" for s in ("task", "own_feedback")
                 for k in ("accuracy", "gold_agreement")]
        print(f"| {size} | {','.join(map(str, e['seeds']))} | " + " | ".join(cells) + " |")
    out = {"runs": results, "by_size": by_size,
           "note": "task = the task's generated comparisons (validation), the same pairs for every size of one seed"}
    if args.json_out:
        os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json_out}")
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
