"""The front door, ``ragline.open()``: the CLI's defaults, the CLI's answers, settings that travel with each
call, and the package staying light to import."""

import inspect
import json
import subprocess
import sys

import pytest
from conftest import run_cli

import ragline
from ragline import vocab

QUESTION = "Who wrote Candide?"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from ragline.models.tiny import save_tiny_causal

    return save_tiny_causal(tmp_path_factory.mktemp("tiny") / "gen")


def _defaults(fn) -> dict:
    params = inspect.signature(fn).parameters.items()
    return {n: p.default for n, p in params if p.default is not inspect.Parameter.empty}


def test_open_and_ask_default_to_what_the_cli_does():
    from ragline.cli import cli
    from ragline.system import Rag

    cli_ask = {p.name: p.default for p in cli.commands["ask"].params}
    opened, asked = _defaults(ragline.open), _defaults(Rag.ask)
    assert opened["generator"] == cli_ask["generator"] == vocab.DEFAULT_GENERATOR
    assert opened["precision"] == cli_ask["precision"] == vocab.AUTO
    assert opened["device"] == cli_ask["device"] == vocab.DEFAULT_DEVICE
    assert opened["index"] is None and cli_ask["index_dir"] is None  # both: the bundled index
    assert opened["k"] is None and cli_ask["k"] is None  # both: a checkpoint's n_docs, else vocab.DEFAULT_K
    assert opened["prior_scale"] is None and cli_ask["prior_scale"] is None  # both: the index's own
    assert opened["bm25_weight"] == cli_ask["bm25_weight"] and opened["rrf_c"] == cli_ask["rrf_c"]
    for name in ("beams", "max_new_tokens", "length_penalty", "n_best"):
        assert asked[name] == cli_ask[name], name
    assert asked["model"] is None and cli_ask["model_name"] == vocab.DEFAULT_MODEL  # None: the run's, else default
    assert cli_ask["mode"] == vocab.DEFAULT_MODE and asked["mode"] is None and asked["decoding"] is None


def test_open_answers_as_ragline_ask_does(small_index, tiny_folder):
    rag = ragline.open(small_index, str(tiny_folder), k=3)
    assert rag.opened.k == 3 and rag.opened.index == small_index and rag.opened.model == vocab.DEFAULT_MODEL
    for model, decoding in (("rag-token", "greedy"), ("rag-sequence", "thorough")):
        cli = json.loads(run_cli("ask", QUESTION, "--index", small_index, "--generator", tiny_folder, "-k", 3,
                                 "--model", model, "--decoding", decoding, "--max-new-tokens", 3, "--json"))
        mine = rag.ask(QUESTION, model=model, decoding=decoding, max_new_tokens=3).to_dict()
        assert mine["text"] == cli["text"] and mine["tokens"] == cli["tokens"]
        assert [s["pid"] for s in mine["sources"]] == [s["pid"] for s in cli["sources"]]
        assert mine["logprob"] == pytest.approx(cli["logprob"], abs=1e-5)
    two = rag.ask([QUESTION, "What is Art Deco?"], model="rag-token", decoding="greedy", max_new_tokens=2)
    assert len(two) == 2 and two[0].question == QUESTION
    hits = rag.search(QUESTION, k=4, mode="bm25")
    assert len(hits) == 4 and hits == rag.retriever.search([QUESTION], k=4, mode="bm25")[0]


def test_settings_travel_with_each_call_and_never_stay_on_the_model(small_index, tiny_folder):
    rag = ragline.open(small_index, str(tiny_folder), k=2)
    title = rag.search(QUESTION, k=1)[0].title
    a = rag.ask(QUESTION, model="rag-token", decoding="greedy", max_new_tokens=1, mode="bm25",
                filters=[f"title!={title}"])
    assert all(s.title != title for s in a.sources)
    b = rag.ask(QUESTION, model="rag-token", decoding="greedy", max_new_tokens=1)
    assert rag.model.mode == vocab.DEFAULT_MODE and not hasattr(rag.model, "filters")
    assert [s.pid for s in b.sources] == [h.pid for h in rag.search(QUESTION, k=2)]


def test_closed_book_opens_no_index(tmp_path, tiny_folder):
    rag = ragline.open(tmp_path / "no-such-index", str(tiny_folder), model="closed-book")
    assert rag.retriever is None and rag.ask(QUESTION, max_new_tokens=2).sources == []


def test_a_runs_settings_come_with_it(tmp_path, small_index, tiny_folder):
    from ragline.train.rag import RagTrainConfig, RagTrainer

    train = tmp_path / "t.jsonl"
    train.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "answers": ["x"]}) + "\n"
                             for i, q in enumerate(["Who wrote Candide?", "What is Rome?", "Who painted it?"])))
    cfg = RagTrainConfig(train=str(train), index=str(small_index), generator=str(tiny_folder), model="rag-token",
                         k=2, steps=1, batch_size=2, val_fraction=0.0, eval_every=1, save_every=1, prior_scale=5.0)
    RagTrainer(cfg, tmp_path / "run", progress=False, log=lambda m: None).run_training()
    rag = ragline.open(run=tmp_path / "run")
    assert rag.opened.model == "rag-token" and rag.opened.k == 2 and rag.opened.prior_scale == 5.0
    assert rag.opened.index == small_index and rag.opened.generator.endswith("final/generator")
    assert rag.ask(QUESTION, max_new_tokens=1).model == "rag-token"


def test_import_ragline_stays_light():
    out = subprocess.run([sys.executable, "-c", "import sys, ragline; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("command", ["ask", "eval", "train rag"])
def test_ragline_commands_print_no_warning(small_index, tiny_folder, tmp_path, command):
    """Run as a user runs them, with Python's warnings shown: nothing ragline calls while answering, evaluating
    or training is deprecated or warns."""
    import os

    tiny = ["--index", str(small_index), "--generator", str(tiny_folder), "-k", "2"]
    args = {"ask": ["ask", QUESTION, *tiny, "--max-new-tokens", "2", "--model", "rag-sequence"],
            "eval": ["eval", "--limit", "2", *tiny, "--max-new-tokens", "2", "--out", str(tmp_path / "run")],
            "train rag": ["train", "rag", "--train", "fanoutqa-dev", *tiny, "--steps", "2", "--batch-size", "2",
                          "--val-limit", "2", "--eval-every", "1", "--save-every", "1", "--generator-training", "lora",
                          "--out", str(tmp_path / "t")],
            }[command]
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    done = subprocess.run([sys.executable, "-m", "ragline", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    said = (done.stdout + done.stderr).lower()
    assert "warning" not in said and "deprecat" not in said, done.stderr[-2000:]
