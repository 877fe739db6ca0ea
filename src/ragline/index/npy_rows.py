"""Rows of a ``.npy`` matrix (2-d) or vector (1-d) read and written with plain file calls, never left mapped.

A build streams through gigabytes of vectors (1.5 GiB at a million 384-d float32 passages). Read or written
through a memory map, every page it touches counts in the process's resident memory until the kernel reclaims
it; read and written with ``readinto`` and ``write``, the same pages stay in the page cache, which the kernel
drops as it needs, and the build's own memory is the slice it holds. Scattered rows (the sample an IVF index is
trained on, the tuning's queries, a re-ranking's candidates) are gathered through maps of at most
WINDOW bytes of the file, each closed before the next is opened: a read call per row cost about 3x more in
Python (14 against 6 ms for 2,560 rows of 384 float32). One map of the whole file, as before, counted every
page it touched and the cached pages the kernel maps around each (fault-around) in the resident memory until
it closed: an IVF-PQ build's training sample at 3M passages (443,000 rows, one in 7) mapped the whole 4.6 GB
file (the build's peak 5.6 GiB, 1.1 of it its own; 16 GiB at 10M). Windowed, the same gather peaks at
1.0 GiB and takes 0.63 s instead of 2.34 (20,480 rows: 29 ms instead of 34). Searching still memory-maps the
file (:mod:`ragline.index.directory`): there the pages are the working set.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from ragline.errors import RaglineError

WINDOW = 256 * 2**20  # bytes of the file one map of a scattered read covers (and the most it adds to memory)


def layout(path: Path, ndim: int = 2) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the first row) of the ``ndim``-d (2 or 1) C-order ``.npy`` file ``path``;
    pickles refused."""
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
        if (fortran and len(shape) > 1) or len(shape) != ndim:
            raise RaglineError(f"{path} holds a {dtype} array of shape {shape}{' (Fortran order)' if fortran else ''}",
                               "give 2-d float32 or float16 arrays, one row per passage, saved by numpy.save"
                               if ndim == 2 else f"write it again as a {ndim}-d array")
        return tuple(int(x) for x in shape), dtype, f.tell()


