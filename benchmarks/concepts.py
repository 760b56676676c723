"""Vocabulary matching: the Aho-Corasick automaton against MetaCLIP's plain substring scan, same data.

    .venv/bin/python benchmarks/concepts.py             # 500,000 entries, 20,000 captions
    .venv/bin/python benchmarks/concepts.py --quick     # 60,000 entries, 2,000 captions

The vocabulary: random lower-case words of 3-8 letters, two thirds single words and one third two-word
phrases; captions: 12 words drawn from the vocabulary's words. Prints the automaton's build time, its
captions per second in one process, and the time the scan of tests/metaclip_reference.py (one ``in``
test per entry per caption) takes per caption, measured on a few captions, as a ratio. Both must give the
same matches (checked).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from metaclip_reference import substr_matching  # noqa: E402

from rebalance.kernels.concepts import build_matcher, match_captions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=500_000)
    parser.add_argument("--captions", type=int, default=20_000)
    parser.add_argument("--scan-captions", type=int, default=10, help="captions timed with the plain scan")
    parser.add_argument("--quick", action="store_true", help="60,000 entries, 2,000 captions")
    args = parser.parse_args()
    if args.quick:
        args.entries, args.captions = 60_000, 2_000
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    n_words = 2 * args.entries // 3
    words = sorted({"".join(rng.choices(letters, k=rng.randint(3, 8))) for _ in range(int(n_words * 1.1))})
    words = words[:n_words]
    half = len(words) // 2
    vocabulary = words + [f"{a} {b}" for a, b in zip(words[:half], words[half:], strict=False)]
    vocabulary = vocabulary[: args.entries]
    captions = [" ".join(rng.choices(words, k=12)) for _ in range(args.captions)]

    start = time.perf_counter()
    automaton = build_matcher(vocabulary, case_fold=False)
    build = time.perf_counter() - start
    start = time.perf_counter()
    matches = match_captions(captions, automaton, case_fold=False)
    match = time.perf_counter() - start
    scanned = captions[: args.scan_captions]
    start = time.perf_counter()
    reference = [substr_matching(c, vocabulary) for c in scanned]
    scan = (time.perf_counter() - start) / len(scanned)
    assert matches[: len(scanned)] == reference, "the automaton and the scan disagree"
    per_caption = match / len(captions)
    print(f"vocabulary {len(vocabulary)} entries, {len(captions)} captions of 12 words")
    print(f"  automaton build            {build:8.2f} s")
    print(f"  automaton match            {match:8.3f} s  ({1 / per_caption:,.0f} captions/s, one process)")
    print(f"  plain scan (MetaCLIP ref.) {scan * 1e3:8.1f} ms per caption")
    print(f"  scan / automaton per caption: {scan / per_caption:,.0f}x")


if __name__ == "__main__":
    main()
