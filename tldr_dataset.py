"""Build the TL;DR data sets that every stage reads: the SFT set and the preference set.

One schema for the real data (the filtered TL;DR SFT set and OpenAI's comparisons, by hub name or local
path) and for the embedded offline task (`--source embedded`, raw rows written by `embedded_task.py`).
Everything below the loader is the same code.

    python tldr_dataset.py                                   # real data from the hub, Pythia tokenizer
    python tldr_dataset.py --source embedded --task_dir runs/quickstart/task --output_dir runs/quickstart/dataset

Output: `{output_dir}/sft` and `{output_dir}/preference` (`DatasetDict.save_to_disk`) and `{output_dir}/meta.json`
(lengths, token ids, row counts and every dropped row counted by reason).
"""

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache, partial
from typing import Optional

import tyro
from rich.console import Console
from rich.table import Table

console = Console()


@dataclass
class Args:
    source: str = "hub"
    """`hub` (hub names or local paths below) or `embedded` (raw rows under `--task_dir/raw`)"""
    task_dir: str = "runs/quickstart/task"
    """embedded task folder (only with `--source embedded`)"""
    comparisons_dir: Optional[str] = None
    """embedded only: folder of comparisons_{train,validation}.jsonl to use instead of `{task_dir}/raw` (for
    example the policy-sample comparisons written by collect_feedback.py)"""
    base_model: str = "EleutherAI/pythia-1b-deduped"
    """whose tokenizer to use (embedded: defaults to `{task_dir}/tokenizer`)"""
    sft_dataset: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
    """hub name or local folder of the SFT rows (id, subreddit, title, post, summary)"""
    preference_dataset: str = "openai/summarize_from_feedback"
    """hub name or local folder of OpenAI's comparison rows"""
    preference_config: str = "comparisons"
    output_dir: str = "data/tldr"
    """where sft/, preference/ and meta.json are written (every stage reads `--dataset_path data/tldr` by default)"""
    query_length: int = 512
    """Detail 2: the query holds at most this many tokens, left-padded to exactly this"""
    sft_response_length: int = 53
    """Detail 5: SFT reference responses up to this many tokens (EOS included)"""
    sft_query_response_length: int = 562
    """Detail 5: SFT query + response up to this many tokens"""
    rm_response_length: int = 169
    """Detail 5: preference responses up to this many tokens"""
    rm_query_response_length: int = 638
    """Detail 5: preference query + response up to this many tokens"""
    cnndm_query_length: int = 1919
    """Detail 6: a CNN/DM query (split validation_cnndm) holds at most this many tokens, left-padded to exactly this"""
    cnndm_rm_response_length: int = 155
    """Detail 6: CNN/DM preference responses up to this many tokens"""
    cnndm_rm_query_response_length: int = 2021
    """Detail 6: CNN/DM query + response up to this many tokens"""
    max_rows: Optional[int] = None
    """keep only the first N raw rows of every split (quick looks)"""
    push_to_hub: bool = False
    hub_repo: str = ""


EMBEDDED_LENGTHS = dict(
    query_length=256, sft_response_length=53, sft_query_response_length=309, rm_response_length=64, rm_query_response_length=320
)
CNNDM_LENGTHS = ("cnndm_query_length", "cnndm_rm_response_length", "cnndm_rm_query_response_length")
# Detail 6: the validation batches of OpenAI's comparisons that hold CNN/DM articles, not TL;DR posts.
CNNDM_BATCHES = ("batch0_cnndm", "cnndm0", "cnndm2")


# ----------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer at {path!r} has no EOS token; the responses end with it (Detail 4)")
    # Detail 3: a dedicated [PAD] token, never EOS: the model must learn to emit EOS. Added whatever pad the
    # tokenizer reports (Pythia's reports <|padding|>, id 1), as released: [PAD] is id 50277 for Pythia. A
    # tokenizer saved by an earlier stage already holds [PAD]; adding it again changes nothing.
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    return tokenizer


# ----------------------------------------------------------------------------------------------------
# Queries and responses
# ----------------------------------------------------------------------------------------------------
def format_query(subreddit: str, title: str, post: str) -> str:
    # Detail 1: the query format.
    return f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


def format_cnndm_query(article: str) -> str:
    # Detail 6: CNN/DM comparisons have their own query format, as released.
    return f"Article:\n{article}\n\nTL;DR:\n"


