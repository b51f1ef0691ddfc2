"""asr.lm_text: extra LM text is read from files and directories, and nothing that overlaps the
held-out sentences gets through (a source of the test sentences is left out whole)."""

import pytest

from sptlm.speech import lm_text

HELDOUT = ["the quality of mercy is not strained at all", "now is the winter of our discontent"]


def test_documents_sharing_heldout_sentences_are_left_out(tmp_path):
  docs = tmp_path / "plays"
  docs.mkdir()
  # another edition of the source: the held-out sentences among others
  (docs / "source.txt").write_text(
      "Now is the winter of our discontent. Made glorious summer by this sun.\n\n"
      "The quality of mercy is not strained at all. It droppeth as the gentle rain.\n")
  # an unrelated text that happens to repeat one held-out sentence word for word
  (docs / "other.txt").write_text(
      "ROMEO:\nBut soft, what light through yonder window breaks.\n\n"
      "Now is the winter of our discontent.\n")
  (docs / "latin1.txt").write_bytes("Caf\xe9 au lait.".encode("latin-1"))  # not UTF-8
  (docs / "empty.txt").write_text("\n\n")
  result = lm_text.read([docs], HELDOUT)
  assert result.sentences == ["but soft what light through yonder window breaks"]
  assert result.excluded == [str(docs / "source.txt")]
  assert sorted(result.unreadable) == [str(docs / "empty.txt"), str(docs / "latin1.txt")]
  assert result.dropped_sentences == 1
  assert "1 sentences from 1 file(s)" in result.summary()


def test_files_are_read_whole_and_missing_paths_named(tmp_path):
  f = tmp_path / "a.txt"
  f.write_text("One two three. Four five!\n")
  assert lm_text.read([f], []).sentences == ["one two three", "four five"]
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    lm_text.read([tmp_path / "nope.txt"], [])
