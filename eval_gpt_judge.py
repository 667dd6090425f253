"""LLM-judge evaluation of TL;DR summaries (Huang et al. 2024, Details 13, 33, 34).

Judges a model's summaries against the human reference summaries with any OpenAI-compatible
chat-completions endpoint (GPT-4 / GPT-3.5 class models, vLLM, a local server), or offline with the
embedded task's gold judge, and reports honest statistics:
  * win rate with a 95% Wilson score interval (ties count as "not a win", like GoldJudge.win_rate;
    `win_rate_ties_half` counts them as 1/2); unparsable verdicts are retried a bounded number of times,
    then counted as `n_unparsed` and left out of the denominator, never turned into a win or a loss;
  * Detail 33 as released: the released prompt template byte for byte; `--released_request` sends no temperature and
    no max_tokens; `--accounting released` counts verdicts as the released code did (the strict parser above stays
    the default); both win rates (`strict_win_rate`, `released_win_rate`) and their difference are always reported;
  * win rate by length bins (Detail 34), position-bias statistics, and a paired comparison with a second
    samples file (`--compare_samples`, e.g. PPO vs SFT; paired normal CI on the per-item differences);
  * `{output_dir}/metrics.json` (flat), `{output_dir}/judgements.csv` (every judgement), a rich table,
    optionally `{output_dir}/judge_plot.png`.
Robustness and cost: async requests under a concurrency limit; retries with exponential backoff and jitter
on 429 / 5xx / timeouts / connection errors (Retry-After respected); a persistent append-only cache keyed
by (judge model, full prompt, order), so an interrupted run resumes without paying twice and a re-run is
free; `--max_requests` / `--max_cost_usd` guards that stop cleanly and report the missing items.

Usage:
  OPENAI_API_KEY=... python eval_gpt_judge.py --samples models/ppo_pythia-1b-deduped/eval_samples.jsonl \
      --compare_samples models/sft_pythia-1b-deduped/eval_samples.jsonl --judge_model gpt-4-0125-preview --output_dir runs/judge
  python eval_gpt_judge.py --judge gold --gold_task_dir runs/quickstart/task --samples ... --output_dir ...
  python eval_gpt_judge.py --model_path models/ppo_pythia-1b-deduped --dataset_path data/tldr --split test ...   # generate first
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import email.utils
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import tyro
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()


@dataclass
class Args:
    preset: str = "paper"
    """preset of defaults: `paper` (OpenAI judge) or `embedded` (offline gold judge)"""
    exp_name: str = "eval_gpt_judge"
    seed: int = 44413
    """seed of the per-item A/B order (and of generation with --model_path); the first of the paper's seeds"""
    output_dir: Optional[str] = None
    """None: `judge/` next to the judged samples (models/ppo_{base model name}/judge by default)"""
    track: bool = False
    """log the metrics to wandb"""
    wandb_project_name: str = "tldr_rlhf"
    wandb_entity: Optional[str] = None

    # ---- inputs ----
    base_model: str = "EleutherAI/pythia-1b-deduped"
    """names the default input: without --samples and --model_path, ppo.py's models/ppo_{base model name}"""
    samples: Optional[str] = None
    """eval_samples.jsonl of the candidate model (id, query, response, reference, *_token_len); None (and no
    --model_path): models/ppo_{base model name}/eval_samples.jsonl, written by ppo.py"""
    compare_samples: Optional[str] = None
    """a second model's eval_samples.jsonl (e.g. SFT when --samples is PPO): paired comparison"""
    head_to_head: bool = False
    """with --compare_samples, also ask the judge directly: candidate vs the compare model's summary"""
    max_samples: Optional[int] = None
    """judge (or generate) only the first N items"""
    model_path: Optional[str] = None
    """generate the samples first from this policy (save_pretrained dir with its tokenizer)"""
    dataset_path: Optional[str] = None
    """dataset dir written by tldr_dataset.py (queries of `{dataset_path}/sft[split]`), with --model_path"""
    split: str = "validation"
    response_length: int = 53
    """Detail 13: number of new tokens sampled for evaluation"""
    eval_temperature: float = 0.01
    """Detail 13: near-greedy evaluation sampling temperature"""
    generation_batch_size: int = 16

    # ---- judge ----
    judge: Literal["openai", "gold"] = "openai"
    judge_model: str = "gpt-3.5-turbo-0125"
    """Detail 33: the paper's figures use gpt-3.5-turbo-0125; gpt-4-0125-preview for the GPT-4 evaluation"""
    base_url: Optional[str] = None
    """OpenAI-compatible endpoint (e.g. http://localhost:8000/v1 for vLLM); None = api.openai.com"""
    api_key_env: str = "OPENAI_API_KEY"
    """environment variable that holds the API key"""
    judge_temperature: Optional[float] = 0.0
    """None = not sent (reasoning models accept only their default)"""
    judge_max_tokens: Optional[int] = 256
    """None = not sent"""
    released_request: bool = False
    """Detail 33: send the request as released, without temperature and max_tokens (the API defaults)"""
    accounting: Literal["strict", "released"] = "strict"
    """Detail 33: `strict` (a line `Preferred: A|B`, else unparsed: retried, then left out) or `released` (the text after
    `Preferred:` stripped must be exactly A or B, anything else counts for the reference, a reply without `Comparison:`
    or `Preferred:` gets a random verdict; one request per item). Both win rates are reported either way."""
    max_completion_tokens_param: bool = False
    """send the limit as `max_completion_tokens` (newer OpenAI models) instead of `max_tokens`"""
    concurrency: int = 16
    request_timeout: float = 60.0
    """seconds before a request counts as timed out (and is retried)"""
    max_retries: int = 8
    """transport retries per request (429, 5xx, timeouts, connection errors)"""
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_unparsed_retries: int = 2
    """extra requests for an unparsable verdict before it is recorded as unparsed"""
    max_requests: Optional[int] = None
    """stop cleanly after this many HTTP requests (retries included); rerun to resume from the cache"""
    max_cost_usd: Optional[float] = None
    """stop cleanly once the measured cost reaches this"""
    price_input_per_mtok: Optional[float] = None
    """USD per million prompt tokens (None = table for known models, else 0)"""
    price_output_per_mtok: Optional[float] = None
    cache_path: Optional[str] = None
    """append-only jsonl cache of judgements (default {output_dir}/judge_cache.jsonl); share it across runs"""
    gold_task_dir: Optional[str] = None
    """embedded task dir: the gold judge (`--judge gold`)"""

    # ---- reporting ----
    n_length_bins: int = 10
    """Detail 34: bins of log(len(candidate) / len(reference))"""
    plot: bool = False


