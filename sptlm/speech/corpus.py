"""Building speech corpora: `sptlm tokenizer build-corpus` (TTS engines render text to real
speech; sptlm/speech/engines.py), and the text they read. Reading a corpus, built or a user's
own, is sptlm/speech/manifest.py.

A built corpus is a directory:
  corpus.json      how it was built (sources, seed, voices, counts); a rebuild must match it
  manifest.jsonl   one utterance a line: {"id", "audio", "text", "split", "engine", "voice",
                   "rate", "pitch", "amplitude", "seconds", "sentence"}; `audio` relative to
                   the dir
  wav/ID.wav       16 kHz mono 16-bit PCM

  lm_text.txt      the normalized sentences of the sources outside the held-out splits: text
                   for the transcription language model (never a held-out sentence)
  building.json    only while a build is under way or was interrupted: the same command goes
                   on from the clips already rendered

Splits: `train` (training sentences, training voices), `test` (held-out sentences, voices seen
in training), `test_voices` (the same held-out sentences, voices never used in training) and
`dev` (other held-out sentences, training voices: for choosing decoding weights and for evals
during training, so `test` stays untouched).
A voice is an espeak-ng accent with a voice variant (`en-gb-scotland+m3`); the held-out voices
are whole variants, so no held-out speaker is heard in training in any accent. With several
engines (plan_engines), held-out sentences are said by every engine and a held-out engine's
clips form `test_engine`. Everything is
drawn from one seed: the same command gives the same bytes.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
from collections.abc import Sequence

import numpy as np
import scipy.io.wavfile
from tqdm import tqdm

from sptlm import paths
from sptlm.errors import InputError, MissingFileError
from sptlm.speech.engines import ENGINES
from sptlm.speech.features import SAMPLE_RATE

DEFAULT_TEXTS = ("data_pipelines/assets/tinyshakespeare.txt",)
FORTUNES_DIR = pathlib.Path("/usr/share/games/fortunes")  # Debian's `fortunes` package
# espeak-ng's English accents (all of them seen in training) ...
ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
           "en-029", "en-us-nyc")
# ... and its voice variants that sound like people (robots, whispers and croaks left out).
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "klatt4", "adam", "Alex", "Alicia", "Andrea", "Andy",
            "Annie", "anika", "antonio", "aunty", "belinda", "benjamin", "boris", "caleb",
            "david", "Denis", "Diogo", "ed", "edward", "Gene", "grandma", "grandpa", "gustave",
            "Henrique", "Hugo", "iven", "Jacky", "john", "Lee", "linda", "marcelo", "Marco",
            "Mario", "max", "Michael", "michel", "miguel", "Mike", "norbert", "paul", "pedro",
            "quincy", "rob", "robert", "sandro", "shelby", "steph", "travis", "victor")
RATES = (130, 200)  # words per minute (espeak's default: 175)
PITCHES = (25, 75)  # 0..99 (default 50)
AMPLITUDES = (60, 140)  # 0..200 (default 100)
LM_TEXT = "lm_text.txt"  # a built corpus's text for the transcription language model
BUILDING = "building.json"  # a build under way or interrupted: which corpus (its fingerprint)
SPLITS = ("train", "test", "test_voices", "dev", "test_engine")  # order fixes per-split seeds
_ALLOWED = re.compile(r"^[A-Za-z][A-Za-z ,.'!?;:\-]*$")


# ---- Text ------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
  """The ASR target form: lower case a-z, apostrophes inside words, single spaces."""
  text = text.lower().replace("\u2019", "'")
  text = re.sub(r"[^a-z']+", " ", text)
  text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)
  return " ".join(text.split())


def _sentences_of(block: str) -> list[str]:
  block = " ".join(block.split())
  return [s.strip() for s in re.split(r"(?<=[.!?;:])\s+", block) if s.strip()]


def read_sentences(path: pathlib.Path, *, min_words: int = 3, max_words: int = 14) -> list[str]:
  """Sentences of a plain text (Shakespeare's plays: speaker lines are dropped) or a fortune
  file (`%` lines between entries; attributions dropped), in file order, filtered to ones that
  espeak-ng reads as written (letters and light punctuation, no digits or abbreviations)."""
  try:
    text = path.read_text(encoding="utf-8", errors="replace")
  except OSError as e:
    raise MissingFileError(f"text source {path}: {e.strerror}") from None
  lines = text.replace("\r\n", "\n").split("\n")
  if sum(line.strip() == "%" for line in lines) > 3:  # a fortune file
    blocks = [b for b in "\n".join(lines).split("\n%\n")]
    blocks = [re.split(r"\n\s*--", b)[0] for b in blocks]  # drop "-- Author"
  else:
    kept = [line for line in lines if not line.rstrip().endswith(":")]
    blocks = "\n".join(kept).split("\n\n")
  out = []
  for block in blocks:
    for s in _sentences_of(block):
      s = s.strip(" -")
      words = s.split()
      if (min_words <= len(words) <= max_words and _ALLOWED.match(s)
          and not re.search(r"\b[A-Z]\.", s) and not re.search(r"--|''", s)):
        out.append(s)
  return out


def _speakable(sentence: str) -> str:
  """ALL-CAPS words are shouting, not acronyms, in these sources: say them as words."""
  return re.sub(r"\b[A-Z]{2,}\b", lambda m: m.group(0).capitalize(), sentence)


def default_texts() -> list[pathlib.Path]:
  return [paths.resolve(p) for p in DEFAULT_TEXTS]


# ---- Planning ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
  id: str
  sentence: str
  split: str
  voice: str
  rate: int
  pitch: int
  amplitude: int
  engine: str = "espeak"

  def record(self) -> dict:
    """What the fingerprint hashes: an espeak-only plan hashes as before engines existed."""
    d = dataclasses.asdict(self)
    if self.engine == "espeak":
      del d["engine"]
    return d


def voices(seed: int, heldout_variants: int) -> tuple[list[str], list[str]]:
  """(training voices, held-out voices): held-out variants are never heard in training."""
  rng = np.random.default_rng([seed, 1])
  order = [VARIANTS[i] for i in rng.permutation(len(VARIANTS))]
  held, kept = sorted(order[:heldout_variants]), sorted(order[heldout_variants:])
  return ([f"{a}+{v}" for a in ACCENTS for v in kept],
          [f"{a}+{v}" for a in ACCENTS for v in held])


def unique_sentences(sentences: Sequence[str]) -> list[str]:
  """First occurrence of each sentence, by its normalized transcript."""
  seen, unique = set(), []
  for s in sentences:
    key = normalize_text(s)
    if key and key not in seen:
      seen.add(key)
      unique.append(s)
  return unique


def plan_corpus(sentences: Sequence[str], *, seed: int, num_train: int, num_test: int,
                heldout_variants: int, num_dev: int = 0) -> list[Plan]:
  """Deduplicates, shuffles and splits the sentences and gives each a voice, rate and pitch."""
  unique = unique_sentences(sentences)
  if len(unique) < num_test + num_dev + 1:
    raise InputError(f"only {len(unique)} usable sentences; need more than --test={num_test} "
                     f"+ --dev={num_dev}")
  order = np.random.default_rng([seed, 0]).permutation(len(unique))
  test = [unique[i] for i in order[:num_test]]
  dev = [unique[i] for i in order[num_test:num_test + num_dev]]
  train = [unique[i] for i in order[num_test + num_dev:num_test + num_dev + num_train]]
  train_voices, held_voices = voices(seed, heldout_variants)
  plans = []
  for split, sents, pool in (("train", train, train_voices), ("test", test, train_voices),
                             ("test_voices", test, held_voices), ("dev", dev, train_voices)):
    for i, s in enumerate(sents):
      rng = np.random.default_rng([seed, 2, SPLITS.index(split), i])
      plans.append(Plan(f"{split}-{i:06d}", s, split, pool[rng.integers(len(pool))],
                        int(rng.integers(RATES[0], RATES[1] + 1)),
                        int(rng.integers(PITCHES[0], PITCHES[1] + 1)),
                        int(rng.integers(AMPLITUDES[0], AMPLITUDES[1] + 1))))
  return plans


def plan_engines(sentences: Sequence[str], *, seed: int, num_train: int, num_test: int,
                 num_dev: int, heldout_variants: int, voice_lists: dict[str, list[str]],
                 heldout_engine: str = "") -> list[Plan]:
  """Like plan_corpus, over several engines: a training or dev sentence is said by one
  training engine (drawn per sentence); every held-out sentence is said by every engine, so
  engines can be compared on the same words. The held-out engine's rows are the
  `test_engine` split and it is never heard in training; `test_voices` are espeak-ng's
  held-out variants as before."""
  from sptlm.speech import engines as engines_lib
  base = plan_corpus(sentences, seed=seed, num_train=num_train, num_test=num_test,
                     heldout_variants=heldout_variants, num_dev=num_dev)
  training = [e for e in voice_lists if e != heldout_engine]
  if not training:
    raise InputError(f"no engine left to train on: --engines has only the held-out engine "
                     f"{heldout_engine!r}")
  pool = {e: v for e, v in voice_lists.items()}
  if "espeak" in pool:
    pool["espeak"] = voices(seed, heldout_variants)[0]
  plans = []

  def draw(split: str, i: int, engine: str, sentence: str, pid: str) -> Plan:
    rng = np.random.default_rng([seed, 2, SPLITS.index(split), i, ENGINES.index(engine)])
    voice = pool[engine][rng.integers(len(pool[engine]))]
    st = engines_lib.get(engine).draw(rng, voice)
    return Plan(pid, sentence, split, voice, st.rate, st.pitch, st.amplitude, engine)

  for p in base:
    i = int(p.id.split("-")[-1])
    if p.split in ("train", "dev"):
      engine = training[np.random.default_rng([seed, 3, SPLITS.index(p.split), i])
                        .integers(len(training))]
      plans.append(p if engine == "espeak" else draw(p.split, i, engine, p.sentence, p.id))
    elif p.split == "test_voices":
      if "espeak" in voice_lists:
        plans.append(p)
    else:  # test: one row per engine
      for engine in voice_lists:
        split = "test_engine" if engine == heldout_engine else "test"
        if engine == "espeak":
          plans.append(p)
        else:
          plans.append(draw(split, i, engine, p.sentence, f"{split}-{i:06d}-{engine}"))
  return plans


# ---- Rendering --------------------------------------------------------------------------------


def espeak_binary() -> str:
  exe = shutil.which("espeak-ng")
  if exe is None:
    raise MissingFileError("espeak-ng is not installed (bash scripts/setup.sh installs it; or "
                           "apt-get install espeak-ng)")
  return exe


def check_voices(exe: str) -> None:
  """espeak-ng falls back to its default voice for an unknown variant: refuse that instead."""
  listing = subprocess.run([exe, "--voices=variant"], capture_output=True, text=True,
                           check=False).stdout
  have = {line.split()[-1].split("/")[-1] for line in listing.splitlines()[1:] if line.split()}
  missing = [v for v in VARIANTS if v not in have]
  if missing:
    raise MissingFileError(f"espeak-ng lacks the voice variants {', '.join(missing[:5])}; "
                           "install the Debian espeak-ng-data package (1.51 or later)")


def render(plan: Plan, wav_path: pathlib.Path, engine) -> float:
  """One sentence -> 16 kHz mono int16 WAV; returns its length in seconds. Raises
  engines.EngineError when the engine fails (the caller skips and counts the utterance)."""
  from sptlm.speech import engines as engines_lib
  x = engine.render(_speakable(plan.sentence), plan.voice,
                    engines_lib.Settings(plan.rate, plan.pitch, plan.amplitude))
  if len(x) == 0:
    raise engines_lib.EngineError(f"{plan.engine} ({plan.voice}) wrote no audio")
  pcm = np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)
  tmp_path = wav_path.with_suffix(".wav.part")
  scipy.io.wavfile.write(tmp_path, SAMPLE_RATE, pcm)
  os.replace(tmp_path, wav_path)
  return len(pcm) / SAMPLE_RATE


def available_engines(names: Sequence[str], *, log=print) -> tuple[dict[str, list[str]],
                                                                    dict[str, str]]:
  """({engine: its voices} of the engines that can render here, {engine: why not} of the
  rest). A missing engine is one line on the log, never an error."""
  from sptlm.speech import engines as engines_lib
  have, skipped = {}, {}
  for name in names:
    if name not in ENGINES:
      raise InputError(f"unknown TTS engine {name!r}; choose from {', '.join(ENGINES)}")
    if name in have or name in skipped:
      continue
    engine = engines_lib.get(name)
    why = engine.missing()
    if why is None and name == "espeak":
      try:
        check_voices(espeak_binary())
      except MissingFileError as e:
        why = str(e)
    if why is None:
      have[name] = engine.voices()
    else:
      skipped[name] = why
      log(f"build-corpus: skipping engine {name}: {why}")
  return have, skipped


def build_corpus(out: str | pathlib.Path, *, texts: Sequence[str | pathlib.Path] = (),
                 seed: int = 0, num_train: int = 4000, num_test: int = 200, num_dev: int = 0,
                 heldout_variants: int = 8, workers: int = 2, progress: bool = True,
                 engines: Sequence[str] = ("espeak",), heldout_engine: str = "",
                 reuse: str | pathlib.Path | None = None, log=print) -> dict:
  """Renders a corpus into `out`; returns its corpus.json. A finished identical build is kept.
  With engines other than espeak-ng, each clip's engine and voice go in the manifest; an engine
  that is not installed is skipped with one line. `reuse`: a finished corpus whose clips with
  the very same plan (the same seed with fewer --train sentences, say) are linked in, not
  rendered again."""
  from sptlm.speech import engines as engines_lib
  out = pathlib.Path(out)
  sources = [pathlib.Path(t) for t in texts] or default_texts()
  for src in sources:
    if not src.is_file():
      raise MissingFileError(f"text source not found: {src}")
  if reuse is not None:
    _check_reuse(pathlib.Path(reuse), out)
  if heldout_engine and heldout_engine not in engines:
    raise InputError(f"--heldout-engine {heldout_engine} is not one of --engines "
                     f"{','.join(engines)}")
  voice_lists, skipped = available_engines(engines, log=log)
  if not voice_lists:
    raise MissingFileError(f"none of the engines {', '.join(engines)} can render here: "
                           + "; ".join(skipped.values()))
  if heldout_engine and heldout_engine not in voice_lists:
    heldout_engine = ""
  sentences = [s for src in sources for s in read_sentences(src)]
  if list(voice_lists) == ["espeak"] and not heldout_engine:
    plans = plan_corpus(sentences, seed=seed, num_train=num_train, num_test=num_test,
                        heldout_variants=heldout_variants, num_dev=num_dev)
  else:
    plans = plan_engines(sentences, seed=seed, num_train=num_train, num_test=num_test,
                         num_dev=num_dev, heldout_variants=heldout_variants,
                         voice_lists=voice_lists, heldout_engine=heldout_engine)
  train_voices, held_voices = voices(seed, heldout_variants)
  fingerprint = hashlib.sha256(json.dumps([p.record() for p in plans]).encode()
                               ).hexdigest()[:16]
  split_names = [s for s in SPLITS if any(p.split == s for p in plans)]
  meta = {"seed": seed, "sources": [str(s) for s in sources], "sample_rate": SAMPLE_RATE,
          "fingerprint": fingerprint,
          "counts": {s: sum(p.split == s for p in plans) for s in split_names},
          "train_voices": train_voices, "heldout_voices": held_voices,
          "rates": RATES, "pitches": PITCHES, "amplitudes": AMPLITUDES}
  if list(engines) != ["espeak"]:
    meta["engines"] = {e: (len(v) if e == "espeak" else v) for e, v in voice_lists.items()}
    meta["heldout_engine"] = heldout_engine or None
    meta["skipped_engines"] = skipped
  meta_path = out / "corpus.json"
  if meta_path.exists():
    old = json.loads(meta_path.read_text())
    if old.get("fingerprint") == fingerprint and (out / "manifest.jsonl").exists():
      return old
    raise InputError(f"{out} holds a different corpus (fingerprint {old.get('fingerprint')} != "
                     f"{fingerprint}); choose another --out or delete it")
  seconds = _resume(out, fingerprint, plans, log)
  if reuse is not None:
    seconds.update(_reuse(pathlib.Path(reuse), out, [p for p in plans if p.id not in seconds],
                          log))
  renderers = {e: engines_lib.get(e) for e in voice_lists}
  failed: dict[str, str] = {}
  todo = [p for p in plans if p.id not in seconds]
  pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
  try:
    jobs = {pool.submit(render, p, out / "wav" / f"{p.id}.wav", renderers[p.engine]): p
            for p in todo}
    desc = "+".join(voice_lists) if len(voice_lists) > 1 else "espeak-ng"
    for job in tqdm(concurrent.futures.as_completed(jobs), total=len(plans),
                    initial=len(seconds), unit="utt", desc=desc, disable=not progress):
      try:
        seconds[jobs[job].id] = job.result()
      except engines_lib.EngineError as e:
        failed[jobs[job].id] = str(e)
  except KeyboardInterrupt:
    log(f"build-corpus: interrupted with {len(seconds)} of {len(plans)} clips in {out}; the "
        "same command goes on from there")
    raise
  finally:  # stop at the clips already under way
    pool.shutdown(wait=True, cancel_futures=True)
  for pid, why in sorted(failed.items())[:5]:
    log(f"build-corpus: skipped {pid}: {why}")
  kept = [p for p in plans if p.id in seconds]
  with (out / "manifest.jsonl.part").open("w") as f:
    for p in kept:
      f.write(json.dumps({"id": p.id, "audio": f"wav/{p.id}.wav",
                          "text": normalize_text(p.sentence), "split": p.split,
                          "engine": p.engine, "voice": p.voice, "rate": p.rate,
                          "pitch": p.pitch, "amplitude": p.amplitude,
                          "seconds": round(seconds[p.id], 4), "sentence": p.sentence}) + "\n")
  os.replace(out / "manifest.jsonl.part", out / "manifest.jsonl")
  heldout = {normalize_text(p.sentence) for p in plans if p.split != "train"}
  lm_text = [t for t in map(normalize_text, unique_sentences(sentences)) if t not in heldout]
  (out / "lm_text.txt.part").write_text("".join(t + "\n" for t in lm_text))
  os.replace(out / "lm_text.txt.part", out / LM_TEXT)
  meta["lm_sentences"] = len(lm_text)
  meta["failed"] = len(failed)
  meta["hours"] = {s: round(sum(seconds.get(p.id, 0.0) for p in plans if p.split == s) / 3600,
                            3) for s in meta["counts"]}
  if "engines" in meta:
    meta["hours_by_engine"] = {
        e: {s: round(sum(seconds.get(p.id, 0.0) for p in plans
                         if p.split == s and p.engine == e) / 3600, 3) for s in meta["counts"]}
        for e in voice_lists}
  meta_path.write_text(json.dumps(meta, indent=2) + "\n")
  (out / BUILDING).unlink(missing_ok=True)
  return json.loads(meta_path.read_text())


def _check_reuse(src: pathlib.Path, out: pathlib.Path) -> None:
  """Refuses a --reuse that is not a finished corpus, before `out` is touched."""
  if not (src / "manifest.jsonl").is_file():
    raise MissingFileError(f"--reuse {src}: no manifest.jsonl there (not a finished "
                           "build-corpus output)")
  if src.resolve() == out.resolve():
    raise InputError(f"--reuse {src} is --out itself; an interrupted build goes on without it")


def _reuse(src: pathlib.Path, out: pathlib.Path, plans: Sequence[Plan], log
           ) -> dict[str, float]:
  """{clip id: seconds} of the clips of the finished corpus `src` whose plan row equals one of
  `plans` (every field, so the audio is what rendering would give), hard-linked (or copied
  across file systems) into `out`; a clip that cannot be read there is left to render."""
  manifest = src / "manifest.jsonl"
  rows = {}
  for line in manifest.read_text().splitlines():
    try:
      row = json.loads(line)
      rows[row["id"]] = row
    except (ValueError, KeyError, TypeError):
      continue  # not a row of ours: nothing to reuse from it
  fields = ("sentence", "split", "engine", "voice", "rate", "pitch", "amplitude")
  done = {}
  for p in plans:
    row = rows.get(p.id)
    if row is None or any(row.get(f) != getattr(p, f) for f in fields):
      continue
    wav, part = out / "wav" / f"{p.id}.wav", out / "wav" / f"{p.id}.wav.part"
    try:
      rate, pcm = scipy.io.wavfile.read(src / row["audio"], mmap=True)
      if rate != SAMPLE_RATE:
        continue
      part.unlink(missing_ok=True)
      try:
        os.link(src / row["audio"], part)
      except OSError:
        shutil.copyfile(src / row["audio"], part)
      os.replace(part, wav)
    except (ValueError, OSError, EOFError):
      continue  # unreadable there: rendered again
    done[p.id] = len(pcm) / rate
  log(f"build-corpus: reused {len(done)} of {len(plans)} clips from {src}")
  return done


def _resume(out: pathlib.Path, fingerprint: str, plans: Sequence[Plan], log) -> dict[str, float]:
  """{clip id: seconds} of the clips an interrupted build of this same corpus already wrote
  into `out` (each WAV is renamed into place whole, so one that exists is complete); marks
  `out` as building this corpus. A partial build of another corpus is an error, not mixed in;
  WAVs without the mark (a build from before it existed) are rendered again."""
  marker = out / BUILDING
  resuming = marker.exists()
  if resuming:
    try:
      was = json.loads(marker.read_text()).get("fingerprint")
    except (ValueError, AttributeError):
      was = None
    if was != fingerprint:
      raise InputError(f"{out} holds a partial build of a different corpus (fingerprint {was} "
                       f"!= {fingerprint}); choose another --out or delete it")
  (out / "wav").mkdir(parents=True, exist_ok=True)
  marker.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
  done = {}
  for p in plans if resuming else ():  # WAVs of an unmarked build are of an unknown corpus
    wav = out / "wav" / f"{p.id}.wav"
    if wav.is_file():
      try:
        rate, pcm = scipy.io.wavfile.read(wav, mmap=True)
      except (ValueError, OSError, EOFError):
        continue  # unreadable: rendered again
      done[p.id] = len(pcm) / rate
  if done:
    log(f"build-corpus: resuming {out}: {len(done)} of {len(plans)} clips already rendered")
  return done
