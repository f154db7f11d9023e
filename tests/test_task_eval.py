"""`lmforge eval --task`: each task's metrics on a tiny model against a direct computation, the exact keys
printed, and the predictions file (one object per record, in input order)."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.cli import main
from lmforge.config.load import dumps_config
from lmforge.config.sections import Config, ModelConfig
from lmforge.data.template import ChatTemplate
from lmforge.data.tokenizer import CharTokenizer
from lmforge.infer.load import load_run
from lmforge.model.factory import build_model
from lmforge.run.checkpoints import save_checkpoint
from lmforge.tasks import metrics

TOKENIZER = CharTokenizer("".join(sorted(set(string.ascii_letters + string.digits + " .,:;!'?\n-"))))
KEYS = {"classify": {"accuracy", "macro_precision", "macro_recall", "macro_f1", "per_class", "confusion"},
        "translate": {"bleu", "chrf", "copy_bleu", "copy_chrf"}, "qa": {"exact_match", "f1"},
        "choice": {"acc", "acc_norm", "acc_centered", "acc_pmi"}, "sft": {"loss", "perplexity"}}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run holding a randomly initialised tiny GPT (block_size 24) and a character tokenizer."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=16)
    directory = tmp_path_factory.mktemp("eval") / "run"
    directory.mkdir()
    (directory / "config.toml").write_text(dumps_config(Config(model=config)))
    TOKENIZER.save(directory / "tokenizer.json")
    save_checkpoint(directory, 0, build_model(config).state_dict(), [], {})
    return directory


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def eval_cli(capsys, run: Path, task: str, data: Path, *extra: str) -> dict:
    code = main(["eval", str(run), "--task", task, "--data", str(data), "--device", "cpu", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert len(captured.out.strip().splitlines()) == 1  # one JSON object
    scores = json.loads(captured.out)
    assert set(scores) == KEYS[task]
    return scores


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


CHOICES = [
    {"context": "the cat sat on\n", "choices": ["a mat", "the dog ran", "x", "Top"], "label": 0},
    {"context": "we read\n", "choices": ["books", "code"], "label": 1},
    {"context": "", "choices": ["tea", "a tree", "b"], "label": 2},
    {"context": "a dog ran to the park and the bird sang\n", "choices": ["in a tree", "no"], "label": 0},  # cut
]


def direct_log_likelihood(model, context: str, choice: str, block_size: int) -> tuple[float, int]:
    """One sequence at a time, no padding: the summed log-probability of the choice's characters."""
    context_ids = TOKENIZER.encode(context) or [TOKENIZER.eot_id]
    choice_ids = TOKENIZER.encode(choice)
    ids = (context_ids + choice_ids)[-(block_size + 1):]
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    log_probs = F.log_softmax(logits[0], dim=-1)
    total = sum(float(log_probs[len(ids) - 1 - k, ids[len(ids) - k]]) for k in range(1, len(choice_ids) + 1))
    return total, len(choice_ids)


