"""The paper's system through the CLI, against transformers end to end.

Tiny randomly initialised models saved in Hugging Face's own formats by the test: DPR question and context
encoders (BERT uncased's tokenizer), a BART generator, and ``RagSequenceForGeneration`` /
``RagTokenForGeneration`` folders made with ``save_pretrained`` from those parts; the first passage of 300
bundled Wikipedia leads (of 50 words or more) written as DPR's psgs_w100.tsv. ragline indexes the TSV with the
DPR encoders and answers with ``--generator RAG_FOLDER``; transformers answers with the same folder and a
``RagRetriever`` over a custom index of the same passages and vectors. Retrieved passage ids, doc scores and
generated token ids must agree.

Where transformers departs from the formula, the inputs avoid the departure as the reference tests do:
its RAG-Sequence ``generate`` ignores the passages' padding mask, so that folder's ``max_combined_length``
(40 tokens) cuts every prompt to one length; it encodes a padded batch of questions without their mask when
rescoring, so it is asked one question at a time.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import run_cli, tiny_bart_config, word_tokenizer

from ragline.cli import cli
from ragline.corpus.passages import split_words
from ragline.corpus.readers import read_corpus

QUESTIONS = ["Who directed the film 2001: A Space Odyssey?", "What is the capital of France?",
             "Which river flows through Egypt?"]
N_PASSAGES = 300
GEN = dict(max_new_tokens=12, length_penalty=1.0)


def _cased_word_tokenizer(texts: list[str]):
    """A cased word-level tokenizer over the words of ``texts`` and their lower-cased forms (BART's special
    tokens around it): "Who" and "who" are different tokens, as in BART's own vocabulary."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.BertPreTokenizer()
    words = sorted({w for t in texts for form in (t, t.lower()) for w, _ in pre.pre_tokenize_str(form)})
    return word_tokenizer(words, pre)


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """Folders of the paper's system in Hugging Face's formats, psgs.tsv, and ragline's index over it."""
    from transformers import (
        AutoTokenizer,
        BartForConditionalGeneration,
        DPRConfig,
        DPRContextEncoder,
        DPRQuestionEncoder,
        RagConfig,
        RagSequenceForGeneration,
        RagTokenForGeneration,
        RagTokenizer,
    )

    from ragline.models.catalog import encoder_path

    root = tmp_path_factory.mktemp("paper")
    rows = []  # leads of 50 words or more: every prompt of the rag-sequence folder fills its 40 tokens
    for doc in read_corpus("wiki-leads"):
        if len(rows) == N_PASSAGES:
            break
        first = split_words(doc.text)[0]
        if len(first.split()) >= 50:
            rows.append((str(len(rows) + 1), first, doc.title))
    with open(root / "psgs.tsv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["id", "text", "title"])
        w.writerows(rows)

    qtok = AutoTokenizer.from_pretrained(str(encoder_path("minilm")[1]))  # BERT uncased WordPiece
    dpr_cfg = DPRConfig(vocab_size=qtok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, initializer_range=0.5)  # varied q(x)
    torch.manual_seed(1)
    q_enc = DPRQuestionEncoder(dpr_cfg).eval()
    torch.manual_seed(2)
    ctx_enc = DPRContextEncoder(dpr_cfg).eval()
    for model, name in ((q_enc, "dpr-q"), (ctx_enc, "dpr-ctx")):
        model.save_pretrained(root / name)
        qtok.save_pretrained(root / name)

    gtok = _cased_word_tokenizer([t for _, text, title in rows for t in (text, title)] + QUESTIONS)
    bart_cfg = tiny_bart_config(len(gtok), max_positions=512, forced_eos_token_id=None, no_repeat_ngram_size=0,
                                init_std=0.5)
    torch.manual_seed(1)  # a seed whose answers differ between the questions (see the last assert of the ask test)
    bart = BartForConditionalGeneration(bart_cfg).eval()
    bart.save_pretrained(root / "bart")
    gtok.save_pretrained(root / "bart")

    rags = {}
    for name, cls, length in (("rag-sequence", RagSequenceForGeneration, 40),
                              ("rag-token", RagTokenForGeneration, 300)):
        cfg = RagConfig.from_question_encoder_generator_configs(dpr_cfg, bart_cfg, n_docs=3, max_combined_length=length)
        cls(config=cfg, question_encoder=q_enc, generator=bart).save_pretrained(root / name)
        RagTokenizer(qtok, gtok).save_pretrained(str(root / name))
        rags[name] = root / name

    run_cli("index", "--source", root / "psgs.tsv", "--encoder", root / "dpr-ctx", "--query-encoder", root / "dpr-q",
            "--out", root / "index", "--no-bm25")
    return {"root": root, "rows": rows, "rags": rags, "qtok": qtok, "gtok": gtok}


def _hf_vectors(paper) -> np.ndarray:
    """d(z) as transformers' DPRContextEncoder gives them for (title, text) pairs: (n, 32)."""
    from transformers import AutoTokenizer, DPRContextEncoder

    tok = AutoTokenizer.from_pretrained(paper["root"] / "dpr-ctx")
    model = DPRContextEncoder.from_pretrained(paper["root"] / "dpr-ctx").eval()
    titles, texts = [r[2] for r in paper["rows"]], [r[1] for r in paper["rows"]]
    with torch.no_grad():
        enc = tok(titles, texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        return model(**enc).pooler_output.numpy()


def _hf_rag(paper, name):
    """transformers' RAG model of folder ``name`` with a RagRetriever over a custom index of the passages."""
    import faiss
    from datasets import Dataset
    from transformers import RagConfig, RagRetriever, RagSequenceForGeneration, RagTokenForGeneration
    from transformers.models.rag.retrieval_rag import CustomHFIndex

    ds = Dataset.from_dict({"id": [r[0] for r in paper["rows"]], "text": [r[1] for r in paper["rows"]],
                            "title": [r[2] for r in paper["rows"]], "embeddings": list(_hf_vectors(paper))})
    ds.add_faiss_index("embeddings", metric_type=faiss.METRIC_INNER_PRODUCT)
    folder = paper["rags"][name]
    config = RagConfig.from_pretrained(folder)
    retriever = RagRetriever(config, paper["qtok"], paper["gtok"], index=CustomHFIndex(32, ds))
    cls = RagSequenceForGeneration if name == "rag-sequence" else RagTokenForGeneration
    return cls.from_pretrained(folder, retriever=retriever).eval(), retriever


def test_dpr_index_records_its_encoders_and_equals_hugging_faces_vectors(paper):
    from ragline.index.registry import open_index

    index = open_index(paper["root"] / "index")
    enc = index.manifest["encoder"]
    assert enc["prior_scale"] == 1.0
    assert (enc["passage"]["kind"], enc["passage"]["pooling"], enc["passage"]["normalised"]) == \
        ("dpr-context", "cls", False)
    assert enc["question"]["kind"] == "dpr-question"
    assert index.manifest["corpus"]["format"] == "dpr-tsv"
    assert [p.pid for p in index.store.get([0, 1, N_PASSAGES - 1])] == ["1", "2", str(N_PASSAGES)]  # DPR's ids
    assert index.store.get([0])[0].text == paper["rows"][0][1]  # not re-split
    np.testing.assert_allclose(np.asarray(index.embeddings[np.arange(N_PASSAGES)]), _hf_vectors(paper),
                               atol=1e-4, rtol=1e-4)


CASES = [("rag-sequence", "thorough", 1), ("rag-sequence", "thorough", 3), ("rag-token", "greedy", 1),
         ("rag-token", "beam", 3)]


@pytest.mark.parametrize(("model", "decoding", "beams"), CASES)
def test_ask_with_a_rag_checkpoint_equals_transformers(paper, model, decoding, beams):
    out = run_cli("ask", "--index", paper["root"] / "index", "--generator", paper["rags"][model], "--model", model,
                  "--decoding", decoding, "--beams", beams, "--max-new-tokens", GEN["max_new_tokens"],
                  "--length-penalty", GEN["length_penalty"], "--json", *QUESTIONS)
    ours = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    hf, retriever = _hf_rag(paper, model)
    seen = set()
    for q, a in zip(QUESTIONS, ours, strict=True):
        ids = paper["qtok"]([q], return_tensors="pt")
        with torch.no_grad():
            hidden = hf.question_encoder(ids["input_ids"], attention_mask=ids["attention_mask"])[0]
            docs = retriever(ids["input_ids"].numpy(), hidden.numpy(), n_docs=3, return_tensors="pt")
            scores = torch.bmm(hidden[:, None], docs["retrieved_doc_embeds"].float().transpose(1, 2))[0, 0]
            out_ids = hf.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], n_docs=3,
                                  num_beams=beams, max_length=GEN["max_new_tokens"] + 1, min_length=0,
                                  no_repeat_ngram_size=0, forced_bos_token_id=None, forced_eos_token_id=None,
                                  length_penalty=GEN["length_penalty"], early_stopping=False)
        hf_pids = [paper["rows"][i][0] for i in docs["doc_ids"][0].tolist()]
        assert [s["pid"] for s in a["sources"]] == hf_pids  # k = the checkpoint's n_docs
        np.testing.assert_allclose([s["score"] for s in a["sources"]], scores.numpy(), atol=1e-4, rtol=1e-4)
        tokens = out_ids[0].tolist()[1:]  # drop the decoder start token
        while tokens and tokens[-1] == paper["gtok"].pad_token_id:
            tokens.pop()
        assert a["tokens"] == tokens
        seen.add(tuple(tokens))
    assert len(seen) > 1  # the questions got different answers: the comparison is not trivial


