"""Smoke tests of benchmark/throughput.py (ppo.py vs TRL's PPOTrainer) at a tiny setting.

TRL is optional (requirements-trl.txt): without it the benchmark still runs its ppo.py half and says that TRL is
missing; these tests check whichever case the environment is in and skip nothing.
"""

import importlib.util
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmark"))

import throughput  # noqa: E402

TINY = ["--model_size", "tiny", "--num_updates", "2", "--query_length", "16", "--response_length", "8",
        "--batch_size", "8", "--per_device_train_batch_size", "2", "--local_rollout_forward_batch_size", "4",
        "--matmul_size", "256"]


def trl_available() -> bool:
    try:
        return importlib.util.find_spec("trl") is not None and importlib.util.find_spec("trl.experimental.ppo") is not None
    except ImportError:
        return False


def run_bench(out_dir, *extra, env=None):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "throughput.py"), *TINY, "--output_dir",
                        str(out_dir), *extra], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout, json.load(open(os.path.join(out_dir, "throughput.json")))


def test_flop_count_matches_torch_flop_counter():
    """The analytic FLOPs of one forward (matmuls + attention + LM head) equal torch's FlopCounterMode count."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    cfg._attn_implementation = "eager"  # attention as two batched matmuls, which the counter sees (not the CPU
    model = GPTNeoXForCausalLM(cfg).eval()  # flash kernel); both compute the full masked score matrix
    ids = torch.randint(0, 96, (3, 20))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool))
    d = cfg.to_dict()
    assert counter.get_total_flops() == throughput.forward_flops(d, 3, 20, head_positions=20, causal=False)
    # causal counts half the score matrix (+ diagonal); one cached step sees past + 1 keys either way
    full, causal = (throughput.forward_flops(d, 1, 20, causal=c) for c in (False, True))
    assert full - causal == 2 * 4 * 32 * (20 * 20 - 20 * 21 / 2)
    assert throughput.forward_flops(d, 1, 1, past=5) == throughput.forward_flops(d, 1, 1, past=5, causal=False)
    phases = throughput.ppo_update_flops(d, batch=2, context=10, response=4, epochs=3)
    assert phases["training"] == 3 * 3 * (throughput.forward_flops(d, 2, 14, head_positions=4)
                                           + throughput.forward_flops(d, 2, 14))


def test_benchmark_runs_ppo_half_and_reports_missing_trl(tmp_path):
    """With `import trl` failing (as in CI, where TRL is not installed), ppo.py is still measured and the report
    says that TRL is missing."""
    fake = tmp_path / "no_trl"
    (fake / "trl").mkdir(parents=True)
    (fake / "trl" / "__init__.py").write_text("raise ImportError('trl hidden by the test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    out, summary = run_bench(tmp_path / "out", env=env)
    assert "TRL is missing" in out and "requirements-trl.txt" in out
    assert "missing" in summary["results"]["trl"] and "speedup_ppo_over_trl" not in summary
    ppo_res = summary["results"]["ppo"]
    assert ppo_res["episodes_per_second"] > 0 and len(ppo_res["runs"]) == 1
    run = ppo_res["runs"][0]
    assert run["timed_updates"] == 1 and len(run["per_update"]) == 2
    assert all(v > 0 for u in run["per_update"] for v in u.values())
    assert len(run["contexts"]) == 2 and all(8 <= c <= 16 for c in run["contexts"])  # trimmed to the batch's longest
    # fp32 on CPU: the first minibatch recomputes the rollout's log-probabilities exactly (ratio 1), and the policy
    # has not moved from the reference yet (KL 0) when update 1's rollout runs
    assert run["first_minibatch_ratio_dev"] < 1e-5 and run["first_update_kl"] == 0.0
    assert 0 < ppo_res["fraction_of_matmul_peak"] < 1.5 and ppo_res["peak_rss_mb"] > ppo_res["base_rss_mb"] > 0
    assert "ppo.py" in out and "of the measured float32 matmul peak" in out


def test_benchmark_trl_half(tmp_path):
    """TRL's half on the same tiny task when TRL 0.29.x is installed; otherwise the clear 'TRL is missing'."""
    out, summary = run_bench(tmp_path / "out", "--sides", "trl")
    res = summary["results"]["trl"]
    if trl_available():
        run = res["runs"][0]
        assert res["episodes_per_second"] > 0 and run["trl_version"].startswith("0.29")
        assert len(run["per_update"]) == 2 and all(v > 0 for u in run["per_update"] for v in u.values())
        assert "TRL PPOTrainer" in out
    else:
        assert "missing" in res and "TRL is missing" in out
