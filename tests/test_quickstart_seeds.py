"""benchmark/quickstart_seeds.py on fake finished runs: mean ± std over seeds, per-seed paired CIs, README block."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmark"))

import quickstart_seeds as qs  # noqa: E402


def fake_runs(root, lows):
    for seed, low in zip((1, 2, 3), lows):
        d = root / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({
            "sft_gold_win_rate": 0.1 * seed, "ppo_gold_win_rate": 0.2 * seed, "judge_diff_win_rate": 0.1 * seed,
            "judge_diff_win_rate_ci_low": low, "judge_diff_win_rate_ci_high": low + 0.1, "wall_seconds": 600 + seed,
            **({"rm_gold_agreement": 0.75} if seed == 1 else {})}))
        if seed == 2:  # the rater round's validation pairs: their labels' agreement with the gold judge
            (d / "feedback").mkdir()
            (d / "feedback" / "feedback.json").write_text(json.dumps({"validation": {"label_agreement": 0.66}}))


def test_summary_json_and_readme_block(tmp_path):
    fake_runs(tmp_path / "runs", lows=(0.01, 0.02, 0.03))
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n\nintro\n\n{qs.START}\nSTALE\n{qs.END}\n\nafter\n")
    out = qs.main(qs.Args(out_root=str(tmp_path / "runs"), run=False, json_out=str(tmp_path / "r.json"),
                          readme=str(readme)))
    js = json.loads((tmp_path / "r.json").read_text())
    assert js == out and js["seeds"] == [1, 2, 3]
    assert js["mean"]["ppo_gold_win_rate"] == pytest.approx(0.4)
    assert js["std"]["sft_gold_win_rate"] == pytest.approx(0.1 * (2 / 3) ** 0.5)  # population std over seeds
    assert js["mean"]["ppo_final_kl"] is None  # absent from every summary
    assert js["per_seed"]["2"]["ppo_minus_sft_ci"] == pytest.approx([0.02, 0.12])
    assert js["per_seed"]["1"]["rm_gold_agreement"] == 0.75 and "rm_gold_agreement" not in js["per_seed"]["2"]
    assert js["per_seed"]["2"]["rm_val_label_agreement"] == 0.66 and "rm_val_label_agreement" not in js["per_seed"]["1"]
    assert js["every_seed_ci_above_zero"] is True
    text = readme.read_text()
    assert "STALE" not in text and text.startswith("# T\n\nintro") and text.rstrip().endswith("after")
    row = next(ln for ln in text.splitlines() if ln.startswith("| PPO win rate"))
    assert "0.400 ± 0.163" in row and row.endswith("| 0.200 | 0.400 | 0.600 |")
    assert "+0.020 to +0.120" in text and "602" in text


def test_length_bins_pooled_over_seeds(tmp_path):
    """Detail 34 over seeds: each seed's judge bins (PPO by its own lengths, SFT by its own) pooled on common edges."""
    fake_runs(tmp_path / "runs", lows=(0.01, 0.02, 0.03))
    for seed in (1, 2):
        d = tmp_path / "runs" / f"seed{seed}" / "judge"
        d.mkdir()
        # PPO: 10 summaries in a bin [10, 20] (win rate 0.5 and 0.3) and, in seed 2, 10 in [30, 40] (0.9);
        # SFT (compare_): 10 in [10, 20] (0.2 and 0.4)
        m = {"len_bin0_lo": 10, "len_bin0_hi": 20, "len_bin0_n": 10, "len_bin0_win_rate": 0.5 if seed == 1 else 0.3,
             "compare_len_bin0_lo": 10, "compare_len_bin0_hi": 20, "compare_len_bin0_n": 10,
             "compare_len_bin0_win_rate": 0.2 if seed == 1 else 0.4}
        if seed == 2:
            m.update(len_bin1_lo=30, len_bin1_hi=40, len_bin1_n=10, len_bin1_win_rate=0.9)
        (d / "metrics.json").write_text(json.dumps(m))
    out = qs.main(qs.Args(out_root=str(tmp_path / "runs"), run=False, json_out=str(tmp_path / "r.json"), readme=None))
    b = out["by_length_bin"]
    assert b["edges"] == pytest.approx([10, 16, 22, 28, 34, 40])
    assert b["ppo"][0] == pytest.approx(0.4) and b["sft"][0] == pytest.approx(0.3) and b["ppo_n"][0] == 20
    assert b["ppo_minus_sft"][0] == pytest.approx(0.1)
    assert b["ppo"][4] == pytest.approx(0.9) and b["sft"][4] is None and b["ppo_minus_sft"][4] is None
    assert b["ppo_minus_sft"][1] is None  # empty for both


