"""The combined MTP loss, L = L_main + lambda / D * sum_k L_k, computed one depth at a time so
that only one B x T x V logits tensor is ever live; and the heads-only loss on a frozen trunk,
from token windows or from cached trunk features.

Shape legend: B batch, W window = T + D + 1 tokens (D here the MTP depth), T positions, V vocab,
K kept entries of a sparse target distribution, N draft-vocabulary size, F the width of the
trunk's cached features (model width, or more with mtp.feature_layers).
A window holds every target of every depth; a token id < 0 marks a missing token (padding),
and positions whose target is missing are left out of that depth's mean.

Every depth is scored against a sparse target distribution (ids, probabilities): the data's next
token (K = 1), or with train.head_loss=distill the trunk's own top-K next-token distribution at
position i + k, which is what speculative acceptance rewards. With a draft vocabulary the heads'
softmax covers only its N tokens and the targets are renormalised over them. With
train.feature_weight > 0 each head is also fitted to the trunk's hidden state at i + k (EAGLE's
feature regression), which decides the trunk's whole next-token distribution there.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from mtp_jax.config import ModelConfig, parse_schedule
from mtp_jax.layers import greedy, rms_norm
from mtp_jax.model import MTPLanguageModel, project

# A depth's SUMS, what its metrics are means of: 'loss', 'count', 'correct', 'data_count' and
# 'agree', and with feature regression 'feature' and 'feature_count' (_feature_gap).


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """Static settings of the loss (part of the compiled step's identity)."""
  cfg: ModelConfig
  head_loss: str = 'data'  # or 'distill'
  topk: int = 32  # entries of the trunk's distribution kept as a distill target
  frozen: bool = False  # the trunk is not trained: its loss is reported, not optimized
  feature_weight: float = 0.0  # weight of each head's feature gap in its loss (0: not computed)
  remat: bool = True  # recompute each depth's logits in the backward pass (see _stats)
  mask_rows: bool = True  # on rows packed into a window, attention stays within each row


def _depth_stats(h_BxTxD, scale_D, out, ids_BxTxK, p_BxTxK, data_BxT, cfg: ModelConfig,
                 topk: int):
  """One depth's sums against a sparse target (ids < 0 carry no mass; a position with no mass is
  left out): cross-entropy, positions, matches with the data token and with the target's first
  entry. With topk > 0 also returns this depth's own top-k distribution (the trunk's, for
  distillation). Called through _stats."""
  logits_BxTxV = project(h_BxTxD, scale_D, out, cfg)
  p = jnp.where(ids_BxTxK >= 0, p_BxTxK, 0.0)
  mass_BxT = jnp.sum(p, axis=-1)
  weight_BxT = (mass_BxT > 0).astype(jnp.float32)
  p = p / jnp.where(mass_BxT > 0, mass_BxT, 1.0)[..., None]
  target_logits = jnp.take_along_axis(logits_BxTxV, jnp.maximum(ids_BxTxK, 0), axis=-1)
  nll_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1) - jnp.sum(p * target_logits, axis=-1)
  pred_BxT = greedy(logits_BxTxV)
  sums = {'loss': jnp.sum(nll_BxT * weight_BxT), 'count': jnp.sum(weight_BxT),
          'correct': jnp.sum((pred_BxT == data_BxT) & (data_BxT >= 0)),
          'data_count': jnp.sum(data_BxT >= 0),
          'agree': jnp.sum((pred_BxT == ids_BxTxK[..., 0]) * weight_BxT)}
  if not topk:
    return sums, None
  logp, ids = jax.lax.top_k(jax.nn.log_softmax(jax.lax.stop_gradient(logits_BxTxV)), topk)
  return sums, (ids, jnp.exp(logp))


_REMAT_STATS = jax.checkpoint(_depth_stats, static_argnums=(6, 7))


def _stats(spec: LossSpec):
  """_depth_stats as the loss calls it: with spec.remat, rematerialized (the backward pass
  recomputes each depth's logits instead of keeping them, which bounds peak memory to one logits
  tensor whatever D is, for one more output projection per depth); else the logits are kept
  from the forward pass."""
  return _REMAT_STATS if spec.remat else _depth_stats


