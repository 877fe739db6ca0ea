"""Decoding speed and memory: ragline's RAG decoders against Hugging Face transformers' RAG classes.

How it measures and what it prints: docs/benchmarks.md (decoding.py).

    python3 benchmarks/decoding.py [--index DIR] [--questions 32] [--k 5] [--beams 4] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch

from ragline.vocab import DEFAULT_PRIOR_SCALE

MODES = [("rag-token", "greedy"), ("rag-token", "beam"), ("rag-sequence", "thorough"), ("rag-sequence", "fast")]


# --- set-up (parent process) ----------------------------------------------------------------------------

def build_workload(args: argparse.Namespace, work: Path) -> None:
    """Questions, their passages and doc scores, and the tiny BART with its tokenizer, under ``work``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

    from ragline.index.directory import IndexDir
    from ragline.questions import load_fanoutqa
    from ragline.retriever import Retriever

    index = IndexDir.open(args.index)
    retriever = Retriever(index)
    titles = set(index.store.values("title"))
    questions = [q.question for q in load_fanoutqa("dev", titles)[: args.questions]]
    res = retriever.retrieve(questions, k=args.k, mode="dense")
    q = torch.from_numpy(res.question_vectors)
    scores = (DEFAULT_PRIOR_SCALE * retriever.doc_scores(q, res.rows, index)).tolist()
    passages = [[vars(p) for p in index.store.get(row)] for row in res.rows]
    (work / "workload.json").write_text(json.dumps({"questions": questions, "passages": passages,
                                                    "doc_scores": scores}))

    pre = pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for _, batch in index.store.iter_batches():
        for p in batch:
            counts.update(w.lower() for w, _ in pre.pre_tokenize_str(f"{p.title} / {p.text}"))
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    words = [w for w, _ in counts.most_common(args.vocab - len(specials))]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=len(vocab), d_model=args.d_model, encoder_layers=args.layers,
                     decoder_layers=args.layers, encoder_attention_heads=args.d_model // 64,
                     decoder_attention_heads=args.d_model // 64, encoder_ffn_dim=4 * args.d_model,
                     decoder_ffn_dim=4 * args.d_model, max_position_embeddings=1024, pad_token_id=1,
                     bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
                     init_std=0.25)
    bart = BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        bart.final_logits_bias[0, cfg.eos_token_id] += args.eos_bias
    bart.save_pretrained(work / "bart")
    tok.save_pretrained(work / "bart")


# --- one measurement (worker process) -------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Highest resident size seen while the block runs, sampled every millisecond."""

    def __enter__(self) -> PeakRss:
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def worker(system: str, model: str, mode: str, batch: int, work: Path, beams: int, max_new: int,
           repeats: int) -> dict:
    from transformers import (
        BartForConditionalGeneration,
        DPRConfig,
        DPRQuestionEncoder,
        RagConfig,
        RagSequenceForGeneration,
        RagTokenForGeneration,
    )

    from ragline.corpus.passages import Passage
    from ragline.models.generators import Seq2SeqGenerator
    from ragline.rag.decoding import rag_sequence_decode, rag_token_decode
    from ragline.rag.marginal import doc_log_probs

    data = json.loads((work / "workload.json").read_text())
    questions = data["questions"]
    passages = [[Passage(**p) for p in zs] for zs in data["passages"]]
    scores = torch.tensor(data["doc_scores"])  # (N, K)
    n, k = scores.shape
    gen = Seq2SeqGenerator.load(work / "bart")
    nbeams = 1 if mode == "greedy" else beams
    if system == "hf":
        bart = BartForConditionalGeneration.from_pretrained(work / "bart").eval()
        dpr_cfg = DPRConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                            intermediate_size=8)  # unused: passages and scores are given
        rag_cfg = RagConfig.from_question_encoder_generator_configs(dpr_cfg, bart.config, n_docs=k)
        cls = RagTokenForGeneration if model == "rag-token" else RagSequenceForGeneration
        hf = cls(config=rag_cfg, question_encoder=DPRQuestionEncoder(dpr_cfg), generator=bart).eval()

        def run(lo: int, hi: int) -> list[list[int]]:
            ctx = gen.tokenizer(gen.pair_prompts(questions[lo:hi], passages[lo:hi]), padding=True,
                                truncation=True, max_length=gen.max_source_length, return_tensors="pt")
            with torch.no_grad():
                out = hf.generate(context_input_ids=ctx["input_ids"], context_attention_mask=ctx["attention_mask"],
                                  doc_scores=scores[lo:hi], n_docs=k, num_beams=nbeams, max_length=max_new + 1,
                                  min_length=0, no_repeat_ngram_size=0, forced_bos_token_id=None,
                                  forced_eos_token_id=None, length_penalty=1.0, early_stopping=False)
            return [strip(s, gen.pad_id) for s in out]
    else:
        def run(lo: int, hi: int) -> list[list[int]]:
            doc = doc_log_probs(scores[lo:hi])
            if model == "rag-token":
                out = rag_token_decode(gen, questions[lo:hi], passages[lo:hi], doc, beams=nbeams,
                                       max_new_tokens=max_new, length_penalty=1.0)  # as HF's above
            else:
                out = rag_sequence_decode(gen, questions[lo:hi], passages[lo:hi], doc, beams=nbeams,
                                          max_new_tokens=max_new, thorough=mode == "thorough",
                                          length_penalty=1.0)
            return [d.tokens for d in out]

    def full_pass() -> list[list[int]]:
        return [y for lo in range(0, n, batch) for y in run(lo, min(lo + batch, n))]

    with PeakRss() as mem:
        answers = full_pass()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        full_pass()
        best = min(best, time.perf_counter() - t0)
    return {"answers_per_s": n / best, "peak_mb": (mem.peak - mem.base) / 2**20, "answers": answers}


