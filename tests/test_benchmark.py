"""benchmark/sweep.py (launcher, dry run, Slurm) and benchmark/report.py (figures + table) on fake runs."""

import ast
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "benchmark", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


sweep = load("sweep")
report = load("report")


def stage_fields(script: str) -> set:
    """Field names of the `Args` dataclass of a stage script, read with ast (no torch import)."""
    tree = ast.parse(open(os.path.join(ROOT, script)).read())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Args":
            return {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)}
    raise AssertionError(f"no Args in {script}")


def flags(argv):
    """--key value / --flag / --no-flag -> dict (key with underscores)."""
    out, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            key = a[2:].replace("-", "_")
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out[key] = argv[i + 1]
                i += 2
                continue
            out[key] = True
        i += 1
    return out


def script_of(argv):
    return next(a for a in argv if a.endswith(".py"))


def real_plan(tmp_path, stages="data,sft,rm,ppo,judge,dpo", seeds="44413,55513,66613,77713"):
    args = sweep.Args(mode="real", stages=stages, seeds=seeds, out_dir=str(tmp_path / "sweep"))
    return sweep.plan(args)


# what DETAILS.md says, per size (Detail 29) and for every size (Details 8, 12, 13, 16, 20, 25, 32)
DETAIL29 = {"1b": (16, 4, 64), "2.8b": (4, 16, 32), "6.9b": (1, 64, 4)}


def test_detail29_detail30_real_dry_run_matches_details(tmp_path):
    """Detail 29/30 (+ 8, 12, 13, 16, 20, 25, 32): the printed real commands carry DETAILS.md's values per size."""
    setup, chains = real_plan(tmp_path)
    assert [n for n, _ in setup] == ["data"]
    assert len(chains) == 3 * 4
    seen = set()
    fields = {s: stage_fields(s) for s in ("sft.py", "reward.py", "ppo.py", "dpo.py", "eval_gpt_judge.py")}
    for chain in chains:
        by = {name.rsplit("_", 2)[0] if not name.startswith("judge_") else "_".join(name.split("_")[:2]): (name, argv)
              for name, argv in chain}
        assert set(by) == {"sft", "rm", "ppo", "judge_ppo", "dpo", "judge_dpo"}
        size, seed = by["ppo"][0].split("_")[1], by["ppo"][0].split("_")[2]
        seen.add((size, seed))
        model = f"EleutherAI/pythia-{size}-deduped"
        for stage, (name, argv) in by.items():
            assert name == f"{stage}_{size}_{seed}"
            f = flags(argv)
            # every flag exists in the stage script's Args (tyro accepts --no-x for bools)
            for k in f:
                if k in ("config_file", "num_processes") and argv[0] == "accelerate":
                    continue
                assert k in fields[script_of(argv)] or k.startswith("no_") and k[3:] in fields[script_of(argv)], (name, k)
            assert f["seed"] == seed
            if stage in ("sft", "rm", "ppo", "dpo"):
                # Detail 30: accelerate launch with the repo's ZeRO-2 config on 8 GPUs
                assert argv[:3] == ["accelerate", "launch", "--config_file"] and f["config_file"] == "deepspeed_zero2.yaml"
                assert f["num_processes"] == "8"
                assert float(f["lr"]) == 3e-6  # Detail 8
                assert f["output_dir"].endswith(name)
        sft, rm, ppo, dpo = (flags(by[s][1]) for s in ("sft", "rm", "ppo", "dpo"))
        # Detail 12: SFT batch 128, one epoch; micro-batch x accumulation x 8 GPUs = 128
        assert sft["base_model"] == model and sft["total_batch_size"] == "128" and sft["num_train_epochs"] == "1"
        assert 128 % (int(sft["per_device_train_batch_size"]) * 8) == 0
        assert sft["eval_temperature"] == "0.01" and sft["response_length"] == "53"  # Detail 13
        # Detail 16: RM batch 64, one epoch, trunk from this size's SFT
        assert rm["total_batch_size"] == "64" and rm["num_train_epochs"] == "1" and rm["sft_model_path"] == sft["output_dir"]
        assert 64 % (int(rm["per_device_train_batch_size"]) * 8) == 0
        # Detail 29: 1M episodes, 512 per update, 4 epochs, 1 minibatch, per-size micro x accumulation, rollout batch
        micro, accum, rollout = DETAIL29[size]
        assert ppo["preset"] == {"1b": "paper", "2.8b": "paper-2.8b", "6.9b": "paper-6.9b"}[size]
        assert ppo["total_episodes"] == "1000000" and ppo["total_batch_size"] == "512"
        assert ppo["num_ppo_epochs"] == "4" and ppo["num_mini_batches"] == "1"
        assert (int(ppo["per_device_train_batch_size"]), int(ppo["gradient_accumulation_steps"]),
                int(ppo["local_rollout_forward_batch_size"])) == (micro, accum, rollout)
        assert micro * accum * 8 == 512
        assert ppo["temperature"] == "0.7" and ppo["kl_coef"] == "0.05"  # Details 20, 25
        # Detail 30: reference + reward model offloaded for 6.9B only
        assert ("offload" in ppo) == (size == "6.9b") and ("no_offload" in ppo) == (size != "6.9b")
        assert ppo["sft_model_path"] == sft["output_dir"] and ppo["reward_model_path"] == rm["output_dir"]
        # Detail 32: DPO beta 0.05, batch 64, one epoch, from the SFT model
        assert dpo["beta"] == "0.05" and dpo["total_batch_size"] == "64" and dpo["num_train_epochs"] == "1"
        assert dpo["sft_model_path"] == sft["output_dir"]
        # Detail 33: the judge compares PPO (and SFT, paired) with the references using gpt-3.5-turbo-0125
        jp = flags(by["judge_ppo"][1])
        assert jp["judge_model"] == "gpt-3.5-turbo-0125"
        assert jp["samples"] == os.path.join(ppo["output_dir"], "eval_samples.jsonl")
        assert jp["compare_samples"] == os.path.join(sft["output_dir"], "eval_samples.jsonl")
    assert seen == {(s, str(x)) for s in DETAIL29 for x in (44413, 55513, 66613, 77713)}
    zero2 = open(os.path.join(ROOT, "deepspeed_zero2.yaml")).read()
    assert "zero_stage: 2" in zero2 and "mixed_precision: bf16" in zero2


