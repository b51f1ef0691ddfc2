#!/usr/bin/env bash
# Creates .venv with sptlm and the pinned dependencies (EXTRAS=test adds the test tools).
set -euo pipefail
cd "$(dirname "$0")/.."
# Text-to-speech engines render the speech tokenizer's real-audio corpora (sptlm tokenizer
# build-corpus --engines espeak,mbrola,flite,festival): espeak-ng, Flite, Festival with its
# English voices, MBROLA's English voices (Debian contrib/non-free, read through a private
# source list so the machine's own is untouched), and modern English text: Debian's fortunes
# (corpus and LM) and WordNet (wordnet-base: `sptlm tokenizer fetch-lm-text --source wordnet`).
# Anything that fails to install is one line here; build-corpus then skips that engine.
TTS_DEBS="espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts fortunes wordnet-base"
MBROLA_DEBS="mbrola mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! command -v espeak-ng >/dev/null || ! command -v flite >/dev/null \
      || ! command -v text2wave >/dev/null || [ ! -d /usr/share/games/fortunes ] \
      || [ ! -d /usr/share/wordnet ]; then
    echo "setup: installing TTS engines with apt-get ($TTS_DEBS)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $TTS_DEBS; } \
      >/dev/null 2>&1 || echo "setup: apt-get could not install some of: $TTS_DEBS" >&2
  fi
  if [ ! -d /usr/share/mbrola/us1 ] && [ -r /etc/os-release ]; then
    . /etc/os-release
    NF=$(mktemp -d)
    mkdir -p "$NF/lists/partial"
    printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian %s contrib non-free\n' "${VERSION_CODENAME:-bookworm}" \
      > "$NF/sources.list"
    APT_NF="-o Dir::Etc::sourcelist=$NF/sources.list -o Dir::State::Lists=$NF/lists"
    echo "setup: installing MBROLA English voices with apt-get ($MBROLA_DEBS)" >&2
    { apt-get update -qq $APT_NF && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq $APT_NF $MBROLA_DEBS; } >/dev/null 2>&1 \
      || echo "setup: MBROLA voices not installed; build-corpus will skip engine mbrola" >&2
    rm -rf "$NF"
  fi
elif ! command -v espeak-ng >/dev/null; then
  echo "setup: espeak-ng is missing; install it (e.g. sudo apt-get install espeak-ng) to build speech corpora" >&2
fi
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "${EXTRAS:-}" ]; then
  .venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
else
  .venv/bin/python -m pip install -q -e .
fi
