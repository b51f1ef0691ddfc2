"""`sptlm tokenizer evaluate`: how well speech tokens hold across engines and conditions.

For each held-out split of a built corpus, per TTS engine (the manifest's `engine`) and per
condition (clean, noisy: pink noise at 10 dB SNR, telephone: 300-3400 Hz through 8 kHz), it
reports WER with the LM and greedy, CER beside each (CER does not depend on the LM's
vocabulary), code usage and perplexity. Token agreement says how speaker-independent the codes
are: the same sentence said by two engines (or by one engine clean and noisy), its two token
sequences aligned by edit distance, the share of aligned positions whose tokens are equal
(matches / the longer sequence).
"""

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

from sptlm.speech import augment as augment_lib
from sptlm.speech import wer as wer_lib
from sptlm.speech.features import SAMPLE_RATE
from sptlm.speech.manifest import ManifestSource, Utterance
from sptlm.speech.tokenizer import SpeechTokenizer

NOISY_SNR_DB = 10.0
SAMPLES_PER_TOKEN = SAMPLE_RATE * 2 // 25  # 1,280: one token per 80 ms
CONDITIONS = ("clean", "noisy", "telephone")


def condition(x: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
  """The test audio of one condition; deterministic for the rng."""
  if name == "clean":
    return x
  if name == "noisy":
    return augment_lib.add_noise(x, NOISY_SNR_DB, "pink", rng)
  if name == "telephone":
    return augment_lib.telephone(x)
  raise ValueError(f"unknown condition {name!r}; choose from {', '.join(CONDITIONS)}")


def align_matches(a: Sequence[int], b: Sequence[int]) -> int:
  """Equal tokens on a minimum-edit alignment of a and b (ties broken toward matches)."""
  n, m = len(a), len(b)
  # cost[i][j]: edits for a[:i] vs b[:j]; keep (cost, -matches) so ties prefer matches.
  prev = [(j, 0) for j in range(m + 1)]
  for i in range(1, n + 1):
    cur = [(i, 0)] + [(0, 0)] * m
    for j in range(1, m + 1):
      same = a[i - 1] == b[j - 1]
      diag = (prev[j - 1][0] + (not same), prev[j - 1][1] - same)
      cur[j] = min(diag, (prev[j][0] + 1, prev[j][1]), (cur[j - 1][0] + 1, cur[j - 1][1]))
    prev = cur
  return -prev[m][1]


def agreement(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
  """Matches over the summed longer lengths, for a set of token-sequence pairs."""
  matches = sum(align_matches(a.tolist(), b.tolist()) for a, b in pairs)
  return matches / max(sum(max(len(a), len(b)) for a, b in pairs), 1)


def code_stats(codes: Sequence[np.ndarray], k: int) -> dict[str, float]:
  counts = np.bincount(np.concatenate(list(codes)), minlength=k)
  p = counts[counts > 0] / counts.sum()
  return {"code_usage": float(np.mean(counts > 0)),
          "code_perplexity": float(np.exp(-np.sum(p * np.log(p))))}


@dataclasses.dataclass
class Cell:
  """One (split, engine, condition): its utterances' tokens and transcripts."""

  utts: list[Utterance]
  codes: list[np.ndarray]
  hyps: list[str]
  greedy: list[str]
  samples: list[int]  # audio length of each utterance

  def scores(self, k: int) -> dict:
    refs = [u.text for u in self.utts]
    seconds = sum(self.samples) / SAMPLE_RATE
    return {"utterances": len(refs), "wer": wer_lib.wer(refs, self.hyps),
            "cer": wer_lib.cer(refs, self.hyps), "wer_greedy": wer_lib.wer(refs, self.greedy),
            "cer_greedy": wer_lib.cer(refs, self.greedy), **code_stats(self.codes, k),
            "audio_s": round(seconds, 1),
            "one_token_per_1280_samples": all(
                len(c) == -(-n // SAMPLES_PER_TOKEN) for c, n in zip(self.codes, self.samples))}

  def transcripts(self, condition: str) -> list[dict]:
    """One row per utterance, for error analysis: reference, both transcripts, and the word
    and character edits behind the cell's WER and CER."""
    return [{"id": u.id, "split": u.split, "engine": u.engine, "voice": u.voice,
             "condition": condition, "ref": u.text, "hyp": hyp, "greedy": greedy,
             "words": len(u.text.split()),
             "word_edits": wer_lib.edit_distance(u.text.split(), hyp.split()),
             "chars": len(u.text), "char_edits": wer_lib.edit_distance(list(u.text), list(hyp))}
            for u, hyp, greedy in zip(self.utts, self.hyps, self.greedy)]


def run_cell(tok: SpeechTokenizer, source: ManifestSource, utts: list[Utterance], cond: str,
             seed: int) -> Cell:
  audios = []
  for i, u in enumerate(utts):
    rng = np.random.default_rng([seed, CONDITIONS.index(cond), i])
    audios.append(condition(source.load(u), cond, rng))
  codes = tok.encode(audios)
  hyps = tok.decode(codes)
  greedy = [tok.units.greedy(lp.argmax(-1)) for lp in tok.log_probs(codes)]
  return Cell(utts, codes, hyps, greedy, [len(a) for a in audios])


def chunked_vs_whole(tok: SpeechTokenizer, audio: np.ndarray) -> dict:
  """Long audio encoded in the tokenizer's windows vs in one piece: the share of equal tokens
  (rotary positions and a bounded receptive field make it 1.0)."""
  chunked = tok.encode([audio])[0]
  whole_tok = SpeechTokenizer(tok.cfg, tok.units, tok.params, tok.vq_state, batch=1)
  whole_tok.window = len(chunked) + 1
  whole = whole_tok.encode([audio])[0]
  return {"seconds": round(len(audio) / SAMPLE_RATE, 2), "tokens": len(chunked),
          "tokens_whole": len(whole), "agreement": float(np.mean(chunked == whole))
          if len(chunked) == len(whole) else 0.0}


def _by_engine(utts: Sequence[Utterance]) -> dict[str, list[Utterance]]:
  out: dict[str, list[Utterance]] = {}
  for u in utts:
    out.setdefault(u.engine or "unknown", []).append(u)
  return out


def evaluate(tok: SpeechTokenizer, source: ManifestSource, *,
             splits: Sequence[str] = ("test", "test_engine"),
             conditions: Sequence[str] = CONDITIONS, limit: int = 0, seed: int = 0,
             long_seconds: float = 60.0, progress: bool = True, transcripts: bool = False,
             log: Callable[[str], None] = print) -> dict:
  """{"cells": [{split, engine, condition, wer, cer, ...}], "agreement": {...}, "long_audio":
  {...}}: long_audio is `long_seconds` of one group's speech (when longer than a window)
  encoded in windows and in one piece. `transcripts` adds "transcripts": every utterance's
  row (Cell.transcripts)."""
  for c in conditions:
    if c not in CONDITIONS:
      raise ValueError(f"unknown condition {c!r}; choose from {', '.join(CONDITIONS)}")
  have = source.splits()
  groups = []
  for split in splits:
    if split not in have:
      log(f"evaluate: corpus has no split {split!r}; skipped")
      continue
    for engine, utts in sorted(_by_engine(source.utterances(split)).items()):
      groups.append((split, engine, utts[:limit] if limit else utts))
  cells: dict[tuple[str, str, str], Cell] = {}
  jobs = [(g, c) for g in groups for c in conditions]
  for (split, engine, utts), cond in tqdm(jobs, desc="evaluate", unit="cell",
                                          disable=not progress):
    cells[(split, engine, cond)] = run_cell(tok, source, utts, cond, seed)
  k = tok.codebook_size
  rows = [{"split": s, "engine": e, "condition": c, **cell.scores(k)}
          for (s, e, c), cell in cells.items()]
  result = {"cells": rows, "agreement": agreements(cells, conditions)}
  if transcripts:
    result["transcripts"] = [row for (_, _, c), cell in cells.items()
                             for row in cell.transcripts(c)]
  if long_seconds and groups:  # 30 s windows vs one pass, on the last group's speech
    _, _, utts = groups[-1]
    audio = np.concatenate([source.load(u) for u in utts[:60]])[:int(long_seconds
                                                                       * SAMPLE_RATE)]
    if len(audio) > tok.window * SAMPLES_PER_TOKEN:
      result["long_audio"] = chunked_vs_whole(tok, audio)
  return result


def agreements(cells: dict[tuple[str, str, str], Cell], conditions: Sequence[str]) -> dict:
  """Across engines (clean audio, the same sentence), and clean vs each condition."""
  clean = {(s, e): cell for (s, e, c), cell in cells.items() if c == "clean"}
  by_text: dict[str, dict[str, np.ndarray]] = {}
  for (_, engine), cell in clean.items():
    for u, code in zip(cell.utts, cell.codes):
      by_text.setdefault(u.text, {})[engine] = code
  engines = sorted({e for (_, e) in clean})
  across = {}
  for a, b in itertools.combinations(engines, 2):
    pairs = [(d[a], d[b]) for d in by_text.values() if a in d and b in d]
    if pairs:
      across[f"{a}~{b}"] = {"sentences": len(pairs), "agreement": agreement(pairs)}
  within = {}
  for (s, e, c), cell in cells.items():
    if c != "clean" and (s, e) in clean:
      within[f"{s}/{e}/clean~{c}"] = agreement(list(zip(clean[(s, e)].codes, cell.codes)))
  return {"across_engines": across, "clean_vs_condition": within}


def table(result: dict) -> str:
  """A Markdown table of the cells: one row per split and engine, WER / CER per condition."""
  conds = list(dict.fromkeys(r["condition"] for r in result["cells"]))
  head = ["split", "engine", "utt."] + [f"{c} WER (greedy) / CER" for c in conds] + ["codes"]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  keyed = {(r["split"], r["engine"], r["condition"]): r for r in result["cells"]}
  for split, engine in dict.fromkeys((r["split"], r["engine"]) for r in result["cells"]):
    cells = [keyed.get((split, engine, c)) for c in conds]
    first = next(c for c in cells if c)
    row = [split, engine, str(first["utterances"])]
    row += [f"{c['wer']:.1%} ({c['wer_greedy']:.1%}) / {c['cer']:.1%}" if c else "-"
            for c in cells]
    row.append(f"{first['code_usage']:.0%}")
    lines.append("| " + " | ".join(row) + " |")
  long = result.get("long_audio")
  if long:
    lines += ["", f"{long['seconds']} s of speech in windows vs one pass: {long['tokens']} vs "
              f"{long['tokens_whole']} tokens, {long['agreement']:.1%} equal"]
  agree = result.get("agreement", {}).get("across_engines", {})
  if agree:
    lines += ["", "| engines | sentences | token agreement |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['sentences']} | {v['agreement']:.1%} |" for k, v in agree.items()]
  return "\n".join(lines)
