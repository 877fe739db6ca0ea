"""Documents people have, read into sections that passages never straddle: PDF pages (pypdf), the main text of
HTML pages (trafilatura: no navigation, headers or footers), Markdown sections (markdown-it-py), Word DOCX
sections (python-docx) and plain text.

Each reader returns the document's title and its sections, every section with what locates it: ``{"page": n}``
(from 1) for a PDF, ``{"section": heading}`` under a heading. A file that cannot be read (malformed, encrypted,
no text in it) raises :class:`DocumentError` naming the file and the fix; the corpus reader reports it and
stops, or skips it with ``--skip-bad``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ragline.errors import RaglineError

PAGE, SECTION, SOURCE = "page", "section", "source"  # metadata keys every reader and citation use


class DocumentError(RaglineError):
    """A file that is not a readable document of its kind."""


MAX_DOCX_XML_BYTES = 64 * 2**20  # a DOCX file's XML, unzipped
MAX_DOCX_BLOCKS = 200_000        # paragraphs and tables of one DOCX body
DECRYPT = "decrypt it first (e.g. `qpdf --decrypt --password=... in.pdf out.pdf`) or remove it"


@dataclass(frozen=True)
class Section:
    """A part of a document that passages never straddle (a PDF page, the text under a heading), with the
    metadata that locates it."""

    text: str
    meta: dict = field(default_factory=dict, hash=False)


def read_document(path: Path) -> tuple[str | None, list[Section]]:
    """(title or None, sections) of the file at ``path``, read as its suffix says."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DocumentError(f"{path}: ragline does not read {path.suffix or 'suffix-less'} files",
                            f"give one of {', '.join(sorted(READERS))}")
    title, sections = reader(path)
    sections = [s for s in sections if s.text.strip()]
    if not sections:
        raise DocumentError(f"{path}: empty file (no text in it" + (", a scanned PDF?)" if path.suffix.lower() == ".pdf"
                                                                  else ")"),
                            "remove it, or convert it to text first (run OCR on scanned pages)")
    return (title.strip() if title and title.strip() else None), sections


def _read_text(path: Path) -> tuple[str | None, list[Section]]:
    return None, [Section(_utf8(path))]


def _utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DocumentError(f"{path}: not UTF-8 text", "convert it to UTF-8 or remove it") from None