def test_detail29_ppo_presets_exist():
    """Detail 29: the per-size ppo.py presets the launcher names exist in ppo.py."""
    src = open(os.path.join(ROOT, "ppo.py")).read()
    for size, c in sweep.REAL_SIZES.items():
        assert f'"{c["ppo_preset"]}"' in src, size


def test_dry_run_cli_prints_every_command(tmp_path):
    """`--dry_run` prints each run's name and its full command line; nothing is created."""
    out = subprocess.run([sys.executable, "benchmark/sweep.py", "--mode", "real", "--dry_run", "--sizes", "2.8b",
                          "--seeds", "44413", "--out_dir", str(tmp_path / "s")], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    names = [ln[2:] for ln in lines if ln.startswith("# ")]
    assert names == ["sft_2.8b_44413", "rm_2.8b_44413", "ppo_2.8b_44413", "judge_ppo_2.8b_44413"]
    ppo = shlex.split(lines[lines.index("# ppo_2.8b_44413") + 1])
    assert "--per_device_train_batch_size" in ppo and ppo[ppo.index("--per_device_train_batch_size") + 1] == "4"
    assert not os.path.exists(tmp_path / "s")


def test_slurm_dry_run_writes_chained_sbatch(tmp_path):
    """--slurm writes one sbatch per stage run; each depends (afterok) on the job that writes its input."""
    args = sweep.Args(mode="real", sizes="1b", seeds="44413", stages="data,sft,rm,ppo,judge", slurm=True, dry_run=True,
                      out_dir=str(tmp_path / "sw"), slurm_partition="gpu")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        sweep.main(args)
    cmds = [ln for ln in buf.getvalue().splitlines() if ln.startswith("sbatch")]
    assert len(cmds) == 5
    assert "--dependency" not in cmds[0]  # data
    assert "--dependency=afterok:<data>" in cmds[1]  # sft waits for the data set
    assert "--dependency=afterok:<sft_1b_44413>" in cmds[2]  # rm
    assert "--dependency=afterok:<rm_1b_44413>" in cmds[3]  # ppo
    assert "--dependency=afterok:<ppo_1b_44413>" in cmds[4]  # judge
    text = open(tmp_path / "sw" / "slurm" / "ppo_1b_44413.sbatch").read()
    assert "#SBATCH --gpus-per-node=8" in text and "#SBATCH --partition=gpu" in text
    assert "accelerate launch --config_file deepspeed_zero2.yaml" in text and "--gradient_accumulation_steps 4" in text


def test_embedded_plan_chains_paths_and_seeds(tmp_path):
    """The embedded sweep: --preset embedded everywhere, --seed per run, later stages read earlier outputs."""
    args = sweep.Args(mode="embedded", seeds="1,2,3", stages="data,sft,rm,ppo,judge,dpo", out_dir=str(tmp_path / "e"))
    setup, chains = sweep.plan(args)
    assert [n for n, _ in setup] == ["task", "data"]
    assert len(chains) == 9 and [c[0][0] for c in chains[:4]] == ["sft_l_1", "sft_l_2", "sft_l_3", "sft_m_1"]
    for chain in chains:
        f = {name: flags(argv) for name, argv in chain}
        for name, argv in chain:
            size, seed = name.split("_")[-2], name.split("_")[-1]
            assert f[name]["seed"] == seed
            if not name.startswith("judge"):
                assert f[name]["preset"] == "embedded"
        sft = f[f"sft_{size}_{seed}"]
        assert sft["base_model"].endswith(f"base-{size}")
        assert f[f"rm_{size}_{seed}"]["sft_model_path"] == sft["output_dir"]
        assert f[f"ppo_{size}_{seed}"]["reward_model_path"] == f[f"rm_{size}_{seed}"]["output_dir"]
        ppo = f[f"ppo_{size}_{seed}"]
        assert ppo["num_threads"] == "1"
        # no shrink unless asked for: every stage trains with its embedded preset, as in the quickstart
        assert "num_train_pairs" not in f[f"rm_{size}_{seed}"]
        # PPO's episodes by size, the ones quickstart.py passes (ppo.py's EMBEDDED_EPISODES_BY_SIZE)
        assert int(ppo["total_episodes"]) == {"s": 1024, "m": 768, "l": 1536, "xl": 1536}[size]
        assert "num_train_pairs" not in f[f"dpo_{size}_{seed}"]
        assert f[f"judge_ppo_{size}_{seed}"]["judge"] == "gold"
        # the reward model's step by size, the one quickstart.py passes (reward.py's EMBEDDED_LR_BY_SIZE)
        assert float(f[f"rm_{size}_{seed}"]["lr"]) == {"s": 1e-3, "m": 1e-3, "l": 1e-3, "xl": 3e-4}[size]


def test_embedded_plan_feedback_and_shrink_flags(tmp_path):
    """With the feedback stage the RM, PPO and DPO read the preference set built from the SFT model's own samples;
    a shrink flag reaches its stage only when set."""
    args = sweep.Args(mode="embedded", sizes="s", seeds="1", stages="sft,feedback,rm,ppo,judge,dpo",
                      out_dir=str(tmp_path / "e"), ppo_total_episodes=640, rm_train_pairs=300, feedback_posts=100)
    _, chains = sweep.plan(args)
    f = {name: flags(argv) for name, argv in chains[0]}
    fdata = f["fdata_s_1"]["output_dir"]
    assert f["feedback_s_1"]["policy_path"] == f["sft_s_1"]["output_dir"] and f["feedback_s_1"]["num_train_posts"] == "100"
    assert f["rm_s_1"]["dataset_path"] == f["ppo_s_1"]["dataset_path"] == f["dpo_s_1"]["dataset_path"] == fdata
    assert f["sft_s_1"]["dataset_path"] != fdata
    assert f["ppo_s_1"]["total_episodes"] == "640" and f["rm_s_1"]["num_train_pairs"] == "300"


def test_embedded_plan_feedback_all_pairs(tmp_path):
    """--feedback_all_pairs (the default): the raters compare every pair of a post's samples and the RM batches them by
    post, 32 pairs an update, as quickstart.py; --no-feedback-all-pairs passes neither flag."""
    def stage_flags(all_pairs):
        args = sweep.Args(mode="embedded", sizes="s", seeds="1", stages="sft,feedback,rm,ppo,judge",
                          out_dir=str(tmp_path / "e"), feedback_all_pairs=all_pairs)
        return {name: argv for name, argv in sweep.plan(args)[1][0]}

    on, off = stage_flags(True), stage_flags(False)
    assert sweep.Args().feedback_all_pairs
    assert "--all_pairs" in on["feedback_s_1"] and "--all_pairs" not in off["feedback_s_1"]
    rm = flags(on["rm_s_1"])
    assert "group_pairs_by_post" in rm and rm["total_batch_size"] == "32" and rm["per_device_train_batch_size"] == "32"
    assert "group_pairs_by_post" not in flags(off["rm_s_1"])


def test_embedded_plan_passes_the_precision(tmp_path):
    """--precision bf16 pretrains the base models (--bf16) and trains every size's SFT, RM, PPO and DPO under CPU bf16
    autocast (--bf16_on_cpu), as quickstart.py; the default fp32 passes neither."""
    def plan(precision):
        setup, chains = sweep.plan(sweep.Args(mode="embedded", sizes="s,m", seeds="1", stages="data,sft,rm,ppo,dpo",
                                              out_dir=str(tmp_path / precision), precision=precision))
        return dict(setup)["task"], {name: "--bf16_on_cpu" in argv for chain in chains for name, argv in chain}

    task, bf = plan("bf16")
    assert "--bf16" in task and all(bf.values()) and len(bf) == 8
    task, fp = plan("fp32")
    assert "--bf16" not in task and not any(fp.values())


# ---------------------------------------------------------------------------------------------- report


def write_fake_sweep(root, sizes=("s", "m", "l"), seeds=(1, 2, 3)):
    def dump(name, metrics, history=None):
        d = root / name
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(metrics))
        if history is not None:
            (d / "metrics.jsonl").write_text("\n".join(json.dumps(h) for h in history) + "\n")

    for i, size in enumerate(sizes):
        for seed in seeds:
            acc = 0.6 + 0.05 * i + 0.01 * seed
            rm = {"val_accuracy": acc, "gold_agreement": acc + 0.05}
            for c in range(1, 10):
                rm[f"val_accuracy/confidence_{c}"] = 0.5 + 0.03 * c + 0.02 * i
                rm[f"val_count/confidence_{c}"] = 10 if c != 4 else 30
            dump(f"rm_{size}_{seed}", rm)
            fb = root / f"feedback_{size}_{seed}"  # the rater round: feedback.json, not metrics.json
            fb.mkdir(parents=True)
            (fb / "feedback.json").write_text(json.dumps({"validation": {"label_agreement": 0.75 - 0.03 * i}}))
            dump(f"sft_{size}_{seed}", {"gold_win_rate": 0.2 + 0.05 * i, "val_loss": 1.0})
            (root / f"sft_{size}_{seed}" / "eval_samples.jsonl").write_text("\n".join(
                json.dumps({"id": str(k), "response": "x", "response_token_len": 20, "gold_score": -2.0 + i + k,
                            "gold_reference_score": 5.0})
                for k in range(4)) + "\n")
            hist = [{"update": u, "objective/scores": 0.1 * u + i, "objective/kl": 0.5 * u, "objective/response_length": 30 + u}
                    for u in range(1, 6)] + [{"update": 5, "eval/gold_win_rate": 0.5}]
            dump(f"ppo_{size}_{seed}", {"gold_win_rate": 0.4 + 0.1 * i, "final_kl": 2.0 + seed}, hist)
            judge = {"win_rate": 0.4 + 0.1 * i + 0.01 * seed, "compare_win_rate": 0.25 + 0.05 * i, "h2h_win_rate": 0.6,
                     "mean_candidate_token_len": 40.0, "compare_mean_candidate_token_len": 30.0,
                     "diff_win_rate": 0.15 + 0.01 * seed, "diff_win_rate_ci_low": 0.01 * seed - 0.02,
                     "diff_win_rate_ci_high": 0.3}
            for b in range(10):
                lo = -1 + 0.2 * b
                for p, wr in (("", 0.3 + 0.04 * b), ("compare_", 0.2 + 0.03 * b)):
                    judge.update({f"{p}len_bin{b}_lo": lo, f"{p}len_bin{b}_hi": lo + 0.2, f"{p}len_bin{b}_n": 20,
                                  f"{p}len_bin{b}_win_rate": wr})
            dump(f"judge_ppo_{size}_{seed}", judge)
    (root / "ppo_l_9").mkdir()  # a run still going: no metrics.json -> left out
    (root / "logs").mkdir()


