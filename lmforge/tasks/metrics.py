"""Task metrics: classification (scikit-learn), BLEU and chrF (sacrebleu), SQuAD v1.1 exact match and token F1,
and multiple-choice accuracy from completion log-likelihoods; plus the text baselines a classifier is judged by.

Scales follow each metric's custom: accuracies and precision/recall/F1 are fractions in [0, 1]; BLEU, chrF and
the SQuAD scores are percentages in [0, 100], as sacrebleu and the official SQuAD script print them.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence


def accuracy(predictions: Sequence, references: Sequence) -> float:
    if len(predictions) != len(references) or not references:
        raise ValueError("accuracy needs as many predictions as references, at least one")
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def classification_scores(predictions: Sequence[str], references: Sequence[str],
                          labels: Sequence[str] | None = None) -> dict:
    """accuracy, macro precision/recall/F1 (the unweighted mean over classes; a class never predicted has
    precision 0), per_class {label: precision, recall, f1, support} and confusion {labels, matrix}, where
    matrix[i][j] counts records of reference labels[i] predicted as labels[j]. `labels` (default: every label
    seen, sorted) fixes the classes and their order."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(labels) if labels is not None else sorted(set(references) | set(predictions))
    precision, recall, f1, support = precision_recall_fscore_support(
        references, predictions, labels=labels, average=None, zero_division=0)
    macro = precision_recall_fscore_support(references, predictions, labels=labels, average="macro",
                                            zero_division=0)
    matrix = confusion_matrix(references, predictions, labels=labels)
    return {
        "accuracy": accuracy(predictions, references),
        "macro_precision": float(macro[0]),
        "macro_recall": float(macro[1]),
        "macro_f1": float(macro[2]),
        "per_class": {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)},
        "confusion": {"labels": labels, "matrix": matrix.tolist()},
    }


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenization, up to 4-grams, one reference per hypothesis)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu's defaults: character 6-grams, beta 2)."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's answer normalisation: lower case, punctuation removed, the articles a/an/the removed,
    runs of whitespace made one space."""
    text = "".join(char for char in text.lower() if char not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1 if the normalised prediction equals any normalised answer, else 0."""
    return float(any(normalize_answer(prediction) == normalize_answer(answer) for answer in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """The best, over the answers, of the F1 of the normalised tokens in common (counted as a multiset)."""

    def f1(answer: str) -> float:
        predicted, truth = normalize_answer(prediction).split(), normalize_answer(answer).split()
        common = sum((Counter(predicted) & Counter(truth)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(predicted), common / len(truth)
        return 2 * precision * recall / (precision + recall)

    return max(f1(answer) for answer in answers)


def qa_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict:
    """exact_match and f1: means over the questions, in percent (as the SQuAD v1.1 script)."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError("qa scores need as many predictions as answer lists, at least one")
    return {"exact_match": 100 * sum(map(exact_match, predictions, answers)) / len(answers),
            "f1": 100 * sum(map(token_f1, predictions, answers)) / len(answers)}


def best_choices(log_likelihoods: Sequence[Sequence[float]], completion_tokens: Sequence[Sequence[int]]
                 ) -> tuple[list[int], list[int]]:
    """Each item's chosen index by summed log-likelihood, and by mean log-likelihood per completion token
    (the first of tied choices wins)."""
    return (_argmax_each(log_likelihoods),
            _argmax_each([[score / length for score, length in zip(scores, lengths, strict=True)]
                          for scores, lengths in zip(log_likelihoods, completion_tokens, strict=True)]))


def pmi_choices(log_likelihoods: Sequence[Sequence[float]], premise_log_likelihoods: Sequence[Sequence[float]]
                ) -> list[int]:
    """Each item's chosen index by pointwise mutual information with the context: the choice's log-likelihood
    after the context minus after the premise alone (the context's last token), so how common a choice's words
    are on their own cancels (Holtzman et al. 2021, "Surface Form Competition")."""
    return _argmax_each([[given - alone for given, alone in zip(scores, premise, strict=True)]
                         for scores, premise in zip(log_likelihoods, premise_log_likelihoods, strict=True)])


def _argmax_each(rows: Sequence[Sequence[float]]) -> list[int]:
    return [max(range(len(row)), key=row.__getitem__) for row in rows]


def choice_scores(log_likelihoods: Sequence[Sequence[float]], completion_tokens: Sequence[Sequence[int]],
                  premise_log_likelihoods: Sequence[Sequence[float]], labels: Sequence[int]) -> dict:
    """Multiple-choice accuracy from each choice's summed log-likelihood given the context.

    acc: the choice with the highest summed log-likelihood; acc_norm: the highest mean log-likelihood per
    completion TOKEN (llm.c's HellaSwag: the lowest average loss over the completion's tokens; with a character
    tokenizer that is per character); acc_centered: (acc - chance) / (1 - chance), chance being the mean of
    1 / number of choices, so 0 is guessing and 1 is perfect; acc_pmi: the highest log-likelihood after the
    context minus after the premise alone (`pmi_choices`; premise_log_likelihoods are the latter).
    """
    if not (len(log_likelihoods) == len(completion_tokens) == len(premise_log_likelihoods) == len(labels)) \
            or not labels:
        raise ValueError("choice scores need log-likelihoods with and without the context, token counts and a label "
                         "per item")
    by_sum, by_mean = best_choices(log_likelihoods, completion_tokens)
    acc = accuracy(by_sum, labels)
    chance = sum(1 / len(scores) for scores in log_likelihoods) / len(labels)
    return {"acc": acc, "acc_norm": accuracy(by_mean, labels), "acc_centered": (acc - chance) / (1 - chance),
            "acc_pmi": accuracy(pmi_choices(log_likelihoods, premise_log_likelihoods), labels)}


def majority_baseline(train_labels: Sequence[str], count: int) -> list[str]:
    """`count` predictions of the most common training label (the first in sorted order among equals)."""
    counts = Counter(train_labels)
    most = max(sorted(counts), key=lambda label: counts[label])
    return [most] * count


def tfidf_baseline(train_texts: Sequence[str], train_labels: Sequence[str], texts: Sequence[str]) -> list[str]:
    """Labels from a TF-IDF (word unigrams and bigrams) + logistic regression classifier fitted on the train
    split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2),
                          LogisticRegression(max_iter=1000))
    model.fit(list(train_texts), list(train_labels))
    return [str(label) for label in model.predict(list(texts))]
