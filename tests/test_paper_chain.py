"""The paper's path end to end, as a new user runs it: raw rows in the published schemas -> tldr_dataset.py -> sft.py
-> reward.py -> ppo.py -> dpo.py -> eval_gpt_judge.py (dry run), each a `python X.py` subprocess given only the base
model and batch sizes, in a fresh working folder so that every default path (data/tldr, models/...) is used.

The base model is a tiny random Pythia-shaped GPT-NeoX (vocabulary 50304, rotary_pct 0.25, 2,048 positions) in a
folder named like a Pythia checkpoint, holding Pythia's own tokenizer. The data keep their real lengths (queries 512
tokens, CNN/DM queries 1,919 and query + response 2,021): one post and one article are long enough to be cut."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "pythia-tiny-deduped"
PAD_ID = 50277  # Detail 3: [PAD] as released, after Pythia's 50,277 tokens

# Words only the SFT rows use: the RM and DPO never see them, so their input-embedding rows stay the SFT model's.
SFT_ONLY = " zebra quokka narwhal axolotl"
LONG_POST = "\n".join(f"Paragraph {i}: my roommate keeps borrowing my car without asking and I am not sure how to bring "
                      f"it up again after the last argument we had about the dishes." for i in range(60))
LONG_ARTICLE = "\n".join(f"Paragraph {i}: the storm reached the coast on Tuesday night, officials said, and thousands of "
                         f"residents in county {i} lost power as winds brought down lines and trees across the region."
                         for i in range(120))
TOPICS = "car rent dog job exam trip gym loan".split()


def sft_row(split, i, post=None):
    # the filtered TL;DR SFT layout
    t = TOPICS[i % len(TOPICS)]
    return dict(id=f"t3_{split}{i}", subreddit="relationships", title=f"Question about my {t}",
                post=post or f"I have a problem with my {t}.{SFT_ONLY}\nWhat should I do about the {t}?",
                summary=f"problem with my {t},{SFT_ONLY}")


def comparison_row(split, i, cnndm=False, article=None):
    """OpenAI's comparisons layout. Nullable fields are null in the first rows and strings later (note, site, article,
    confidence), as in the original files."""
    t = TOPICS[i % len(TOPICS)]
    if cnndm:  # Detail 6: post = subreddit = null, the text in `article`
        info = dict(id=f"cnn_{i}", post=None, title=f"Storm news {i}", subreddit=None, site="dailymail",
                    article=article or f"A storm hit county {i} on Tuesday.\nThousands lost power.")
        texts = (f" A storm cut power in county {i}.", " Weather happened.")
    else:
        info = dict(id=f"t3_{split}c{i}", post=f"My {t} broke down again.\nShould I fix it or get a new one?",
                    title=f"Broken {t}", subreddit="AskReddit", site=None, article=None)
        texts = (f" my {t} broke, fix or replace?", " something broke")
    choice = i % 2
    notes = (None, None) if i < 4 else ("clear", "vague")
    summaries = [dict(text=texts[0], policy="ref", note=notes[0]), dict(text=texts[1], policy="sup2", note=notes[1])]
    if choice:
        summaries = summaries[::-1]
    return dict(info=info, summaries=summaries, choice=choice, worker=f"w{i % 3}",
                batch=("cnndm0" if i % 2 else "batch0_cnndm") if cnndm else "batch7",
                split="valid1" if split == "validation" else "train",
                extra=dict(confidence=None if i < 4 else 1 + i % 9))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_raw(root):
    sft_dir, cmp_dir = root / "raw_tldr", root / "raw_comparisons"
    sft_dir.mkdir(), cmp_dir.mkdir()
    write_jsonl(sft_dir / "train.jsonl", [sft_row("train", i) for i in range(15)] + [sft_row("train", 15, LONG_POST)])
    write_jsonl(sft_dir / "validation.jsonl", [sft_row("validation", 0, LONG_POST)] + [sft_row("validation", i) for i in range(1, 4)])
    write_jsonl(sft_dir / "test.jsonl", [sft_row("test", i) for i in range(4)])
    write_jsonl(cmp_dir / "train.jsonl", [comparison_row("train", i) for i in range(16)])
    # TL;DR rows first (article and site null), then CNN/DM rows (post and subreddit null): a column of nulls that
    # turns into strings
    write_jsonl(cmp_dir / "validation.jsonl", [comparison_row("validation", i) for i in range(6)]
                + [comparison_row("validation", 6, cnndm=True, article=LONG_ARTICLE), comparison_row("validation", 7, cnndm=True)])
    return sft_dir, cmp_dir


def write_base_model(path, tokenizer_dir):
    """A random GPT-NeoX with Pythia's shape parameters (tiny widths), saved as a hub snapshot would hold it: weights,
    config and Pythia's tokenizer files."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=2048,
                           use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    GPTNeoXForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(path, name))


