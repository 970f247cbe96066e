"""Transformer building blocks: RMSNorm, grouped-query attention with RoPE and an optional KV
cache, SwiGLU MLP, and the pre-norm block that combines them.

Shape legend: B batch, T query positions, L key positions (the cache length), D model width,
H query heads, K kv heads, G = H / K, E head dim, F MLP width, V vocab.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtp_jax.config import ModelConfig


def param_with_axes(module: nn.Module, name: str, init, shape, axes):
  """A float32 parameter annotated with logical axis names for sharding."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def fan_in_init(in_axis, out_axis):
  return nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal',
                                          in_axis=in_axis, out_axis=out_axis)


def rms_norm(x, scale, eps):
  """RMSNorm in float32 (the statistics are unstable in bfloat16), returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale).astype(x.dtype)


class RMSNorm(nn.Module):
  dim: int
  eps: float

  def setup(self):
    self.scale = param_with_axes(self, 'scale', nn.initializers.ones, (self.dim,), ('norm',))

  def __call__(self, x):
    return rms_norm(x, self.scale, self.eps)


def rope(x_BxTxNxE, positions_BxT, theta: float):
  """Rotary embedding of pairs (i, i + E/2), applied at absolute positions."""
  half = x_BxTxNxE.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxTx1xE = (positions_BxT[:, :, None, None].astype(jnp.float32) * freq)
  sin, cos = jnp.sin(angle_BxTx1xE), jnp.cos(angle_BxTx1xE)
  x1, x2 = jnp.split(x_BxTxNxE.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxE.dtype)


def write_cache(buf_BxLxKxE, new_BxTxKxE, positions_BxT):
  """Writes new entries at their positions, row by row; positions past the end are dropped."""
  rows_BxT = jnp.broadcast_to(jnp.arange(buf_BxLxKxE.shape[0])[:, None], positions_BxT.shape)
  return buf_BxLxKxE.at[rows_BxT, positions_BxT].set(new_BxTxKxE.astype(buf_BxLxKxE.dtype),
                                                      mode='drop')


def empty_kv(cfg: ModelConfig, batch: int, length: int):
  shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
  return {'k': jnp.zeros(shape, cfg.compute_dtype), 'v': jnp.zeros(shape, cfg.compute_dtype)}


def attend(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, positions_BxT, kv):
  """Attention written out: writes the cache if there is one, then masks by position and
  takes a float32 softmax over the T x L scores. Returns (B x T x H x E output, cache)."""
  B, T, H, E = q_BxTxHxE.shape
  K = k_BxTxKxE.shape[2]
  if kv is None:
    k_BxLxKxE, v_BxLxKxE, key_pos_BxL = k_BxTxKxE, v_BxTxKxE, positions_BxT
  else:
    kv = {'k': write_cache(kv['k'], k_BxTxKxE, positions_BxT),
          'v': write_cache(kv['v'], v_BxTxKxE, positions_BxT)}
    k_BxLxKxE, v_BxLxKxE = kv['k'], kv['v']
    L = k_BxLxKxE.shape[1]
    key_pos_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
  q_BxTxKxGxE = q_BxTxHxE.reshape(B, T, K, H // K, E)
  scores = jnp.einsum('btkge,blke->bkgtl', q_BxTxKxGxE, k_BxLxKxE).astype(jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(E))
  causal_BxTxL = key_pos_BxL[:, None, :] <= positions_BxT[:, :, None]
  scores = jnp.where(causal_BxTxL[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q_BxTxHxE.dtype)
  out_BxTxKxGxE = jnp.einsum('bkgtl,blke->btkge', probs, v_BxLxKxE)
  return out_BxTxKxGxE.reshape(B, T, H, E), kv


class Attention(nn.Module):
  """Causal grouped-query attention. With `kv` (a cache dict), the new keys and values are
  written at `positions` and every cached position <= the query's position is attended; entries
  past a row's true length are stale drafts and are hidden by that same position test."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, kv=None):
    cfg = self.cfg
    D, H, K, E = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dt = cfg.compute_dtype
    w_q = param_with_axes(self, 'q', fan_in_init(0, (1, 2)), (D, H, E), ('embed', 'heads', 'head_dim'))
    w_k = param_with_axes(self, 'k', fan_in_init(0, (1, 2)), (D, K, E), ('embed', 'kv_heads', 'head_dim'))
    w_v = param_with_axes(self, 'v', fan_in_init(0, (1, 2)), (D, K, E), ('embed', 'kv_heads', 'head_dim'))
    w_o = param_with_axes(self, 'o', fan_in_init((0, 1), 2), (H, E, D), ('heads', 'head_dim', 'embed'))
    x = x_BxTxD.astype(dt)
    q_BxTxHxE = rope(jnp.einsum('btd,dhe->bthe', x, w_q.astype(dt)), positions_BxT, cfg.rope_theta)
    k_BxTxKxE = rope(jnp.einsum('btd,dke->btke', x, w_k.astype(dt)), positions_BxT, cfg.rope_theta)
    v_BxTxKxE = jnp.einsum('btd,dke->btke', x, w_v.astype(dt))
    if kv is None and cfg.attention == 'fused':
      # jax's fused attention: cuDNN's flash attention where the GPU and shapes allow it, XLA's
      # own elsewhere. No cache means positions 0..T-1 in every row (the training path), so the
      # position mask below is the plain causal mask.
      out_BxTxHxE = jax.nn.dot_product_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, is_causal=True)
    else:
      out_BxTxHxE, kv = attend(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, positions_BxT, kv)
    out_BxTxD = jnp.einsum('bthe,hed->btd', out_BxTxHxE, w_o.astype(dt))
    out_BxTxD = nn.with_logical_constraint(out_BxTxD, ('batch', 'length', 'embed'))
    return out_BxTxD, kv


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.cfg
    D, F, dt = cfg.d_model, cfg.mlp_dim, cfg.compute_dtype
    w_gate = param_with_axes(self, 'gate', fan_in_init(0, 1), (D, F), ('embed', 'mlp'))
    w_up = param_with_axes(self, 'up', fan_in_init(0, 1), (D, F), ('embed', 'mlp'))
    w_down = param_with_axes(self, 'down', fan_in_init(0, 1), (F, D), ('mlp', 'embed'))
    x = x_BxTxD.astype(dt)
    h_BxTxF = jax.nn.silu(x @ w_gate.astype(dt)) * (x @ w_up.astype(dt))
    h_BxTxF = nn.with_logical_constraint(h_BxTxF, ('batch', 'length', 'mlp'))
    return h_BxTxF @ w_down.astype(dt)


class Block(nn.Module):
  """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, kv=None):
    D, eps = self.cfg.d_model, self.cfg.norm_eps
    attn_in = RMSNorm(D, eps, name='attn_norm')(x_BxTxD)
    attn_out, kv = Attention(self.cfg, name='attn')(attn_in, positions_BxT, kv)
    x_BxTxD = x_BxTxD + attn_out
    x_BxTxD = x_BxTxD + MLP(self.cfg, name='mlp')(RMSNorm(D, eps, name='mlp_norm')(x_BxTxD))
    return nn.with_logical_constraint(x_BxTxD, ('batch', 'length', 'embed')), kv
