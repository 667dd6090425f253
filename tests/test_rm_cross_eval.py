"""benchmark/rm_cross_eval.py: several reward models scored on the same preference validation splits."""

import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmark"))

import embedded_task as et  # noqa: E402
import reward  # noqa: E402
import rm_cross_eval as rx  # noqa: E402
import tldr_dataset as td  # noqa: E402
from helpers import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two quickstart-shaped run folders (sizes s and m, seed 2) of one small task, each with its own random RM;
    their 'feedback' sets are the task's comparisons, the second one with chosen and rejected swapped."""
    import json
    import shutil

    import datasets

    root = tmp_path_factory.mktemp("rmx")
    task, data = str(root / "task"), str(root / "dataset")
    et.build(et.Args(out_dir=task, seed=2, sizes="", n_sft_train=30, n_sft_val=10, n_sft_test=4, n_cmp_train=30,
                     n_cmp_val=40, n_pretrain_posts=30, vocab_size=400), log=lambda *a, **k: None)
    td.build(td.Args(source="embedded", task_dir=task, output_dir=data))
    tok = reward.load_tokenizer(os.path.join(data, "tokenizer"))
    runs = {}
    for i, size in enumerate(("s", "m")):
        run = root / f"run_{size}"
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({"size": size, "seed": 2}))
        shutil.copytree(task, run / "task")
        shutil.copytree(data, run / "dataset")
        val = datasets.load_from_disk(os.path.join(data, "preference", "validation"))
        if i == 1:
            val = val.rename_columns({"query_chosen_token": "tmp", "query_rejected_token": "query_chosen_token"})
            val = val.rename_columns({"tmp": "query_rejected_token", "chosen": "tmp2", "rejected": "chosen"}).rename_columns({"tmp2": "rejected"})
        val.save_to_disk(str(run / "dataset_feedback" / "preference" / "validation"))
        policy = str(root / f"policy_{size}")
        tiny_model(tok, path=policy, seed=i)  # a different random model per run
        reward.ScalarModel.from_sft(policy).save_pretrained(str(run / "rm"))
        tok.save_pretrained(str(run / "rm"))
        runs[size] = str(run)
    return root, task, data, runs


def test_pair_metrics_hand_made():
    margin = np.array([1.0, -0.5, 0.2, 0.3, -1.0])
    gold = np.array([1.0, 1.0, 0.0, 0.5, 0.0])  # chosen better, chosen better, rejected better, tie, rejected better
    m = rx.pair_metrics(margin, gold)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["gold_agreement"] == pytest.approx(2 / 4)  # the tie is left out: right, wrong, wrong, right
    assert m["label_gold_agreement"] == pytest.approx(2 / 4)
    assert m["num_pairs"] == 5 and m["gold_ties"] == 1


def test_every_rm_on_every_split_matches_a_direct_computation(setup, tmp_path):
    root, task, data, runs = setup
    out = rx.main(rx.Args(runs=f"{runs['s']},{runs['m']}", batch_size=7, num_threads=1, json_out=str(tmp_path / "x.json")))
    import datasets

    ds = datasets.load_from_disk(os.path.join(data, "preference", "validation"))
    judge = et.GoldJudge.from_dir(task)
    gold = np.array([judge.compare(q, a, b) for q, a, b in zip(ds["query"], ds["chosen"], ds["rejected"])])
    decided = gold != 0.5
    tok = reward.load_tokenizer(os.path.join(runs["s"], "rm"))
    by_size = {r["size"]: r for r in out["runs"]}
    for size, path in runs.items():
        model = reward.ScalarModel.from_pretrained(os.path.join(path, "rm")).eval()
        with torch.no_grad():  # all pairs in one batch: the script's batches of 7 must give the same margins
            c, r = reward.forward_pair(model, torch.tensor(ds["query_chosen_token"]), torch.tensor(ds["query_rejected_token"]),
                                       tok.pad_token_id)
        m = by_size[size]
        assert m["task"]["num_pairs"] == len(ds) >= 20
        assert m["task"]["accuracy"] == pytest.approx(float((c > r).double().mean()))
        assert m["task"]["label_gold_agreement"] == pytest.approx(float((gold[decided] > 0.5).mean()))
        assert m["task"]["gold_agreement"] == pytest.approx(float(((c > r).numpy() == (gold > 0.5))[decided].mean()))
        # s's feedback set is the task's pairs; m's has them swapped: accuracy flips, gold agreement does not
        assert m["feedback_s"]["accuracy"] == pytest.approx(m["task"]["accuracy"])
        assert m["feedback_m"]["accuracy"] == pytest.approx(float((c < r).double().mean()))
        assert m["feedback_m"]["gold_agreement"] == pytest.approx(float(((c < r).numpy() == (gold < 0.5))[decided].mean()))
        assert m["feedback_m"]["label_gold_agreement"] == pytest.approx(1 - m["task"]["label_gold_agreement"])
        assert m["own_feedback"] == m[f"feedback_{size}"]
    assert by_size["s"]["task"]["accuracy"] != by_size["m"]["task"]["accuracy"]  # two models, their own numbers
    assert out["by_size"]["m"]["task_accuracy_mean"] == pytest.approx(by_size["m"]["task"]["accuracy"])
    assert out["by_size"]["s"]["seeds"] == [2] and out["by_size"]["s"]["task_accuracy_std"] == 0.0
    assert os.path.isfile(tmp_path / "x.json")


def test_bad_input_names_the_flag(setup, tmp_path):
    root, task, data, runs = setup
    with pytest.raises(FileNotFoundError, match="--runs: .*summary.json"):
        rx.main(rx.Args(runs=str(tmp_path)))
    with pytest.raises(ValueError, match="appears twice"):
        rx.main(rx.Args(runs=f"{runs['s']},{runs['s']}"))
    import shutil

    other = tmp_path / "other"  # the same seed, another tokenizer: token ids would mean other things
    shutil.copytree(runs["m"], other)
    tok = reward.load_tokenizer(os.path.join(runs["m"], "rm"))
    tok.add_tokens(["zzzextra"])
    tok.save_pretrained(str(other / "rm"))
    (other / "summary.json").write_text('{"size": "l", "seed": 2}')
    with pytest.raises(ValueError, match="different tokenizers"):
        rx.main(rx.Args(runs=f"{runs['s']},{other}", num_threads=1))
