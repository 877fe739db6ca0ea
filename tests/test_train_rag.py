"""RAG fine-tuning on a real slice of the bundled corpus with a tiny generator built here (the question
encoder is the real MiniLM of the small index)."""

import hashlib
import json
from dataclasses import replace

import pytest
import torch
from conftest import tiny_generator, write_jsonl

from ragline.errors import RaglineError
from ragline.models.encoders import weights_fingerprint
from ragline.train.rag import RagTrainConfig, RagTrainer, load_trained


@pytest.fixture(scope="module")
def train_file(tmp_path_factory, wiki_docs):
    recs = [{"id": f"t{i}", "question": f"What is {d['title']}?", "answers": [" ".join(d["text"].split()[:3])],
             "positive": [d["title"]]} for i, d in enumerate(wiki_docs[:16])]
    return write_jsonl(tmp_path_factory.mktemp("train") / "slice.jsonl", recs)


def _cfg(train_file, small_index, **kw):
    base = dict(train=str(train_file), index=str(small_index), k=2, batch_size=4, steps=6, warmup=1, lr=3e-3,
                question_encoder_lr=1e-4, eval_every=3, save_every=3, val_fraction=0.2, seed=3)
    return RagTrainConfig(**{**base, **kw})


def _trainer(cfg, out, **kw):
    return RagTrainer(cfg, out, generator=tiny_generator(), progress=False, log=lambda m: None, **kw)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_training_lowers_the_loss_moves_the_question_encoder_not_the_passages(tmp_path, train_file, small_index):
    emb_before = _sha(small_index / "embeddings.npy")
    tr = _trainer(_cfg(train_file, small_index, steps=24, eval_every=8, save_every=12, lr=1e-2), tmp_path / "run")
    enc_before = weights_fingerprint(tr.enc.model)
    tr.run_training()
    rows = tr.run.read_metrics()
    train = [r["value"] for r in rows if r["split"] == "train" and r["name"] == "loss"]
    val = [r["value"] for r in rows if r["split"] == "validation" and r["name"] == "loss"]
    assert len(train) == 24 and len(val) == 4  # step 0, 8, 16, 24
    assert sum(train[-4:]) / 4 < 0.7 * sum(train[:4]) / 4, train
    assert weights_fingerprint(tr.enc.model) != enc_before
    assert _sha(small_index / "embeddings.npy") == emb_before
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # the trained models load back by path: generator folder and a question encoder paired with the index
    from ragline.models.encoders import TextEncoder
    from ragline.models.generators import CausalGenerator
    from ragline.retriever import Retriever

    info = load_trained(tmp_path / "run")
    enc = TextEncoder(str(info["question_encoder"]))
    assert enc.fingerprint == weights_fingerprint(tr.enc.model)
    Retriever(small_index, enc)  # accepted: paired with the index's passage encoder
    gen = CausalGenerator.load(str(info["generator"]))
    assert weights_fingerprint(gen.model) == weights_fingerprint(tr.gen.model)


