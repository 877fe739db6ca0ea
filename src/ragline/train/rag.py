"""``ragline train rag``: end-to-end RAG fine-tuning, as in the paper.

Minimises the marginal negative log-likelihood  -log p(y|x)  (RAG-Sequence or RAG-Token,
:mod:`ragline.rag.marginal`) of each example's first gold answer, with no supervision of which passage is
relevant; or, with ``--model fid``, Fusion-in-Decoder's -log p(y | x, z_1..z_K) plus FiD-Distill's pull of the
prior towards the reader's cross-attention (:mod:`ragline.rag.fid`). The passage encoder and the index stay
frozen: the top-k passages are searched with the current question encoder, and p_eta(z|x) =
softmax(s · q(x)·d(z)) is recomputed from the stored d(z), so the gradient reaches the question encoder through
the prior and the generator through p_theta(y|x,z).

Trained parts: the generator fully, through LoRA adapters (peft), or not at all; the question encoder or not.
AdamW (one learning rate per part), linear warm-up then linear decay, gradient accumulation, gradient clipping
(global norm), a seed, fp32 or bf16 autocast. Models run without dropout (eval mode), so a step is a
deterministic function of the weights and the batch, and a resumed run equals an uninterrupted one.
The batch of step s is fixed by the seed and s alone (a per-epoch permutation), never by what ran before.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ragline import vocab
from ragline.errors import RaglineError
from ragline.models import device as devices
from ragline.models import precision as precisions
from ragline.models.checkpointing import checkpointed_layers
from ragline.models.encoders import Encoder
from ragline.models.generator import Generator
from ragline.runconfig import load_trained
from ragline.train.data import Example, read_examples, split_validation
from ragline.train.loop import LoopConfig, Trainer
from ragline.train.run import RunDir, seed_everything

GENERATOR_TRAINING = ("full", "lora", "frozen")


TRAINING_MODE = vocab.DENSE  # p_eta(z|x) needs q(x)·d(z) of the passages trained on
RESULT_NEUTRAL = ("device", "activation_checkpointing")  # settings a run's results do not depend on


@dataclass
class RagTrainConfig(LoopConfig):
    """The settings of a `ragline train rag` run (the shared loop's settings included)."""

    generator: str = vocab.TRAINING_GENERATOR  # bundled name, causal or seq2seq folder, or RAG checkpoint
    model: str = vocab.DEFAULT_MODEL    # one of vocab.TRAINABLE_MODELS
    k: int | None = None                # default: a RAG checkpoint's n_docs, else vocab.DEFAULT_K
    generator_training: str = "full"    # full | lora | frozen
    lora_r: int = 8
    lora_alpha: int = 16
    train_question_encoder: bool = True
    lr: float = 3e-5                    # generator
    question_encoder_lr: float = 1e-5
    precision: str = "fp32"             # fp32 | bf16 (autocast, where the CPU has bf16 instructions)
    activation_checkpointing: bool = False  # recompute the generator's layer activations in backward (less memory)
    label_smoothing: float = 0.0
    prior_scale: float | None = None    # default: the index's (index/manifest.py: prior_scale)
    device: str = vocab.DEFAULT_DEVICE  # auto | cpu | cuda (models/device.py)


def check_config(cfg: RagTrainConfig) -> None:
    if cfg.model not in vocab.TRAINABLE_MODELS:
        raise RaglineError(f"cannot train model {cfg.model!r}", f"use --model {' or '.join(vocab.TRAINABLE_MODELS)}")
    if cfg.generator_training not in GENERATOR_TRAINING:
        raise RaglineError(f"unknown generator training {cfg.generator_training!r}",
                           f"use one of {', '.join(GENERATOR_TRAINING)}")
    if cfg.generator_training == "frozen" and not cfg.train_question_encoder:
        raise RaglineError("nothing to train: generator frozen and question encoder frozen",
                           "train the generator (--generator-training full|lora) or the question encoder")
    cfg.check()
    if cfg.k is not None and cfg.k < 1:
        raise RaglineError("k must be at least 1", "pass a positive -k")
    if cfg.precision not in ("fp32", "bf16"):
        raise RaglineError(f"unknown precision {cfg.precision!r}", "use --precision fp32 or bf16")
    if cfg.precision == vocab.BF16:
        native, why = precisions.native(vocab.BF16, devices.resolve(cfg.device))  # the one bf16 check
        if not native:
            raise RaglineError(why, "use --precision fp32")


def _apply_generator_training(gen: Generator, cfg: RagTrainConfig) -> None:
    if cfg.generator_training == "lora":
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in gen.model.named_modules()}
        targets = [t for t in ("q_proj", "k_proj", "v_proj", "o_proj") if t in names] or \
                  [t for t in ("query", "key", "value", "c_attn") if t in names]
        if not targets:
            raise RaglineError(f"no attention projections found in {gen.name} for LoRA",
                               "use --generator-training full or frozen")
        with warnings.catch_warnings():  # peft reads transformers' deprecated name; nothing ragline can rename
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            gen.model = get_peft_model(gen.model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                             lora_dropout=0.0, target_modules=targets))
    for name, p in gen.model.named_parameters():
        p.requires_grad_(cfg.generator_training == "full" or (cfg.generator_training == "lora" and "lora_" in name))
    gen.model.eval()


