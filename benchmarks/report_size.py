"""Size of the report page against the number of rows: the page must stay bounded (sampled examples, capped
cards, never per-row data).

    nice -n 10 .venv/bin/python benchmarks/report_size.py --rows 10000 100000
    nice -n 10 .venv/bin/python benchmarks/report_size.py --rows 1000000 --shards 10

For each row count, the data is :func:`scale.generate`'s clip-retrieval layout (``format: embeddings``:
Zipf concepts, ``--dim``-d vectors, metadata with ``key``, ``caption`` and the true ``concept``), run end to
end with ``cluster.{image,text}.k = --k``, ``data.carry: [concept, caption]``, ``report.truth: concept``,
``report.spectra_by: [image_cluster]`` and the HTML page. An embeddings dataset has no encoded
images, so the page holds no thumbnails; their number is bounded by construction (docs/report.md, "Size")
and the demo measures their bytes. Printed per row count: the page's bytes, split into the Plotly bundle,
PNG plots and the rest (cards, tables, map data), the cards, the map points and ``report.json``'s bytes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import generate  # noqa: E402

import rebalance  # noqa: E402

PNG = re.compile(rb"data:image/png;base64,[A-Za-z0-9+/=]+")
WEBP = re.compile(rb"data:image/webp;base64,[A-Za-z0-9+/=]+")
SCRIPT = re.compile(rb"<script[^>]*>(.*?)</script>", re.S)


def page_parts(page: bytes) -> dict[str, int]:
    """Bytes of the page and of its parts: ``plotly`` (the largest <script>: the bundled library),
    ``png`` (plot data URIs), ``webp`` (thumbnail data URIs, with their count) and ``rest``."""
    plotly = max((len(m.group(1)) for m in SCRIPT.finditer(page)), default=0)
    png = sum(len(m.group(0)) for m in PNG.finditer(page))
    webp = [len(m.group(0)) for m in WEBP.finditer(page)]
    return {"page": len(page), "plotly": plotly, "png": png, "webp": sum(webp), "thumbnails": len(webp),
            "rest": len(page) - plotly - png - sum(webp), "cards": page.count(b'class="card"')}  # fmt: skip


def measure(rows: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    data, out = tmp / f"data-{rows}", tmp / f"run-{rows}"
    generate(data, rows, args.dim, args.shards, args.concepts)
    spec = {
        "data": {"path": str(data), "format": "embeddings", "carry": ["concept", "caption"]},
        "cluster": {"image": {"k": args.k}, "text": {"k": args.k}},
        "balance": {"marginals": ["image_cluster"]},
        "report": {"html": True, "truth": "concept", "spectra_by": ["image_cluster"]},
    }
    report = rebalance.run(spec, out).report
    result = {"rows": rows, **page_parts((out / "report" / "report.html").read_bytes())}
    result["map_points"] = len(report["concepts"]["map"]["points"])
    result["report_json"] = (out / "report" / "report.json").stat().st_size
    return result


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--concepts", type=int, default=200)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary directory)")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for rows in args.rows:
            results.append(measure(rows, args, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    mb = 1e6
    print(f"\n{args.dim}-d, {args.shards} shards, {args.concepts} concepts, k = {args.k}")
    print(f"{'rows':>10} {'page MB':>8} {'plotly':>7} {'png':>6} {'rest':>6} {'cards':>6} {'map pts':>8} "
          f"{'json MB':>8}")  # fmt: skip
    for r in results:
        print(f"{r['rows']:>10,} {r['page'] / mb:>8.2f} {r['plotly'] / mb:>7.2f} {r['png'] / mb:>6.2f} "
              f"{r['rest'] / mb:>6.2f} {r['cards']:>6} {r['map_points']:>8} {r['report_json'] / mb:>8.2f}")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
