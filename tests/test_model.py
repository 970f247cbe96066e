"""The model and the combined loss: causality, target alignment, loss against a reference; the
trunk features the first sequential module reads."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import depth_logits, tiny_config, tiny_model
from mtp_jax import layers
from mtp_jax.loss import LossSpec, combined_loss, depth_sums, feature_sums, loss_weight
from mtp_jax.config import KINDS, ConfigError, validate
from mtp_jax.model import MTPLanguageModel, init_params

@pytest.mark.parametrize('kind', KINDS)
def test_causality_every_depth(kind):
  cfg = tiny_model(**{'mtp.kind': kind, 'mtp.depth': 3})
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16 + 3 + 1), 0, cfg.vocab_size)
  base = depth_logits(params, cfg, tokens)
  for j in [3, 9, 15]:
    changed = depth_logits(params, cfg, tokens.at[:, j].set((tokens[:, j] + 1) % cfg.vocab_size))
    for k in range(cfg.mtp_depth + 1):
      # Depth k at position i reads tokens up to i + k (other kinds only up to i).
      first = j - (k if cfg.mtp_chains else 0)
      np.testing.assert_array_equal(base[k][:, :first], changed[k][:, :first])
      assert not np.allclose(base[k][:, first], changed[k][:, first]), (k, j)


def reference_loss(params, cfg, tokens_BxW, weight):
  """A direct computation: for each depth k and position i, run the model pieces on explicitly
  gathered inputs and take -log softmax at the explicitly indexed target t_{i+k+1}."""
  B, W = tokens_BxW.shape
  D, T = cfg.mtp_depth, W - cfg.mtp_depth - 1
  tok = np.asarray(tokens_BxW)
  model = MTPLanguageModel(cfg)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  h0, _ = model.apply(params, jnp.asarray(tok[:, :T]), pos, method=model.trunk)
  hs, h = [h0], h0
  for k in range(1, D + 1):
    next_tokens = np.stack([[tok[b, i + k] for i in range(T)] for b in range(B)])
    h_in = h if cfg.mtp_chains else h0
    h, _ = model.apply(params, k, h_in, jnp.asarray(next_tokens), pos, method=model.mtp_step)
    hs.append(h)
  losses = []
  for k, h in enumerate(hs):
    logits = np.asarray(model.apply(params, h, k, method=model.logits), np.float64)
    nll = []
    for b in range(B):
      for i in range(T):
        target = tok[b, i + k + 1]
        if target < 0:
          continue
        row = logits[b, i]
        nll.append(np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[target])
    losses.append(np.mean(nll))
  return losses[0] + (weight * np.mean(losses[1:]) if D else 0.0), losses


@pytest.mark.parametrize('kind,depth', [('sequential', 2), ('parallel', 3), ('medusa', 2),
                                        ('sequential', 0)])
def test_loss_matches_reference(kind, depth):
  cfg = tiny_model(**{'mtp.kind': kind, 'mtp.depth': depth})
  params = init_params(cfg, jax.random.key(2))
  tokens = np.array(jax.random.randint(jax.random.key(3), (3, 12 + depth + 1), 0, cfg.vocab_size))
  tokens[1, -2:] = -1  # padding at the end of one row: those targets must be left out
  total, metrics = combined_loss(params, jnp.asarray(tokens), LossSpec(cfg), 0.3)
  ref_total, ref_losses = reference_loss(params, cfg, tokens, 0.3)
  np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)
  for k, ref in enumerate(ref_losses):
    np.testing.assert_allclose(float(metrics[f'loss/depth_{k}']), ref, rtol=1e-5)


def test_cached_targets_stop_at_a_rows_end():
  """On cached features, head k at position i counts only when tokens i + 1..i + k + 1 all
  belong to i's row: a row the trunk wrote keeps no distribution at its last position (zeros
  there), and a data target past it is the next row's first token."""
  cfg = tiny_model(**{'mtp.depth': 2})
  params = init_params(cfg, jax.random.key(0))
  B, T, K, D = 2, 8, 4, cfg.mtp_depth
  rng = np.random.default_rng(0)
  row_start = np.zeros((B, T + D + 1), bool)
  row_start[0, 5] = True  # row 0 of the batch: a row ends at 4, the next starts at 5
  top_ids = rng.integers(0, cfg.vocab_size, (B, T + D, K))
  top_p = np.full((B, T + D, K), 1.0 / K, np.float32)
  top_ids[0, 4], top_p[0, 4] = 0, 1.0  # what writing chats leaves at a row's last position
  batch = {'tokens': jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T + D + 1))),
           'h0': jnp.asarray(rng.standard_normal((B, T, cfg.d_model)), jnp.float32),
           'row_start': jnp.asarray(row_start), 'top_ids': jnp.asarray(top_ids),
           'top_p': jnp.asarray(top_p)}
  for head_loss in ('distill', 'data'):
    sums = feature_sums(params, batch, LossSpec(cfg, head_loss=head_loss, frozen=True))
    for k in range(1, D + 1):
      left_out = [i for i in range(T) if row_start[0, i + 1:i + k + 2].any()]
      assert left_out == list(range(4 - k, 5))
      assert int(sums[k]['count']) == 2 * T - len(left_out), (head_loss, k)
      assert int(sums[k]['data_count']) == 2 * T - len(left_out), (head_loss, k)


