"""data.cache_features: a slow front end's features (moonshine_tiny) kept per clip on disk, and
the batches read back from it equal to the batches computed directly (moonshine_tiny_mel too,
from the same files), and `sptlm tokenizer train` with it gives the losses of a run without."""

import json
import logging
import pathlib
import re
import shutil

import numpy as np
import pytest
import scipy.io.wavfile

from sptlm.speech import config as config_lib
from sptlm.speech import feature_cache
from sptlm.speech import input as input_lib
from sptlm.speech.augment import AugmentConfig
from sptlm.speech.feature_cache import FeatureCache
from sptlm.speech.manifest import ManifestSource

from speech_cli_helpers import ROOT, TINY, metrics, run  # noqa: E402  (tests/ is on sys.path)
from speech_cli_helpers import corpus_dir, env  # noqa: E402,F401  (fixtures)
from test_speech_embedding import _speechlike  # noqa: E402

pytest.importorskip("onnxruntime")
pytest.importorskip("moonshine_voice")
FRONTEND, DIM = "moonshine_tiny", 288


def _corpus(root: pathlib.Path, clips: int = 6) -> tuple[ManifestSource, input_lib.Prepared]:
  rng = np.random.default_rng(0)
  (root / "wav").mkdir(parents=True)
  rows = []
  for k in range(clips):
    x = _speechlike(float(rng.uniform(0.5, 1.5)), seed=k)
    scipy.io.wavfile.write(root / "wav" / f"{k}.wav", 16_000, (x * 20_000).astype(np.int16))
    rows.append({"id": str(k), "audio": f"wav/{k}.wav", "text": "a b", "split": "train"})
  (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  source = ManifestSource(root)
  utts = source.utterances("train")
  tokens = [input_lib.num_tokens(len(source.load(u))) for u in utts]
  labels = [rng.integers(1, 30, 4).astype(np.int32) for _ in utts]
  return source, input_lib.Prepared(utts, np.asarray(tokens), labels, 0, 0)


def _batches(source, data, cache, steps, frontend=FRONTEND, num_mels=DIM,
             augment=AugmentConfig()):
  shapes = input_lib.bucket_shapes((2.0,), 4.0, 1)  # 2 clips a batch: 3 batches an epoch
  it = input_lib.train_iterator(source, data, shapes, steps=steps, seed=3, num_mels=num_mels,
                                ctc_upsample=4, frontend=frontend, cache=cache,
                                augment=augment)
  return [next(it) for _ in range(steps)]


def _assert_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_from_the_cache_equal_the_batches_computed_directly(tmp_path):
  source, data = _corpus(tmp_path / "corpus")
  direct = _batches(source, data, None, 7)  # a little over two epochs
  cache = FeatureCache(tmp_path / "features", FRONTEND, DIM)
  _assert_equal(_batches(source, data, cache, 7), direct)
  # every clip featurized, every request answered; how many are read back in this first run
  # depends on the loader threads' timing (two may featurize one clip at an epoch's edge, and
  # on a busy machine several), so the read-back is proved by the resumed run below
  assert cache.misses >= 6 and cache.hits + cache.misses >= 14 and cache.recomputed == 0
  assert len(list((tmp_path / "features").rglob("*.npy"))) == 6
  assert not list((tmp_path / "features").rglob("*.tmp*"))
  again = FeatureCache(tmp_path / "features", FRONTEND, DIM)  # a resumed run: all read back
  _assert_equal(_batches(source, data, again, 7), direct)
  assert again.misses == 0 and again.hits >= 14


def test_the_hybrid_front_end_reads_moonshines_cache_and_adds_the_log_mel(tmp_path):
  source, data = _corpus(tmp_path / "corpus")
  hybrid = dict(frontend="moonshine_tiny_mel", num_mels=DIM + 128)
  direct = _batches(source, data, None, 4, **hybrid)
  assert direct[0]["mel"].shape[-1] == DIM + 128
  first = FeatureCache(tmp_path / "features", FRONTEND, DIM)  # as a moonshine_tiny run left it
  for u in data.utts:
    first.get(source.path(u), source.load(u))
  cache = FeatureCache(tmp_path / "features", *feature_cache.CACHED["moonshine_tiny_mel"])
  _assert_equal(_batches(source, data, cache, 4, **hybrid), direct)
  assert cache.misses == 0 and cache.hits >= 8


def test_mel_only_augmentation_noises_the_log_mel_and_keeps_moonshines_cached_features(tmp_path):
  source, data = _corpus(tmp_path / "corpus")
  hybrid = dict(frontend="moonshine_tiny_mel", num_mels=DIM + 128)
  noisy = AugmentConfig(enabled=True, mel_only=True, speed_prob=0.0, noise_prob=1.0)
  clean = _batches(source, data, None, 4, **hybrid)
  uncached = _batches(source, data, None, 4, **hybrid, augment=noisy)
  cache = FeatureCache(tmp_path / "features", *feature_cache.CACHED["moonshine_tiny_mel"])
  cached = _batches(source, data, cache, 4, **hybrid, augment=noisy)
  _assert_equal(cached, uncached)  # the cache changes nothing, and the draws are the seed's
  assert cache.misses >= 6 and not cache.recomputed
  for c, a in zip(clean, cached):
    np.testing.assert_array_equal(a["mel"][..., :DIM], c["mel"][..., :DIM])  # Moonshine: clean
    for k in ("valid", "labels", "label_paddings"):
      np.testing.assert_array_equal(a[k], c[k], err_msg=k)
    frames = np.repeat(c["valid"], 8, axis=1).astype(bool)
    assert np.abs(a["mel"][..., DIM:] - c["mel"][..., DIM:])[frames].mean() > 0.05  # noisy
  again = FeatureCache(tmp_path / "features", *feature_cache.CACHED["moonshine_tiny_mel"])
  _assert_equal(_batches(source, data, again, 4, **hybrid, augment=noisy), cached)
  assert again.misses == 0


def test_mel_only_augmentation_refuses_what_it_cannot_keep_aligned(tmp_path):
  source, data = _corpus(tmp_path / "corpus", clips=2)
  shapes = input_lib.bucket_shapes((2.0,), 4.0, 1)
  for frontend, augment, match in [
      ("moonshine_tiny_mel", AugmentConfig(enabled=True, mel_only=True), "speed_prob=0"),
      (FRONTEND, AugmentConfig(enabled=True, mel_only=True, speed_prob=0.0), "moonshine_tiny_mel")]:
    with pytest.raises(ValueError, match=match):
      input_lib.train_iterator(source, data, shapes, steps=1, seed=0, num_mels=DIM + 128,
                               frontend=frontend, augment=augment)
  for overrides, match in [
      (["--config.data.augment.enabled=True", "--config.data.augment.mel_only=True"],
       "moonshine_tiny_mel"),
      (["--config.model.frontend=moonshine_tiny_mel", "--config.model.num_mels=416",
        "--config.data.augment.enabled=True", "--config.data.augment.mel_only=True",
        "--config.data.augment.warp_prob=0", "--config.data.augment.eq_prob=0",
        "--config.data.augment.freq_masks=0", "--config.data.augment.time_masks=0"],
       "speed_prob=0")]:
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.load(ROOT / "configs" / "speech_tokenizer_robust_moonshine.py", overrides)


def test_a_corrupt_or_misshapen_file_is_featurized_again(tmp_path):
  source, data = _corpus(tmp_path / "corpus")
  direct = _batches(source, data, None, 3)
  first = FeatureCache(tmp_path / "features", FRONTEND, DIM)  # filled without loader threads,
  for u in data.utts:  # so that none still writes a file after it is spoiled below
    first.get(source.path(u), source.load(u))
  files = sorted((tmp_path / "features").rglob("*.npy"))
  files[0].write_bytes(files[0].read_bytes()[:100])  # cut short, as by a crash mid-copy
  np.save(files[1], np.zeros((3, DIM), np.float32))  # a readable array of the wrong shape
  cache = FeatureCache(tmp_path / "features", FRONTEND, DIM)
  _assert_equal(_batches(source, data, cache, 3), direct)
  assert cache.recomputed >= 2 and cache.misses == cache.recomputed and cache.hits >= 4
  assert np.load(files[0]).shape[1] == DIM  # rewritten whole


def test_a_rewritten_audio_file_is_not_served_stale_features(tmp_path):
  source, data = _corpus(tmp_path / "corpus", clips=1)
  utt = data.utts[0]
  cache = FeatureCache(tmp_path / "features", FRONTEND, DIM)
  before = cache.get(source.path(utt), source.load(utt))
  y = _speechlike(1.0, seed=99)
  scipy.io.wavfile.write(source.path(utt), 16_000, (y * 20_000).astype(np.int16))
  after = cache.get(source.path(utt), source.load(utt))
  assert cache.misses == 2 and not np.array_equal(before[:len(after)], after)


def test_an_unwritable_directory_warns_once_and_still_gives_the_features(tmp_path, caplog):
  source, data = _corpus(tmp_path / "corpus", clips=2)
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  cache = FeatureCache(blocker / "features", FRONTEND, DIM)
  good = FeatureCache(tmp_path / "features", FRONTEND, DIM)
  with caplog.at_level(logging.WARNING):
    for u in data.utts:
      np.testing.assert_array_equal(cache.get(source.path(u), source.load(u)),
                                    good.get(source.path(u), source.load(u)))
  assert sum("cannot be written" in r.message for r in caplog.records) == 1


def test_augmented_audio_is_never_cached(tmp_path):
  source, data = _corpus(tmp_path / "corpus", clips=2)
  with pytest.raises(ValueError, match="augment"):
    input_lib.train_iterator(source, data, input_lib.bucket_shapes((2.0,), 4.0, 1), steps=1,
                             seed=0, num_mels=DIM, frontend=FRONTEND,
                             augment=AugmentConfig(enabled=True),
                             cache=FeatureCache(tmp_path / "f", FRONTEND, DIM))


def test_the_switch_defaults_on_and_older_configs_load_with_it():
  cfg = config_lib.load(pathlib.Path(__file__).resolve().parents[1] / "configs" /
                        "speech_tokenizer_robust_moonshine.py")
  assert cfg.data.cache_features
  raw = json.loads(config_lib.to_json(cfg))
  del raw["data"]["cache_features"]  # a work directory from before the switch
  assert config_lib.from_json(json.dumps(raw)).data.cache_features
  off = config_lib.load(pathlib.Path(__file__).resolve().parents[1] / "configs" /
                        "speech_tokenizer_robust_moonshine.py",
                        ["--config.data.cache_features=False"])
  assert not off.data.cache_features


def test_moonshine_features_from_the_cache_train_exactly_as_computed(corpus_dir, env, tmp_path):
  """data.cache_features through `sptlm tokenizer train`: the first epoch writes each clip's
  Moonshine features, later epochs read them back, and the losses equal a run without it."""
  if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed (scripts/setup.sh)")
  args = ["train", "--config", str(ROOT / "configs" / "speech_tokenizer_robust_moonshine.py"),
          f"--config.data.corpus={corpus_dir}", "--config.train.steps=4", *TINY,
          "--config.asr.lm_order=0", "--config.data.tune_split=", "--config.model.num_mels=288"]
  _, err = run([*args, "--workdir", str(tmp_path / "cached"),
                 f"--config.data.cache_dir={tmp_path / 'cache'}"], env)
  files = list((tmp_path / "cache" / "features").rglob("*.npy"))
  assert len(files) == 8  # the 8 training clips, one batch an epoch
  read_back = re.search(r"feature cache: (\d+) clips read back, (\d+) featurized", err)
  # (two loader threads may both featurize a clip at an epoch's edge)
  assert read_back and int(read_back[1]) >= 8 and int(read_back[2]) >= 8, err[-2000:]
  run([*args, "--workdir", str(tmp_path / "direct"), "--config.data.cache_features=False"],
       env)
  assert not (tmp_path / "direct" / "cache" / "features").exists()
  cached, direct = metrics(tmp_path / "cached"), metrics(tmp_path / "direct")
  assert [r["step"] for r in cached] == [1, 2, 3, 4]
  assert [r["loss"] for r in cached] == [r["loss"] for r in direct]
