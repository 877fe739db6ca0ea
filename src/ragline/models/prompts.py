"""What a generator reads: the instructions, the prompt layouts of both back ends, and the guard around the text
users and corpora supply.

Questions, passage titles and passage text are untrusted. Where such text holds a string the tokenizer reads
as a special or added token (``<|im_start|>``, ``</s>``), :func:`guard` marks it and :func:`tokenize_guarded`
tokenises it as plain characters, so no chat role or end-of-text token can be injected; other text is left as
it is and tokenised exactly as without the guard.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ragline.corpus.passages import Passage

SYSTEM_PROMPT = "Answer the question using the passage. Reply with the answer only, as briefly as possible."
CLOSED_BOOK_SYSTEM_PROMPT = "Answer the question. Reply with the answer only, as briefly as possible."
CONCAT_SYSTEM_PROMPT = "Answer the question using the passages. Reply with the answer only, as briefly as possible."

USER_OPEN, USER_CLOSE = "\ue000", "\ue001"  # private-use marks around guarded user text (never in output)


def added_tokens(tokenizer) -> tuple[str, ...]:
    """The strings the tokenizer reads as single special or added tokens."""
    cached = getattr(tokenizer, "_ragline_added", None)
    if cached is None:
        cached = tuple(t for t in set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens) if t)
        tokenizer._ragline_added = cached
    return cached


def guard(tokenizer, text: str) -> str:
    """User or corpus text for a prompt: marked when it holds a string ``tokenizer`` reads as a special or added
    token, so that :func:`tokenize_guarded` reads it as plain text; other text is returned as it is."""
    text = text.replace(USER_OPEN, "").replace(USER_CLOSE, "")
    if any(tok in text for tok in added_tokens(tokenizer)):
        return f"{USER_OPEN}{text}{USER_CLOSE}"
    return text


def is_guarded(prompts: Sequence[str]) -> bool:
    """Whether any prompt holds guarded text (else the tokenizer may read the prompts as they are)."""
    return any(USER_OPEN in p for p in prompts)


def tokenize_guarded(tokenizer, prompt: str) -> list[int]:
    """Ids of a prompt whose guarded parts (:func:`guard`) are tokenised as plain text: a special token's string
    there is its characters, never the token."""
    ids: list[int] = []
    for i, part in enumerate(re.split(f"[{USER_OPEN}{USER_CLOSE}]", prompt)):
        if part:
            ids += tokenizer(part, add_special_tokens=False, split_special_tokens=i % 2 == 1)["input_ids"]
    return ids


# --- decoder-only generators ---------------------------------------------------------------------------------

def _chat(tokenizer, system: str, user: str) -> str:
    return tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                         tokenize=False, add_generation_prompt=True)


def causal_prompt(tokenizer, use_chat: bool, question: str, passage: Passage | None) -> str:
    """A decoder-only generator's prompt for one (question, passage) pair: the tokenizer's chat template with
    the system instruction when it has one, else ``title / text // question\\nAnswer:``; closed book without a
    passage."""
    question = guard(tokenizer, question)
    title, text = (guard(tokenizer, passage.title), guard(tokenizer, passage.text)) \
        if passage is not None else ("", "")
    if not use_chat:
        ctx = f"{title} / {text} // " if passage is not None else ""
        return f"{ctx}{question}\nAnswer:"
    if passage is None:
        return _chat(tokenizer, CLOSED_BOOK_SYSTEM_PROMPT, f"Question: {question}")
    return _chat(tokenizer, SYSTEM_PROMPT, f"Passage: {title}: {text}\nQuestion: {question}")


def causal_concat_prompt(tokenizer, use_chat: bool, question: str, passages: Sequence[Passage]) -> str:
    """A decoder-only generator's prompt reading all ``passages``, numbered [1], [2], ..., before the question."""
    question = guard(tokenizer, question)
    blocks = "\n".join(f"[{i}] {guard(tokenizer, z.title)}: {guard(tokenizer, z.text)}"
                       for i, z in enumerate(passages, 1))
    if not use_chat:
        return f"{blocks}\n// {question}\nAnswer:"
    return _chat(tokenizer, CONCAT_SYSTEM_PROMPT, f"Passages:\n{blocks}\nQuestion: {question}")


# --- encoder-decoder generators ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Seq2SeqPrompt:
    """How a seq2seq generator's input is laid out: Hugging Face RAG's ``RagConfig`` fields (its defaults
    unless a RAG checkpoint gives its own) and the generator config's ``prefix``."""

    title_sep: str = " / "
    doc_sep: str = " // "
    prefix: str = ""
    max_combined_length: int = 300

    def pair(self, tokenizer, question: str, passage: Passage | None) -> str:
        """Hugging Face RAG's ``prefix + title + title_sep + text + doc_sep + question`` with double spaces made
        single and the title's surrounding quotes dropped, as its ``RagRetriever`` builds it (``question`` as
        the generator reads it; user and corpus text guarded); closed book reads ``prefix + question``."""
        question = guard(tokenizer, question)
        if passage is None:
            return (self.prefix + question).replace("  ", " ")
        return (self.prefix + guard(tokenizer, rag_title(passage.title)) + self.title_sep
                + guard(tokenizer, passage.text) + self.doc_sep + question).replace("  ", " ")

    def concat(self, tokenizer, question: str, passages: Sequence[Passage]) -> str:
        """``prefix + [1] title title_sep text [2] ... doc_sep question``: Hugging Face RAG's layout with the
        passages numbered one after another."""
        question = guard(tokenizer, question)
        docs = " ".join(f"[{i}] {guard(tokenizer, rag_title(z.title))}{self.title_sep}{guard(tokenizer, z.text)}"
                        for i, z in enumerate(passages, 1))
        return (self.prefix + docs + self.doc_sep + question).replace("  ", " ")


def rag_title(title: str) -> str:
    """A title as Hugging Face RAG puts it in a prompt: without a surrounding pair of double quotes."""
    return title.removeprefix('"').removesuffix('"')
