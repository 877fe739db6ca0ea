import pyarrow as pa
import pytest

from ragline.corpus.passages import Passage
from ragline.corpus.store import PassageStore, PassageStoreWriter


def _write(path, passages, batch_rows=3):
    with PassageStoreWriter(path, batch_rows=batch_rows) as w:
        w.add_all(passages)
    return w


def test_roundtrip_random_access_and_batches(tmp_path):
    ps = [Passage(f"d{i}#0", f"d{i}", f"Title {i}", f"text number {i} é") for i in range(10)]
    w = _write(tmp_path / "p.arrow", ps)
    store = PassageStore(tmp_path / "p.arrow")
    assert len(store) == w.count == 10
    assert store.get([7, 2, 7]) == [ps[7], ps[2], ps[7]]
    assert store.values("title") == [f"Title {i}" for i in range(10)]
    with pytest.raises(KeyError):
        store.values("embedding")
    assert [(lo, len(b)) for lo, b in store.iter_batches(4, start=1)] == [(1, 4), (5, 4), (9, 1)]
    with pytest.raises(IndexError):
        store.get([10])


def test_store_is_memory_mapped_not_copied(tmp_path):
    ps = [Passage(f"d{i}#0", f"d{i}", "T", "word " * 100) for i in range(5000)]
    _write(tmp_path / "p.arrow", ps, batch_rows=1000)
    before = pa.total_allocated_bytes()
    store = PassageStore(tmp_path / "p.arrow")
    assert pa.total_allocated_bytes() - before < 100_000  # ~2.5 MB of text stays in the mapping
    assert store.get([4999])[0].pid == "d4999#0"


def test_fingerprint_depends_on_content_and_order(tmp_path):
    a = [Passage("x#0", "x", "T", "a"), Passage("y#0", "y", "T", "b")]
    f1 = _write(tmp_path / "1.arrow", a).fingerprint
    assert _write(tmp_path / "2.arrow", a).fingerprint == f1
    assert _write(tmp_path / "3.arrow", a[::-1]).fingerprint != f1
    assert _write(tmp_path / "4.arrow", [a[0], Passage("y#0", "y", "T", "c")]).fingerprint != f1
