"""`hybridtrain report RUN_OR_SWEEP_DIR`: what happened, as pictures.

Writes `report.html` (self-contained: every plot embedded as a PNG data URI, no scripts, no network)
and the plots as PNG files beside it, in `DIR/report/`.

A run directory (`metrics.csv`, `interventions.csv`, `summary.json`) gets: learning curves with every
advisor intervention marked (accepted, rejected, invalid and other dropped answers drawn differently),
the blending alpha per layer group over time, the reward per proposal, advisor latency and cache hits,
and probation time. A sweep directory (`results.csv`, `explores.csv`) gets each trial's curve with its
exploits marked by source (LLM explore, fallback, PBT) and the final comparison table.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cluster.rundir import UnreadableFileError, read_json
from orchestration.errors import ReportError
from workers.lr_find import LR_FIND_CSV, LR_FIND_JSON

REPORT_DIR = "report"
DROPPED = ("invalid", "stale", "timeout", "error")  # answers that were never applied
_STYLE = {  # marker, colour, label of each kind of intervention on the learning curves
    "accepted": ("^", "#2ca02c", "accepted"),
    "rejected": ("x", "#d62728", "rejected (rolled back)"),
    "dropped": ("s", "#ff7f0e", "not applied (invalid, stale, timeout, error)"),
    "llm": ("^", "#9467bd", "LLM explore"),
    "fallback": ("x", "#ff7f0e", "fallback"),
    "pbt": ("o", "#1f77b4", "PBT explore"),
}


@dataclass(slots=True)
class Figure:
    name: str  # file name stem
    title: str
    png: bytes


def write_report(directory: str | Path) -> Path:
    """Write the report for a run or sweep directory; return the HTML file's path."""
    directory = Path(directory)
    if (directory / "results.csv").is_file():
        kind, figures, tables = "sweep", *_sweep_figures(directory)
    elif (directory / "metrics.csv").is_file():
        kind, figures, tables = "run", *_run_figures(directory)
    else:
        raise ReportError(f"{str(directory)!r} is not a run directory (no metrics.csv) or a sweep directory (no results.csv)")
    out = directory / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for figure in figures:
        (out / f"{figure.name}.png").write_bytes(figure.png)
    page = out / "report.html"
    page.write_text(_html(directory, kind, figures, tables), encoding="utf-8")
    return page


# -- runs ---------------------------------------------------------------------------------------------------

def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame()
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ReportError(f"cannot read {path}: {error}") from error


def _read_summary(directory: Path, kind: str) -> dict:
    """`summary.json` ({} before the run or sweep has finished); a torn one is a `ReportError` that says how to get it back."""
    try:
        summary = read_json(directory / "summary.json")
    except UnreadableFileError as error:
        again = f"hybridtrain run --resume {directory}" if kind == "run" else f"hybridtrain tune --resume {directory}"
        raise ReportError(f"{error}. Resume the {kind} to write it again ({again}), then report") from None
    if summary is not None and not isinstance(summary, dict):
        raise ReportError(f"{directory / 'summary.json'} holds a {type(summary).__name__}, not the {kind}'s summary (a JSON object)")
    return summary or {}


def _run_figures(run_dir: Path) -> tuple[list[Figure], list[tuple[str, str]]]:
    metrics = _read_csv(run_dir / "metrics.csv")
    ledger = _read_csv(run_dir / "interventions.csv")
    if metrics.empty:
        raise ReportError(f"{run_dir / 'metrics.csv'} has no epochs yet")
    figures = [_learning_curves(metrics, ledger)]
    if not ledger.empty:
        figures += [_alphas(ledger), _rewards(ledger), _advisor(ledger)]
    figures.append(_probation(metrics))
    lr_find = _read_csv(run_dir / LR_FIND_CSV)
    if not lr_find.empty:
        figures.append(_lr_find(lr_find, json.loads((run_dir / LR_FIND_JSON).read_text()) if (run_dir / LR_FIND_JSON).exists() else {}))
    summary = _read_summary(run_dir, "run")
    if isinstance(summary.get("lr_find"), dict):
        summary = {**summary, "lr_found": summary["lr_find"]["lr"]}
    keys = ("test_accuracy", "test_macro_f1", "lr_found", "epochs", "wall_s", "advisor_queries", "cache_hits", "kept_unasked", "proposals_accepted",
            "proposals_rejected", "proposals_invalid", "zero_stage", "precision", "world_size")
    table = pd.DataFrame([(key, summary[key]) for key in keys if key in summary], columns=["", "value"])
    tables = [("Summary", table.to_html(index=False, float_format=lambda value: f"{value:.4g}"))] if len(table) else []
    if not ledger.empty:
        verdicts = ledger[ledger.kind == "verdict"][["epoch", "query_id", "proposal_summary", "reward", "verdict", "reason"]]
        if len(verdicts):
            tables.append(("Proposals judged on probation", verdicts.to_html(index=False, float_format=lambda value: f"{value:.4g}")))
    return figures, tables


