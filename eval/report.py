"""The comparison of a candidate with its baseline: rows, a markdown/terminal table, a PNG chart."""

import math
from pathlib import Path

# the metric a task's retention is averaged on, in order of preference
PRIMARY = ("acc_norm", "acc", "exact_match", "mc2", "word_perplexity", "perplexity")


def _metrics(task_results: dict) -> dict[str, tuple[float, float | None]]:
    """{"metric,filter": (value, stderr)} for the numeric metrics of one task."""
    out = {}
    for key, value in task_results.items():
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        stderr = task_results.get(f"{metric}_stderr,{filt}")
        out[key] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return out


def _primary(keys: list[str]) -> str | None:
    for name in PRIMARY:
        for key in keys:
            if key.split(",")[0] == name:
                return key
    return keys[0] if keys else None


def compare(baseline: dict, candidate: dict, tasks: list[str]) -> tuple[list[dict], float | None]:
    """Rows (task, metric, baseline, candidate, stderr of the delta, delta, retention %, primary) and the
    mean retention over the tasks' primary metrics."""
    rows, primaries = [], []
    for task in tasks:
        base = _metrics(baseline["results"].get(task, {}))
        cand = _metrics(candidate["results"].get(task, {}))
        better = candidate.get("higher_is_better", {}).get(task, {})
        keys = [k for k in cand if k in base]
        primary = _primary(keys)
        for key in keys:
            (b, sb), (c, sc) = base[key], cand[key]
            metric = key.split(",")[0]
            higher = better.get(metric, True)
            if higher:
                retention = 100.0 * c / b if b else (100.0 if c == b else math.inf)
            else:
                retention = 100.0 * b / c if c else (100.0 if c == b else math.inf)
            stderr = math.sqrt(sb**2 + sc**2) if sb is not None and sc is not None else None
            row = {"task": task, "metric": key.removesuffix(",none"), "higher_is_better": higher, "baseline": b,
                   "candidate": c, "stderr": stderr, "delta": c - b, "retention": retention,
                   "primary": key == primary}
            rows.append(row)
            if row["primary"]:
                primaries.append(retention)
    average = sum(primaries) / len(primaries) if primaries else None
    return rows, average


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.4g}"


def _signed(value: float) -> str:
    return f"{value:+.4f}" if abs(value) < 1e5 else f"{value:+.4g}"


def table(rows: list[dict], average: float | None, baseline: str, candidate: str) -> str:
    """A markdown table (also what the terminal shows); * marks the metric averaged for a task."""
    lines = [
        f"baseline: `{baseline}`  \ncandidate: `{candidate}`",
        "",
        "| task | metric | baseline | candidate | stderr | delta | retention % |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        arrow = "↑" if r["higher_is_better"] else "↓"
        mark = " *" if r["primary"] else ""
        lines.append(
            f"| {r['task']} | {r['metric']} {arrow}{mark} | {_fmt(r['baseline'])} | {_fmt(r['candidate'])} | "
            f"{_fmt(r['stderr'])} | {_signed(r['delta'])} | {_fmt(r['retention'], 2)} |"
        )
    lines.append(f"| **average** | (* metrics) | | | | | **{_fmt(average, 2)}** |")
    lines += ["", "stderr: of the delta, √(stderr_baseline² + stderr_candidate²). retention: candidate/baseline "
              "for ↑ metrics, baseline/candidate for ↓ ones."]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], average: float | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = [r for r in rows if r["primary"]]
    labels = [f"{r['task']}\n{r['metric']}" for r in primary]
    values = [r["retention"] if math.isfinite(r["retention"]) else 0.0 for r in primary]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(primary) + 2), 3.6))
    bars = ax.bar(range(len(primary)), values, color=["#4c72b0" if v >= 100 else "#dd8452" for v in values])
    ax.axhline(100, color="black", lw=0.8)
    if average is not None:
        ax.axhline(average, color="#55a868", lw=1.2, ls="--", label=f"average {average:.1f}%")
        ax.legend(loc="lower right")
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(primary)), labels, fontsize=8)
    ax.set_ylabel("retention % of baseline")
    ax.set_ylim(0, max(110.0, max(values, default=100.0) * 1.1))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
