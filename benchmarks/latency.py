"""Seconds per answer, one question at a time, and where they go; with the floor and EM measured in the same run.

How it measures and what it prints: docs/benchmarks.md (latency.py).

    python3 benchmarks/latency.py [--generator qwen2.5-0.5b] [--limit N] [--ks 1,5,10] [--precisions fp32,bf16,int8]
                                  [--systems rag-seq-thorough,rag-token-greedy,...] [--paths before,cold,warm]

Paths: ``before`` is the padded prefill without any cache (the answer path before issue 15); ``cold`` the
packed prefill with an empty passage cache at the start of each row (the system prompt is shared within each
question only); ``warm`` the same questions again with the cache holding what ``cold`` read (a server that has
seen these passages before). Every row answers the questions one at a time, as one user asking would.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from answers import question_set_arguments

from ragline import profile
from ragline.evaluate.metrics import exact_match
from ragline.index.registry import open_index
from ragline.models import precision as precisions
from ragline.models.loading import load_generator
from ragline.models.packed_linear import pack_linears
from ragline.questions import dev_questions
from ragline.rag.model import RagModel
from ragline.retriever import open_retriever

SYSTEMS = {"closed-book": ("closed-book", "greedy", [1]), "single-passage": ("rag-token", "greedy", [1]),
           "rag-seq-thorough": ("rag-sequence", "thorough", None), "rag-seq-fast": ("rag-sequence", "fast", None),
           "rag-token-greedy": ("rag-token", "greedy", None), "rag-token-beam": ("rag-token", "beam", None),
           "concat": ("concat", "greedy", None)}
GEMM = (512, 896, 4864)  # (tokens, d_model, d_ff) of Qwen2.5-0.5B's MLP: the shape prefill spends its time in


def matmul_rate(precision: str, repeats: int = 20) -> float:
    """GFLOP/s of the prefill's main product in ``precision``, measured now (median of ``repeats``), through
    the layer the generator runs it with (oneDNN-packed for fp32 and bf16, as load_generator leaves it)."""
    m, k, n = GEMM
    x = torch.randn(m, k)
    layer = torch.nn.Linear(k, n, bias=False)
    if precision == "bf16":
        layer, x = layer.to(torch.bfloat16), x.to(torch.bfloat16)
    if precision == "int8":
        layer = precisions.apply(torch.nn.Sequential(layer), "int8")
    else:
        pack_linears(layer)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 3):
            t0 = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - t0)
    return 2 * m * k * n / sorted(times[3:])[repeats // 2] / 1e9


def flops_per_token(model: torch.nn.Module) -> float:
    """2 x the weights every prompt token multiplies (the decoder layers' linear layers; not the embedding,
    whose lookup is free, nor the output layer, which prefill runs for the last token only)."""
    return 2.0 * sum(m.weight.numel() for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}")


CROSS_KV = ("encoder_attn.k_proj", "encoder_attn.v_proj", "EncDecAttention.k", "EncDecAttention.v")  # BART, T5


def _weights(model: torch.nn.Module, decoding: bool = False) -> list[torch.Tensor]:
    """The weight of every linear layer ``model`` runs, output layer included (int8: the quantised weight).
    ``decoding``: those a decoding step reads; an encoder-decoder's steps read the decoder's and the output
    layer's, but neither the encoder's nor the cross-attention keys' and values' (cached at the first step)."""
    modules = list(model.modules())
    if decoding and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        modules = [m for name, m in model.get_decoder().named_modules() if not name.endswith(CROSS_KV)]
        modules.append(model.get_output_embeddings())
    out = []
    for m in modules:
        w = getattr(m, "weight", None)
        w = w() if callable(w) else w  # torch.ao's dynamic quantised Linear: weight() gives the int8 tensor
        if isinstance(m, torch.nn.Linear) or (isinstance(w, torch.Tensor) and w.is_quantized):
            out.append(w)
    return out


def step_cost(model: torch.nn.Module) -> tuple[float, float]:
    """(bytes, FLOPs per row) of one decoding step: every linear weight a step reads (:func:`_weights`),
    output layer included, is read once per step, and each row multiplies all of them (2 FLOPs per weight)."""
    weights = _weights(model, decoding=True)
    return float(sum(w.numel() * w.element_size() for w in weights)), 2.0 * sum(w.numel() for w in weights)


def read_bandwidth(model: torch.nn.Module, repeats: int = 5, buffers: int = 3) -> float:
    """Bytes per second the CPU reads memory at, at best: the fastest of ``repeats`` passes summing every
    linear weight of ``model`` (as the loader placed them), and of ``repeats`` passes over each of
    ``buffers`` fresh 1 GiB buffers allocated one after another (read only, far more bytes than the caches
    hold; the threads decoding uses). Where the pages lie moves the rate from run to run (46-74 GB/s seen on
    one machine); a floor takes the best."""

    def best_of(tensors: list[torch.Tensor]) -> float:
        nbytes, fastest = sum(t.numel() * t.element_size() for t in tensors), float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for t in tensors:
                t.sum()
            fastest = min(fastest, time.perf_counter() - t0)
        return nbytes / fastest

    with torch.no_grad():
        rates = [best_of([w for w in _weights(model) if not w.is_quantized])]
        rates += [best_of([torch.ones(1 << 28)]) for _ in range(buffers)]  # each freed before the next
    return max(rates)


def decoding_floor(steps: int, rows: int, cost: tuple[float, float], bandwidth: float, rate: float) -> float:
    """Seconds a question's decoding steps cannot go below: each step reads every weight once, and all its
    rows multiply them, so  max(steps x weight bytes / read bandwidth, rows x FLOPs per row / matmul rate)
    (a lower bound on the sum over steps of the larger of the two)."""
    nbytes, flops = cost
    return max(steps * nbytes / bandwidth, rows * flops / rate)


def run_row(rag: RagModel, questions, model: str, decoding: str, k: int, beams: int, max_new: int,
            floor: Callable[[int, int], float]) -> dict:
    """Every question answered alone: seconds, stages, counters, EM, answers and the decoding floor,
    ``floor(steps, rows)`` of each question summed."""
    total: dict = {"seconds": 0.0, "stages": {s: 0.0 for s in profile.STAGES}, "counts": {}, "em": 0.0,
                   "answers": [], "decode_floor": 0.0}
    for q in questions:
        with profile.recording() as rec:
            t0 = time.perf_counter()
            [a] = rag.answer([q.question], model=model, decoding=decoding, k=k, beams=beams, max_new_tokens=max_new)
            total["seconds"] += time.perf_counter() - t0
        for s in profile.STAGES:
            total["stages"][s] += rec.seconds.get(s, 0.0)
        for c, n in rec.counts.items():
            total["counts"][c] = total["counts"].get(c, 0) + n
        total["decode_floor"] += floor(rec.counts.get(profile.DECODE_STEPS, 0), rec.counts.get(profile.DECODE_ROWS, 0))
        total["em"] += exact_match(a.text, q.answers)
        total["answers"].append(a.tokens)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    question_set_arguments(ap)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--precisions", default="fp32,bf16,int8", help="fp32, bf16, int8 (each where this CPU runs it)")
    ap.add_argument("--paths", default="before,cold,warm")
    ap.add_argument("--systems", default="closed-book,single-passage,rag-seq-thorough,rag-seq-fast,"
                                         "rag-token-greedy,rag-token-beam")
    ap.add_argument("--json", type=Path, default=None, help="also write every row as JSON lines")
    args = ap.parse_args()

    index = open_index(args.index)
    questions = dev_questions(index.store.values("title"), index.store.values("text"),
                              answerable_only=True)[: args.limit]
    ks = [int(k) for k in args.ks.split(",")]
    base = load_generator(args.generator)  # fp32, for its FLOPs per token and read rate; freed before the rows
    fpt, generator_name = flops_per_token(base.generator.model), base.generator.name
    bandwidth = read_bandwidth(base.generator.model)
    del base
    flags = sorted(precisions.cpu_flags() & {"avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni", "amx_int8"})
    print(f"{len(questions)} answerable dev questions, one at a time; generator {generator_name}; "
          f"{fpt / 1e9:.2f} GFLOP per prompt token; beams {args.beams}; {torch.get_num_threads()} threads; "
          f"CPU flags: {' '.join(flags) or 'no bf16 or VNNI'}; its weights read at {bandwidth / 1e9:.1f} GB/s")
    rates: dict[str, float] = {}
    reference: dict[tuple[str, int], list] = {}
    rows = []
    head = ("| precision | path | system | k | EM | s/question | " + " | ".join(profile.STAGES)
            + " | prompt tok | computed tok | cached tok | prefill floor s | steps | rows/step | decoding floor s |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for prec in args.precisions.split(","):
        ok, why = precisions.native(prec, torch.device("cpu"))
        if not ok:
            print(f"| {prec} | skipped: {why} |")
            continue
        loaded = load_generator(args.generator, precision=prec)
        rates[prec] = matmul_rate(prec)
        cost = step_cost(loaded.generator.model)

        def floor(steps: int, rows: int, cost=cost, rate=rates[prec]) -> float:
            return decoding_floor(steps, rows, cost, bandwidth, rate * 1e9)
        rag = RagModel(open_retriever(index, None, loaded.question_encoder), loaded.generator, mode="dense")
        gen = rag.generator
        rag.answer([questions[0].question], model="rag-token", decoding="greedy", k=1, max_new_tokens=2)  # warm-up
        for name in args.systems.split(","):
            model, decoding, fixed = SYSTEMS[name]
            for k in fixed or ks:
                for path in args.paths.split(","):  # warm right after its own cold row: the cache holds its passages
                    gen.packed = path != "before"
                    saved = getattr(gen, "kv_cache", None)  # decoder-only generators have one
                    if saved is not None and path != "warm":
                        saved.clear()
                    gen.kv_cache = saved if path != "before" else None
                    r = run_row(rag, questions, model, decoding, k, args.beams, args.max_new_tokens, floor)
                    gen.kv_cache = saved
                    n = len(questions)
                    key = (name, k)
                    same = None
                    if prec == "fp32" and key not in reference:  # fp32's first path: before, unless left out
                        reference[key] = r["answers"]
                    elif key in reference:
                        same = sum(a == b for a, b in zip(r["answers"], reference[key], strict=True))
                    computed = r["counts"].get(profile.COMPUTED_TOKENS, 0) / n
                    prefill_floor = computed * fpt / (rates[prec] * 1e9)
                    steps = r["counts"].get(profile.DECODE_STEPS, 0)
                    rows_stepped = r["counts"].get(profile.DECODE_ROWS, 0)
                    row = {"precision": prec, "path": path, "system": name, "k": k, "em": r["em"] / n,
                           "seconds": r["seconds"] / n, **{s: v / n for s, v in r["stages"].items()},
                           "prompt_tokens": r["counts"].get(profile.PROMPT_TOKENS, 0) / n,
                           "computed_tokens": computed, "cached_tokens": r["counts"].get(profile.CACHED_TOKENS, 0) / n,
                           "floor": prefill_floor, "same_answers_as_fp32_first_path": same, "questions": n,
                           "gflops": rates[prec], "decode_steps": steps / n, "decode_rows": rows_stepped / n,
                           "decode_floor": r["decode_floor"] / n, "read_gbs": bandwidth / 1e9,
                           "step_bytes": cost[0]}
                    rows.append({**row, "answers": r["answers"]})  # token ids: compare runs of two commits
                    same_txt = "" if same is None else f" ({same}/{n} same)"
                    print(f"| {prec} | {path} | {name} | {k if name != 'closed-book' else '-'} | "
                          f"{row['em']:.3f}{same_txt} | {row['seconds']:.2f} | "
                          + " | ".join(f"{row[s]:.2f}" for s in profile.STAGES)
                          + f" | {row['prompt_tokens']:.0f} | {computed:.0f} | {row['cached_tokens']:.0f} | "
                          f"{prefill_floor:.2f} | {steps / n:.1f} | {rows_stepped / max(steps, 1):.1f} | "
                          f"{row['decode_floor']:.2f} |", flush=True)
        del rag, loaded
    print("matrix-multiply rates measured in this run (GFLOP/s, "
          f"{GEMM[0]}x{GEMM[1]} @ {GEMM[1]}x{GEMM[2]}): " + ", ".join(f"{p} {r:.0f}" for p, r in rates.items())
          + f"; weights read at {bandwidth / 1e9:.1f} GB/s")
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
