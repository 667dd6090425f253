"""Detail 30 on a CPU: every training stage under `accelerate launch --config_file deepspeed_zero2.yaml
--num_processes 2` (DeepSpeed's CPU accelerator, gloo), with the batch arithmetic DeepSpeed checks, checkpoint and
resume, and the saved model; ppo.py with its ZeRO-3 CPU-offloaded reference and reward engines (--offload).

The runs go through tests/ds_launch.py, which turns off DeepSpeed's shared-memory CPU all-reduce kernel (compiled
from C++ on first use, 1-2 minutes); gloo carries the collectives instead. bf16 is off (--mixed_precision no): the
DeepSpeed bf16 engines, NCCL and real GPU memory are exercised only on GPUs (benchmark/gpu_check.sh)."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from test_dpo import tiny_run_inputs, tok  # noqa: F401  (fixtures: a tiny real-path data set and model)
from test_ppo import RESP_LEN, ppo_cmd, read_jsonl, task  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ds_launcher():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(ROOT, "deepspeed_zero2.yaml"),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port),
            os.path.join(ROOT, "tests", "ds_launch.py")]


def run(cmd, expect_rc=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    env.pop("ACCELERATE_USE_CPU", None)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == expect_rc, f"rc {p.returncode}\nSTDOUT\n{p.stdout[-3000:]}\nSTDERR\n{p.stderr[-4000:]}"
    return p


def stage_cmd(script, data, model_flag, model_dir, out, *extra):
    return ds_launcher() + [os.path.join(ROOT, script), "--preset", "embedded", model_flag, str(model_dir),
                            "--dataset_path", str(data), "--output_dir", str(out), "--gold_task_dir", "None",
                            "--total_batch_size", "8", "--per_device_train_batch_size", "2", "--lr", "3e-3", *extra]


def deepspeed_checkpoint(path):
    # accelerate's save_state under DeepSpeed: the engine's own checkpoint (model states + per-rank ZeRO partitions)
    files = set(os.listdir(os.path.join(path, "pytorch_model")))
    return "mp_rank_00_model_states.pt" in files and {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= files


def test_sft_dpo_zero2_two_processes_checkpoint_and_save(tiny_run_inputs, tmp_path):
    """SFT then DPO under ZeRO-2 on 2 processes: 8 = micro 2 x accumulation 2 x 2 processes (the arithmetic
    DeepSpeed rejected before), a DeepSpeed checkpoint mid-run, a saved model that loads and moved; DPO's first
    loss is log 2 (Detail 32: the reference engine computes what the policy computes)."""
    import dpo

    data, model_dir = tiny_run_inputs
    sft_out, dpo_out = tmp_path / "sft", tmp_path / "dpo"
    common = ("--num_eval_samples", "4", "--eval_batch_size", "4", "--response_length", "4", "--eval_every", "0")
    run(stage_cmd("sft.py", data, "--base_model", model_dir, sft_out, *common, "--save_every", "4", "--max_val_batches",
                  "1", "--no-eval-base"))
    m = json.load(open(sft_out / "metrics.json"))
    assert m["updates"] == 8 and math.isfinite(m["train_loss"]) and math.isfinite(m["val_loss"])
    assert deepspeed_checkpoint(sft_out / "checkpoint")
    run(stage_cmd("dpo.py", data, "--sft_model_path", sft_out, dpo_out, *common, "--save_every", "4",
                  "--num_val_pairs", "8", "--per_device_eval_batch_size", "8"))
    m = json.load(open(dpo_out / "metrics.json"))
    assert m["updates"] == 8 and m["initial_train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert deepspeed_checkpoint(dpo_out / "checkpoint")
    tokenizer = dpo.load_tokenizer(str(dpo_out))
    new, old = dpo.load_policy(str(dpo_out), tokenizer), dpo.load_policy(str(sft_out), tokenizer)
    assert not torch.equal(new.get_input_embeddings().weight, old.get_input_embeddings().weight)


def test_reward_zero2_two_processes_saves_normalised_model(tiny_run_inputs, tmp_path):
    """The reward model under ZeRO-2 on 2 processes (accelerate used to report 1 process): trained, normalised
    (Detail 17) and saved; the saved head carries the shift."""
    import reward

    data, model_dir = tiny_run_inputs
    out = tmp_path / "rm"
    run(stage_cmd("reward.py", data, "--sft_model_path", model_dir, out, "--norm_num_samples", "16",
                  "--norm_recompute_samples", "16", "--num_val_pairs", "8", "--per_device_eval_batch_size", "8"))
    m = json.load(open(out / "metrics.json"))
    assert m["world_size"] == 2 and m["gradient_accumulation_steps"] == 2 and m["num_updates"] >= 1
    assert abs(m["reward_mean_after_norm"]) < 1e-3
    saved = reward.ScalarModel.from_pretrained(str(out))
    assert saved.scalar_head.bias.item() == pytest.approx(m["head_bias"], abs=1e-6)


def test_ppo_zero2_offloaded_zero3_engines_resume_and_save(task, tmp_path):
    """ppo.py under ZeRO-2 (policy + value) with ZeRO-3 CPU-offloaded reference and reward engines (--offload) on
    2 processes: killed after the checkpoint of update 2, resumed from DeepSpeed's checkpoint, the final policy saved."""
    import ppo

    out = tmp_path / "ppo"
    cmd = ppo_cmd(task, out, "--offload", "--eval_every", "0", "--save-model", launcher=ds_launcher())
    run(cmd + ["--debug_stop_after_update", "2"], expect_rc=1)  # rank 0 exits 17: the launcher reports a failure
    ckpt = ppo.latest_checkpoint(str(out))
    assert ckpt.endswith("update_000002") and deepspeed_checkpoint(ckpt)
    run(cmd + ["--resume"])
    recs = read_jsonl(out / "metrics.jsonl")
    assert [r["update"] for r in recs] == [1, 2, 3, 4]
    args = json.load(open(out / "args.json"))
    # 16 = 2 processes x micro 4 x 2 minibatches x accumulation 1; ZeRO-2 training engine, ZeRO-3 inference engines
    assert args["num_processes"] == 2 and args["gradient_accumulation_steps"] == 1
    assert args["zero_stages"] == [2, 3, 3]
    # the reference engine computes what the policy computes: KL 0 and ratio 1 at the first update (Detail 19/28)
    assert recs[0]["objective/kl"] == 0.0 and recs[0]["debug/first_minibatch_ratio_dev"] == 0.0
    # the resumed run continued from the trained weights (not the SFT ones: KL 0) and the restored schedule
    assert recs[2]["objective/kl"] != 0.0
    assert [round(r["lr"], 12) for r in recs] == [round(1e-3 * (1 - u / 4), 12) for u in range(4)]
    tokenizer = ppo.load_tokenizer(str(out))
    new, old = ppo.load_policy(str(out), tokenizer), ppo.load_policy(task[0], tokenizer)
    assert not torch.equal(new.get_input_embeddings().weight, old.get_input_embeddings().weight)