def test_choice_equals_a_direct_computation(run, tmp_path, capsys):
    data = write_jsonl(tmp_path / "choice.jsonl", CHOICES)
    model = load_run(run, language_model=False).model
    log_likelihoods, lengths = [], []
    for record in CHOICES:
        pairs = [direct_log_likelihood(model, record["context"], c, 24) for c in record["choices"]]
        log_likelihoods.append([p[0] for p in pairs])
        lengths.append([p[1] for p in pairs])
    by_sum = [max(range(len(s)), key=s.__getitem__) for s in log_likelihoods]
    by_mean = [max(range(len(s)), key=lambda i, s=s, n=n: s[i] / n[i])
               for s, n in zip(log_likelihoods, lengths, strict=True)]
    # acc_pmi's baseline: each choice after the context's last character alone (the end-of-text token if none)
    alone = [[direct_log_likelihood(model, record["context"][-1:], c, 24)[0] for c in record["choices"]]
             for record in CHOICES]
    by_pmi = [max(range(len(s)), key=lambda i, s=s, a=a: s[i] - a[i])
              for s, a in zip(log_likelihoods, alone, strict=True)]
    labels = [record["label"] for record in CHOICES]
    acc = sum(p == y for p, y in zip(by_sum, labels, strict=True)) / len(labels)
    acc_norm = sum(p == y for p, y in zip(by_mean, labels, strict=True)) / len(labels)
    acc_pmi = sum(p == y for p, y in zip(by_pmi, labels, strict=True)) / len(labels)
    chance = sum(1 / len(r["choices"]) for r in CHOICES) / len(CHOICES)
    for batch_size in ("1", "5"):  # batches mix choices of different lengths, right-padded
        predictions = tmp_path / f"choice-{batch_size}.jsonl"
        scores = eval_cli(capsys, run, "choice", data, "--batch-size", batch_size, "--predictions", str(predictions))
        assert scores["acc"] == pytest.approx(acc)
        assert scores["acc_norm"] == pytest.approx(acc_norm)
        assert scores["acc_centered"] == pytest.approx((acc - chance) / (1 - chance))
        assert scores["acc_pmi"] == pytest.approx(acc_pmi)
        assert read_jsonl(predictions) == [
            {"prediction": s, "prediction_norm": m, "prediction_pmi": p, "reference": y}
            for s, m, p, y in zip(by_sum, by_mean, by_pmi, labels, strict=True)]


def test_choice_log_likelihoods_match_per_choice(run):
    from lmforge.tasks.evaluate import completion_sequences, sequence_log_likelihoods

    model = load_run(run, language_model=False).model
    record = CHOICES[3]
    sequences, scored, cut = completion_sequences(TOKENIZER, record["context"], record["choices"], 24)
    assert cut == 2 and all(len(ids) == 25 for ids in sequences)  # kept their last block_size + 1 tokens
    totals = sequence_log_likelihoods(model, sequences, scored, TOKENIZER.eot_id, 2, "cpu")
    for total, choice in zip(totals, record["choices"], strict=True):
        assert total == pytest.approx(direct_log_likelihood(model, record["context"], choice, 24)[0], abs=1e-5)


