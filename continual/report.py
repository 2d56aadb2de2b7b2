"""Reports rebuilt from ``results.jsonl`` alone (its experience records; the per-seed summary records hold the
same metrics, computed by :func:`seed_metrics`): accuracy matrices, metrics over seeds, tables and a heatmap.

Files written into the run folder: ``accuracy_matrix.csv`` / ``.md`` (mean over complete seeds, ± std in the
Markdown), ``accuracy_matrix_seeds.csv`` (long format: seed, after_task, task, accuracy), ``heatmap.png``,
``summary.json`` and ``summary.md`` (final average accuracy, average incremental accuracy, forgetting, BWT as
mean ± std over seeds, and a per-experience table with the accuracy on the newest task and the weight norm; for a
run with a pre-trained backbone, the classes it was trained on, per seed, from the backbone records).
With a single seed the spread is undefined: no ± is printed and the std is null in summary.json.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from continual.metrics import aggregate, summary
from continual.records import (backbone_records, experience_records, latest_by_key, read_records, write_json,
                               write_text)
from eval.report import pyplot

METRIC_LABELS = {
    "final_average_accuracy": "final average accuracy",
    "average_incremental_accuracy": "average incremental accuracy",
    "forgetting": "forgetting",
    "bwt": "BWT",
}


def seed_matrices(records: list[dict[str, Any]]) -> tuple[dict[int, np.ndarray], list[int]]:
    """({seed: R} for seeds with every experience recorded, [seeds still incomplete]); summary records are
    ignored."""
    by_seed: dict[int, dict[int, list[float]]] = {}
    for record in latest_by_key(experience_records(records)):
        by_seed.setdefault(int(record["seed"]), {})[int(record["experience"])] = record["accuracies"]
    complete, partial = {}, []
    for seed, rows in sorted(by_seed.items()):
        T = len(next(iter(rows.values())))
        if all(i in rows for i in range(T)):
            complete[seed] = np.array([rows[i] for i in range(T)], dtype=np.float64)
        else:
            partial.append(seed)
    return complete, partial


def seed_metrics(records: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """``{seed: {metric: value}}`` for every complete seed of ``records``: the per-seed metrics of summary.json
    and the metrics of each summary record in results.jsonl (one computation for both)."""
    return {seed: summary(R) for seed, R in seed_matrices(records)[0].items()}


def format_matrix(R: np.ndarray, std: np.ndarray | None = None, markdown: bool = False) -> str:
    """The accuracy matrix in percent, rows 'after task i', columns 'task j' (plain text or Markdown)."""
    T = R.shape[1]
    cell = (lambda i, j: f"{100 * R[i, j]:.1f}" + (f" ± {100 * std[i, j]:.1f}" if std is not None else ""))
    header = ["after \\ task"] + [str(j) for j in range(T)]
    rows = [[str(i)] + [cell(i, j) for j in range(T)] for i in range(R.shape[0])]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[k]) for r in [header] + rows) for k in range(len(header))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in [header] + rows)


def write_heatmap(path: Path, R: np.ndarray, title: str) -> None:
    plt = pyplot()

    T = R.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * T, 0.8 + 0.55 * T))
    image = ax.imshow(100 * R, vmin=0, vmax=100, cmap="viridis")
    for i in range(T):
        for j in range(R.shape[1]):
            ax.text(j, i, f"{100 * R[i, j]:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if R[i, j] < 0.6 else "black")
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after training task i")
    ax.set_xticks(range(R.shape[1]))
    ax.set_yticks(range(T))
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _per_experience(records: list[dict[str, Any]], seeds: list[int]) -> list[dict[str, Any]]:
    rows: dict[int, list[dict[str, Any]]] = {}
    for record in latest_by_key(experience_records(records)):
        if int(record["seed"]) in seeds:
            rows.setdefault(int(record["experience"]), []).append(record)
    out = []
    for i in sorted(rows):
        group = rows[i]
        entry = {"experience": i, "accuracy_on_this_task": float(np.mean([r["accuracies"][i] for r in group])),
                 "seen_average": float(np.mean([r["seen_average"] for r in group]))}
        if all("weight_norm_total" in r for r in group):
            entry["weight_norm_total"] = float(np.mean([r["weight_norm_total"] for r in group]))
        out.append(entry)
    return out


def write_report(out_dir: str | Path) -> dict[str, Any]:
    """Rebuild every report file of a run folder from its results.jsonl; returns the summary dict."""
    out_dir = Path(out_dir)
    records = read_records(out_dir / "results.jsonl")
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())["config"] if config_path.exists() else {}
    matrices, partial = seed_matrices(records)
    result: dict[str, Any] = {"seeds": sorted(matrices), "incomplete_seeds": partial, "config": config}
    backbones = {str(r["seed"]): r for r in backbone_records(records)}
    if backbones:
        result["backbone"] = backbones
    if not matrices:
        write_json(out_dir / "summary.json", result)
        return result
    per_seed = seed_metrics(records)
    stacked = np.stack(list(matrices.values()))
    mean_R = stacked.mean(0)
    std_R = stacked.std(0, ddof=1) if len(stacked) > 1 else None
    result.update({"metrics": aggregate(per_seed), "per_seed": {str(s): m for s, m in per_seed.items()},
                   "accuracy_matrix_mean": mean_R.tolist(),
                   "accuracy_matrix_std": None if std_R is None else std_R.tolist(),
                   "per_experience": _per_experience(records, sorted(matrices))})
    T = mean_R.shape[1]
    write_text(out_dir / "accuracy_matrix.csv", "after_task," + ",".join(f"task_{j}" for j in range(T)) + "\n" +
               "".join(f"{i}," + ",".join(f"{v:.6f}" for v in mean_R[i]) + "\n" for i in range(T)))
    write_text(out_dir / "accuracy_matrix_seeds.csv", "seed,after_task,task,accuracy\n" + "".join(
        f"{s},{i},{j},{R[i, j]:.6f}\n" for s, R in matrices.items() for i in range(T) for j in range(T)))
    title = (f"{config.get('benchmark', '?')} {config.get('method', '?')}/{config.get('norm', '?')}, "
             f"mean of {len(matrices)} seed(s)")
    write_text(out_dir / "accuracy_matrix.md", f"# Accuracy matrix ({title}), %\n\n"
               + format_matrix(mean_R, std_R, markdown=True) + "\n")
    write_heatmap(out_dir / "heatmap.png", mean_R, title)
    write_json(out_dir / "summary.json", result)
    write_text(out_dir / "summary.md", summary_markdown(result, title))
    return result


def summary_markdown(result: dict[str, Any], title: str) -> str:
    lines = [f"# {title}", "", f"seeds: {', '.join(map(str, result['seeds']))}"]
    if result["incomplete_seeds"]:
        lines.append(f"incomplete seeds (not in the means): {', '.join(map(str, result['incomplete_seeds']))}")
    if result.get("backbone"):
        lines += [""] + [f"- {backbone_line(seed, record)}" for seed, record in result["backbone"].items()]
    lines += ["", "| metric | mean ± std (%) |" if len(result["seeds"]) > 1 else "| metric | % |", "|---|---|"]
    for name, label in METRIC_LABELS.items():
        lines.append(f"| {label} | {mean_and_spread(result['metrics'][name])} |")
    lines += ["", "| after task | accuracy on that task (%) | average over seen tasks (%) | weight norm |",
              "|---|---|---|---|"]
    for row in result["per_experience"]:
        norm = f"{row['weight_norm_total']:.2f}" if "weight_norm_total" in row else "-"
        lines.append(f"| {row['experience']} | {100 * row['accuracy_on_this_task']:.2f} | "
                     f"{100 * row['seen_average']:.2f} | {norm} |")
    return "\n".join(lines) + "\n"


def backbone_line(seed: str, record: dict[str, Any]) -> str:
    """What a seed's pre-trained backbone was trained on, in words (from its backbone record)."""
    return (f"seed {seed}: backbone {record['model']} ({record['norm']}) pre-trained on classes "
            f"{', '.join(record['trained_on_class_names'])} only ({record['n_images']} images x {record['epochs']} "
            f"epochs, {100 * record['test_accuracy_on_trained_classes']:.1f} % on their test images); learned "
            f"incrementally: classes {', '.join(record['incremental_class_names'])}")


def print_report(result: dict[str, Any]) -> str:
    """Plain-text table and metrics for the terminal."""
    if "metrics" not in result:
        return "no complete seed yet"
    mean_R = np.array(result["accuracy_matrix_mean"])
    std = result["accuracy_matrix_std"]
    over = (f"mean ± std over seeds {', '.join(map(str, result['seeds']))}" if std is not None
            else f"seed {result['seeds'][0]}")
    text = [backbone_line(seed, record) for seed, record in result.get("backbone", {}).items()]
    text += [f"accuracy matrix (%), {over}", format_matrix(mean_R, None if std is None else np.array(std))]
    for name, label in METRIC_LABELS.items():
        text.append(f"{label}: {mean_and_spread(result['metrics'][name])} %")
    return "\n".join(text)


def mean_and_spread(metric: dict[str, Any]) -> str:
    """``mean ± std`` in percent, or the mean alone when the spread is undefined (one seed)."""
    spread = "" if metric["std"] is None else f" ± {100 * metric['std']:.2f}"
    return f"{100 * metric['mean']:.2f}{spread}"