def strip(seq: torch.Tensor, pad: int) -> list[int]:
    """HF's output row without its decoder start token and trailing padding."""
    ids = seq.tolist()[1:]
    while ids and ids[-1] == pad:
        ids.pop()
    return ids


# --- the table ------------------------------------------------------------------------------------------

def measure(args: argparse.Namespace, work: Path, system: str, model: str, mode: str, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", system, model, mode, str(batch), "--work", str(work),
           "--beams", str(args.beams), "--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from ragline import paths

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=paths.default_index_dir())
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--eos-bias", type=float, default=13.0)
    ap.add_argument("--modes", default=",".join(f"{m}:{d}" for m, d in MODES))
    ap.add_argument("--worker", nargs=4, metavar=("SYSTEM", "MODEL", "MODE", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)

    if args.worker:
        system, model, mode, batch = args.worker
        print(json.dumps(worker(system, model, mode, int(batch), args.work, args.beams, args.max_new_tokens,
                                args.repeats)))
        return

    with tempfile.TemporaryDirectory(prefix="ragline-decoding-") as tmp:
        work = Path(tmp)
        build_workload(args, work)
        n_params = sum(p.numel() for p in
                       __import__("transformers").BartForConditionalGeneration
                       .from_pretrained(work / "bart").parameters())
        print(f"{args.questions} FanOutQA dev questions, k={args.k}, {args.beams} beams, at most "
              f"{args.max_new_tokens} new tokens; tiny BART d_model {args.d_model}, {args.layers}+{args.layers} "
              f"layers, vocab {args.vocab} ({n_params / 1e6:.1f}M parameters); torch threads 2\n")
        print("| model | decoding | batch | ragline answers/s | HF answers/s | speed-up | ragline peak MB | "
              "HF peak MB | same ids | mean answer length |")
        print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
        for spec in args.modes.split(","):
            model, mode = spec.split(":")
            for batch in (int(b) for b in args.batches.split(",")):
                ours = measure(args, work, "ragline", model, mode, batch)
                theirs = None if mode == "fast" else measure(args, work, "hf", model, mode, batch)
                length = sum(map(len, ours["answers"])) / len(ours["answers"])
                if theirs is None:
                    print(f"| {model} | {mode} | {batch} | {ours['answers_per_s']:.1f} | - | - | "
                          f"{ours['peak_mb']:.0f} | - | - | {length:.1f} |", flush=True)
                    continue
                pairs = zip(ours["answers"], theirs["answers"], strict=True)
                same = sum(a == b for a, b in pairs) / len(ours["answers"])
                print(f"| {model} | {mode} | {batch} | {ours['answers_per_s']:.1f} | {theirs['answers_per_s']:.1f} | "
                      f"{ours['answers_per_s'] / theirs['answers_per_s']:.2f}x | {ours['peak_mb']:.0f} | "
                      f"{theirs['peak_mb']:.0f} | {same:.2f} | {length:.1f} |", flush=True)


if __name__ == "__main__":
    main()
