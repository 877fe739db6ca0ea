"""Split documents into disjoint passages of at most N words (100 in DPR and RAG), each with its title."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ragline.corpus.readers import Document
from ragline.errors import RaglineError

DEFAULT_WORDS = 100


@dataclass(frozen=True)
class Passage:
    """A passage of at most N words of one document, with the document's title."""

    pid: str      # stable id: "<document id>#<chunk number>"
    doc_id: str
    title: str
    text: str


def split_words(text: str, max_words: int = DEFAULT_WORDS) -> list[str]:
    """Whitespace words in consecutive, disjoint chunks of at most ``max_words`` (the last may be short)."""
    if max_words < 1:
        raise RaglineError(f"passage length {max_words} words is too small", "use --passage-words 1 or more")
    words = text.split()
    return [" ".join(words[i : i + max_words]) for i in range(0, len(words), max_words)]


def split_documents(docs: Iterable[Document], max_words: int = DEFAULT_WORDS) -> Iterator[Passage]:
    """The passages of ``docs``: ``<id>#<n>`` chunks, or the record itself when it already is one passage
    (DPR's passages keep DPR's id; their document is their page title)."""
    for doc in docs:
        if doc.passage:
            yield Passage(doc.id, doc.title or doc.id, doc.title, doc.text)
            continue
        for i, chunk in enumerate(split_words(doc.text, max_words)):
            yield Passage(f"{doc.id}#{i}", doc.id, doc.title, chunk)


def encoder_text(title: str, text: str) -> str:
    """What the passage encoder and BM25 see: title then text, as DPR encodes (title, text)."""
    return f"{title}\n{text}" if title else text
