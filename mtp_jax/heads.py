"""The multi-token-prediction heads that sit on the trunk: DeepSeek-V3 sequential modules,
Gloeckle et al. parallel heads and Medusa heads. Each maps an input hidden state to depth k's.

Shape legend: B batch, T positions, D model width.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtp_jax.config import ModelConfig, block_name
from mtp_jax.layers import (Block, dense, dense_param, fan_in_init, norm_of, param_with_axes,
                             rotary)
from mtp_jax.matmul import precision


def _mul(x, w):
  """x @ w at the model's precision (matmul.precision)."""
  return jnp.matmul(x, w, precision=precision(x))


class SequentialModule(nn.Module):
  """Module k of DeepSeek-V3: h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)],
  h^k = TRM_k(h'). The embedding comes first in the concat, as in the released weights. The
  first module's h^0 may be the trunk's features, its last hidden state followed by other
  layers' (mtp.feature_layers): each D-wide slice is normalised on its own and M_1 is wider.
  TRM_k is mtp.head_blocks Transformer blocks (one in DeepSeek-V3). `segments` keeps rows
  packed into one training window apart (layers.attend)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_prev_BxTxF, emb_BxTxD, positions_BxT, kv=None, segments_BxT=None):
    cfg = self.cfg
    F = h_prev_BxTxF.shape[-1]
    eh_proj = dense_param(self, 'eh_proj', fan_in_init(0, 1), (cfg.d_model + F,),
                          (cfg.d_model,), ('concat_embed',), ('embed',), cfg)
    e = norm_of(cfg, cfg.d_model, name='enorm')(emb_BxTxD)
    h = norm_of(cfg, F, groups=F // cfg.d_model, name='hnorm')(h_prev_BxTxF.astype(e.dtype))
    x_BxTxD = dense(jnp.concatenate([e, h], axis=-1), eh_proj, 1, cfg)
    return head_blocks(cfg, x_BxTxD, positions_BxT, kv, segments_BxT)


class ParallelHead(nn.Module):
  """Head k of Gloeckle et al.: Transformer blocks (mtp.head_blocks, one by default) over the
  trunk's last hidden state."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h0_BxTxD, emb_BxTxD, positions_BxT, kv=None, segments_BxT=None):
    del emb_BxTxD  # parallel heads see only the trunk
    return head_blocks(self.cfg, h0_BxTxD, positions_BxT, kv, segments_BxT)


class MedusaHead(nn.Module):
  """Head k of Medusa (Cai et al.): a residual SiLU layer over the trunk's last hidden state,
  h + SiLU(h W + b), with W zero-initialised so every head starts as the trunk's own output
  layer. With mtp.head_mlp_dim = F > 0 it is h + SiLU(h W_1 + b) W_2 (W_1: D x F, W_2: F x D,
  W_2 zero-initialised), so its size can match the other kinds'. Position-wise: it has no
  attention and its cache passes through untouched."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h0_BxTxD, emb_BxTxD, positions_BxT, kv=None, segments_BxT=None):
    del emb_BxTxD, positions_BxT, segments_BxT
    D, F, dt = self.cfg.d_model, self.cfg.head_mlp_dim, self.cfg.compute_dtype
    h = h0_BxTxD.astype(dt)
    if not F:
      w = param_with_axes(self, 'w', nn.initializers.zeros, (D, D), ('embed', 'mlp'))
      b = param_with_axes(self, 'b', nn.initializers.zeros, (D,), ('norm',))
      return h + jax.nn.silu(_mul(h, w.astype(dt)) + b.astype(dt)), kv
    w_in = param_with_axes(self, 'w_in', fan_in_init(0, 1), (D, F), ('embed', 'mlp'))
    b = param_with_axes(self, 'b', nn.initializers.zeros, (F,), ('mlp',))
    w_out = param_with_axes(self, 'w_out', nn.initializers.zeros, (F, D), ('mlp', 'embed'))
    return h + _mul(jax.nn.silu(_mul(h, w_in.astype(dt)) + b.astype(dt)), w_out.astype(dt)), kv


def head_blocks(cfg: ModelConfig, x_BxTxD, positions_BxT, kv, segments_BxT=None):
  """mtp.head_blocks Transformer blocks in a row, each MLP mtp.head_mlp_dim wide (the trunk's
  width when 0); kv is None or a list with one cache per block. Call inside a compact method."""
  block_cfg = dataclasses.replace(cfg, mlp_dim=cfg.head_mlp_dim or cfg.mlp_dim)
  caches = []
  angles = rotary(positions_BxT, cfg)
  for j in range(cfg.head_blocks):
    x_BxTxD, c = Block(block_cfg, name=block_name(j))(x_BxTxD, positions_BxT, angles,
                                                       None if kv is None else kv[j], None,
                                                       segments_BxT)
    caches.append(c)
  return x_BxTxD, None if kv is None else caches


HEADS = {'sequential': SequentialModule, 'parallel': ParallelHead, 'medusa': MedusaHead}
