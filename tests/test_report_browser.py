"""report.html opened in a real headless Chromium, offline, as a curator would: it loads from file:// with
no console error and no request off the page, the concept cards and their thumbnails render (every <img>
decodes with a non-zero size), the embedding map draws one marker per sampled row, and hovering a marker
shows its thumbnail. A full-page screenshot is saved in the test's tmp dir."""

import json
import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip
PAGE_BYTES = 8 * 2**20  # docs/report.md: the demo's page; the Plotly bundle is about 4.7 MB of it


@pytest.mark.skipif(
    not CHROMIUM and not os.environ.get("CI"), reason="chromium not installed (make test installs it)"
)
def test_report_html_in_chromium(demo_run, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium is missing: `make test` installs Debian's chromium package"
    report = json.loads((demo_run / "report" / "report.json").read_text())
    concepts = report["concepts"]
    cards = sum(r["card"] for c in concepts["columns"].values() for r in c["concepts"])
    thumbnails = {k for c in concepts["columns"].values() for r in c["concepts"] if r["card"]
                  for k in r["central_keys"] + r["random_keys"]}  # fmt: skip
    page_file = demo_run / "report" / "report.html"
    assert page_file.stat().st_size < PAGE_BYTES
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = browser.new_context(offline=True, viewport={"width": 1300, "height": 900})
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on(
            "request",
            lambda r: None if r.url.startswith(("file:", "data:")) else errors.append(f"request {r.url}"),
        )
        page.goto(page_file.as_uri(), wait_until="load")
        sizes = page.evaluate("Array.from(document.images).map(i => [i.naturalWidth, i.naturalHeight])")
        card_count = page.locator(".card").count()
        titles = page.evaluate("Array.from(document.querySelectorAll('.card img')).map(i => i.title)")
        markers = page.locator("#map .scatterlayer .point")
        n_markers = markers.count()
        markers.nth(0).hover(force=True)
        page.wait_for_function("document.querySelector('#hover img') !== null", timeout=5000)
        hover_size = page.evaluate("[document.querySelector('#hover img').naturalWidth, "
                                   "document.querySelector('#hover p').textContent]")  # fmt: skip
        text = page.inner_text("body")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    # Each thumbnail of a card shows once in its column's card and once more among "what moved" when the
    # concept is one of the most up- or down-weighted; plots, the heaviest rows and the map come on top.
    assert card_count >= cards
    assert len(sizes) > len(thumbnails) and all(w > 0 and h > 0 for w, h in sizes)
    assert {t.rsplit("[", 1)[1].split("]")[0] for t in titles} == thumbnails
    assert n_markers == len(concepts["map"]["points"]) == 1000
    assert hover_size[0] > 0 and "weight" in hover_size[1]
    assert "3000 rows" in text and "converged" in text
    for term in ("Imbalance ratio", "Gini coefficient", "Normalized entropy", "Effective sample size",
                 "Spectral quantile score", "SQS = 1", "Before and after coincide",
                 "Concepts against the ground truth", "Normalized mutual information", "TV to uniform",
                 "balance.relax: image_cluster exact"):  # fmt: skip
        assert term in text, term
    shares = report["truth_alignment"]["shares"]
    assert (
        f"TV to uniform {shares['tv_uniform_before']:.3f} before, {shares['tv_uniform_after']:.3f} after"
        in text
    )
    assert (tmp_path / "report.png").stat().st_size > 0
