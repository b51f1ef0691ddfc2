"""Reading speech corpora: a built corpus (sptlm.speech.corpus), a user's manifest of audio
path + transcript, or a TFDS speech dataset exported once to WAV files and a manifest. Every
trainer, evaluator and benchmark reads its utterances through ManifestSource."""

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Sequence

import numpy as np
import scipy.io.wavfile
from tqdm import tqdm

from sptlm import paths
from sptlm.errors import InputError, MissingFileError
from sptlm.speech import audio as audio_lib
from sptlm.speech.corpus import normalize_text
from sptlm.speech.features import SAMPLE_RATE


@dataclasses.dataclass(frozen=True)
class Utterance:
  id: str
  audio: str  # a path (absolute, or relative to the corpus directory), or "tfds:..." index
  text: str  # normalized transcript: the ASR target
  split: str = "train"
  voice: str = ""
  seconds: float = 0.0
  engine: str = ""  # the TTS engine of a built corpus ("" for a user's recordings)


class ManifestSource:
  """A build-corpus directory, or a user's manifest: JSON lines {"audio", "text"[, "split",
  "id"]} or TSV lines `path<TAB>transcript[<TAB>split]` (one header line allowed). Relative
  audio paths are taken from the manifest's directory; without a split every line is `train`."""

  def __init__(self, path: pathlib.Path):
    if path.is_dir():
      path = path / "manifest.jsonl"
    if not path.is_file():
      raise MissingFileError(f"corpus manifest not found: {path} (run `sptlm tokenizer "
                             "build-corpus --out DIR` or set data.corpus)")
    self.name = str(path)
    self.root = path.parent
    self._utts = self._read(path)

  def _read(self, path: pathlib.Path) -> list[Utterance]:
    utts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
      if not line.strip():
        continue
      if path.suffix == ".jsonl":
        try:
          row = json.loads(line)
          audio, text = row["audio"], row["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
          raise InputError(f"{path}:{n}: want a JSON object with 'audio' and 'text'") from None
        utts.append(Utterance(str(row.get("id", n)), audio, normalize_text(text),
                              row.get("split", "train"), row.get("voice", ""),
                              float(row.get("seconds", 0.0)), row.get("engine", "")))
      else:
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 2:
          raise InputError(f"{path}:{n}: want `audio path<TAB>transcript`")
        if n == 1 and parts[0].lower() in ("path", "audio", "file", "wav"):
          continue
        utts.append(Utterance(str(n), parts[0], normalize_text(parts[1]),
                              parts[2] if len(parts) > 2 else "train"))
    return utts

  def splits(self) -> list[str]:
    return sorted({u.split for u in self._utts})

  def utterances(self, split: str) -> list[Utterance]:
    got = [u for u in self._utts if u.split == split]
    if not got:
      raise InputError(f"corpus {self.name} has no utterances in split {split!r} "
                       f"(it has: {', '.join(self.splits())})")
    return got

  def path(self, utt: Utterance) -> pathlib.Path:
    p = pathlib.Path(utt.audio)
    return p if p.is_absolute() else self.root / p

  def load(self, utt: Utterance) -> np.ndarray:
    """16 kHz mono float32 samples of one utterance."""
    return audio_lib.read(self.path(utt), mix_channels=True, max_seconds=3600).samples


def export_tfds(spec: str, out: pathlib.Path, splits: Sequence[str]) -> pathlib.Path:
  """Writes a TFDS speech dataset (`tfds:librispeech`, features `speech` and `text`) out as
  16 kHz WAV files plus a manifest, once; needs tensorflow-datasets and the prepared data
  (under $TFDS_DATA_DIR, else TFDS's default ~/tensorflow_datasets)."""
  name = spec.removeprefix("tfds:")
  manifest = out / "manifest.jsonl"
  if manifest.exists():
    return manifest
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise InputError(f"data.corpus={spec!r} needs tensorflow-datasets (pip install "
                     "tensorflow-datasets tensorflow-cpu) and the dataset prepared") from None
  (out / "wav").mkdir(parents=True, exist_ok=True)
  with (out / "manifest.jsonl.part").open("w") as f:
    for split in splits:
      try:
        ds, info = tfds.load(name, split=split, with_info=True, download=False,
                             data_dir=os.environ.get("TFDS_DATA_DIR") or None)
      except Exception as e:  # noqa: BLE001 - any TFDS failure is a setup problem to report
        raise InputError(f"TFDS {name!r} split {split!r} is not available: "
                         f"{str(e).splitlines()[0][:200]}") from None
      rate = getattr(info.features["speech"], "sample_rate", SAMPLE_RATE)
      for i, ex in enumerate(tqdm(tfds.as_numpy(ds), desc=f"export {name}:{split}")):
        uid = f"{split}-{i:07d}"
        x = audio_lib.prepare(ex["speech"], rate, uid, max_seconds=3600).samples
        pcm = np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)
        scipy.io.wavfile.write(out / "wav" / f"{uid}.wav", SAMPLE_RATE, pcm)
        f.write(json.dumps({"id": uid, "audio": f"wav/{uid}.wav", "split": split,
                            "text": normalize_text(ex["text"].decode()),
                            "seconds": len(pcm) / SAMPLE_RATE}) + "\n")
  os.replace(out / "manifest.jsonl.part", manifest)
  return manifest


def open_source(spec: str, *, cache_dir: pathlib.Path, splits: Sequence[str]) -> ManifestSource:
  """`data.corpus` -> its manifest: a directory, a manifest file, or `tfds:NAME[/CONFIG]`
  (exported under `cache_dir` on first use)."""
  if spec.startswith("tfds:"):
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.removeprefix("tfds:"))
    return ManifestSource(export_tfds(spec, cache_dir / f"tfds_{safe}", splits))
  return ManifestSource(paths.resolve(spec))
