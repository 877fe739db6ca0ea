"""Training on the FanOutQA dev split: what RAG fine-tuning and retriever training gain, and what they cost.

How it measures and what it prints: docs/benchmarks.md (training.py).

    python3 benchmarks/training.py [--index DIR] [--steps 60] [--qwen-steps 20] [--phases rag-smollm2,...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def in_corpus_examples(index_dir: Path, work: Path) -> Path:
    from ragline.index.directory import IndexDir
    from ragline.questions import load_fanoutqa
    from ragline.train.data import Example, write_examples

    titles = set(IndexDir.open(index_dir).store.values("title"))
    examples = [Example(q.id, q.question, q.answers, q.gold_titles) for q in load_fanoutqa("dev", titles)]
    path = work / "fanoutqa-dev-in-corpus.jsonl"
    write_examples(path, examples)
    return path


def exact_match_on(rag, examples, k: int) -> tuple[float, float]:
    from ragline.evaluate.metrics import exact_match, token_f1

    em = f1 = 0.0
    for lo in range(0, len(examples), 4):
        batch = examples[lo : lo + 4]
        for e, a in zip(batch, rag.answer([e.question for e in batch], model="rag-sequence", decoding="thorough",
                                          k=k, beams=2, max_new_tokens=16, length_penalty=0.0), strict=True):
            em += exact_match(a.text, e.answers)
            f1 += token_f1(a.text, e.answers)
    return em / len(examples), f1 / len(examples)


def rag_phase(args: argparse.Namespace, data: Path, out: Path, generator: str, training: str, steps: int) -> dict:
    from ragline.models.loading import load_generator
    from ragline.rag.model import RagModel
    from ragline.retriever import Retriever
    from ragline.train.rag import RagTrainConfig, RagTrainer, load_trained

    cfg = RagTrainConfig(train=str(data), index=str(args.index), generator=generator, model="rag-sequence", k=args.k,
                         generator_training=training, lr=3e-5 if training == "full" else 2e-4,
                         question_encoder_lr=1e-5, batch_size=4, steps=steps, warmup=max(1, steps // 10),
                         val_fraction=0.2, val_limit=args.val_limit, eval_every=max(1, steps // 4),
                         save_every=steps, seed=0)
    trainer = RagTrainer(cfg, out, progress=False, log=lambda m: print(m, file=sys.stderr))
    val = trainer.val_set
    before = exact_match_on(RagModel(Retriever(args.index), load_generator(generator).generator, k=args.k), val, args.k)
    t0 = time.perf_counter()
    trainer.run_training()
    seconds = (time.perf_counter() - t0) / steps
    info = load_trained(out)
    from ragline.models.encoders import load_encoder

    retriever = Retriever(args.index, load_encoder(str(info["question_encoder"])))
    after = exact_match_on(RagModel(retriever, load_generator(str(info["generator"])).generator, k=args.k), val, args.k)
    losses = [r["value"] for r in trainer.run.read_metrics() if r["split"] == "validation" and r["name"] == "loss"]
    return {"train": len(trainer.train_set), "validation": len(val), "steps": steps, "seconds_per_step": seconds,
            "before": {"em": before[0], "f1": before[1]}, "after": {"em": after[0], "f1": after[1]},
            "validation_loss": [losses[0], losses[-1]]}


def retriever_phase(args: argparse.Namespace, data: Path, out: Path) -> dict:
    from ragline.index.directory import IndexDir
    from ragline.models.encoders import load_encoder
    from ragline.train.retriever import RetrieverTrainConfig, RetrieverTrainer, recall_at

    cfg = RetrieverTrainConfig(train=str(data), index=str(args.index), lr=2e-5, batch_size=16,
                               steps=args.retriever_steps, warmup=10, val_fraction=0.2, eval_every=25,
                               save_every=args.retriever_steps, seed=0)
    trainer = RetrieverTrainer(cfg, out, progress=False, log=lambda m: print(m, file=sys.stderr))
    index = IndexDir.open(args.index)
    before = {"validation": recall_at(trainer.question, index, trainer.val_set),
              "train": recall_at(trainer.question, index, trainer.train_set)}
    t0 = time.perf_counter()
    trainer.run_training()
    seconds = (time.perf_counter() - t0) / cfg.steps
    enc = load_encoder(str(out / "final" / "question_encoder"))
    after = {"validation": recall_at(enc, index, trainer.val_set), "train": recall_at(enc, index, trainer.train_set)}
    return {"train": len(trainer.train_set), "validation": len(trainer.val_set), "steps": cfg.steps,
            "seconds_per_step": seconds, "before": before, "after": after}


def main() -> None:
    from ragline import paths

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=paths.default_index_dir())
    ap.add_argument("--phases", default="rag-smollm2,rag-qwen-lora,retriever")
    ap.add_argument("--steps", type=int, default=60, help="SmolLM2 RAG training steps (batch 4)")
    ap.add_argument("--qwen-steps", type=int, default=20, help="Qwen LoRA RAG training steps (batch 4)")
    ap.add_argument("--retriever-steps", type=int, default=100)
    ap.add_argument("-k", "--k", type=int, default=3)
    ap.add_argument("--val-limit", type=int, default=40)
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.phase:
        data = args.work / "fanoutqa-dev-in-corpus.jsonl"
        out = args.work / args.phase
        if args.phase == "rag-smollm2":
            result = rag_phase(args, data, out, "smollm2", "full", args.steps)
        elif args.phase == "rag-qwen-lora":
            result = rag_phase(args, data, out, "qwen2.5-0.5b", "lora", args.qwen_steps)
        else:
            result = retriever_phase(args, data, out)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="ragline-training-") as tmp:
        work = Path(tmp)
        in_corpus_examples(args.index, work)
        print("| phase | train / validation examples | steps | s/step | peak MB | before | after |")
        print("|---|---|---|---|---|---|---|", flush=True)
        for phase in args.phases.split(","):
            cmd = [sys.executable, __file__, "--phase", phase, "--work", str(work), "--index", str(args.index),
                   "--steps", str(args.steps), "--qwen-steps", str(args.qwen_steps), "-k", str(args.k),
                   "--retriever-steps", str(args.retriever_steps), "--val-limit", str(args.val_limit)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            if phase == "retriever":
                b, a = r["before"], r["after"]
                fmt = lambda m: " / ".join(f"{m[k]:.3f}" for k in ("recall@1", "recall@5", "recall@20"))  # noqa: E731
                before = f"validation {fmt(b['validation'])}; train {fmt(b['train'])}"
                after = f"validation {fmt(a['validation'])}; train {fmt(a['train'])}"
            else:
                before = f"EM {r['before']['em']:.3f}, F1 {r['before']['f1']:.3f}"
                after = (f"EM {r['after']['em']:.3f}, F1 {r['after']['f1']:.3f} (validation loss "
                         f"{r['validation_loss'][0]:.2f} -> {r['validation_loss'][1]:.2f})")
            print(f"| {phase} | {r['train']} / {r['validation']} | {r['steps']} | {r['seconds_per_step']:.2f} | "
                  f"{r['peak_rss_mb']:.0f} | {before} | {after} |", flush=True)


if __name__ == "__main__":
    main()