class RagTrainer(Trainer):
    """One training run: ``run_training()`` trains (or resumes) to ``cfg.steps`` and exports the models."""

    def __init__(self, cfg: RagTrainConfig, out: Path, generator: Generator | None = None,
                 question_encoder: Encoder | None = None, progress: bool = True,
                 log: Callable[[str], None] = print, skip_bad: bool = False) -> None:
        from ragline import paths
        from ragline.index import manifest as mf
        from ragline.index.registry import open_index
        from ragline.models.loading import generator_defaults, load_generator
        from ragline.rag.model import RagModel
        from ragline.retriever import Retriever, open_retriever

        check_config(cfg)
        self.progress, self.log = progress, log
        index = open_index(cfg.index or paths.default_index_dir())
        # the defaults that depend on the generator and the index, settled so that the run records them
        cfg = replace(cfg, k=cfg.k or (generator_defaults(cfg.generator).get("k") if generator is None else None)
                      or vocab.DEFAULT_K,
                      prior_scale=mf.prior_scale(index.manifest) if cfg.prior_scale is None else cfg.prior_scale)
        self.cfg = cfg
        self.examples = read_examples(cfg.train, skip_bad)
        self.train_set, self.val_set = split_validation(self.examples, cfg.val_fraction)
        self.val_set = self.val_set[: cfg.val_limit]
        self.run = RunDir(out)
        # a run may resume elsewhere, and with or without checkpointing (neither changes a step's result)
        self.run.prepare({k: v for k, v in asdict(cfg).items() if k not in RESULT_NEUTRAL})
        seed_everything(cfg.seed)
        loaded = load_generator(cfg.generator, device=cfg.device) if generator is None else None
        checkpoint_encoder = loaded.question_encoder if loaded is not None else None
        retriever = Retriever(index, question_encoder, follow=False) if question_encoder is not None else \
            open_retriever(index, None, checkpoint_encoder, log=log, device=cfg.device, follow=False)
        if retriever.encoder is None:
            raise RaglineError(f"index {retriever.index.name} has no dense part",
                               "RAG training needs p(z|x) from passage embeddings: use a dense or hybrid index")
        self.passage_fingerprint = retriever.index.manifest["encoder"]["passage"]["fingerprint"]
        gen = generator or loaded.generator
        if cfg.model == vocab.FID:
            from ragline.rag.fid import FusedReader

            FusedReader(gen, cfg.k)  # refuses a decoder-only generator before any training
        _apply_generator_training(gen, cfg)
        enc = retriever.encoder
        enc.model.eval()
        for p in enc.model.parameters():
            p.requires_grad_(cfg.train_question_encoder)
        self.rag = RagModel(retriever, gen, k=cfg.k, mode=TRAINING_MODE, prior_scale=cfg.prior_scale)
        self.gen, self.enc = gen, enc
        self.parts = {"generator": (gen.model, cfg.lr), "question_encoder": (enc.model, cfg.question_encoder_lr)}
        self.setup_optimiser({"generator": gen.name, "generator_training": cfg.generator_training,
                              "question_encoder": enc.name, "train_question_encoder": cfg.train_question_encoder,
                              "trainable": self.trainable_signature()})

    def loss(self, batch: list[Example], grad: bool) -> torch.Tensor:
        """Mean marginal NLL of the batch's first gold answers."""
        device_type = self.gen.device.type
        ctx = torch.autocast(device_type, dtype=torch.bfloat16) if self.cfg.precision == "bf16" else nullcontext()
        with ctx, torch.set_grad_enabled(grad), checkpointed_layers(self.gen.model,
                                                                   grad and self.cfg.activation_checkpointing):
            ll = self.rag.likelihood([e.question for e in batch], [e.answer for e in batch], model=self.cfg.model,
                                     k=self.cfg.k, eps=self.cfg.label_smoothing)
        return ll.loss.float().mean()

    def validate(self) -> dict[str, float]:
        """Marginal NLL on the held-back examples."""
        if not self.val_set:
            return {}
        total = 0.0
        for lo in range(0, len(self.val_set), self.cfg.batch_size):
            batch = self.val_set[lo : lo + self.cfg.batch_size]
            total += float(self.loss(batch, grad=False)) * len(batch)
        return {"loss": total / len(self.val_set)}

    def export(self) -> Path:
        """RUN/final: the generator (LoRA merged) and the question encoder, as model folders, and run.json
        naming them."""
        def fill(tmp: Path) -> dict:
            model = self.gen.model
            if self.cfg.generator_training == "lora":
                model = copy.deepcopy(model).merge_and_unload()
            self.gen.save(tmp / "generator", model)
            if self.cfg.train_question_encoder:
                self.enc.save(tmp / "question_encoder", paired_with=self.passage_fingerprint)
            return {"generator": "generator", "model": self.cfg.model, "k": self.cfg.k,
                    "prior_scale": self.cfg.prior_scale, "index": self.cfg.index, "mode": TRAINING_MODE,
                    "question_encoder": "question_encoder" if self.cfg.train_question_encoder else None}
        return self.run.write_final(fill)


