import numpy as np
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
    assert store.get([]) == [] and store.get(np.array([-0])) == [ps[0]]
    rows = np.random.default_rng(0).integers(0, 10, 40)  # any order, repeats, across the 4 batches of 3 rows
    assert store.get(rows) == [ps[r] for r in rows]


def test_rows_are_taken_batch_by_batch(tmp_path):
    """A take over the whole table concatenates each column first, which Arrow refuses past 2 GiB of text
    (met at 10M passages): rows come from their own record batch, never from a whole-table take."""
    ps = [Passage(f"d{i}#0", f"d{i}", "T", f"text {i}") for i in range(50)]
    _write(tmp_path / "p.arrow", ps, batch_rows=7)
    store = PassageStore(tmp_path / "p.arrow")
    assert len(store._batches) == 8
    store.table = None  # no whole-table operation is left to get() or to a scan
    assert store.get([49, 0, 7, 6, 48]) == [ps[49], ps[0], ps[7], ps[6], ps[48]]
    for start in (0, 1, 6, 7, 13, 49, 50):  # scans read the record batches from the file, across their edges
        for size in (1, 5, 7, 16, 100):
            got = list(store.iter_batches(size, start=start))
            assert [lo for lo, _ in got] == list(range(start, 50, size))
            assert [p for _, b in got for p in b] == ps[start:]


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