def test_report_on_fake_sweep(tmp_path):
    """report.py reads the runs' JSON outputs and writes the four figures and a mean ± std table per size."""
    sweep_dir = tmp_path / "sweep"
    write_fake_sweep(sweep_dir)
    (sweep_dir / "sweep_args.json").write_text(json.dumps({"mode": "embedded", "ppo_total_episodes": 512}))
    table_path = tmp_path / "docs" / "table.md"
    table_path.parent.mkdir()
    table_path.write_text("# Results\n\nintro\n\n<!-- table:start (benchmark/report.py) -->\nSTALE-TABLE\n<!-- table:end -->\n\nanalysis\n")
    args = report.Args(sweep_dir=str(sweep_dir), out_dir=str(tmp_path / "fig"), table=str(table_path), prefix="t_",
                       json_out=str(tmp_path / "docs" / "sweep.json"))  # never the repository's docs/embedded_sweep.json
    report.main(args)
    for name in ("rm_accuracy", "win_rate_vs_size", "win_rate_by_length", "ppo_curves", "gold_score_by_length"):
        p = tmp_path / "fig" / f"t_{name}.png"
        assert p.exists() and p.stat().st_size > 5000, name
    runs = report.collect(str(sweep_dir))
    assert sorted(runs["ppo"]["l"]) == [1, 2, 3]  # the unfinished ppo_l_9 is not there
    # the raters' label agreement on each size's own validation pairs, the ceiling of the RM's accuracy there
    summary = report.sweep_summary(runs, str(sweep_dir))
    assert [summary["sizes"][s]["rm_val_label_agreement_mean"] for s in "sml"] == pytest.approx([0.75, 0.72, 0.69])
    text = table_path.read_text()
    assert text.startswith("# Results\n\nintro") and text.rstrip().endswith("analysis") and "STALE-TABLE" not in text
    means, per_seed = text.split("Per seed")
    rows = {ln.split("|")[1].strip(): ln for ln in means.splitlines() if ln.startswith("| ") and not ln.startswith("| size")}
    assert list(rows) == ["s", "m", "l"]
    # one row per size and seed, each from that seed's own metrics.json (l seed 2: RM 0.6 + 0.10 + 0.02, KL 2 + 2)
    seed_rows = [ln for ln in per_seed.splitlines() if ln.startswith("| ") and not ln.startswith("| size")]
    assert [tuple(c.strip() for c in ln.split("|")[1:3]) for ln in seed_rows] == [(s, str(k)) for s in "sml" for k in (1, 2, 3)]
    assert seed_rows[7] == "| l | 2 | 0.350 | 0.620 | +0.170 (+0.000..+0.300) | - | 0.720 / - | - | 4.00 |"
    # RM accuracy for size m: 0.65 + 0.01 * seed -> mean 0.67, std sqrt(2/3)*0.01
    assert "0.670 ± 0.008" in rows["m"]
    assert "3/3/3/3" in rows["l"]
    # confidence 1-4 pooled by count for size s (i=0): (0.53*10 + 0.56*10 + 0.59*10 + 0.62*30) / 60 = 0.59
    assert "| 0.590 ± 0.000 |" in rows["s"]
    # the SFT win rate comes from the judge's paired compare numbers, not sft's own metric
    assert "0.350 ± 0.000" in rows["l"]
    assert "30.0 / 40.0" in rows["s"]
    # gold scores from the eval samples: size l (i=2): mean(0, 1, 2, 3) = 1.5; the references: 5.0
    assert "1.500 ± 0.000 | 5.000 ± 0.000" in rows["l"]
    assert "| 0.600 ± 0.000 |" in rows["m"]  # PPO vs SFT head-to-head
    assert '"ppo_total_episodes": 512' in text


