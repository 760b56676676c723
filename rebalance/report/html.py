"""The self-contained HTML report a curator reads (docs/report.md, "report.html").

One page, no network: plots are PNG data URIs (also written beside it as files), thumbnails are WebP data
URIs, and the embedding map is a Plotly figure with Plotly's JavaScript bundled inline. Sections: the
headline and the statistics with their definitions; what balancing moved (the most up- and down-weighted
concepts, the weight distribution, the heaviest rows); the embedding map; a card per concept; convergence;
covariance spectra.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from rebalance.data.atomic import atomic_write_bytes  # noqa: E402
from rebalance.data.fs import StoragePath, as_path  # noqa: E402

__all__ = ["write_html", "MOVED_CONCEPTS", "SIZE_TICKS"]

MOVED_CONCEPTS = 6  # concepts listed as most up- and as most down-weighted, per balanced column
SIZE_TICKS = 64  # the sizes plot names every value up to this many values
ERROR_FLOOR = 1e-12  # marginal errors below this (round-off of an exact fit) are drawn at it, log scale
RANK_TOLERANCE = 1e-10  # eigenvalues below this fraction of the largest are round-off of exact zeros
_DOCS = Path(__file__).resolve().parents[2] / "docs"


def _doc(page: str, anchor: str, text: str = "docs") -> str:
    """A link to a section of the project's docs (a file: link to the checkout when it has them)."""
    base = (_DOCS / page).as_uri() if (_DOCS / page).is_file() else f"docs/{page}"
    return f"<a class='doc' href='{base}#{anchor}'>{html.escape(text)}</a>"


DEFINITIONS = {
    "imbalance": "Imbalance ratio: rows of the largest value divided by rows of the smallest non-empty value "
    "(1 = all equal). " + _doc("report.md", "imbalance-ratio"),
    "gini": "Gini coefficient of the sizes: 0 when every value has the same number of rows, near 1 when one "
    "value holds nearly all. " + _doc("report.md", "gini-coefficient"),
    "entropy": "Normalized entropy: the entropy of the value distribution divided by its maximum log K; 1 "
    "means uniform. " + _doc("report.md", "normalized-entropy"),
    "ess": "Effective sample size (sum w)^2 / sum w^2: how many equally-weighted rows the weighted data is "
    "worth; uneven weights lower it. " + _doc("report.md", "effective-sample-size-ess"),
    "error": "Marginal error: total-variation distance 0.5 sum_v |q(v) - t(v)| between the weighted share q "
    "and the target share t of each value; 0 means the target is met exactly. "
    + _doc("report.md", "marginal-error"),
    "nmi": "Normalized mutual information (NMI) between a concept column and the ground truth: their mutual "
    "information divided by the mean of their entropies; 1 when the concepts are exactly the true labels, 0 "
    "when they tell nothing about them. " + _doc("report.md", "nmi-and-purity"),
    "purity": "Purity: the share of rows whose concept's most common true label is their own; 1 when every "
    "concept holds a single true label (more concepts than labels can still be pure). "
    + _doc("report.md", "nmi-and-purity"),
    "tv_uniform": "TV to uniform: the total-variation distance 0.5 sum_t |s_t - 1/T| between the true "
    "labels' shares s and the uniform share 1/T over the T labels; 0 when every true label counts the same. "
    + _doc("report.md", "true-label-shares"),
    "relax": "A relaxed marginal (strength rho) trades its target for smaller weights: the weights minimise "
    "KL(q||p) + rho KL(q_m||t_m), so rho near 0 leaves the data as it is and rho to infinity is the exact "
    "balancing; its marginal error is the distance to the target the relaxation keeps. "
    + _doc("report.md", "balancing-strength-relax-and-min_ess"),
    "sqs": "Spectral quantile score (SQS): the median eigenvalue of a group's embedding covariance divided by "
    "the median of that over all groups; above 1 the group is more spread (more varied) than the typical "
    "group, below 1 more collapsed. " + _doc("spectra.md", "spectra-and-scores"),
}


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _value_axis(ax, labels: list[str], name: str, by: str, rotate_above: int) -> None:
    """Name every value on the x axis (up to SIZE_TICKS of them; vertical beyond ``rotate_above``) and say
    how they are ordered."""
    if len(labels) <= SIZE_TICKS:
        rotation = 90 if len(labels) > rotate_above else 0
        ax.set_xticks(np.arange(len(labels)), labels, rotation=rotation, fontsize=7)
        ax.set_xlabel(f"{name} (ordered by {by})")
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(labels)} {name} values, ordered by {by}")