def _events(ledger: pd.DataFrame) -> dict[str, list[int]]:
    """Epochs of accepted, rejected and dropped advisor answers."""
    if ledger.empty:
        return {}
    verdicts = ledger[ledger.kind == "verdict"]
    return {"accepted": verdicts[verdicts.verdict == "accepted"].epoch.tolist(),
            "rejected": verdicts[verdicts.verdict != "accepted"].epoch.tolist(),
            "dropped": ledger[ledger.kind.isin(DROPPED)].epoch.tolist()}


def _learning_curves(metrics: pd.DataFrame, ledger: pd.DataFrame) -> Figure:
    figure, (losses, accuracy) = _subplots(2)
    for column, style in (("train_loss", "-"), ("val_loss", "--")):
        if column in metrics:
            losses.plot(metrics.epoch, metrics[column], style, label=column.replace("_", " "))
    losses.set_ylabel("loss")
    if "val_accuracy" in metrics:
        accuracy.plot(metrics.epoch, metrics.val_accuracy, "-", color="#444", label="validation accuracy")
    accuracy.set_ylabel("validation accuracy")
    for kind, epochs in _events(ledger).items():
        marker, colour, label = _STYLE[kind]
        at = metrics.set_index("epoch").val_accuracy.reindex(epochs) if "val_accuracy" in metrics else pd.Series(dtype=float)
        if len(epochs):
            accuracy.scatter(epochs, at.fillna(metrics.val_accuracy.min()).to_numpy(), marker=marker, color=colour, s=70, zorder=3,
                             label=f"{label} ({len(epochs)})")
            for epoch in epochs:
                losses.axvline(epoch, color=colour, alpha=0.25, linewidth=1)
    for axis in (losses, accuracy):
        axis.set_xlabel("epoch")
        axis.legend(fontsize=8)
    return _figure("learning_curves", "Learning curves and advisor interventions", figure)


def _alphas(ledger: pd.DataFrame) -> Figure:
    figure, (axis,) = _subplots(1)
    rows = [(row.epoch, json.loads(row.alphas_json)) for row in ledger.itertuples()
            if row.kind == "proposal" and isinstance(row.alphas_json, str) and row.alphas_json.strip() not in ("", "{}")]
    groups = sorted({group for _, alphas in rows for group in alphas})
    for group in groups:
        points = [(epoch, alphas[group]) for epoch, alphas in rows if group in alphas]
        axis.plot([p[0] for p in points], [p[1] for p in points], "o-", label=group)
    if not groups:
        axis.text(0.5, 0.5, "no weight changes were blended", ha="center", va="center", transform=axis.transAxes)
    else:
        axis.legend(fontsize=8)
    axis.set_xlabel("epoch")
    axis.set_ylabel("alpha (stability factor)")
    return _figure("alphas", "Blending alpha per layer group", figure)


def _rewards(ledger: pd.DataFrame) -> Figure:
    figure, (axis,) = _subplots(1)
    verdicts = ledger[ledger.kind == "verdict"].reset_index(drop=True)
    if len(verdicts):
        colours = ["#2ca02c" if verdict == "accepted" else "#d62728" for verdict in verdicts.verdict]
        rewards = verdicts.reward.clip(-1, 1)  # an infinite reward (a rescued or diverged branch) shows at the edge
        axis.bar(range(len(verdicts)), rewards, color=colours)
        axis.set_xticks(range(len(verdicts)), [f"e{epoch}" for epoch in verdicts.epoch], fontsize=8)
        axis.axhline(0, color="#444", linewidth=0.8)
    else:
        axis.text(0.5, 0.5, "no proposal reached probation", ha="center", va="center", transform=axis.transAxes)
    axis.set_ylabel("reward (clipped to [-1, 1])")
    axis.set_xlabel("proposal (epoch); green accepted, red rejected")
    return _figure("rewards", "Reward per proposal", figure)


def _advisor(ledger: pd.DataFrame) -> Figure:
    figure, (latency, cache) = _subplots(2)
    answered = ledger[ledger.latency_s.notna()] if "latency_s" in ledger else pd.DataFrame()
    if len(answered):
        latency.plot(answered.epoch, answered.latency_s, "o", color="#1f77b4")
    else:
        latency.text(0.5, 0.5, "no answers", ha="center", va="center", transform=latency.transAxes)
    latency.set_xlabel("epoch")
    latency.set_ylabel("advisor latency (s)")
    counts = ledger.kind.value_counts()
    queries, hits, kept = (int(counts.get(kind, 0)) for kind in ("query", "cache_hit", "kept"))
    cache.bar(["asked the model", "cache hits", "kept, no finding"], [queries, hits, kept], color=["#1f77b4", "#2ca02c", "#7f7f7f"])
    rate = hits / (queries + hits) if queries + hits else 0.0
    cache.set_title(f"cache hit rate {rate:.0%}", fontsize=9)
    return _figure("advisor", "Advisor latency and cache hits", figure)


