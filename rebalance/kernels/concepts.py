"""Concept labels from captions and prompts: MetaCLIP vocabulary matching and balancing, zero-shot labels.

Vocabulary matching follows MetaCLIP's curation code (Xu et al. 2023, ``metaclip/substr_matching.py``):
a caption is *spaced* (the punctuation ``, . ; : ? ! ``` gets a space on both sides, tabs and line breaks
become spaces, and the whole is padded with one space each side), and entry ``e`` matches when
``" " + e + " "`` occurs in it as a substring, found for all entries at once by an Aho-Corasick automaton
(pyahocorasick). So entries match on word boundaries, where a boundary is a space or one of those
punctuation marks (not ``-``, ``'`` or ``"``). With ``case_fold`` (rebalance's default) captions and
entries are compared after ``str.casefold``; MetaCLIP compares them as they are (``case_fold=False``).

Balancing follows ``metaclip/metaclip1/balancing.py``: entry ``e`` matched by ``count_e`` rows is sampled
with probability ``min(1, t / count_e)``, and a row is kept when any of its entries is sampled, so with
probability ``1 - prod_e (1 - min(1, t / count_e))`` over its distinct entries (0 for a row matching none).
"""

from __future__ import annotations

from collections.abc import Sequence

import ahocorasick
import numpy as np

__all__ = [
    "build_matcher",
    "entry_counts",
    "keep_probabilities",
    "match_captions",
    "space_caption",
    "zero_shot_labels",
]

_WRAPPED = (",", ".", ";", ":", "?", "!", "`")
_SPACED = ("\t", "\n", "\r")


def space_caption(text: str, case_fold: bool = True) -> str:
    """MetaCLIP's ``spacing``: pad with spaces, wrap the punctuation ``, . ; : ? ! ``` in spaces, turn
    tabs and line breaks into spaces; then ``casefold`` when ``case_fold``."""
    spaced = f" {text} "
    for mark in _WRAPPED:
        spaced = spaced.replace(mark, f" {mark} ")
    for char in _SPACED:
        spaced = spaced.replace(char, " ")
    return spaced.casefold() if case_fold else spaced


def build_matcher(entries: Sequence[str], case_fold: bool = True) -> ahocorasick.Automaton:
    """An Aho-Corasick automaton over ``" " + entry + " "`` for every entry (casefolded when
    ``case_fold``); each key's value is the entry's index. Entries must be distinct after folding."""
    automaton = ahocorasick.Automaton()
    for i, entry in enumerate(entries):
        key = f" {entry.casefold() if case_fold else entry} "
        if key in automaton:
            raise ValueError(f"entry {i} ({entry!r}) repeats entry {automaton.get(key)}")
        automaton.add_word(key, i)
    automaton.make_automaton()
    return automaton


def match_captions(
    captions: Sequence[str | None], automaton: ahocorasick.Automaton, case_fold: bool = True
) -> list[list[int]]:
    """The sorted distinct entry indices every caption matches (:func:`space_caption`); [] for None."""
    out: list[list[int]] = []
    empty = len(automaton) == 0
    for text in captions:
        if text is None or empty:
            out.append([])
            continue
        out.append(sorted({i for _, i in automaton.iter(space_caption(text, case_fold))}))
    return out


def entry_counts(matches: Sequence[Sequence[int]], n_entries: int) -> np.ndarray:
    """count_e (n_entries,) int64: the rows whose matches include entry e."""
    flat = [i for row in matches for i in row]
    return np.bincount(np.asarray(flat, dtype=np.int64), minlength=n_entries).astype(np.int64)


def keep_probabilities(matches: Sequence[Sequence[int]], counts: np.ndarray, cap: float) -> np.ndarray:
    """p (n,) float64: p_i = 1 - prod_{e in matches_i} (1 - min(1, cap / count_e)); 0 for no entries.

    Entry probabilities are computed as MetaCLIP does (counts below ``cap`` raised to it, then cap / count)."""
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap!r}")
    prob = cap / np.maximum(np.asarray(counts, dtype=np.float64), cap)
    out = np.zeros(len(matches), dtype=np.float64)
    for i, row in enumerate(matches):
        if len(row):
            out[i] = 1.0 - np.prod(1.0 - prob[np.asarray(row, dtype=np.int64)])
    return out


def zero_shot_labels(
    embeddings: np.ndarray, prompts: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest prompt of every row: (labels (n,) int64, similarity (n,) float64).

    ``embeddings`` (n, d) and ``prompts`` (P, d) are L2-normalised here; similarity is the cosine
    max_p <x, q_p>, and the label its argmax (the first on ties), or -1 where the similarity is below
    ``threshold`` (or the row's embedding is zero, e.g. a rejected row)."""
    x = np.asarray(embeddings, dtype=np.float64)
    q = np.asarray(prompts, dtype=np.float64)
    if x.ndim != 2 or q.ndim != 2 or x.shape[1] != q.shape[1] or q.shape[0] == 0:
        raise ValueError(f"expected (n, d) embeddings and (P, d) prompts, got {x.shape} and {q.shape}")
    xn = np.linalg.norm(x, axis=1, keepdims=True)
    qn = np.linalg.norm(q, axis=1, keepdims=True)
    if (qn == 0).any():
        raise ValueError("a prompt embedding is zero")
    scores = (x / np.where(xn > 0, xn, 1.0)) @ (q / qn).T
    labels = scores.argmax(axis=1) if scores.shape[0] else np.zeros(0, np.int64)
    sim = scores[np.arange(scores.shape[0]), labels] if scores.shape[0] else np.zeros(0)
    labels = np.where((sim >= threshold) & (xn[:, 0] > 0), labels, -1).astype(np.int64)
    return labels, sim.astype(np.float64)
