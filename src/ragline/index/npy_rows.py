"""Rows of a 2-d ``.npy`` matrix read and written with plain file calls, never memory-mapped.

A build streams through gigabytes of vectors (1.5 GiB at a million 384-d float32 passages). Read or written
through a memory map, every page it touches counts in the process's resident memory until the kernel reclaims
it; read and written with ``readinto`` and ``write``, the same pages stay in the page cache, which the kernel
drops as it needs, and the build's own memory is the slice it holds. Searching still memory-maps the file
(:mod:`ragline.index.directory`): there the pages are the working set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ragline.errors import RaglineError


def layout(path: Path) -> tuple[tuple[int, int], np.dtype, int]:
    """(shape, dtype, offset of the first row) of the 2-d C-order ``.npy`` file ``path``; pickles refused."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except ValueError as e:
            raise RaglineError(f"{path} is not a plain .npy array ({e})",
                               "convert the vectors with numpy.save(file, array) (pickles are not loaded)") from None
        if dtype.hasobject:
            raise RaglineError(f"{path} is not a plain .npy array (it holds pickled Python objects)",
                               "convert the vectors with numpy.save(file, array) (pickles are not loaded)")
        if fortran or len(shape) != 2:
            raise RaglineError(f"{path} holds a {dtype} array of shape {shape}{' (Fortran order)' if fortran else ''}",
                               "give 2-d float32 or float16 arrays, one row per passage, saved by numpy.save")
        return (int(shape[0]), int(shape[1])), dtype, f.tell()


class NpyRows:
    """A read-only 2-d ``.npy`` file indexed like an array: ``rows[lo:hi]`` and ``rows[int_array]`` read just
    those rows from the file (each call a new array)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.shape, self.dtype, self._offset = layout(self.path)
        self._row_bytes = self.shape[1] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, f, lo: int, hi: int) -> np.ndarray:
        out = np.empty((hi - lo, self.shape[1]), dtype=self.dtype)
        f.seek(self._offset + lo * self._row_bytes)
        if f.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise RaglineError(f"{self.path} is shorter than its header says", "write the vectors again")
        return out

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        with open(self.path, "rb") as f:
            if isinstance(key, slice):
                lo, hi, step = key.indices(self.shape[0])
                if step != 1:
                    raise ValueError("NpyRows reads contiguous slices or row numbers")
                return self._read(f, lo, max(lo, hi))
            rows = np.asarray(key, dtype=np.int64)  # (m,) row numbers, any order
            out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
            for i in np.argsort(rows, kind="stable"):  # in file order
                out[i] = self._read(f, int(rows[i]), int(rows[i]) + 1)[0]
            return out


class NpyWriter:
    """Writes an (n, dim) ``.npy`` file row block after row block; closing checks that n rows came."""

    def __init__(self, path: Path, n: int, dim: int, dtype: str = "float32") -> None:
        self.path, self.n, self.dim, self.dtype, self.written = Path(path), n, dim, np.dtype(dtype), 0
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed by close() / __exit__
        np.lib.format.write_array_header_1_0(self._f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                       "fortran_order": False, "shape": (n, dim)})

    def write(self, rows: np.ndarray) -> None:
        """Append ``rows`` (m, dim), converted to the file's dtype."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.ndim != 2 or rows.shape[1] != self.dim or self.written + len(rows) > self.n:
            raise ValueError(f"rows of shape {rows.shape} do not fit ({self.written} of {self.n} x {self.dim})")
        self._f.write(memoryview(rows).cast("B"))
        self.written += len(rows)

    def close(self) -> None:
        self._f.close()
        if self.written != self.n:
            raise ValueError(f"{self.path}: {self.written} rows written of {self.n}")

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:
            self._f.close()