def test_report_json_summary(tmp_path):
    """docs/embedded_sweep.json: per size the seeds' mean and std, one paired-CI lower bound per seed, and the
    PPO-minus-SFT win rate per length bin pooled over sizes and seeds (null where a bin is empty)."""
    sweep_dir = tmp_path / "sweep"
    write_fake_sweep(sweep_dir)
    (sweep_dir / "sweep_timing.json").write_text(json.dumps({"wall_seconds": 1234.5, "machine": "test box"}))
    out = tmp_path / "docs" / "sweep.json"
    report.main(report.Args(sweep_dir=str(sweep_dir), out_dir=str(tmp_path / "fig"), table=None, prefix="t_",
                            json_out=str(out)))
    js = json.loads(out.read_text())
    assert list(js["sizes"]) == ["s", "m", "l"] and js["seeds"] == [1, 2, 3]
    m = js["sizes"]["m"]
    assert m["rm_val_accuracy_mean"] == pytest.approx(0.67) and m["rm_val_accuracy_std"] == pytest.approx(0.01 * (2 / 3) ** 0.5)
    assert m["ppo_win_rate_mean"] == pytest.approx(0.52) and m["sft_win_rate_mean"] == pytest.approx(0.30)
    assert m["ppo_vs_sft_ci_low"] == pytest.approx([-0.01, 0.0, 0.01])
    assert m["ppo_minus_sft_per_seed"] == pytest.approx({"1": 0.16, "2": 0.17, "3": 0.18})
    assert m["final_kl_mean"] == pytest.approx(4.0) and m["dpo_win_rate_mean"] is None
    assert js["wall_seconds"] == 1234.5 and js["machine"] == "test box"
    # every run has the same ten bins: PPO 0.3 + 0.04 b, SFT 0.2 + 0.03 b -> difference 0.1 + 0.01 b
    assert js["ppo_minus_sft_by_length_bin"] == pytest.approx([0.1 + 0.01 * b for b in range(10)])
    # a run whose bins cover only part of the range leaves the rest of the common bins empty (null)
    sparse = {"judge_ppo": {"s": {1: {"metrics": {"len_bin0_lo": -1.0, "len_bin0_hi": -0.8, "len_bin0_n": 5, "len_bin0_win_rate": 0.4,
                                                  "compare_len_bin0_lo": -1.0, "compare_len_bin0_hi": -0.8, "compare_len_bin0_n": 5,
                                                  "compare_len_bin0_win_rate": 0.2,
                                                  "len_bin1_lo": 0.8, "len_bin1_hi": 1.0, "len_bin1_n": 5, "len_bin1_win_rate": 1.0}}}}}
    bins = report.sweep_summary(sparse, str(tmp_path), num_bins=4)["ppo_minus_sft_by_length_bin"]
    assert bins[0] == pytest.approx(0.2) and bins[1] is None and bins[2] is None and bins[3] is None


def test_report_length_pooling_and_fallbacks(tmp_path):
    """Per-run length bins pool onto common edges (count-weighted); without a judge run the stages' own
    gold_win_rate is used."""
    runs = {"judge_ppo": {"s": {1: {"metrics": {"len_bin0_lo": -1.0, "len_bin0_hi": 0.0, "len_bin0_n": 10, "len_bin0_win_rate": 0.2,
                                                "len_bin1_lo": 0.0, "len_bin1_hi": 1.0, "len_bin1_n": 30, "len_bin1_win_rate": 0.6}},
                                2: {"metrics": {"len_bin0_lo": -0.5, "len_bin0_hi": 0.5, "len_bin0_n": 10, "len_bin0_win_rate": 1.0}}}}}
    per_bin = report.pooled_length_bins(runs["judge_ppo"]["s"], "", [-1.0, 0.0, 1.0])
    assert per_bin[0] == [0.2] and per_bin[1] == pytest.approx([0.6, 1.0])
    fallback = {"sft": {"m": {1: {"metrics": {"gold_win_rate": 0.1}}}}, "ppo": {"m": {1: {"metrics": {"gold_win_rate": 0.3}}}}}
    wr = report.win_rates(fallback, "m")
    assert wr["SFT"] == [0.1] and wr["PPO"] == [0.3] and wr["DPO"] == []


def test_default_chain_order_is_largest_size_first(tmp_path):
    """The default launches the largest size's chains first, so that with --jobs 2 the shortest chains end the sweep
    side by side; --order seed keeps complete seeds first."""
    names = lambda order: [ch[0][0] for ch in sweep.plan(sweep.Args(  # noqa: E731
        mode="embedded", seeds="1,2", stages="sft", out_dir=str(tmp_path), **({"order": order} if order else {})))[1]]
    assert names(None) == ["sft_l_1", "sft_l_2", "sft_m_1", "sft_m_2", "sft_s_1", "sft_s_2"]
    assert names("seed") == ["sft_l_1", "sft_m_1", "sft_s_1", "sft_l_2", "sft_m_2", "sft_s_2"]


