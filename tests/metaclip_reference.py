"""A test-only reference of MetaCLIP's curation steps, to check rebalance.kernels.concepts against.

After facebookresearch/MetaCLIP (Xu et al. 2023, "Demystifying CLIP Data"): ``metaclip/substr_matching.py``
(``spacing``, ``substr_matching``) and ``metaclip/metaclip1/balancing.py`` (``main``, ``balance_sampling``).
That repository is licensed CC BY-NC 4.0, so no code is copied here: these functions re-express the
published algorithm step by step (same punctuation list, same padding, same count flooring and sampling
rule), using a plain substring scan instead of their Aho-Corasick automaton, so the check is also
independent of pyahocorasick.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np


def spacing(text: str) -> str:
    """Pad the caption with one space each side, put spaces around , . ; : ? ! ` and turn tab, newline and
    carriage return into spaces (MetaCLIP's ``spacing``)."""
    out = " " + text + " "
    for mark in [",", ".", ";", ":", "?", "!", "`"]:
        out = out.replace(mark, " " + mark + " ")
    for char in ["\t", "\n", "\r"]:
        out = out.replace(char, " ")
    return out


def substr_matching(text: str, metadata: Sequence[str]) -> list[int]:
    """Ids of the entries whose space-padded form occurs in the spaced caption (MetaCLIP's
    ``substr_matching``: every occurrence of ``" " + entry + " "``), as a sorted list."""
    spaced = spacing(text)
    return sorted(i for i, entry in enumerate(metadata) if " " + entry + " " in spaced)


def entry_probabilities(matched: Sequence[Sequence[int]], n_entries: int, t: int) -> np.ndarray:
    """MetaCLIP's balancing ``main``: count each entry over the texts (uint64), raise counts below t to t,
    and sample an entry with probability t / count."""
    entry_count = np.zeros(shape=(n_entries,), dtype=np.uint64)
    for ids in matched:
        for entry in ids:
            entry_count[entry] += 1
    entry_count[entry_count < t] = t
    return t / entry_count


def balance_sampling(matched_entry_ids: Sequence[int], entry_prob: np.ndarray, rng: random.Random) -> bool:
    """Keep a text when any of its entries is drawn (MetaCLIP's ``balance_sampling``)."""
    return any(rng.random() < entry_prob[entry_id] for entry_id in matched_entry_ids)