def test_eval_with_a_rag_checkpoint_equals_transformers(paper, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"id": f"q{i}", "input": q, "output": [{"answer": "x"}]}) + "\n"
                            for i, q in enumerate(QUESTIONS)))
    run_cli("eval", "--task", task, "--index", paper["root"] / "index", "--generator", paper["rags"]["rag-token"],
            "--model", "rag-token", "--decoding", "greedy", "--max-new-tokens", GEN["max_new_tokens"],
            "--length-penalty", GEN["length_penalty"], "--out", tmp_path / "run")
    preds = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["k"] == 3 and config["prior_scale"] == 1.0  # the checkpoint's n_docs, the index's scale
    hf, retriever = _hf_rag(paper, "rag-token")
    for q, p in zip(QUESTIONS, preds, strict=True):
        ids = paper["qtok"]([q], return_tensors="pt")
        with torch.no_grad():
            out_ids = hf.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], n_docs=3,
                                  num_beams=1, max_length=GEN["max_new_tokens"] + 1, min_length=0,
                                  no_repeat_ngram_size=0, forced_bos_token_id=None, forced_eos_token_id=None)
            hidden = hf.question_encoder(ids["input_ids"], attention_mask=ids["attention_mask"])[0]
            docs = retriever(ids["input_ids"].numpy(), hidden.numpy(), n_docs=3, return_tensors="pt")
        assert p["output"][0]["answer"] == paper["gtok"].decode(out_ids[0], skip_special_tokens=True).strip()
        assert [s["pid"] for s in p["output"][0]["provenance"]] == \
            [paper["rows"][i][0] for i in docs["doc_ids"][0].tolist()]


