"""The checks that need a GPU, in one command on one GPU within ~8 minutes, ending in one table.

    bash benchmark/gpu_check.sh                            # on a GPU machine (installs carried wheels first)
    python benchmark/gpu_check.py                          # the same, where the requirements are installed
    python benchmark/gpu_check.py --device cpu --tiny --checks ratio   # the check logic on CPU (what the test runs)

Checks (each in its own process, each with a timeout, so that one failure or hang never hides the others' rows):
- ratio: ppo.py's first update at a Pythia-1B shape (random-weight GPT-NeoX, hidden 2048, 16 layers, 8 heads,
  intermediate 8192, vocab 50304, rotary_pct 0.25) under bf16 autocast with fp32 weights, built from ppo.py's own
  functions: rollout (generate, truncation, log-probabilities at the rollout forward batch), reference
  log-probabilities, advantages, then the first minibatch of the first PPO epoch at the micro-batch (a different
  matmul shape). With dropout off the ratio must be 1 up to bf16 rounding (max |ratio - 1| reported; the clipping at
  0.2 must never fire) and the KL to the identical reference exactly 0.
- stages: sft.py, reward.py, ppo.py, dpo.py for a few steps each under DeepSpeed ZeRO-2
  (`accelerate launch --config_file deepspeed_zero2.yaml --num_processes 1`) on a tiny embedded task built here
  (embedded_task.py + tldr_dataset.py); pass/fail and seconds per stage, ppo.py's first-minibatch ratio and KL.
- throughput: benchmark/throughput.py --device cuda --model_size 1b (ppo.py against TRL's PPOTrainer; TRL
  missing is reported and ppo.py is still measured).

The orchestrator uses the standard library only (no tyro, no torch), so that it runs and reports on a machine where
the project's requirements are missing: each check names the modules it lacks and is skipped.
Results: the table on stdout and {out_dir}/gpu_check.json; each check's log in {out_dir}/logs/.
"""

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = ("ratio", "stages", "throughput")

# Modules each check imports (find_spec only: nothing is imported by the orchestrator). tyro is the stage scripts'
# CLI parser only: the ratio check imports ppo.py for its functions and stands in for tyro when it is missing.
REQUIRES = {
    "ratio": ["torch", "transformers", "accelerate", "tokenizers", "rich", "numpy"],
    "stages": ["torch", "transformers", "accelerate", "tokenizers", "rich", "numpy", "tyro", "datasets", "pyarrow",
               "deepspeed", "rouge_score", "nltk"],
    "throughput": ["torch", "transformers", "accelerate", "tokenizers", "rich", "numpy", "tyro", "datasets"],
}
OPTIONAL = {"throughput": ["trl"]}
VERSIONS = ("torch", "transformers", "accelerate", "deepspeed", "datasets", "tyro", "tokenizers", "trl")

# Time caps in seconds; throughput, the last check, gets what is left of the budget (at least 160 s). Worst case
# 100 + 210 + 160 = 470 s, inside the 8 minutes with the table's margin.
BUDGET_S = 470
CAPS = {"ratio": 100, "stages": 210, "stage": 75, "prep": 45, "throughput": BUDGET_S}

# Pythia-1B (EleutherAI/pythia-1b-deduped's config.json) and the tiny CPU stand-in
SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8, intermediate_size=8192,
               vocab_size=50304, batch=64, forward_batch=64, micro_batch=16, query_length=512, response_length=53),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 vocab_size=50304, batch=8, forward_batch=8, micro_batch=4, query_length=24, response_length=12),
}
RATIO_TOL = {"bf16": 0.05, "fp32": 1e-4}  # max |ratio - 1|: bf16 rounding only, far inside the clip range 0.2
KL_TOL = 1e-6  # the reference is the same network run on the same batches: its log-probabilities are bitwise equal