def test_head_counts_over_a_draft_vocabulary_and_padding():
  """Over a draft vocabulary (train.draft_vocab) a data token outside it is a miss of the
  accuracy, not a position left out; distilling on a padded window leaves out the positions
  whose next token is padding, as the data target does."""
  cfg = tiny_model(**{'mtp.depth': 2})
  params = init_params(cfg, jax.random.key(0))
  B, T, D = 2, 8, cfg.mtp_depth
  tokens = jax.random.randint(jax.random.key(1), (B, T + D + 1), 0, cfg.vocab_size)
  draft_ids = jnp.arange(cfg.vocab_size // 4, dtype=jnp.int32)  # most data tokens fall outside
  sums = depth_sums(params, tokens, LossSpec(cfg), draft_ids)
  for k in range(1, D + 1):
    assert int(sums[k]['data_count']) == B * T
    inside = int(jnp.sum(tokens[:, k + 1:k + 1 + T] < cfg.vocab_size // 4))
    assert int(sums[k]['correct']) <= inside < B * T
  padded = tokens.at[0, T - 2:].set(-1)  # row 0's data ends at position T - 3
  sums = depth_sums(params, padded, LossSpec(cfg, head_loss='distill', topk=4))
  for k in range(1, D + 1):
    has_next = padded[:, k + 1:k + 1 + T] >= 0
    assert int(sums[k]['data_count']) == int(jnp.sum(has_next)) < B * T, k
    # the trunk ran on T positions: its distribution at i + k exists for i < T - k
    assert int(sums[k]['count']) == int(jnp.sum(has_next[:, :T - k])), k


@pytest.mark.parametrize('kind,attention', [('sequential', 'einsum'), ('parallel', 'einsum'),
                                            ('sequential', 'fused')])
def test_heads_on_packed_rows_see_only_their_own_row(kind, attention):
  """Rows of cached chats are packed into training windows; decoding runs the heads over one
  text. With train.mask_rows (the default) a head over a row that starts inside the window is
  what it is over that row alone; without it, it reads the rows before."""
  cfg = tiny_model(**{'mtp.kind': kind, 'mtp.depth': 2, 'model.attention': attention})
  params = init_params(cfg, jax.random.key(0))
  B, T, D, starts = 1, 12, cfg.mtp_depth, (5, 9)  # three rows: 0..4, 5..8, 9..11
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T + D + 1)))
  h0 = jnp.asarray(rng.standard_normal((B, T, cfg.d_model)), jnp.float32)
  row_start = np.zeros((B, T + D + 1), bool)
  row_start[0, list(starts)] = True
  rows = jnp.cumsum(jnp.asarray(row_start[:, :T]), axis=1)
  states = lambda *args: MTPLanguageModel(cfg).apply(params, *args,
                                                     method=MTPLanguageModel.head_states)
  masked, unmasked = states(h0, tokens, rows), states(h0, tokens)
  for a, b in zip(starts, starts[1:] + (T,)):
    alone = states(h0[:, a:b], tokens[:, a:b + D + 1])  # the row from its first position
    for k in range(1, D + 1):
      np.testing.assert_allclose(masked[k][:, a:b], alone[k], rtol=1e-5, atol=1e-5)
      assert not np.allclose(unmasked[k][:, a:b], alone[k], rtol=1e-3, atol=1e-3), (a, k)
  for k in range(1, D + 1):  # the first row, whose start lies before the window, as before
    np.testing.assert_allclose(masked[k][:, :starts[0]], unmasked[k][:, :starts[0]], rtol=1e-6,
                               atol=1e-6)
  # The training loss follows the setting.
  batch = {'tokens': tokens, 'h0': h0, 'row_start': jnp.asarray(row_start)}
  loss = {m: float(feature_sums(params, batch, LossSpec(cfg, frozen=True, mask_rows=m))[1]['loss'])
          for m in (True, False)}
  assert loss[True] != loss[False]


