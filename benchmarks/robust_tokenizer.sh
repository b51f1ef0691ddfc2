#!/usr/bin/env bash
# Issue 16's benchmark: the tokenizer trained on four TTS engines with augmentation, scored per
# engine and condition, with Piper's neural voice held out of training (BENCHMARKS.md,
# "Speech tokenizer across engines"). Each step prints its wall time; the evaluate steps write
# runs/speech_robust/evaluate.json (and wer_slices.md: WER by text source and voice) and, for
# the espeak-only tokenizer of benchmarks/speech_tokenizer.py when runs/speech_tiny exists,
# runs/speech_tiny/evaluate_engines.json.
# The small model: CONFIG=configs/speech_tokenizer_small.py WORKDIR=runs/speech_small $0
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
SPTLM=(.venv/bin/python -m sptlm.cli tokenizer)
CORPUS=${CORPUS:-runs/speech_corpus_engines}
WORKDIR=${WORKDIR:-runs/speech_robust}
CONFIG=${CONFIG:-configs/speech_tokenizer_robust.py}  # or configs/speech_tokenizer_small_moonshine.py
time "${SPTLM[@]}" build-corpus --out "$CORPUS" --fortunes \
  --engines espeak,mbrola,flite,festival,piper --heldout-engine piper \
  --train 10000 --test 300 --dev 200
time "${SPTLM[@]}" fetch-lm-text --out runs/lm_text/shakespeare
time "${SPTLM[@]}" fetch-lm-text --source wordnet --out runs/lm_text/wordnet
time "${SPTLM[@]}" train --config "$CONFIG" --workdir "$WORKDIR" \
  --config.data.corpus="$CORPUS" "--config.asr.lm_text=('runs/lm_text/shakespeare','runs/lm_text/wordnet')" "$@"
time "${SPTLM[@]}" evaluate --workdir "$WORKDIR" --corpus "$CORPUS" \
  --splits test,test_engine,test_voices --out "$WORKDIR/evaluate.json" \
  --transcripts "$WORKDIR/transcripts.jsonl"
.venv/bin/python benchmarks/wer_slices.py --transcripts "$WORKDIR/transcripts.jsonl" \
  --corpus "$CORPUS" --by source,voice > "$WORKDIR/wer_slices.md"
if [ -d runs/speech_tiny ]; then
  time "${SPTLM[@]}" evaluate --workdir runs/speech_tiny --corpus "$CORPUS" \
    --splits test,test_engine,test_voices --out runs/speech_tiny/evaluate_engines.json
fi
