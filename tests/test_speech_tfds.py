"""`data.corpus=tfds:NAME`: a prepared TFDS speech dataset (librispeech's features: `speech`
audio at its own rate, `text`) is exported once to 16 kHz WAV + manifest and read like any
corpus. TensorFlow is imported inside the test only, so the rest of the suite never loads it."""

import numpy as np
import pytest

from sptlm.speech import manifest as manifest_lib

TEXTS = {"train": ["HELLO WORLD", "IT'S A TEST"], "test": ["GOOD NIGHT"]}


def _prepare_tiny_speech(data_dir: str) -> None:
  """A librispeech-shaped dataset `tiny_speech`: 8 kHz int16 speech (so the export resamples)
  and upper-case text, prepared under data_dir."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinySpeech(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "speech": tfds.features.Audio(sample_rate=8000, dtype=np.int16),
          "text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split) for split in TEXTS}

    def _generate_examples(self, split):
      for i, text in enumerate(TEXTS[split]):
        t = np.arange(8000 * (i + 1)) / 8000  # 1 s, 2 s of a 440 Hz tone
        yield f"{split}-{i}", {"speech": (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16),
                               "text": text}

  TinySpeech(data_dir=data_dir).download_and_prepare()


def test_tfds_speech_dataset_is_exported_and_read(tmp_path, monkeypatch):
  _prepare_tiny_speech(str(tmp_path / "tfds"))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  cache = tmp_path / "cache"
  src = manifest_lib.open_source("tfds:tiny_speech", cache_dir=cache, splits=["train", "test"])
  got = {split: [u.text for u in src.utterances(split)] for split in TEXTS}
  assert sorted(got["train"]) == ["hello world", "it's a test"] and got["test"] == ["good night"]
  lengths = sorted(len(src.load(u)) for u in src.utterances("train"))
  assert lengths == [16000, 32000]  # 1 s and 2 s, resampled from 8 kHz to 16 kHz
  manifest = (cache / "tfds_tiny_speech" / "manifest.jsonl").read_text()
  again = manifest_lib.open_source("tfds:tiny_speech", cache_dir=cache, splits=["train", "test"])
  assert (cache / "tfds_tiny_speech" / "manifest.jsonl").read_text() == manifest  # once
  assert len(again.utterances("train")) == 2
  with pytest.raises(ValueError, match="split 'validation' is not available"):
    manifest_lib.open_source("tfds:tiny_speech", cache_dir=tmp_path / "other",
                       splits=["validation"])
