"""Run reports (Markdown, JSON, a bar chart) and side-by-side comparisons of runs (``ragline compare``)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

from ragline import atomic, vocab
from ragline.errors import RaglineError

SHOWN = ("em", "f1", "accuracy", "rouge_l", "bleu1", "r_precision", "recall@1", "recall@5", "recall@10",
         "kilt_em", "kilt_f1", "kilt_accuracy", "kilt_rouge_l")
CHARTED = ("em", "f1", "accuracy", "rouge_l", "bleu1", "r_precision", "kilt_em", "kilt_f1", "kilt_accuracy")


def describe(config: dict) -> str:
    """A short label of a run's system: model, decoding, retrieval, k."""
    if config["model"] == vocab.CLOSED_BOOK:
        return vocab.CLOSED_BOOK
    decoding = config.get("decoding") or vocab.default_decoding(config["model"])
    return f"{config['model']} {decoding}, {config['mode']} k={config['k']}"


def _metric_columns(reports: Sequence[dict]) -> list[str]:
    present = {k for r in reports for k in r["metrics"]}
    return [c for c in SHOWN if c in present]


def markdown(report: dict) -> str:
    cfg, m = report["config"], report["metrics"]
    lines = [f"# Run {report['run']}", "",
             f"- task: {report['task']['name']} ({report['task']['format']}, {report['task']['kind']} answers), "
             f"{int(m['questions'])} questions, {int(m['answered'])} answered"
             + (f", {len(report['task']['skipped'])} malformed records skipped" if report["task"]["skipped"] else ""),
             f"- system: {describe(cfg)}; generator {cfg['generator']}; beams {cfg['beams']}, length penalty "
             f"{cfg['length_penalty']}, prior scale {cfg['prior_scale']}, at most {cfg['max_new_tokens']} new tokens"]
    if report.get("index"):
        ix = report["index"]
        lines.append(f"- index: {ix['name']} (fingerprint {ix['fingerprint']}, {ix['passages']} passages)")
    lines += [f"- time: {report['timing']['seconds_per_question']:.2f} s per question, "
              f"{report['timing']['seconds']:.0f} s in all", "", "| metric | value |", "|---|---|"]
    lines += [f"| {c} | {m[c]:.3f} |" for c in _metric_columns([report])]
    return "\n".join(lines) + "\n"


def _chart(labels: list[str], reports: Sequence[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in CHARTED if any(c in r["metrics"] for r in reports)]
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.9 * len(cols) * max(1, len(reports)) ** 0.5 + 2)), 4.2))
    width = 0.8 / max(len(reports), 1)
    colours = plt.get_cmap("tab20" if len(reports) > 10 else "tab10")  # one colour per run
    for i, (label, r) in enumerate(zip(labels, reports, strict=True)):
        xs = [j + (i - (len(reports) - 1) / 2) * width for j in range(len(cols))]
        ax.bar(xs, [r["metrics"].get(c, 0.0) for c in cols], width, label=label, color=colours(i))
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2 if len(reports) > 3 else 1,
              frameon=False)  # below the axes: never over the bars
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_report(out: Path, report: dict) -> None:
    atomic.write_json(out / "report.json", report)
    atomic.write_bytes(out / "report.md", markdown(report).encode())
    atomic.write_bytes(out / "metrics.png", _chart([describe(report["config"])], [report], f"run {report['run']}"))


def load_report(run: Path) -> dict:
    path = Path(run) / "report.json"
    if not path.is_file():
        raise RaglineError(f"{run} has no report.json",
                           "finish the run first: rerun `ragline eval` with the same --out")
    return json.loads(path.read_text())


def compare(runs: Sequence[Path], png: Path | None = None) -> str:
    """A Markdown table of the runs side by side (one row each); with ``png``, a grouped bar chart."""
    if not runs:
        raise RaglineError("no run to compare", "pass one or more run directories")
    reports = [load_report(r) for r in runs]
    tasks = {r["task"]["name"] for r in reports}
    cols = _metric_columns(reports)
    head = ["run", "system", "generator", "questions", *cols, "s/question"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        m = r["metrics"]
        cells = [r["run"], describe(r["config"]), r["config"]["generator"], str(int(m["questions"]))]
        cells += [f"{m[c]:.3f}" if c in m else "-" for c in cols]
        cells.append(f"{r['timing']['seconds_per_question']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    note = "" if len(tasks) == 1 else "\nNote: these runs are on different tasks: " + ", ".join(sorted(tasks)) + "\n"
    if png is not None:
        atomic.write_bytes(png, _chart([f"{r['run']}: {describe(r['config'])}" for r in reports], reports,
                                       ", ".join(sorted(tasks))))
    return "\n".join(lines) + "\n" + note