def _sizes_plot(name: str, dist: dict[str, Any]) -> bytes:
    """Rows per value before (bars), weighted rows after and the target, values ordered by size before and
    named on the x axis (by id / value, up to SIZE_TICKS values)."""
    counts = np.array(dist["counts"], float)
    order = np.argsort(-counts, kind="stable")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(counts.size)
    ax.bar(x, counts[order], color="#bbbbbb", label="before (rows)")
    ax.plot(x, np.array(dist["balanced"])[order], "o-", ms=3, color="#1f77b4", label="after (weighted rows)")
    ax.plot(x, np.array(dist["target"])[order], "--", color="#d62728", lw=1, label="target")
    ax.set_yscale("log")
    _value_axis(ax, [dist["values"][i] for i in order], name, "rows before balancing", 16)
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    return _png(fig)


def _weights_plot(hist: dict[str, Any], percentiles: dict[str, float] | None) -> bytes:
    edges = np.array(hist["log10_edges"])
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(10 ** edges[:-1], hist["rows"], width=np.diff(10**edges), align="edge", color="#1f77b4")
    ax.axvline(1, color="#444444", lw=1, ls=":", label="weight 1 (unchanged)")
    if percentiles:
        for q, style in (("p5", "--"), ("p50", "-"), ("p95", "--")):
            ax.axvline(percentiles[q], color="#d62728", lw=1, ls=style, label=f"{q[1:]}th percentile")
    ax.set_xscale("log")
    ax.set_xlabel("weight")
    ax.set_ylabel("rows")
    ax.legend(fontsize=7)
    return _png(fig)


def _error_plot(errors: list[float]) -> bytes:
    """Largest marginal error per pass: integer passes, a symmetric-log y axis so that an exact 0 is
    drawn at 0 (not at a floating-point floor)."""
    errors = np.array(errors, float)
    fig, ax = plt.subplots(figsize=(7, 3))
    positive = errors[errors > 0]
    ax.plot(np.arange(errors.size), errors, "o-", ms=3)
    ax.set_yscale("symlog", linthresh=float(positive.min()) / 2 if positive.size else 1e-12)
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("pass (0 = before balancing)")
    ax.set_ylabel("largest marginal error (TV)")
    return _png(fig)


def _frontier_plot(search: dict[str, Any]) -> bytes:
    """The ``balance.min_ess`` search: ESS fraction, largest weight and marginal error per strength rho
    tried (log x; the exact balancing, rho = infinity, drawn right of the largest rho), the floor dashed and
    the chosen strength marked."""
    points = search["frontier"]
    numeric = [p["rho"] for p in points if not isinstance(p["rho"], str)]
    right = 10 * max(numeric, default=1.0)
    x = np.array([right if isinstance(p["rho"], str) else p["rho"] for p in points], float)
    order = np.argsort(x, kind="stable")
    chosen = right if isinstance(search["rho"], str) else float(search["rho"])
    fig, axes = plt.subplots(3, 1, figsize=(7, 6.4), sharex=True)
    axes[0].plot(x[order], np.array([p["ess"] for p in points])[order], "o-", ms=4)
    axes[0].axhline(search["floor"], color="#d62728", lw=1, ls="--", label=f"floor {search['floor']:g}")
    axes[0].set_ylabel("ESS / rows")
    axes[1].plot(x[order], np.array([p["max_weight"] for p in points])[order], "o-", ms=4, color="#8c564b")
    axes[1].set_ylabel("largest weight")
    for name in points[0]["marginal_error"]:
        errors = np.array([p["marginal_error"][name] for p in points], float)[order]
        axes[2].plot(x[order], np.maximum(errors, ERROR_FLOOR), "o-", ms=4, label=name)
    axes[2].set_yscale("log")
    axes[2].set_ylabel(f"marginal error (TV;\nbelow {ERROR_FLOOR:g} at {ERROR_FLOOR:g})", fontsize=8)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("relaxation strength rho")
    if any(isinstance(p["rho"], str) for p in points):  # the exact balancing, rho = infinity
        ticks = [t for t in axes[2].get_xticks() if x.min() <= t < right]
        axes[2].set_xticks([*ticks, right], [f"{t:g}" for t in ticks] + ["exact"])
    for ax in axes:
        ax.axvline(chosen, color="#2ca02c", lw=1, label="chosen")
        ax.legend(fontsize=7)
    return _png(fig)


def _rho(value: float | str) -> str:
    """A strength of the min_ess search: ``exact`` / ``as relax`` as they are, a number as rho = x."""
    return value if isinstance(value, str) else f"rho = {value:.4g}"