def test_sweep_timing_records_each_chains_seconds(tmp_path, monkeypatch):
    """sweep_timing.json keeps each chain's wall time by its first stage, so another launch order can be replayed."""
    delay = {"sft_s_1": 0.3, "rm_s_1": 0.0, "sft_s_2": 0.05, "rm_s_2": 0.05}
    monkeypatch.setattr(sweep, "run_one", lambda a, name, argv: time.sleep(delay[name]) or True)
    sweep.main(sweep.Args(mode="embedded", sizes="s", seeds="1,2", stages="sft,rm", out_dir=str(tmp_path / "t")))
    timing = json.loads((tmp_path / "t" / "sweep_timing.json").read_text())
    assert sorted(timing["chain_seconds"]) == ["sft_s_1", "sft_s_2"]
    assert timing["chain_seconds"]["sft_s_1"] >= 0.3 and 0.1 <= timing["chain_seconds"]["sft_s_2"] < 0.3
    assert timing["chains_seconds"] >= timing["chain_seconds"]["sft_s_1"] + timing["chain_seconds"]["sft_s_2"] - 0.2


def test_a_restarted_sweep_skips_every_finished_stage(tmp_path, monkeypatch):
    """Started again on its folder, the sweep runs only the stages without their last-written file: the rater round
    (feedback.json) and its preference set (meta.json) count as finished like the training stages (metrics.json)."""
    args = sweep.Args(mode="embedded", sizes="s", seeds="1", out_dir=str(tmp_path))
    _, (chain,) = sweep.plan(args)
    names = [n for n, _ in chain]
    assert names[:3] == ["sft_s_1", "feedback_s_1", "fdata_s_1"]
    for name, marker in (("sft_s_1", "metrics.json"), ("feedback_s_1", "feedback.json"), ("fdata_s_1", "meta.json"),
                         ("rm_s_1", "args.json")):  # the RM stopped before its metrics.json: it runs again
        os.makedirs(tmp_path / name)
        (tmp_path / name / marker).write_text("{}")
    ran = []
    monkeypatch.setattr(sweep.subprocess, "call", lambda argv, **kw: ran.append(argv) or 0)
    assert sweep.run_chain(args, chain)
    assert len(ran) == len(names) - 3 and "reward.py" in ran[0]


def test_claims_share_chains_between_sweep_processes(tmp_path, monkeypatch):
    """--claim: a chain already claimed by another sweep process (file in claims/) is skipped, others run."""
    args = sweep.Args(mode="embedded", sizes="s", seeds="1,2", stages="sft", claim=True, out_dir=str(tmp_path / "c"),
                      order="size")
    _, chains = sweep.plan(args)
    os.makedirs(tmp_path / "c" / "claims")
    (tmp_path / "c" / "claims" / "sft_s_1").write_text("")
    ran = []
    monkeypatch.setattr(sweep, "run_one", lambda a, name, argv: ran.append(name) or True)
    assert all(sweep.run_chain(args, ch) for ch in chains)
    assert ran == ["sft_s_2"] and (tmp_path / "c" / "claims" / "sft_s_2").exists()


def test_embedded_default_runs_feedback_before_rm_and_ppo(tmp_path):
    """The embedded sweep's default chain collects rater comparisons of each SFT model's own samples and points that
    run's RM and PPO at the preference set built from them (as the quickstart does); the real mode refuses it."""
    args = sweep.Args(mode="embedded", sizes="s", seeds="2", out_dir=str(tmp_path / "e"))
    _, chains = sweep.plan(args)
    names = [n for n, _ in chains[0]]
    assert names == ["sft_s_2", "feedback_s_2", "fdata_s_2", "rm_s_2", "ppo_s_2", "judge_ppo_s_2", "dpo_s_2",
                     "judge_dpo_s_2"]
    f = {name: flags(argv) for name, argv in chains[0]}
    assert f["feedback_s_2"]["policy_path"] == f["sft_s_2"]["output_dir"] and f["feedback_s_2"]["seed"] == "2"
    assert f["fdata_s_2"]["comparisons_dir"] == f["feedback_s_2"]["output_dir"]
    for stage in ("rm_s_2", "ppo_s_2", "dpo_s_2"):
        assert f[stage]["dataset_path"] == f["fdata_s_2"]["output_dir"]
    # the RM is also scored on the task's own comparisons, the same pairs at every size and seed (as quickstart.py)
    assert f["rm_s_2"]["fixed_val_dataset_path"] == f["sft_s_2"]["dataset_path"]
    assert f["sft_s_2"]["dataset_path"] != f["fdata_s_2"]["output_dir"]
    no_feedback = {n: flags(a) for n, a in sweep.plan(sweep.Args(mode="embedded", sizes="s", seeds="2", stages="sft,rm",
                                                                 out_dir=str(tmp_path / "e")))[1][0]}
    assert no_feedback["rm_s_2"]["dataset_path"] == f["sft_s_2"]["dataset_path"]
    with pytest.raises(ValueError, match="feedback .* embedded task only"):
        sweep.plan(sweep.Args(mode="real", stages="sft,feedback", out_dir=str(tmp_path / "r")))


def test_embedded_default_builds_the_task_of_the_swept_sizes(tmp_path):
    """By default the embedded sweep builds its task (base models of the swept sizes only) and data set before the
    chains; the build runs alone, so it gets every job's threads, its environment too."""
    args = sweep.Args(mode="embedded", sizes="l,s", seeds="1,2", jobs=2, task_seed=5, out_dir=str(tmp_path / "e"))
    setup, chains = sweep.plan(args)
    assert [n for n, _ in setup] == ["task", "data"]
    task = flags(dict(setup)["task"])
    assert task["sizes"] == "s,l" and task["num_threads"] == "2" and task["seed"] == "5"
    assert task["out_dir"] == flags(chains[0][0][1])["gold_task_dir"]
    assert sweep.env_for(args, setup=True)["OMP_NUM_THREADS"] == "2" and sweep.env_for(args)["OMP_NUM_THREADS"] == "1"


