"""Real audio for the spoken evals: questions and stories said by espeak-ng, in the layouts
`sptlm eval` reads (README: Evaluation), so the speech side comes from audio through the
speech tokenizer instead of the text-to-token model.

  # WebQuestions' single-answer questions as a LLaMA Questions TSV with a Wav Filename column
  .venv/bin/python benchmarks/spoken_eval_audio.py qa --data ../shared/data/webquestions_test.json \
      --out runs/eval/webq_audio --n 300
  # StoryCloze sentences and endings with an audio manifest
  .venv/bin/python benchmarks/spoken_eval_audio.py storycloze --data runs/eval/heldout_2000.csv \
      --out runs/eval/stories_audio --n 300

One voice for all (en-us, rate 160, pitch 50): a voice the tiny tokenizer was trained on, so
the figures measure the LM and not the tokenizer's reach (issue 16 is about other voices).
"""

import argparse
import csv
import json
import pathlib
import sys

from tqdm import tqdm

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sptlm.eval import spoken_qa, storycloze  # noqa: E402
from sptlm.speech import corpus  # noqa: E402

VOICE, RATE, PITCH, AMPLITUDE = "en-us", 160, 50, 100


def say(text: str, wav: pathlib.Path, exe: str) -> None:
  if not wav.exists():
    corpus.render(corpus.Plan(wav.stem, text, "eval", VOICE, RATE, PITCH, AMPLITUDE), wav, exe)


def questions(data: str, out: pathlib.Path, n: int, exe: str) -> None:
  qs, _ = spoken_qa.read(data)
  single = [q for q in qs if len(q.answers) == 1][:n]  # the TSV holds one answer per row
  rows = ["Questions\tAnswer\tWav Filename\n"]
  for k, q in enumerate(tqdm(single, desc="questions")):
    wav = out / "wav" / f"q{k:05d}.wav"
    say(q.text, wav, exe)
    rows.append(f"{q.text}\t{q.answers[0]}\twav/{wav.name}\n")
  (out / "questions.tsv").write_text("".join(rows))
  print(f"{len(single)} questions -> {out / 'questions.tsv'}")


def stories(data: str, out: pathlib.Path, n: int, exe: str) -> None:
  """The first n stories of the CSV (copied to OUT/stories.csv) and OUT/audio.jsonl."""
  with open(data, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))[:n]
  with open(out / "stories.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=storycloze.COLUMNS)
    w.writeheader()
    w.writerows({c: r[c] for c in storycloze.COLUMNS} for r in rows)
  lines = []
  for r in tqdm(rows, desc="stories"):
    for part in storycloze.COLUMNS[1:7]:
      wav = out / "wav" / f"{r['InputStoryid']}_{part}.wav"
      say(r[part], wav, exe)
      lines.append(json.dumps({"story": r["InputStoryid"], "part": part,
                               "audio": f"wav/{wav.name}"}) + "\n")
  (out / "audio.jsonl").write_text("".join(lines))
  print(f"{len(rows)} stories -> {out / 'stories.csv'}, {out / 'audio.jsonl'}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("kind", choices=("qa", "storycloze"))
  p.add_argument("--data", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--n", type=int, default=300)
  args = p.parse_args()
  out = pathlib.Path(args.out)
  (out / "wav").mkdir(parents=True, exist_ok=True)
  exe = corpus.espeak_binary()
  (questions if args.kind == "qa" else stories)(args.data, out, args.n, exe)


if __name__ == "__main__":
  main()