def test_feature_gap_matches_reference():
  """train.feature_weight: head k at position i is also pulled towards the trunk's hidden state
  at i + k, both normalised as the output matrix reads them; positions without a target, or
  whose i + k lies past the trunk's positions, are left out."""
  cfg = tiny_model(**{'mtp.depth': 2})
  params = init_params(cfg, jax.random.key(2))
  for i, name in enumerate(['final_norm', 'mtp_norms_0', 'mtp_norms_1']):  # norms as trained
    params['params'][name]['scale'] = jax.random.uniform(jax.random.key(i), (cfg.d_model,),
                                                         minval=0.5, maxval=3.0)
  T = 10
  tokens = np.array(jax.random.randint(jax.random.key(3), (2, T + 3), 0, cfg.vocab_size))
  tokens[1, -4:] = -1
  total, metrics = combined_loss(params, jnp.asarray(tokens), LossSpec(cfg, feature_weight=0.7),
                                 0.3)
  _, ref_losses = reference_loss(params, cfg, tokens, 0.3)
  model = MTPLanguageModel(cfg)
  hidden = model.apply(params, jnp.asarray(tokens[:, :T]), jnp.asarray(tokens),
                       method=model.hidden_states)
  p = params['params']

  def normed(h, scale):
    h = np.asarray(h, np.float64)
    return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + cfg.norm_eps) * np.asarray(scale)

  target = normed(hidden[0], p['final_norm']['scale'])
  gaps = []
  for k in (1, 2):
    pred = normed(hidden[k], p[f'mtp_norms_{k - 1}']['scale'])
    gap = [np.mean(np.where(abs(d) <= 1, 0.5 * d * d, abs(d) - 0.5))
           for b in range(2) for i in range(T - k) if tokens[b, i + k + 1] >= 0
           for d in [pred[b, i] - target[b, i + k]]]
    assert len(gap) == 2 * (T - k) - 2
    gaps.append(np.mean(gap))
    np.testing.assert_allclose(float(metrics[f'feature/depth_{k}']), gaps[-1], rtol=1e-5)
  want = ref_losses[0] + 0.3 * np.mean([ref_losses[k] + 0.7 * gaps[k - 1] for k in (1, 2)])
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  _, plain = combined_loss(params, jnp.asarray(tokens), LossSpec(cfg), 0.3)
  assert not any(name.startswith('feature/') for name in plain)


@pytest.mark.parametrize('head_loss', ['data', 'distill'])
def test_token_windows_of_joined_rows_leave_out_what_reaches_the_next_row(head_loss):
  """With row starts beside the tokens (chats joined one after another), depth k at position i
  is left out when a row starts at any of i + 1..i + k + 1; every other position's sums are the
  window's without them."""
  cfg = tiny_model(**{'mtp.depth': 2})
  params = init_params(cfg, jax.random.key(4))
  T, W, p = 8, 8 + 2 + 1, 5
  tokens = jnp.asarray((np.arange(W, dtype=np.int32)[None] * 7) % cfg.vocab_size)
  row_start = np.zeros((1, W), bool)
  row_start[0, p] = True
  spec = LossSpec(cfg, head_loss=head_loss, topk=4)
  plain = depth_sums(params, tokens, spec)
  joined = depth_sums(params, {'tokens': tokens, 'row_start': jnp.asarray(row_start)}, spec)
  for k, (a, b) in enumerate(zip(plain, joined)):
    left_out = [i for i in range(T) if any(i + j == p for j in range(1, k + 2))]
    # (distillation has no target past the window's end: position i + k < T)
    had = [i for i in left_out if head_loss == 'data' or k == 0 or i + k < T]
    assert float(b['count']) == float(a['count']) - len(had), k
    assert float(b['data_count']) == T - len(left_out), k
  # a row start at the window's first token reaches no position's inputs or targets
  row_start[0, p], row_start[0, 0] = False, True
  first = depth_sums(params, {'tokens': tokens, 'row_start': jnp.asarray(row_start)}, spec)
  for a, b in zip(plain, first):
    np.testing.assert_allclose(float(b['loss']), float(a['loss']), rtol=1e-6)


