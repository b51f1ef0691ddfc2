"""Evaluation during training: eval.tasks on eval.limit items every eval.every steps.

The train state's parameters are scored in place (same mesh, same sharding; the scoring
program compiles once per shape, not once per eval). Each task's results JSON and per-example
JSONL go to DIR/eval/step_STEP/, TensorBoard scalars under DIR/tensorboard/eval, and the
accuracies (perplexities) join metrics.jsonl at that step as eval_TASK_SETTING.
"""

from collections.abc import Callable
from typing import Any

import jax

from data_pipelines import text_input
from sptlm import paths
from sptlm.config import Config
from sptlm.errors import InputError


def check(cfg: Config) -> None:
  """Fails before training starts when an eval task or file cannot be used."""
  from etils import epath

  from sptlm.eval import runner
  for task, data in cfg.eval.tasks:
    if task not in runner.TASKS:
      raise InputError(f"eval.tasks: {task!r} is not one of: {', '.join(runner.TASKS)}")
    if not epath.Path(data).exists():
      raise InputError(f"eval.tasks: data file {data} for task {task} not found")


def make(cfg: Config, workdir: str, mesh: jax.sharding.Mesh
         ) -> Callable[[int, dict[str, Any]], dict[str, float]]:
  """fn(step, train state) -> {eval_TASK_SETTING: figure} for loop.Periodic."""
  from sptlm.eval import runner
  from sptlm.eval.lm import LanguageModel
  check(cfg)
  tokenizer = text_input.load_tokenizer(paths.resolve(cfg.vocab.text_tokenizer),
                                        cfg.vocab.text_size)

  def fn(step: int, state: dict[str, Any]) -> dict[str, float]:
    lm = LanguageModel.from_params(cfg, step, state["params"], tokenizer, mesh, workdir)
    row: dict[str, float] = {}
    for task, data in cfg.eval.tasks:
      settings = [s for s in cfg.eval.settings
                  if s in (runner.PPL_SETTINGS if task == "perplexity" else runner.SETTINGS)]
      out = f"{workdir}/eval/step_{step}/{task}.json"
      for r in runner.evaluate(workdir, task, data, settings=settings or None,
                               limit=cfg.eval.limit, out=out, lm=lm):
        tag = f"eval_{r['task']}_{r['setting'].replace('->', '_to_')}"
        row[tag] = r["perplexity"] if r["task"] == "perplexity" else r["accuracy"]
    return row

  return fn