def test_a_seed_whose_ci_touches_zero_and_errors(tmp_path):
    fake_runs(tmp_path / "runs", lows=(0.01, -0.01, 0.03))
    out = qs.main(qs.Args(out_root=str(tmp_path / "runs"), run=False, json_out=str(tmp_path / "r.json"), readme=None))
    assert out["every_seed_ci_above_zero"] is False
    with pytest.raises(FileNotFoundError, match="seed4"):
        qs.main(qs.Args(seeds="1,4", out_root=str(tmp_path / "runs"), run=False, json_out=str(tmp_path / "x.json"), readme=None))
    with pytest.raises(ValueError, match="--seeds"):
        qs.parse_seeds("1,two")
    readme = tmp_path / "R.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        qs.main(qs.Args(out_root=str(tmp_path / "runs"), run=False, json_out=str(tmp_path / "r.json"), readme=str(readme)))


def test_readme_is_a_door_with_the_generated_results_block():
    """README stays short and its results table is the block this script writes (not hand-typed numbers)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    assert len(text.splitlines()) <= 150
    assert text.count(qs.START) == 1 and text.count(qs.END) == 1 and text.index(qs.START) < text.index(qs.END)
    assert text.splitlines()[3].endswith("# whole pipeline, embedded task, CPU") and "python -m pytest -q" in text.splitlines()[4]


def test_quickstart_prints_stage_times_and_summary_path_last(tmp_path):
    """quickstart.py re-reads an earlier invocation's stage times, prints them per stage, records the machine and
    prints the summary's path as its last line."""
    import subprocess

    out = tmp_path / "q"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"sft_seconds": 100.0, "rm_seconds": 20.0, "ppo_seconds": 50.5, "dpo_seconds": 9.0}))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "quickstart.py"), "--stages", "", "--out_dir", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert lines[-1] == str(out / "summary.json")
    assert "Wall time per stage" in p.stdout and "180" in p.stdout  # 100 + 20 + 50.5 + 9
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_seconds"] == 179.5 and "cores" in summary["machine"]
    assert summary["first_command_seconds"] == 170.5  # the optional DPO stage is not part of the README's command


