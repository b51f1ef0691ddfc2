"""StoryCloze-format stories from text the main job never saw: Shakespeare plays outside
tinyshakespeare (`sptlm tokenizer fetch-lm-text --out runs/lm_text/shakespeare`; the plays that
share 6-grams with tinyshakespeare are left out, as for the speech tokenizer's LM).

  .venv/bin/python benchmarks/storycloze_heldout.py --plays runs/lm_text/shakespeare \
      --out runs/eval/heldout_stories.csv --n 400

A story is five consecutive sentences of one play (4 to 20 words each): four of context and
the fifth as the right ending; the wrong ending is the fifth sentence of another story
(another place, usually another play), so sStoryCloze here is already a topic change.
"""

import argparse
import csv
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sptlm.speech import corpus, lm_text  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--plays", default="runs/lm_text/shakespeare")
  p.add_argument("--train-text", default="data_pipelines/assets/tinyshakespeare.txt")
  p.add_argument("--out", default="runs/eval/heldout_stories.csv")
  p.add_argument("--n", type=int, default=400)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  seen = [corpus.normalize_text(s) for s in corpus.read_sentences(pathlib.Path(args.train_text),
                                                           min_words=1, max_words=10_000)]
  kept = lm_text.read([args.plays], heldout=seen)
  print(f"plays: {len(kept.files)} kept, {len(kept.excluded)} left out (they share text with "
        f"{args.train_text})")
  rng = np.random.default_rng(args.seed)
  stories = []
  for f in kept.files:
    sents = corpus.read_sentences(pathlib.Path(f), min_words=4, max_words=20)
    starts = list(range(0, len(sents) - 5, 5))
    for s in rng.permutation(starts)[: max(1, args.n // len(kept.files) + 1)]:
      stories.append(sents[s:s + 5])
  stories = [stories[i] for i in rng.permutation(len(stories))[:args.n]]
  wrong = rng.permutation(len(stories))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  with out.open("w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3",
                "InputSentence4", "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2",
                "AnswerRightEnding"])
    for i, (story, j) in enumerate(zip(stories, wrong)):
      j = (j + 1) % len(stories) if j == i else j
      right_first = rng.random() < 0.5
      endings = (story[4], stories[j][4]) if right_first else (stories[j][4], story[4])
      w.writerow([f"heldout-{i:04d}", *story[:4], *endings, "1" if right_first else "2"])
  print(f"{len(stories)} stories -> {out}")


if __name__ == "__main__":
  main()
