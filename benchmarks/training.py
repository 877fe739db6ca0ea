"""Training on the FanOutQA dev split: what RAG fine-tuning and retriever training gain, and what they cost.

How it measures and what it prints: docs/benchmarks.md (training.py).

    python3 benchmarks/training.py [--index DIR] [--steps 60] [--qwen-steps 20] [--phases rag-smollm2,...]
    python3 benchmarks/training.py --speed [--speed-steps 3] [--speed-configs padded-fp32,packed-fp32,packed-bf16]
                                   [--speed-generator qwen|paper-bart]
    python3 benchmarks/training.py --synth 1000 [--synth-file FILE] [--retriever-steps 100] [--synth-rag-steps 100]
    python3 benchmarks/training.py --synth-file FILE --answers 50 [--lora-lr 2e-4] [--answers-runs synthetic,both]
                                   [--answers-scores FILE]

``--speed``: seconds per optimiser step of Qwen2.5-0.5B through LoRA, RAG-Sequence, k=5, batch 8 (micro-batches
of ``--speed-micro`` questions, their gradients accumulated: the same gradient, less memory), for each
configuration (prefill padded or packed; fp32, or bf16 autocast with fp32 master weights; ``-ckpt``: with
activation checkpointing), each in its own process, beside the step's FLOP floor: prompt and answer tokens x 4
x the generator's parameters that every token passes through (not the embedding, not the output layer, which
runs on answer tokens only; 4: LoRA runs the frozen weights forward and back to their inputs; the adapters and
the question encoder are small beside them), at the matrix-multiply rate measured in the same process and
precision; and the process's peak resident memory. ``--speed-generator paper-bart`` times a BART-large-shaped
RAG-Sequence checkpoint with random weights (benchmarks/paper_shapes.py) trained in full instead (6 FLOPs per
token and weight; prompts through the encoder's weights, answers through the decoder's).

``--synth N``: N questions synthesised from the index by ``ragline synth`` (into ``--synth-file``, resumed if it
is there), the retriever trained on them alone, and page recall@1/5/20 on the FanOutQA dev sub-questions (ids
0-7) whose gold page is in the index, none of which any run trained on: before and after, with the number of
questions found at k after and not before (better) and the reverse (worse). With ``--synth-rag-steps``, also
the question encoder trained by RAG-Sequence's marginal likelihood with the generator frozen, so that it learns
only through p(z|x) (the paper's Table 6 compares frozen and learned retrieval).

``--answers STEPS``: the default generator (LoRA) and question encoder fine-tuned by RAG-Sequence k=5 on the
synthetic questions alone, then on them plus the labelled half of the dev questions; the untrained system and
both runs scored on the other half (closed book, the top passage alone, RAG-Sequence k=5: exact match, F1, the
gold answer's log-likelihood, and the questions each changed for the better and the worse). A second table splits
the log-likelihood by whether the answer it scores occurs word for word in the question's gold page (the kind of
answer a synthetic question teaches) or not. ``--answers-runs synthetic`` trains the first run only;
``--answers-scores FILE`` keeps every question's scores.
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

import numpy as np


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


def matmul_rate(precision: str) -> float:
    """GFLOP/s of a (2048 x 896) @ (896 x 4864) linear layer with gradient to its input, as training runs it."""
    import torch

    x = torch.randn(2048, 896, requires_grad=True)
    w = torch.randn(4864, 896)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    for _ in range(3):
        with ctx:
            torch.nn.functional.linear(x, w).sum().backward()
    t0 = time.perf_counter()
    n = 10
    for _ in range(n):
        with ctx:
            y = torch.nn.functional.linear(x, w)
        y.sum().backward()
    return 4 * 2048 * 896 * 4864 * n / (time.perf_counter() - t0) / 1e9  # forward + gradient to the input


def speed_phase(args: argparse.Namespace, data: Path, out: Path, config: str) -> dict:
    """One --speed configuration: 'padded-fp32', 'packed-fp32', 'packed-bf16' or 'padded-bf16', each with
    '-ckpt' for activation checkpointing ('packed-bf16-ckpt')."""
    from ragline import paths
    from ragline.train.rag import RagTrainConfig, RagTrainer

    prefill, precision, *extra = config.split("-")
    if extra not in ([], ["ckpt"]):
        raise SystemExit(f"unknown speed configuration {config!r}")
    generator, index, training = "qwen2.5-0.5b", args.index, "lora"
    if args.speed_generator == "paper-bart":  # random weights of the paper's shapes: speed only
        from paper_shapes import build

        rag_dir, index = build(paths.models_dir() / "paper-shapes", log=lambda m: print(m, file=sys.stderr))
        generator, training = str(rag_dir), "full"
    cfg = RagTrainConfig(train=str(data), index=str(index), generator=generator, model="rag-sequence",
                         k=5, generator_training=training, lr=2e-4 if training == "lora" else 3e-5,
                         batch_size=args.speed_micro,
                         accumulation=8 // args.speed_micro, steps=args.speed_steps, warmup=1,
                         val_fraction=0.0, eval_every=10_000, save_every=10_000, precision=precision, seed=0,
                         activation_checkpointing=extra == ["ckpt"])
    trainer = RagTrainer(cfg, out, progress=False, log=lambda m: print(m, file=sys.stderr))
    trainer.gen.packed = prefill == "packed"
    trainer.export = lambda: out  # merging and writing the model is not a training step
    tokens = []  # prompt + answer tokens of each step's (question, passage) rows
    from ragline.train.loop import batch_indices

    for step in range(cfg.steps):
        batch = [trainer.train_set[i] for micro in range(cfg.accumulation)
                 for i in batch_indices(step, micro, cfg.batch_size, cfg.accumulation, cfg.seed,
                                        len(trainer.train_set))]
        passages, _, _ = trainer.rag.retrieve([e.question for e in batch], cfg.k)
        prompts = trainer.gen.pair_prompts([e.question for e in batch], passages)
        answers = trainer.gen.target_ids([e.answer for e in batch for _ in range(cfg.k)])
        if hasattr(trainer.gen, "prompt_ids"):  # causal: prompt and answer through every layer
            read = sum(len(p) for p in trainer.gen.prompt_ids(prompts))
        else:  # seq2seq: prompts through the encoder (answers through the decoder)
            read = int(trainer.gen._encode_cpu(prompts)["attention_mask"].sum())
        tokens.append((read, sum(len(a) for a in answers)))
    trainer.run_training()
    rates = [r["value"] for r in trainer.run.read_metrics() if r["split"] == "train" and r["name"] == "steps_per_s"]
    seconds = [1 / r for r in rates]
    # the weights every token passes through: not the embedding, not the output layer (run on answer tokens
    # only), not the adapters
    named = [(n, p.numel()) for n, p in trainer.gen.model.named_parameters()
             if not any(part in n for part in ("embed", "lm_head", "lora_"))]
    decoder = sum(k for n, k in named if "decoder." in n)  # seq2seq: the answer tokens' weights
    params = sum(k for _, k in named) - decoder  # causal: all of them; seq2seq: the encoder's
    rate = matmul_rate(precision)
    per_token = 4 if training == "lora" else 6  # LoRA: frozen weights forward and back to their inputs only
    flops = [(r * params + a * (decoder or params)) * per_token for r, a in tokens]
    floor = [f / (rate * 1e9) for f in flops]
    tokens = [r + a for r, a in tokens]
    return {"config": config, "steps": cfg.steps, "seconds_per_step": seconds, "tokens_per_step": tokens,
            "params": params, "gflops": rate, "floor_seconds": floor}


def speed_table(args: argparse.Namespace, work: Path) -> None:
    print(f"batch 8 = {8 // args.speed_micro} micro-batches of {args.speed_micro} questions\n")
    print("| configuration | s/step (each step) | tokens/step | floor s/step | x floor | matmul GFLOP/s | peak MB |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for config in args.speed_configs.split(","):
        cmd = [sys.executable, __file__, "--phase", f"speed:{config}", "--work", str(work), "--index", str(args.index),
               "--speed-steps", str(args.speed_steps), "--speed-micro", str(args.speed_micro),
               "--speed-generator", args.speed_generator]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            why = "killed (out of memory)" if done.returncode in (-9, 137) else f"failed ({done.returncode})"
            print(f"| {config} | {why} | | | | | |", flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        mean = sum(r["seconds_per_step"]) / len(r["seconds_per_step"])
        floor = sum(r["floor_seconds"]) / len(r["floor_seconds"])
        each = ", ".join(f"{x:.1f}" for x in r["seconds_per_step"])
        print(f"| {config} | {mean:.1f} ({each}) | {sum(r['tokens_per_step']) / len(r['tokens_per_step']):.0f} | "
              f"{floor:.1f} | {mean / floor:.1f} | {r['gflops']:.0f} | {r['peak_rss_mb']:.0f} |", flush=True)


def synth_table(args: argparse.Namespace, work: Path) -> None:
    from ragline.index.directory import IndexDir
    from ragline.models.encoders import load_encoder
    from ragline.train.data import read_examples
    from ragline.train.retriever import RetrieverTrainConfig, RetrieverTrainer, resolve_pairs

    synth_file = args.synth_file or work / "synth.jsonl"
    t0 = time.perf_counter()
    made = subprocess.run([sys.executable, "-m", "ragline", "synth", "--index", str(args.index), "--out",
                           str(synth_file), "--questions", str(args.synth), "--json"], check=True,
                          capture_output=True, text=True).stdout
    stats = json.loads(made[made.index("{"):])
    print(f"synthesised: {json.dumps(stats)} ({time.perf_counter() - t0:.0f} s this run)", flush=True)
    index = IndexDir.open(args.index)
    dev, _ = resolve_pairs(read_examples(str(work / "fanoutqa-dev-in-corpus.jsonl")), index, 0)
    titles = index.store.values("title")
    emb = np.asarray(index.embeddings[np.arange(len(index))], dtype=np.float32)

    def found(encoder) -> np.ndarray:  # (questions, 3) bool: gold page in the top 1 / 5 / 20
        q = encoder.encode([p.question for p in dev])
        top = np.argsort(-(q @ emb.T), axis=1)[:, :20]
        return np.array([[any(titles[r] in p.pages for r in top[i, :k]) for k in (1, 5, 20)]
                         for i, p in enumerate(dev)])

    question = index.manifest["encoder"]["question"]
    rows = {"untrained (the index's own)": found(load_encoder(question.get("source") or question["name"],
                                                             question["max_seq_length"]))}
    notes = []
    if args.retriever_steps:
        cfg = RetrieverTrainConfig(train=str(synth_file), index=str(args.index), lr=2e-5, batch_size=16,
                                   steps=args.retriever_steps, warmup=5, val_fraction=0.05, eval_every=50,
                                   save_every=args.retriever_steps, seed=0, hard_negatives=args.synth_hard_negatives)
        t0 = time.perf_counter()
        RetrieverTrainer(cfg, work / "dpr-synth", progress=False,
                         log=lambda m: print(m, file=sys.stderr)).run_training()
        rows[f"DPR training (in-batch + {args.synth_hard_negatives} BM25 negatives)"] = found(
            load_encoder(str(work / "dpr-synth" / "final" / "question_encoder")))
        notes.append(f"DPR: {cfg.steps} steps of {cfg.batch_size}, {time.perf_counter() - t0:.0f} s")
    if args.synth_rag_steps:
        from ragline.train.rag import RagTrainConfig, RagTrainer

        cfg = RagTrainConfig(train=str(synth_file), index=str(args.index), generator="qwen2.5-0.5b",
                             model="rag-sequence", k=5, generator_training="frozen", train_question_encoder=True,
                             question_encoder_lr=2e-5, batch_size=8, steps=args.synth_rag_steps, warmup=10,
                             val_fraction=0.05, val_limit=32, eval_every=args.synth_rag_steps,
                             save_every=args.synth_rag_steps, precision="bf16", seed=0)
        t0 = time.perf_counter()
        RagTrainer(cfg, work / "rag-qe-synth", progress=False, log=lambda m: print(m, file=sys.stderr)).run_training()
        rows["RAG-Sequence k=5, generator frozen: through p(z|x) only"] = found(
            load_encoder(str(work / "rag-qe-synth" / "final" / "question_encoder")))
        notes.append(f"RAG: {cfg.steps} steps of {cfg.batch_size}, bf16, {time.perf_counter() - t0:.0f} s")
    print(f"\nquestion encoders trained on {stats['questions']} synthetic questions alone ({'; '.join(notes)}); "
          f"{len(dev)} dev questions (ids 0-7) with their page in the index, none trained on; better / worse: "
          "questions found at k that the untrained encoder missed / found\n")
    print("| question encoder | recall@1 | recall@5 | recall@20 | better / worse @1 | @5 | @20 |")
    print("|---|---|---|---|---|---|---|")
    base = next(iter(rows.values()))
    for name, got in rows.items():
        recall = " | ".join(f"{got[:, j].mean():.3f}" for j in range(3))
        paired = " | ".join(f"{int((got[:, j] & ~base[:, j]).sum())} / {int((base[:, j] & ~got[:, j]).sum())}"
                            for j in range(3))
        print(f"| {name} | {recall} | {paired} |", flush=True)


READERS = (("closed book", "closed-book", 1), ("RAG-Sequence k=1 (the top passage)", "rag-sequence", 1),
           ("RAG-Sequence k=5", "rag-sequence", 5))  # (row name, reader, k) of --answers


def dev_halves(work: Path) -> tuple[Path, Path]:
    """The in-corpus dev questions split in two by a hash of the id: (labelled training half, evaluation half)."""
    from ragline.train.data import read_examples, split_validation, write_examples

    train, held = split_validation(read_examples(str(work / "fanoutqa-dev-in-corpus.jsonl")), 0.5)
    write_examples(work / "dev-labelled.jsonl", train)
    write_examples(work / "dev-eval.jsonl", held)
    return work / "dev-labelled.jsonl", work / "dev-eval.jsonl"


def lora_phase(args: argparse.Namespace, data: Path, out: Path) -> dict:
    """``train rag`` of the default generator through LoRA with the question encoder: RAG-Sequence, k=5,
    batch 8 in micro-batches of one question, bf16."""
    from ragline.train.rag import RagTrainConfig, RagTrainer

    cfg = RagTrainConfig(train=str(data), index=str(args.index), generator="qwen2.5-0.5b", model="rag-sequence",
                         k=5, generator_training="lora", lr=args.lora_lr, question_encoder_lr=2e-5, batch_size=1,
                         accumulation=8, steps=args.answers, warmup=max(1, args.answers // 10), val_fraction=0.02,
                         val_limit=16, eval_every=args.answers, save_every=args.answers, precision="bf16", seed=0)
    t0 = time.perf_counter()
    trainer = RagTrainer(cfg, out, progress=False, log=lambda m: print(m, file=sys.stderr))
    trainer.run_training()
    return {"train": len(trainer.train_set), "steps": cfg.steps, "seconds": time.perf_counter() - t0}


def answers_phase(args: argparse.Namespace, data: Path, run: Path | None) -> dict:
    """Per evaluation question and reader (READERS): exact match, F1 and the gold answer's log-likelihood
    (log p(y|x) of the first gold answer, the one training targets; RAG-Sequence marginalises over the k
    passages) of the default generator, or of a ``train rag`` run's generator and question encoder."""
    import torch

    import ragline
    from ragline.evaluate.metrics import exact_match, token_f1
    from ragline.train.data import read_examples

    examples = read_examples(str(data))
    rag = ragline.open(args.index, run=run, follow=False)
    out = {}
    for name, reader, k in READERS:
        em, f1, ll = [], [], []
        for lo in range(0, len(examples), 8):
            batch = examples[lo : lo + 8]
            qs = [e.question for e in batch]
            for e, a in zip(batch, rag.ask(qs, model=reader, k=k), strict=True):
                em.append(exact_match(a.text, e.answers))
                f1.append(token_f1(a.text, e.answers))
            with torch.no_grad():
                ll += rag.model.likelihood(qs, [e.answer for e in batch], model=reader, k=k).loglik.float().tolist()
        out[name] = {"em": em, "f1": f1, "loglik": ll}
    return out


