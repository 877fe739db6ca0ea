"""Answer quality on the FanOutQA dev sub-questions whose answer is in the bundled corpus.

How it measures and what it prints: docs/benchmarks.md (answers.py).

    python3 benchmarks/answers.py [--generator qwen2.5-0.5b] [--limit N] [--ks 1,5,10] [--beams 4]
    python3 benchmarks/answers.py --paper-shapes [--limit N]   # random DPR-base + BART-large: speed only

``--generator`` takes what every command takes: a bundled name, a causal-LM or BART/T5 folder, or a Hugging
Face RAG checkpoint (its question encoder then searches ``--index``, which must be a DPR index of its size).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

from ragline import paths
from ragline.evaluate.metrics import exact_match, token_f1
from ragline.index import manifest as mf
from ragline.index.registry import open_index
from ragline.models.loading import load_generator
from ragline.questions import dev_questions
from ragline.rag.model import RagModel
from ragline.retriever import open_retriever


class PeakRss:
    """The process's peak resident memory while the block runs, sampled every 20 ms from /proc (MiB): what a
    system adds on top of the models already loaded shows as the peak above the memory at the start."""

    def __init__(self) -> None:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def run(rag: RagModel, questions, model: str, decoding: str, k: int, beams: int, batch: int, max_new: int,
        length_penalty: float):
    em = f1 = 0.0
    preds = []
    t0 = time.perf_counter()
    for lo in range(0, len(questions), batch):
        qs = questions[lo : lo + batch]
        for q, a in zip(qs, rag.answer([x.question for x in qs], model=model, decoding=decoding, k=k,
                                       beams=beams, max_new_tokens=max_new, length_penalty=length_penalty),
                      strict=True):
            em += exact_match(a.text, q.answers)
            f1 += token_f1(a.text, q.answers)
            preds.append({"id": q.id, "question": q.question, "gold": list(q.answers), "answer": a.text})
    n = len(questions)
    return em / n, f1 / n, (time.perf_counter() - t0) / n, preds


def question_set_arguments(ap: argparse.ArgumentParser) -> None:
    """The options answers.py and latency.py share: index, generator, questions, k values, beams."""
    ap.add_argument("--index", type=Path, default=paths.default_index_dir())
    ap.add_argument("--generator", default="qwen2.5-0.5b")
    ap.add_argument("--limit", type=int, default=None, help="first N questions only")
    ap.add_argument("--ks", default="1,5,10")
    ap.add_argument("--beams", type=int, default=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    question_set_arguments(ap)
    ap.add_argument("--batch", type=int, default=4, help="questions decoded together")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--length-penalty", type=float, default=1.0, help="beam ranking: log p / len ** this")
    ap.add_argument("--prior-scale", type=float, default=None,
                    help="p_eta(z|x) = softmax(scale * q·d) (default: the index's own)")
    ap.add_argument("--paper-shapes", action="store_true",
                    help="random DPR-base + BART-large-shaped RAG folder over a DPR-shaped index (benchmarks/"
                         "paper_shapes.py): the paper's architecture at its sizes, for speed only")
    ap.add_argument("--systems", default="closed-book,single-passage,rag-token,rag-seq-thorough,rag-seq-fast")
    ap.add_argument("--predictions", type=Path, default=None, help="write every prediction as JSON lines")
    args = ap.parse_args()

    if args.paper_shapes:
        from paper_shapes import build

        generator, index_dir = build(paths.models_dir() / "paper-shapes")
        args.generator, args.index = str(generator), index_dir
    index = open_index(args.index)
    store = index.store
    questions = dev_questions(store.values("title"), store.values("text"), answerable_only=True)[: args.limit]
    loaded = load_generator(args.generator)
    rag = RagModel(open_retriever(index, None, loaded.question_encoder), loaded.generator, mode="dense",
                   prior_scale=args.prior_scale)
    scale = args.prior_scale if args.prior_scale is not None else mf.prior_scale(index.manifest)
    print(f"{len(questions)} dev questions with the answer in the corpus; generator {rag.generator.name} "
          f"({loaded.kind}); question encoder {rag.retriever.encoder.name}; beams {args.beams}, length penalty "
          f"{args.length_penalty}, prior scale {scale}; dense retrieval over {index.name}")
    systems = {"closed-book": ("closed-book", "greedy", [1]), "single-passage": ("rag-token", "greedy", [1]),
               "concat": ("concat", "greedy", None), "concat-beam": ("concat", "beam", None),
               "fid": ("fid", "greedy", None), "fid-beam": ("fid", "beam", None),
               "rag-token": ("rag-token", "beam", None), "rag-token-greedy": ("rag-token", "greedy", None),
               "rag-seq-thorough": ("rag-sequence", "thorough", None),
               "rag-seq-fast": ("rag-sequence", "fast", None)}
    ks = [int(k) for k in args.ks.split(",")]
    # warm-up, untimed: the first forward pass pages the memory-mapped weights in, which no row should pay for
    rag.answer([questions[0].question], model="rag-token", decoding="greedy", k=1, max_new_tokens=2)
    print("| system | k | EM | F1 | s/question | peak RSS MiB (+ over start) |\n|---|---|---|---|---|---|", flush=True)
    out = []
    for name in args.systems.split(","):
        model, decoding, fixed_ks = systems[name]
        for k in fixed_ks or ks:
            with PeakRss() as mem:
                em, f1, secs, preds = run(rag, questions, model, decoding, k, args.beams, args.batch,
                                          args.max_new_tokens, args.length_penalty)
            print(f"| {name} | {k if name != 'closed-book' else '-'} | {em:.3f} | {f1:.3f} | {secs:.1f} | "
                  f"{mem.peak:.0f} (+{mem.peak - mem.start:.0f}) |", flush=True)
            out.extend({"system": name, "k": k, **p} for p in preds)
    if args.predictions:
        args.predictions.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in out))


if __name__ == "__main__":
    main()