# ----------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------
def missing_modules(names) -> list:
    out = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def package_versions() -> dict:
    """Installed versions of VERSIONS (the import names are the distribution names); None where not importable."""
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = None if missing_modules([name]) else metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def probe_device(python: str, device: str, timeout: float = 60) -> dict:
    """torch's view of the device, from a child process (importing torch here would tie the orchestrator to it)."""
    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'cuda': c, 'name': "
            "torch.cuda.get_device_name(0) if c else None, 'count': torch.cuda.device_count(), "
            "'cuda_version': torch.version.cuda}))")
    try:
        p = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout)
        info = json.loads(p.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - any failure is reported in the table
        return {"error": f"torch probe failed: {type(e).__name__}: {e}"}
    if device == "cuda" and not info["cuda"]:
        info["error"] = "--device cuda but torch sees no GPU"
    return info


def pythia_tokenizer_dir() -> str:
    """The vendored Pythia tokenizer, else the shared copy beside the repository; '' if neither is there."""
    for path in (os.path.join(ROOT, "tests", "data", "pythia_tokenizer"),
                 os.path.join(os.path.dirname(ROOT), "shared", "pythia-tokenizer")):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return path
    return ""


# ----------------------------------------------------------------------------------------------------------------
# Running one command with a timeout
# ----------------------------------------------------------------------------------------------------------------
def child_env(device: str) -> dict:
    # offline: a GPU machine without network must not wait on hub look-ups; no wandb; unbuffered logs
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true")
    return env


def run_command(cmd: list, timeout: float, log_path: str, env: dict) -> dict:
    """Runs cmd in its own process group (a launcher's workers die with it on timeout); output to log_path.
    Returns {status: pass|fail|timeout, seconds, rc, tail}."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            status = "pass" if rc == 0 else "fail"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, "timeout"
    seconds = time.perf_counter() - t0
    with open(log_path, errors="replace") as f:
        tail = f.read()[-2000:]
    return {"status": status, "seconds": round(seconds, 1), "rc": rc, "timeout_s": round(timeout), "log": log_path,
            "tail": tail}


# ----------------------------------------------------------------------------------------------------------------
# Check (a): the first-minibatch ratio and the KL (runs in a child: `gpu_check.py _ratio ...`)
# ----------------------------------------------------------------------------------------------------------------
def import_ppo():
    """ppo.py for its functions. Its module-level `import tyro` serves only its CLI (parse_args, not used here): a
    placeholder that raises on use stands in where tyro is not installed."""
    sys.path.insert(0, ROOT)
    stand_in = False
    if importlib.util.find_spec("tyro") is None:
        import types

        placeholder = types.ModuleType("tyro")

        def cli(*a, **k):
            raise RuntimeError("tyro is not installed (gpu_check.py imported ppo.py without it)")

        placeholder.cli = cli
        sys.modules["tyro"] = placeholder
        stand_in = True
    import ppo

    return ppo, stand_in


def ratio_check(device: str, shape_name: str, precision: str, tokenizer_dir: str, seed: int = 1) -> dict:
    import copy
    import math

    import torch
    from transformers import GenerationConfig, GPTNeoXConfig, GPTNeoXForCausalLM

    ppo, tyro_stand_in = import_ppo()
    shape = dict(SHAPES[shape_name])
    if tokenizer_dir:
        tok, tok_name = ppo.load_tokenizer(tokenizer_dir), tokenizer_dir  # ppo.py's own pad handling (Detail 3)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from throughput import make_tokenizer  # EOS id 0, [PAD] last: only the special ids and the size matter here

        tok, tok_name = make_tokenizer(50278), "word-level stand-in (Pythia tokenizer not found)"
    pad_id, eos_id = tok.pad_token_id, tok.eos_token_id
    batch, fwd_bs, micro = shape.pop("batch"), shape.pop("forward_batch"), shape.pop("micro_batch")
    q_len, r_len = shape.pop("query_length"), shape.pop("response_length")
    if len(tok) > shape["vocab_size"]:
        raise ValueError(f"{tok_name}: {len(tok)} tokens do not fit the {shape['vocab_size']} embedding rows")
    cfg = GPTNeoXConfig(**shape, rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=2048,
                        hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False,
                        bos_token_id=eos_id, eos_token_id=eos_id)
    dev = torch.device(device)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with dev:  # initialise on the device: a 1B-parameter init on the CPU alone takes longer than the whole check
        policy = GPTNeoXForCausalLM(cfg)
        with torch.no_grad():
            # EOS with ~3% probability per token so that responses end at different lengths (padding masks in play):
            # the final layer norm's output sums to 0 before its bias, so a bias 1 and an EOS row w/H give logit w
            policy.gpt_neox.final_layer_norm.bias.fill_(1.0)
            policy.get_output_embeddings().weight[eos_id] = 0.7 * (math.log(len(tok)) + math.log(0.03 / 0.97)) / cfg.hidden_size
        value = ppo.ScalarModel(ppo.ScalarModelConfig(base_config=cfg.to_dict(), hidden_size=cfg.hidden_size,
                                                      base_model="random"))
        value.trunk.load_state_dict(policy.gpt_neox.state_dict())
        torch.nn.init.normal_(value.scalar_head.weight, std=1 / math.sqrt(cfg.hidden_size + 1))  # Detail 14
        torch.nn.init.zeros_(value.scalar_head.bias)
    policy.generation_config.eos_token_id = None  # Detail 20, as ppo.load_policy
    ppo.disable_dropout(policy)
    ppo.disable_dropout(value)
    ref_policy = copy.deepcopy(policy).eval().requires_grad_(False)
    reward_model = copy.deepcopy(value).eval().requires_grad_(False)
    model = ppo.PolicyAndValue(policy, value)
    build_s = time.perf_counter() - t0

    # queries: random ids of random lengths (45-90% of query_length), left-padded as tldr_dataset.py writes them
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(int(0.45 * q_len), int(0.9 * q_len) + 1, (batch,), generator=gen)
    queries = torch.full((batch, q_len), pad_id, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        # ids 2..50252: never EOS (0), Pythia's <|padding|> (1), [PAD] or the whitespace-run tokens
        queries[i, q_len - n:] = torch.randint(2, min(len(tok), 50254) - 1, (n,), generator=gen)
    queries = ppo.trim_left_padding(queries, pad_id).to(dev)
    context = queries.size(1)
    temperature = 0.7
    gen_cfg = GenerationConfig(max_new_tokens=r_len, temperature=temperature, top_k=0, top_p=1.0, do_sample=True,
                               eos_token_id=None, pad_token_id=pad_id)
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16" else \
        (lambda: torch.autocast(dev.type, enabled=False))  # what accelerate's bf16 mixed precision enters
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    # ---- rollout, as ppo.main: generation, then log-probabilities and values at the rollout forward batch ----
    t0 = time.perf_counter()
    model.train()  # as ppo.main: the trained pair stays in train mode during the rollout (no grad, dropout off)
    with torch.no_grad(), autocast():
        qr = torch.cat([ppo.generate(policy, queries[i:i + fwd_bs], pad_id, gen_cfg) for i in range(0, batch, fwd_bs)])
    responses = ppo.truncate_response(qr[:, context:], eos_id, pad_id)  # Detail 21
    qr = torch.cat([queries, responses], 1)
    logprobs, ref_logprobs, values, scores = [], [], [], []
    with torch.no_grad(), autocast():
        for i in range(0, batch, fwd_bs):
            logits, v = model(qr[i:i + fwd_bs], pad_id, context)
            logprobs.append(ppo.logprobs_from_logits(logits, responses[i:i + fwd_bs], temperature))
            ref_logits = ppo.policy_response_logits(ref_policy, qr[i:i + fwd_bs], pad_id, context)
            ref_logprobs.append(ppo.logprobs_from_logits(ref_logits, responses[i:i + fwd_bs], temperature))
            values.append(v.float())
            scores.append(ppo.reward_scores(reward_model, qr[i:i + fwd_bs], pad_id, context).float())
    logprobs, ref_logprobs, values, scores = map(torch.cat, (logprobs, ref_logprobs, values, scores))
    contain_eos = (responses == eos_id).any(1)
    seq_lens = ppo.first_true_indices(responses == pad_id) - 1
    pm, pm1 = ppo.padding_masks(seq_lens, r_len)
    scores = ppo.apply_missing_eos_penalty(scores, contain_eos, "replace", -1.0)
    logprobs, ref_logprobs = logprobs.masked_fill(pm, ppo.INVALID_LOGPROB), ref_logprobs.masked_fill(pm, ppo.INVALID_LOGPROB)
    values = values.masked_fill(pm1, 0.0)
    rewards, kl, _ = ppo.per_token_rewards(logprobs, ref_logprobs, scores, seq_lens, 0.05, "after_eos")
    advantages, returns = ppo.compute_advantages(rewards, values, pm, 1.0, 0.95)
    sync()
    rollout_s = time.perf_counter() - t0

    # ---- the first minibatch of the first PPO epoch (one minibatch = the whole batch, as the paper's preset) ----
    t0 = time.perf_counter()
    ratio_dev, clipfrac, approxkl, grads_finite = 0.0, 0.0, 0.0, True
    perm = torch.randperm(batch, generator=gen).to(dev)
    for start in range(0, batch, micro):
        inds = perm[start:start + micro]
        with autocast():
            logits, new_values = model(qr[inds], pad_id, context)
            new_logprobs = ppo.logprobs_from_logits(logits, responses[inds], temperature).masked_fill(pm[inds], ppo.INVALID_LOGPROB)
            new_values = new_values.float().masked_fill(pm1[inds], 0.0)
            loss, stats = ppo.ppo_losses(new_logprobs, logprobs[inds], advantages[inds], new_values, values[inds],
                                         returns[inds], pm[inds], pm1[inds], 0.2, 0.2, 0.1)
        loss.backward()  # accumulation: no optimizer step within the first minibatch, the weights stay the same
        ratio_dev = max(ratio_dev, float(stats["val/ratio_max"]) - 1.0, 1.0 - float(stats["val/ratio_min"]))
        clipfrac = max(clipfrac, float(stats["policy/clipfrac"]))
        approxkl = max(approxkl, float(stats["policy/approxkl"]))
    grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    sync()
    minibatch_s = time.perf_counter() - t0

    kl_seq, cfg_dict = kl.sum(1), cfg.to_dict()
    result = {
        "device": str(dev), "shape": shape_name, "precision": precision, "tokenizer": tok_name,
        "tyro_stand_in": tyro_stand_in, "params_per_model": sum(p.numel() for p in policy.parameters()),
        "model": {**{k: cfg_dict[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "intermediate_size", "vocab_size")},
                  # transformers 5 keeps rotary_pct as rope_parameters.partial_rotary_factor
                  "rotary_pct": cfg_dict.get("rotary_pct", (cfg_dict.get("rope_parameters") or {}).get("partial_rotary_factor"))},
        "batch": batch, "rollout_forward_batch": fwd_bs, "micro_batch": micro, "context_length": context,
        "response_length": r_len, "mean_response_tokens": float((seq_lens + 1).float().mean()),
        "eos_rate": float(contain_eos.float().mean()),
        "max_abs_ratio_minus_1": ratio_dev, "first_minibatch_clipfrac": clipfrac, "first_minibatch_approxkl": approxkl,
        "kl_mean": float(kl_seq.mean()), "kl_max_abs_token": float(kl.abs().max()),
        "loss_finite": bool(torch.isfinite(loss.detach())), "grads_finite": grads_finite,
        "phase_seconds": {"build": round(build_s, 2), "rollout": round(rollout_s, 2), "first_minibatch": round(minibatch_s, 2)},
    }
    if dev.type == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    tol = RATIO_TOL[precision]
    problems = [msg for bad, msg in (
        (ratio_dev > tol, f"max |ratio - 1| {ratio_dev:.3g} > {tol}"),
        (clipfrac > 0, f"the clipping fired on the first minibatch (clipfrac {clipfrac:.3g})"),
        (result["kl_max_abs_token"] > KL_TOL, f"KL to the identical reference is not 0 (max |kl| {result['kl_max_abs_token']:.3g})"),
        (not (result["loss_finite"] and grads_finite), "non-finite loss or gradients")) if bad]
    result["ok"], result["problems"] = not problems, problems
    return result


# ----------------------------------------------------------------------------------------------------------------
# Check (b): each stage under DeepSpeed ZeRO-2. Every stage flag this check relies on is in stage_commands below.
# ----------------------------------------------------------------------------------------------------------------
def prep_commands(py: str, work: str) -> list:
    """A tiny embedded task (a base-s model after 2 pretraining steps) and its data sets."""
    task = os.path.join(work, "task")
    return [
        ("task", [py, "embedded_task.py", "--out_dir", task, "--seed", "1", "--sizes", "s", "--n_sft_train", "64",
                  "--n_sft_val", "32", "--n_sft_test", "32", "--n_cmp_train", "64", "--n_cmp_val", "32",
                  "--n_pretrain_posts", "64", "--vocab_size", "500", "--pretrain_steps", "2"]),
        ("data", [py, "tldr_dataset.py", "--source", "embedded", "--task_dir", task,
                  "--output_dir", os.path.join(work, "dataset")]),
    ]


def stage_commands(work: str) -> dict:
    """{stage: (script, argv)}: a few optimizer steps each on the tiny task (~41 SFT rows, 48 pairs)."""
    task, data = os.path.join(work, "task"), os.path.join(work, "dataset")
    sft, rm = os.path.join(work, "sft"), os.path.join(work, "rm")
    common = ["--preset", "embedded", "--seed", "1", "--gold_task_dir", task, "--dataset_path", data]
    return {
        "sft": ("sft.py", [*common, "--base_model", os.path.join(task, "base-s"), "--output_dir", sft,
                           "--num_train_epochs", "1", "--total_batch_size", "16", "--per_device_train_batch_size", "8",
                           "--eval_every", "0", "--max_val_batches", "1", "--num_eval_samples", "8",
                           "--eval_batch_size", "8", "--save_every", "0", "--no-eval-base"]),
        "rm": ("reward.py", [*common, "--sft_model_path", sft, "--output_dir", rm, "--total_batch_size", "8",
                             "--per_device_train_batch_size", "8", "--num_train_pairs", "32", "--num_val_pairs", "16",
                             "--norm_num_samples", "16", "--norm_recompute_samples", "8", "--num_gold_samples", "8"]),
        # two updates with a checkpoint after the first: the ZeRO-2 save_state path too
        "ppo": ("ppo.py", [*common, "--sft_model_path", sft, "--reward_model_path", rm,
                           "--output_dir", os.path.join(work, "ppo"), "--total_episodes", "32", "--total_batch_size", "16",
                           "--per_device_train_batch_size", "8", "--num_mini_batches", "2",
                           "--local_rollout_forward_batch_size", "16", "--eval_every", "0", "--no-eval-at-start",
                           "--num_eval_samples", "8", "--eval_batch_size", "8", "--save_every", "1"]),
        "dpo": ("dpo.py", [*common, "--sft_model_path", sft, "--output_dir", os.path.join(work, "dpo"),
                           "--num_train_pairs", "32", "--total_batch_size", "16", "--per_device_train_batch_size", "8",
                           "--num_val_pairs", "16", "--per_device_eval_batch_size", "16", "--num_eval_samples", "8",
                           "--eval_batch_size", "8", "--no-eval-reference"]),
    }


STAGE_NEEDS = {"sft": (), "rm": ("sft",), "ppo": ("sft", "rm"), "dpo": ("sft",)}


def launcher(py: str, launch: str) -> list:
    if launch == "deepspeed":  # Detail 30's launch, on one process
        return [py, "-m", "accelerate.commands.launch", "--config_file", os.path.join(ROOT, "deepspeed_zero2.yaml"),
                "--num_processes", "1"]
    return [py]


def stages_check(py: str, work: str, launch: str, deadline: float, log_dir: str, env: dict) -> dict:
    rows = {}
    for name, cmd in prep_commands(py, work):
        left = deadline - time.time()
        r = run_command(cmd, min(CAPS["prep"], left), os.path.join(log_dir, f"prep_{name}.log"), env)
        rows[f"prep:{name}"] = r
        if r["status"] != "pass":
            return rows
    for name, (script, argv) in stage_commands(work).items():
        left = deadline - time.time()
        failed = [n for n in STAGE_NEEDS[name] if rows[n]["status"] != "pass"]
        if failed:
            rows[name] = {"status": "skipped", "note": f"needs the output of {', '.join(failed)}"}
            continue
        if left < 10:
            rows[name] = {"status": "skipped", "note": "out of the stages' time budget"}
            continue
        out_dir = argv[argv.index("--output_dir") + 1]
        r = run_command([*launcher(py, launch), script, *argv], min(CAPS["stage"], left),
                        os.path.join(log_dir, f"stage_{name}.log"), env)
        if r["status"] == "pass" and not os.path.isfile(os.path.join(out_dir, "metrics.json")):
            r.update(status="fail", note="exit 0 but no metrics.json")
        if name == "ppo" and os.path.isfile(os.path.join(out_dir, "metrics.jsonl")):
            first = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))
                     if "debug/first_minibatch_ratio_dev" in line]
            if first:
                r["first_minibatch_ratio_dev"] = first[0]["debug/first_minibatch_ratio_dev"]
                r["first_update_kl"] = first[0]["objective/kl"]
        rows[name] = r
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Check (c): throughput against TRL
# ----------------------------------------------------------------------------------------------------------------
def throughput_command(py: str, device: str, tiny: bool, out_dir: str) -> list:
    size = ["--model_size", "tiny", "--query_length", "16", "--response_length", "8", "--batch_size", "8",
            "--per_device_train_batch_size", "2", "--local_rollout_forward_batch_size", "4",
            "--matmul_size", "256"] if tiny else ["--model_size", "1b"]
    # 2 updates, 1 warm-up + 1 timed per side: both sides (4 models of 1B each, loaded from disk) fit the budget
    return [py, os.path.join("benchmark", "throughput.py"), "--device", device, *size, "--num_updates", "2",
            "--output_dir", out_dir]


def summarize_throughput(out_dir: str) -> dict:
    path = os.path.join(out_dir, "throughput.json")
    if not os.path.isfile(path):
        return {}
    s = json.load(open(path))
    res, out = s["results"], {}
    p, t = res.get("ppo"), res.get("trl")
    if p:
        out["ppo_episodes_per_second"] = p["episodes_per_second"]
        out["ppo_fraction_of_matmul_peak"] = p.get("fraction_of_matmul_peak")
        run = p["runs"][0]
        out["ppo_first_minibatch_ratio_dev"] = run.get("first_minibatch_ratio_dev")
        out["ppo_first_update_kl"] = run.get("first_update_kl")
        out["ppo_peak_gpu_memory_mb"] = p.get("peak_gpu_memory_mb")
    if t and "missing" in t:
        out["trl"] = f"TRL missing ({t['missing']}): pip install -r requirements-trl.txt"
    elif t:
        out["trl_episodes_per_second"] = t["episodes_per_second"]
        out["speedup_ppo_over_trl"] = s.get("speedup_ppo_over_trl")
    return out


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------
def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}"
    return str(v)


def failure_text(r: dict) -> str:
    last = [line for line in r.get("tail", "").strip().splitlines() if line.strip()]
    why = r.get("note") or (last[-1][-160:] if last else "")
    return f"{r['status']}{' after ' + str(r['timeout_s']) + ' s' if r['status'] == 'timeout' else ''}: {why} " \
           f"(log: {r.get('log', '-')})"


def result_text(name: str, r: dict) -> str:
    """The table's result column: the figures a check produced, then why it failed, if it did."""
    if r["status"] == "skipped":
        return r.get("note", "")
    parts = []
    if name == "ratio" and "max_abs_ratio_minus_1" in r:
        parts.append(f"max|ratio-1| {fmt(r['max_abs_ratio_minus_1'])}, clipfrac {fmt(r['first_minibatch_clipfrac'])}, "
                     f"KL {fmt(r['kl_mean'])} (max |token kl| {fmt(r['kl_max_abs_token'])}); {r['precision']}, "
                     f"H{r['model']['hidden_size']} x {r['model']['num_hidden_layers']}L, batch {r['batch']} "
                     f"(micro {r['micro_batch']}), {r['mean_response_tokens']:.1f} response tokens")
        parts += r["problems"]
    if name == "throughput":
        if "ppo_episodes_per_second" in r:
            parts.append(f"ppo.py {fmt(r['ppo_episodes_per_second'])} episodes/s")
            if r.get("ppo_fraction_of_matmul_peak") is not None:
                parts.append(f"{100 * r['ppo_fraction_of_matmul_peak']:.1f}% of matmul peak")
            if r.get("ppo_first_minibatch_ratio_dev") is not None:
                parts.append(f"max|ratio-1| {fmt(r['ppo_first_minibatch_ratio_dev'])}, "
                             f"KL at update 1 {fmt(r['ppo_first_update_kl'])}")
        if "trl_episodes_per_second" in r:
            parts.append(f"TRL {fmt(r['trl_episodes_per_second'])} episodes/s, ppo.py/TRL "
                         f"{fmt(r['speedup_ppo_over_trl'])}x")
        if "trl" in r:
            parts.append(r["trl"])
    if "first_minibatch_ratio_dev" in r:
        parts.append(f"max|ratio-1| {fmt(r['first_minibatch_ratio_dev'])}, KL at update 1 {fmt(r['first_update_kl'])}")
    if r["status"] in ("fail", "timeout") and not (name == "ratio" and r.get("problems")):
        parts.append(failure_text(r))
    return "; ".join(parts)


def table_rows(summary: dict) -> list:
    rows = []
    for name in CHECKS:
        r = summary["checks"].get(name)
        if r is None:
            continue
        if name == "stages" and "stages" in r:
            for stage, sr in r["stages"].items():
                rows.append((f"stages/{stage}", sr["status"], sr.get("seconds"), result_text(stage, sr)))
            if not r["stages"]:
                rows.append(("stages", r["status"], r.get("seconds"), r.get("note", "")))
        else:
            rows.append((name, r["status"], r.get("seconds"), result_text(name, r)))
    return rows


def print_table(summary: dict) -> None:
    env = summary["environment"]
    dev = env.get("device_info", {})
    print(f"\n== GPU check: {summary['device']}"
          f" ({dev.get('name') or dev.get('error') or 'no GPU'}), python {env['python']}, "
          + ", ".join(f"{k} {v or 'MISSING'}" for k, v in env["versions"].items())
          + f"; {summary['total_seconds']:.0f} s of a {summary['budget_s']} s budget")
    rows = table_rows(summary)
    w = max([len(r[0]) for r in rows] + [5])
    print(f"{'check':<{w}}  {'status':<8}{'seconds':>8}  result")
    for name, status, secs, text in rows:
        print(f"{name:<{w}}  {status:<8}{'-' if secs is None else f'{secs:.1f}':>8}  {text}")
    missing = sorted({m for r in summary["checks"].values() for m in r.get("missing", [])})
    if missing:
        print(f"missing modules: {', '.join(missing)}. Install requirements.txt, or on a machine without network "
              "carry wheels made by benchmark/gpu_wheels.sh and run benchmark/gpu_check.sh --wheels DIR")
    print(f"(details: {summary['json']})")


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    # argparse, not tyro: this script must run and report where the project's requirements are not installed
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU test); default: Pythia-1B")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast of the ratio check")
    p.add_argument("--launcher", choices=("deepspeed", "python"), default="deepspeed",
                   help="stages: accelerate launch with deepspeed_zero2.yaml, or plain python (no DeepSpeed)")
    p.add_argument("--tokenizer", default=None, help="tokenizer of the ratio check (default: the vendored Pythia one)")
    p.add_argument("--budget_s", type=float, default=BUDGET_S, help="wall-clock budget of all checks")
    p.add_argument("--out_dir", default="runs/gpu_check")
    p.add_argument("--python", default=sys.executable, help="interpreter of the checks")
    args = p.parse_args(argv)
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown or not checks:
        p.error(f"--checks: unknown {unknown}; choose from {','.join(CHECKS)}")
    args.checks = checks
    return args


