"""Fault tests with real processes: ``kill -9`` at random moments of an index build (encoding, FAISS build and
tuning, BM25, manifest and rename), of a training run (checkpoint writes) and of an eval run (mid-batch).

After every kill what was there before still loads and is intact, and a rerun of the same command finishes
with the result of an uninterrupted run. The moments are random (seeded, so a failure can be replayed): each
kill waits a random time after the log line that opens a phase, within that phase's duration as measured on
an uninterrupted run."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl

pytestmark = pytest.mark.slow

QUESTIONS = ["Roman emperor architecture", "painter of the Mona Lisa", "ancient Greek temple columns"]
ARTIFACTS = Path(os.environ.get("RAGLINE_SCREENSHOTS", "test-artifacts"))  # what the runs saw, for the README
PHASES = ("encoding", "faiss", "bm25", "finish")  # the phase after each of these log lines
MARKS = {"corpus:": "encoding", "encoding passages: 100%": "faiss", "dense index": "bm25", "BM25 index": "finish"}


def _ragline(*args) -> list[str]:
    return [sys.executable, "-m", "ragline", *map(str, args)]


class Child:
    """A ragline command in its own process; its stderr lines with the time each arrived."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = ""
        while True:
            ch = self.proc.stderr.read(1)
            if not ch:
                break
            buf += ch
            if ch in "\n\r":  # tqdm rewrites its line with \r
                self.lines.append((time.monotonic(), buf.strip()))
                buf = ""

    def seen(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)

    def wait_for(self, *texts: str, timeout: float = 300) -> float | None:
        """When the first line holding one of ``texts`` arrived; None if the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = [t for t in map(self.seen, texts) if t is not None]
            if seen or self.proc.poll() is not None:
                seen = [t for t in map(self.seen, texts) if t is not None]
                return min(seen) if seen else None
            time.sleep(0.005)
        return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join(5)

    def finish(self, timeout: float = 600) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc


def _after(phase: str) -> tuple[str, ...]:
    """The log lines that open the phases after ``phase`` (the last one's: the build's final line)."""
    later = PHASES[PHASES.index(phase) + 1:]
    return (*(m for m, p in MARKS.items() if p in later), "index ready")


def _phase_windows(child: Child) -> dict[str, float]:
    """Seconds from each phase's opening log line to the next one, in an uninterrupted run."""
    times = {phase: child.seen(mark) for mark, phase in MARKS.items()}
    times["end"] = child.seen("index ready")
    order = [*PHASES, "end"]
    return {p: max(0.01, times[nxt] - times[p]) for p, nxt in zip(order, order[1:], strict=False)
            if times[p] is not None and times[nxt] is not None}


def _search(index_dir: Path):
    from ragline.retriever import Retriever

    r = Retriever(index_dir)
    return [r.retrieve(QUESTIONS, 5, mode) for mode in ("dense", "bm25", "hybrid")]