def smart_truncate(tokenizer, fmt, text: str, limit: int):
    """Tokens of `fmt(text)` with `text` cut until they fit in `limit`: (tokens, cut), (None, cut) if even
    `fmt("")` does not fit. Only `text` is ever cut, never the rest of the format."""
    tokens = tokenizer.encode(fmt(text), add_special_tokens=False)
    cut = False
    # Detail 2: smart truncation. While too long, cut the text back to its last newline (no newline:
    # drop its last character), re-format and re-tokenize.
    while len(tokens) > limit:
        if text == "":
            return None, cut
        cut = True
        text = text[: text.rfind("\n")] if "\n" in text else text[:-1]
        tokens = tokenizer.encode(fmt(text), add_special_tokens=False)
    return tokens, cut


def truncated_query_tokens(tokenizer, subreddit: str, title: str, post: str, query_length: int):
    """Detail 2 on a TL;DR query: only the post is cut, the title and "TL;DR:" never."""
    return smart_truncate(tokenizer, lambda p: format_query(subreddit, title, p), post, query_length)


def left_pad(tokens, length: int, pad_id: int):
    # Detail 2: query tokens are left-padded with [PAD] to exactly query_length.
    return [pad_id] * (length - len(tokens)) + list(tokens)


def right_pad(tokens, length: int, pad_id: int):
    # Detail 5: joint sequences and responses are right-padded with [PAD].
    return list(tokens) + [pad_id] * (length - len(tokens))


class Dropped(Exception):
    """A raw row that cannot be used; the message is the reason counted in meta.json."""


def _field(row: dict, name: str, where: str = ""):
    if name not in row or row[name] is None:
        raise Dropped(f"missing field '{where}{name}'")
    return row[name]


def build_query(tokenizer, info: dict, args: Args, where: str = ""):
    if info.get("post") is None and info.get("article") is not None:
        # Detail 6: a CNN/DM row (article, null post) belongs to validation_cnndm, built by build_cnndm_query.
        raise Dropped(f"CNN/DM row (article, null post) outside the CNN/DM validation batches {list(CNNDM_BATCHES)}")
    subreddit, title = _field(info, "subreddit", where), _field(info, "title", where)
    post = _field(info, "post", where)
    if not str(post).strip():
        raise Dropped("empty post")
    tokens, text, cut = cut_query(tokenizer, str(subreddit), str(title), str(post), args.query_length)
    if tokens is None:
        raise Dropped(f"query longer than query_length={args.query_length} even with an empty post")
    return list(tokens), text, cut


@lru_cache(maxsize=1 << 16)
def cut_query(tokenizer, subreddit: str, title: str, post: str, query_length: int):
    """(tokens, decoded text, cut) of a TL;DR query, each post's once: speed, a post is in many comparisons (15 a post
    in the embedded rater round: quickstart s seed 1: its preference set built in 44 s -> 22 s)."""
    tokens, cut = truncated_query_tokens(tokenizer, subreddit, title, post, query_length)
    return (None, None, cut) if tokens is None else (tuple(tokens), decoded_query(tokenizer, tokens), cut)


@lru_cache(maxsize=1 << 16)
def encode(tokenizer, text: str) -> tuple:
    """Tokens of a summary, each distinct text's once (speed: a sampled summary is in 5 of its post's 15 pairs)."""
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def build_cnndm_query(tokenizer, info: dict, args: Args, where: str = "info."):
    article = _field(info, "article", where)
    if not str(article).strip():
        raise Dropped("empty article")
    # Detail 6: the article is smart-truncated (Detail 2's rule) to at most cnndm_query_length tokens.
    tokens, cut = smart_truncate(tokenizer, format_cnndm_query, str(article), args.cnndm_query_length)
    if tokens is None:
        raise Dropped(f"query longer than cnndm_query_length={args.cnndm_query_length} even with an empty article")
    return tokens, decoded_query(tokenizer, tokens), cut


def decoded_query(tokenizer, tokens) -> str:
    # Detail 2: the stored query text is the decoded query, special tokens skipped, leading whitespace stripped.
    return tokenizer.decode(tokens, skip_special_tokens=True).lstrip()


def response_tokens(tokenizer, response: str, limit: int, what: str):
    tokens = list(encode(tokenizer, response))
    if len(tokens) > limit:
        # Detail 5: responses over the limit are dropped and counted, never silently truncated.
        raise Dropped(f"{what} longer than {limit} tokens")
    return tokens


