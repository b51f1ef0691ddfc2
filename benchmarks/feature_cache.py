"""What data.cache_features saves: CPU seconds per training batch of a corpus's train split,
featurized directly, featurized and written to the cache (the first epoch), and read back (every
later epoch). CPU time of this one process (the loader runs in threads beside the train step,
so this is what it takes from the step's cores), on the first N batches of the config's plan.

  python benchmarks/feature_cache.py --config configs/speech_tokenizer_robust_moonshine.py \\
      --corpus runs/speech_corpus_engines --batches 40
"""

import argparse
import pathlib
import shutil
import sys
import tempfile
import time

from sptlm.errors import UserError
from sptlm.speech import config as config_lib
from sptlm.speech import manifest as manifest_lib
from sptlm.speech import input as input_lib
from sptlm.speech import units as units_lib
from sptlm.speech.feature_cache import FeatureCache


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--corpus", required=True)
  p.add_argument("--batches", type=int, default=40)
  p.add_argument("--units", default="", help="a run's asr_units.model (default: train one)")
  args = p.parse_args()
  cfg = config_lib.load(args.config, [f"--config.data.corpus={args.corpus}"])
  m, d = cfg.model, cfg.data
  source = manifest_lib.ManifestSource(pathlib.Path(args.corpus))
  if not args.units:  # the unit model a run would train (only the label lengths matter here)
    args.units = str(pathlib.Path(tempfile.mkdtemp()) / "units.model")
    units_lib.train_units([u.text for u in source.utterances(d.train_split)], cfg.asr.units,
                          pathlib.Path(args.units), cfg.asr.unit_type)
  units = units_lib.Units(pathlib.Path(args.units))
  shapes = input_lib.bucket_shapes(d.bucket_seconds, d.batch_seconds, 1)
  data = input_lib.prepare(source, d.train_split, units, max(n for _, n in shapes),
                           m.ctc_upsample)
  plan = input_lib.plan_batches(data.tokens, shapes, seed=0, epochs=1)[:args.batches]
  audio_s = sum(float(data.tokens[i]) / 12.5 for _, rows in plan for i in rows)
  directory = pathlib.Path(tempfile.mkdtemp(prefix="feature_cache_"))
  print(f"{len(plan)} batches, {audio_s:.0f} s of audio, front end {m.frontend}")
  print("| features | CPU s per batch | wall s per batch |")
  print("|---|---|---|")
  try:
    for name, cache in (("computed directly", None),
                        ("computed and written (first epoch)",
                         FeatureCache(directory, m.frontend, m.num_mels)),
                        ("read back (later epochs)",
                         FeatureCache(directory, m.frontend, m.num_mels))):
      loader = input_lib._Loader(source, data, shapes, m.num_mels, m.ctc_upsample, 0, 1,
                                 m.frontend, cache)
      cpu, wall = time.process_time(), time.perf_counter()
      for entry in plan:
        loader(entry)
      cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
      print(f"| {name} | {cpu / len(plan):.3f} | {wall / len(plan):.3f} |", flush=True)
  finally:
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
  try:
    main()
  except UserError as e:  # a missing corpus or unit model, a bad config: one line
    sys.exit(f"{pathlib.Path(__file__).name}: error: {e}")
