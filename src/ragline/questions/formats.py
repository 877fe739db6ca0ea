"""Task files in the public formats of the RAG paper's datasets, read into :class:`Task` (questions with gold
answers, provenance and the kind of answer that decides the metrics).

    format        file                                         answers                      kind
    kilt          KILT JSONL: id, input, output[{answer, provenance[{wikipedia_id, title}]}]  qa (label: FEVER)
    jsonl         JSONL: question (or input), answers (or answer), optional id, gold_titles / positive   qa
    dpr-qa        DPR's .qa.csv (NQ-open, TriviaQA, WebQuestions): question <TAB> ['answer', ...]        qa
    curatedtrec   DPR's CuratedTrec .qa.csv / .txt: question <TAB> ['regex', ...]                      regex
    triviaqa      TriviaQA JSON: {"Data": [{QuestionId, Question, Answer: {Value, Aliases}}]}        qa
    webquestions  WebQuestions JSON: [{utterance, targetValue: "(list (description X) ...)"}]        qa
    fever         FEVER JSONL: id, claim, label (SUPPORTS / REFUTES / NOT ENOUGH INFO)                  label
    msmarco       MS-MARCO v2.1 JSON: {query: {i: text}, answers: {i: [...]}, query_id: {i: id}}       free
    jeopardy      Jeopardy question generation (as in the RAG paper): NAME.source (answer entities) with
                  NAME.target (the Jeopardy questions to generate), one per line                       free

``detect_format`` picks one from the file name and its first record. A malformed record is reported with
its line number (record number for whole-file JSON formats): with ``skip_bad`` it is skipped and listed in
``Task.skipped``, otherwise reading fails with that message. Nothing malformed is ever scored as wrong.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ragline.errors import RaglineError
from ragline.questions.records import BadRecord, Page, Question, Task, answer_strings, titled

FORMATS = ("kilt", "jsonl", "dpr-qa", "curatedtrec", "triviaqa", "webquestions", "fever", "msmarco", "jeopardy")


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".source"):
        return "jeopardy"
    if name.endswith((".csv", ".tsv", ".txt")):
        return "curatedtrec" if "trec" in name else "dpr-qa"
    if name.endswith(".jsonl"):
        first = _first_json_line(path)
        if isinstance(first, dict) and "claim" in first and "label" in first:
            return "fever"
        if isinstance(first, dict) and "input" in first and "output" in first:
            return "kilt"
        return "jsonl"
    if name.endswith(".json"):
        head = path.read_text(encoding="utf-8", errors="replace")[:4096].lstrip()
        if head.startswith("["):
            return "webquestions"
        if '"Data"' in head:
            return "triviaqa"
        if '"query' in head or '"answers"' in head or '"passages"' in head:
            return "msmarco"
    raise RaglineError(f"cannot tell the format of task file {path}",
                       f"pass --format, one of: {', '.join(FORMATS)}")


def _first_json_line(path: Path) -> Any:
    with open(path, encoding="utf-8", errors="replace") as f:  # the reader reports a bad byte with its line
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return None
    return None


def load_task(path: str | Path, fmt: str | None = None, skip_bad: bool = False, require_answers: bool = True,
              require_pages: bool = False) -> Task:
    """Read a task file (see the module docstring for the formats). A record without a gold answer (or, with
    ``require_pages``, without a gold page) is malformed; duplicate ids are too."""
    path = Path(path)
    if not path.is_file():
        raise RaglineError(f"task file {path} does not exist", "check the path")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise RaglineError(f"unknown task format {fmt!r}", f"use one of: {', '.join(FORMATS)}")
    reader, kind = _READERS[fmt]
    questions: list[Question] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for where, make in reader(path):
        try:
            q = make()
            if not q.question.strip():
                raise BadRecord("empty question")
            if require_answers and not q.answers:
                raise BadRecord("no gold answer")
            if require_pages and not q.gold_titles:
                raise BadRecord("no gold page (gold_titles, positive or KILT provenance titles)")
            if q.id in seen:
                raise BadRecord(f"id {q.id!r} appears twice")
        except BadRecord as e:
            msg = f"{where}: {e}"
            if not skip_bad:
                raise RaglineError(msg, "fix or remove that record, or pass --skip-bad to skip bad records") from None
            skipped.append(msg)
            continue
        seen.add(q.id)
        questions.append(q)
    if not questions:
        raise RaglineError(f"task file {path} holds no usable question", f"check that it is in {fmt} format")
    if fmt == "kilt" and all(set(q.answers) <= {"SUPPORTS", "REFUTES"} for q in questions):
        kind = "label"  # KILT's FEVER
    return Task(path.stem, fmt, kind, questions, skipped)


Record = tuple[str, Callable[[], Question]]  # (where, build the question or raise BadRecord)


def _jsonl_records(path: Path, build: Callable[[Any, int], Question]) -> Iterator[Record]:
    with open(path, "rb") as f:  # decoded line by line: one bad byte is that record's problem, not the file's
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue

            def make(raw: bytes = raw, n: int = n) -> Question:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BadRecord(f"not valid UTF-8 (byte {e.start + 1} of the line)") from None
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadRecord(f"not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise BadRecord("not a JSON object")
                return build(rec, n)

            yield f"{path}:{n}", make


def _text(rec: dict, *keys: str) -> str:
    for k in keys:
        if isinstance(rec.get(k), str):
            return rec[k]
    raise BadRecord(f"no {' / '.join(repr(k) for k in keys)} text")


def _kilt(path: Path) -> Iterator[Record]:
    def build(rec: dict, n: int) -> Question:
        answers: list[str] = []
        provenance: list[tuple[Page, ...]] = []
        if not isinstance(rec.get("output", []), list):
            raise BadRecord('"output" is not a list')
        for o in rec.get("output") or []:
            if not isinstance(o, dict):
                raise BadRecord('an "output" entry is not an object')
            answers.extend(answer_strings(o.get("answer")))  # stripped, blank ones dropped (as KILT's script)
            if "provenance" in o:  # each output's provenance is one evidence set (KILT), empty ones included
                if not isinstance(o["provenance"], list) or not all(isinstance(p, dict) for p in o["provenance"]):
                    raise BadRecord('a "provenance" is not a list of objects')
                provenance.append(tuple(Page.from_kilt(p) for p in o["provenance"]))
        titles = tuple(dict.fromkeys(p.title for s in provenance for p in s if p.title))
        return Question(str(rec.get("id", f"line-{n}")).strip(), _text(rec, "input"), tuple(dict.fromkeys(answers)),
                        titles, tuple(provenance))
    return _jsonl_records(path, build)


def _plain_jsonl(path: Path) -> Iterator[Record]:
    def build(rec: dict, n: int) -> Question:
        ans = rec.get("answers", rec.get("answer"))
        gold = rec.get("gold_titles", rec.get("positive", []))
        gold = [gold] if isinstance(gold, str) else list(gold)
        return titled(str(rec.get("id", f"line-{n}")), _text(rec, "question", "input"), answer_strings(ans),
                      [str(g) for g in gold])
    return _jsonl_records(path, build)


def _fever(path: Path) -> Iterator[Record]:
    def build(rec: dict, n: int) -> Question:
        label = rec.get("label")
        if label not in ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO"):
            raise BadRecord(f"label {label!r} is not SUPPORTS, REFUTES or NOT ENOUGH INFO")
        return Question(str(rec.get("id", f"line-{n}")), _text(rec, "claim"), (label,))
    return _jsonl_records(path, build)


def _dpr_qa(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue

            def make(line: str = line.rstrip("\n"), n: int = n) -> Question:
                if "\t" not in line:
                    raise BadRecord("expected: question <TAB> ['answer', ...]")
                question, raw = line.rsplit("\t", 1)
                try:
                    answers = ast.literal_eval(raw.strip())
                except (ValueError, SyntaxError):
                    answers = raw.strip()  # some files give one bare answer
                if isinstance(answers, str):
                    answers = [answers]
                if not isinstance(answers, list | tuple):
                    raise BadRecord("the answers column is not a list")
                return Question(f"{path.stem}-{n}", question.strip(), answer_strings(list(answers)))

            yield f"{path}:{n}", make


def _whole_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RaglineError(f"{path}:{e.lineno}: not valid JSON ({e.msg})", "fix the file") from None


def _triviaqa(path: Path) -> Iterator[Record]:
    data = _whole_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("Data"), list):
        raise RaglineError(f"{path} has no \"Data\" list", "give a TriviaQA JSON file (or DPR's .qa.csv)")
    for i, rec in enumerate(data["Data"], 1):
        def make(rec: Any = rec, i: int = i) -> Question:
            if not isinstance(rec, dict) or not isinstance(rec.get("Answer"), dict):
                raise BadRecord('no "Answer" object')
            a = rec["Answer"]
            answers = [a["Value"]] if isinstance(a.get("Value"), str) else []
            answers += [x for x in a.get("Aliases") or [] if isinstance(x, str)]
            return Question(str(rec.get("QuestionId", f"record-{i}")), _text(rec, "Question"),
                            tuple(dict.fromkeys(answers)))
        yield f"{path}: record {i}", make


_WEBQ_VALUE = re.compile(r'\(description\s+(?:"((?:[^"\\]|\\.)*)"|([^()\s][^()]*?))\)')


def _webquestions(path: Path) -> Iterator[Record]:
    data = _whole_json(path)
    if not isinstance(data, list):
        raise RaglineError(f"{path} is not a JSON list", "give a WebQuestions JSON file (or DPR's .qa.csv)")
    for i, rec in enumerate(data, 1):
        def make(rec: Any = rec, i: int = i) -> Question:
            if not isinstance(rec, dict):
                raise BadRecord("not a JSON object")
            target = _text(rec, "targetValue")
            answers = [(q or bare).replace('\\"', '"').strip() for q, bare in _WEBQ_VALUE.findall(target)]
            return Question(str(rec.get("url", f"record-{i}")) + f"#{i}", _text(rec, "utterance"),
                            tuple(a for a in answers if a))
        yield f"{path}: record {i}", make


def _msmarco(path: Path) -> Iterator[Record]:
    data = _whole_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("query"), dict):
        raise RaglineError(f"{path} has no \"query\" column", "give an MS-MARCO v2.1 JSON file")
    answers, well, ids = data.get("answers") or {}, data.get("wellFormedAnswers") or {}, data.get("query_id") or {}
    for i, key in enumerate(data["query"], 1):
        def make(key: str = key) -> Question:
            text = data["query"][key]
            if not isinstance(text, str):
                raise BadRecord("the query is not text")
            golds = [a for a in (well.get(key) if isinstance(well.get(key), list) else []) + (answers.get(key) or [])
                     if isinstance(a, str) and a != "No Answer Present."]
            return Question(str(ids.get(key, key)), text, tuple(dict.fromkeys(golds)))
        yield f"{path}: record {i}", make


def _jeopardy(path: Path) -> Iterator[Record]:
    target = path.with_suffix(".target")
    if not target.is_file():
        raise RaglineError(f"{target} is missing", f"Jeopardy tasks are a pair of files: {path.name} and {target.name}")
    sources = path.read_text(encoding="utf-8").splitlines()
    targets = target.read_text(encoding="utf-8").splitlines()
    if len(sources) != len(targets):
        raise RaglineError(f"{path.name} has {len(sources)} lines but {target.name} has {len(targets)}",
                           "give the same number of lines in both (line n of one matches line n of the other)")
    for n, (s, t) in enumerate(zip(sources, targets, strict=True), 1):
        def make(s: str = s, t: str = t, n: int = n) -> Question:
            if not t.strip():
                raise BadRecord(f"{target.name} line {n} is empty")
            return Question(f"{path.stem}-{n}", s.strip(), answer_strings(t))
        yield f"{path}:{n}", make


_READERS: dict[str, tuple[Callable[[Path], Iterator[Record]], str]] = {
    "kilt": (_kilt, "qa"), "jsonl": (_plain_jsonl, "qa"), "dpr-qa": (_dpr_qa, "qa"),
    "curatedtrec": (_dpr_qa, "regex"), "triviaqa": (_triviaqa, "qa"), "webquestions": (_webquestions, "qa"),
    "fever": (_fever, "label"), "msmarco": (_msmarco, "free"), "jeopardy": (_jeopardy, "free"),
}
