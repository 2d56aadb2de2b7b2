"""``tta continual`` end to end on tiny embedded streams: files, skip on rerun, exact resume, NaP norms, NMC."""
from __future__ import annotations

import json

from continual.records import experience_records, read_records, summary_records
from eval.cli import main

TINY = ["--n-train", "100", "--n-test", "50", "--image-size", "8", "--width", "4", "--buffer", "20",
        "--no-progress", "--eval-batch-size", "64", "--threads", "1"]


def _run(out, *extra):
    return main(["continual", "--out", str(out), *TINY, *extra])


def _lines(path):
    return path.read_text().splitlines()


def test_split_digits_end_to_end_and_rerun_skips(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--method", "er", "--norm", "adab2n", "--seeds", "0,1") == 0
    for name in ("results.jsonl", "config.json", "heatmap.png", "accuracy_matrix.csv", "accuracy_matrix.md",
                 "summary.json", "summary.md"):
        assert (out / name).exists(), name
    everything = read_records(out / "results.jsonl")
    records = experience_records(everything)
    assert sorted((r["seed"], r["experience"]) for r in records) == [(s, e) for s in (0, 1) for e in range(5)]
    assert all(len(r["accuracies"]) == 5 and "adab2n" in r and r["kind"] == "experience" for r in records)
    assert records[-1]["adab2n"]["task"] == 5 and records[-1]["adab2n"]["t"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["norm"] == "adab2n" and config["config"]["model"] == "cnn"
    assert {"torch", "avalanche", "numpy", "python"} <= set(config["versions"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and set(summary["metrics"]) >= {"final_average_accuracy", "bwt"}
    # each seed's last experience record is followed by its summary record: summary.json's per-seed metrics
    assert [r.get("experience", r["kind"]) for r in everything] == [0, 1, 2, 3, 4, "summary"] * 2
    for seed, record in zip((0, 1), summary_records(everything)):
        assert record == {"kind": "summary", "seed": seed, "method": "er", "norm": "adab2n",
                          "benchmark": "split-digits", "metrics": summary["per_seed"][str(seed)]}
        assert set(record["metrics"]) == {"final_average_accuracy", "average_incremental_accuracy", "forgetting",
                                          "bwt"}
    printed = capsys.readouterr().out
    assert "final average accuracy" in printed and "average incremental accuracy" in printed
    assert not (out / "checkpoints").exists()  # finished seeds leave no checkpoint

    before = _lines(out / "results.jsonl")
    # a kill after the last record but before the clean-up leaves a checkpoint (and a torn temporary) behind
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "seed1.pt").write_bytes(b"stale")
    (out / "checkpoints" / ".seed1.pt.x1y2.tmp").write_bytes(b"torn")
    assert _run(out, "--method", "er", "--norm", "adab2n", "--seeds", "0,1") == 0
    assert _lines(out / "results.jsonl") == before  # finished seeds are skipped
    assert not (out / "checkpoints").exists()  # and their leftovers removed

    assert _run(out, "--method", "er_ace", "--norm", "adab2n", "--seeds", "0") == 2  # another run's folder
    assert "different configuration" in capsys.readouterr().out


def _written_before_kinds(path):
    """Rewrite a results.jsonl as a run written before kinds and summary records existed left it."""
    old = [{k: v for k, v in r.items() if k != "kind"} for r in experience_records(read_records(path))]
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in old))
    return _lines(path)


def test_a_folder_written_before_summary_records_resumes_and_gets_them(tmp_path):
    options = ["--method", "er", "--norm", "bn", "--seeds", "0,1"]
    full, old = tmp_path / "full", tmp_path / "old"
    assert _run(full, *options) == 0
    expected = read_records(full / "results.jsonl")
    # finished: its summaries are appended once, after its records, and equal summary.json's per-seed metrics
    assert _run(old, *options) == 0
    lines = _written_before_kinds(old / "results.jsonl")
    assert _run(old, *options) == 0
    assert _lines(old / "results.jsonl")[: len(lines)] == lines
    assert summary_records(read_records(old / "results.jsonl")) == summary_records(expected)
    summary = json.loads((old / "summary.json").read_text())
    assert summary["per_seed"] == json.loads((full / "summary.json").read_text())["per_seed"]
    after = _lines(old / "results.jsonl")
    assert len(after) == len(lines) + 2
    assert _run(old, *options) == 0
    assert _lines(old / "results.jsonl") == after  # written once
    # unfinished: seed 0 resumes after its old records (without kind), then both seeds get their summaries
    partial = tmp_path / "partial"
    assert _run(partial, *options, "--stop-after", "2") == 0
    _written_before_kinds(partial / "results.jsonl")
    assert _run(partial, *options) == 0
    records = read_records(partial / "results.jsonl")
    assert [(r["seed"], r.get("experience", r.get("kind"))) for r in records] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (0, 4), (0, "summary"), (1, 2), (1, 3), (1, 4),
        (1, "summary")]
    assert ["kind" in r for r in records] == [False] * 4 + [True] * 8
    assert summary_records(records) == summary_records(expected)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    options = ["--method", "er", "--norm", "adab2n", "--momentum", "0.9", "--lr-schedule", "linear"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert _run(full, *options) == 0
    assert _run(split, *options, "--stop-after", "2") == 0
    partial = read_records(split / "results.jsonl")
    assert [r["experience"] for r in partial] == [0, 1]  # no summary record for an unfinished seed
    assert (split / "checkpoints" / "seed0.pt").exists()
    assert _run(split, *options) == 0
    resumed = read_records(split / "results.jsonl")
    uninterrupted = read_records(full / "results.jsonl")
    assert [r.get("experience", r["kind"]) for r in resumed] == [0, 1, 2, 3, 4, "summary"]
    assert resumed[-1] == uninterrupted[-1]
    resumed, uninterrupted = experience_records(resumed), experience_records(uninterrupted)
    for a, b in zip(resumed, uninterrupted):
        assert a["accuracies"] == b["accuracies"]
        assert a["adab2n"] == b["adab2n"]
        assert a["weight_norms"] == b["weight_norms"]


def test_random_labels_with_nap_keeps_weight_norms(tmp_path):
    out = tmp_path / "nap"
    assert main(["continual", "--out", str(out), "--benchmark", "random-labels", "--method", "sgd", "--norm", "nap",
                 "--tasks", "3", "--n-train", "64", "--image-size", "8", "--epochs", "2", "--hidden", "16,16",
                 "--no-progress", "--threads", "1"]) == 0
    records = experience_records(read_records(out / "results.jsonl"))
    assert len(records) == 3
    hidden = [name for name in records[0]["weight_norms"] if name != "head"]
    for name in hidden:  # the projected layers keep their norm; the head is free
        assert len({round(r["weight_norms"][name], 4) for r in records}) == 1, name


def test_nmc_on_a_pretrained_backbone(tmp_path, resnet20_weights):
    out = tmp_path / "nmc"
    assert main(["continual", "--out", str(out), "--method", "nmc", "--backbone", "cifar10_resnet20", "--weights",
                 str(resnet20_weights), "--n-train", "100", "--n-test", "50", "--no-progress", "--threads", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 < summary["metrics"]["final_average_accuracy"]["mean"] <= 1.0
    assert all("weight_norms" not in r for r in read_records(out / "results.jsonl"))


def test_split_digits_defaults_learn_every_task_with_layer_norm_and_nap(tmp_path):
    """The default network for layer/nap/none on split-digits learns each new task (it used to be the CNN, which
    learned none of them without batch centring: 50 % on every 2-class task)."""
    from continual.config import default_model

    assert default_model("split-digits", "layer") == default_model("split-digits", "nap") == "mlp"
    assert default_model("split-digits", "bn") == "cnn"
    assert default_model("split-cifar10", "layer") == "resnet18-reduced"
    out = tmp_path / "nap"
    assert main(["continual", "--out", str(out), "--method", "sgd", "--norm", "nap", "--no-progress", "--threads",
                 "1"]) == 0
    assert json.loads((out / "config.json").read_text())["config"]["model"] == "mlp"
    records = sorted(experience_records(read_records(out / "results.jsonl")), key=lambda r: r["experience"])
    just_learned = [r["accuracies"][r["experience"]] for r in records]
    assert len(just_learned) == 5 and min(just_learned) > 0.8, just_learned
