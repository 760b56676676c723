"""A self-contained HTML report (plots embedded as base64 PNG, also written beside it as files)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rebalance.data.atomic import atomic_write_bytes  # noqa: E402
from rebalance.data.fs import StoragePath, as_path  # noqa: E402

__all__ = ["write_html"]


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _sizes_plot(name: str, dist: dict[str, Any]) -> bytes:
    counts = np.array(dist["counts"], float)
    order = np.argsort(-counts)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(counts.size)
    ax.bar(x, counts[order], color="#bbbbbb", label="before (rows)")
    ax.plot(x, np.array(dist["balanced"])[order], "o-", ms=3, color="#1f77b4", label="after (weighted rows)")
    ax.plot(x, np.array(dist["target"])[order], "--", color="#d62728", lw=1, label="target")
    ax.set_yscale("log")
    ax.set_xlabel(f"{name} values, by size before balancing")
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    return _png(fig)


def _weights_plot(hist: dict[str, Any]) -> bytes:
    edges = np.array(hist["log10_edges"])
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(10 ** edges[:-1], hist["rows"], width=np.diff(10**edges), align="edge", color="#1f77b4")
    ax.set_xscale("log")
    ax.set_xlabel("weight")
    ax.set_ylabel("rows")
    return _png(fig)


def _error_plot(errors: list[float]) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.semilogy(np.arange(len(errors)), np.maximum(errors, 1e-17), "o-", ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("largest marginal error (TV)")
    return _png(fig)


def _spectra_plot(title: str, entry: dict[str, Any]) -> bytes:
    """Eigen-spectra (log-log) of the largest and the smallest valid group, before balancing."""
    before = entry["before"]
    rows = np.array(before["rows"], float)
    valid = np.flatnonzero(before["valid"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for g, style in ((valid[np.argmax(rows[valid])], "-"), (valid[np.argmin(rows[valid])], "--")):
        eigs = np.array(before["top_eigenvalues"][g])
        eigs = eigs[eigs > 0]
        ax.loglog(
            np.arange(1, eigs.size + 1),
            eigs,
            style,
            label=f"group {entry['labels'][g]} ({int(rows[g])} rows)",
        )
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _png(fig)


def _scores_plot(title: str, entry: dict[str, Any]) -> bytes:
    """Spectral quantile score per group, before and after balancing, groups by size."""
    rows = np.array(entry["before"]["rows"], float)
    order = np.argsort(-rows)
    fig, ax = plt.subplots(figsize=(7, 3))
    x = np.arange(order.size)
    ax.bar(x - 0.2, np.array(entry["before"]["sqs"])[order], width=0.4, color="#bbbbbb", label="before")
    ax.bar(x + 0.2, np.array(entry["after"]["sqs"])[order], width=0.4, color="#1f77b4", label="after")
    ax.axhline(1, color="#d62728", lw=1)
    ax.set_xlabel("groups, by size")
    ax.set_ylabel(f"SQS (q = {entry['q']})")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _png(fig)


def write_html(
    report: dict[str, Any], balance: dict[str, Any], out_dir: str | Path | StoragePath
) -> list[str]:
    """Render the plots and ``report.html`` into ``out_dir`` (a local directory or a URI); returns the file
    names written."""
    out_dir = as_path(out_dir)
    plots: dict[str, tuple[str, bytes]] = {}
    for name, dist in balance["marginal_distributions"].items():
        plots[f"sizes_{name}.png"] = (f"Sizes per {name} value, before and after", _sizes_plot(name, dist))
    plots["weights.png"] = ("Weight histogram", _weights_plot(balance["weight_histogram"]))
    plots["marginal_error.png"] = (
        "Largest marginal error per iteration",
        _error_plot(report["balance"]["marginal_error_per_iteration"]),
    )
    for column, sides in report.get("spectra", {}).items():
        for side, entry in sides.items():
            if not any(entry["before"]["valid"]):
                continue
            label = f"{side} embeddings by {column}"
            plots[f"spectra_{column}_{side}.png"] = (f"Eigen-spectra, {label}", _spectra_plot(label, entry))
            plots[f"sqs_{column}_{side}.png"] = (
                f"Spectral quantile scores, {label}",
                _scores_plot(label, entry),
            )
    for file_name, (_, data) in plots.items():
        atomic_write_bytes(data, out_dir / file_name)
    b = report["balance"]
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{m['before']['values']}</td>"
        f"<td>{m['before']['imbalance_ratio']:.1f}</td><td>{m['after']['imbalance_ratio']:.2f}</td>"
        f"<td>{m['before']['gini']:.3f}</td><td>{m['after']['gini']:.3f}</td>"
        f"<td>{m['before']['normalized_entropy']:.3f}</td><td>{m['after']['normalized_entropy']:.3f}</td>"
        f"<td>{m['final_marginal_error']:.2e}</td></tr>"
        for name, m in report["marginals"].items()
    )
    figures = "".join(
        f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
        for title, data in plots.values()
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rebalance report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}}
figure{{margin:1.5rem 0}}img{{max-width:100%}}</style></head><body>
<h1>rebalance report</h1>
<p>{report["rows"]} rows ({report["rejected_rows"]} rejected), {b["cells"]} cells over {", ".join(b["marginals"])};
{"converged" if b["converged"] else "NOT converged"} after {b["passes"]} iterations, largest marginal error
{b["final_marginal_error"]:.2e}. ESS {b["ess"]:.1f} ({100 * b["ess_fraction"]:.1f}% of rows), largest weight
{b["max_weight"]:.3f}.</p>
<table><tr><th>marginal</th><th>values</th><th>imbalance before</th><th>after</th><th>Gini before</th>
<th>after</th><th>entropy before</th><th>after</th><th>marginal error</th></tr>{rows}</table>
{figures}
</body></html>
"""
    atomic_write_bytes(page.encode(), out_dir / "report.html")
    return ["report.html", *plots]
