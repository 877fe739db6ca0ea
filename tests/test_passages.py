import pytest

from ragline.corpus.passages import encoder_text, split_documents, split_words
from ragline.corpus.readers import Document
from ragline.errors import RaglineError


@pytest.mark.parametrize("n_words, sizes", [(1, [1]), (100, [100]), (101, [100, 1]), (250, [100, 100, 50])])
def test_split_words_disjoint_chunks(n_words, sizes):
    words = [f"w{i}" for i in range(n_words)]
    chunks = split_words(" \n ".join(words), 100)
    assert [len(c.split()) for c in chunks] == sizes
    assert " ".join(chunks).split() == words  # disjoint, in order, nothing lost


def test_split_documents_keeps_titles_and_stable_ids():
    docs = [Document("a", "Alpha", "one two three four five"), Document("b", "Beta", "six")]
    ps = list(split_documents(docs, max_words=2))
    assert [(p.pid, p.doc_id, p.title, p.text) for p in ps] == [
        ("a#0", "a", "Alpha", "one two"), ("a#1", "a", "Alpha", "three four"), ("a#2", "a", "Alpha", "five"),
        ("b#0", "b", "Beta", "six")]
    assert encoder_text("Alpha", "one two") == "Alpha\none two" and encoder_text("", "x") == "x"


def test_zero_words_is_an_error():
    with pytest.raises(RaglineError, match="too small"):
        split_words("a b", 0)