def test_sft_loss_is_the_mean_over_assistant_tokens(run, tmp_path, capsys):
    records = [{"prompt": "say cat", "response": "cat cat"},
               {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                             {"role": "user", "content": "again"}, {"role": "assistant", "content": "no"}]}]
    data = write_jsonl(tmp_path / "sft.jsonl", records)
    model = load_run(run, language_model=False).model
    total, count = 0.0, 0
    for record in records:
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]},
                                              {"role": "assistant", "content": record["response"]}]
        ids, trained = ChatTemplate().encode(messages, TOKENIZER)
        end = max(i for i, keep in enumerate(trained) if keep) + 1  # nothing after the last reply is scored
        ids, trained = ids[:end][-25:], trained[:end][-25:]  # then the last block_size + 1 tokens
        with torch.no_grad():
            log_probs = F.log_softmax(model(torch.tensor([ids[:-1]]))[0][0], dim=-1)
        for position in range(1, len(ids)):
            if trained[position]:
                total -= float(log_probs[position - 1, ids[position]])
                count += 1
    scores = eval_cli(capsys, run, "sft", data)
    assert scores["loss"] == pytest.approx(total / count, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_translate_and_qa_score_greedy_replies_in_input_order(run, tmp_path, capsys):
    records = [{"source": "a cat", "target": "the cat"}, {"source": "Haue", "target": "Have"},
               {"source": "yes", "target": "yes"}]
    data = write_jsonl(tmp_path / "folio.jsonl", records)
    predictions = tmp_path / "out" / "translate.jsonl"
    scores = eval_cli(capsys, run, "translate", data, "--predictions", str(predictions))
    rows = read_jsonl(predictions)
    assert [row["reference"] for row in rows] == [r["target"] for r in records]
    replies = [row["prediction"] for row in rows]
    targets = [r["target"] for r in records]
    assert scores["bleu"] == pytest.approx(metrics.bleu(replies, targets))
    assert scores["chrf"] == pytest.approx(metrics.chrf(replies, targets))
    assert scores["copy_bleu"] == pytest.approx(metrics.bleu([r["source"] for r in records], targets))
    assert scores["copy_chrf"] == pytest.approx(metrics.chrf([r["source"] for r in records], targets))

    qa = [{"context": "the cat sat", "question": "who sat", "answers": ["cat", "the cat"]},
          {"context": "a dog ran", "question": "who ran", "answers": ["dog"]}]
    predictions = tmp_path / "qa.jsonl"
    scores = eval_cli(capsys, run, "qa", write_jsonl(tmp_path / "qa_data.jsonl", qa), "--predictions",
                      str(predictions))
    rows = read_jsonl(predictions)
    assert [row["reference"] for row in rows] == [r["answers"] for r in qa]
    assert scores == pytest.approx(metrics.qa_scores([row["prediction"] for row in rows], [r["answers"] for r in qa]))


def test_classify_after_fine_tuning(run, tmp_path, capsys):
    from lmforge.tasks.finetune import finetune_command

    data = tmp_path / "genre"
    words = ("cat", "dog", "tree")
    for split in ("train", "val", "test"):
        write_jsonl(data / f"{split}.jsonl", [{"text": f"the {w} sat", "label": w} for w in words * 3])
    out = tmp_path / "classifier"
    finetune_command(str(run), task="classify", data=str(data), out=str(out), quiet=True,
                     overrides={"train.max_steps": "2", "train.batch_size": "4", "train.device": "cpu",
                                "train.eval_every": "2"})
    predictions = tmp_path / "classify.jsonl"
    scores = eval_cli(capsys, out, "classify", data, "--predictions", str(predictions))  # the directory's test file
    rows = read_jsonl(predictions)
    assert [row["reference"] for row in rows] == list(words * 3)
    assert scores["accuracy"] == pytest.approx(sum(r["prediction"] == r["reference"] for r in rows) / len(rows))
    assert scores["confusion"]["labels"] == sorted(words)
    assert sum(map(sum, scores["confusion"]["matrix"])) == len(rows)

    write_jsonl(tmp_path / "unseen.jsonl", [{"text": "the cat sat", "label": "bird"}])
    assert main(["eval", str(out), "--task", "classify", "--data", str(tmp_path / "unseen.jsonl")]) == 2
    assert "label 'bird' never appeared" in capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"context": "caf\u00e9 \u00e9t\u00e9", "choices": ["a", "b"],
                                                 "label": 0}])
    cases = [
        (["--task", "choice", "--data", str(data)], "cannot encode 3 characters"),
        (["--predictions", str(tmp_path / "p.jsonl"), "--data", str(data)], "--predictions needs --task"),
        (["--task", "choice", "--data", str(tmp_path / "missing.jsonl")], "not found"),
        (["--task", "summarize", "--data", str(data)], "unknown task"),
    ]
    for argv, message in cases:
        assert main(["eval", str(run), "--device", "cpu", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_translate_prompts_plain_runs_with_the_separator_and_chat_runs_with_the_modernize_request(run, monkeypatch):
    import lmforge.infer.generate as generate_module
    from lmforge.tasks.evaluate import evaluate_generation
    from lmforge.tasks.kinds import task_kind

    prompts = []

    def greedy_batch(model, batch, limits, *, stop_token, batch_size):
        prompts.extend(TOKENIZER.decode(prompt) for prompt in batch)
        return [[] for _ in batch]

    monkeypatch.setattr(generate_module, "greedy_batch", greedy_batch)
    model = load_run(run, language_model=False).model
    records = [{"source": "a cat", "target": "the cat"}]
    evaluate_generation(model, TOKENIZER, records, task_kind("translate"), ChatTemplate(), None)
    evaluate_generation(model, TOKENIZER, records, task_kind("translate"), ChatTemplate(), None, chat=True)
    assert prompts == ["a cat\n--\n", "USER:\nModernize: a cat\n\nASSISTANT:\n"]