def _normed(h_BxTxD, scale_D, cfg: ModelConfig):
  """The first D features normalised in float32, as the output matrix reads them."""
  return rms_norm(h_BxTxD[..., :cfg.d_model].astype(jnp.float32), scale_D, cfg.norm_eps)


def _feature_gap(normed_BxTxD, target_BxTxD, valid_BxT):
  """Sums of the smooth-L1 distance (mean over the width) between a depth's normalised output and
  the trunk's normalised last hidden state at i + k, the vector the output matrix reads there:
  EAGLE's feature regression, in the space where both meet the output matrix. Positions where
  valid_BxT is False are left out."""
  gap_BxT = jnp.mean(optax.huber_loss(normed_BxTxD, target_BxTxD, delta=1.0), axis=-1)
  weight_BxT = valid_BxT.astype(jnp.float32)
  return {'feature': jnp.sum(gap_BxT * weight_BxT), 'feature_count': jnp.sum(weight_BxT)}


def _one_hot_target(tokens_BxT):
  return tokens_BxT[..., None], jnp.ones(tokens_BxT.shape + (1,), jnp.float32)


def _shift(x_BxTx, k: int, fill):
  """x at position i + k for every position i (fill past the end)."""
  pad = jnp.full((x_BxTx.shape[0], k) + x_BxTx.shape[2:], fill, x_BxTx.dtype)
  return jnp.concatenate([x_BxTx[:, k:], pad], axis=1)


def draft_index(draft_ids_N, vocab_size: int):
  """V -> position in the draft vocabulary, -1 for a token outside it."""
  return jnp.full((vocab_size,), -1, jnp.int32).at[draft_ids_N].set(
      jnp.arange(draft_ids_N.shape[0], dtype=jnp.int32))


def _head_sums(hidden, weights, targets, data, spec: LossSpec, draft_ids):
  """Sums of depths 1..D. targets[k] = (ids, probs) of depth k in full-vocabulary ids; hidden[0]
  is the trunk's, whose state at i + k is depth k's feature target where it has a target."""
  sums = []
  T = hidden[0].shape[1]
  if spec.feature_weight:  # normalised once for every depth; the target gets no gradient
    trunk = jax.lax.stop_gradient(_normed(hidden[0], weights[0][0], spec.cfg))
  for k in range(1, len(hidden)):
    (scale, out), (ids, p), data_k = weights[k], targets[k], data[k]
    feature = {}
    if spec.feature_weight:
      valid = jnp.any(ids >= 0, axis=-1) & (jnp.arange(T) < T - k)
      feature = _feature_gap(_normed(hidden[k], scale, spec.cfg), _shift(trunk, k, 0), valid)
    if draft_ids is not None:
      index = draft_index(draft_ids, spec.cfg.vocab_size)
      ids = jnp.where(ids >= 0, index[jnp.maximum(ids, 0)], -1)
      # a data token outside the draft vocabulary is a miss (N: an index no argmax gives), not a
      # position left out of the accuracy
      in_draft = index[jnp.maximum(data_k, 0)]
      data_k = jnp.where(data_k >= 0, jnp.where(in_draft >= 0, in_draft, draft_ids.shape[0]), -1)
      out = out[draft_ids] if spec.cfg.tie_embeddings else out[:, draft_ids]
    sums.append({**_stats(spec)(hidden[k], scale, out, ids, p, data_k, spec.cfg, 0)[0],
                 **feature})
  return sums


def _hidden_states(module: MTPLanguageModel, inputs_BxT, tokens_BxW, segments_BxT=None):
  """Every depth's hidden state plus its head weights, in one pass through the model."""
  hidden = module.hidden_states(inputs_BxT, tokens_BxW, segments_BxT)
  return hidden, [module.head_weights(k) for k in range(len(hidden))]


def _head_states(module: MTPLanguageModel, h0_BxTxD, tokens_BxW, segments_BxT=None):
  hidden = module.head_states(h0_BxTxD, tokens_BxW, segments_BxT)
  return hidden, [module.head_weights(k) for k in range(len(hidden))]