PRESETS = {
    "paper": Args(),
    "embedded": Args(preset="embedded", seed=1, judge="gold", output_dir="runs/quickstart/judge", generation_batch_size=64),
}


def model_name(base_model: str) -> str:
    """`EleutherAI/pythia-1b-deduped` -> `pythia-1b-deduped`: the stages name their default folders after it."""
    return os.path.basename(os.path.normpath(base_model))


def default_paths(args: Args) -> Args:
    # the stages derive the same folders from --base_model: by default the judge reads what ppo.py wrote
    samples = args.samples
    if samples is None and args.model_path is None:
        samples = os.path.join("models", f"ppo_{model_name(args.base_model)}", "eval_samples.jsonl")
    output_dir = args.output_dir or os.path.join(os.path.dirname(samples) if samples else args.model_path, "judge")
    return dataclasses.replace(args, samples=samples, output_dir=output_dir)


def parse_args(argv: Optional[list[str]] = None) -> Args:
    argv = sys.argv[1:] if argv is None else argv
    name = "paper"
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            name = argv[i + 1]
        elif a.startswith("--preset="):
            name = a.split("=", 1)[1]
    if name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r}, choose from {sorted(PRESETS)}")
    return default_paths(tyro.cli(Args, default=PRESETS[name], args=argv, use_underscores=True))


# ------------------------------------------------------------------------------------------------------
# Detail 33: the judge prompt (the paper's protocol: system message, then this user message)
# ------------------------------------------------------------------------------------------------------
SYSTEM_PROMPT = "You are a helpful assistant."
# Detail 33: the released template: a raw string that starts with a newline; its instruction line breaks after
# "explaining which" with a backslash and a newline, and both characters stay in the prompt (the string is raw).
JUDGE_TEMPLATE = r"""
Which of the following summaries does a better job of summarizing the most important points in the given forum post, without including unimportant or irrelevant details? Judge based on accuracy, coverage, and coherence.

### Post:
{post}

### Summary A:
{summary_a}

### Summary B:
{summary_b}

### Instructions:
FIRST provide a one-sentence comparison of the two summaries, explaining which \
you prefer and why. SECOND, on a new line, state only "A" or "B" to indicate your choice. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">
"""

EOS_TEXT, PAD_TEXT = "<|endoftext|>", "[PAD]"
# Prices in USD per million tokens (input, output) at the time of the paper; override with --price_*.
PRICES = {
    "gpt-3.5-turbo-0125": (0.5, 1.5),
    "gpt-4-0125-preview": (10.0, 30.0),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
}
EST_COMPLETION_TOKENS = 50  # a one-sentence comparison + the verdict line


def format_post(query: str) -> str:
    """Detail 33: the post as shown to the judge is the whole stored query, stripped (`SUBREDDIT: ... TL;DR:`)."""
    return query.strip()


def clean_summary(text: str) -> str:
    """Summary text as shown to the judge: nothing from the first EOS on, no pads, stripped."""
    return text.split(EOS_TEXT, 1)[0].replace(PAD_TEXT, "").strip()


def build_messages(query: str, summary_a: str, summary_b: str) -> list[dict]:
    # Detail 33: system "You are a helpful assistant.", the post, Summary A, Summary B, the verdict format
    user = JUDGE_TEMPLATE.format(post=format_post(query), summary_a=clean_summary(summary_a), summary_b=clean_summary(summary_b))
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_QUOTES = "\"'`\u201c\u201d\u2018\u2019"
VERDICT_RE = re.compile(rf"^\s*preferred\s*:\s*[{_QUOTES}]?\s*([ab])\s*[{_QUOTES}]?\s*$", re.IGNORECASE)


def parse_verdict(text: Optional[str]) -> Optional[str]:
    """Detail 33: the verdict is read strictly from a line `Preferred: A` / `Preferred: B` (quotes, case and
    surrounding whitespace tolerated). Anything else (no such line, "Preferred: Summary A", two lines that
    disagree) -> None = unparsed."""
    if not text:
        return None
    found = {m.group(1).upper() for line in text.splitlines() if (m := VERDICT_RE.match(line))}
    return found.pop() if len(found) == 1 else None


def released_verdict(text: Optional[str], seed: int, item_id: str) -> str:
    """Detail 33, the released accounting: a reply without `Comparison:` or `Preferred:` gets a random verdict
    (here reproducible from (seed, id)); otherwise the text after `Preferred:`, stripped. Only an exact "A" or "B"
    can win; anything else counts for the reference."""
    text = text or ""
    if "Comparison:" not in text or "Preferred:" not in text:
        return "A" if candidate_is_a(seed, item_id, "released-random-verdict") else "B"
    return text.split("Preferred:")[1].strip()


def released_outcome(verdict_text: str, cand_is_a: bool) -> str:
    """Win only when the released verdict is exactly the candidate's letter; anything else is a loss."""
    return "win" if verdict_text == ("A" if cand_is_a else "B") else "loss"


def accounting_comparison(rows: list[dict]) -> dict:
    """Detail 33: the win rate under both accountings over the same judged items, and their difference."""
    strict = [r for r in rows if r["strict_outcome"] in ("win", "loss", "tie")]
    released = [r for r in rows if r["released_outcome"]]
    m = {"strict_n_judged": len(strict), "released_n_judged": len(released)}
    m["strict_win_rate"] = sum(r["strict_outcome"] == "win" for r in strict) / len(strict) if strict else float("nan")
    m["released_win_rate"] = sum(r["released_outcome"] == "win" for r in released) / len(released) if released else float("nan")
    m["accounting_win_rate_diff"] = m["released_win_rate"] - m["strict_win_rate"]  # released - strict
    m["n_accounting_disagreements"] = sum(r["strict_outcome"] != r["released_outcome"] for r in released)
    return m


def candidate_is_a(seed: int, item_id: str, salt: str = "") -> bool:
    """Detail 33: random order of the two summaries per item, reproducible from (seed, id) alone (so a
    resumed run, a subset or a shuffled file get the same order)."""
    h = hashlib.sha256(f"{seed}:{salt}:{item_id}".encode()).digest()
    return h[0] % 2 == 0  # Detail 33: the candidate is Summary A for about half of the items