def test_sweep_writes_timing_for_the_report(tmp_path, monkeypatch):
    """A finished sweep records its wall time (the task build included), chain count and machine in sweep_timing.json
    (read by report.py)."""
    args = sweep.Args(mode="embedded", sizes="s", seeds="1,2", stages="data,sft", out_dir=str(tmp_path / "t"))
    # the setup (task, data) takes 0.3 s here, each chain 0.1 s
    monkeypatch.setattr(sweep, "run_one", lambda a, name, argv: time.sleep(0.15 if name in ("task", "data") else 0.1) or True)
    sweep.main(args)
    timing = json.loads((tmp_path / "t" / "sweep_timing.json").read_text())
    assert timing["chains"] == 2 and timing["chains_complete"] == 2
    assert 0.3 <= timing["setup_seconds"] < 0.4 <= timing["wall_seconds"]
    assert timing["wall_seconds"] == pytest.approx(timing["setup_seconds"] + timing["chains_seconds"], abs=0.15)
    assert "cores" in timing["machine"]
    assert report.sweep_summary({}, str(tmp_path / "t"))["wall_seconds"] == timing["wall_seconds"]


def test_report_reads_quickstart_folders(tmp_path):
    """--quickstart_runs: quickstart.py folders (stage folders sft/, rm/, ppo/, judge/ and a summary.json naming the
    size and seed) give the same per-size numbers as sweep folders, the summed wall time and where they ran;
    a folder without a summary, or a size and seed given twice, is an error naming the folder."""
    sweep_dir = tmp_path / "sweep"
    write_fake_sweep(sweep_dir, sizes=("s", "m"), seeds=(1, 2))
    dirs = []
    for size in ("s", "m"):
        for seed in (1, 2):
            d = tmp_path / "qs" / f"{size}{seed}"
            d.mkdir(parents=True)
            for stage, sub in report.QUICKSTART_STAGES.items():
                if (sweep_dir / f"{stage}_{size}_{seed}").exists():
                    (sweep_dir / f"{stage}_{size}_{seed}").rename(d / sub)
            (d / "summary.json").write_text(json.dumps({"size": size, "seed": seed, "wall_seconds": 100.0 + seed,
                                                        "machine": f"box{seed}"}))
            dirs.append(str(d))
    out = tmp_path / "sweep.json"
    report.main(report.Args(quickstart_runs=",".join(dirs), out_dir=str(tmp_path / "fig"), table=None, prefix="t_",
                            json_out=str(out)))
    js = json.loads(out.read_text())
    assert list(js["sizes"]) == ["s", "m"] and js["seeds"] == [1, 2]
    m = js["sizes"]["m"]
    assert m["rm_val_accuracy_mean"] == pytest.approx(0.665) and m["ppo_vs_sft_ci_low"] == pytest.approx([-0.01, 0.0])
    assert m["ppo_win_rate_mean"] == pytest.approx(0.515) and m["final_kl_mean"] == pytest.approx(3.5)
    assert js["wall_seconds"] == pytest.approx(2 * 101 + 2 * 102) and js["machine"] == "box1; box2"
    # summaries without task_seed predate --task_seed: each run's task came from its own seed
    assert js["runs"] == dirs and "quickstart" in js["source"] and "task seeds [1, 2]" in js["source"]
    assert js["ppo_minus_sft_by_length_bin"] == pytest.approx([0.1 + 0.01 * b for b in range(10)])
    with pytest.raises(ValueError, match="appears twice"):
        report.collect_quickstart(dirs + [dirs[0]])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        report.collect_quickstart([str(tmp_path / "empty")])
    # --rm_cross_eval: each run's RM accuracy on the task's fixed pairs joins the JSON and the README block
    cross = tmp_path / "cross.json"
    cross.write_text(json.dumps({"runs": [{"size": "m", "seed": k, "task": {"accuracy": 0.6 + 0.1 * k, "gold_agreement": 0.7}}
                                          for k in (1, 2)] + [{"size": "s", "seed": 1, "task": {"accuracy": 0.5, "gold_agreement": 0.5}}]}))
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{report.README_START}\nold\n{report.README_END}\nbottom\n")
    report.main(report.Args(quickstart_runs=",".join(dirs), out_dir=str(tmp_path / "fig"), table=None, prefix="t_",
                            json_out=str(out), rm_cross_eval=str(cross), readme=str(readme)))
    js = json.loads(out.read_text())
    assert js["sizes"]["m"]["rm_fixed_val_accuracy_mean"] == pytest.approx(0.75)
    assert js["sizes"]["m"]["rm_fixed_val_accuracy_std"] == pytest.approx(0.05)
    assert js["sizes"]["m"]["rm_fixed_gold_agreement_mean"] == pytest.approx(0.7)
    assert js["sizes"]["s"]["seeds"]["rm_fixed"] == [1] and js["sizes"]["m"]["seeds"]["rm_fixed"] == [1, 2]
    text = readme.read_text()
    assert "(fixed pairs)" in text and "0.665 ± 0.005 (0.750 ± 0.050)" in text and "(0.500 [seed 1])" in text
    assert text.startswith("top\n") and text.endswith("bottom\n") and "\nold\n" not in text
    cross.write_text("[]")
    with pytest.raises(ValueError, match="--rm_cross_eval"):
        report.main(report.Args(quickstart_runs=",".join(dirs), out_dir=str(tmp_path / "fig"), table=None,
                                json_out=None, rm_cross_eval=str(cross)))


