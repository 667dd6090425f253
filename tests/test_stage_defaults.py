"""The stages find each other: with no path flags each stage's default input is the previous stage's default output
for the same base model (every Pythia size), and the stages share one vocabulary of flag names."""

import dataclasses
import os

import pytest

import dpo
import eval_gpt_judge
import ppo
import reward
import sft
import tldr_dataset

SIZES = ("EleutherAI/pythia-1b-deduped", "EleutherAI/pythia-2.8b-deduped", "EleutherAI/pythia-6.9b-deduped")
STAGES = {"tldr_dataset": tldr_dataset, "sft": sft, "reward": reward, "ppo": ppo, "dpo": dpo, "judge": eval_gpt_judge}


@pytest.mark.parametrize("base_model", SIZES)
def test_default_outputs_are_next_stage_inputs(base_model):
    flags = ["--base_model", base_model]
    data = tldr_dataset.Args().output_dir  # one data set for every size: the Pythia sizes share one tokenizer
    s, r, p, d, j = (m.parse_args(flags) for m in (sft, reward, ppo, dpo, eval_gpt_judge))
    name = base_model.split("/")[-1]
    assert s.output_dir == os.path.join("models", f"sft_{name}")
    assert s.dataset_path == r.dataset_path == p.dataset_path == d.dataset_path == data
    assert r.sft_model_path == p.sft_model_path == d.sft_model_path == s.output_dir
    assert p.reward_model_path == r.output_dir != s.output_dir
    assert j.samples == os.path.join(p.output_dir, "eval_samples.jsonl")
    assert len({s.output_dir, r.output_dir, p.output_dir, d.output_dir, j.output_dir}) == 5  # nothing overwrites
    # ppo.py takes the size's preset (Detail 29) when --base_model names a size and --preset is not given
    assert p.preset == {"1b": "paper", "2.8b": "paper-2.8b", "6.9b": "paper-6.9b"}[name.split("-")[1]]
    assert p.offload == name.startswith("pythia-6.9b")
    # an explicit flag still wins over the derived default
    assert sft.parse_args(flags + ["--output_dir", "x"]).output_dir == "x"
    assert ppo.parse_args(flags + ["--sft_model_path", "y"]).sft_model_path == "y"


def test_ppo_size_preset_names_its_base_model():
    for name in ("paper-2.8b", "paper-6.9b"):
        a = ppo.parse_args(["--preset", name])
        assert a.base_model == f"EleutherAI/pythia-{name[6:]}-deduped"
        assert a.sft_model_path == f"models/sft_pythia-{name[6:]}-deduped"


# one name for one thing: the names below were used by some stages for what the others call the key
SYNONYMS = {"per_device_batch_size": "per_device_train_batch_size", "batch_size": "total_batch_size",
            "num_epochs": "num_train_epochs", "out_dir": "output_dir", "wandb_project": "wandb_project_name"}


def test_one_vocabulary_across_stages():
    fields = {k: {f.name: f for f in dataclasses.fields(m.Args)} for k, m in STAGES.items()}
    for stage, fs in fields.items():
        for old, new in SYNONYMS.items():
            assert old not in fs, f"{stage}.py names {old!r}; the stages call it {new!r}"
    # every training stage has the shared keys, with the same type
    training = ("sft", "reward", "ppo", "dpo")
    for key in ("seed", "base_model", "dataset_path", "output_dir", "lr", "eps", "total_batch_size",
                "per_device_train_batch_size", "track", "wandb_project_name", "exp_name", "preset"):
        types = {fields[s][key].type for s in training}
        assert len(types) == 1, (key, types)
    assert {fields[s]["num_train_epochs"].type for s in ("sft", "reward", "dpo")} == {int}
    # one seed convention: the paper's first seed in every paper preset, identical learning rate (Detail 8)
    for stage in ("sft", "reward", "ppo", "dpo", "judge"):
        args = STAGES[stage].parse_args([])
        assert args.seed == 44413, stage
        if stage != "judge":
            assert (args.lr, args.eps, args.wandb_project_name) == (3e-6, 1e-5, "tldr_rlhf"), stage


def test_sweep_uses_the_stage_defaults(tmp_path):
    """benchmark/sweep.py's real commands give each stage the values the stage itself defaults to for that size."""
    from benchmark import sweep

    args = sweep.Args(mode="real", sizes="1b,2.8b,6.9b", seeds="44413", out_dir=str(tmp_path / "s"),
                      stages="sft,rm,ppo,dpo")
    _, chains = sweep.plan(args)
    module = {"sft.py": sft, "reward.py": reward, "ppo.py": ppo, "dpo.py": dpo}
    checked = 0
    for chain in chains:
        for _, argv in chain:
            script = next(a for a in argv if a.endswith(".py"))
            flags = argv[argv.index(script) + 1:]
            given = module[script].parse_args(flags)
            base = module[script].parse_args(["--base_model", given.base_model] if hasattr(given, "base_model") else [])
            for key in ("lr", "total_batch_size", "num_train_epochs", "total_episodes", "num_ppo_epochs",
                        "num_mini_batches", "local_rollout_forward_batch_size", "offload", "temperature", "kl_coef",
                        "eval_temperature", "response_length", "beta", "seed"):
                if hasattr(given, key):
                    assert getattr(given, key) == getattr(base, key), (script, given.base_model, key)
                    checked += 1
            if script == "ppo.py":
                assert given.per_device_train_batch_size == base.per_device_train_batch_size
    assert checked > 40


def test_ppo_size_preset_from_a_local_snapshot():
    """A local copy of a Pythia size (a folder named like it) gets that size's preset too, as its derived folders do."""
    for size, preset in (("1b", "paper"), ("2.8b", "paper-2.8b"), ("6.9b", "paper-6.9b")):
        path = f"/ckpt/EleutherAI/pythia-{size}-deduped"
        a = ppo.parse_args(["--base_model", path])
        assert (a.preset, a.base_model, a.offload) == (preset, path, size == "6.9b")
        assert a.per_device_train_batch_size == {"1b": 16, "2.8b": 4, "6.9b": 1}[size]
        assert a.sft_model_path == f"models/sft_pythia-{size}-deduped"
