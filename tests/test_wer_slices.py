"""WER / CER sliced by text source and voice from `evaluate --transcripts` rows."""

import json

import pytest

from benchmarks import wer_slices as script
from sptlm.errors import InputError, MissingFileError
from sptlm.speech import wer_slices


def _row(ref, engine="espeak", voice="en-us+m3", words=4, word_edits=1, chars=20, char_edits=2):
  return {"id": ref, "split": "test", "engine": engine, "voice": voice, "condition": "clean",
          "ref": ref, "hyp": "", "greedy": "", "words": words, "word_edits": word_edits,
          "chars": chars, "char_edits": char_edits}


@pytest.fixture
def corpus(tmp_path):
  fortunes = tmp_path / "fortunes"
  fortunes.mkdir()
  (fortunes / "a").write_text("%\n".join(f"Fortune number {w} is here.\n"
                                         for w in ("one", "two", "three", "four")) + "%\n")
  (fortunes / "b").write_text("%\n".join(f"Another fortune called {w}.\n"
                                         for w in ("red", "blue", "green", "gold")) + "%\n")
  (tmp_path / "plays.txt").write_text("KING:\nWhat light through yonder window breaks.\n")
  sources = [str(tmp_path / "plays.txt"), str(fortunes / "a"), str(fortunes / "b")]
  out = tmp_path / "corpus"
  out.mkdir()
  (out / "corpus.json").write_text(json.dumps({"sources": sources}))
  return out, sources


def test_slices_by_source_and_voice(corpus):
  _, sources = corpus
  labels = wer_slices.source_labels(sources)
  assert labels["what light through yonder window breaks"] == "plays"
  assert labels["fortune number two is here"] == "fortunes"  # files sharing a folder
  assert labels["another fortune called gold"] == "fortunes"
  rows = [_row("what light through yonder window breaks", word_edits=3, words=6),
          _row("fortune number two is here", voice="en-gb-scotland+f2", word_edits=0, words=5),
          _row("another fortune called gold", voice="en-gb-scotland+m1", word_edits=2),
          _row("a sentence from nowhere", engine="flite", voice="slt")]
  t = wer_slices.slice_rows(rows, labels, ["source", "voice"])
  assert t[("test", "clean", "espeak", "all", "all")].utterances == 3
  assert t[("test", "clean", "espeak", "all", "all")].wer == pytest.approx(5 / 15)
  both = t[("test", "clean", "espeak", "fortunes", "en-gb-scotland")]
  assert (both.utterances, both.word_edits, both.words) == (2, 2, 9)
  assert t[("test", "clean", "espeak", "plays", "en-us")].wer == pytest.approx(0.5)
  assert t[("test", "clean", "flite", wer_slices.UNMATCHED, "slt")].cer == pytest.approx(0.1)
  text = wer_slices.table(wer_slices.slice_rows(rows, labels, ["source"]), ["source"])
  lines = text.splitlines()
  assert lines[2] == "| test | clean | espeak | all | 3 | 33.3% | 10.0% |"  # 'all' first
  assert "| test | clean | espeak | fortunes | 2 | 22.2% | 10.0% |" in lines


def test_missing_source_counts_as_unmatched(corpus, tmp_path):
  _, sources = corpus
  logged = []
  labels = wer_slices.source_labels(sources + [str(tmp_path / "gone.txt")], log=logged.append)
  assert len(logged) == 1 and "gone.txt" in logged[0]
  assert "fortune number one is here" in labels


def test_bad_transcripts_name_the_file(tmp_path):
  with pytest.raises(MissingFileError, match="--transcripts"):
    wer_slices.read_transcripts(tmp_path / "none.jsonl")
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(_row("a b c")) + "\n{not json\n")
  with pytest.raises(InputError, match=r"bad.jsonl:2: not JSON"):
    wer_slices.read_transcripts(bad)
  bad.write_text(json.dumps({"split": "test"}) + "\n")
  with pytest.raises(InputError, match=r"bad.jsonl:1: missing engine"):
    wer_slices.read_transcripts(bad)
  bad.write_text("\n")
  with pytest.raises(InputError, match="no transcripts"):
    wer_slices.read_transcripts(bad)
  with pytest.raises(InputError, match="unknown slice 'speaker'"):
    wer_slices.slice_rows([_row("a b c")], {}, ["speaker"])


def test_script_prints_the_table(corpus, tmp_path, capsys):
  out, _ = corpus
  t = tmp_path / "t.jsonl"
  t.write_text(json.dumps(_row("fortune number one is here")) + "\n")
  assert script.main(["--transcripts", str(t), "--corpus", str(out), "--by", "voice"]) == 0
  assert "| test | clean | espeak | en-us | 1 | 25.0% | 10.0% |" in capsys.readouterr().out
  assert script.main(["--transcripts", str(t), "--corpus", str(tmp_path)]) == 2
  assert "no corpus.json" in capsys.readouterr().err