class NpyRows:
    """A read-only 2-d (or, with ``ndim=1``, 1-d) ``.npy`` file indexed like an array: ``rows[lo:hi]`` and
    ``rows[int_array]`` read just those rows from the file (each call a new array)."""

    def __init__(self, path: Path, ndim: int = 2) -> None:
        self.path = Path(path)
        self.shape, self.dtype, self._offset = layout(self.path, ndim)
        self._row_shape = self.shape[1:]
        self._row_bytes = int(np.prod(self._row_shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, f, lo: int, hi: int) -> np.ndarray:
        out = np.empty((hi - lo, *self._row_shape), dtype=self.dtype)
        self._read_into(f, lo, out)
        return out

    def _read_into(self, f, lo: int, out: np.ndarray) -> None:
        f.seek(self._offset + lo * self._row_bytes)
        if f.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise RaglineError(f"{self.path} is shorter than its header says", "write the vectors again")

    def read_into(self, lo: int, out: np.ndarray, chunk: int = 64 * 2**20) -> None:
        """Rows ``lo .. lo + len(out)`` read straight into ``out`` (m, ...) (C-contiguous, the file's dtype and
        row shape; any writable buffer, FAISS's own array included), ``chunk`` bytes a call."""
        if out.dtype != self.dtype or out.shape[1:] != self._row_shape or not out.flags.c_contiguous:
            raise ValueError(f"cannot read {self.path}'s {self.dtype} rows {self._row_shape} into a "
                             f"{out.dtype} array of shape {out.shape}")
        if lo < 0 or lo + len(out) > self.shape[0]:
            raise IndexError(f"rows {lo}..{lo + len(out) - 1} out of range 0..{self.shape[0] - 1} in {self.path}")
        step = max(1, chunk // max(1, self._row_bytes))  # rows a call
        with open(self.path, "rb") as f:  # buffered: readinto fills the whole slice or meets the end
            for at in range(0, len(out), step):
                self._read_into(f, lo + at, out[at : at + step])

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        with open(self.path, "rb") as f:
            if isinstance(key, slice):
                lo, hi, step = key.indices(self.shape[0])
                if step != 1:
                    raise ValueError("NpyRows reads contiguous slices or row numbers")
                return self._read(f, lo, max(lo, hi))
            rows = np.asarray(key, dtype=np.int64)  # (m,) row numbers, any order
            if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
                raise IndexError(f"rows out of range 0..{self.shape[0] - 1} in {self.path}")
            if not rows.size:
                return np.empty((0, *self._row_shape), dtype=self.dtype)
            if os.fstat(f.fileno()).st_size < self._offset + self.shape[0] * self._row_bytes:
                raise RaglineError(f"{self.path} is shorter than its header says", "write the vectors again")
            return self._gather(f, rows)

    def _gather(self, f, rows: np.ndarray) -> np.ndarray:
        """``rows`` (m,) read in row order through maps of at most WINDOW (+ a row) bytes, one at a time."""
        out = np.empty((len(rows), *self._row_shape), dtype=self.dtype)  # (m, ...)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]  # (m,) ascending
        window = ((self._offset + ordered * self._row_bytes) // WINDOW).astype(np.int64)  # (m,) window of each
        cuts = np.flatnonzero(np.diff(window)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(rows)], strict=True):
            first, last = int(ordered[lo]), int(ordered[hi - 1])
            start = self._offset + first * self._row_bytes
            base = start - start % mmap.ALLOCATIONGRANULARITY  # maps begin on the allocation granularity
            end = self._offset + (last + 1) * self._row_bytes
            with mmap.mmap(f.fileno(), end - base, access=mmap.ACCESS_READ, offset=base) as m:
                view = np.frombuffer(m, dtype=self.dtype, offset=start - base,
                                     count=(last - first + 1) * (self._row_bytes // self.dtype.itemsize))
                out[order[lo:hi]] = view.reshape(last - first + 1, *self._row_shape)[ordered[lo:hi] - first]
                del view  # the map can close
        return out


def write_header(f, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """The ``.npy`` header (version 1.0, C order) of a ``shape`` array of ``dtype``, written to the open file ``f``."""
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": shape})


class NpyWriter:
    """Writes an (n, dim) ``.npy`` file (an (n,) one when ``dim`` is None) row block after row block; closing
    checks that n rows came."""

    def __init__(self, path: Path, n: int, dim: int | None, dtype: str | np.dtype = "float32") -> None:
        self.path, self.n, self.dim, self.dtype, self.written = Path(path), n, dim, np.dtype(dtype), 0
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed by close() / __exit__
        write_header(self._f, (n,) if dim is None else (n, dim), self.dtype)

    def write(self, rows: np.ndarray) -> None:
        """Append ``rows`` (m, dim) or, for a 1-d file, (m,), converted to the file's dtype."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != (() if self.dim is None else (self.dim,)) or self.written + len(rows) > self.n:
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


class NpyRowWriter:
    """Rows of an ``(n, dim)`` ``.npy`` file written in place, in any order, with ``os.pwrite`` (a run of
    consecutive rows one call), never through a map: the encoders' vectors arrive chunk by chunk (out of order
    from a pool of Ray actors) and, written through a memory map, every page written stayed counted in the
    process's resident memory until the map closed (the whole file by the end of a build)."""

    def __init__(self, path: Path, n: int | None = None, dim: int | None = None,
                 dtype: str | np.dtype = "float32") -> None:
        """Open the existing file ``path``; with ``n`` and ``dim``, first create it as an ``(n, dim)`` array of
        ``dtype`` (its header, then the file extended to full length: zeros, holes on disk until written)."""
        self.path = Path(path)
        if n is not None:
            with open(self.path, "wb") as f:
                write_header(f, (n, dim), np.dtype(dtype))
                f.truncate(f.tell() + n * dim * np.dtype(dtype).itemsize)
        self.shape, self.dtype, self._offset = layout(self.path)
        self._row_bytes = self.shape[1] * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDWR)

    def write(self, at: int | np.ndarray, rows: np.ndarray) -> None:
        """Write ``rows`` (m, dim), converted to the file's dtype, at rows ``at``, ``at + 1``, ... (an int) or at
        the row numbers ``at`` (m,), any order."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        where = np.arange(at, at + len(rows)) if np.isscalar(at) else np.asarray(at, dtype=np.int64)
        if rows.shape != (len(where), self.shape[1]) or (where.size and (where.min() < 0
                                                                          or where.max() >= self.shape[0])):
            raise ValueError(f"rows of shape {rows.shape} at rows {where.min() if where.size else '-'}.."
                             f"{where.max() if where.size else '-'} do not fit {self.path} {self.shape}")
        if not where.size:
            return
        order = np.argsort(where, kind="stable")
        ordered = where[order]  # (m,) ascending
        cuts = np.flatnonzero(np.diff(ordered) != 1) + 1  # where a run of consecutive rows ends
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(where)], strict=True):
            data = memoryview(rows[order[lo:hi]]).cast("B")  # a run of consecutive rows of the file, as bytes
            pos = self._offset + int(ordered[lo]) * self._row_bytes
            while data:  # pwrite may write less than asked (Linux: at most 2 GiB a call)
                done = os.pwrite(self._fd, data, pos)
                data, pos = data[done:], pos + done

    def sync(self) -> None:
        """Put what was written on the disk (the build records a row as done only after this)."""
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> NpyRowWriter:
        return self

    def __exit__(self, *_) -> None:
        self.close()