def run(cwd, script, *flags, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)  # a plain `python X.py`, as a user types it
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, f"{script} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout + p.stderr


def embedding_rows(path, ids):
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, "model.safetensors"))
    key = next(k for k in state if k.endswith("embed_in.weight"))
    return state[key][ids].double()


def test_paper_chain_with_default_paths(tmp_path, pythia_tokenizer_dir):
    from transformers import AutoConfig, AutoTokenizer

    base = tmp_path / "hub" / "EleutherAI" / NAME
    write_base_model(str(base), pythia_tokenizer_dir)
    sft_raw, cmp_raw = write_raw(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    model = ["--base_model", str(base)]

    # ---- data: the published schemas from local files, Pythia's tokenizer from the base model folder
    run(work, "tldr_dataset.py", "--sft_dataset", str(sft_raw), "--preference_dataset", str(cmp_raw), *model)
    meta = json.load(open(work / "data" / "tldr" / "meta.json"))
    assert meta["pad_token_id"] == PAD_ID and meta["eos_token_id"] == 0
    assert meta["counts"] == {"sft/train": 16, "sft/validation": 4, "sft/test": 4, "preference/train": 16,
                              "preference/validation": 6, "preference/validation_cnndm": 2}
    import datasets

    pref = datasets.load_from_disk(str(work / "data" / "tldr" / "preference"))
    cnn = pref["validation_cnndm"]
    assert len(cnn[0]["query_token"]) == 1919 and len(cnn[0]["query_chosen_token"]) == 2021  # Detail 6 widths
    # Detail 6: the article is cut back to a newline until the query fits its 1,919 tokens
    assert cnn[0]["query"].startswith("Article:\nParagraph 0:") and "Paragraph 119" not in cnn[0]["query"]
    assert 1800 < sum(t != PAD_ID for t in cnn[0]["query_token"]) <= 1919
    assert (cnn[0]["post"], cnn[0]["subreddit"], cnn[0]["site"]) == ("", "", "dailymail")
    assert [r["confidence"] for r in pref["train"]][:5] == [-1, -1, -1, -1, 5]  # null, then integers
    sft_data = datasets.load_from_disk(str(work / "data" / "tldr" / "sft"))
    long_query = sft_data["validation"][0]
    assert "Paragraph 59" not in long_query["query"] and 480 < sum(t != PAD_ID for t in long_query["query_token"]) <= 512

    # ---- SFT
    sft_dir = work / "models" / f"sft_{NAME}"
    run(work, "sft.py", *model, "--total_batch_size", "8", "--per_device_train_batch_size", "4",
        "--num_eval_samples", "4", "--eval_batch_size", "4")
    sft_args = json.load(open(sft_dir / "args.json"))
    assert (sft_args["dataset_path"], sft_args["output_dir"]) == ("data/tldr", f"models/sft_{NAME}")
    assert json.load(open(sft_dir / "metrics.json"))["updates"] == 2
    assert len(open(sft_dir / "eval_samples.jsonl").readlines()) == 4

    # ---- reward model: reads the SFT folder, writes models/reward_*
    rm_dir = work / "models" / f"reward_{NAME}"
    run(work, "reward.py", *model, "--total_batch_size", "8", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4")
    rm_args = json.load(open(rm_dir / "args.json"))
    assert (rm_args["sft_model_path"], rm_args["dataset_path"]) == (f"models/sft_{NAME}", "data/tldr")
    rm = json.load(open(rm_dir / "metrics.json"))
    assert rm["num_updates"] == 2 and rm["val_num_pairs"] == 6
    assert rm["val_cnndm_num_pairs"] == 2 and 0.0 <= rm["val_cnndm_accuracy"] <= 1.0  # Detail 18
    assert abs(rm["reward_mean_after_norm"]) < 1e-4  # Detail 17 on the SFT train references

    # ---- PPO: reads the SFT and RM folders and the data, writes models/ppo_*
    ppo_dir = work / "models" / f"ppo_{NAME}"
    run(work, "ppo.py", *model, "--total_episodes", "8", "--total_batch_size", "8", "--per_device_train_batch_size", "4",
        "--local_rollout_forward_batch_size", "8", "--eval_batch_size", "8")
    ppo_args = json.load(open(ppo_dir / "args.json"))
    assert ppo_args["preset"] == "paper" and ppo_args["num_updates"] == 1 and ppo_args["gradient_accumulation_steps"] == 2
    assert (ppo_args["sft_model_path"], ppo_args["reward_model_path"], ppo_args["dataset_path"], ppo_args["output_dir"]) == (
        f"models/sft_{NAME}", f"models/reward_{NAME}", "data/tldr", f"models/ppo_{NAME}")
    ppo_samples = [json.loads(line) for line in open(ppo_dir / "eval_samples.jsonl")]
    assert [s["id"] for s in ppo_samples] == [f"t3_validation{i}" for i in range(4)]
    assert json.load(open(ppo_dir / "metrics.json"))["num_updates"] == 1

    # ---- DPO: reads the SFT folder, writes models/dpo_*, validates on both validation splits
    dpo_dir = work / "models" / f"dpo_{NAME}"
    run(work, "dpo.py", *model, "--total_batch_size", "8", "--per_device_train_batch_size", "4",
        "--num_eval_samples", "4", "--eval_batch_size", "4")
    assert json.load(open(dpo_dir / "args.json"))["sft_model_path"] == f"models/sft_{NAME}"
    dpo = json.load(open(dpo_dir / "metrics.json"))
    assert dpo["updates"] == 2 and dpo["val_num_pairs"] == 6 and dpo["val_cnndm_num_pairs"] == 2
    assert 0.0 <= dpo["val_cnndm_reward_accuracy"] <= 1.0

    # ---- the judge, dry run: reads PPO's samples, counts the requests, sends none
    out = run(work, "eval_gpt_judge.py", *model, "--max_requests", "0", env={"OPENAI_API_KEY": ""})  # a dry run needs no key
    judge = json.load(open(ppo_dir / "judge" / "metrics.json"))
    assert json.load(open(ppo_dir / "judge" / "args.json"))["samples"] == f"models/ppo_{NAME}/eval_samples.jsonl"
    assert (judge["n_judgements_total"], judge["n_missing_total"], judge["n_requests"], judge["complete"]) == (4, 4, 0, 0)
    assert "4 judgements, 0 in the cache" in " ".join(out.split()) and "4 to request" in " ".join(out.split())

    # ---- the folders chain: the saved tokenizers hold [PAD] = 50277, the models keep Pythia's vocabulary rows
    for d in (work / "data" / "tldr" / "tokenizer", sft_dir, rm_dir, ppo_dir, dpo_dir):
        tok = AutoTokenizer.from_pretrained(str(d))
        assert (tok.pad_token, tok.pad_token_id, len(tok)) == ("[PAD]", PAD_ID, PAD_ID + 1), d.name
    for d in (sft_dir, ppo_dir, dpo_dir):
        assert AutoConfig.from_pretrained(str(d)).vocab_size == 50304, d.name
    # the RM and DPO started from the SFT model, not from the base: the rows of words only SFT trained on are SFT's
    ids = sorted(set(AutoTokenizer.from_pretrained(str(base)).encode(SFT_ONLY)))
    pref_ids = {t for split in ("train",) for col in ("query_chosen_token", "query_rejected_token") for r in pref[split][col] for t in r}
    assert not set(ids) & pref_ids
    base_rows, sft_rows = embedding_rows(str(base), ids), embedding_rows(str(sft_dir), ids)
    moved = (sft_rows - base_rows).abs().max().item()
    assert moved > 1e-7  # SFT trained them
    for d in (rm_dir, dpo_dir):
        assert (embedding_rows(str(d), ids) - sft_rows).abs().max().item() < moved / 100, d.name
