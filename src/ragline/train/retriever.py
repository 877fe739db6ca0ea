"""``ragline train retriever``: dense retriever (DPR) training with in-batch and BM25 hard negatives.

From (question, positive page title or passage id) pairs. For a batch of B questions with positive passages
p_1..p_B and h BM25 hard negatives each (top BM25 passages of the question from no positive page):

    loss = mean_i  -log softmax_j( s · q(x_i)·d(z_j) )[i]     over the B(1 + h) passages of the batch

(a passage equal to another question's positive is masked out of that question's row). ``s`` is the
score scale (20 for unit-normalised encoders such as MiniLM). The positive passage of a page is its
passage with the highest BM25 score for the question. With the passage encoder frozen, d(z) is read from
the index's stored embeddings and the trained question encoder is paired with the index as it is; with
the passage encoder trained too, the corpus is re-encoded into a new index directory when training ends
(``Retriever.swap(new_index, question_encoder)`` hot-swaps a running retriever to it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ragline import atomic, vocab
from ragline.errors import RaglineError
from ragline.index import manifest as mf
from ragline.index.protocol import Index, all_embeddings
from ragline.index.registry import open_index
from ragline.models.encoders import Encoder, load_encoder
from ragline.train.data import Example, read_examples, split_validation
from ragline.train.loop import LoopConfig, Trainer
from ragline.train.run import RunDir, seed_everything


@dataclass
class RetrieverTrainConfig(LoopConfig):
    """The settings of a `ragline train retriever` run (the shared loop's settings included)."""

    batch_size: int = 16
    val_limit: int | None = 256
    train_passage_encoder: bool = False
    hard_negatives: int = 1
    scale: float | None = None         # s in softmax(s q·d), as p_eta(z|x) is scaled (default: the index's)
    lr: float = 2e-5
    new_index: str | None = None       # with a trained passage encoder: where the re-encoded index goes
    device: str = vocab.DEFAULT_DEVICE  # auto | cpu | cuda (models/device.py)


@dataclass(frozen=True)
class Pair:
    """A training question with its positive passage and hard negatives, as store rows."""

    id: str
    question: str
    positive: int                      # store row of the positive passage
    pages: tuple[str, ...]             # the positive pages (negatives come from none of them)
    negatives: tuple[int, ...]         # BM25 hard negatives


def resolve_pairs(examples: list[Example], index: Index, hard_negatives: int) -> tuple[list[Pair], int]:
    """Pairs of the examples whose positive (page title or passage id) is in ``index``; and how many had none."""
    if index.bm25 is None and hard_negatives:
        raise RaglineError(f"index {index.name} has no BM25 part for hard negatives",
                           "use an index with BM25, or --hard-negatives 0")
    titles = index.store.values("title")
    pids = {pid: row for row, pid in enumerate(index.store.values("pid"))}
    rows_of: dict[str, list[int]] = {}
    for row, t in enumerate(titles):
        rows_of.setdefault(t, []).append(row)
    pairs, missing = [], 0
    depth = min(len(titles), 50)
    for e in examples:
        cands = [pids[p] for p in e.positives if p in pids] + [r for p in e.positives for r in rows_of.get(p, [])]
        if not cands:
            missing += 1
            continue
        pages = tuple(dict.fromkeys(titles[r] for r in cands))
        ranked: list[int] = []
        if index.bm25 is not None:
            _, rows = index.bm25.search([e.question], depth)
            ranked = [int(r) for r in rows[0] if r >= 0]
        positive = next((r for r in ranked if r in cands), cands[0])
        negatives = tuple(r for r in ranked if titles[r] not in pages)[:hard_negatives]
        pairs.append(Pair(e.id, e.question, positive, pages, negatives))
    return pairs, missing


def recall_at(encoder: Encoder, index: Index, pairs: list[Pair], ks: tuple[int, ...] = vocab.RETRIEVAL_KS,
              passage_vectors: np.ndarray | None = None) -> dict[str, float]:
    """Page-level recall@k of the pairs' positive pages by exact search with ``encoder`` over the index's
    passage vectors (or ``passage_vectors``)."""
    if not pairs:
        return {}
    emb = all_embeddings(index) if passage_vectors is None else np.asarray(passage_vectors, dtype=np.float32)
    q = encoder.encode([p.question for p in pairs])
    top = np.argsort(-(q @ emb.T), axis=1)[:, : max(ks)]
    titles = index.store.values("title")
    out = {}
    for k in ks:
        found = [any(titles[r] in p.pages for r in top[i, :k]) for i, p in enumerate(pairs)]
        out[f"recall@{k}"] = float(np.mean(found))
    return out


class RetrieverTrainer(Trainer):
    """One DPR training run: ``run_training()`` trains (or resumes) to ``cfg.steps`` and exports the encoders."""

    def __init__(self, cfg: RetrieverTrainConfig, out: Path, progress: bool = True,
                 log: Callable[[str], None] = print, skip_bad: bool = False) -> None:
        from ragline import paths

        cfg.check()
        if cfg.batch_size < 2 and cfg.hard_negatives < 1:
            raise RaglineError("a batch of 1 without hard negatives has no negative passage",
                               "use --batch-size 2 or more, or --hard-negatives 1 or more")
        self.progress, self.log = progress, log
        self.index = open_index(cfg.index or paths.default_index_dir())
        if self.index.embeddings is None:
            raise RaglineError(f"index {self.index.name} has no dense part", "train against a dense or hybrid index")
        if cfg.scale is None:  # the index's prior scale: 1 for DPR's inner products (DPR's own loss), 20 for cosines
            cfg = replace(cfg, scale=mf.prior_scale(self.index.manifest))
        self.cfg = cfg
        examples = read_examples(cfg.train, skip_bad)
        pairs, missing = resolve_pairs(examples, self.index, cfg.hard_negatives)
        if not pairs:
            raise RaglineError(f"no training example has a positive page or passage in index {self.index.name}",
                               'give "positive" page titles (or passage ids) of this corpus')
        if missing:
            log(f"{missing} of {len(examples)} examples have no positive in index {self.index.name}; left out")
        by_id = {p.id: p for p in pairs}
        train_ex, val_ex = split_validation([e for e in examples if e.id in by_id], cfg.val_fraction)
        self.train_set = [by_id[e.id] for e in train_ex]
        self.val_set = [by_id[e.id] for e in val_ex][: cfg.val_limit]
        self.run = RunDir(out)
        self.run.prepare({k: v for k, v in asdict(cfg).items() if k != "device"})  # a run may resume elsewhere
        seed_everything(cfg.seed)
        enc_info = self.index.manifest["encoder"]
        self.passage_fingerprint = enc_info["passage"]["fingerprint"]
        self.question = load_encoder(enc_info["question"].get("source") or enc_info["question"]["name"],
                                     max_seq_length=enc_info["question"]["max_seq_length"], device=cfg.device)
        self.question.model.eval()
        self.parts = {"question_encoder": (self.question.model, cfg.lr)}
        self.passage: Encoder | None = None
        if cfg.train_passage_encoder:
            self.passage = load_encoder(enc_info["passage"].get("source") or enc_info["passage"]["name"],
                                        max_seq_length=enc_info["passage"]["max_seq_length"], device=cfg.device)
            self.passage.model.eval()
            self.parts["passage_encoder"] = (self.passage.model, cfg.lr)
        self.setup_optimiser({"question_encoder": self.question.name, "index": self.index.fingerprint,
                              "train_passage_encoder": cfg.train_passage_encoder,
                              "trainable": self.trainable_signature()})

    def _passage_vectors(self, rows: list[int], grad: bool) -> torch.Tensor:
        if self.passage is None:
            return torch.from_numpy(np.asarray(self.index.embeddings[np.array(rows)], dtype=np.float32))
        passages = self.index.store.get(rows)
        with torch.set_grad_enabled(grad):
            return self.passage.embed_passages([p.title for p in passages], [p.text for p in passages])

    def loss(self, batch: list[Pair], grad: bool) -> torch.Tensor:
        rows = [p.positive for p in batch] + [r for p in batch for r in p.negatives]
        with torch.set_grad_enabled(grad):
            q = self.question.embed([p.question for p in batch])  # (B, d)
            d = self._passage_vectors(rows, grad).to(q.device)  # (B(1+h), d)
            scores = self.cfg.scale * q @ d.T  # (B, B(1+h))
            rows_t = torch.tensor(rows, device=q.device)
            pos = rows_t[: len(batch)]
            clash = (rows_t[None, :] == pos[:, None])  # another copy of question i's positive passage
            diagonal = torch.arange(len(batch), device=q.device)
            clash[diagonal, diagonal] = False
            scores = scores.masked_fill(clash, float("-inf"))
            return torch.nn.functional.cross_entropy(scores, diagonal)

    def validate(self) -> dict[str, float]:
        """recall@k of the held-back pairs (with a trained passage encoder: over the stored vectors, which
        the new encoder replaces only at export) and their loss."""
        if not self.val_set:
            return {}
        out = recall_at(self.question, self.index, self.val_set) if self.passage is None else {}
        losses = [float(self.loss(self.val_set[lo : lo + self.cfg.batch_size], grad=False))
                  for lo in range(0, len(self.val_set), self.cfg.batch_size)
                  if len(self.val_set[lo : lo + self.cfg.batch_size]) > 1 or self.cfg.hard_negatives]
        if losses:
            out["loss"] = sum(losses) / len(losses)
        return out

    def export(self) -> Path:
        """RUN/final/question_encoder (paired with the passage encoder it searches against), and with a
        trained passage encoder RUN/final/passage_encoder plus a re-encoded index (``new_index``, default
        RUN/index)."""
        from ragline.index.build import BuildOptions, build_index
        from ragline.models.encoders import BiEncoder

        info: dict = {"question_encoder": "question_encoder", "index": str(self.index.path)}

        def fill(tmp: Path) -> dict:
            paired = self.passage_fingerprint
            if self.passage is not None:
                self.passage.save(tmp / "passage_encoder")
                paired = load_encoder(str(tmp / "passage_encoder")).fingerprint  # as the new index will record it
                info["passage_encoder"] = "passage_encoder"
            self.question.save(tmp / "question_encoder", paired_with=paired)
            return info

        final = self.run.write_final(fill)
        if self.passage is not None:
            m = self.index.manifest
            new = Path(self.cfg.new_index) if self.cfg.new_index else self.run.path / "index"
            opts = BuildOptions(source=m["corpus"]["source"], out=new, fmt=m["corpus"]["format"],
                                encoder=str(final / "passage_encoder"),
                                question_encoder=str(final / "question_encoder"),
                                passage_words=m["corpus"]["passage_words"], limit=m["corpus"]["limit"],
                                index_type=(m.get("dense") or {}).get("type", "flat"), force=True,
                                progress=self.progress)
            encoders = BiEncoder(load_encoder(str(final / "question_encoder")),
                                 load_encoder(str(final / "passage_encoder")))
            build_index(opts, encoders=encoders, log=self.log)
            info["new_index"] = str(new)
            atomic.write_json(final / "run.json", info)
        return final
