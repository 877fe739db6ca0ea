"""A corpus of N passages for scale measurements, made here from the bundled Wikipedia leads, with vectors.

    python3 benchmarks/scale_corpus.py --passages 1000000 --out WORK [--index DIR] [--seed 0]

Writes ``WORK/corpus-N.jsonl`` (one passage per record) and ``WORK/vectors-N/`` (float16 ``.npy`` shards, one
row per passage in corpus order) for ``ragline index --source WORK/corpus-N.jsonl --embeddings
WORK/vectors-N``.

* **Needles**: the real passages of the bundled index (``--index``, 12,324 of them), with its own vectors and
  titles, at seeded random places in the corpus. ``eval-retrieval`` on the dev questions then shows how
  recall degrades as distractors grow.
* **Distractors**: the rest, each made of whole sentences of the leads drawn at random (up to 100 words),
  titled after the page of its first sentence with `` (mix)`` added (never a real page's title, so no
  distractor counts as a gold page; and no made-up word, so BM25 sees the leads' own vocabulary). A
  distractor's vector is the normalised mean of its sentences' vectors, each sentence encoded once by the
  index's passage encoder (cached in ``WORK/sentences-S.npy``). Random vectors are no substitute:
  noise-dominated vectors have no neighbours worth the name, and approximate indexes behave unlike on real
  data.

Memory stays bounded: passages are written in blocks of ``--block`` rows.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

from ragline import paths

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
MAX_WORDS = 100


def leads_sentences(texts: list[str]) -> tuple[list[str], list[int]]:
    """The sentences of the passages' texts (split after . ! ? before a capital, digit or quote), each of at
    most ``MAX_WORDS`` words, duplicates dropped, in first-seen order; and the passage each came from."""
    seen: dict[str, int] = {}
    for row, text in enumerate(texts):
        for s in SENTENCE_END.split(text):
            s = s.strip()
            if s and len(s.split()) <= MAX_WORDS:
                seen.setdefault(s, row)
    return list(seen), list(seen.values())


def sentence_vectors(sentences: list[str], encoder, cache: Path) -> np.ndarray:
    """(S, dim) float32 unit vectors of ``sentences`` by ``encoder`` (each sentence alone), cached."""
    if cache.is_file():
        vecs = np.load(cache)
        if len(vecs) == len(sentences):
            return vecs
    vecs = encoder.encode(sentences, batch_size=128, show_progress=True).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-12
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, vecs)
    tmp.replace(cache)
    return vecs


def distractors(rng: np.random.Generator, words: np.ndarray, count: int) -> list[np.ndarray]:
    """``count`` lists of sentence numbers, each filled with random sentences while under ``MAX_WORDS`` words
    (``words``: each sentence's word count)."""
    out = []
    draws = rng.integers(0, len(words), size=(count, 12))
    for row in draws:
        total, keep = 0, []
        for s in row:
            if total + words[s] > MAX_WORDS:
                break
            keep.append(s)
            total += words[s]
        out.append(np.array(keep or row[:1]))
    return out


def make(passages: int, out: Path, index_dir: Path, seed: int = 0, block: int = 100_000,
         log=print) -> tuple[Path, Path]:
    """Write the corpus and its vectors (see the module docstring); returns (corpus file, vectors folder)."""
    from ragline.index import manifest as mf
    from ragline.index.registry import open_index
    from ragline.models.encoders import load_encoder

    out.mkdir(parents=True, exist_ok=True)
    corpus, vec_dir = out / f"corpus-{passages}.jsonl", out / f"vectors-{passages}"
    if corpus.is_file() and vec_dir.is_dir():
        log(f"{corpus} and {vec_dir} exist: kept")
        return corpus, vec_dir
    index = open_index(index_dir)
    store = index.store
    titles, texts = store.values("title"), store.values("text")
    real = np.load(index_dir / mf.EMBEDDINGS, mmap_mode="r")  # (n_real, dim), the index's own vectors
    n_real = len(texts)
    if passages < n_real:
        raise SystemExit(f"--passages must be at least the {n_real} real passages")
    t0 = time.perf_counter()
    sentences, source = leads_sentences(texts)
    encoder = load_encoder(index.manifest["encoder"]["passage"]["source"])
    svec = sentence_vectors(sentences, encoder, out / f"sentences-{len(sentences)}.npy")  # (S, dim)
    log(f"{len(sentences)} sentences of the leads encoded ({time.perf_counter() - t0:.0f} s, cached)")
    words = np.array([len(s.split()) for s in sentences])
    rng = np.random.default_rng(seed)
    is_real = np.zeros(passages, dtype=bool)
    is_real[rng.choice(passages, n_real, replace=False)] = True
    real_at = iter(range(n_real))
    tmp_corpus, tmp_dir = corpus.with_suffix(".tmp"), vec_dir.with_name(vec_dir.name + ".tmp")
    tmp_dir.mkdir(exist_ok=True)
    mixed = 0
    with tmp_corpus.open("w", encoding="utf-8") as f:
        for shard, lo in enumerate(range(0, passages, block)):
            hi = min(lo + block, passages)
            fake = distractors(rng, words, int((~is_real[lo:hi]).sum()))
            fake_at = iter(fake)
            vecs = np.empty((hi - lo, svec.shape[1]), dtype=np.float16)  # (block, dim)
            lines = []
            for i in range(lo, hi):
                if is_real[i]:
                    r = next(real_at)
                    lines.append(json.dumps({"id": f"real-{r}", "title": titles[r], "text": texts[r]},
                                            ensure_ascii=False))
                    vecs[i - lo] = real[r]
                else:
                    picks = next(fake_at)
                    v = svec[picks].mean(0)
                    vecs[i - lo] = v / (np.linalg.norm(v) + 1e-12)
                    lines.append(json.dumps({"id": f"mix-{mixed}", "title": f"{titles[source[picks[0]]]} (mix)",
                                             "text": " ".join(sentences[s] for s in picks)}, ensure_ascii=False))
                    mixed += 1
            f.write("\n".join(lines) + "\n")
            np.save(tmp_dir / f"shard_{shard}.npy", vecs)
            log(f"  {hi:,} of {passages:,} passages written")
    tmp_dir.replace(vec_dir)
    tmp_corpus.replace(corpus)
    log(f"corpus {corpus} ({corpus.stat().st_size / 2**30:.2f} GiB) and vectors {vec_dir} in "
        f"{time.perf_counter() - t0:.0f} s: {n_real} real passages among {mixed} distractors")
    return corpus, vec_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--index", type=Path, default=paths.default_index_dir(), help="the index of the real passages")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block", type=int, default=100_000, help="passages written at a time")
    args = ap.parse_args()
    make(args.passages, args.out, args.index, args.seed, args.block)


if __name__ == "__main__":
    main()