def export_run(run: Path, out: Path, log: Callable[[str], None] = print) -> Path:
    """``ragline export``: the finished run ``run`` (a seq2seq generator and a DPR question encoder, trained or
    the index's own) as a Hugging Face RAG folder at ``out``."""
    from ragline import paths
    from ragline.index.registry import open_index
    from ragline.models.encoders import load_encoder
    from ragline.models.loading import SEQ2SEQ, generator_kind, load_generator
    from ragline.models.rag_checkpoint import export_checkpoint

    info = load_trained(run)
    if generator_kind(str(info["generator"])) != SEQ2SEQ:
        raise RaglineError(f"run {run} trained a decoder-only generator; a Hugging Face RAG checkpoint holds a BART "
                           "or T5 generator", "train with `ragline train rag --generator BART_OR_T5_FOLDER`")
    if info.get("question_encoder"):
        encoder = load_encoder(str(info["question_encoder"]))
    else:  # the question encoder was frozen: the index's own
        question = open_index(info.get("index") or paths.default_index_dir()).manifest["encoder"]["question"]
        encoder = load_encoder(question["source"], question["max_seq_length"])
    generator = load_generator(str(info["generator"])).generator
    folder = export_checkpoint(out, encoder, generator, info["model"], int(info["k"]))
    log(f"exported {info['model']} with n_docs={info['k']} from {run}")
    return folder
