"""Split documents into disjoint passages of at most N words (100 in DPR and RAG), each with its title."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

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
    meta: dict = field(default_factory=dict, hash=False)  # source, page or section, the document's metadata


def split_words(text: str, max_words: int = DEFAULT_WORDS) -> list[str]:
    """Whitespace words in consecutive, disjoint chunks of at most ``max_words`` (the last may be short)."""
    if max_words < 1:
        raise RaglineError(f"passage length {max_words} words is too small", "use --passage-words 1 or more")
    words = text.split()
    return [" ".join(words[i : i + max_words]) for i in range(0, len(words), max_words)]


def split_documents(docs: Iterable[Document], max_words: int = DEFAULT_WORDS) -> Iterator[Passage]:
    """The passages of ``docs``: ``<id>#<n>`` chunks (numbered through the document's sections, none
    straddling two), or the record itself when it already is one passage (DPR's passages keep DPR's id; their
    document is their page title)."""
    for doc in docs:
        if doc.passage:
            yield Passage(doc.id, doc.title or doc.id, doc.title, doc.text, doc.meta)
            continue
        n = 0
        for text, meta in ((s.text, {**doc.meta, **s.meta}) for s in doc.sections) if doc.sections else \
                [(doc.text, doc.meta)]:
            for chunk in split_words(text, max_words):  # passages never straddle two sections (pages)
                yield Passage(f"{doc.id}#{n}", doc.id, doc.title, chunk, meta)
                n += 1


def encoder_text(title: str, text: str) -> str:
    """What the passage encoder and BM25 see: title then text, as DPR encodes (title, text)."""
    return f"{title}\n{text}" if title else text