def _strength_section(report: dict[str, Any], plots: dict) -> str:
    """The balancing strength: ``balance.relax`` per marginal and, with ``balance.min_ess``, its search."""
    b = report["balance"]
    relax = b.get("relax") or {}
    if not relax:
        return ""
    named = ", ".join(
        f"{html.escape(m)} {'exact' if r == 'exact' else f'relaxed (rho = {r:g})'}" for m, r in relax.items()
    )
    out = [f"<p>balance.relax: {named}. {DEFINITIONS['relax']}</p>"]
    search = b.get("min_ess")
    if search:
        rho = _rho(search["rho"])
        met = "met" if search["met"] else "NOT met (even the weakest strength tried falls below it)"
        title = "balance.min_ess: ESS, largest weight and marginal error per strength tried"
        plots["min_ess_frontier.png"] = (title, _frontier_plot(search))
        rows = "".join(
            f"<tr><td>{i + 1}</td><td>{_rho(p['rho'])}</td><td>{p['ess']:.3f}</td><td>{p['max_weight']:.3g}</td>"
            f"<td>{max(p['marginal_error'].values(), default=0.0):.2e}</td>"
            f"<td>{'yes' if p['converged'] else 'no'}</td></tr>"
            for i, p in enumerate(search["frontier"])
        )
        out.append(
            f"<p>balance.min_ess {search['floor']:g}: the strongest balancing whose ESS stays at or above "
            f"{search['floor']:g} of the rows; chosen: {html.escape(rho)}, ESS {search['ess_fraction']:.3f} "
            f"of the rows, floor {met}. "
            f"{_doc('report.md', 'balancing-strength-relax-and-min_ess')}</p>"
            f"{_figure(title, plots['min_ess_frontier.png'][1])}"
            "<table><tr><th>tried</th><th>strength</th><th>ESS / rows</th><th>largest weight</th>"
            f"<th>largest marginal error</th><th>converged</th></tr>{rows}</table>"
        )
    return "".join(out)


