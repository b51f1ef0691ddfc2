"""What a tokenizer run compiles: the state and its shardings, the loss, the jitted train step,
and the inference functions (tokens from features, CTC logits from tokens).

State: {"step", "params" (nnx.Param, trained by optax), "opt_state", "vq" (the EMA codebook:
updated inside the step, never by gradients)}.

Loss per batch: CTC (per label unit) + vq.commitment_weight * commitment (per token)
[+ asr.inter_ctc_weight * CTC below the VQ] [+ asr.engine_adversary_weight * (the engine
head's cross-entropy + ramp * the encoder's confusion loss), per token of a known engine].
Metrics: loss, loss_ctc, loss_commit, loss_inter_ctc, loss_engine and engine_accuracy (the
engine head's: near chance means the tokens hide the engine), loss_confusion, grad_norm, lr, code_usage
(fraction of codes used within the last vq.restart_after steps), code_perplexity (of this
batch's codes), codes_restarted, tokens (real 12.5 Hz tokens).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sptlm import sharding
from sptlm.model import nnx_compat
from sptlm.speech import model as model_lib
from sptlm.speech import vq as vq_lib
from sptlm.speech.config import SpeechTokenizerConfig
from sptlm.speech.engines import ADVERSARY_ENGINES
from sptlm.train import optimizer as optimizer_lib

BATCH_NAMES = {"mel": ("batch", None, None), "valid": ("batch", None),
               "labels": ("batch", None), "label_paddings": ("batch", None),
               "engine": ("batch",)}


def make_model(cfg: SpeechTokenizerConfig, units: int) -> model_lib.SpeechTokenizerModel:
  engines = len(ADVERSARY_ENGINES) if cfg.asr.engine_adversary_weight > 0 else 0
  return model_lib.build(cfg.model, cfg.vq.codebook_size, units, cfg.train.seed,
                         inter_ctc=cfg.asr.inter_ctc_weight > 0, code_dim=cfg.vq.code_dim,
                         normalize_codes=cfg.vq.normalize, engine_classes=engines)


def adversary_ramp(step: jax.Array, steps: int) -> jax.Array:
  """The weight of the encoder's engine-confusion loss at `step`: 2 / (1 + exp(-10 p)) - 1 with
  p the share of training done (Ganin & Lempitsky 2015's schedule), so the encoder first
  learns the words while the head learns the engines, and is asked to hide them only once
  both mean something."""
  p = jnp.asarray(step, jnp.float32) / max(steps, 1)
  return 2.0 / (1.0 + jnp.exp(-10.0 * p)) - 1.0


def split_graphdef(model: nnx.Module) -> nnx.GraphDef:
  return nnx.split(model, nnx.Param, vq_lib.CodebookState)[0]


def split(model: nnx.Module) -> tuple[nnx.GraphDef, dict, dict]:
  graphdef, params, vq = nnx.split(model, nnx.Param, vq_lib.CodebookState)
  return graphdef, params.to_pure_dict(), vq.to_pure_dict()


def loss_fn(params: dict, vq_state: dict, graphdef: nnx.GraphDef, batch: dict[str, jax.Array],
            commitment_weight: float, quantize: jax.Array,
            inter_ctc_weight: float = 0.0, engine_weight: float = 0.0,
            confusion: jax.Array | float = 1.0, dropout: float = 0.0,
            dropout_key: jax.Array | None = None,
            mel_keep_B: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CTC + commitment; before vq.warmup_steps (`quantize` false) the layers above the
  bottleneck see the unquantized encoder output while the codebook already follows it.
  `mel_keep_B`: which utterances keep a hybrid's log-mel stem (model.mel_stem_dropout)."""
  model = nnx.merge(graphdef, params, vq_state)
  valid_BxN = batch["valid"] > 0
  enc = model.encode(batch["mel"], valid_BxN, mel_keep_B)
  z_BxNxC = model.to_code_space(enc.h_BxNxD)
  out = model.vq(z_BxNxC)
  if model.vq.normalize:
    z_BxNxC = vq_lib.l2_normalize(z_BxNxC).astype(out.quantized_BxNxD.dtype)
  above_BxNxC = jnp.where(quantize, out.quantized_BxNxD, z_BxNxC)
  drop = model_lib.Dropout(dropout, dropout_key) if dropout > 0 else None
  logits_BxNxU = model.ctc_logits(model.from_code_space(above_BxNxC), valid_BxN, drop)
  frames_valid = jnp.repeat(valid_BxN, model.cfg.ctc_upsample, axis=1)
  ctc_B = optax.ctc_loss(logits_BxNxU, 1.0 - frames_valid.astype(jnp.float32), batch["labels"],
                         batch["label_paddings"], blank_id=0)
  n_labels = jnp.maximum(jnp.sum(1.0 - batch["label_paddings"]), 1.0)
  w_BxN = valid_BxN.astype(jnp.float32)
  n_tokens = jnp.maximum(jnp.sum(w_BxN), 1.0)
  loss_ctc = jnp.sum(ctc_B) / n_labels
  loss_commit = jnp.sum(out.commitment_BxN * w_BxN) / n_tokens
  loss = loss_ctc + commitment_weight * loss_commit
  loss_inter = jnp.zeros((), jnp.float32)
  if inter_ctc_weight > 0:
    frames_valid_BxT = jnp.repeat(valid_BxN, model.cfg.pool, axis=1)
    inter_B = optax.ctc_loss(model.inter_ctc_logits(enc.frames_BxTxD),
                             1.0 - frames_valid_BxT.astype(jnp.float32), batch["labels"],
                             batch["label_paddings"], blank_id=0)
    loss_inter = jnp.sum(inter_B) / n_labels
    loss = loss + inter_ctc_weight * loss_inter
  loss_engine = engine_accuracy = loss_confusion = jnp.zeros((), jnp.float32)
  if engine_weight > 0:
    # the head learns the engines from features it cannot move...
    engine_B = batch["engine"]
    target_BxN = jnp.broadcast_to(jnp.maximum(engine_B, 0)[:, None], valid_BxN.shape)
    known_BxN = w_BxN * (engine_B >= 0)[:, None]
    n_known = jnp.maximum(jnp.sum(known_BxN), 1.0)
    logits_BxNxE = model.engine_logits(jax.lax.stop_gradient(enc.h_BxNxD))
    ce_BxN = optax.softmax_cross_entropy_with_integer_labels(logits_BxNxE, target_BxN)
    loss_engine = jnp.sum(ce_BxN * known_BxN) / n_known
    right_BxN = (jnp.argmax(logits_BxNxE, axis=-1) == target_BxN).astype(jnp.float32)
    engine_accuracy = jnp.sum(right_BxN * known_BxN) / n_known
    # ...and the encoder learns to leave the (frozen) head unsure among the batch's engines:
    # cross-entropy to the uniform over them, bounded below by its log, unlike a reversed
    # gradient, which lets the encoder win by making the head ever more confidently wrong
    present_E = jnp.zeros(logits_BxNxE.shape[-1]).at[jnp.maximum(engine_B, 0)].max(
        (engine_B >= 0).astype(jnp.float32))
    uniform_E = present_E / jnp.maximum(jnp.sum(present_E), 1.0)
    logp_BxNxE = jax.nn.log_softmax(model.engine_logits(enc.h_BxNxD, frozen=True))
    loss_confusion = jnp.sum(-jnp.sum(logp_BxNxE * uniform_E, -1) * known_BxN) / n_known
    loss = loss + engine_weight * (loss_engine + confusion * loss_confusion)
  aux = {"loss_ctc": loss_ctc, "loss_commit": loss_commit, "loss_inter_ctc": loss_inter,
         "loss_engine": loss_engine, "engine_accuracy": engine_accuracy,
         "loss_confusion": loss_confusion,
         "h": z_BxNxC,
         "codes": out.codes_BxN, "tokens": jnp.sum(w_BxN)}
  return loss, aux


def make_train_step(cfg: SpeechTokenizerConfig, graphdef: nnx.GraphDef,
                    optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable[[dict, dict], tuple[dict, dict]]:
  v = cfg.vq
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  base_key = jax.random.key(cfg.train.seed)

  def train_step(state: dict, batch: dict[str, jax.Array]) -> tuple[dict, dict]:
    params, vq_state, step = state["params"], state["vq"], state["step"]
    step_key = jax.random.fold_in(base_key, step)
    mel_keep_B = None
    if cfg.model.mel_stem_dropout > 0:  # drawn from the step alone, as the dropout masks
      mel_keep_B = jax.random.bernoulli(jax.random.fold_in(step_key, 2),
                                        1.0 - cfg.model.mel_stem_dropout,
                                        (batch["mel"].shape[0],))
    (loss, aux), grads = grad_fn(params, vq_state, graphdef, batch, v.commitment_weight,
                                 step >= v.warmup_steps, cfg.asr.inter_ctc_weight,
                                 cfg.asr.engine_adversary_weight,
                                 adversary_ramp(step, cfg.train.steps), cfg.asr.dropout,
                                 jax.random.fold_in(step_key, 1), mel_keep_B)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    new_vq, stats = vq_lib.ema_update(
        vq_state["vq"], aux["h"], aux["codes"], batch["valid"], decay=v.ema_decay,
        restart_after=v.restart_after, key=step_key)
    metrics = {"loss": loss, "loss_ctc": aux["loss_ctc"], "loss_commit": aux["loss_commit"],
               "loss_inter_ctc": aux["loss_inter_ctc"], "loss_engine": aux["loss_engine"],
               "engine_accuracy": aux["engine_accuracy"], "loss_confusion": aux["loss_confusion"],
               "grad_norm": grad_norm, "lr": schedule(step), "code_usage": stats.usage,
               "code_perplexity": stats.perplexity, "codes_restarted": stats.restarted,
               "tokens": aux["tokens"]}
    return {"step": step + 1, "params": params, "opt_state": opt_state,
            "vq": {"vq": new_vq}}, metrics

  return train_step


@dataclasses.dataclass
class Program:
  cfg: SpeechTokenizerConfig
  mesh: Mesh
  graphdef: nnx.GraphDef
  abstract_state: Any
  state_sharding: Any
  batch_sharding: dict[str, NamedSharding]
  init: Callable[[], dict]
  step: Any
  num_params: int

  def global_batch(self, local: dict[str, Any]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(self.batch_sharding[k], local[k])
            for k in BATCH_NAMES}


def _shardings(mesh: Mesh, rules, state: Any) -> Any:
  names = nnx_compat.param_names(state)
  return jax.tree.map(lambda n: sharding.named(mesh, rules, n), names,
                      is_leaf=lambda x: isinstance(x, tuple))


def build(cfg: SpeechTokenizerConfig, mesh: Mesh, units: int) -> Program:
  rules = cfg.mesh.rules
  abstract_model = nnx.eval_shape(lambda: make_model(cfg, units))
  graphdef, abstract_params, abstract_vq = nnx.split(abstract_model, nnx.Param,
                                                     vq_lib.CodebookState)
  param_sharding = _shardings(mesh, rules, abstract_params)
  vq_sharding = _shardings(mesh, rules, abstract_vq)
  opt = optimizer_lib.make(cfg.train)
  sched = optimizer_lib.schedule(cfg.train)
  pure_params = abstract_params.to_pure_dict()
  abstract_opt = jax.eval_shape(opt.init, pure_params)
  replicated = NamedSharding(mesh, P())
  opt_sharding = optax.tree_map_params(opt, lambda _, s: s, abstract_opt, param_sharding,
                                       transform_non_params=lambda _: replicated)
  state_sharding = {"step": replicated, "params": param_sharding, "opt_state": opt_sharding,
                    "vq": vq_sharding}
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": pure_params,
              "opt_state": abstract_opt, "vq": abstract_vq.to_pure_dict()}
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)

  def init() -> dict:
    _, params, vq_state = split(make_model(cfg, units))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt.init(params),
            "vq": vq_state}

  batch_sharding = {k: sharding.named(mesh, rules, n) for k, n in BATCH_NAMES.items()}
  train_step = make_train_step(cfg, graphdef, opt, sched)

  def step_in_mesh(state, batch):
    with sharding.logical_rules(mesh, rules):
      return train_step(state, batch)

  jitted = jax.jit(step_in_mesh, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, replicated), donate_argnums=0)
  num_params = sum(x.size for x in jax.tree.leaves(pure_params))
  return Program(cfg, mesh, graphdef, abstract_state, state_sharding, batch_sharding,
                 jax.jit(init, out_shardings=state_sharding), jitted, num_params)


# ---- Inference ------------------------------------------------------------------------------


def make_inference(graphdef: nnx.GraphDef) -> tuple[Callable, Callable]:
  """(tokenize(params, vq, mel, valid) -> codes, logits(params, vq, codes, valid) -> logits)."""

  @jax.jit
  def tokenize(params, vq_state, mel_BxFxM, valid_BxN):
    return nnx.merge(graphdef, params, vq_state).tokenize(mel_BxFxM, valid_BxN > 0)

  @jax.jit
  def logits(params, vq_state, codes_BxN, valid_BxN):
    return nnx.merge(graphdef, params, vq_state).logits_from_codes(codes_BxN, valid_BxN > 0)

  return tokenize, logits