def markdown_sections(source: str) -> tuple[str | None, list[Section]]:
    """The title (the first level-1 heading) and the sections of Markdown text as plain text: each heading
    starts a section named by it; text before the first heading is a section of its own."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").enable("table").parse(source)
    title: str | None = None
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    heading: str | None = None  # the tag of the heading being read
    for tok in tokens:
        if tok.type == "heading_open":
            heading = tok.tag
        elif tok.type == "heading_close":
            heading = None
        elif tok.type == "inline":
            text = _inline_text(tok)
            if heading is not None:
                if heading == "h1" and title is None:
                    title = text
                    continue
                sections.append((text, []))
            elif text:
                sections[-1][1].append(text)
        elif tok.type in ("fence", "code_block") and tok.content.strip():
            sections[-1][1].append(tok.content.strip())
    return title, [Section("\n".join(body), {SECTION: name} if name else {}) for name, body in sections if body]


def _inline_text(tok) -> str:
    parts = []
    for child in tok.children or []:
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
        elif child.type == "image":
            parts.append(child.content)
    return "".join(parts).strip()


def _read_markdown(path: Path) -> tuple[str | None, list[Section]]:
    return markdown_sections(_utf8(path))


def _read_html(path: Path) -> tuple[str | None, list[Section]]:
    import trafilatura

    raw = path.read_bytes()
    try:
        main = trafilatura.extract(raw, output_format="markdown", include_comments=False, include_tables=True,
                                   favor_recall=True)
        meta = trafilatura.extract_metadata(raw)
    except Exception as e:  # noqa: BLE001 - the parser's own errors vary with the page
        raise DocumentError(f"{path}: cannot read this HTML ({type(e).__name__}: {e})", "fix or remove it") from None
    if not main:
        raise DocumentError(f"{path}: no main text found in this HTML page", "remove it or give it a text body")
    title, sections = markdown_sections(main)
    return (meta.title if meta and meta.title else title), sections


def _read_pdf(path: Path) -> tuple[str | None, list[Section]]:
    import logging

    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError, PdfReadError, PdfStreamError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its repair notes ("EOF marker not found") are not ours
    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):  # an owner password alone still opens
            raise DocumentError(f"{path}: the PDF is encrypted with a password", DECRYPT)
        pages = [Section(_pdf_text(p.extract_text() or ""), {PAGE: i}) for i, p in enumerate(reader.pages, 1)]
        title = reader.metadata.title if reader.metadata else None
    except DocumentError:
        raise
    except FileNotDecryptedError:
        raise DocumentError(f"{path}: the PDF is encrypted with a password", DECRYPT) from None
    except (PdfReadError, PdfStreamError, ValueError, KeyError, TypeError, OSError) as e:
        raise DocumentError(f"{path}: not a readable PDF ({type(e).__name__}: {e})", "repair or remove it") from None
    return title, pages


def _pdf_text(text: str) -> str:
    """Words hyphenated across line ends joined again; the rest as the PDF gives it."""
    return re.sub(r"(\w)-\n(\w)", r"\1\2", text)


def _read_docx(path: Path) -> tuple[str | None, list[Section]]:
    """A DOCX file's sections under its headings. Bounded: a file whose XML parts unzip to more than
    MAX_DOCX_XML_BYTES, or whose body holds more than MAX_DOCX_BLOCKS paragraphs and tables, is refused (a
    52 KB file can hold millions of empty paragraphs); malformed XML is a DocumentError like any bad file."""
    import zipfile

    import docx
    from docx.opc.exceptions import PackageNotFoundError
    from docx.table import Table
    from lxml.etree import LxmlError

    bad = (PackageNotFoundError, zipfile.BadZipFile, KeyError, ValueError, LxmlError, OSError)
    try:
        with zipfile.ZipFile(path) as z:
            unzipped = sum(i.file_size for i in z.infolist() if i.filename.endswith((".xml", ".rels")))
    except (zipfile.BadZipFile, OSError) as e:
        raise DocumentError(f"{path}: not a readable DOCX file ({type(e).__name__}: {e})",
                            "save it again as .docx from a word processor, or remove it") from None
    if unzipped > MAX_DOCX_XML_BYTES:
        raise DocumentError(f"{path}: its XML unzips to {unzipped} bytes, over ragline's {MAX_DOCX_XML_BYTES}",
                            "split the document, or convert it to text first")
    try:
        d = docx.Document(str(path))
        title = d.core_properties.title or None
        names = {s.style_id: s.name for s in d.styles}  # a paragraph's style looked up once per style, not each time
        sections: list[tuple[str | None, list[str]]] = [(None, [])]
        for n, block in enumerate(d.iter_inner_content(), 1):
            if n > MAX_DOCX_BLOCKS:
                raise DocumentError(f"{path}: more than {MAX_DOCX_BLOCKS} paragraphs and tables",
                                    "split the document, or convert it to text first")
            if isinstance(block, Table):
                rows = [" | ".join(c.text.strip() for c in row.cells) for row in block.rows]
                sections[-1][1].append("\n".join(r for r in rows if r.strip(" |")))
                continue
            text = block.text.strip()
            if not text:
                continue
            style = names.get(block._p.style) or ""  # pStyle's id; none: the default (Normal)
            if style == "Title":
                title = title or text
            elif style.startswith("Heading"):
                sections.append((text, []))
            else:
                sections[-1][1].append(text)
    except bad as e:
        raise DocumentError(f"{path}: not a readable DOCX file ({type(e).__name__}: {str(e)[:200]})",
                            "save it again as .docx from a word processor, or remove it") from None
    return title, [Section("\n".join(body), {SECTION: name} if name else {}) for name, body in sections if body]


READERS: dict[str, Callable[[Path], tuple[str | None, list[Section]]]] = {
    ".txt": _read_text, ".md": _read_markdown, ".markdown": _read_markdown, ".html": _read_html,
    ".htm": _read_html, ".pdf": _read_pdf, ".docx": _read_docx}
SUFFIXES = tuple(READERS)


def locator(meta: dict) -> str:
    """Where a passage comes from, for a citation: ``report.pdf, p. 3`` or ``guide.md, § Install``."""
    parts = [str(meta[SOURCE])] if meta.get(SOURCE) else []
    if meta.get(PAGE) is not None:
        parts.append(f"p. {meta[PAGE]}")
    if meta.get(SECTION):
        parts.append(f"§ {meta[SECTION]}")
    return ", ".join(parts)
