"""Commands that train: ``train rag``, ``train retriever``, ``train fanoutqa-dev``, ``synth`` and ``export``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ragline import vocab
from ragline.cli import render
from ragline.cli.group import cli
from ragline.cli.options import (
    GENERATOR_HELP,
    K_HELP,
    PRIOR_HELP,
    device_option,
    index_option,
    precision_option,
    skip_bad_option,
)
from ragline.errors import RaglineError
from ragline.train.synth import FILTERS as SYNTH_FILTERS
from ragline.train.synth import SynthConfig


@cli.group()
def train() -> None:
    """Training: end-to-end RAG fine-tuning."""


@train.command("rag")
@click.option("--train", "train_spec", default="fanoutqa-dev", show_default=True,
              help="Training examples: JSONL (question, answers, optional positive) or KILT, or 'fanoutqa-dev'.")
@index_option
@click.option("--generator", default=vocab.TRAINING_GENERATOR, show_default=True, help=GENERATOR_HELP)
@click.option("--model", "model_name", type=click.Choice(vocab.TRAINABLE_MODELS), default=vocab.DEFAULT_MODEL,
              show_default=True)
@click.option("-k", "k", default=None, type=click.IntRange(1, 50), help=K_HELP)
@click.option("--generator-training", type=click.Choice(["full", "lora", "frozen"]), default="full", show_default=True)
@click.option("--lora-r", default=8, show_default=True, type=click.IntRange(1))
@click.option("--lora-alpha", default=16, show_default=True, type=click.IntRange(1))
@click.option("--freeze-question-encoder", is_flag=True, help="Train the generator only.")
@click.option("--lr", default=3e-5, show_default=True, type=float, help="Generator learning rate.")
@click.option("--question-encoder-lr", default=1e-5, show_default=True, type=float)
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1))
@click.option("--accumulation", default=1, show_default=True, type=click.IntRange(1), help="Micro-batches per step.")
@click.option("--steps", default=100, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(0))
@click.option("--clip", default=1.0, show_default=True, type=float, help="Gradient clipping (global norm).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--activation-checkpointing", is_flag=True,
              help="Recompute the generator's layer activations in the backward pass: less memory, more time "
                   "(the same losses and gradients).")
@click.option("--label-smoothing", default=0.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--prior-scale", default=None, type=float, help=PRIOR_HELP)
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--val-limit", default=64, show_default=True, type=click.IntRange(1))
@click.option("--eval-every", default=20, show_default=True, type=click.IntRange(1))
@click.option("--save-every", default=20, show_default=True, type=click.IntRange(1))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Run directory (rerun the same command to resume after an interruption).")
@skip_bad_option
@device_option
def train_rag(train_spec, index_dir, generator, model_name, k, generator_training, lora_r, lora_alpha,
              freeze_question_encoder, lr, question_encoder_lr, batch_size, accumulation, steps, warmup, clip, seed,
              precision, activation_checkpointing, label_smoothing, prior_scale, val_fraction, val_limit, eval_every,
              save_every, out, skip_bad, device) -> None:
    """Fine-tune the question encoder and the generator on the marginal likelihood (index frozen)."""
    from ragline.train.rag import RagTrainConfig, RagTrainer

    cfg = RagTrainConfig(train=train_spec, index=str(index_dir) if index_dir else None, generator=generator,
                         model=model_name, k=k, generator_training=generator_training, lora_r=lora_r,
                         lora_alpha=lora_alpha, train_question_encoder=not freeze_question_encoder, lr=lr,
                         question_encoder_lr=question_encoder_lr, batch_size=batch_size, accumulation=accumulation,
                         steps=steps, warmup=warmup, clip=clip, seed=seed, precision=precision,
                         activation_checkpointing=activation_checkpointing, label_smoothing=label_smoothing,
                         prior_scale=prior_scale, val_fraction=val_fraction,
                         val_limit=val_limit, eval_every=eval_every, save_every=save_every, device=device)
    result = RagTrainer(cfg, Path(out), log=render.log, skip_bad=skip_bad).run_training()
    render.console.print(f"trained {result['steps']} steps (last loss {result['last_loss']:.4f}); "
                         f"models in {result['final']}; "
                  f"use them with `ragline ask --run {out} ...`")


@train.command("retriever")
@click.option("--train", "train_spec", default="fanoutqa-dev", show_default=True,
              help="Pairs: JSONL with question and positive (page titles or passage ids), KILT, or 'fanoutqa-dev'.")
@index_option
@click.option("--train-passage-encoder", is_flag=True,
              help="Also train the passage encoder; the corpus is then re-encoded into a new index.")
@click.option("--new-index", type=click.Path(path_type=Path), default=None,
              help="Where the re-encoded index goes (default OUT/index).")
@click.option("--hard-negatives", default=1, show_default=True, type=click.IntRange(0, 16),
              help="BM25 hard negatives per question, besides the in-batch negatives.")
@click.option("--scale", default=None, type=float,
              help="Score scale s in softmax(s q·d) (default: the index's prior scale, 1 for DPR, 20 for MiniLM).")
@click.option("--lr", default=2e-5, show_default=True, type=float)
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--accumulation", default=1, show_default=True, type=click.IntRange(1))
@click.option("--steps", default=100, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--eval-every", default=20, show_default=True, type=click.IntRange(1))
@click.option("--save-every", default=20, show_default=True, type=click.IntRange(1))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run directory (rerun to resume).")
@skip_bad_option
@device_option
def train_retriever(train_spec, index_dir, train_passage_encoder, new_index, hard_negatives, scale, lr, batch_size,
                    accumulation, steps, warmup, seed, val_fraction, eval_every, save_every, out, skip_bad,
                    device) -> None:
    """DPR training of the question (and optionally passage) encoder with in-batch + BM25 hard negatives."""
    from ragline.train.retriever import RetrieverTrainConfig, RetrieverTrainer

    cfg = RetrieverTrainConfig(train=train_spec, index=str(index_dir) if index_dir else None,
                               train_passage_encoder=train_passage_encoder,
                               new_index=str(new_index) if new_index else None, hard_negatives=hard_negatives,
                               scale=scale, lr=lr, batch_size=batch_size, accumulation=accumulation, steps=steps,
                               warmup=warmup, seed=seed, val_fraction=val_fraction, eval_every=eval_every,
                               save_every=save_every, device=device)
    result = RetrieverTrainer(cfg, Path(out), log=render.log, skip_bad=skip_bad).run_training()
    render.console.print(f"trained {result['steps']} steps (last loss {result['last_loss']:.4f}); encoders in "
                  f"{result['final']}; search with `ragline search --query-encoder {result['final']}/question_encoder`")


@cli.command()
@index_option
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="The training file to write (JSONL); rerun the same command to continue it.")
@click.option("--questions", default=1000, show_default=True, type=click.IntRange(1), help="Questions wanted.")
@click.option("--generator", default=vocab.DEFAULT_GENERATOR, show_default=True, help=GENERATOR_HELP)
@click.option("--seed", default=0, show_default=True, type=int, help="Which passages are sampled, in which order.")
@click.option("--filter", "filters", multiple=True, type=click.Choice(SYNTH_FILTERS),
              help="Keep a pair only if it passes this check (repeatable; default: all of them).")
@click.option("--roundtrip-k", default=SynthConfig.roundtrip_k, show_default=True, type=click.IntRange(1),
              help="The round trip keeps a question whose own search finds its passage in this top k.")
@click.option("--mode", type=click.Choice(vocab.MODES), default=None,
              help="The round trip's retrieval (default: dense, or the index's only mode).")
@click.option("--max-answer-words", default=SynthConfig.max_answer_words, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Passages whose questions are generated together.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON at the end.")
@device_option
@precision_option
def synth(index_dir, out, questions, generator, seed, filters, roundtrip_k, mode, max_answer_words, batch_size,
          as_json, device, precision) -> None:
    """Synthesise training questions with short answers from an index's passages (for `train rag` and
    `train retriever`), keeping only pairs that pass the filters."""
    from ragline.system import open as open_system
    from ragline.train.synth import Synthesiser, model_functions

    render.log(f"loading the generator {generator}")
    system = open_system(index_dir, generator, precision=precision, device=device, log=render.log,
                         follow=False)  # the file records the generation it was synthesised from
    retriever = system.retriever
    index = retriever.index
    mode = mode or (vocab.DEFAULT_MODE if vocab.DEFAULT_MODE in index.modes else index.modes[0])
    if mode not in index.modes:
        raise RaglineError(f"index {index.name} cannot search {mode}", f"use --mode {' or '.join(index.modes)}")
    cfg = SynthConfig(generator=generator, seed=seed, filters=tuple(dict.fromkeys(filters)) or SYNTH_FILTERS,
                      roundtrip_k=roundtrip_k, mode=mode, max_answer_words=max_answer_words, precision=precision)
    generate, search, answer = model_functions(system.generator, retriever, mode, cfg.max_new_tokens)
    runner = Synthesiser(cfg, Path(out), index.store, index.fingerprint, generate, search, answer,
                         alive=getattr(index, "alive", None), batch_size=batch_size)
    stats = runner.run(questions, log=render.log)
    if as_json:
        print(json.dumps({"out": str(out), **stats.to_dict()}, indent=2))
        return
    dropped = ", ".join(f"{k} {v}" for k, v in stats.dropped.items() if v) or "none"
    render.console.print(f"{stats.questions} questions in {out} from {stats.passages_tried} passages tried "
                         f"(dropped: {dropped}); train with `ragline train retriever --train {out}` or "
                         f"`ragline train rag --train {out}`", markup=False)


@train.command("fanoutqa-dev")
@click.argument("out", type=click.Path(path_type=Path))
def train_fanoutqa(out) -> None:
    """Write the FanOutQA dev split (top-level ids 0-7 only) as a JSONL training file."""
    from ragline.train.data import read_examples, write_examples

    examples = read_examples("fanoutqa-dev")
    write_examples(Path(out), examples)
    render.console.print(f"wrote {len(examples)} examples to {out}", markup=False)


@cli.command()
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True,
              help="A finished `ragline train rag` run with a BART/T5 generator and a DPR question encoder.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The Hugging Face RAG folder to write.")
def export(run_dir, out) -> None:
    """Write a trained run as a Hugging Face RAG checkpoint (RagSequenceForGeneration or RagTokenForGeneration,
    as the run trained) that transformers loads with from_pretrained."""
    from ragline.train.rag import export_run

    folder = export_run(Path(run_dir), Path(out), log=render.log)
    render.console.print(f"wrote {folder}; load it with transformers' Rag*ForGeneration.from_pretrained or "
                         f"`ragline ask --generator {folder}`", markup=False)