def _row_ids(row_start_BxW, T: int, spec: LossSpec):
  """A row id per trunk position (position i holds the state after token i: token i's row), for
  attention that keeps to rows (spec.mask_rows); else None."""
  return jnp.cumsum(row_start_BxW[:, :T], axis=1) if spec.mask_rows else None


def _crossed(row_start_BxW, T: int, depth: int) -> list:
  """Per k = 0..depth, where depth k at position i reaches into the next row: one of tokens
  i + 1..i + k + 1 starts a row (its target, or a head's input, lies there)."""
  crossed, out = row_start_BxW[:, 1:1 + T], []
  for k in range(depth + 1):
    crossed = crossed | row_start_BxW[:, k + 1:k + 1 + T]
    out.append(crossed)
  return out


def window_sums(params, batch, spec: LossSpec, draft_ids=None):
  """The SUMS over one window: of cached trunk features (feature_sums) or of tokens
  (depth_sums)."""
  if isinstance(batch, dict) and 'h0' in batch:
    return feature_sums(params, batch, spec, draft_ids)
  return depth_sums(params, batch, spec, draft_ids)


def depth_sums(params, batch, spec: LossSpec, draft_ids=None):
  """Per depth k = 0..D, the SUMS over one token window (the trunk runs on its first T tokens):
  tokens (B x W), or {'tokens', 'row_start'} for rows joined one after another (chats the trunk
  wrote), where depth k at position i is left out when one of tokens i + 1..i + k + 1 starts a
  row (its target, or a head's input, lies in the next row). With spec.mask_rows the trunk's
  and the heads' attention at position i see only i's row, as when the row is decoded alone;
  without it, also the rows before it in the window. (Plain token windows of text have no rows:
  a window is a stretch of joined documents.)"""
  cfg = spec.cfg
  tokens_BxW, row_start = ((batch['tokens'], batch['row_start']) if isinstance(batch, dict)
                           else (batch, None))
  T = tokens_BxW.shape[1] - cfg.mtp_depth - 1
  rows = _row_ids(row_start, T, spec) if row_start is not None else None
  hidden, weights = MTPLanguageModel(cfg).apply(params, tokens_BxW[:, :T], tokens_BxW, rows,
                                                method=_hidden_states)
  data = [tokens_BxW[:, k + 1:k + 1 + T] for k in range(cfg.mtp_depth + 1)]
  if row_start is not None:
    data = [jnp.where(crossed, -1, d)
            for crossed, d in zip(_crossed(row_start, T, cfg.mtp_depth), data)]
  distill = spec.head_loss == 'distill' and cfg.mtp_depth > 0
  trunk, top = _stats(spec)(hidden[0], *weights[0], *_one_hot_target(data[0]), data[0], cfg,
                            spec.topk if distill else 0)
  if distill:  # the trunk's distribution at i + k; past the window's end there is none, and
    # where the data has no token i + k + 1 (padding) the position is left out, as without it
    targets = [None] + [(jnp.where(data[k][..., None] >= 0, _shift(top[0], k, -1), -1),
                         _shift(top[1], k, 0.0)) for k in range(1, cfg.mtp_depth + 1)]
  else:
    targets = [_one_hot_target(d) for d in data]
  return [trunk] + _head_sums(hidden, weights, targets, data, spec, draft_ids)