@pytest.mark.parametrize("model", ["rag-sequence", "rag-token"])
def test_training_loss_of_a_batch_equals_transformers(paper, model):
    from ragline.models.loading import load_generator
    from ragline.rag.model import RagModel
    from ragline.retriever import open_retriever

    loaded = load_generator(str(paper["rags"][model]))
    rag = RagModel(open_retriever(paper["root"] / "index", None, loaded.question_encoder), loaded.generator,
                   k=loaded.n_docs)
    answers = ["stanley kubrick", "paris", "the nile river"]  # more than one token each (HF's RAG-Sequence quirk)
    hf, _ = _hf_rag(paper, model)
    ids = [paper["qtok"]([q], return_tensors="pt") for q in QUESTIONS]  # one at a time (see the module docstring)
    ours = rag.likelihood(QUESTIONS, answers, model=model).loss  # (B,)
    gen = loaded.generator
    target, mask = gen._targets(answers)
    start = torch.full((len(answers), 1), gen.model.config.decoder_start_token_id)
    labels = torch.cat([start, target.masked_fill(~mask, gen.pad_id)], 1)
    hf_loss = []
    with torch.no_grad():
        for b, i in enumerate(ids):
            out = hf(input_ids=i["input_ids"], attention_mask=i["attention_mask"], labels=labels[b : b + 1],
                     n_docs=3, reduce_loss=False)
            hf_loss.append(out.loss)
    torch.testing.assert_close(ours.detach(), torch.cat(hf_loss), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("model", ["rag-sequence", "rag-token"])
def test_a_trained_run_exports_as_a_rag_checkpoint_that_transformers_loads(paper, tmp_path, model):
    """`train rag` on the BART folder and the DPR index, `export`, then transformers' Rag*ForGeneration loads the
    folder: RAG-Token's greedy answers equal ragline's; RAG-Sequence's likelihood of ragline's answers equals
    ragline's (its generate reads padding, see the module docstring)."""
    from transformers import RagSequenceForGeneration, RagTokenForGeneration

    from ragline.models.loading import load_generator
    from ragline.rag.model import RagModel
    from ragline.retriever import open_retriever

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"question": q, "answers": [a]}) + "\n" for q, a in
                             zip(QUESTIONS * 2, ["stanley kubrick", "paris", "nile"] * 2, strict=True)))
    run_cli("train", "rag", "--train", train, "--index", paper["root"] / "index", "--generator", paper["root"] / "bart",
            "--model", model, "-k", 2, "--steps", 2, "--batch-size", 2, "--val-fraction", 0.2, "--lr", 1e-2,
            "--out", tmp_path / "run")
    info = json.loads((tmp_path / "run" / "final" / "run.json").read_text())
    assert info["prior_scale"] == 1.0 and info["k"] == 2  # the index's scale, recorded
    run_cli("export", "--run", tmp_path / "run", "--out", tmp_path / "exported")
    cls = RagSequenceForGeneration if model == "rag-sequence" else RagTokenForGeneration
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["architectures"] == [cls.__name__]
    paper = {**paper, "rags": {model: tmp_path / "exported"}}
    hf, _ = _hf_rag(paper, model)
    assert hf.config.n_docs == 2
    out = run_cli("ask", "--index", paper["root"] / "index", "--generator", tmp_path / "exported",
                  "--max-new-tokens", 8, "--model", model, "--beams", 1, "--json", *QUESTIONS)
    tokens = [json.loads(line)["tokens"] for line in out.splitlines() if line.startswith("{")]
    loaded = load_generator(str(tmp_path / "exported"))
    rag = RagModel(open_retriever(paper["root"] / "index", None, loaded.question_encoder), loaded.generator, k=2)
    gen = loaded.generator
    for q, toks in zip(QUESTIONS, tokens, strict=True):
        ids = paper["qtok"]([q], return_tensors="pt")
        with torch.no_grad():
            if model == "rag-token":
                out = hf.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], n_docs=2,
                                  num_beams=1, max_length=9, min_length=0, no_repeat_ngram_size=0,
                                  forced_bos_token_id=None, forced_eos_token_id=None)
                hf_tokens = out[0].tolist()[1:]
                while hf_tokens and hf_tokens[-1] == gen.pad_id:
                    hf_tokens.pop()
                assert toks == hf_tokens
            else:
                labels = torch.tensor([[gen.model.config.decoder_start_token_id, *toks]])
                hf_loss = hf(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], labels=labels,
                             n_docs=2, reduce_loss=False).loss
                ours = rag.likelihood([q], [toks], model=model).loss
                if len(toks) > 1:  # HF's RAG-Sequence loss drops the prior for one-token answers
                    torch.testing.assert_close(ours, hf_loss, atol=1e-4, rtol=1e-5)
    result = CliRunner().invoke(cli, ["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "exported")])
    assert result.exit_code != 0 and "already exists" in str(result.exception)


def test_a_dpr_folder_cannot_be_mean_pooled_by_accident(paper):
    from transformers import DPRQuestionEncoder

    from ragline.errors import RaglineError
    from ragline.models.encoders import TextEncoder, load_encoder

    folder = paper["root"] / "dpr-q"
    with pytest.raises(RaglineError, match="not a sentence-transformers folder"):
        TextEncoder(str(folder))  # sentence-transformers would wrap it in mean pooling
    enc = load_encoder(str(folder))
    assert (enc.kind, enc.pooling, enc.normalised, enc.prior_scale) == ("dpr-question", "cls", False, 1.0)
    ids = paper["qtok"](QUESTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = DPRQuestionEncoder.from_pretrained(folder).eval()(**ids).pooler_output.numpy()
    np.testing.assert_allclose(enc.encode(QUESTIONS), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RaglineError, match="will not guess how to pool it") as e:
        load_encoder(str(paper["root"] / "bart"))  # a folder of no encoder kind: refused with the fix
    assert "SentenceTransformer(...).save(folder)" in e.value.fix


def _tsv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["id", "text", "title"])
        w.writerows(rows)
    return path


def test_dpr_tsv_rows_are_passages_and_bad_rows_are_reported(tmp_path):
    from ragline.corpus.passages import split_documents
    from ragline.corpus.readers import ReadStats, detect_format
    from ragline.errors import RaglineError

    text = 'Aaron ( or ; "Ahärôn") is a prophet,\ta word ' + "long " * 150
    path = _tsv(tmp_path / "psgs.txt", [("1", text, '"Aaron"'), ("2", "Second passage.", "B")])
    assert detect_format(path) == "dpr-tsv"  # from the header, whatever the file's name
    passages = list(split_documents(read_corpus(path)))
    assert [(p.pid, p.doc_id, p.title) for p in passages] == [("1", '"Aaron"', '"Aaron"'), ("2", "B", "B")]
    assert passages[0].text == text  # quotes, tabs and 150+ words kept whole: DPR's passages are not re-split
    with open(path, "a", encoding="utf-8") as f:
        f.write("3\tonly two fields\n1\tagain\tA\n")
    with pytest.raises(RaglineError, match=r"psgs.txt:4: 2 fields"):
        list(read_corpus(path))
    stats = ReadStats()
    assert [d.id for d in read_corpus(path, skip_bad=True, stats=stats)] == ["1", "2"]
    assert stats.skipped == 2 and "appears twice" in stats.problems[1]


def test_index_from_precomputed_embeddings_equals_an_encoded_one(paper, tmp_path, ray_local):
    from ragline.errors import RaglineError
    from ragline.index.registry import open_index
    from ragline.retriever import Retriever

    built = open_index(paper["root"] / "index")
    vectors = np.asarray(built.embeddings[np.arange(N_PASSAGES)])
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, part in enumerate(np.array_split(vectors, 11)):  # shard_10 sorts after shard_2
        np.save(shards / f"shard_{i}.npy", part)
    common = ("index", "--source", paper["root"] / "psgs.tsv", "--encoder", paper["root"] / "dpr-ctx",
              "--query-encoder", paper["root"] / "dpr-q", "--no-bm25")
    run_cli(*common, "--embeddings", shards, "--out", tmp_path / "imported")
    imported = open_index(tmp_path / "imported")
    assert imported.fingerprint == built.fingerprint
    questions = QUESTIONS + ["When was the Eiffel Tower built?", "Who painted the Mona Lisa?"]
    a, b = Retriever(built).retrieve(questions, k=10), Retriever(imported).retrieve(questions, k=10)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    run_cli(*common, "--embeddings", shards, "--ray", "--shards", "3", "--out", tmp_path / "sharded")
    c = Retriever(tmp_path / "sharded").retrieve(questions, k=10)  # the published vectors, in Ray shards
    np.testing.assert_array_equal(a.rows, c.rows)
    np.testing.assert_allclose(a.scores, c.scores, atol=1e-6)

    np.save(tmp_path / "half.npy", vectors.astype(np.float16))  # float16 is read (and widened)
    run_cli(*common, "--embeddings", tmp_path / "half.npy", "--out", tmp_path / "half")
    np.testing.assert_allclose(np.asarray(open_index(tmp_path / "half").embeddings[np.arange(N_PASSAGES)]),
                               vectors.astype(np.float16).astype(np.float32))
    for bad, match in ((vectors[:-1], "hold 299 vectors but the corpus has 300 passages"),
                       (vectors[:, :16], "holds 16-d vectors but passage encoder"),
                       (vectors.astype(np.float64), "holds a float64 array")):
        np.save(tmp_path / "bad.npy", bad)
        with pytest.raises(RaglineError, match=match):
            CliRunner().invoke(cli, [str(a) for a in (*common, "--embeddings", tmp_path / "bad.npy", "--out",
                                                       tmp_path / "bad")], catch_exceptions=False)
        assert not (tmp_path / "bad").exists()
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(RaglineError, match="not a plain .npy array"):
        CliRunner().invoke(cli, [str(a) for a in (*common, "--embeddings", tmp_path / "pickled.npy", "--out",
                                                   tmp_path / "bad")], catch_exceptions=False)


def test_device_names_resolve_and_a_missing_gpu_is_refused_with_the_fix(paper):
    from ragline.errors import RaglineError
    from ragline.models import device

    assert device.resolve("cpu").type == "cpu"
    assert device.resolve("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(RaglineError, match="unknown device 'tpu'"):
        device.resolve("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RaglineError, match="torch sees no GPU") as e:
            device.resolve("cuda")
        assert "--device cpu" in e.value.fix
        result = CliRunner().invoke(cli, ["ask", "who?", "--index", str(paper["root"] / "index"), "--generator",
                                          str(paper["rags"]["rag-token"]), "--device", "cuda"])
        assert result.exit_code != 0 and "torch sees no GPU" in str(result.exception)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: torch.cuda.is_available() is False here")
@pytest.mark.parametrize(("model", "decoding", "beams"), CASES)
def test_answers_on_the_gpu_equal_the_cpu_answers(paper, model, decoding, beams):
    def answers(device):
        out = run_cli("ask", "--index", paper["root"] / "index", "--generator", paper["rags"][model], "--model", model,
                      "--decoding", decoding, "--beams", beams, "--max-new-tokens", 8, "--device", device, "--json",
                      *QUESTIONS)
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    cpu, gpu = answers("cpu"), answers("cuda")
    assert [a["tokens"] for a in cpu] == [a["tokens"] for a in gpu]
    for a, b in zip(cpu, gpu, strict=True):
        assert [s["pid"] for s in a["sources"]] == [s["pid"] for s in b["sources"]]
        np.testing.assert_allclose([s["score"] for s in a["sources"]], [s["score"] for s in b["sources"]], atol=1e-3)


def test_fid_through_the_cli_answers_and_trains(paper, tmp_path):
    """`--model fid` on the BART folder over the DPR index: per-token passage attributions that sum to one, and
    `train rag --model fid` (FiD's loss plus FiD-Distill into the question encoder) runs and exports."""
    out = run_cli("ask", "--index", paper["root"] / "index", "--generator", paper["root"] / "bart", "--model", "fid",
                  "--decoding", "greedy", "-k", 3, "--max-new-tokens", 6, "--json", *QUESTIONS[:2])
    answers = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for a in answers:
        assert a["model"] == "fid" and len(a["sources"]) == 3 and a["token_sources"]
        for _, per_passage in a["token_sources"]:
            assert sum(per_passage) == pytest.approx(1.0, abs=1e-5)
        assert sum(s["posterior"] for s in a["sources"]) == pytest.approx(1.0, abs=1e-5)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"question": q, "answers": [a]}) + "\n"
                             for q, a in zip(QUESTIONS * 2, ["stanley kubrick", "paris", "nile"] * 2, strict=True)))
    run_cli("train", "rag", "--train", train, "--index", paper["root"] / "index", "--generator", paper["root"] / "bart",
            "--model", "fid", "-k", 2, "--steps", 2, "--batch-size", 2, "--val-fraction", 0.2,
            "--out", tmp_path / "run")
    trained = json.loads((tmp_path / "run" / "final" / "run.json").read_text())
    assert trained["model"] == "fid" and trained["question_encoder"] == "question_encoder"
    result = CliRunner().invoke(cli, ["ask", "who?", "--index", str(paper["root"] / "index"), "--generator",
                                      str(paper["root"] / "bart"), "--model", "concat", "-k", 2, "--json"])
    assert result.exit_code == 0, result.output  # the concatenated reader on a seq2seq generator, too
