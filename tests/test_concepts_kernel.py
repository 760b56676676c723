"""Vocabulary matching and MetaCLIP balancing against a reference of MetaCLIP's curation code; zero-shot
labels against hand-built embeddings."""

import random

import numpy as np
import pytest
from metaclip_reference import balance_sampling, entry_probabilities, substr_matching

from rebalance.kernels.concepts import (
    build_matcher,
    entry_counts,
    keep_probabilities,
    match_captions,
    zero_shot_labels,
)

VOCABULARY = [
    "dog",
    "hot dog",
    "cat",
    "Cat",
    "red",
    "red circle",
    "circle",
    "new york",
    "york",
    "e.g",
    "u.s.",
    "rock-n-roll",
    "it's",
    "a",
]

CAPTIONS = [
    "A dog and a cat.",
    "hot dog, with mustard",
    "hotdog stand",
    "a red circle; a Red Circle!",
    "New York at night\tin the rain",
    "new  york",
    "dogs are not dog?",
    "e.g. a cat",
    "made in the u.s. by Cat",
    "rock-n-roll (live)",
    "it's a cat`s toy",
    "",
    "catalogue of circles",
    "the red-circle sign",
    "a:b a;b a!b dog\rcat\nred",
]


def _random_captions(rng: np.random.Generator, vocabulary: list[str], n: int) -> list[str]:
    words = [*vocabulary, "the", "of", "photo", "and", ",", ".", "!", "DOG", "Red", "x"]
    return [" ".join(rng.choice(words, size=rng.integers(0, 12))) for _ in range(n)]


@pytest.mark.parametrize("captions", ["fixed", "random"])
def test_matches_equal_metaclip_case_sensitive(captions):
    texts = CAPTIONS if captions == "fixed" else _random_captions(np.random.default_rng(0), VOCABULARY, 300)
    ours = match_captions(texts, build_matcher(VOCABULARY, case_fold=False), case_fold=False)
    assert ours == [substr_matching(t, VOCABULARY) for t in texts]


def test_known_matches():
    ours = match_captions(CAPTIONS[:5], build_matcher(VOCABULARY, case_fold=False), case_fold=False)
    # "A dog and a cat.": "a" after "and"; "A" does not match "a" case-sensitively.
    assert [[VOCABULARY[i] for i in row] for row in ours] == [
        ["dog", "cat", "a"],
        ["dog", "hot dog"],
        [],
        ["red", "red circle", "circle", "a"],
        [],  # "New York": capitalised, so neither "new york" nor "york" without case folding
    ]


def test_case_fold_equals_metaclip_on_folded_text():
    vocabulary = [v for v in VOCABULARY if v != "Cat"]  # "Cat" and "cat" are one entry once folded
    folded = [v.casefold() for v in vocabulary]
    ours = match_captions(CAPTIONS, build_matcher(vocabulary), case_fold=True)
    assert ours == [substr_matching(t.casefold(), folded) for t in CAPTIONS]
    assert vocabulary.index("new york") in ours[4]


def test_duplicate_entries_after_folding_are_refused():
    with pytest.raises(ValueError, match="repeats entry 2"):
        build_matcher(VOCABULARY, case_fold=True)


def test_probabilities_equal_metaclip():
    rng = np.random.default_rng(1)
    texts = _random_captions(rng, VOCABULARY, 400)
    matches = match_captions(texts, build_matcher(VOCABULARY, case_fold=False), case_fold=False)
    counts = entry_counts(matches, len(VOCABULARY))
    for t in (1, 5, 40, 10_000):
        entry_prob = entry_probabilities(matches, len(VOCABULARY), t)
        ours = keep_probabilities(matches, counts, t)
        expected = [1.0 - np.prod([1.0 - entry_prob[e] for e in row]) if row else 0.0 for row in matches]
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-15)
        np.testing.assert_array_equal(t / np.maximum(counts, t), entry_prob)


def test_probabilities_match_metaclip_sampling_frequency():
    """MetaCLIP's random sampling rule keeps each row with our probability: 4000 seeded draws per row."""
    texts = _random_captions(np.random.default_rng(2), VOCABULARY, 60)
    matches = match_captions(texts, build_matcher(VOCABULARY, case_fold=False), case_fold=False)
    p = keep_probabilities(matches, entry_counts(matches, len(VOCABULARY)), 8)
    entry_prob = entry_probabilities(matches, len(VOCABULARY), 8)
    draws = random.Random(0)
    n = 4000
    freq = np.array([sum(balance_sampling(row, entry_prob, draws) for _ in range(n)) / n for row in matches])
    sd = np.sqrt(p * (1 - p) / n)
    assert (np.abs(freq - p) <= 5 * sd + 1e-12).all()
    assert ((p > 0) & (p < 0.9)).sum() >= 5  # the check sees fractional probabilities


def test_hand_computed_probabilities():
    matches = [[0], [0], [0], [0], [0, 1], [1], []]
    counts = entry_counts(matches, 3)
    np.testing.assert_array_equal(counts, [5, 2, 0])
    p = keep_probabilities(matches, counts, 2)
    # entry 0: 2/5, entry 1: min(1, 2/2) = 1
    np.testing.assert_allclose(p, [0.4, 0.4, 0.4, 0.4, 1.0, 1.0, 0.0])


def test_zero_shot_labels_on_known_embeddings():
    prompts = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    x = np.array(
        [
            [3.0, 1.0, 0.0],  # cos 0.949 with prompt 0
            [0.0, 0.2, 0.1],  # cos 0.894 with prompt 1
            [1.0, 1.0, 1.0],  # cos 0.577 with each: first wins, below 0.6 -> none
            [0.0, 0.0, 0.0],  # a rejected row's zero vector -> none
            [-1.0, 0.0, 0.1],
        ]
    )
    labels, sim = zero_shot_labels(x, prompts, threshold=0.6)
    np.testing.assert_array_equal(labels, [0, 1, -1, -1, -1])
    np.testing.assert_allclose(sim[:3], [3 / np.sqrt(10), 0.2 / np.sqrt(0.05), 1 / np.sqrt(3)])
    labels, _ = zero_shot_labels(x, prompts, threshold=-1.0)
    np.testing.assert_array_equal(labels, [0, 1, 0, -1, 2])
    with pytest.raises(ValueError, match="expected"):
        zero_shot_labels(x, prompts[:, :2], 0.0)