def _spectra_plot(title: str, entry: dict[str, Any]) -> bytes:
    """Eigen-spectra (log-log) of the largest and the smallest valid group, before balancing. A group of n
    rows has a covariance of rank at most n - 1, so its spectrum is drawn up to that index, and eigenvalues
    below RANK_TOLERANCE times the largest (round-off of exact zeros) are not drawn."""
    before = entry["before"]
    rows = np.array(before["rows"], float)
    valid = np.flatnonzero(before["valid"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for g, style in ((valid[np.argmax(rows[valid])], "-"), (valid[np.argmin(rows[valid])], "--")):
        eigs = np.array(before["top_eigenvalues"][g], float)[: max(int(rows[g]) - 1, 1)]
        eigs = eigs[eigs > RANK_TOLERANCE * eigs.max(initial=0)]
        ax.loglog(
            np.arange(1, eigs.size + 1),
            eigs,
            style,
            label=f"{entry['column']} {entry['labels'][g]} ({int(rows[g])} rows)",
        )
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _png(fig)


def _scores_plot(title: str, entry: dict[str, Any]) -> bytes:
    """Spectral quantile score per group, before and after balancing, groups by size and named."""
    rows = np.array(entry["before"]["rows"], float)
    order = np.argsort(-rows, kind="stable")
    fig, ax = plt.subplots(figsize=(7, 3))
    x = np.arange(order.size)
    before = np.array(entry["before"]["sqs"], dtype=float)[order]
    after = np.array(entry["after"]["sqs"], dtype=float)[order]
    ax.bar(x - 0.2, before, width=0.4, color="#bbbbbb", label="before")
    ax.bar(x + 0.2, after, width=0.4, color="#1f77b4", label="after")
    ax.axhline(1, color="#d62728", lw=1, label="SQS = 1: the median group")
    if order.size <= SIZE_TICKS:
        labels = [str(entry["labels"][i]) for i in order]
        ax.set_xticks(x, labels, rotation=90 if order.size > 12 else 0, fontsize=7)
    ax.set_xlabel(f"{entry['column']} (ordered by rows)")
    ax.set_ylabel(f"SQS (q = {entry['q']})")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _png(fig)


def _shares_plot(column: str, values: list[str], shares: dict[str, Any]) -> bytes:
    """Share of every true label before (bars) and after balancing (dots), labels ordered by share before,
    the uniform share 1/T dashed."""
    before, after = np.array(shares["share_before"]), np.array(shares["share_after"])
    order = np.argsort(-before, kind="stable")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(before.size)
    ax.bar(
        x, before[order], color="#bbbbbb", label=f"before (TV to uniform {shares['tv_uniform_before']:.3f})"
    )
    ax.plot(x, after[order], "o", ms=4, color="#1f77b4",
            label=f"after (TV to uniform {shares['tv_uniform_after']:.3f})")  # fmt: skip
    ax.axhline(1 / before.size, color="#d62728", lw=1, ls="--", label=f"uniform 1/{before.size}")
    _value_axis(ax, [values[i] for i in order], column, "share before balancing", 12)
    ax.set_ylabel("share of the (weighted) rows")
    ax.legend(fontsize=8)
    return _png(fig)


def _truth_section(report: dict[str, Any], plots: dict) -> str:
    """Every concept column against the ``report.truth`` column (NMI, purity) and the true labels' shares
    before and after balancing; empty without ``report.truth``."""
    align = report.get("truth_alignment")
    if not align:
        return ""
    column, values, shares = align["column"], align["values"], align["shares"]
    rows = []
    for side in ("image", "text", "joint", "zero_shot"):
        for entry in align.get(side, []):
            if side == "zero_shot":
                name = "zero_shot"
            else:
                name = f"{side}_cluster" + (f"_{entry['level']}" if entry["level"] else "")
            rows.append(
                f"<tr><td>{html.escape(name)}</td><td>{entry['k']}</td>"
                f"<td>{'yes' if entry['balanced'] else ''}</td><td>{entry['nmi']:.3f}</td>"
                f"<td>{entry['purity']:.3f}</td></tr>"
            )
    title = f"Share of each {column} value, before and after balancing"
    plots[f"truth_shares_{column}.png"] = (title, _shares_plot(column, values, shares))
    table = ""
    if len(values) <= SIZE_TICKS:
        order = np.argsort(-np.array(shares["share_before"]), kind="stable")
        cells = "".join(
            f"<tr><td>{html.escape(values[i])}</td><td>{shares['rows'][i]:,}</td>"
            f"<td>{shares['share_before'][i]:.4f}</td><td>{shares['weighted_rows'][i]:,.1f}</td>"
            f"<td>{shares['share_after'][i]:.4f}</td></tr>"
            for i in order
        )
        table = (
            f"<table class='shares'><tr><th>{html.escape(column)}</th><th>rows</th><th>share before</th>"
            f"<th>weighted rows</th><th>share after</th></tr>{cells}</table>"
        )
    return f"""<p>The carried column <b>{html.escape(column)}</b> holds the ground truth ({len(values)} values,
<code>report.truth</code>). How well each concept column recovers it:</p>
<table class='align'><tr><th>concept column</th><th>concepts</th><th>balanced</th><th>NMI</th><th>purity</th></tr>
{"".join(rows)}</table>
<dl><dt>NMI</dt><dd>{DEFINITIONS["nmi"]}</dd><dt>purity</dt><dd>{DEFINITIONS["purity"]}</dd></dl>
<p>Share of each true value in the rows before and in the weighted rows after balancing: TV to uniform
{shares["tv_uniform_before"]:.3f} before, {shares["tv_uniform_after"]:.3f} after
({"closer to" if shares["tv_uniform_after"] < shares["tv_uniform_before"] else "not closer to"} equal
representation of the true concepts). {DEFINITIONS["tv_uniform"]}</p>
{_figure(title, plots[f"truth_shares_{column}.png"][1])}{table}"""


def _figure(title: str, data: bytes, note: str = "") -> str:
    note = f"<p class='note'>{note}</p>" if note else ""
    return (
        f"<figure><img alt='{html.escape(title)}' src='{_uri(data, 'image/png')}'>"
        f"<figcaption>{html.escape(title)}</figcaption>{note}</figure>"
    )


class _Media:
    """Thumbnails and captions of row keys, rendered as <img> elements."""

    def __init__(self, media: dict[str, dict]):
        self.media = media

    def caption(self, key: str) -> str:
        return (self.media.get(key) or {}).get("caption") or ""

    def img(self, key: str, extra: str = "") -> str:
        thumb = (self.media.get(key) or {}).get("thumbnail")
        if not thumb:
            return ""
        title = html.escape(f"{self.caption(key)} [{key}]{extra}", quote=True)
        return f"<img class='thumb' loading='eager' src='{_uri(thumb, 'image/webp')}' alt='{title}' title='{title}'>"


def _card(column: str, rec: dict[str, Any], media: _Media, kind: str = "cluster") -> str:
    """One concept's card; ``kind`` (docs/report.md) names it: a cluster or carried value by its value, a
    zero-shot prompt or vocabulary entry by its text, a near-duplicate group by its smallest key."""
    mean = rec["mean_weight"]
    arrow = "up" if mean > 1.0001 else "down" if mean < 0.9999 else "same"
    verb = {"up": "up-weighted", "down": "down-weighted", "same": "unchanged"}[arrow]
    target = "" if rec["target"] is None else f", target {rec['target']:,.1f}"
    truth = ""
    if "truth_value" in rec:
        truth = (
            f"<p class='truth'>mostly <b>{html.escape(rec['truth_value'])}</b>: purity "
            f"{100 * rec['purity']:.0f}%</p>"
        )
    value = html.escape(str(rec["value"]))
    title = {
        "zero_shot": f"prompt <b>{value}</b>",
        "concept": f"vocabulary entry <b>{value}</b>",
        "dup_group": f"near-duplicate group <b>{value}</b>",
    }.get(kind, f"{html.escape(column)} <b>{value}</b>")
    rows = f"{rec['rows']:,} rows"
    if kind == "concept":
        rows = f"{rec['rows']:,} rows match it (keep probability {rec['probability']:.3g})"
    elif kind == "dup_group":
        rows = f"{rec['rows']:,} copies"
    images = "".join(media.img(k) for k in rec["central_keys"])
    randoms = "".join(media.img(k, " (random row)") for k in rec["random_keys"])
    if randoms and images:
        images += f"<span class='sep' title='random rows'>|</span>{randoms}"
    else:
        images += randoms
    words = " · ".join(html.escape(w) for w, _ in rec.get("words", [])) or "<i>no captions</i>"
    return f"""<div class="card" id="{html.escape(f"c-{column}-{rec['value']}", quote=True)}">
<h4>{title}
<span class="w {arrow}">{verb} ×{mean:.2f}</span></h4>{truth}
<div class="thumbs">{images}</div>
<p class="nums">{rows} → {rec["weighted_rows"]:,.1f} weighted{target}</p>
<p class="words">{words}</p></div>"""


def _moved(report: dict[str, Any], media: _Media) -> str:
    concepts = report.get("concepts", {})
    parts = []
    for column, entry in concepts.get("columns", {}).items():
        if not entry["balanced"]:
            continue
        cards = [r for r in entry["concepts"] if r["card"]]
        ranked = sorted(cards, key=lambda r: r["mean_weight"])
        up = [r for r in ranked[::-1] if r["mean_weight"] > 1][:MOVED_CONCEPTS]
        down = [r for r in ranked if r["mean_weight"] < 1][:MOVED_CONCEPTS]
        kind = entry.get("kind", "cluster")
        for chosen, what in ((up, "most up-weighted (rare concepts brought up)"),
                             (down, "most down-weighted (common concepts brought down)")):  # fmt: skip
            if chosen:
                parts.append(
                    f"<h3>{html.escape(column)}: {what}</h3>"
                    f"<div class='cards'>{''.join(_card(column, r, media, kind) for r in chosen)}</div>"
                )
    return "".join(parts)


def _weights_section(report: dict[str, Any], balance: dict[str, Any], media: _Media) -> str:
    b = report["balance"]
    weights = report.get("concepts", {}).get("weights", {})
    pct = weights.get("percentiles")
    fig = _figure(
        "Weight distribution (rows per weight, log scale)", _weights_plot(balance["weight_histogram"], pct)
    )
    table = ""
    if pct:
        head = "".join(f"<th>{html.escape(q[1:])}%</th>" for q in pct)
        cells = "".join(f"<td>{v:.3g}</td>" for v in pct.values())
        exact = (
            "all rows"
            if weights["sample_rows"] >= report["rows"]
            else f"a random sample of {weights['sample_rows']:,} rows"
        )
        table = (
            f"<table><tr><th>percentile</th>{head}</tr><tr><th>weight</th>{cells}</tr></table>"
            f"<p class='note'>Percentiles over {exact}.</p>"
        )
    heavy = weights.get("largest", [])
    grid = "".join(
        f"<div class='heavy'>{media.img(r['key'])}<span>w = {r['weight']:.3g}<br>"
        f"{html.escape(', '.join(f'{c} {v}' for c, v in r['concepts'].items()))}</span></div>"
        for r in heavy
    )
    return f"""<p>ESS {b["ess"]:,.1f}, {100 * b["ess_fraction"]:.1f}% of the {report["rows"]:,} rows. {DEFINITIONS["ess"]}
Weights range from {b["min_weight"]:.3g} to {b["max_weight"]:.3g}; a row of weight 2 counts twice, one of
weight 0.5 half.</p>{fig}{table}
<h3>The heaviest rows (check these first: a mislabeled or junk row with a large weight is amplified)</h3>
<div class="heavies">{grid}</div>"""


def _map_section(report: dict[str, Any], media: _Media) -> str:
    emap = report.get("concepts", {}).get("map")
    if not emap or not emap["points"]:
        return "<p>No embedding map (no rows).</p>"
    import plotly.graph_objects as go

    points = emap["points"]
    concepts = sorted({p["concept"] for p in points if p["concept"] is not None}, key=_natural)
    fig = go.Figure()
    palette = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
        "#393b79",
        "#637939",
        "#8c6d31",
        "#843c39",
        "#7b4173",
        "#3182bd",
        "#e6550d",
        "#31a354",
        "#756bb1",
        "#636363",
    ]
    for i, concept in enumerate(concepts):
        chosen = [p for p in points if p["concept"] == concept]
        fig.add_trace(
            go.Scatter(
                x=[p["x"] for p in chosen],
                y=[p["y"] for p in chosen],
                mode="markers",
                name=f"{emap['colour']} {concept}",
                marker={
                    "size": [float(np.clip(5 * np.sqrt(p["weight"]), 3, 24)) for p in chosen],
                    "color": palette[i % len(palette)],
                    "opacity": 0.75,
                    "line": {"width": 0},
                },
                customdata=[[p["key"], media.caption(p["key"]), p["weight"]] for p in chosen],
                hovertemplate=f"{html.escape(emap['colour'])} {html.escape(str(concept))}<br>"
                "%{customdata[1]}<br>weight %{customdata[2]:.3f}<extra>%{customdata[0]}</extra>",
            )
        )
    axis = "PC" if emap["method"] == "pca" else "UMAP "
    explained = emap.get("explained_variance") or [None, None]
    titles = [
        f"{axis}{i + 1}" + (f" ({100 * e:.0f}% of variance)" if e is not None else "")
        for i, e in enumerate(explained)
    ]
    fig.update_layout(
        height=560,
        margin={"l": 40, "r": 10, "t": 10, "b": 40},
        legend={"font": {"size": 10}},
        xaxis_title=titles[0],
        yaxis_title=titles[1],
        hoverlabel={"namelength": -1},
    )
    thumbs = {p["key"]: media.img(p["key"]) for p in points if media.img(p["key"])}
    thumbs_json = json.dumps(thumbs).replace("</", "<\\/")
    div = fig.to_html(full_html=False, include_plotlyjs=True, div_id="map", config={"displaylogo": False})
    method = "PCA" if emap["method"] == "pca" else "UMAP"
    return f"""<p>{len(points):,} rows (a seeded random sample) of the {html.escape(emap["side"])} embeddings projected to 2-D
with {method}, coloured by {html.escape(emap["colour"])} and sized by weight (area grows with the weight).
Hover a point for its caption and thumbnail; click a legend entry to hide a concept, double-click to show
only it. Clusters far apart in the map hold different images; an up-weighted concept shows as large dots.</p>
<div class="maprow">{div}<div id="hover"><p class="note">hover a point</p></div></div>
<script type="application/json" id="thumbs">{thumbs_json}</script>
<script>
(function () {{
  var thumbs = JSON.parse(document.getElementById('thumbs').textContent);
  var box = document.getElementById('hover');
  document.getElementById('map').on('plotly_hover', function (ev) {{
    var d = ev.points[0].customdata;
    box.innerHTML = (thumbs[d[0]] || '') + '<p></p>';
    box.lastChild.textContent = d[1] + ' (weight ' + d[2].toFixed(3) + ')';
  }});
}})();
</script>"""


def _natural(value: str) -> tuple:
    return (0, int(value), "") if value.lstrip("-").isdigit() else (1, 0, value)


def _cards_section(report: dict[str, Any], balance: dict[str, Any], media: _Media) -> tuple[str, dict]:
    concepts = report.get("concepts", {})
    out, plots = [], {}
    for column, entry in concepts.get("columns", {}).items():
        records = entry["concepts"]
        shown = [r for r in records if r["card"]]
        dist = balance["marginal_distributions"].get(column)
        fig = ""
        if dist:
            title = f"Sizes per {column} value, before and after" + {
                "concept": " (the values are the rows' keep probabilities)",
                "dup_group": " (the values are group sizes)",
            }.get(entry.get("kind"), "")
            plots[f"sizes_{column}.png"] = (title, _sizes_plot(column, dist))
            fig = _figure(title, plots[f"sizes_{column}.png"][1])
        kind = entry.get("kind", "cluster")
        balanced = (
            "balanced marginal"
            if entry["balanced"]
            else "not balanced directly (weights come from the balanced marginals)"
        )
        total = entry.get("values", len(records))
        more = (
            ""
            if len(shown) == total
            else f" Cards for the {len(shown)} most down- and up-weighted of its {total:,} concepts."
        )
        what = {
            "zero_shot": "zero-shot prompts (each image's nearest prompt, <none> below the threshold)",
            "concept": "matched vocabulary entries (a row matching several entries counts in each; the "
            "balanced labels are the rows' MetaCLIP keep probabilities)",
            "dup_group": "near-duplicate groups of two or more rows",
        }.get(kind, "concepts")
        if kind == "dup_group":
            more = f" Cards for the {len(shown)} largest groups; their copies share one unit of mass."
        cards = "".join(
            _card(column, r, media, kind) for r in sorted(shown, key=lambda r: _natural(str(r["value"])))
        )
        out.append(f"""<details{" open" if entry["balanced"] else ""}><summary><b>{html.escape(column)}</b>:
{total:,} {what}, {balanced}.</summary>{fig}<p class="note">{more}</p><div class="cards">{cards}</div></details>""")
    for column, dist in balance["marginal_distributions"].items():  # balanced columns without concept cards
        if f"sizes_{column}.png" not in plots:
            title = f"Sizes per {column} value, before and after"
            plots[f"sizes_{column}.png"] = (title, _sizes_plot(column, dist))
            out.append(_figure(title, plots[f"sizes_{column}.png"][1]))
    return "".join(out), plots


def _spectra_section(report: dict[str, Any], plots: dict) -> str:
    out = []
    balanced = set(report["balance"]["marginals"])
    for column, sides in report.get("spectra", {}).items():
        for side, entry in sides.items():
            if not any(entry["before"]["valid"]):
                continue
            entry = {**entry, "column": column}
            label = f"{side} embeddings by {column}"
            rows = np.array(entry["before"]["rows"])
            small = [
                str(entry["labels"][g])
                for g in np.flatnonzero(entry["before"]["valid"])
                if rows[g] <= entry["d"]
            ]
            same = ""
            if column in balanced:
                same = (
                    f"Before and after coincide here: every row of one {column} value gets the same weight "
                    "(the weight depends only on the balanced labels), and a constant weight inside a group "
                    "leaves its covariance unchanged. Balancing changes how much each group counts, not its "
                    "spread; spectra grouped by a column that is not balanced (a carried column or a coarser "
                    "level named in report.spectra_by) can move."
                )
            rank = (
                "Spectra are drawn down to 1e-10 of the largest eigenvalue: smaller ones are round-off of "
                "exact zeros (embeddings confined to fewer dimensions than d, e.g. a few caption templates)."
            )
            if small:
                rank += (
                    f" {len(small)} group(s) have no more rows than dimensions (d = {entry['d']}): a group of n "
                    "rows has a covariance of rank at most n - 1, so its spectrum ends at index n - 1 "
                    "(the eigenvalues beyond are exactly 0, stored as round-off near 1e-17 in report.json) "
                    "and its SQS reads 0 when n - 1 is below the quantile's index."
                )
            for name, title, data, note in (
                (
                    f"spectra_{column}_{side}.png",
                    f"Eigen-spectra, {label}",
                    _spectra_plot(label, entry),
                    rank,
                ),
                (
                    f"sqs_{column}_{side}.png",
                    f"Spectral quantile scores, {label}",
                    _scores_plot(label, entry),
                    same,
                ),
            ):
                plots[name] = (title, data)
                out.append(_figure(title, data, note))
    return "".join(out)


STYLE = """body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
figure{margin:1.5rem 0}figure img{max-width:100%}.note{color:#555;font-size:.9rem}a.doc{font-size:.85rem}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(20rem,1fr));gap:.75rem}
.card{border:1px solid #ddd;border-radius:6px;padding:.5rem .75rem}.card h4{margin:.2rem 0}
.card p{margin:.25rem 0;font-size:.9rem}.words{color:#333;font-style:italic}.truth{color:#555}
.thumbs{display:flex;flex-wrap:wrap;gap:2px;align-items:center}
img.thumb{width:40px;height:40px;object-fit:cover;image-rendering:auto;border-radius:2px}
.sep{color:#aaa;padding:0 3px}.w{font-size:.8rem;padding:0 .4rem;border-radius:3px;float:right}
.w.up{background:#d8ecd8}.w.down{background:#f4dada}.w.same{background:#eee}
.heavies{display:flex;flex-wrap:wrap;gap:.5rem}.heavy{display:flex;gap:.3rem;font-size:.8rem;align-items:center}
.maprow{display:flex;gap:1rem;align-items:flex-start}#map{flex:1}#hover{width:10rem}
#hover img.thumb{width:128px;height:128px}details{margin:1rem 0}summary{cursor:pointer}
dt{font-weight:bold}dd{margin:0 0 .5rem 1rem}"""


def write_html(
    report: dict[str, Any],
    balance: dict[str, Any],
    out_dir: str | Path | StoragePath,
    media: dict[str, dict] | None = None,
) -> list[str]:
    """Render ``report.html`` (and its plots as PNG files) into ``out_dir`` (a local directory or a URI)
    from the report dict, balance.json and ``media`` ({row key: {"thumbnail": WebP bytes or None,
    "caption": str or None}}); returns the file names written."""
    out_dir = as_path(out_dir)
    images = _Media(media or {})
    b = report["balance"]
    concepts = report.get("concepts", {})
    cards, plots = _cards_section(report, balance, images)
    errors = report["balance"]["marginal_error_per_iteration"]
    plots["marginal_error.png"] = ("Largest marginal error per pass", _error_plot(errors))
    moved = _moved(report, images)
    weights = _weights_section(report, balance, images)
    plots["weights.png"] = (
        "Weight distribution",
        _weights_plot(balance["weight_histogram"], concepts.get("weights", {}).get("percentiles")),
    )
    spectra = _spectra_section(report, plots)
    truth_section = _truth_section(report, plots)
    truth_section = f"<h2>Concepts against the ground truth</h2>{truth_section}" if truth_section else ""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{m['before']['values']}</td>"
        f"<td>{m['before']['imbalance_ratio']:.1f}</td><td>{m['after']['imbalance_ratio']:.2f}</td>"
        f"<td>{m['before']['gini']:.3f}</td><td>{m['after']['gini']:.3f}</td>"
        f"<td>{m['before']['normalized_entropy']:.3f}</td><td>{m['after']['normalized_entropy']:.3f}</td>"
        f"<td>{m['final_marginal_error']:.2e}</td></tr>"
        for name, m in report["marginals"].items()
    )
    note = concepts.get("note")
    note = f"<p class='note'>No thumbnails: {html.escape(note)}.</p>" if note else ""
    truth = concepts.get("truth")
    truth = (
        (
            f" Each card names the most common value of the ground-truth column <b>{html.escape(truth)}</b> "
            "among its rows and its purity (the share of rows with that value)."
        )
        if truth
        else ""
    )
    converged = "converged" if b["converged"] else "NOT converged"
    error_figure = _figure(
        plots["marginal_error.png"][0], plots["marginal_error.png"][1], DEFINITIONS["error"]
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rebalance report</title><style>{STYLE}</style></head><body>
<h1>rebalance report</h1>
<p>{report["rows"]} rows ({report["rejected_rows"]} rejected), {b["cells"]} cells over {", ".join(b["marginals"])};
{converged} after {b["passes"]} pass{"" if b["passes"] == 1 else "es"}, largest marginal error
{b["final_marginal_error"]:.2e}. ESS {b["ess"]:.1f} ({100 * b["ess_fraction"]:.1f}% of rows), largest weight
{b["max_weight"]:.3f}.</p>
<p>Balancing gives every row a weight (mean 1) so that the weighted rows of each value of the balanced
columns ({html.escape(", ".join(b["marginals"]))}) meet the target. A <i>concept</i> below is one value of a
column: an image or text cluster (k-means on the embeddings), a coarser cluster level, a value of a
carried column, a zero-shot prompt, a vocabulary entry or a near-duplicate group. {_doc("report.md", "reportreportjson", "What every number means")}.</p>
<h2>Imbalance before and after</h2>
<table><tr><th>marginal</th><th>values</th><th>imbalance before</th><th>after</th><th>Gini before</th>
<th>after</th><th>entropy before</th><th>after</th><th>marginal error</th></tr>{rows}</table>
<dl><dt>imbalance</dt><dd>{DEFINITIONS["imbalance"]}</dd><dt>Gini</dt><dd>{DEFINITIONS["gini"]}</dd>
<dt>entropy</dt><dd>{DEFINITIONS["entropy"]}</dd><dt>marginal error</dt><dd>{DEFINITIONS["error"]}</dd></dl>
{truth_section}
<h2>What moved</h2>
<p>Mean weight ×2 means the concept now counts twice its rows, ×0.5 half. Thumbnails: the rows nearest
the concept's centre first, then (after |) random rows; hover one for its caption. Words: the most frequent
caption words of its rows.{truth}</p>{note}
{moved}
<h2>Weights</h2>
{weights}
<h2>Embedding map</h2>
{_map_section(report, images)}
<h2>Every concept</h2>
{cards}
<h2>Convergence</h2>
{error_figure}
{_strength_section(report, plots)}
<h2>Covariance spectra</h2>
<p>{DEFINITIONS["sqs"]} The red line SQS = 1 marks the median group; a group far below it is collapsed
(near-duplicates, one template), far above it mixed. The spectra plot shows the eigenvalues of the
covariance of the largest and the smallest group, largest first.</p>
{spectra}
</body></html>
"""
    for file_name, (_, data) in plots.items():
        atomic_write_bytes(data, out_dir / file_name)
    atomic_write_bytes(page.encode(), out_dir / "report.html")
    return ["report.html", *plots]
