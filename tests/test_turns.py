"""Batches taking turns on the model step by step (serve/turns.py, serve/worker.py): model calls never overlap,
a batch that arrives while another decodes does not wait for the whole of it, and answers do not change."""

import threading
import time

import pytest
from conftest import serve_settings as _settings
from conftest import tiny_generator

from ragline import yielding
from ragline.serve.budget import Budget
from ragline.serve.turns import Turns


def _wait_in_line(turns: Turns) -> None:
    """Return once a thread waits for ``turns`` (at most 10 s)."""
    deadline = time.monotonic() + 10
    while turns.waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.001)


class StepClock:
    """A clock for Turns that moves one unit per model step the test takes, whatever the threads' timing."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _stepping(turns: Turns, clock: StepClock, log: list[str], inside: list[int], name: str, steps: int,
              before: dict[int, threading.Event] | None = None) -> None:
    """A batch: hold the turn, take ``steps`` steps of one clock unit each, giving way after each; wait for
    ``before[i]`` (if given) before step i."""
    with turns.hold():
        for i in range(steps):
            if before and i in before:
                before[i].wait(10)
            inside[0] += 1
            log.append(f"{name}{i}")
            assert inside[0] == 1  # never two at once
            clock.now += 1
            inside[0] -= 1
            turns.give_way()


def test_batches_of_equal_service_alternate_step_by_step_and_never_overlap():
    clock, log, inside = StepClock(), [], [0]
    turns, b_in_line = Turns(clock), threading.Event()
    a = threading.Thread(target=_stepping, args=(turns, clock, log, inside, "a", 3, {0: b_in_line}))
    a.start()
    b = threading.Thread(target=_stepping, args=(turns, clock, log, inside, "b", 3))
    b.start()
    _wait_in_line(turns)
    b_in_line.set()
    a.join(10)
    b.join(10)
    assert log == ["a0", "b0", "a1", "b1", "a2", "b2"] and turns.handovers >= 5


def test_a_new_batch_goes_before_one_that_has_held_the_turn_longer_until_waiting_evens_them():
    """A long batch L has held the turn for 10 steps when M arrives: M (no service yet) goes at L's next yield
    point and keeps the turn while L's priority (10 - AGING x its wait) stays above M's service: M0..M6,
    then L has waited long enough for one step, and M goes on. With FIFO turns they would alternate."""
    clock, log, inside = StepClock(), [], [0]
    turns, m_in_line = Turns(clock), threading.Event()
    long = threading.Thread(target=_stepping, args=(turns, clock, log, inside, "L", 15, {9: m_in_line}))
    long.start()
    while len(log) < 9:
        time.sleep(0.001)
    new = threading.Thread(target=_stepping, args=(turns, clock, log, inside, "M", 20))
    new.start()
    _wait_in_line(turns)
    m_in_line.set()
    long.join(10)
    new.join(10)
    assert log[:19] == [f"L{i}" for i in range(10)] + [f"M{i}" for i in range(7)] + ["L10", "M7"]
    assert sorted(log) == sorted([f"L{i}" for i in range(15)] + [f"M{i}" for i in range(20)])


def test_give_way_alone_keeps_the_turn():
    turns = Turns()
    with turns.hold():
        turns.give_way()
        assert turns.waiting == 0 and turns.handovers == 0


class SteppingRag:
    """A stand-in model: each question decodes ``steps`` steps (its settings' max_new_tokens), with a yield
    point after each; records the steps and the most answers running at once."""

    def __init__(self) -> None:
        self.mode, self.filters = "dense", ()
        self.steps: list[str] = []
        self.inside = self.most = 0
        self.started = threading.Event()
        self.batches: list[list[str]] = []
        self.gate = threading.Event()  # the first batch's first step waits for it (set: no wait)
        self.gate.set()

    def answer(self, questions, max_new_tokens=1, **kw):
        self.batches.append(list(questions))
        for i in range(max_new_tokens):
            if len(self.batches) == 1 and i == 0:
                self.started.set()
                self.gate.wait(10)
            self.inside += 1
            self.most = max(self.most, self.inside)
            self.started.set()
            self.steps.append(f"{questions[0]}{i}")
            time.sleep(0.01)
            self.inside -= 1
            yielding.point()
        return [f"answer to {q}" for q in questions]


@pytest.mark.parametrize("running", [2, 1])
def test_a_short_batch_does_not_wait_for_a_long_one(running):
    from ragline.serve.worker import ModelWorker

    rag = SteppingRag()
    worker = ModelWorker(rag, window=0.0, budget=Budget(max_running=running))
    done: list[str] = []
    long = worker.submit("long", _settings(max_new_tokens=40))
    long.future.add_done_callback(lambda f: done.append("long"))
    assert rag.started.wait(10)
    short = worker.submit("short", _settings(max_new_tokens=2, k=2))  # other settings: a batch of its own
    short.future.add_done_callback(lambda f: done.append("short"))
    assert long.future.result(10) == "answer to long" and short.future.result(10) == "answer to short"
    assert rag.most == 1  # one batch on the model at a time, always
    if running == 2:  # the short batch took its steps between the long one's
        assert done == ["short", "long"] and rag.steps.index("short1") < rag.steps.index("long39")
        assert worker.status()["handovers"] >= 2
    else:  # one batch at a time: the short one waited for the whole long one
        assert done == ["long", "short"] and rag.steps[-2:] == ["short0", "short1"]
    assert worker.status()["running"] == 0 and worker.alive


def test_waiting_requests_batch_by_settings_and_wait_for_a_decoding_batch_of_theirs():
    """Requests of the decoding batch's settings wait for it and then go as one batch; those of other settings
    start alongside it, gathered past the others in the line."""
    from ragline.serve.worker import ModelWorker

    rag = SteppingRag()
    worker = ModelWorker(rag, window=0.3)
    a, b = _settings(max_new_tokens=30), _settings(max_new_tokens=2, k=2)
    long = worker.submit("long", a)
    assert rag.started.wait(10)
    jobs = [worker.submit(q, s) for q, s in (("a1", a), ("b1", b), ("a2", a), ("b2", b))]
    assert [j.future.result(10) for j in jobs] == [f"answer to {q}" for q in ("a1", "b1", "a2", "b2")]
    assert long.future.result(10) == "answer to long"
    assert rag.batches == [["long"], ["b1", "b2"], ["a1", "a2"]] and rag.most == 1


def test_a_batch_waiting_for_its_turn_takes_in_the_requests_of_its_settings_that_arrive():
    from ragline.serve.worker import ModelWorker

    rag = SteppingRag()
    rag.gate.clear()
    worker = ModelWorker(rag, window=0.0)
    long = worker.submit("long", _settings(max_new_tokens=5))
    assert rag.started.wait(10)  # the long batch holds the turn, in its first step
    b = _settings(max_new_tokens=2, k=2)
    b1 = worker.submit("b1", b)
    _wait_in_line(worker.turns)  # b1's batch is waiting for the turn
    b2 = worker.submit("b2", b)
    rag.gate.set()
    assert [j.future.result(10) for j in (long, b1, b2)] == ["answer to long", "answer to b1", "answer to b2"]
    assert rag.batches == [["long"], ["b1", "b2"]]


def test_interleaved_batches_give_the_answers_each_gives_alone(small_index):
    """The tiny generator through the worker: two batches of different settings (retrieval mode, model,
    decoding) decoded at once, taking turns, answer as each does alone."""
    from ragline.rag.model import RagModel
    from ragline.retriever import Retriever
    from ragline.serve.worker import ModelWorker

    rag = RagModel(Retriever(small_index), tiny_generator(), k=3)
    jobs = {"seq": ("Who wrote Candide?", _settings(model="rag-sequence", decoding="thorough", beams=2,
                                                    max_new_tokens=8, mode="bm25")),
            "tok": ("What is the capital of France?", _settings(max_new_tokens=8, k=2))}
    alone = {}
    for name, (q, s) in jobs.items():
        rag.mode = s.mode
        alone[name] = rag.answer([q], model=s.model, decoding=s.decoding, k=s.k, beams=s.beams,
                                 max_new_tokens=s.max_new_tokens)[0]
    worker = ModelWorker(rag, window=0.0)
    together = {name: worker.submit(q, s) for name, (q, s) in jobs.items()}
    together = {name: job.future.result(60) for name, job in together.items()}
    assert worker.status()["handovers"] >= 1  # they did take turns
    for name in jobs:
        assert together[name].text == alone[name].text and together[name].tokens == alone[name].tokens
        assert [z.pid for z in together[name].sources] == [z.pid for z in alone[name].sources]