def answer_in_page(index: Path, examples: list) -> np.ndarray:
    """(examples,) bool: whether each example's first gold answer (the one training targets and the
    log-likelihood scores) occurs word for word in its gold page's passages (``fanoutqa.answerable``'s test)."""
    from types import SimpleNamespace

    from ragline.index.directory import IndexDir
    from ragline.questions.fanoutqa import answerable, pages_of

    store = IndexDir.open(index).store
    pages = pages_of(store.values("title"), store.values("text"))
    asked = [SimpleNamespace(answers=(e.answer,), gold_titles=e.positives) for e in examples]
    found = {id(q) for q in answerable(asked, pages)}
    return np.array([id(q) in found for q in asked])


ANSWER_RUNS = {"synthetic": "synthetic alone", "both": "synthetic + labelled half"}  # --answers-runs


def answers_table(args: argparse.Namespace, work: Path) -> None:
    """--answers: the default generator fine-tuned by RAG (LoRA + question encoder) on the synthetic questions
    alone and on them plus the labelled half of the dev questions; every row scored on the other half."""
    from ragline.train.data import read_examples

    labelled, held = dev_halves(work)
    synth_file = args.synth_file or work / "synth.jsonl"
    if not synth_file.is_file():
        raise SystemExit("--answers trains on synthetic questions: give --synth-file FILE (or --synth N to write them)")
    both = work / "synth-plus-labelled.jsonl"
    both.write_text(synth_file.read_text() + labelled.read_text())
    asked = args.answers_runs.split(",")
    unknown = set(asked) - set(ANSWER_RUNS)
    if unknown:
        raise SystemExit(f"--answers-runs: unknown run {', '.join(sorted(unknown))}; use {','.join(ANSWER_RUNS)}")
    wanted = [ANSWER_RUNS[r] for r in asked]
    runs: dict[str, Path | None] = {"untrained": None}
    for name, data in (("synthetic alone", synth_file), ("synthetic + labelled half", both)):
        if name not in wanted:
            continue
        out = work / f"lora-{len(runs)}"
        cmd = [sys.executable, __file__, "--phase", "lora", "--work", str(work), "--index", str(args.index),
               "--answers", str(args.answers), "--lora-lr", str(args.lora_lr), "--data", str(data), "--out", str(out)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"trained on {name}: {r['train']} examples, {r['steps']} steps of 8, {r['seconds']:.0f} s, "
              f"peak {r['peak_rss_mb']:.0f} MB", flush=True)
        runs[name] = out
    scored = {}
    for name, run in runs.items():
        cmd = [sys.executable, __file__, "--phase", "answers", "--work", str(work), "--index", str(args.index),
               "--data", str(held)] + (["--out", str(run)] if run else [])
        t0 = time.perf_counter()
        scored[name] = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                                 text=True).stdout.strip().splitlines()[-1])
        print(f"scored {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    n = len(next(iter(scored["untrained"].values()))["em"])
    print(f"\n{n} dev questions (ids 0-7, gold page in the index) that no run trained on; better / worse: "
          "questions whose exact match (gold log-likelihood) rose / fell against the untrained row\n")
    print("| reader | generator | EM | F1 | gold log-lik | EM better / worse | log-lik better / worse |")
    print("|---|---|---|---|---|---|---|")
    for reader, _, _ in READERS:
        base = {m: np.array(v) for m, v in scored["untrained"][reader].items()}
        for name in runs:
            got = {m: np.array(v) for m, v in scored[name][reader].items()}
            paired = "" if name == "untrained" else (
                f"{int((got['em'] > base['em']).sum())} / {int((got['em'] < base['em']).sum())} | "
                f"{int((got['loglik'] > base['loglik']).sum())} / {int((got['loglik'] < base['loglik']).sum())}")
            print(f"| {reader} | {name} | {got['em'].mean():.3f} | {got['f1'].mean():.3f} | "
                  f"{got['loglik'].mean():.2f} | {paired or ' | '} |", flush=True)
    examples = read_examples(str(held))
    in_page = answer_in_page(args.index, examples)
    print(f"\nThe gold log-likelihood by whether the answer it scores occurs in the gold page ({int(in_page.sum())} "
          f"questions) or not ({int((~in_page).sum())}): mean untrained -> trained, the median change, and the "
          "questions whose log-likelihood rose / fell\n")
    print("| reader | generator | answer in page | questions | gold log-lik | median change | better / worse |")
    print("|---|---|---|---|---|---|---|")
    for reader, _, _ in READERS:
        base = np.array(scored["untrained"][reader]["loglik"])
        for name in list(runs)[1:]:
            got = np.array(scored[name][reader]["loglik"])
            for label, group in (("yes", in_page), ("no", ~in_page)):
                b, g = base[group], got[group]
                print(f"| {reader} | {name} | {label} | {int(group.sum())} | {b.mean():.2f} -> {g.mean():.2f} | "
                      f"{np.median(g - b):+.2f} | {int((g > b).sum())} / {int((g < b).sum())} |", flush=True)
    if args.answers_scores:
        args.answers_scores.write_text(json.dumps({"ids": [e.id for e in examples], "answer_in_page": in_page.tolist(),
                                                   "scores": scored}))


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
    ap.add_argument("--speed", action="store_true", help="Time training steps instead (module docstring).")
    ap.add_argument("--speed-steps", type=int, default=3)
    ap.add_argument("--speed-configs", default="padded-fp32,packed-fp32,packed-bf16")
    ap.add_argument("--speed-generator", default="qwen", choices=("qwen", "paper-bart"),
                    help="--speed: Qwen2.5-0.5B through LoRA, or a BART-large-shaped RAG-Sequence checkpoint with "
                    "random weights trained in full (benchmarks/paper_shapes.py; speed only)")
    ap.add_argument("--speed-micro", type=int, default=2, choices=(1, 2, 4, 8),
                    help="Questions per micro-batch of the batch of 8.")
    ap.add_argument("--synth", type=int, default=0, help="Synthesise this many questions and train on them "
                                                          "(module docstring).")
    ap.add_argument("--synth-file", type=Path, default=None, help="Where the synthetic questions go (resumed).")
    ap.add_argument("--synth-hard-negatives", type=int, default=0,
                    help="BM25 hard negatives per synthetic question in DPR training (0: in-batch only; BM25 "
                         "negatives lowered recall on the dev questions, docs/training.md)")
    ap.add_argument("--synth-rag-steps", type=int, default=0,
                    help="Also train the question encoder through RAG's p(z|x) alone (generator frozen), this many "
                         "steps of 8.")
    ap.add_argument("--answers", type=int, default=0,
                    help="RAG fine-tuning of the default generator (LoRA) and question encoder on the synthetic "
                         "questions, alone and with the labelled half of the dev questions, this many steps of 8; "
                         "answers scored on the other half (module docstring).")
    ap.add_argument("--lora-lr", type=float, default=2e-4, help="--answers: the LoRA adapters' learning rate.")
    ap.add_argument("--answers-runs", default="synthetic,both",
                    help="--answers: which runs to train: synthetic (the synthetic questions alone), both (with the "
                         "labelled half).")
    ap.add_argument("--answers-scores", type=Path, default=None,
                    help="--answers: write every question's scores (EM, F1, log-likelihood per run and reader) here.")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.phase:
        data = args.work / "fanoutqa-dev-in-corpus.jsonl"
        out = args.work / args.phase.replace(":", "-")
        if args.phase == "lora":
            result = lora_phase(args, args.data, args.out)
        elif args.phase == "answers":
            result = answers_phase(args, args.data, args.out)
        elif args.phase.startswith("speed:"):
            result = speed_phase(args, data, out, args.phase.split(":", 1)[1])
        elif args.phase == "rag-smollm2":
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
        if args.speed:
            speed_table(args, work)
            return
        if args.synth:
            synth_table(args, work)
        if args.answers:
            answers_table(args, work)
        if args.synth or args.answers:
            return
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
