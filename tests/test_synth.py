"""`ragline synth`: questions synthesised from an index's passages. The filters, passage order, resume and
refusals run with scripted replies (each filter is hit by a reply made to fail it); the model calls with the
tiny generator over the real slice index; the file is read by both trainers."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_generator

from ragline.corpus.passages import Passage
from ragline.errors import RaglineError
from ragline.train import synth
from ragline.train.synth import SynthConfig, Synthesiser


class ListStore:
    """A passage store over a list (what the synthesiser reads of an index's store)."""

    def __init__(self, passages):
        self.passages = passages

    def __len__(self):
        return len(self.passages)

    def get(self, rows):
        return [self.passages[r] for r in rows]

    def values(self, column):
        return [getattr(p, column) for p in self.passages]


def _passages(n=24, words=30):
    """n passages of two per document; passage i mentions 'name{i}' and 'place{i}'."""
    out = []
    for i in range(n):
        text = f"The subject {i} was made by name{i} in place{i} . " + " ".join(f"filler{i}x{j}" for j in range(words))
        out.append(Passage(f"doc{i // 2}#{i % 2}", f"doc{i // 2}", f"Doc {i // 2}", text))
    return out


def _scripted(store, bad=None):
    """Replies that pass every filter, except for the passages ``bad`` maps (row -> a reply or a filter name)."""
    bad = bad or {}
    rows = {p.pid: r for r, p in enumerate(store.passages)}
    asked = {}  # question -> the rows whose reply asked it
    replied = {}  # row -> the answer its reply gave

    def generate(passages):
        out = []
        for p in passages:
            r = rows[p.pid]
            kind = bad.get(r)
            reply = {None: f"Question: Who made subject {r}?\nAnswer: name{r}", "format": "I cannot help with that.",
                     "span": f"Question: Who made subject {r}?\nAnswer: nobody at all",
                     "leak": f"Question: Did name{r} make subject {r}?\nAnswer: name{r}",
                     "copy": f"Question: The subject {r} was made by name{r} in?\nAnswer: place{r}",
                     "dedup": "Question: Which verb is used, twice?\nAnswer: made",
                     }.get(kind, f"Question: Who made subject {r}?\nAnswer: name{r}")
            parsed = synth.parse_reply(reply)
            if parsed:
                asked.setdefault(parsed[0], []).append(r)
                replied[r] = parsed[1]
            out.append(reply)
        return out

    def search(questions, k):
        return [[r + 1 for r in asked[q]] if bad.get(asked[q][0]) == "roundtrip" else asked[q] for q in questions]

    def answer(questions, passages):
        return ["somebody else" if bad.get(rows[p.pid]) == "reader" else f"by {replied[rows[p.pid]]}" for p in passages]

    return generate, search, answer


def _runner(tmp_path, store, cfg=None, bad=None, name="out.jsonl", batch_size=4, fns=None):
    generate, search, answer = fns or _scripted(store, bad)
    return Synthesiser(cfg or SynthConfig(), tmp_path / name, store, "fp-1", generate, search, answer,
                       batch_size=batch_size)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reply_parsing_and_the_text_filters():
    assert synth.parse_reply("Question: Who built it\nAnswer: Gustave Eiffel.") == ("Who built it?", "Gustave Eiffel")
    assert synth.parse_reply("question:  Where?  answer: Paris") == ("Where?", "Paris")
    assert synth.parse_reply("Who built it?") is None and synth.parse_reply("Question: x\nAnswer:  ") is None
    text = "The Eiffel Tower is named after the engineer Gustave Eiffel, whose company built it."
    assert synth.is_span("Gustave Eiffel", text, 5) and synth.is_span("the engineer Gustave Eiffel", text, 5)
    assert not synth.is_span("Eiffel Gustave", text, 5)  # words of the passage, not a run of them
    assert not synth.is_span("is named after the engineer Gustave Eiffel", text, 5)  # 6 words normalised
    assert not synth.is_span("", text, 5)
    assert synth.leaks("Was Gustave Eiffel the engineer?", "gustave eiffel") and not synth.leaks("Who?", "Eiffel")
    assert synth.is_copy("The Eiffel Tower is named after whom?", text)  # 5 of 6 words ("the" dropped)
    assert not synth.is_copy("Whose company built the tower?", text)  # 3 of 4 words: too few to be a copy
    assert not synth.is_copy("After which engineer is the Eiffel Tower named?", text)  # 2 of 7
    assert synth.agrees("engineer Gustave Eiffel", "Gustave Eiffel") and synth.agrees("Eiffel", "the Eiffel")
    assert not synth.agrees("Paris", "Gustave Eiffel") and not synth.agrees("", "Paris")


def test_passages_are_sampled_across_documents_by_seed():
    docs = [f"d{i}" for i in range(10) for _ in range(3)]  # 10 documents of 3 passages, in document order
    order = synth.passage_order(docs, seed=0)
    assert sorted(order.tolist()) == list(range(30))
    first = [docs[r] for r in order[:10]]
    assert sorted(first) == sorted(set(docs))  # every document once before any document's second passage
    assert first != sorted(first)  # not the documents' own order
    assert np.array_equal(order, synth.passage_order(docs, seed=0))
    assert not np.array_equal(order, synth.passage_order(docs, seed=1))
    alive = np.ones(30, dtype=bool)
    alive[[0, 5, 29]] = False
    assert set(synth.passage_order(docs, seed=0, alive=alive).tolist()) == set(range(30)) - {0, 5, 29}


def test_each_filter_drops_what_it_should_and_is_counted(tmp_path):
    store = ListStore(_passages())
    bad = {1: "format", 2: "span", 3: "leak", 4: "copy", 5: "dedup", 6: "dedup", 7: "roundtrip", 8: "reader"}
    said = []
    stats = _runner(tmp_path, store, bad=bad).run(18, progress=False, log=said.append)  # one more than there are
    assert said == ["only 17 of 18 questions after trying 24 passages; rerun to try more, or use fewer --filter checks"]
    kept = _lines(tmp_path / "out.jsonl")
    questions = [rec["question"] for rec in kept]
    assert stats.questions == 17 and len(kept) == 17 and len(set(questions)) == 17
    assert stats.dropped == {"format": 1, "span": 1, "leak": 1, "copy": 1, "dedup": 1, "roundtrip": 1, "reader": 1}
    assert stats.passages_tried == 24 and stats.generated == 24
    made = {f"Who made subject {r}?" for r in range(24) if r not in bad} | {"Which verb is used, twice?"}
    assert set(questions) == made
    p = store.passages[0]
    assert kept[[rec["id"] for rec in kept].index("synth-" + p.pid)] == {
        "id": "synth-" + p.pid, "question": "Who made subject 0?", "answers": ["name0"], "positive": [p.pid],
        "title": p.title}
    # with only some filters on, the others' failures are kept
    cfg = SynthConfig(filters=("span", "reader"))
    stats = _runner(tmp_path, store, cfg=cfg, bad=bad, name="some.jsonl").run(24, progress=False, log=said.append)
    assert stats.questions == 24 - 3 and stats.dropped["format"] == 1  # format always applies
    assert stats.dropped["span"] == stats.dropped["reader"] == 1 and stats.dropped["leak"] == 0


def test_short_passages_are_skipped(tmp_path):
    store = ListStore(_passages(8) + [Passage("tiny#0", "tiny", "Tiny", "Only a few words here.")])
    stats = _runner(tmp_path, store).run(100, progress=False, log=lambda m: None)
    assert stats.short_passages == 1 and stats.questions == 8


def test_resume_continues_the_file_as_one_run_would(tmp_path):
    store = ListStore(_passages())
    bad = {2: "span", 9: "reader"}
    whole = _runner(tmp_path, store, bad=bad, name="whole.jsonl").run(12, progress=False)
    part = _runner(tmp_path, store, bad=bad, name="parts.jsonl")
    first = part.run(5, progress=False)
    assert first.questions == 5
    path = tmp_path / "parts.jsonl"
    with open(path, "a") as f:  # a batch appended but killed before its record was written
        f.write('{"id": "synth-half", "question": "half written?"')
    again = _runner(tmp_path, store, bad=bad, name="parts.jsonl").run(12, progress=False)
    assert path.read_text() == (tmp_path / "whole.jsonl").read_text()
    assert again.questions == whole.questions == 12
    assert _runner(tmp_path, store, bad=bad, name="parts.jsonl").run(12, progress=False).questions == 12  # done


def test_other_settings_or_a_foreign_file_are_refused(tmp_path):
    store = ListStore(_passages())
    _runner(tmp_path, store).run(3, progress=False)
    with pytest.raises(RaglineError, match="other settings \\(seed\\)"):
        _runner(tmp_path, store, cfg=SynthConfig(seed=7)).run(3, progress=False)
    with pytest.raises(RaglineError, match="other settings \\(filters, roundtrip_k\\)"):
        _runner(tmp_path, store, cfg=SynthConfig(filters=("span",), roundtrip_k=9)).run(3, progress=False)
    other_index = Synthesiser(SynthConfig(), tmp_path / "out.jsonl", store, "fp-2", *_scripted(store))
    with pytest.raises(RaglineError, match="the index"):
        other_index.run(3, progress=False)
    (tmp_path / "mine.jsonl").write_text('{"question": "kept?"}\n')
    with pytest.raises(RaglineError, match="not written by ragline synth"):
        _runner(tmp_path, store, name="mine.jsonl").run(3, progress=False)
    assert (tmp_path / "mine.jsonl").read_text() == '{"question": "kept?"}\n'
    with pytest.raises(RaglineError, match="unknown synth filter"):
        SynthConfig(filters=("span", "nope")).check()


def test_nothing_usable_or_nothing_to_read_is_an_error_and_leaves_no_file(tmp_path):
    store = ListStore(_passages())
    nothing = (lambda ps: ["" for _ in ps], lambda qs, k: [[] for _ in qs], lambda qs, ps: ["" for _ in qs])
    with pytest.raises(RaglineError, match=r"no usable question from 24 passages \(dropped: format 24\)"):
        _runner(tmp_path, store, fns=nothing).run(5, progress=False)
    assert not list(tmp_path.glob("out.jsonl*"))
    with pytest.raises(RaglineError, match="holds no passage"):
        _runner(tmp_path, ListStore([])).run(5, progress=False)
    alive = np.zeros(24, dtype=bool)
    runner = Synthesiser(SynthConfig(), tmp_path / "out.jsonl", store, "fp", *_scripted(store), alive=alive)
    with pytest.raises(RaglineError, match="no live passage"):
        runner.run(5, progress=False)


def test_model_functions_run_the_generator_and_retriever(small_index):
    from ragline.retriever import Retriever

    gen = tiny_generator()
    retriever = Retriever(small_index)
    generate, search, answer = synth.model_functions(gen, retriever, "dense", max_new_tokens=8)
    passages = retriever.index.store.get([0, 3, 7])
    replies = generate(passages)
    assert len(replies) == 3 and all(isinstance(r, str) for r in replies)
    assert search([passages[1].title], 5)[0][0] >= 0 and len(search(["x", "y"], 4)[1]) == 4
    said = answer(["Who?", "What?", "When?"], passages)
    assert len(said) == 3 and all(isinstance(s, str) for s in said)
    prompt = synth.question_prompt(gen, Passage("p#0", "p", "T <|im_start|>", "text <|im_end|> more"))
    assert "<|im_start|>system" in prompt
    ids = gen.tokenize_prompt(prompt)
    specials = gen.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert sum(i in specials for i in ids) == sum(prompt.count(t) for t in ("<|im_start|>", "<|im_end|>")) - 2


def test_the_cli_refuses_a_generator_with_nothing_usable(tmp_path, small_index, monkeypatch):
    from ragline.cli import cli
    from ragline.models import loading

    monkeypatch.setattr(loading.CausalGenerator, "load", classmethod(lambda cls, *a, **k: tiny_generator()))
    out = tmp_path / "synth.jsonl"
    result = CliRunner().invoke(cli, ["synth", "--index", str(small_index), "--out", str(out), "--questions", "2",
                                      "--precision", "fp32", "--batch-size", "4"])
    assert isinstance(result.exception, RaglineError), result.output
    assert "wrote no usable question" in str(result.exception)
    assert not out.exists() and not out.with_name(out.name + synth.STATE_SUFFIX).exists()


def test_both_trainers_read_the_file_unchanged(tmp_path, small_index):
    from ragline.index.registry import open_index
    from ragline.retriever import Retriever
    from ragline.train.data import read_examples
    from ragline.train.rag import RagTrainConfig, RagTrainer
    from ragline.train.retriever import resolve_pairs

    index = open_index(small_index)
    store = index.store
    out = tmp_path / "synth.jsonl"
    Synthesiser(SynthConfig(filters=("dedup",)), out, store, index.fingerprint,
                lambda ps: [f"Question: What is {p.title} about?\nAnswer: {p.text.split()[0]}" for p in ps],
                None, None).run(12, progress=False)
    examples = read_examples(str(out))
    assert len(examples) == 12 and all(e.id.startswith("synth-") and len(e.positives) == 1 for e in examples)
    pairs, missing = resolve_pairs(examples, index, 1)
    assert missing == 0 and [store.get([p.positive])[0].pid for p in pairs] == [e.positives[0] for e in examples]
    cfg = RagTrainConfig(train=str(out), index=str(small_index), k=2, batch_size=4, steps=1, warmup=0,
                         val_fraction=0.0, eval_every=1, save_every=1)
    RagTrainer(cfg, tmp_path / "run", generator=tiny_generator(), question_encoder=Retriever(small_index).encoder,
               progress=False, log=lambda m: None).run_training()
    assert (tmp_path / "run" / "final" / "run.json").is_file()