def process_sft_row(row: dict, tokenizer, args: Args) -> dict:
    summary = _field(row, "summary")
    if not str(summary).strip():
        raise Dropped("empty summary")
    query, query_text, _ = build_query(tokenizer, row, args)
    # Detail 4: the SFT reference response is " " + summary + EOS.
    reference = " " + str(summary) + tokenizer.eos_token
    ref = response_tokens(tokenizer, reference, args.sft_response_length, "reference response")
    joint = query + ref
    if len(joint) > args.sft_query_response_length:
        raise Dropped(f"query + reference longer than {args.sft_query_response_length} tokens")
    pad = tokenizer.pad_token_id
    return dict(
        id=str(_field(row, "id")),
        subreddit=str(row["subreddit"]),
        title=str(row["title"]),
        post=str(row["post"]),
        summary=str(summary),
        query=query_text,
        query_token=left_pad(query, args.query_length, pad),
        reference_response=reference,
        reference_response_token=right_pad(ref, args.sft_response_length, pad),
        reference_response_token_len=len(ref),
        query_reference_response=query_text + reference,
        query_reference_response_token=right_pad(joint, args.sft_query_response_length, pad),
        query_reference_response_token_len=len(joint),
    )


def process_preference_row(row: dict, tokenizer, args: Args, cnndm: bool = False) -> dict:
    """One comparison row; `cnndm` selects the CNN/DM query format and limits (split validation_cnndm)."""
    info = _field(row, "info")
    summaries = _field(row, "summaries")
    choice = _field(row, "choice")
    if choice not in (0, 1):
        raise Dropped("choice not 0/1")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise Dropped("summaries is not a list of two")
    texts = [str(_field(s, "text", "summaries[].")) for s in summaries]
    if not all(t.strip() for t in texts):
        raise Dropped("empty summary")
    if texts[0].strip() == texts[1].strip():
        raise Dropped("identical summaries")
    if cnndm:
        query, query_text, _ = build_cnndm_query(tokenizer, info, args)
        # Detail 6: CNN/DM's own limits (query 1,919, response 155, query + response 2,021).
        q_len, r_len, qr_len = args.cnndm_query_length, args.cnndm_rm_response_length, args.cnndm_rm_query_response_length
    else:
        query, query_text, _ = build_query(tokenizer, info, args, "info.")
        q_len, r_len, qr_len = args.query_length, args.rm_response_length, args.rm_query_response_length
    # Detail 4: a preference summary already starts with a space; it becomes text + EOS.
    chosen, rejected = texts[choice] + tokenizer.eos_token, texts[1 - choice] + tokenizer.eos_token
    out = {}
    pad = tokenizer.pad_token_id
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        tok = response_tokens(tokenizer, text, r_len, f"{name} response")
        joint = query + tok
        if len(joint) > qr_len:
            raise Dropped(f"query + {name} longer than {qr_len} tokens")
        out[name] = text
        out[f"{name}_token"] = right_pad(tok, r_len, pad)
        out[f"{name}_token_len"] = len(tok)
        out[f"query_{name}_token"] = right_pad(joint, qr_len, pad)
        out[f"query_{name}_token_len"] = len(joint)
    policies = [str(s.get("policy", "")) for s in summaries]
    confidence = (row.get("extra") or {}).get("confidence")
    return dict(
        id=str(_field(info, "id", "info.")),
        # Detail 6: null info fields (article and site of a TL;DR row, post and subreddit of a CNN/DM row) -> "".
        post=str(info.get("post") or ""),
        title=str(info.get("title") or ""),
        subreddit=str(info.get("subreddit") or ""),
        site=str(info.get("site") or ""),
        article=str(info.get("article") or ""),
        query=query_text,
        query_token=left_pad(query, q_len, pad),
        **out,
        choice=int(choice),
        chosen_policy=policies[choice],
        rejected_policy=policies[1 - choice],
        policies=" vs ".join(sorted(policies)),
        confidence=int(confidence) if confidence is not None else -1,
        batch=str(row.get("batch") or ""),
        split=str(row.get("split") or ""),
        worker=str(row.get("worker") or ""),
    )


def process_split(rows, fn, tokenizer, args: Args, name: str):
    out, dropped = [], Counter()
    for row in rows:
        try:
            out.append(fn(row, tokenizer, args))
        except Dropped as reason:
            dropped[str(reason)] += 1
    if not out:
        raise ValueError(f"split {name!r}: no usable rows (dropped: {dict(dropped) or 'none: the split is empty'})")
    return out, dropped


# ----------------------------------------------------------------------------------------------------
# Raw sources
# ----------------------------------------------------------------------------------------------------
def read_jsonl(path: str) -> list:
    """JSON lines read with the json module, so that a null stays None. (datasets' json builder infers a column's
    type from the first rows: a field that is null there and a string later fails to load.)"""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def load_rows(name: str, config: Optional[str] = None) -> dict:
    """Raw rows by split, from a hub name, a local folder of `{split}.jsonl` / saved data, or embedded files."""
    import datasets

    if os.path.isdir(name):
        files = {f[: -len(".jsonl")]: os.path.join(name, f) for f in sorted(os.listdir(name)) if f.endswith(".jsonl")}
        if files:
            # Detail 6: null is a value in local files too (read_jsonl keeps it).
            return {split: read_jsonl(path) for split, path in files.items()}
        ds = datasets.load_from_disk(name)
    else:
        try:
            ds = datasets.load_dataset(name, config)
        except Exception as e:  # e.g. a hub copy that needs a loading script, which datasets 5 no longer runs
            raise RuntimeError(f"could not load {name!r} (config {config!r}) with datasets {datasets.__version__}: {e}; "
                               "build from local JSON-lines files instead (README: 'Building from local files')") from e
    return {split: list(ds[split]) for split in ds}