def feature_sums(params, batch, spec: LossSpec, draft_ids=None):
  """Per depth k = 1..D, the SUMS over one window of cached trunk features: batch holds
  'tokens' (B x W), 'h0' (B x T x F), the trunk's 'top_ids' and 'top_p' (B x (T + D) x K) and
  'row_start' (B x W), which marks the first token of each row. Head k at position i reads
  tokens i + 1..i + k and aims at token i + k + 1, or the trunk's distribution at i + k; it is
  left out when any of those tokens starts a row: its inputs would mix two texts, or its target
  lies past its row's end, where a row the trunk wrote has no distribution kept at its last
  position. With spec.mask_rows the heads' attention at position i sees only the positions of
  i's row, as decoding's does; without it, also the rows before it in the window."""
  cfg = spec.cfg
  tokens, h0 = batch['tokens'], batch['h0'].astype(cfg.compute_dtype)
  T = h0.shape[1]
  rows = _row_ids(batch['row_start'], T, spec)
  hidden, weights = MTPLanguageModel(cfg).apply(params, h0, tokens, rows, method=_head_states)
  crossed_by_depth = _crossed(batch['row_start'], T, cfg.mtp_depth)
  targets, data = [None], [None]
  for k in range(1, cfg.mtp_depth + 1):
    crossed = crossed_by_depth[k]
    data_k = tokens[:, k + 1:k + 1 + T]
    if spec.head_loss == 'distill':
      ids, p = batch['top_ids'][:, k:k + T], batch['top_p'][:, k:k + T].astype(jnp.float32)
    else:
      ids, p = _one_hot_target(data_k)
    targets.append((jnp.where(crossed[..., None], -1, ids), p))
    data.append(jnp.where(crossed, -1, data_k))
  return [None] + _head_sums(hidden, weights, targets, data, spec, draft_ids)


def loss_weight(step, base: float, schedule: str):
  """lambda at `step` (steps done before this one): `base`, replaced by each 'STEP:WEIGHT' entry
  once STEP steps are done (from the step logged as STEP + 1 on; a step skipped for a non-finite
  loss counts here, where the learning rate's schedule counts only the updates made)."""
  weight = jnp.float32(base)
  for start, value in parse_schedule(schedule):
    weight = jnp.where(step >= start, jnp.float32(value), weight)
  return weight


def metrics_of(sums, agreement: bool) -> dict:
  """Per-depth means from SUMS (a depth whose sums are None was not computed), traced or on the
  host (NumPy sums stay NumPy, in their precision); `agreement`: the heads' targets are the
  trunk's distribution, whose top token they are also scored against."""
  metrics = {}
  for k, s in enumerate(sums):
    if s is None:
      continue
    metrics[f'loss/depth_{k}'] = s['loss'] / s['count'].clip(min=1)
    metrics[f'accuracy/depth_{k}'] = s['correct'] / s['data_count'].clip(min=1)
    if k and agreement:
      metrics[f'agreement/depth_{k}'] = s['agree'] / s['count'].clip(min=1)
    if 'feature' in s:
      metrics[f'feature/depth_{k}'] = s['feature'] / s['feature_count'].clip(min=1)
  return metrics


def positions(sums) -> list:
  """Per depth, the positions its sums are means over (None where it was not computed)."""
  return [None if s is None else {n: s[n] for n in ('count', 'feature_count') if n in s}
          for s in sums]


def loss_of(sums, spec: LossSpec, weight, counts=None):
  """L from SUMS: each depth's mean cross-entropy, a head's plus feature_weight times its mean
  feature gap; the trunk's plus weight times the heads' mean, or with a frozen trunk the heads'
  mean alone. The means divide by `counts` (positions() of the whole batch, for sums of one of
  its micro-batches) where given, else by the sums' own positions."""
  D, n = spec.cfg.mtp_depth, counts or positions(sums)
  mean = lambda k, name, count: sums[k][name] / n[k][count].clip(min=1)
  head = lambda k: mean(k, 'loss', 'count') + (
      spec.feature_weight * mean(k, 'feature', 'feature_count') if 'feature' in sums[k] else 0.0)
  heads = sum(head(k) for k in range(1, D + 1)) / D if D else 0.0
  if spec.frozen:
    return heads
  return mean(0, 'loss', 'count') + (weight * heads if D else 0.0)


def combined_loss(params, batch, spec: LossSpec, weight, draft_ids=None):
  """Returns (L, metrics) over one window (loss_of), with per-depth mean loss and top-1
  accuracy (and, for heads, agreement with their target's top token, and the feature gap where
  it is weighted)."""
  sums = window_sums(params, batch, spec, draft_ids)
  metrics = metrics_of(sums, spec.head_loss == 'distill')
  metrics['loss/total'] = total = loss_of(sums, spec, weight)
  return total, metrics