def main(args) -> dict:
    start = time.time()
    deadline = start + args.budget_s
    out_dir = os.path.abspath(args.out_dir)
    log_dir = os.path.join(out_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    env = child_env(args.device)
    summary = {"device": args.device, "tiny": args.tiny, "budget_s": args.budget_s, "checks": {},
               "json": os.path.join(out_dir, "gpu_check.json"),
               "environment": {"python": platform.python_version(), "executable": args.python,
                               "versions": package_versions()}}
    try:
        info = probe_device(args.python, args.device) if not missing_modules(["torch"]) else {"error": "torch missing"}
        summary["environment"]["device_info"] = info
        for name in args.checks:
            missing = missing_modules(REQUIRES[name])
            left = deadline - time.time()
            if missing:
                summary["checks"][name] = {"status": "skipped", "missing": missing,
                                           "note": f"missing modules: {', '.join(missing)}"}
                continue
            if "error" in info:
                summary["checks"][name] = {"status": "skipped", "note": info["error"]}
                continue
            if left < 10:
                summary["checks"][name] = {"status": "skipped", "note": "out of the time budget"}
                continue
            if name == "ratio":
                result_path = os.path.join(out_dir, "ratio.json")
                if os.path.exists(result_path):
                    os.remove(result_path)
                tok = pythia_tokenizer_dir() if args.tokenizer is None else args.tokenizer
                cmd = [args.python, os.path.abspath(__file__), "_ratio", "--device", args.device, "--precision",
                       args.precision, "--tokenizer", tok, "--out", result_path] + (["--tiny"] if args.tiny else [])
                r = run_command(cmd, min(CAPS["ratio"], left), os.path.join(log_dir, "ratio.log"), env)
                if os.path.isfile(result_path):
                    r.update(json.load(open(result_path)))
                    if r["status"] == "pass" and not r["ok"]:
                        r["status"] = "fail"
            elif name == "stages":
                t0 = time.time()
                stages = stages_check(args.python, os.path.join(out_dir, "stages_work"), args.launcher,
                                      min(deadline, t0 + CAPS["stages"]), log_dir, env)
                ok = stages and all(s["status"] == "pass" for s in stages.values()) and "dpo" in stages
                r = {"status": "pass" if ok else "fail", "seconds": round(time.time() - t0, 1), "stages": stages}
            else:
                tp_dir = os.path.join(out_dir, "throughput")
                r = run_command(throughput_command(args.python, args.device, args.tiny, tp_dir),
                                min(CAPS["throughput"], left), os.path.join(log_dir, "throughput.log"), env)
                r.update(summarize_throughput(tp_dir))
                r["missing_optional"] = missing_modules(OPTIONAL["throughput"])
            summary["checks"][name] = r
    finally:  # the table, whatever happened above
        summary["total_seconds"] = time.time() - start
        with open(summary["json"], "w") as f:
            json.dump(summary, f, indent=1)
        print_table(summary)
    return summary


def ratio_main(argv) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--tokenizer", default="")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    result = ratio_check(a.device, "tiny" if a.tiny else "1b", a.precision, a.tokenizer)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_ratio":
        ratio_main(sys.argv[2:])
    else:
        summary = main(parse_args())
        sys.exit(0 if all(r["status"] == "pass" for r in summary["checks"].values()) else 1)