def embedded_rows(task_dir: str, comparisons_dir: Optional[str] = None):
    raw = os.path.join(task_dir, "raw")

    def read(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: build the embedded task first (python embedded_task.py --out_dir {task_dir})")
        return read_jsonl(path)

    sft = {s: read(os.path.join(raw, f"sft_{s}.jsonl")) for s in ("train", "validation", "test")}
    pref = {s: read(os.path.join(comparisons_dir or raw, f"comparisons_{s}.jsonl")) for s in ("train", "validation")}
    return sft, pref


def split_cnndm(pref: dict) -> dict:
    # Detail 6: validation comparisons from the CNN/DM batches form their own split, validation_cnndm.
    out = dict(pref)
    if "validation" in pref:
        rows = pref["validation"]
        out["validation"] = [r for r in rows if r.get("batch") not in CNNDM_BATCHES]
        cnn = [r for r in rows if r.get("batch") in CNNDM_BATCHES]
        if cnn:
            out["validation_cnndm"] = cnn
    return out


def build(args: Args):
    import datasets

    if args.source == "embedded":
        sft_raw, pref_raw = embedded_rows(args.task_dir, args.comparisons_dir)
        tokenizer_path = args.base_model if args.base_model != Args.base_model else os.path.join(args.task_dir, "tokenizer")
    elif args.source == "hub":
        sft_raw = load_rows(args.sft_dataset)
        pref_raw = load_rows(args.preference_dataset, args.preference_config)
        tokenizer_path = args.base_model
    else:
        raise ValueError(f"--source must be 'hub' or 'embedded', got {args.source!r}")
    if args.max_rows:
        sft_raw = {k: v[: args.max_rows] for k, v in sft_raw.items()}
        pref_raw = {k: v[: args.max_rows] for k, v in pref_raw.items()}
    pref_raw = split_cnndm(pref_raw)
    tokenizer = load_tokenizer(tokenizer_path)

    meta = dict(
        source=args.source,
        tokenizer=tokenizer_path,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{k: getattr(args, k) for k in (*EMBEDDED_LENGTHS, *CNNDM_LENGTHS)},
        counts={},
        dropped={},
    )
    for kind, raw, fn in (("sft", sft_raw, process_sft_row), ("preference", pref_raw, process_preference_row)):
        splits = {}
        for split, rows in raw.items():
            # Detail 6: validation_cnndm gets the CNN/DM query format and limits.
            split_fn = partial(fn, cnndm=True) if (kind, split) == ("preference", "validation_cnndm") else fn
            out, dropped = process_split(rows, split_fn, tokenizer, args, f"{kind}/{split}")
            splits[split] = datasets.Dataset.from_list(out)
            meta["counts"][f"{kind}/{split}"] = len(out)
            meta["dropped"][f"{kind}/{split}"] = dict(dropped)
        dd = datasets.DatasetDict(splits)
        dd.save_to_disk(os.path.join(args.output_dir, kind))
        if args.push_to_hub:
            dd.push_to_hub(f"{args.hub_repo}_{kind}")
    tokenizer.save_pretrained(os.path.join(args.output_dir, "tokenizer"))
    with open(os.path.join(args.output_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def print_report(meta: dict):
    table = Table(title=f"TL;DR data sets ({meta['source']})")
    for col in ("split", "rows", "dropped (reason: count)"):
        table.add_column(col)
    for key, n in meta["counts"].items():
        reasons = ", ".join(f"{r}: {c}" for r, c in meta["dropped"][key].items()) or "-"
        table.add_row(key, str(n), reasons)
    console.print(table)


def parse_args() -> Args:
    args = tyro.cli(Args)
    if args.source == "embedded":
        # The embedded task's lengths, unless given on the command line.
        import sys

        for k, v in EMBEDDED_LENGTHS.items():
            if f"--{k}" not in sys.argv and f"--{k.replace('_', '-')}" not in sys.argv:
                setattr(args, k, v)
        if args.output_dir == Args.output_dir:
            args.output_dir = "runs/quickstart/dataset"
    return args


if __name__ == "__main__":
    args = parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "args.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)
    meta = build(args)
    print_report(meta)
    console.print(f"saved to {args.output_dir}")