def _probation(metrics: pd.DataFrame) -> Figure:
    figure, (axis,) = _subplots(1)
    if "probation_s" in metrics and "wall_s" in metrics:
        axis.plot(metrics.epoch, metrics.wall_s, "-", label="training wall time")
        axis.plot(metrics.epoch, metrics.probation_s, "-", label="of which probation")
        axis.legend(fontsize=8)
    axis.set_xlabel("epoch")
    axis.set_ylabel("seconds (cumulative)")
    return _figure("probation", "Probation time", figure)


# -- sweeps -------------------------------------------------------------------------------------------------

def _lr_find(curve: pd.DataFrame, choice: dict) -> Figure:
    """The LR range test (`train.lr: find`): smoothed loss over the learning rate, the chosen rate marked."""
    figure, (axis,) = _subplots(1)
    axis.plot(curve["lr"], curve["loss"], alpha=0.3, label="loss")
    axis.plot(curve["lr"], curve["smoothed"], label="smoothed")
    if choice.get("lr"):
        axis.axvline(choice["lr"], color="k", linestyle="--", label=f"chosen {choice['lr']:.3g}" + (" (fallback)" if choice.get("fallback") else ""))
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("training loss")
    axis.legend()
    return _figure("lr_find", "LR range test", figure)


def _trial_curve(run_dir: Path) -> pd.DataFrame:
    """Every run of one trial (a trial restarts as run-N after each exploit), in epoch order."""
    runs = sorted(run_dir.parent.glob("run-*/metrics.csv"), key=lambda path: int(path.parent.name[4:]))
    frames = [_read_csv(path) for path in runs]
    frames = [frame for frame in frames if not frame.empty]
    return pd.concat(frames).drop_duplicates("epoch", keep="last").sort_values("epoch") if frames else pd.DataFrame()


def _sweep_figures(sweep_dir: Path) -> tuple[list[Figure], list[tuple[str, str]]]:
    results = _read_csv(sweep_dir / "results.csv")
    explores = _read_csv(sweep_dir / "explores.csv")
    summary = _read_summary(sweep_dir, "sweep")
    metric = summary.get("metric", "val_accuracy")
    figure, (axis,) = _subplots(1, width=10)
    for row in results.itertuples():
        curve = _trial_curve(Path(row.run_dir)) if isinstance(row.run_dir, str) else pd.DataFrame()
        if curve.empty or metric not in curve:
            continue
        line, = axis.plot(curve.epoch, curve[metric], "-", label=row.trial)
        if not explores.empty:
            for source in ("llm", "fallback", "pbt"):
                mine = explores[(explores.trial == row.trial) & (explores.source == source)]
                if len(mine):
                    marker, colour, _ = _STYLE[source]
                    at = curve.set_index("epoch")[metric].reindex(mine.epoch)
                    axis.scatter(mine.epoch, at.to_numpy(), marker=marker, color=colour, s=70, zorder=3)
    for source in ("llm", "fallback", "pbt"):  # legend entries for the explore markers
        marker, colour, label = _STYLE[source]
        axis.scatter([], [], marker=marker, color=colour, label=label)
    axis.set_xlabel("epoch")
    axis.set_ylabel(metric)
    axis.legend(fontsize=7, ncol=2)
    columns = [column for column in results.columns if column not in ("run_dir", "error")]
    tables = [("Trials", results[columns].to_html(index=False, float_format=lambda value: f"{value:.4g}"))]
    if not explores.empty:
        tables.append(("Exploits and explores", explores[["trial", "source_trial", "epoch", "source", "config", "score_after"]]
                       .to_html(index=False, float_format=lambda value: f"{value:.4g}")))
    return [_figure("trials", f"Each trial's {metric}, exploits marked", figure)], tables


# -- drawing ------------------------------------------------------------------------------------------------

def _subplots(count: int, *, width: float = 5.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, count, figsize=(width * count if count > 1 else width * 1.6, 3.6), squeeze=False)
    for axis in axes[0]:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure, list(axes[0])


def _figure(name: str, title: str, figure) -> Figure:
    import matplotlib.pyplot as plt

    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return Figure(name=name, title=title, png=buffer.getvalue())


def _html(directory: Path, kind: str, figures: list[Figure], tables: list[tuple[str, str]]) -> str:
    parts = [f"<h1>hybridtrain {kind} report</h1><p><code>{html.escape(str(directory.resolve()))}</code></p>"]
    for figure in figures:
        data = base64.b64encode(figure.png).decode("ascii")
        parts.append(f'<figure><img alt="{html.escape(figure.title)}" src="data:image/png;base64,{data}">'
                     "</figure>")
    for title, table in tables:
        parts.append(f"<h2>{html.escape(title)}</h2>{table}")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}img{max-width:100%}figure{margin:1.5em 0}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>hybridtrain {kind} report</title>'
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
