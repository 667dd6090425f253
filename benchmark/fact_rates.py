"""What each policy of an embedded sweep gets right and wrong, fact by fact, by size (the gold judge's view).

The gold win rate says how often a policy beats the reference; this says why. For every size of a
`benchmark/sweep.py --mode embedded` folder it reads the evaluation samples of SFT, PPO and DPO (the same
validation posts for every stage, size and seed), asks the task's gold judge which of the post's salient facts each
summary states rightly, wrongly or not at all, and pools the shares over seeds; the references of those posts are
scored the same way. It also reports the mean gold score, the mean number of contradicting or invented values and
the mean summary length in words:

    python benchmark/fact_rates.py --sweep_dir runs/sweep_embedded --json_out docs/embedded_fact_rates.json

A small policy that copies the narrator's age or the duration wrongly pays for it on every such summary, and a
reward model of the same size that does not check those values cannot teach PPO to fix them: the table shows which
facts RLHF improved at each size and which it left where SFT had them.
"""
import glob
import json
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import embedded_task as et  # noqa: E402

STAGES = ("sft", "ppo", "dpo")
DETAIL_KEYS = ("score", "wrong", "words")


@dataclass
class Args:
    sweep_dir: str = "runs/sweep_embedded"
    """a benchmark/sweep.py --mode embedded output folder ({stage}_{size}_{seed}/eval_samples.jsonl, task/)"""
    task_dir: Optional[str] = None
    """the embedded task (default: sweep_dir/task)"""
    json_out: Optional[str] = "docs/embedded_fact_rates.json"
    """where the numbers go (None: printed only)"""
    table: Optional[str] = "docs/embedded_fact_rates.md"
    """markdown table (None: printed only)"""


def sample_files(sweep_dir: str) -> Dict[str, Dict[str, Dict[int, str]]]:
    """{size: {stage: {seed: eval_samples.jsonl}}} of the folder's stage runs."""
    found: Dict[str, Dict[str, Dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
    for path in sorted(glob.glob(os.path.join(sweep_dir, "*_*_*", "eval_samples.jsonl"))):
        m = re.fullmatch(r"(sft|ppo|dpo)_([a-z0-9]+)_(\d+)", os.path.basename(os.path.dirname(path)))
        if m:
            found[m.group(2)][m.group(1)][int(m.group(3))] = path
    return found


def read_rows(path: str) -> List[dict]:
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    for i, r in enumerate(rows):
        for key in ("query", "response", "reference"):
            if not isinstance(r.get(key), str):
                raise ValueError(f"{path}: row {i} has no text field {key!r}")
    return rows


def rates(judge: et.GoldJudge, pairs) -> dict:
    """Shares of right / wrong per salient fact and the means of DETAIL_KEYS over (query, summary) pairs."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("fact_rates: no summaries to score")
    counts: Dict[str, float] = defaultdict(float)
    for q, summary in pairs:
        rec = judge.record(q)
        for fact, outcome in et.fact_outcomes(rec, summary).items():
            counts[f"{fact}_{outcome}"] += 1
        score, d = et.score_against_record(rec, summary, judge.weights, details=True)
        d["score"] = score
        for key in DETAIL_KEYS:
            counts[key] += float(d[key])
    n = len(pairs)
    out = {f"{fact}_{o}": counts[f"{fact}_{o}"] / n for fact in et.SALIENT for o in ("right", "wrong")}
    out.update({f"mean_{key}": counts[key] / n for key in DETAIL_KEYS})
    out["n"] = n
    return out


def fact_rates(sweep_dir: str, task_dir: Optional[str] = None) -> dict:
    files = sample_files(sweep_dir)
    if not files:
        raise FileNotFoundError(f"{sweep_dir}: no {{sft,ppo,dpo}}_{{size}}_{{seed}}/eval_samples.jsonl")
    judge = et.GoldJudge.from_dir(task_dir or os.path.join(sweep_dir, "task"))
    order = {s: i for i, s in enumerate(et.MODEL_SIZES)}
    out: dict = {"sizes": {}, "facts": list(et.SALIENT)}
    refs = {}
    for size in sorted(files, key=lambda s: order.get(s, len(order))):
        entry = {}
        for stage in STAGES:
            by_seed = files[size].get(stage, {})
            if not by_seed:
                continue
            rows = [r for seed in sorted(by_seed) for r in read_rows(by_seed[seed])]
            entry[stage] = rates(judge, ((r["query"], r["response"]) for r in rows))
            entry[stage]["seeds"] = sorted(by_seed)
            refs.update({r["query"]: r["reference"] for r in rows})
        out["sizes"][size] = entry
    # the references of every post evaluated above (the same validation posts for every run)
    out["reference"] = rates(judge, refs.items())
    return out


def markdown(summary: dict) -> str:
    facts = summary["facts"]
    lines = ["| size | policy | " + " | ".join(f"{f} right / wrong" for f in facts)
             + " | wrong values | words | gold score |",
             "|---|---|" + "---|" * (len(facts) + 3)]

    def row(size, name, r):
        cells = " | ".join(f"{r[f'{f}_right']:.2f} / {r[f'{f}_wrong']:.2f}" for f in facts)
        return f"| {size} | {name} | {cells} | {r['mean_wrong']:.2f} | {r['mean_words']:.1f} | {r['mean_score']:.2f} |"
    for size, entry in summary["sizes"].items():
        for stage in STAGES:
            if stage in entry:
                lines.append(row(size, f"{stage.upper()} (seeds {','.join(map(str, entry[stage]['seeds']))})", entry[stage]))
    lines.append(row("-", "reference", summary["reference"]))
    return "\n".join(lines)


def main(args: Args) -> None:
    summary = fact_rates(args.sweep_dir, args.task_dir)
    table = markdown(summary)
    print(table)
    if args.json_out:
        os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=1)
        print(f"wrote {args.json_out}")
    if args.table:
        os.makedirs(os.path.dirname(args.table) or ".", exist_ok=True)
        with open(args.table, "w") as f:
            f.write(f"# Facts right and wrong by size and policy (`{args.sweep_dir}`)\n\n"
                    "Written by `benchmark/fact_rates.py`: the share of evaluation summaries that state each salient fact "
                    "of the post rightly / wrongly (the rest leave it out), pooled over seeds, by the task's gold judge; "
                    "wrong values is the mean number of contradicting or invented values a summary, words its mean "
                    "length.\n\n" + table + "\n")
        print(f"wrote {args.table}")


if __name__ == "__main__":
    main(tyro.cli(Args))