def cache_key(judge_model: str, messages: list[dict], order: str) -> str:
    """Cache key = (judge model, full prompt, order)."""
    blob = json.dumps({"model": judge_model, "messages": messages, "order": order}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------------
Z95 = 1.959963984540054


def wilson_ci(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k / n (NaN when n == 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k <= 0 else max(0.0, center - half)  # exact at the boundaries (no float residue)
    hi = 1.0 if k >= n else min(1.0, center + half)
    return lo, hi


def paired_diff_ci(x: np.ndarray, y: np.ndarray, z: float = Z95) -> tuple[float, float, float]:
    """Mean of the per-item differences x - y with a paired normal 95% CI (sd with ddof=1)."""
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(d.mean())
    if len(d) < 2:
        return mean, float("nan"), float("nan")
    se = float(d.std(ddof=1)) / math.sqrt(len(d))
    return mean, mean - z * se, mean + z * se


def length_bins(log_ratio: np.ndarray, wins: np.ndarray, n_bins: int = 10) -> list[dict]:
    """Detail 34: win rate by response length, items binned by log(len(candidate) / len(reference)) in
    tokens into `n_bins` equal-width bins between the smallest and the largest ratio (last bin closed).
    DETAILS.md fixes the quantity and the count (10) as released; where the bin edges sit is this project's
    choice (equal width over the observed range): other edges regroup the items, the per-item ratio is the same."""
    log_ratio, wins = np.asarray(log_ratio, dtype=float), np.asarray(wins, dtype=float)
    if len(log_ratio) == 0:
        return []
    lo, hi = float(log_ratio.min()), float(log_ratio.max())
    edges = np.linspace(lo, hi, n_bins + 1)  # Detail 34: 10 equal-width bins of log(len(cand) / len(ref))
    idx = np.clip(np.searchsorted(edges, log_ratio, side="right") - 1, 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        out.append(
            {"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n, "win_rate": float(wins[sel].mean()) if n else float("nan")}
        )
    return out


def log_len_ratio(cand_len: int, ref_len: int) -> float:
    # Detail 34: log(len(candidate) / len(reference)) in tokens (a 0-token summary counts as 1 token)
    return math.log(max(int(cand_len), 1) / max(int(ref_len), 1))


def summarize(rows: list[dict], n_bins: int = 10) -> dict:
    """Flat statistics of one set of judgements (rows with `outcome` in win/loss/tie/unparsed/error/missing)."""
    outcomes = [r["outcome"] for r in rows]
    n_w, n_l, n_t = outcomes.count("win"), outcomes.count("loss"), outcomes.count("tie")
    judged = [r for r in rows if r["outcome"] in ("win", "loss", "tie")]
    n = len(judged)
    m: dict = {
        "n_items": len(rows),
        "n_judged": n,
        "n_wins": n_w,
        "n_losses": n_l,
        "n_ties": n_t,
        "n_unparsed": outcomes.count("unparsed"),
        "n_errors": outcomes.count("error"),
        "n_missing": outcomes.count("missing"),
    }
    m["win_rate"] = n_w / n if n else float("nan")
    m["win_rate_ci_low"], m["win_rate_ci_high"] = wilson_ci(n_w, n)
    m["win_rate_ties_half"] = (n_w + 0.5 * n_t) / n if n else float("nan")
    m["tie_rate"] = n_t / n if n else float("nan")
    m["unparsed_rate"] = m["n_unparsed"] / len(rows) if rows else float("nan")
    # position bias: how often the summary shown as A wins, and the win rate by the candidate's position
    n_a = sum(1 for r in judged if r["verdict"] == "A")
    n_ab = sum(1 for r in judged if r["verdict"] in ("A", "B"))
    m["position_a_preferred_rate"] = n_a / n_ab if n_ab else float("nan")
    m["position_a_preferred_ci_low"], m["position_a_preferred_ci_high"] = wilson_ci(n_a, n_ab)
    for pos, name in (("A", "first"), ("B", "second")):
        sub = [r for r in judged if r["candidate_position"] == pos]
        m[f"n_candidate_{name}"] = len(sub)
        m[f"win_rate_candidate_{name}"] = sum(r["outcome"] == "win" for r in sub) / len(sub) if sub else float("nan")
    m["position_win_rate_gap"] = m["win_rate_candidate_first"] - m["win_rate_candidate_second"]
    m["mean_candidate_token_len"] = float(np.mean([r["candidate_token_len"] for r in rows])) if rows else float("nan")
    m["mean_reference_token_len"] = float(np.mean([r["reference_token_len"] for r in rows])) if rows else float("nan")
    bins = length_bins([r["log_len_ratio"] for r in judged], [r["outcome"] == "win" for r in judged], n_bins)
    for i, b in enumerate(bins):
        for k, v in b.items():
            m[f"len_bin{i}_{k}"] = v
    return m


def outcome_score(outcome: str) -> float:
    return 1.0 if outcome == "win" else 0.0  # a tie is not a win (as GoldJudge.win_rate)


def paired_comparison(rows_x: list[dict], rows_y: list[dict]) -> dict:
    """Paired comparison of two models judged against the same references: items judged for both."""
    by_y = {r["id"]: r for r in rows_y if r["outcome"] in ("win", "loss", "tie")}
    pairs = [(r, by_y[r["id"]]) for r in rows_x if r["outcome"] in ("win", "loss", "tie") and r["id"] in by_y]
    x = np.array([outcome_score(a["outcome"]) for a, _ in pairs])
    y = np.array([outcome_score(b["outcome"]) for _, b in pairs])
    mean, lo, hi = paired_diff_ci(x, y)
    return {
        "diff_n_pairs": len(pairs),
        "diff_win_rate": mean,
        "diff_win_rate_ci_low": lo,
        "diff_win_rate_ci_high": hi,
        "diff_paired_win_rate": float(x.mean()) if len(x) else float("nan"),
        "diff_paired_compare_win_rate": float(y.mean()) if len(y) else float("nan"),
        "diff_both_win": int(((x == 1) & (y == 1)).sum()),
        "diff_only_candidate_wins": int(((x == 1) & (y == 0)).sum()),
        "diff_only_compare_wins": int(((x == 0) & (y == 1)).sum()),
        "diff_neither_wins": int(((x == 0) & (y == 0)).sum()),
    }


# ------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------
SAMPLE_FIELDS = ("id", "query", "response", "reference", "response_token_len", "reference_token_len")


def load_samples(path: str, max_samples: Optional[int] = None) -> list[dict]:
    if not os.path.isfile(path):
        raise ValueError(f"samples file {path!r} does not exist")
    rows, seen = [], set()
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
            for k in SAMPLE_FIELDS:
                if k not in row:
                    raise ValueError(f"{path}:{lineno}: missing field {k!r} (eval_samples.jsonl needs {SAMPLE_FIELDS})")
            for k in ("response_token_len", "reference_token_len"):
                if not isinstance(row[k], int) or row[k] < 0:
                    raise ValueError(f"{path}:{lineno}: field {k!r} must be a non-negative int, got {row[k]!r}")
            row["id"] = str(row["id"])
            if row["id"] in seen:
                raise ValueError(f"{path}:{lineno}: duplicate id {row['id']!r}")
            seen.add(row["id"])
            rows.append(row)
            if max_samples is not None and len(rows) >= max_samples:
                break
    if not rows:
        raise ValueError(f"samples file {path!r} has no rows")
    return rows


@dataclass
class Job:
    set_name: str  # "candidate" / "compare" / "h2h"
    id: str
    query: str
    candidate: str
    baseline: str  # the reference (or the compare model's summary for h2h)
    candidate_token_len: int
    reference_token_len: int
    cand_is_a: bool


def make_jobs(set_name: str, rows: list[dict], seed: int, baseline_rows: Optional[list[dict]] = None) -> list[Job]:
    jobs = []
    base_by_id = {r["id"]: r for r in baseline_rows} if baseline_rows is not None else None
    for r in rows:
        if base_by_id is None:
            base, base_len = r["reference"], r["reference_token_len"]
        elif r["id"] in base_by_id:
            base, base_len = base_by_id[r["id"]]["response"], base_by_id[r["id"]]["response_token_len"]
        else:
            continue
        salt = "h2h" if base_by_id is not None else ""
        jobs.append(
            Job(set_name, r["id"], r["query"], r["response"], base, r["response_token_len"], base_len, candidate_is_a(seed, r["id"], salt))
        )
    return jobs


# ------------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------------
class JudgementCache:
    """Append-only jsonl: one record per answered request, flushed and fsynced at once. A record with a
    parsed verdict (or an unparsed one at the last allowed attempt) is final. A torn last line (a killed
    run) is ignored."""

    def __init__(self, path: str):
        self.path = path
        self.records: dict[str, dict] = {}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            for line in data.decode("utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                prev = self.records.get(rec.get("key"))
                if prev is None or rec.get("attempt", 0) >= prev.get("attempt", 0):
                    self.records[rec["key"]] = rec
            needs_newline = len(data) > 0 and not data.endswith(b"\n")
        else:
            needs_newline = False
        self.f = open(path, "a", encoding="utf-8")
        if needs_newline:
            self.f.write("\n")

    def get(self, key: str) -> Optional[dict]:
        return self.records.get(key)

    def put(self, rec: dict):
        self.records[rec["key"]] = rec
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        self.f.close()


# ------------------------------------------------------------------------------------------------------
# Judge backends (one interface: `await judge(query, summary_a, summary_b) -> Reply`)
# ------------------------------------------------------------------------------------------------------
class BudgetExhausted(Exception):
    pass


class FatalJudgeError(RuntimeError):
    pass


class JudgeRequestError(RuntimeError):
    pass


@dataclass
class Reply:
    verdict: Optional[str]  # "A", "B", "tie" or None (unparsed)
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Budget:
    def __init__(self, max_requests: Optional[int], max_cost_usd: Optional[float], price_in: float, price_out: float):
        self.max_requests, self.max_cost_usd = max_requests, max_cost_usd
        self.price_in, self.price_out = price_in, price_out
        self.n_requests = 0
        self.cost_usd = 0.0
        self.exhausted = False

    def take(self):
        if (self.max_requests is not None and self.n_requests >= self.max_requests) or (
            self.max_cost_usd is not None and self.cost_usd >= self.max_cost_usd
        ):
            self.exhausted = True
            raise BudgetExhausted()
        self.n_requests += 1

    def spend(self, prompt_tokens: int, completion_tokens: int):
        self.cost_usd += (prompt_tokens * self.price_in + completion_tokens * self.price_out) / 1e6


def parse_retry_after(headers) -> Optional[float]:
    """Seconds to wait from `retry-after-ms`, `retry-after` (seconds or an HTTP date); None if absent."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra is None:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(ra).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": d = min(cap, base * 2^attempt); sleep d/2 + U(0, d/2)."""
    d = min(cap, base * (2**attempt))
    return d / 2 + rng.uniform(0, d / 2)


class OpenAIJudge:
    """Any OpenAI-compatible chat-completions endpoint, through the official async client. The client's
    own retries are off: retries, backoff and the request budget are handled here."""

    uses_cache = True

    def __init__(self, args: Args, budget: Budget):
        import openai

        self.openai = openai
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            if args.base_url is None and args.max_requests != 0:
                raise ValueError(f"--judge openai needs an API key in the environment variable {args.api_key_env}")
            api_key = "EMPTY"  # local servers (vLLM, the test server) ignore it; a dry run sends nothing
        self.client = openai.AsyncOpenAI(api_key=api_key, base_url=args.base_url, timeout=args.request_timeout, max_retries=0)
        self.model = args.judge_model
        self.args = args
        self.budget = budget
        self.rng = random.Random(args.seed + 7919)
        self.params: dict = {}
        if args.judge_temperature is not None and not args.released_request:
            self.params["temperature"] = args.judge_temperature
        if args.judge_max_tokens is not None and not args.released_request:  # Detail 33: released sends neither
            self.params["max_completion_tokens" if args.max_completion_tokens_param else "max_tokens"] = args.judge_max_tokens
        self.stats = {"n_retries": 0, "n_rate_limited": 0, "n_server_errors": 0, "n_timeouts": 0, "n_connection_errors": 0}

    def messages(self, query: str, a: str, b: str) -> list[dict]:
        return build_messages(query, a, b)

    async def judge(self, query: str, a: str, b: str) -> Reply:
        messages = self.messages(query, a, b)
        openai, args = self.openai, self.args
        last = None
        for attempt in range(args.max_retries + 1):
            self.budget.take()
            try:
                resp = await self.client.chat.completions.create(model=self.model, messages=messages, **self.params)
            except openai.APIStatusError as e:
                code = e.status_code
                if code in (401, 403, 404):
                    raise FatalJudgeError(f"judge endpoint answered {code}: {e.message} (check --base_url, --judge_model, the API key)") from e
                if code not in (408, 409, 429) and code < 500:
                    raise JudgeRequestError(f"HTTP {code}: {e.message}") from e
                self.stats["n_rate_limited" if code == 429 else "n_server_errors"] += 1
                retry_after = parse_retry_after(getattr(e.response, "headers", None))
                delay = backoff_delay(attempt, args.backoff_base, args.backoff_max, self.rng)
                if retry_after is not None:  # the server knows best: wait what it asks (+ a little jitter)
                    delay = min(retry_after, 600.0) * (1 + 0.1 * self.rng.random())
                last = f"HTTP {code}"
            except openai.APITimeoutError:
                self.stats["n_timeouts"] += 1
                delay, last = backoff_delay(attempt, args.backoff_base, args.backoff_max, self.rng), "timeout"
            except openai.APIConnectionError as e:
                self.stats["n_connection_errors"] += 1
                delay, last = backoff_delay(attempt, args.backoff_base, args.backoff_max, self.rng), f"connection error ({e})"
            else:
                text = resp.choices[0].message.content or "" if resp.choices else ""
                pt = getattr(resp.usage, "prompt_tokens", 0) or 0 if resp.usage else 0
                ct = getattr(resp.usage, "completion_tokens", 0) or 0 if resp.usage else 0
                self.budget.spend(pt, ct)
                return Reply(parse_verdict(text), text, pt, ct)
            if attempt < args.max_retries:
                self.stats["n_retries"] += 1
                await asyncio.sleep(delay)
        raise JudgeRequestError(f"gave up after {args.max_retries + 1} attempts, last: {last}")

    async def close(self):
        await self.client.close()


class GoldJudge:
    """The embedded task's noiseless gold judge behind the same interface (free, offline, no cache)."""

    uses_cache = False

    def __init__(self, args: Args):
        if not args.gold_task_dir:
            raise ValueError("--judge gold needs --gold_task_dir (the embedded task directory)")
        if not os.path.isdir(args.gold_task_dir):
            raise ValueError(f"--gold_task_dir {args.gold_task_dir!r} is not a directory")
        from embedded_task import GoldJudge as _Gold  # the hidden evaluator of the offline task, imported lazily

        self.gold = _Gold.from_dir(args.gold_task_dir)
        self.model = "gold"
        self.stats: dict = {}

    def messages(self, query: str, a: str, b: str) -> list[dict]:
        return build_messages(query, a, b)

    async def judge(self, query: str, a: str, b: str) -> Reply:
        p = float(self.gold.compare(query, a, b))  # P(a preferred over b): 1.0 / 0.0 / 0.5 (tie)
        verdict = "A" if p > 0.5 else ("B" if p < 0.5 else "tie")
        # in the judge's reply format, so that the released accounting reads it too (a tie counts for the reference)
        return Reply(verdict, f"Comparison: gold compare={p}\nPreferred: {verdict}")

    async def close(self):
        pass


def make_backend(args: Args, budget: Budget):
    if args.judge == "openai":
        return OpenAIJudge(args, budget)
    if args.judge == "gold":
        return GoldJudge(args)
    raise ValueError(f"--judge: unknown backend {args.judge!r} (openai or gold)")


# ------------------------------------------------------------------------------------------------------
# Running the judgements
# ------------------------------------------------------------------------------------------------------
class _null_lock:
    async def __aenter__(self):
        return None

    async def __aexit__(self, *exc):
        return False


def outcome_of(verdict: Optional[str], cand_is_a: bool) -> str:
    """Un-swap: the candidate wins when the preferred letter is the one it was shown under."""
    if verdict is None:
        return "unparsed"
    if verdict == "tie":
        return "tie"
    return "win" if (verdict == "A") == cand_is_a else "loss"


async def judge_all(args: Args, backend, jobs: list[Job], cache: Optional[JudgementCache], progress=None) -> tuple[list[dict], dict]:
    sem = asyncio.Semaphore(max(1, args.concurrency))
    key_locks: dict[str, asyncio.Lock] = {}
    counts = {"n_cache_hits": 0, "n_new_judgements": 0}
    task_id = progress.add_task("judging", total=len(jobs)) if progress is not None else None

    async def run_one(job: Job) -> dict:
        a, b = (job.candidate, job.baseline) if job.cand_is_a else (job.baseline, job.candidate)
        order = "candidate=A" if job.cand_is_a else "candidate=B"
        messages = backend.messages(job.query, a, b)
        key = cache_key(backend.model, messages, order) if backend.uses_cache else None
        # one request at a time per cache key: two jobs with the same prompt (e.g. identical summaries in
        # two samples files) pay once, the second reads the cache
        async with key_locks.setdefault(key, asyncio.Lock()) if key is not None else _null_lock():
            return await judge_locked(job, a, b, order, key)

    async def judge_locked(job: Job, a: str, b: str, order: str, key: Optional[str]) -> dict:
        rec = cache.get(key) if (cache is not None and key is not None) else None
        from_cache, err = rec is not None, None
        while True:
            if rec is not None and (rec["verdict"] is not None or rec["attempt"] >= args.max_unparsed_retries):
                break  # final: a parsed verdict, or unparsed after the allowed retries
            attempt = 0 if rec is None else rec["attempt"] + 1
            try:
                async with sem:
                    reply = await backend.judge(job.query, a, b)
            except BudgetExhausted:
                err = "missing"
                break
            except JudgeRequestError as e:
                err = f"error: {e}"
                break
            from_cache = False
            rec = {
                "key": key,
                "model": backend.model,
                "order": order,
                "attempt": attempt,
                "verdict": reply.verdict,
                "text": reply.text,
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "set": job.set_name,
                "id": job.id,
                "time": time.time(),
            }
            if cache is not None and key is not None:
                cache.put(rec)  # written before the request slot is reused: a kill loses nothing paid for
        if rec is not None and err is None:
            counts["n_cache_hits" if from_cache else "n_new_judgements"] += 1
        if err == "missing" and rec is not None and rec["verdict"] is None:
            outcome = "missing"  # an unparsed verdict still owed retries
        elif err is not None:
            outcome = "missing" if err == "missing" else "error"
        else:
            outcome = outcome_of(rec["verdict"], job.cand_is_a)
        if progress is not None:
            progress.advance(task_id)
        return {
            "set": job.set_name,
            "id": job.id,
            "candidate_position": "A" if job.cand_is_a else "B",
            "verdict": (rec["verdict"] or "unparsed") if (rec is not None and err is None) else "",
            "outcome": outcome,
            "candidate_token_len": job.candidate_token_len,
            "reference_token_len": job.reference_token_len,
            "log_len_ratio": log_len_ratio(job.candidate_token_len, job.reference_token_len),
            "attempts": (rec["attempt"] + 1) if rec is not None else 0,
            "from_cache": int(from_cache and err is None),
            "judge_model": backend.model,
            "error": err if (err and err != "missing") else "",
            "judge_text": rec["text"] if rec is not None else "",
            "cache_key": key or "",
        }

    tasks = [asyncio.ensure_future(run_one(j)) for j in jobs]
    try:
        rows = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return list(rows), counts


# ------------------------------------------------------------------------------------------------------
# Generation (Detail 13) for --model_path
# ------------------------------------------------------------------------------------------------------
def generate_samples(args: Args, out_path: str) -> str:
    """Sample the policy on `{dataset_path}/sft[split]` queries with the evaluation settings and write
    eval_samples.jsonl (torch / transformers imported here only)."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not args.dataset_path:
        raise ValueError("--model_path needs --dataset_path (dataset dir written by tldr_dataset.py)")
    if not os.path.isdir(os.path.join(args.dataset_path, "sft")):
        raise ValueError(f"--dataset_path {args.dataset_path!r} has no sft/ DatasetDict")
    tokenizer = AutoTokenizer.from_pretrained(args.model_path, padding_side="left")
    # Detail 3: a dedicated [PAD], never EOS, added whatever pad the tokenizer reports (Pythia's: <|padding|>),
    # as released; Pythia's [PAD] is id 50277. Idempotent on a tokenizer saved with [PAD] by an earlier stage.
    tokenizer.add_special_tokens({"pad_token": PAD_TEXT})
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad_id == eos_id:
        raise ValueError(f"{args.model_path}: tokenizer pad id equals eos id ({pad_id}); Detail 3 needs a dedicated [PAD]")
    meta_path = os.path.join(args.dataset_path, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("pad_token_id") is not None and meta["pad_token_id"] != pad_id:
            raise ValueError(f"{meta_path}: pad_token_id {meta['pad_token_id']} != tokenizer pad id {pad_id} of {args.model_path}")
    model = AutoModelForCausalLM.from_pretrained(args.model_path)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    disable_dropout(model)  # Detail 7
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    ds = load_from_disk(os.path.join(args.dataset_path, "sft"))
    if args.split not in ds:
        raise ValueError(f"--split {args.split!r} not in {args.dataset_path}/sft (has {list(ds.keys())})")
    ds = ds[args.split]
    if args.max_samples is not None:
        ds = ds.select(range(min(args.max_samples, len(ds))))
    gen_config = eval_generation_config(args.response_length, args.eval_temperature, pad_id)
    torch.manual_seed(args.seed)  # Detail 10: seed + rank * 100003, one process here (rank 0)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f, make_progress() as progress:
        task = progress.add_task("generating", total=len(ds))
        for start in range(0, len(ds), args.generation_batch_size):
            batch = ds[start : start + args.generation_batch_size]
            queries = torch.tensor(batch["query_token"], device=device)
            responses = generate(model, queries, pad_id, gen_config)
            responses = truncate_after_eos(responses, eos_id, pad_id)
            for i in range(len(queries)):
                toks = responses[i].tolist()
                n_real = sum(t != pad_id for t in toks)
                text_toks = [t for t in toks[:n_real] if t != eos_id]
                ref = batch["summary"][i] if "summary" in batch else batch["reference_response"][i]
                f.write(
                    json.dumps(
                        {
                            "id": str(batch["id"][i]),
                            "query": batch["query"][i],
                            "response": tokenizer.decode(text_toks, skip_special_tokens=True),
                            "reference": ref.split(EOS_TEXT, 1)[0].strip(),
                            "response_token_len": int(n_real),
                            "reference_token_len": int(batch["reference_response_token_len"][i]),
                        }
                    )
                    + "\n"
                )
            progress.advance(task, len(queries))
    return out_path


def disable_dropout(model):
    """Detail 7: every dropout probability of the config and every nn.Dropout module set to 0."""
    import torch

    for cfg_key in list(model.config.to_dict().keys()):
        if cfg_key.endswith("dropout") or cfg_key.endswith("pdrop"):
            setattr(model.config, cfg_key, 0.0)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0


def eval_generation_config(response_length: int, temperature: float, pad_id: int):
    from transformers import GenerationConfig

    # Detail 13: temperature 0.01, top_k 0, top_p 1.0, exactly `response_length` (53) new tokens:
    # eos_token_id=None so EOS does not stop generation (no min_new_tokens, which would suppress EOS)
    return GenerationConfig(
        max_new_tokens=response_length,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        do_sample=True,
        eos_token_id=None,
        pad_token_id=pad_id,
    )


def generate(model, queries, pad_id: int, gen_config):
    """Left-padded queries -> exactly max_new_tokens response tokens. Detail 3/11: pads replaced by 0, the
    attention mask passed (generate derives position ids from it: cumsum(mask) - 1)."""
    import torch

    mask = queries != pad_id
    input_ids = queries.masked_fill(~mask, 0)
    # `generate` fills the config's unset (None) fields from the model's own generation config: lift its EOS
    # too, or generation would stop early once every row has emitted EOS (Detail 13: exactly 53 tokens).
    saved_eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    try:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask.long(), generation_config=gen_config)
    finally:
        model.generation_config.eos_token_id = saved_eos
    return out[:, queries.shape[1] :]


def truncate_after_eos(responses, eos_id: int, pad_id: int):
    """Detail 21: every token after the first EOS becomes [PAD] (the EOS itself is kept)."""
    import torch

    is_eos = responses == eos_id
    after = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0
    return responses.masked_fill(after, pad_id)


# ------------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------------
def make_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _fmt(x, pct=True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.1f}%" if pct else str(x)


def print_tables(metrics: dict, set_names: list[str], labels: dict):
    t = Table(title=f"Judge: {metrics.get('_judge_model', '')}  (95% CI: Wilson score; difference: paired normal)")
    for col in ("model", "n", "win rate", "95% CI", "ties", "unparsed", "errors", "missing", "A preferred", "win | first", "win | second", "len cand/ref"):
        t.add_column(col, justify="right" if col != "model" else "left")
    for s in set_names:
        p = "" if s == "candidate" else f"{s}_"
        t.add_row(
            labels[s],
            str(metrics[f"{p}n_judged"]),
            _fmt(metrics[f"{p}win_rate"]),
            f"[{_fmt(metrics[f'{p}win_rate_ci_low'])}, {_fmt(metrics[f'{p}win_rate_ci_high'])}]",
            str(metrics[f"{p}n_ties"]),
            str(metrics[f"{p}n_unparsed"]),
            str(metrics[f"{p}n_errors"]),
            str(metrics[f"{p}n_missing"]),
            _fmt(metrics[f"{p}position_a_preferred_rate"]),
            _fmt(metrics[f"{p}win_rate_candidate_first"]),
            _fmt(metrics[f"{p}win_rate_candidate_second"]),
            f"{metrics[f'{p}mean_candidate_token_len']:.1f}/{metrics[f'{p}mean_reference_token_len']:.1f}",
        )
    if "diff_win_rate" in metrics:
        t.add_row(
            f"{labels['candidate']} - {labels['compare']} (paired)",
            str(metrics["diff_n_pairs"]),
            f"{100 * metrics['diff_win_rate']:+.1f} pts" if not math.isnan(metrics["diff_win_rate"]) else "-",
            f"[{100 * metrics['diff_win_rate_ci_low']:+.1f}, {100 * metrics['diff_win_rate_ci_high']:+.1f}]"
            if not math.isnan(metrics["diff_win_rate_ci_low"])
            else "-",
            *[""] * 8,
        )
    console.print(t)
    lt = Table(title="Detail 34: win rate by log(len(candidate) / len(reference)) bin")
    lt.add_column("bin")
    for s in set_names:
        if s != "h2h":
            lt.add_column(f"{labels[s]}: range / n / win", justify="right")
    for i in range(max((int(k[7:].split("_")[0]) for k in metrics if k.startswith("len_bin")), default=-1) + 1):
        cells = []
        for s in set_names:
            if s == "h2h":
                continue
            p = "" if s == "candidate" else f"{s}_"
            if f"{p}len_bin{i}_n" in metrics:
                cells.append(
                    f"[{metrics[f'{p}len_bin{i}_lo']:+.2f}, {metrics[f'{p}len_bin{i}_hi']:+.2f}]  {metrics[f'{p}len_bin{i}_n']:>4}  {_fmt(metrics[f'{p}len_bin{i}_win_rate'])}"
                )
            else:
                cells.append("")
        lt.add_row(str(i), *cells)
    console.print(lt)


def plot(metrics: dict, set_names: list[str], labels: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [s for s in set_names]
    rates = [metrics[("" if s == "candidate" else f"{s}_") + "win_rate"] for s in names]
    lows = [metrics[("" if s == "candidate" else f"{s}_") + "win_rate_ci_low"] for s in names]
    highs = [metrics[("" if s == "candidate" else f"{s}_") + "win_rate_ci_high"] for s in names]
    err = np.nan_to_num(np.array([[r - lo for r, lo in zip(rates, lows)], [hi - r for r, hi in zip(rates, highs)]], dtype=float))
    err = np.clip(err, 0.0, None)
    rates = np.nan_to_num(np.array(rates, dtype=float))
    ax1.bar([labels[s] for s in names], rates, yerr=err, capsize=4, color="tab:blue")
    ax1.axhline(0.5, color="gray", ls="--", lw=1)
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("win rate (95% Wilson CI)")
    ax1.set_title(f"judge: {metrics.get('_judge_model', '')}")
    for s in names:
        if s == "h2h":
            continue
        p = "" if s == "candidate" else f"{s}_"
        xs, ys = [], []
        i = 0
        while f"{p}len_bin{i}_n" in metrics:
            if metrics[f"{p}len_bin{i}_n"] > 0:
                xs.append(0.5 * (metrics[f"{p}len_bin{i}_lo"] + metrics[f"{p}len_bin{i}_hi"]))
                ys.append(metrics[f"{p}len_bin{i}_win_rate"])
            i += 1
        ax2.plot(xs, ys, marker="o", label=labels[s])
    ax2.set_xlabel("log(len(candidate) / len(reference)) (tokens)")
    ax2.set_ylabel("win rate vs reference")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_csv(rows: list[dict], path: str):
    fields = list(rows[0].keys()) if rows else ["set", "id", "outcome"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def json_safe(metrics: dict) -> dict:
    """Flat numbers; undefined statistics (NaN: no data) become null."""
    out = {}
    for k, v in metrics.items():
        if k.startswith("_"):
            continue
        if isinstance(v, (bool, np.bool_)):
            v = int(v)
        elif isinstance(v, np.integer):
            v = int(v)
        elif isinstance(v, (float, np.floating)):
            v = None if math.isnan(v) else float(v)
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    if (args.samples is None) == (args.model_path is None):
        raise ValueError("give exactly one of --samples (an eval_samples.jsonl) and --model_path (generate first)")
    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.n_length_bins < 1:
        raise ValueError(f"--n_length_bins must be >= 1, got {args.n_length_bins}")
    if args.head_to_head and not args.compare_samples:
        raise ValueError("--head_to_head needs --compare_samples")
    if args.accounting not in ("strict", "released"):
        raise ValueError(f"--accounting must be 'strict' or 'released', got {args.accounting!r}")
    if args.accounting == "released":  # Detail 33: the released evaluation asked once per item, no retry on its reply
        args = dataclasses.replace(args, max_unparsed_retries=0)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "args.json"), "w") as f:
        json.dump(dataclasses.asdict(args), f, indent=2)
    if args.model_path is not None:
        samples_path = generate_samples(args, os.path.join(args.output_dir, "eval_samples.jsonl"))
    else:
        samples_path = args.samples
    rows = load_samples(samples_path, args.max_samples)
    labels = {"candidate": os.path.basename(os.path.dirname(os.path.abspath(samples_path))) or "candidate"}
    jobs = make_jobs("candidate", rows, args.seed)
    set_names = ["candidate"]
    if args.compare_samples:
        cmp_rows = load_samples(args.compare_samples, None)
        cmp_ids = {r["id"] for r in cmp_rows}
        if not any(r["id"] in cmp_ids for r in rows):
            raise ValueError(f"--compare_samples {args.compare_samples!r} shares no id with {samples_path!r}")
        ids = {r["id"] for r in rows}
        n_cmp = len(cmp_rows)
        cmp_rows = [r for r in cmp_rows if r["id"] in ids]  # judge both models on the same queries only
        if n_cmp != len(cmp_rows) or len(cmp_rows) != len(rows):
            console.print(
                f"[yellow]{len(cmp_rows)} ids shared by the two samples files: {len(rows) - len(cmp_rows)} candidate items "
                f"have no compare item, {n_cmp - len(cmp_rows)} compare items are not judged[/]"
            )
        labels["compare"] = os.path.basename(os.path.dirname(os.path.abspath(args.compare_samples))) or "compare"
        if labels["compare"] == labels["candidate"]:
            labels["candidate"], labels["compare"] = "candidate", "compare"
        jobs += make_jobs("compare", cmp_rows, args.seed)
        set_names.append("compare")
        if args.head_to_head:
            jobs += make_jobs("h2h", rows, args.seed, baseline_rows=cmp_rows)
            set_names.append("h2h")
            labels["h2h"] = f"{labels['candidate']} vs {labels['compare']}"

    price_in, price_out = PRICES.get(args.judge_model, (0.0, 0.0)) if args.judge == "openai" else (0.0, 0.0)
    price_in = args.price_input_per_mtok if args.price_input_per_mtok is not None else price_in
    price_out = args.price_output_per_mtok if args.price_output_per_mtok is not None else price_out
    budget = Budget(args.max_requests, args.max_cost_usd, price_in, price_out)
    backend = make_backend(args, budget)
    cache = None
    if backend.uses_cache:
        cache = JudgementCache(args.cache_path or os.path.join(args.output_dir, "judge_cache.jsonl"))
        # cost estimate of what the cache does not hold yet (~4 characters per token)
        todo_chars = 0
        n_todo = 0
        for j in jobs:
            a, b = (j.candidate, j.baseline) if j.cand_is_a else (j.baseline, j.candidate)
            msgs = backend.messages(j.query, a, b)
            rec = cache.get(cache_key(backend.model, msgs, "candidate=A" if j.cand_is_a else "candidate=B"))
            if rec is None or (rec["verdict"] is None and rec["attempt"] < args.max_unparsed_retries):
                n_todo += 1
                todo_chars += sum(len(m["content"]) for m in msgs)
        est_cost = (todo_chars / 4 * price_in + n_todo * EST_COMPLETION_TOKENS * price_out) / 1e6
        console.print(
            f"[bold]{len(jobs)}[/] judgements, {len(jobs) - n_todo} in the cache {cache.path}, {n_todo} to request "
            f"from {args.judge_model} at {args.base_url or 'api.openai.com'}: estimated cost ${est_cost:.2f}"
            + (f" (max_requests={args.max_requests})" if args.max_requests is not None else "")
        )
    else:
        est_cost, n_todo = 0.0, len(jobs)

    t0 = time.time()
    try:
        with make_progress() as progress:
            judged, counts = asyncio.run(_run(args, backend, jobs, cache, progress))
    finally:
        if cache is not None:
            cache.close()
    elapsed = time.time() - t0
    # Detail 33: both accountings of every answered item; --accounting picks the one behind all the statistics
    for r in judged:
        r["strict_outcome"], r["released_outcome"] = r["outcome"], ""
        if r["outcome"] in ("win", "loss", "tie", "unparsed"):  # the judge answered
            r["released_verdict"] = released_verdict(r["judge_text"], args.seed, f"{r['set']}:{r['id']}")
            r["released_outcome"] = released_outcome(r["released_verdict"], r["candidate_position"] == "A")
            if args.accounting == "released":
                r["outcome"] = r["released_outcome"]
        else:
            r["released_verdict"] = ""

    metrics: dict = {"_judge_model": backend.model, "accounting_released": int(args.accounting == "released")}
    by_set = {s: [r for r in judged if r["set"] == s] for s in set_names}
    for s in set_names:
        m = summarize(by_set[s], args.n_length_bins)
        m.update(accounting_comparison(by_set[s]))
        p = "" if s == "candidate" else f"{s}_"
        metrics.update({f"{p}{k}": v for k, v in m.items()})
    if "compare" in by_set:
        metrics.update(paired_comparison(by_set["candidate"], by_set["compare"]))
    n_missing = sum(r["outcome"] == "missing" for r in judged)
    metrics.update(
        {
            "order_seed": args.seed,
            "complete": int(n_missing == 0),
            "n_judgements_total": len(judged),
            "n_missing_total": n_missing,
            "n_requests": budget.n_requests,
            "n_cache_hits": counts["n_cache_hits"],
            "n_new_judgements": counts["n_new_judgements"],
            "cost_usd": budget.cost_usd,
            "cost_usd_estimated": est_cost,
            "judge_seconds": elapsed,
            **{k: v for k, v in getattr(backend, "stats", {}).items()},
        }
    )
    write_csv(judged, os.path.join(args.output_dir, "judgements.csv"))
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(json_safe(metrics), f, indent=2)
    print_tables(metrics, set_names, labels)
    for s in set_names:
        p = "" if s == "candidate" else f"{s}_"
        console.print(
            f"{labels[s]}: win rate {_fmt(metrics[f'{p}strict_win_rate'])} strict ({metrics[f'{p}strict_n_judged']} judged), "
            f"{_fmt(metrics[f'{p}released_win_rate'])} with the released accounting ({metrics[f'{p}released_n_judged']}); "
            f"difference {100 * metrics[f'{p}accounting_win_rate_diff']:+.1f} pts, "
            f"{metrics[f'{p}n_accounting_disagreements']} items disagree [headline: {args.accounting}]"
        )
    if n_missing:
        console.print(
            f"[yellow]stopped early (budget): {n_missing} of {len(judged)} judgements missing; "
            f"rerun the same command to resume from the cache[/]"
        )
    console.print(
        f"requests {budget.n_requests}, cache hits {counts['n_cache_hits']}, measured cost ${budget.cost_usd:.4f}, "
        f"{elapsed:.1f}s -> {args.output_dir}/metrics.json, judgements.csv"
    )
    if args.plot:
        plot(metrics, set_names, labels, os.path.join(args.output_dir, "judge_plot.png"))
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=args.exp_name, config=dataclasses.asdict(args))
        wandb.log({k: v for k, v in json_safe(metrics).items() if v is not None})
        wandb.finish()
    return json_safe(metrics)


async def _run(args, backend, jobs, cache, progress):
    try:
        return await judge_all(args, backend, jobs, cache, progress)
    finally:
        await backend.close()


if __name__ == "__main__":
    main(parse_args())
