"""Task metrics against small cases worked by hand (each expected value is computed here from its definition)."""

from __future__ import annotations

import math

import pytest

from lmforge.tasks import metrics


def test_classification_scores_match_a_hand_worked_case():
    references = ["a", "a", "b", "b", "c"]
    predictions = ["a", "b", "b", "b", "a"]
    scores = metrics.classification_scores(predictions, references)
    # a: predicted twice, right once; present twice, found once. b: predicted 3 times, right twice; present
    # twice, found both. c: never predicted (precision 0 by convention), present once, never found.
    precision = {"a": 1 / 2, "b": 2 / 3, "c": 0.0}
    recall = {"a": 1 / 2, "b": 1.0, "c": 0.0}
    f1 = {label: 2 * precision[label] * recall[label] / (precision[label] + recall[label])
          if precision[label] + recall[label] else 0.0 for label in precision}
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["macro_precision"] == pytest.approx(sum(precision.values()) / 3)
    assert scores["macro_recall"] == pytest.approx(sum(recall.values()) / 3)
    assert scores["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    for label in "abc":
        assert scores["per_class"][label]["precision"] == pytest.approx(precision[label])
        assert scores["per_class"][label]["recall"] == pytest.approx(recall[label])
        assert scores["per_class"][label]["f1"] == pytest.approx(f1[label])
    assert [scores["per_class"][label]["support"] for label in "abc"] == [2, 2, 1]
    # rows: the reference label; columns: the predicted one
    assert scores["confusion"] == {"labels": ["a", "b", "c"], "matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 0]]}


def test_classification_labels_fix_the_class_order_and_keep_unpredicted_classes():
    scores = metrics.classification_scores(["x", "x"], ["x", "x"], labels=["y", "x"])
    assert scores["confusion"] == {"labels": ["y", "x"], "matrix": [[0, 0], [0, 2]]}
    assert scores["macro_f1"] == pytest.approx(0.5)  # x perfect, y absent and never predicted: 0


def ngrams(tokens: list[str], n: int) -> dict[tuple, int]:
    counts: dict[tuple, int] = {}
    for i in range(len(tokens) - n + 1):
        counts[tuple(tokens[i : i + n])] = counts.get(tuple(tokens[i : i + n]), 0) + 1
    return counts


def bleu_by_hand(hypothesis: str, reference: str) -> float:
    """BLEU of one sentence pair from its definition: the geometric mean of clipped 1..4-gram precisions times
    the brevity penalty, in percent."""
    hyp, ref = hypothesis.split(), reference.split()
    log_precision = 0.0
    for n in range(1, 5):
        hyp_counts, ref_counts = ngrams(hyp, n), ngrams(ref, n)
        clipped = sum(min(count, ref_counts.get(gram, 0)) for gram, count in hyp_counts.items())
        log_precision += math.log(clipped / sum(hyp_counts.values())) / 4
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return 100 * brevity * math.exp(log_precision)


def test_bleu_matches_its_definition():
    # precisions 5/6, 3/5, 2/4, 1/3 ("the" is clipped to the reference's one), equal lengths
    assert bleu_by_hand("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(100 * (1 / 12) ** 0.25)
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(
        100 * (1 / 12) ** 0.25, abs=1e-6)
    # every precision 1, four words for six: the brevity penalty exp(1 - 6/4)
    assert metrics.bleu(["the cat sat on"], ["the cat sat on the mat"]) == pytest.approx(
        100 * math.exp(-0.5), abs=1e-6)
    assert metrics.bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)


def test_chrf_matches_its_definition():
    # "abcdefx" against "abcdefg": of the 8-n character n-grams on each side, 7-n are shared, so precision and
    # recall are both (7-n)/(8-n) for n = 1..6, and the F-score of equal P and R is that value.
    expected = 100 * sum((7 - n) / (8 - n) for n in range(1, 7)) / 6
    assert metrics.chrf(["abcdefx"], ["abcdefg"]) == pytest.approx(expected, abs=1e-6)
    assert metrics.chrf(["same text"], ["same text"]) == pytest.approx(100.0)


def test_squad_normalisation_exact_match_and_token_f1():
    assert metrics.normalize_answer("The  Cat, of an Arc!") == "cat of arc"
    assert metrics.exact_match("the cat", ["A cat.", "dog"]) == 1.0
    assert metrics.exact_match("cats", ["cat"]) == 0.0
    # tokens {black, cat, sat} against {cat, sat, down}: 2 shared, P = R = 2/3
    assert metrics.token_f1("the black cat sat", ["a cat sat down"]) == pytest.approx(2 / 3)
    # counted as multisets: "cat cat" shares one "cat" with "cat": P 1/2, R 1
    assert metrics.token_f1("cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    # the best answer counts
    assert metrics.token_f1("red", ["blue", "red"]) == 1.0
    scores = metrics.qa_scores(["the cat", "black cat sat"], [["cat"], ["a cat sat down"]])
    assert scores == pytest.approx({"exact_match": 50.0, "f1": 100 * (1 + 2 / 3) / 2})


def test_choice_scores_by_sum_by_mean_by_pmi_and_chance_centred():
    log_likelihoods = [[-1.0, -2.0, -9.0], [-5.0, -6.0, -4.0]]
    tokens = [[1, 4, 9], [2, 2, 2]]
    # after the premise alone: item 0's choice 2 is rare on its own (-20), so it gains most from the context
    premise = [[-1.5, -2.5, -20.0], [-4.0, -5.0, -4.5]]
    labels = [1, 2]
    # item 0: sums pick choice 0 (wrong); means -1, -0.5, -1 pick choice 1 (right); PMI 0.5, 0.5, 11 picks 2
    # (wrong). item 1: sums and means pick 2; PMI -1, -1, 0.5 picks 2 (right).
    assert metrics.best_choices(log_likelihoods, tokens) == ([0, 2], [1, 2])
    assert metrics.pmi_choices(log_likelihoods, premise) == [2, 2]
    scores = metrics.choice_scores(log_likelihoods, tokens, premise, labels)
    chance = 1 / 3
    assert scores == pytest.approx({"acc": 0.5, "acc_norm": 1.0, "acc_centered": (0.5 - chance) / (1 - chance),
                                    "acc_pmi": 0.5})
    with pytest.raises(ValueError):
        metrics.choice_scores(log_likelihoods, tokens, premise[:1], labels)


def test_baselines():
    assert metrics.majority_baseline(["b", "a", "b"], 2) == ["b", "b"]
    train = ["sword war king battle", "love jest wedding song"] * 4
    labels = ["history", "comedy"] * 4
    assert metrics.tfidf_baseline(train, labels, ["the king and his sword", "a wedding song"]) == [
        "history", "comedy"]