def test_report_json_from_seed_files(tmp_path):
    """--seed_files: benchmark/quickstart_seeds.py outputs (seeds of one size split over two files) give the per-size
    mean and std, one CI lower bound per seed, DPO where it ran, and the files' length bins pooled by count."""
    def seed_file(name, size, seeds, bins=None):
        per_seed = {str(k): {"sft_gold_win_rate": 0.2 + 0.1 * k, "ppo_gold_win_rate": 0.5 + 0.1 * k, "rm_val_accuracy": 0.6,
                             "judge_diff_win_rate": 0.11 * k,
                             "ppo_final_kl": float(k), "wall_seconds": 10.0, "ppo_minus_sft_ci": [0.01 * k, 0.5]}
                    for k in seeds}
        if size == "s":
            per_seed[str(seeds[0])]["dpo_gold_win_rate"] = 0.4
            per_seed[str(seeds[0])]["rm_gold_agreement"] = 0.7
            per_seed[str(seeds[0])]["rm_val_label_agreement"] = 0.72
        d = {"size": size, "seeds": seeds, "machine": f"box {size}", "per_seed": per_seed}
        if bins:
            d["by_length_bin"] = bins
        (tmp_path / name).write_text(json.dumps(d))
        return str(tmp_path / name)

    b1 = {"edges": [-1.0, 0.0, 1.0], "ppo": [0.2, 0.6], "ppo_n": [10, 30], "sft": [0.4, 0.5], "sft_n": [10, 10]}
    b2 = {"edges": [-1.0, 0.0, 1.0], "ppo": [0.5, 1.0], "ppo_n": [0, 10], "sft": [0.1, 0.5], "sft_n": [10, 10]}
    files = [seed_file("m12.json", "m", [1, 2], b1), seed_file("s.json", "s", [1, 2, 3]), seed_file("m3.json", "m", [3], b2)]
    out = tmp_path / "sweep.json"
    report.main(report.Args(seed_files=",".join(files), json_out=str(out), out_dir=str(tmp_path / "fig"), prefix="t_",
                            table=None))
    assert (tmp_path / "fig" / "t_win_rate_vs_size.png").stat().st_size > 5000
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nSTALE\n{report.README_END}\nafter\n")
    report.write_readme_block(str(readme), json.loads(out.read_text()), "sweep.json")
    text = readme.read_text()
    assert "STALE" not in text and text.startswith("intro") and text.rstrip().endswith("after")
    assert "| m | 1,2,3 | 0.600 ± 0.000 | - | 0.400 ± 0.082 | 0.700 ± 0.082 | - | +0.010, +0.020, +0.030 | 2.000 ± 0.816 |" in text
    # s: DPO and the RM's gold agreement ran on seed 1 only, and the table says so
    assert "| s | 1,2,3 | 0.600 ± 0.000 | 0.700 [seed 1] | 0.400 ± 0.082 | 0.700 ± 0.082 | 0.400 [seed 1] |" in text
    with pytest.raises(ValueError, match="markers"):
        report.write_readme_block(str(tmp_path / "fig" / ".." / "sweep.json"), {}, "x")
    js = json.loads(out.read_text())
    assert list(js["sizes"]) == ["s", "m"] and js["seeds"] == [1, 2, 3] and js["runs"] == files
    m = js["sizes"]["m"]
    assert m["sft_win_rate_mean"] == pytest.approx(0.4) and m["ppo_win_rate_std"] == pytest.approx(0.1 * (2 / 3) ** 0.5)
    assert m["ppo_vs_sft_ci_low"] == pytest.approx([0.01, 0.02, 0.03]) and m["dpo_win_rate_mean"] is None
    assert m["ppo_minus_sft_per_seed"] == pytest.approx({"1": 0.11, "2": 0.22, "3": 0.33})
    assert js["sizes"]["s"]["dpo_win_rate_mean"] == pytest.approx(0.4) and js["wall_seconds"] == pytest.approx(60.0)
    assert js["sizes"]["s"]["rm_gold_agreement_mean"] == pytest.approx(0.7) and m["rm_gold_agreement_mean"] is None
    assert js["sizes"]["s"]["rm_val_label_agreement_mean"] == pytest.approx(0.72) and m["rm_val_label_agreement_mean"] is None
    # two common bins: PPO (2 + 0) / 10 - SFT (4 + 1) / 20 = -0.05; PPO (18 + 10) / 40 - SFT (5 + 5) / 20 = 0.2
    runs, _ = report.collect_seed_files(files)
    assert report.sweep_summary(runs, "", num_bins=2)["ppo_minus_sft_by_length_bin"] == pytest.approx([-0.05, 0.2])
    assert js["machine"] == "box m; box s"
    # a rerun of m seed 3 with the same results and DPO added: merged, its time and length bins not counted again
    rerun = json.loads(open(files[2]).read())
    rerun["per_seed"]["3"].update(dpo_gold_win_rate=0.66, rm_gold_agreement=0.8)
    (tmp_path / "m3_dpo.json").write_text(json.dumps(rerun))
    runs2, timing2 = report.collect_seed_files(files + [str(tmp_path / "m3_dpo.json")])
    assert runs2["dpo"]["m"][3]["metrics"]["gold_win_rate"] == 0.66 and runs2["rm"]["m"][3]["metrics"]["gold_agreement"] == 0.8
    assert timing2["wall_seconds"] == pytest.approx(60.0)
    assert report.sweep_summary(runs2, "", num_bins=2)["ppo_minus_sft_by_length_bin"] == pytest.approx([-0.05, 0.2])
    rerun["per_seed"]["3"]["ppo_gold_win_rate"] = 0.9
    (tmp_path / "m3_other.json").write_text(json.dumps(rerun))
    with pytest.raises(ValueError, match="appears twice with different results"):
        report.collect_seed_files(files + [str(tmp_path / "m3_other.json")])
    with pytest.raises(ValueError, match="mixes seeds"):
        report.collect_seed_files(files[1:] + [files[0]] + [seed_file("m1234.json", "m", [1, 2, 3, 4])])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        report.collect_seed_files([str(tmp_path / "bad.json")])


def test_rm_pair_forward_benchmark_times_both_paths(tmp_path):
    """benchmark/rm_pair_forward.py: both paths timed on the same pairs, their rewards agree, the JSON is written;
    an unknown size is refused by name."""
    bench = load("rm_pair_forward")
    out = tmp_path / "rm.json"
    res = bench.main(bench.Args(sizes="s", batch=2, query_tokens=16, response_tokens=6, repeats=1, json_out=str(out)))
    s = res["results"]["s"]
    assert s["full_seconds"] > 0 and s["shared_prefix_seconds"] > 0 and s["max_abs_reward_diff"] < 1e-4
    assert s["post_15_pairs_seconds"] > 0 and s["post_15_pairs_grouped_seconds"] > 0
    assert json.loads(out.read_text())["results"]["s"]["speedup"] == pytest.approx(s["speedup"])
    with pytest.raises(SystemExit, match="xxl"):
        bench.main(bench.Args(sizes="xxl", repeats=1))


def test_embedded_default_sizes_are_s_m_l_and_xl_on_request(tmp_path):
    """The embedded sweep runs s, m, l by default (larger first); xl (the 4.0M model) only when --sizes names it, and
    every size of the sweep is one embedded_task.py can build."""
    import embedded_task

    chains = sweep.plan(sweep.Args(mode="embedded", seeds="1", jobs=2, out_dir=str(tmp_path / "d")))[1]
    assert [flags(c[0][1])["base_model"].rsplit("-", 1)[1] for c in chains] == ["l", "m", "s"]
    chains = sweep.plan(sweep.Args(mode="embedded", sizes="s,xl", seeds="1", out_dir=str(tmp_path / "x")))[1]
    assert [flags(c[0][1])["base_model"].rsplit("-", 1)[1] for c in chains] == ["xl", "s"]
    assert set(sweep.EMBEDDED_SIZES) == set(embedded_task.MODEL_SIZES)
    with pytest.raises(ValueError, match="--sizes"):
        sweep.plan(sweep.Args(mode="embedded", sizes="xxl", seeds="1", out_dir=str(tmp_path / "u")))


