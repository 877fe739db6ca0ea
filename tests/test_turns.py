"""Batches taking turns on the model step by step (serve/turns.py, serve/worker.py): model calls never overlap,
a batch that arrives while another decodes does not wait for the whole of it, and answers do not change."""

import threading
import time
from collections.abc import Callable

import pytest
from conftest import serve_settings as _settings
from conftest import tiny_generator

from ragline import yielding
from ragline.serve.budget import Budget
from ragline.serve.turns import Turns


def _wait_in_line(turns: Turns) -> None:
    """Return once a task waits for ``turns`` (at most 10 s)."""
    deadline = time.monotonic() + 10
    while turns.waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.001)


def _wait_until_held(turns: Turns) -> None:
    """Return once no task waits: the one started has the turn (at most 10 s)."""
    deadline = time.monotonic() + 10
    while turns.waiting and time.monotonic() < deadline:
        time.sleep(0.001)


class StepClock:
    """A clock for Turns that moves one unit per model step the test takes, whatever the threads' timing."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _stepping(turns: Turns, clock: StepClock, log: list[str], inside: list[int], name: str, steps: int,
              before: dict[int, threading.Event] | None = None) -> Callable[[], str]:
    """A batch's task: take ``steps`` steps of one clock unit each, giving way after each; wait for
    ``before[i]`` (if given) before step i. Returns the thread it ran on."""
    def work() -> str:
        for i in range(steps):
            if before and i in before:
                before[i].wait(10)
            inside[0] += 1
            log.append(f"{name}{i}")
            assert inside[0] == 1  # never two at once
            clock.now += 1
            inside[0] -= 1
            turns.give_way()
        return threading.current_thread().name
    return work


def test_batches_of_equal_service_alternate_step_by_step_on_one_thread_and_never_overlap():
    clock, log, inside = StepClock(), [], [0]
    turns, b_in_line = Turns(clock), threading.Event()
    a = turns.start(_stepping(turns, clock, log, inside, "a", 3, {0: b_in_line}))
    _wait_until_held(turns)  # a holds the turn, waiting before its first step
    b = turns.start(_stepping(turns, clock, log, inside, "b", 3))
    _wait_in_line(turns)
    b_in_line.set()
    assert a.result(10) == b.result(10) == "ragline-model"  # both on the model thread
    assert log == ["a0", "b0", "a1", "b1", "a2", "b2"] and turns.handovers >= 5


def test_a_new_batch_goes_before_one_that_has_held_the_turn_longer_until_waiting_evens_them():
    """A long batch L has held the turn for 10 steps when M arrives: M (no service yet) goes at L's next yield
    point and keeps the turn while L's priority (10 - AGING x its wait) stays above M's service: M0..M6,
    then L has waited long enough for one step, and M goes on. With FIFO turns they would alternate."""
    clock, log, inside = StepClock(), [], [0]
    turns, m_in_line = Turns(clock), threading.Event()
    long = turns.start(_stepping(turns, clock, log, inside, "L", 15, {9: m_in_line}))
    while len(log) < 9:
        time.sleep(0.001)
    new = turns.start(_stepping(turns, clock, log, inside, "M", 20))
    _wait_in_line(turns)
    m_in_line.set()
    long.result(10)
    new.result(10)
    assert log[:19] == [f"L{i}" for i in range(10)] + [f"M{i}" for i in range(7)] + ["L10", "M7"]
    assert sorted(log) == sorted([f"L{i}" for i in range(15)] + [f"M{i}" for i in range(20)])


def test_give_way_alone_keeps_the_turn_and_outside_a_task_does_nothing():
    turns = Turns()
    turns.give_way()  # not on the model thread: nothing to give

    def alone() -> int:
        turns.give_way()
        return turns.waiting
    assert turns.call(alone) == 0 and turns.handovers == 0


def test_tasks_keep_their_gradient_mode_and_errors_reach_their_callers():
    """torch's gradient mode is per thread; tasks sharing the model thread each keep their own across turns.
    A failing task fails its own caller only; a call made on the model thread runs at once."""
    import torch

    turns, go = Turns(), threading.Event()
    seen: list[tuple[str, bool]] = []

    def task(name: str, grad: bool) -> None:
        with torch.set_grad_enabled(grad):
            for _ in range(3):
                go.wait(10)
                seen.append((name, torch.is_grad_enabled()))
                turns.give_way()

    def fails() -> None:
        raise ValueError("this task fails")

    first = turns.start(lambda: task("off", False))
    starts = turns.start(torch.is_grad_enabled)  # runs when "off" first gives way, inside its no_grad block
    second = turns.start(lambda: task("on", True))
    failing = turns.start(fails)
    go.set()
    first.result(10)
    second.result(10)
    assert starts.result(10) is True
    with pytest.raises(ValueError, match="this task fails"):
        failing.result(10)
    assert all(grad == (name == "on") for name, grad in seen) and {n for n, _ in seen} == {"on", "off"}
    assert turns.handovers >= 2  # they did interleave
    assert turns.call(lambda: turns.call(lambda: threading.current_thread().name)) == "ragline-model"


def test_a_task_cancelled_before_its_turn_never_runs_and_a_dead_model_thread_is_started_again():
    turns, hold, ran = Turns(), threading.Event(), []
    busy = turns.start(lambda: hold.wait(10))
    _wait_until_held(turns)
    later = turns.start(lambda: ran.append("later"))
    assert later.cancel()  # its client left while it waited
    hold.set()
    busy.result(10)
    assert turns.call(lambda: "after") == "after" and ran == []
    fresh, dead = Turns(), threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    fresh._thread.thread = dead  # as if its model thread had died
    assert not fresh.alive
    assert fresh.call(lambda: threading.current_thread().name) == "ragline-model"
    assert fresh.alive and fresh.restarts == 1


def test_the_servers_torch_work_runs_on_one_thread(small_index):
    """Loading, answering and /search's question encoding all run on the model thread: while a second thread
    that has called into OpenMP lives, every torch operation is slower (turns.py)."""
    import torch

    from ragline.rag.model import RagModel
    from ragline.retriever import Retriever
    from ragline.serve.app import create_app
    from ragline.serve.worker import ModelWorker

    threads: set[str] = set()
    real = torch.nn.Module.__call__

    def spy(self, *a, **kw):
        threads.add(threading.current_thread().name)
        return real(self, *a, **kw)

    turns = Turns()
    rag = turns.call(lambda: RagModel(Retriever(small_index), tiny_generator(), k=2))
    worker = ModelWorker(rag, window=0.0, turns=turns)
    from fastapi.testclient import TestClient

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.Module, "__call__", spy)
        with TestClient(create_app(rag, worker=worker), base_url="http://localhost") as client:
            assert client.post("/search", json={"question": "Who wrote Candide?", "mode": "dense"}).status_code == 200
            r = client.post("/ask", json={"question": "Who wrote Candide?", "max_new_tokens": 4})
            assert r.status_code == 200, r.text
    assert threads == {"ragline-model"}


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