@pytest.mark.parametrize('attention', ['einsum', 'fused'])
def test_token_windows_of_joined_rows_keep_the_trunk_inside_each_row(attention):
  """Chats joined as tokens (data.features=False): with train.mask_rows the trunk's and the
  heads' states over a row that starts inside the window are those of the row alone (rotary
  angles are relative, so its offset in the window does not matter); without it the trunk
  reads the row before."""
  cfg = tiny_model(**{'mtp.depth': 2, 'model.attention': attention})
  params = init_params(cfg, jax.random.key(5))
  T, D, p = 10, cfg.mtp_depth, 4
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, T + D + 1)))
  row_start = np.zeros((1, T + D + 1), bool)
  row_start[0, p] = True
  rows = jnp.cumsum(jnp.asarray(row_start[:, :T]), axis=1)
  states = lambda *args: MTPLanguageModel(cfg).apply(params, *args,
                                                     method=MTPLanguageModel.hidden_states)
  masked, unmasked = states(tokens[:, :T], tokens, rows), states(tokens[:, :T], tokens)
  alone = states(tokens[:, p:T], tokens[:, p:])
  for k in range(D + 1):
    np.testing.assert_allclose(masked[k][:, p:], alone[k], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(masked[k][:, :p], unmasked[k][:, :p], rtol=1e-6, atol=1e-6)
  assert not np.allclose(unmasked[0][:, p:], alone[0], rtol=1e-3, atol=1e-3)
  # the loss follows the setting
  batch = {'tokens': tokens, 'row_start': jnp.asarray(row_start)}
  loss = {m: float(depth_sums(params, batch, LossSpec(cfg, mask_rows=m))[0]['loss'])
          for m in (True, False)}
  assert loss[True] != loss[False]


def test_depth_targets_alignment_on_hand_made_batch():
  """Depth k at position i is scored against t_{i+k+1}: blanking one target removes exactly
  the position i = p - k - 1 from depth k's count."""
  cfg = tiny_model(**{'mtp.depth': 3})
  params = init_params(cfg, jax.random.key(4))
  T, W = 8, 8 + 3 + 1
  tokens = np.arange(W, dtype=np.int32)[None] % cfg.vocab_size
  counts = [float(s['count']) for s in depth_sums(params, jnp.asarray(tokens), LossSpec(cfg))]
  assert counts == [T] * 4
  for p in [1, 5, W - 1]:
    blanked = tokens.copy()
    blanked[0, p] = -1
    sums = depth_sums(params, jnp.asarray(blanked), LossSpec(cfg))
    for k, s in enumerate(sums):
      expected = T - (1 if 0 <= p - k - 1 < T else 0)
      assert float(s['count']) == expected, (p, k)


def test_a_rows_norm_does_not_depend_on_the_rows_beside_it():
  """RMSNorm as decoding with the kernels runs it (exact_rows) over many rows at once gives each
  row the bits it gets alone (XLA's own row reduction did not, past 4096 entries: SmolLM2's 576
  wide from 8 rows, a verify at batch 2), and as RMSNorm's formula gives it, to rounding; in
  float32 and, with groups, bfloat16."""
  rng = np.random.default_rng(0)
  for D, groups, dtype in ((576, 1, jnp.float32), (128, 1, jnp.float32), (96, 3, jnp.bfloat16)):
    norm = layers.RMSNorm(D, 1e-5, groups, exact_rows=True)
    x = jnp.asarray(3 * rng.standard_normal((64, D)), dtype)
    params = {'params': {'scale': jnp.asarray(rng.standard_normal(D), jnp.float32)}}
    apply = jax.jit(lambda x: norm.apply(params, x))
    alone = np.stack([np.asarray(apply(x[i:i + 1]), np.float32)[0] for i in range(64)])
    for rows in (8, 33, 64):
      np.testing.assert_array_equal(np.asarray(apply(x[:rows]), np.float32), alone[:rows])
    x32 = np.asarray(x, np.float32).reshape(64, groups, D // groups)
    want = x32 / np.sqrt(np.mean(x32 ** 2, axis=-1, keepdims=True) + 1e-5)
    want = (want.reshape(64, D) * np.asarray(params['params']['scale']))
    np.testing.assert_allclose(alone, want, rtol=1e-5 if dtype == jnp.float32 else 1e-2,
                               atol=1e-5 if dtype == jnp.float32 else 2e-2)


def test_loss_weight_schedule():
  assert float(loss_weight(0, 0.3, '')) == pytest.approx(0.3)
  assert float(loss_weight(99, 0.3, '100:0.1')) == pytest.approx(0.3)
  assert float(loss_weight(100, 0.3, '100:0.1,200:0.0')) == pytest.approx(0.1)
  assert float(loss_weight(250, 0.3, '100:0.1,200:0.0')) == 0.0


def test_bfloat16_compute_keeps_float32_params_and_loss():
  cfg = tiny_model(**{'model.dtype': 'bfloat16'})
  params = init_params(cfg, jax.random.key(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  tokens = jax.random.randint(jax.random.key(1), (2, 16 + 2 + 1), 0, cfg.vocab_size)
  total, _ = combined_loss(params, tokens, LossSpec(cfg), 0.3)
  assert total.dtype == jnp.float32 and np.isfinite(float(total))


def test_rotary_angles_are_looked_up_not_computed_in_the_forward():
  """XLA's CPU backend fuses a sin or cos into every operation reading it, so each rotation
  would evaluate them again; the compiled forward takes them from a table instead."""
  cfg = tiny_model()
  params = init_params(cfg, jax.random.key(0))
  tokens = jnp.zeros((2, 19), jnp.int32)
  text = jax.jit(MTPLanguageModel(cfg).apply).lower(params, tokens).compile().as_text()
  assert 'sine(' not in text and 'cosine(' not in text
  positions = jnp.array([[0, 5, 127], [3, 64, 100]])
  cos, sin = layers.rotary(positions, tiny_model(**{
      'model.d_model': 32, 'model.num_heads': 4, 'model.rope_theta': 1e4,
      'model.max_seq_len': 128}))  # heads 8 wide
  angle = np.asarray(positions)[:, :, None, None] * 1e4 ** (-np.arange(4) / 4)
  np.testing.assert_allclose(cos, np.cos(angle), atol=1e-7)
  np.testing.assert_allclose(sin, np.sin(angle), atol=1e-7)


def test_head_mlp_dim_widens_only_the_heads():
  for kind in ('sequential', 'parallel'):
    cfg = tiny_model(**{'mtp.kind': kind, 'mtp.head_mlp_dim': 40})
    params = init_params(cfg, jax.random.key(0))['params']
    assert params['mtp_1']['block']['mlp']['gate'].shape == (32, 40)
    assert params['blocks_0']['mlp']['gate'].shape == (32, cfg.mlp_dim) and cfg.mlp_dim != 40
  # Medusa with a hidden width: h + SiLU(h W_in + b) W_out, equal to h at init (W_out is zero).
  cfg = tiny_model(**{'mtp.kind': 'medusa', 'mtp.head_mlp_dim': 40})
  params = init_params(cfg, jax.random.key(0))
  model = MTPLanguageModel(cfg)
  h = jax.random.normal(jax.random.key(1), (2, 5, 32))
  tokens, pos = jnp.zeros((2, 5), jnp.int32), jnp.broadcast_to(jnp.arange(5), (2, 5))
  out, _ = model.apply(params, 1, h, tokens, pos, method=model.mtp_step)
  np.testing.assert_array_equal(out, h)
  head = dict(params['params']['mtp_0'])
  head['w_out'] = jax.random.normal(jax.random.key(2), (40, 32))
  head['b'] = jax.random.normal(jax.random.key(3), (40,))
  params = {'params': {**params['params'], 'mtp_0': head}}
  out, _ = model.apply(params, 1, h, tokens, pos, method=model.mtp_step)
  x = np.asarray(h, np.float64) @ np.asarray(head['w_in'], np.float64) + np.asarray(head['b'])
  want = np.asarray(h) + (x / (1 + np.exp(-x))) @ np.asarray(head['w_out'], np.float64)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind', ['sequential', 'parallel'])
def test_fused_attention_matches_einsum(kind):
  # The same params through jax.nn.dot_product_attention (XLA's implementation on CPU): loss,
  # every depth's metrics and the gradients agree with the written-out attention.
  cfgs = [tiny_model(**{'mtp.kind': kind, 'mtp.depth': 2, 'model.attention': a})
          for a in ('einsum', 'fused')]
  params = init_params(cfgs[0], jax.random.key(4))
  tokens = jax.random.randint(jax.random.key(5), (3, 20 + 2 + 1), 0, cfgs[0].vocab_size)
  loss_and_grad = jax.jit(jax.value_and_grad(combined_loss, has_aux=True), static_argnums=2)
  (l0, m0), g0 = loss_and_grad(params, tokens, LossSpec(cfgs[0]), 0.3)
  (l1, m1), g1 = loss_and_grad(params, tokens, LossSpec(cfgs[1]), 0.3)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for name in m0:
    np.testing.assert_allclose(m1[name], m0[name], rtol=1e-5, atol=1e-6, err_msg=name)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('head_loss', ['data', 'distill'])
def test_logits_kept_or_recomputed_give_the_same_loss_and_gradients(head_loss):
  """train.remat_logits only chooses whether the backward pass recomputes each depth's logits
  (a remat in the traced gradient) or keeps them: the loss, metrics and gradients agree."""
  cfg = tiny_model(**{'mtp.depth': 2})
  params = init_params(cfg, jax.random.key(4))
  tokens = jax.random.randint(jax.random.key(5), (3, 20 + 2 + 1), 0, cfg.vocab_size)
  loss_and_grad = jax.jit(jax.value_and_grad(combined_loss, has_aux=True), static_argnums=2)
  specs = [LossSpec(cfg, head_loss=head_loss, remat=remat) for remat in (True, False)]
  (l0, m0), g0 = loss_and_grad(params, tokens, specs[0], 0.3)
  (l1, m1), g1 = loss_and_grad(params, tokens, specs[1], 0.3)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for name in m0:
    np.testing.assert_allclose(m1[name], m0[name], rtol=1e-6, atol=1e-7, err_msg=name)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  traced = [str(jax.make_jaxpr(lambda p, s=s: jax.grad(
      lambda q: combined_loss(q, tokens, s, 0.3)[0])(p))(params)) for s in specs]
  assert 'remat' in traced[0] and 'remat' not in traced[1]  # jax.checkpoint's primitive


def test_feature_layers_feed_the_first_module_other_layers_of_the_trunk():
  """With mtp.feature_layers the trunk's features are its last hidden state, then the named
  blocks' outputs; the trunk's own logits do not change and only the first module widens."""
  cfg = tiny_model(**{'mtp.feature_layers': '0'})
  assert cfg.feature_layers == (0,) and cfg.feature_dim == 64
  params = init_params(cfg, jax.random.key(0))
  inner = params['params']
  assert inner['mtp_0']['eh_proj'].shape == (32 + 64, 32)
  assert inner['mtp_0']['hnorm']['scale'].shape == (64,)
  assert inner['mtp_1']['eh_proj'].shape == (64, 32)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  features, _ = MTPLanguageModel(cfg).apply(params, tokens, pos, method=MTPLanguageModel.trunk)
  plain = tiny_model()
  last, _ = MTPLanguageModel(plain).apply(params, tokens, pos, method=MTPLanguageModel.trunk)
  first = dataclasses.replace(plain, num_layers=1)  # the same params up to block 0's output
  block0, _ = MTPLanguageModel(first).apply(params, tokens, pos, method=MTPLanguageModel.trunk)
  np.testing.assert_array_equal(features, np.concatenate([last, block0], axis=-1))
  np.testing.assert_array_equal(
      MTPLanguageModel(cfg).apply(params, features, 0, method=MTPLanguageModel.logits),
      MTPLanguageModel(plain).apply(params, last, 0, method=MTPLanguageModel.logits))
  # each layer's slice is normalised on its own: scaling one layer's features changes nothing
  h = jax.random.normal(jax.random.key(2), (2, 9, 64))
  out = [MTPLanguageModel(cfg).apply(params, 1, x, tokens, pos, method=MTPLanguageModel.mtp_step)[0]
         for x in (h, h.at[..., 32:].multiply(7.0))]
  np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('overrides,words', [
    ({'mtp.feature_layers': '1'}, 'block indices in 0..0'),  # block 1 is the last: always read
    ({'mtp.feature_layers': '0,0'}, 'distinct'),
    ({'mtp.feature_layers': 'low'}, "'I,J,...', got 'low'"),
    ({'mtp.feature_layers': '0', 'mtp.kind': 'parallel'}, 'mtp.kind=parallel with'),
    ({'mtp.feature_layers': '0', 'mtp.depth': 0}, 'mtp.depth=0 has none')])
def test_bad_feature_layers_are_one_config_error(overrides, words):
  with pytest.raises(ConfigError, match='mtp.feature_layers') as e:
    validate(tiny_config(**overrides))
  assert words in str(e.value)


def test_feature_layers_have_one_spelling_once_validated():
  """validate writes the block indices one way, so checkpoints and heads files, which compare
  the field as a string, take '1,0' and ' 1, 0' for the same model."""
  config = tiny_config(**{'model.num_layers': 3, 'mtp.feature_layers': ' 1, 0'})
  validate(config)
  assert config.mtp.feature_layers == '1,0'


def test_a_detached_chain_trains_each_module_by_its_own_depth_alone():
  """mtp.detach_chain: depth 2's loss reaches module 2 and not module 1, whose input it still
  reads (the forward is unchanged); without it, depth 2's loss trains module 1 as well."""
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 300)

  def grads(detach):
    cfg = tiny_model(**{'mtp.depth': 2, 'mtp.detach_chain': detach})
    params = init_params(cfg, jax.random.key(0))
    depth_2 = lambda p: jnp.mean(MTPLanguageModel(cfg).apply(p, tokens)[2] ** 2)
    return depth_2(params), jax.grad(depth_2)(params)['params']

  (chained, g_chained), (detached, g_detached) = grads(False), grads(True)
  assert chained == detached
  norm = lambda tree: sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(tree))
  assert norm(g_detached['mtp_0']) == 0 and norm(g_chained['mtp_0']) > 0
  assert norm(g_detached['mtp_1']) > 0
  jax.tree.map(np.testing.assert_array_equal, g_detached['mtp_1'], g_chained['mtp_1'])
  with pytest.raises(ConfigError, match='mtp.detach_chain'):
    validate(tiny_config(**{'mtp.kind': 'parallel', 'mtp.detach_chain': True}))


@pytest.mark.parametrize('field,value,words', [
    ('seed', 2**32, 'seed must be an integer in 0..4294967295, got 4294967296'),
    ('train.steps', 2**31, 'train.steps=2147483648 is past 2147483647'),
    ('train.warmup_steps', 2**31, 'train.warmup_steps must be an integer in 0..2147483647'),
    ('train.inject_nan_step', 0, 'train.inject_nan_step must be -1 (none) or a step in 1..'),
    ('mtp.loss_weight_schedule', '1:inf', 'weights finite and >= 0'),
    ('mtp.loss_weight_schedule', '99999999999:0.1', 'steps must be in 0..2147483647'),
    # a forgotten coordinator_address: each process would run alone, as process 0
    ('distributed.num_processes', 2, "read only with a coordinator_address of host:port ('' is"),
    ('distributed.coordinator_address', 'localhost:99999', "'host:port' (a port in 1..65535)"),
    # sizes past a count (a hang or a 4 TiB allocation after the data is written)
    ('model.head_dim', 2**40, 'model.head_dim=1099511627776 is past 2147483647'),
    ('mtp.head_blocks', 2**40, 'mtp.head_blocks=1099511627776 is past 2147483647'),
    # numbers float32 turns into inf or 0 where they are used
    ('mtp.loss_weight', 1e300, "mtp.loss_weight=1e+300 is past float32's largest number"),
    ('decode.temperature', 1e-300, 'decode.temperature must be 0 (greedy) or from 1.175e-38'),
    ('mtp.loss_weight_schedule', '10:0.1,10:0.2', "step 10 is given twice in '10:0.1,10:0.2'"),
])
def test_values_a_run_cannot_use_are_refused(field, value, words):
  """What the step counter (int32), jax.random.key (32 bits of a seed) or a finite loss cannot
  hold: refused by validate, not an OverflowError after the data is written (nor a seed folded
  onto another, nor a loss made inf by its weight, nor a temperature made 0, every probability
  then NaN); process counts with no coordinator, a port no socket has."""
  with pytest.raises(ConfigError, match=re.escape(words)):
    validate(tiny_config(**{field: value}))