def test_length_bin_differences_have_counts_and_unpaired_intervals():
    report = load("report")
    # bin 0: PPO 2 wins of 10, SFT 5 of 20; bin 1: PPO 28 of 40, SFT 10 of 20; bin 2 empty for PPO
    diffs, cis, ns = report.bin_differences([2.0, 28.0, 0.0], [10.0, 40.0, 0.0], [5.0, 10.0, 1.0], [20.0, 20.0, 3.0])
    assert diffs[:2] == pytest.approx([-0.05, 0.2]) and diffs[2] is None and cis[2] is None
    assert ns == [[10, 20], [40, 20], [0, 3]]
    # Agresti-Caffo: (2 + 1) / 12 - (5 + 1) / 22 +- 1.96 sqrt(0.25 * 0.75 / 12 + 6/22 * 16/22 / 22)
    half = 1.96 * (0.25 * 0.75 / 12 + (6 / 22) * (16 / 22) / 22) ** 0.5
    assert cis[0] == pytest.approx([0.25 - 6 / 22 - half, 0.25 - 6 / 22 + half])
    assert cis[0][0] < diffs[0] < cis[0][1] and cis[1][0] < 0 < 0.2 < cis[1][1]  # 0.70 against 0.50, 40 and 20 items
    assert report.bin_differences([280.0], [400.0], [100.0], [200.0])[1][0][0] > 0  # the same rates on 10x the items
    # the README line names every bin below 0 with its counts and interval
    summary = {"sizes": {}, "machine": "box", "ppo_minus_sft_by_length_bin": diffs,
               "ppo_minus_sft_by_length_bin_ci95": cis, "ppo_minus_sft_by_length_bin_n": ns}
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "README.md")
        with open(path, "w") as f:
            f.write(f"{report.README_START}\n{report.README_END}\n")
        report.write_readme_block(path, summary, "x.json")
        text = open(path).read()
    assert f"-0.05, +0.20, - (below 0: bin 1: -0.05, n 10 / 20, CI {cis[0][0]:+.2f}..{cis[0][1]:+.2f})." in text


def test_sweep_summary_bins_per_size_and_pooled(tmp_path):
    report = load("report")

    def judge(bins):  # one judge run: per-run bins (lo, hi, n, win rate) for PPO and, prefixed, for SFT
        m = {"diff_win_rate": 0.1, "diff_win_rate_ci_low": 0.01}
        for prefix, rows in (("", bins[0]), ("compare_", bins[1])):
            for i, (lo, hi, n, wr) in enumerate(rows):
                m.update({f"{prefix}len_bin{i}_lo": lo, f"{prefix}len_bin{i}_hi": hi, f"{prefix}len_bin{i}_n": n,
                          f"{prefix}len_bin{i}_win_rate": wr})
        return {"metrics": m}
    runs = {"judge_ppo": {"s": {1: judge(([(-1, 0, 10, 0.2), (0, 1, 10, 0.6)], [(-1, 0, 10, 0.4), (0, 1, 10, 0.4)]))},
                          "m": {1: judge(([(-1, 0, 10, 0.6), (0, 1, 30, 0.9)], [(-1, 0, 10, 0.4), (0, 1, 10, 0.5)]))}}}
    out = report.sweep_summary(runs, str(tmp_path), num_bins=2)
    assert out["ppo_minus_sft_by_length_bin"] == pytest.approx([0.0, (6 + 27) / 40 - 0.45])
    assert out["ppo_minus_sft_by_length_bin_n"] == [[20, 20], [40, 20]]
    assert out["sizes"]["s"]["ppo_minus_sft_by_length_bin"] == pytest.approx([-0.2, 0.2])
    assert out["sizes"]["m"]["ppo_minus_sft_by_length_bin"] == pytest.approx([0.2, 0.4])
    assert out["sizes"]["s"]["ppo_minus_sft_by_length_bin_n"] == [[10, 10], [10, 10]]
    assert all(len(c) == 2 and c[0] < c[1] for c in out["ppo_minus_sft_by_length_bin_ci95"])


def test_fact_rates_counts_right_and_wrong_facts_per_size_and_policy(tmp_path):
    import random
    fr = load("fact_rates")
    et = fr.et
    seen: set = set()
    recs = [et.make_post(3, "validation", i, seen) for i in range(12)]
    os.makedirs(tmp_path / "task" / "gold")
    et.write_jsonl(str(tmp_path / "task" / "gold" / "records.jsonl"), recs)
    rng = random.Random(0)
    for seed in (1, 2):
        rows = {"sft": [], "ppo": []}
        for r in recs:
            right, wrong = et.near_miss_pair(r, "narrator_age", rng)
            q = et.format_query(r["subreddit"], r["title"], r["post"])
            rows["sft"].append({"query": q, "response": wrong, "reference": right})
            rows["ppo"].append({"query": q, "response": right, "reference": right})
        for stage, rs in rows.items():
            os.makedirs(tmp_path / f"{stage}_s_{seed}")
            et.write_jsonl(str(tmp_path / f"{stage}_s_{seed}" / "eval_samples.jsonl"), rs)
    out = fr.fact_rates(str(tmp_path))
    sft, ppo = out["sizes"]["s"]["sft"], out["sizes"]["s"]["ppo"]
    assert sft["n"] == ppo["n"] == 24 and sft["seeds"] == [1, 2] and "dpo" not in out["sizes"]["s"]
    assert sft["narrator_wrong"] == 1.0 and sft["narrator_right"] == 0.0
    assert ppo["narrator_right"] == 1.0 and ppo["narrator_wrong"] == 0.0
    assert sft["mean_wrong"] >= 1.0 and ppo["mean_wrong"] == 0.0 and ppo["mean_score"] > sft["mean_score"] + 1.0
    assert out["reference"]["n"] == 12 and out["reference"]["narrator_right"] == 1.0
    table = fr.markdown(out)
    assert "| s | SFT (seeds 1,2) | 0.00 / 1.00 |" in table and "| - | reference |" in table
    bad = tmp_path / "sft_m_1"
    os.makedirs(bad)
    (bad / "eval_samples.jsonl").write_text(json.dumps({"query": "q"}) + "\n")
    with pytest.raises(ValueError, match="sft_m_1.*response"):
        fr.fact_rates(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="eval_samples"):
        fr.fact_rates(str(tmp_path / "nothing"))