def test_resume_equals_an_uninterrupted_run(tmp_path, train_file, small_index):
    cfg = _cfg(train_file, small_index)
    whole = _trainer(cfg, tmp_path / "whole")
    whole.run_training()

    broken = _trainer(cfg, tmp_path / "broken")
    log = broken.run.log

    def crash_at_step_5(rows):
        log(rows)
        if rows[0][0] == 5:
            raise KeyboardInterrupt  # after the step-3 checkpoint, before the step-6 one
    broken.run.log = crash_at_step_5
    with pytest.raises(KeyboardInterrupt):
        broken.run_training()
    assert json.loads((tmp_path / "broken" / "config.json").read_text())["steps"] == 6
    assert (tmp_path / "broken" / "checkpoints" / "latest").read_text() == "step-0000003.pt"

    # fresh models: everything comes from the checkpoint; resumed with activation checkpointing, which changes
    # neither the run's settings nor its results
    resumed = _trainer(replace(cfg, activation_checkpointing=True), tmp_path / "broken")
    resumed.run_training()
    for a, b in zip(whole.params, resumed.params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    def losses(t):
        return [(r["step"], r["split"], round(r["value"], 5)) for r in t.run.read_metrics() if r["name"] == "loss"]
    assert losses(whole) == losses(resumed)


def test_lora_trains_adapters_only_and_exports_merged(tmp_path, train_file, small_index):
    tr = _trainer(_cfg(train_file, small_index, generator_training="lora", lora_r=4, steps=3,
                       train_question_encoder=False), tmp_path / "lora")
    base = {n: p.detach().clone() for n, p in tr.gen.model.named_parameters() if "lora_" not in n}
    enc_before = weights_fingerprint(tr.enc.model)
    tr.run_training()
    assert all(torch.equal(p, base[n]) for n, p in tr.gen.model.named_parameters() if "lora_" not in n)
    lora_b = [p for n, p in tr.gen.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it moved
    assert weights_fingerprint(tr.enc.model) == enc_before
    info = load_trained(tmp_path / "lora")
    assert info["question_encoder"] is None and (info["generator"] / "config.json").is_file()


def test_bad_training_input(tmp_path, train_file, small_index):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(RaglineError, match="is empty"):
        _trainer(_cfg(empty, small_index), tmp_path / "a")
    no_answers = write_jsonl(tmp_path / "noans.jsonl", [{"question": "q?", "answers": ["x"]}, {"question": "p?"}])
    with pytest.raises(RaglineError, match=r"noans.jsonl:2: no gold answer"):
        _trainer(_cfg(no_answers, small_index), tmp_path / "b")
    with pytest.raises(RaglineError, match="held-out half"):
        _trainer(_cfg("fanoutqa-heldout", small_index), tmp_path / "c")

    # a checkpoint of another training setup (LoRA) in a full-training run is refused
    lora = _trainer(_cfg(train_file, small_index, generator_training="lora", steps=3), tmp_path / "lora")
    lora.run_training()
    full = _trainer(_cfg(train_file, small_index, steps=3), tmp_path / "full")
    (full.run.ckpt_dir / "step-0000003.pt").write_bytes((lora.run.ckpt_dir / "step-0000003.pt").read_bytes())
    (full.run.ckpt_dir / "latest").write_text("step-0000003.pt")
    with pytest.raises(RaglineError, match="belongs to another model or training setup"):
        full.run_training()


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, train_file, small_index, monkeypatch):
    import errno

    from ragline import atomic

    tr = _trainer(_cfg(train_file, small_index), tmp_path / "run")
    real = atomic.write_bytes

    def full_disk(path, data):
        if path.name == "step-0000006.pt":
            tmp = path.with_name(f".{path.name}.tmp-1")
            tmp.write_bytes(data[: len(data) // 2])  # half written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)
    monkeypatch.setattr(atomic, "write_bytes", full_disk)
    with pytest.raises(RaglineError, match=r"disk is full.*step-0000003.pt is intact"):
        tr.run_training()
    ckpts = sorted(p.name for p in tr.run.ckpt_dir.iterdir())
    assert ckpts == ["latest", "step-0000003.pt"]  # no half-written file left behind
    monkeypatch.setattr(atomic, "write_bytes", real)
    resumed = _trainer(_cfg(train_file, small_index), tmp_path / "run")
    assert resumed.run.load(resumed.identity)["step"] == 3


def test_bf16_autocast_trains_where_the_cpu_has_bf16(tmp_path, train_file, small_index):
    from ragline.models.precision import native

    cfg = _cfg(train_file, small_index, steps=2, precision="bf16")
    if not native("bf16", torch.device("cpu"))[0]:
        with pytest.raises(RaglineError, match="no bf16 instructions"):
            _trainer(cfg, tmp_path / "run")
        pytest.skip("this CPU has no bf16 instructions: checked that bf16 is refused with a message instead")
    tr = _trainer(cfg, tmp_path / "run")
    before = [p.detach().clone() for p in tr.params]
    tr.run_training()
    losses = [r["value"] for r in tr.run.read_metrics() if r["split"] == "train" and r["name"] == "loss"]
    assert len(losses) == 2 and all(0 < v < float("inf") for v in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.params, strict=True))