def test_index_builds_killed_at_random_moments(tmp_path, wiki_docs):
    from ragline.index.directory import IndexDir

    old_src = write_jsonl(tmp_path / "old.jsonl", wiki_docs[:30])
    new_src = write_jsonl(tmp_path / "new.jsonl", wiki_docs[:80])
    common = ["--index-type", "hnsw", "--chunk-rows", "16", "--batch-size", "16"]
    # each index in a folder of its own: a build reuses the embeddings of a finished sibling of the same corpus
    # the old index first: it loads the encoder from a cold disk, so the reference run's windows are warm ones
    saved_old = tmp_path / "saved" / "old"
    assert Child(_ragline("index", "--source", old_src, "--out", saved_old, *common)).finish() == 0
    reference = tmp_path / "ref" / "reference"
    ref = Child(_ragline("index", "--source", new_src, "--out", reference, *common))
    assert ref.finish() == 0, ref.lines
    windows = _phase_windows(ref)
    assert set(windows) >= {"encoding", "bm25", "finish"}, windows
    out = tmp_path / "live" / "index"
    shutil.copytree(saved_old, out)
    old_fp = IndexDir.open(out).fingerprint
    new_fp = IndexDir.open(reference).fingerprint

    rng = random.Random(13)
    landed: dict[str, int] = {}
    kills = attempts = 0
    building = out.parent / f".{out.name}.building"
    while kills < 20 and attempts < 100:
        attempts += 1
        phase = PHASES[kills % len(PHASES)]
        if phase not in windows:
            phase = "encoding"
        if rng.random() < 0.5:  # half the attempts resume the killed build, half start it over
            shutil.rmtree(building, ignore_errors=True)
        mark = next(m for m, p in MARKS.items() if p == phase)
        child = Child(_ragline("index", "--source", new_src, "--out", out, "--force", *common))
        if child.wait_for(mark) is None:  # a resumed build that had passed this phase ran to the end
            assert child.finish() == 0
        else:  # a random moment of the phase; a phase that runs shorter than measured ends the wait early
            child.wait_for(*_after(phase), timeout=rng.uniform(0, windows[phase]))
            child.kill()
        if child.seen("index ready"):  # the new index is in place: put the old one back for the next attempt
            assert IndexDir.open(out).fingerprint == new_fp
            shutil.rmtree(out)
            shutil.copytree(saved_old, out)
            continue
        kills += 1
        reached = [p for m, p in MARKS.items() if child.seen(m) is not None]
        landed[reached[-1]] = landed.get(reached[-1], 0) + 1
        ix = IndexDir.open(out)  # the index in place loads, whole: the old one, or the new one once renamed
        assert ix.fingerprint in (old_fp, new_fp) and len(ix) == ix.manifest["corpus"]["passages"]
        assert ix.embeddings.shape == (len(ix), ix.manifest["encoder"]["dim"]) and ix.dense.ntotal == len(ix)
    assert kills >= 20, (kills, attempts, landed)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "faults-index.json").write_text(json.dumps({"kills": kills, "attempts": attempts, "phases": landed}))
    assert len(landed) >= 3, landed  # kills fell in several phases

    assert Child(_ragline("index", "--source", new_src, "--out", out, "--force", *common)).finish() == 0
    assert IndexDir.open(out).fingerprint == new_fp
    assert np.array_equal(np.load(out / "embeddings.npy"), np.load(reference / "embeddings.npy"))
    for a, b in zip(_search(out), _search(reference), strict=True):
        assert np.array_equal(a.rows, b.rows) and np.allclose(a.scores, b.scores)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from ragline.models.tiny import save_tiny_causal

    return save_tiny_causal(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def test_training_killed_during_checkpoint_writes(tmp_path, small_index, tiny_folder, wiki_docs):
    import torch

    from ragline.train.run import RunDir

    data = write_jsonl(tmp_path / "train.jsonl", [
        {"id": f"t{i}", "question": f"What is {d['title']}?", "answers": [d["title"]], "positive": [d["title"]]}
        for i, d in enumerate(wiki_docs[:12])])
    cmd = ["train", "rag", "--train", data, "--index", small_index, "--generator", tiny_folder, "-k", 2,
           "--steps", 8, "--batch-size", 2, "--warmup", 1, "--save-every", 1, "--eval-every", 4, "--val-limit", 2]
    ref = Child(_ragline(*cmd, "--out", tmp_path / "reference"))
    assert ref.finish() == 0, ref.lines[-5:]
    run = tmp_path / "run"
    rng = random.Random(5)
    for _ in range(4):
        child = Child(_ragline(*cmd, "--out", run))
        child.wait_for("training on", "resuming")
        time.sleep(rng.uniform(0.5, 3.0))  # checkpoints are written every step: kills land in and between writes
        child.kill()
        state = RunDir(run).load(_identity(run))  # whatever checkpoint is there loads whole, or there is none yet
        assert state is None or 0 < state["step"] <= 8
        assert not list((run / "checkpoints").glob("step-*.pt.tmp*"))
    last = Child(_ragline(*cmd, "--out", run))
    assert last.finish() == 0, last.lines[-8:]
    a = torch.load(run / "checkpoints" / "step-0000008.pt", weights_only=True)
    b = torch.load(tmp_path / "reference" / "checkpoints" / "step-0000008.pt", weights_only=True)
    for part, weights in b["weights"].items():
        for k, v in weights.items():
            assert torch.allclose(a["weights"][part][k], v, atol=1e-6), (part, k)


def _identity(run: Path) -> dict:
    """The identity the run's checkpoints carry (read from the newest one, as the trainer would check it)."""
    import torch

    from ragline.train.run import RunDir

    latest = RunDir(run).latest()
    return torch.load(latest, weights_only=True)["identity"] if latest else {}


def test_eval_killed_mid_batch(tmp_path, small_index, tiny_folder):
    cmd = ["eval", "--index", small_index, "--task", "fanoutqa-dev", "--limit", 16, "--batch", 2, "--model",
           "rag-sequence", "--generator", tiny_folder, "-k", 2, "--max-new-tokens", 8]
    ref = Child(_ragline(*cmd, "--out", tmp_path / "reference"))
    assert ref.finish() == 0
    want = {r["id"]: r["output"][0]["answer"] for r in map(json.loads, (tmp_path / "reference" / "predictions.jsonl")
                                                             .read_text().splitlines())}
    run = tmp_path / "run"
    rng = random.Random(7)
    for _ in range(4):
        child = Child(_ragline(*cmd, "--out", run))
        child.wait_for("questions")
        time.sleep(rng.uniform(0.2, 2.0))
        child.kill()
        preds = run / "predictions.jsonl"
        if preds.exists():
            lines = preds.read_bytes().split(b"\n")
            for line in lines[:-1]:  # every complete line is a whole prediction, and a right one
                rec = json.loads(line)
                assert rec["output"][0]["answer"] == want[rec["id"]]
    assert Child(_ragline(*cmd, "--out", run)).finish() == 0
    got = {r["id"]: r["output"][0]["answer"] for r in map(json.loads, (run / "predictions.jsonl")
                                                          .read_text().splitlines())}
    assert got == want
