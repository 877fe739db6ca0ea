import json

import pytest
from conftest import write_jsonl

from ragline.corpus.readers import ReadStats, detect_format, read_corpus
from ragline.errors import RaglineError


def test_jsonl_reads_ids_titles_and_defaults(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"id": 7, "title": " Paris ", "text": "Paris is big."},
                                           {"text": "No id or title here."}])
    docs = list(read_corpus(f))
    assert [(d.id, d.title, d.text) for d in docs] == [("7", "Paris", "Paris is big."),
                                                        ("line-2", "", "No id or title here.")]
    assert detect_format(f) == "jsonl"


@pytest.mark.parametrize("line, problem", [
    ("{not json", "c.jsonl:2: not valid JSON"),
    ("", "c.jsonl:2: empty line"),
    ('{"id": "b", "title": "B"}', 'c.jsonl:2: record has no "text" field'),
    ('{"id": "b", "text": "   "}', "c.jsonl:2: record has an empty"),
    ("[1, 2]", "c.jsonl:2: a JSON list, not an object"),
    ('{"id": "a", "text": "again"}', "document id 'a' appears twice"),
])
def test_jsonl_bad_lines_name_line_and_fix(tmp_path, line, problem):
    f = tmp_path / "c.jsonl"
    f.write_text('{"id": "a", "text": "fine"}\n' + line + "\n" + '{"id": "c", "text": "fine too"}\n')
    with pytest.raises(RaglineError) as e:
        list(read_corpus(f))
    assert problem in str(e.value) and "--skip-bad" in str(e.value)
    stats = ReadStats()
    docs = list(read_corpus(f, skip_bad=True, stats=stats))
    assert [d.id for d in docs] == ["a", "c"] and stats.skipped == 1
    assert problem.split(": ", 1)[-1][:10] in stats.problems[0]


def test_kilt_knowledge_source(tmp_path):
    rec = {"_id": "12", "wikipedia_id": "12", "wikipedia_title": "Anarchism",
           "text": ["Anarchism\n", "Anarchism is a political philosophy.\n", "Section::::History.\n",
                    "BULLET::::- Early roots.\n", "It spread widely.\n"]}
    f = write_jsonl(tmp_path / "kilt.jsonl", [rec])
    assert detect_format(f) == "kilt"
    (doc,) = read_corpus(f)
    assert (doc.id, doc.title) == ("12", "Anarchism")
    assert doc.text == "Anarchism is a political philosophy.\nEarly roots.\nIt spread widely."
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"wikipedia_id": "1", "text": "not a list"}])
    with pytest.raises(RaglineError, match="not a KILT knowledge-source record"):
        list(read_corpus(bad, "kilt"))


def test_text_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "moon_landing.txt").write_text("Apollo 11 landed in 1969.")
    (tmp_path / "mars.md").write_text("# Mars\n\nThe fourth planet.")
    (tmp_path / "ignored.csv").write_text("a,b")
    docs = list(read_corpus(tmp_path))
    assert [(d.id, d.title, d.text.strip()) for d in docs] == [
        ("mars.md", "Mars", "The fourth planet."),
        ("sub/moon_landing.txt", "moon landing", "Apollo 11 landed in 1969.")]
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(RaglineError, match="empty.txt: empty file"):
        list(read_corpus(tmp_path))


def test_bundled_wiki_leads():
    docs = list(read_corpus("wiki-leads", limit=5))
    assert len(docs) == 5 and docs[1].title == "2001: A Space Odyssey" and "Kubrick" in docs[1].text
    assert all(d.id == d.title for d in docs)


def test_unknown_format_and_missing_source(tmp_path):
    with pytest.raises(RaglineError, match="unknown corpus format 'xml'"):
        list(read_corpus(tmp_path, "xml"))
    with pytest.raises(RaglineError, match="does not exist"):
        list(read_corpus(tmp_path / "nope.jsonl"))
    (tmp_path / "x.xyz").write_bytes(b"%PDF")
    with pytest.raises(RaglineError, match="cannot tell the format"):
        list(read_corpus(tmp_path / "x.xyz"))
    (tmp_path / "x.pdf").write_bytes(b"%PDF")  # a PDF is a document: read as one, and refused as malformed
    with pytest.raises(RaglineError, match=r"x\.pdf: not a readable PDF"):
        list(read_corpus(tmp_path / "x.pdf"))
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(RaglineError, match="is empty"):
        list(read_corpus(tmp_path / "e.jsonl"))


def test_all_records_bad_is_an_error_even_when_skipping(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"id": 1}) + "\n")
    with pytest.raises(RaglineError, match="holds no usable document"):
        list(read_corpus(f, skip_bad=True))
