"""What the ``ragline`` command prints: passages, answers and metric tables, rendered with rich.

Text from a corpus or a model (titles, passages, answers) is printed as text, never as rich markup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ragline.corpus.documents import locator
from ragline.index.manifest import live_passages

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def log(message: str) -> None:
    """A progress or status line on stderr."""
    err_console.print(message, markup=False)


def error(message: str) -> None:
    """The one-line error of a refused command."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def snippet(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hits(question: str, found: Sequence, mode: str) -> None:
    """The ranked passages of one question (``ragline search``)."""
    if not found:
        console.print(f"{question}: no passage matches ({mode})", markup=False)
        return
    table = Table(title=f"{escape(question)}  [dim]({mode})[/]", title_justify="left", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("title", style="bold")
    table.add_column("passage")
    for h in found:
        where = locator(h.meta)
        title = escape(h.title) + (f"\n[dim]{escape(where)}[/]" if where else "")
        table.add_row(str(h.rank), f"{h.score:.4f}", title, escape(snippet(h.text, 200)))
    console.print(table)


def answer(a) -> None:
    """An answer with its alternatives, sources (prior -> posterior) and RAG-Token's per-token sources."""
    console.print(f"[bold]Question:[/] {escape(a.question)}")
    console.print(f"[bold green]Answer:[/] {escape(a.text)}  "
                  f"[dim]({a.model}, {a.decoding}, log p = {a.logprob:.2f})[/]")
    for i, (text, lp) in enumerate(a.alternatives[1:], 2):
        console.print(f"  [dim]#{i}: {escape(text)}  (log p = {lp:.2f})[/]")
    if not a.sources:
        return
    console.print("[bold]Sources[/] (prior p(z|x) -> posterior p(z|x,y)):")
    for s in sorted(a.sources, key=lambda s: -s.posterior):
        where = locator(s.meta)
        console.print(f"  [{s.rank}] [bold]{escape(s.title)}[/]" + (f" ({escape(where)})" if where else "")
                      + f" {s.prior:.2f} -> [bold]{s.posterior:.2f}[/]  [dim]{escape(snippet(s.text, 160))}[/]")
    if a.cited:
        console.print("[bold]The answer cites[/] " + ", ".join(f"\\[{n}]" for n in a.cited))
    if a.token_sources:
        console.print("[bold]Tokens[/] (most likely source): " + " ".join(
            f"{escape(tok.strip() or repr(tok))}\\[{max(range(len(p)), key=p.__getitem__) + 1}]"
            for tok, p in a.token_sources))


def metric_table(title: str, rows: Mapping[str, Mapping[str, float]], columns: Sequence[str],
                 first: str = "mode") -> None:
    """One row per system, one column per metric."""
    table = Table(title=escape(title), title_justify="left")
    table.add_column(first)
    for c in columns:
        table.add_column(c, justify="right")
    for name, m in rows.items():
        table.add_row(escape(name), *(f"{m[c]:.3f}" if c in m else "-" for c in columns))
    console.print(table)


def indexes(root: str, found: Sequence[tuple]) -> None:
    """The index directories under ``root`` side by side (``ragline indexes``)."""
    if not found:
        console.print(f"no index under {root}; build one with `ragline index`", markup=False)
        return
    table = Table(title=escape(root), title_justify="left")
    for c in ("name", "fingerprint", "passages", "dense", "bm25", "encoder", "prior scale", "created"):
        table.add_column(c)
    for path, m in found:
        dense = m.get("dense") or {}
        name = path.name + (f" ({len(m['shards'])} shards, Ray)" if m.get("shards") else "") + (
            f" (generation {m['generation']})" if m.get("generation") else "")
        passage = m["encoder"].get("passage") or {}
        encoder = str(passage.get("name")) + (f" ({passage['kind']})" if passage.get("kind") else "")
        table.add_row(escape(name), m["fingerprint"], str(live_passages(m)), dense.get("factory", "-"),
                      "yes" if m.get("bm25") else "no", escape(encoder),
                      str(m["encoder"].get("prior_scale", "-")) if dense else "-", m["created_at"])
    console.print(table)


def markdown(text: str) -> None:
    """A Markdown report as plain text."""
    console.print(text, markup=False)
