"""The combined MTP loss, L = L_main + lambda / D * sum_k L_k, computed one depth at a time so
that only one B x T x V logits tensor is ever live.

Shape legend: B batch, W window = T + D + 1 tokens, T positions, D model width, V vocab.
A window holds every target of every depth; a token id < 0 marks a missing token (padding),
and positions whose target is missing are left out of that depth's mean.
"""

import functools

import jax
import jax.numpy as jnp

from mtp_jax.config import ModelConfig, parse_schedule
from mtp_jax.model import MTPLanguageModel, project


@functools.partial(jax.checkpoint, static_argnums=(5,))
def _depth_stats(h_BxTxD, scale_D, out, targets_BxT, mask_BxT, cfg: ModelConfig):
  """Summed cross-entropy and correct count of one depth. Rematerialized: the backward pass
  recomputes this depth's logits instead of keeping them, which bounds peak memory to one
  logits tensor whatever D is."""
  logits_BxTxV = project(h_BxTxD, scale_D, out, cfg)
  safe_targets = jnp.maximum(targets_BxT, 0)
  target_logit = jnp.take_along_axis(logits_BxTxV, safe_targets[..., None], axis=-1)[..., 0]
  nll_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1) - target_logit
  correct_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
  return jnp.sum(nll_BxT * mask_BxT), jnp.sum(correct_BxT * mask_BxT)


def _hidden_states(module: MTPLanguageModel, inputs_BxT, tokens_BxW):
  """Every depth's hidden state plus its head weights, in one pass through the model."""
  hidden = module.hidden_states(inputs_BxT, tokens_BxW)
  return hidden, [module.head_weights(k) for k in range(len(hidden))]


def depth_sums(params, tokens_BxW, cfg: ModelConfig):
  """Per depth k = 0..D: (summed loss, correct count, target count) over the window."""
  T = tokens_BxW.shape[1] - cfg.mtp_depth - 1
  hidden, weights = MTPLanguageModel(cfg).apply(params, tokens_BxW[:, :T], tokens_BxW,
                                                method=_hidden_states)
  sums = []
  for k, (h, (scale, out)) in enumerate(zip(hidden, weights)):
    targets = tokens_BxW[:, k + 1:k + 1 + T]
    mask = (targets >= 0).astype(jnp.float32)
    loss_sum, correct = _depth_stats(h, scale, out, targets, mask, cfg)
    sums.append((loss_sum, correct, jnp.sum(mask)))
  return sums


def loss_weight(step, base: float, schedule: str):
  """lambda at `step`: `base`, replaced by each 'STEP:WEIGHT' entry from its step on."""
  weight = jnp.float32(base)
  for start, value in parse_schedule(schedule):
    weight = jnp.where(step >= start, jnp.float32(value), weight)
  return weight


def combined_loss(params, tokens_BxW, cfg: ModelConfig, weight):
  """Returns (L, metrics) with per-depth mean loss and top-1 accuracy."""
  sums = depth_sums(params, tokens_BxW, cfg)
  metrics = {}
  for k, (loss_sum, correct, count) in enumerate(sums):
    count = jnp.maximum(count, 1.0)
    metrics[f'loss/depth_{k}'] = loss_sum / count
    metrics[f'accuracy/depth_{k}'] = correct / count
  main = metrics['loss/depth_0']
  total = main
  if cfg.mtp_depth:
    mtp = sum(metrics[f'loss/depth_{k}'] for k in range(1, cfg.mtp_depth + 1)) / cfg.mtp_depth
    total = main + weight * mtp
  metrics['loss/total'] = total
  return total, metrics