def test_quickstart_passes_the_reward_models_step_by_size(tmp_path):
    """quickstart.py gives reward.py the size's learning rate (3e-4 at l, 1e-3 at s and m) unless --rm_lr is set, and
    rejects an unknown size by name before any stage runs."""
    import subprocess

    def rm_command(*flags):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "quickstart.py"), "--stages", "rm", "--num_processes", "1",
                            "--out_dir", str(tmp_path / "q"), *flags], capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env=dict(os.environ, COLUMNS="4000"))  # rich prints the command on one line
        assert p.returncode != 0  # no SFT model in the empty folder: the stage fails after its command is printed
        line = next(ln for ln in p.stdout.splitlines() if "reward.py" in ln)
        return line.split()[line.split().index("--lr") + 1]

    assert float(rm_command("--size", "xl")) == 3e-4
    assert float(rm_command("--size", "s")) == 1e-3
    assert float(rm_command("--size", "l")) == 1e-3
    assert float(rm_command("--size", "xl", "--rm_lr", "5e-4")) == 5e-4
    p = subprocess.run([sys.executable, os.path.join(ROOT, "quickstart.py"), "--stages", "", "--size", "xxl",
                        "--out_dir", str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode != 0 and "--size" in p.stderr and "xxl" in p.stderr


def test_quickstart_splits_each_presets_micro_batch_over_its_processes():
    """--num_processes N launches the sampling and training stages with accelerate (gloo on CPU) and divides each
    embedded preset's micro-batch by N, so that the global micro-batch and the accumulation steps stay the preset's."""
    sys.path.insert(0, ROOT)
    import quickstart

    import ppo
    import reward

    flags = quickstart.split_micro_batches(2)
    assert flags["rm"] == ["--per_device_train_batch_size", str(reward.PRESETS["embedded"].per_device_train_batch_size // 2)]
    pp = ppo.PRESETS["embedded"]
    assert flags["ppo"] == ["--per_device_train_batch_size", str(pp.per_device_train_batch_size // 2),
                            "--local_rollout_forward_batch_size", str(pp.local_rollout_forward_batch_size // 2)]
    assert set(flags) == {"sft", "rm", "ppo", "dpo"}
    with pytest.raises(SystemExit, match=r"--num_processes 3 does not divide sft.py's embedded per_device_train_batch_size"):
        quickstart.split_micro_batches(3)
    assert quickstart.launcher(1) == [sys.executable]
    launch = quickstart.launcher(2)
    assert launch[1:3] == ["-m", "accelerate.commands.launch"] and launch[launch.index("--num_processes") + 1] == "2"


def test_quickstart_passes_the_precision_to_every_training_stage():
    """--precision bf16 pretrains the base model (--bf16) and trains SFT, RM, PPO and DPO under CPU bf16 autocast
    (--bf16_on_cpu); the feedback sampling stays fp32; the default fp32 passes neither; another value is refused."""
    import subprocess

    sys.path.insert(0, ROOT)
    import quickstart

    def cmds(**kw):
        commands = quickstart.stage_commands(quickstart.Args(num_processes=1, **kw))[0]
        return {st: c if isinstance(c[0], str) else [x for part in c for x in part] for st, c in commands.items()}

    bf = cmds(size="m", precision="bf16")
    assert "--bf16" in bf["task"]
    assert {st for st, c in bf.items() if "--bf16_on_cpu" in c} == {"sft", "rm", "ppo", "dpo"}
    assert not any("--bf16_on_cpu" in c or "--bf16" in c for c in cmds(size="m").values())
    p = subprocess.run([sys.executable, os.path.join(ROOT, "quickstart.py"), "--stages", "", "--precision", "fp16"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode != 0 and "--precision" in p.stderr


def test_quickstart_feedback_all_pairs_groups_the_reward_models_batches():
    """--feedback_all_pairs (the default): the rater round compares every pair of a post's samples and the RM, grouped
    by post, takes 32 pairs an update in micro-batches that the processes share (its flags parse); without it, 3
    disjoint pairs a post and the RM's preset batches."""
    sys.path.insert(0, ROOT)
    import quickstart
    import reward

    for procs in (1, 2):
        commands = quickstart.stage_commands(quickstart.Args(num_processes=procs, feedback_all_pairs=True))[0]
        assert "--all_pairs" in commands["feedback"][0]
        rm = commands["rm"][commands["rm"].index("reward.py") + 1:]
        args = reward.parse_args(rm)
        assert args.group_pairs_by_post and args.total_batch_size == 32 and args.per_device_train_batch_size == 32 // procs
    assert quickstart.Args().feedback_all_pairs
    off = quickstart.stage_commands(quickstart.Args(num_processes=2, feedback_all_pairs=False))[0]
    assert "--all_pairs" not in off["feedback"][0] and "--group_pairs_by_post" not in off["rm"]


def test_table_leaves_out_the_dpo_time_row_when_no_seed_ran_dpo():
    """The 'with the optional DPO stage' row appears only when some seed's wall time differs from the first command's."""
    per = {str(k): {**{m: None for m, _ in qs.METRICS}, "wall_seconds": 600.0 + k, "first_command_seconds": 600.0 + k,
                    "ppo_minus_sft_ci": [0.1, 0.2]} for k in (1, 2)}
    none = {k: None for k, _ in qs.METRICS}
    summary = {"seeds": [1, 2], "mean": none, "std": none, "per_seed": per}
    assert "optional DPO" not in qs.table_markdown(summary)
    per["2"]["wall_seconds"] = 650.0
    assert "optional DPO" in qs.table_markdown(summary)


def test_quickstart_seed_varies_training_not_the_task():
    """--seed reaches every training stage while the task (data, tokenizer, base model) is built from --task_seed,
    1 by default for every seed, as the paper's seeds share one data set and one Pythia (and as the sweep does)."""
    sys.path.insert(0, ROOT)
    import quickstart

    def seeds(**kw):
        commands = quickstart.stage_commands(quickstart.Args(num_processes=1, **kw))[0]
        flat = {st: c if isinstance(c[0], str) else c[0] for st, c in commands.items()}
        return {st: c[c.index("--seed") + 1] for st, c in flat.items() if "--seed" in c}

    s3 = seeds(seed=3)
    assert s3.pop("task") == "1" and set(s3.values()) == {"3"} and {"sft", "feedback", "rm", "ppo", "dpo"} <= set(s3)
    assert seeds(seed=3, task_seed=7)["task"] == "7"


def test_quickstart_passes_ppos_episodes_by_size():
    """PPO trains ppo.py's EMBEDDED_EPISODES_BY_SIZE for --size (s: 32 updates of 32 episodes, m: 24, l: 48)."""
    sys.path.insert(0, ROOT)
    import quickstart

    import ppo

    for size, updates in (("s", 32), ("m", 24), ("l", 48)):
        c = quickstart.stage_commands(quickstart.Args(num_processes=1, size=size))[0]["ppo"]
        episodes = int(c[c.index("--total_episodes") + 1])
        assert episodes == ppo.EMBEDDED_EPISODES_BY_SIZE[size] == updates * ppo.PRESETS["embedded"].total_batch_size
