"""The multi-token-prediction heads that sit on the trunk: DeepSeek-V3 sequential modules,
Gloeckle et al. parallel heads and Medusa heads. Each maps an input hidden state to depth k's.

Shape legend: B batch, T positions, D model width.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtp_jax.config import ModelConfig
from mtp_jax.layers import Block, RMSNorm, fan_in_init, param_with_axes


class SequentialModule(nn.Module):
  """Module k of DeepSeek-V3: h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)],
  h^k = TRM_k(h'). The embedding comes first in the concat, as in the released weights."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_prev_BxTxD, emb_BxTxD, positions_BxT, kv=None):
    cfg = self.cfg
    eh_proj = param_with_axes(self, 'eh_proj', fan_in_init(0, 1), (2 * cfg.d_model, cfg.d_model),
                              ('concat_embed', 'embed'))
    e = RMSNorm(cfg.d_model, cfg.norm_eps, name='enorm')(emb_BxTxD)
    h = RMSNorm(cfg.d_model, cfg.norm_eps, name='hnorm')(h_prev_BxTxD.astype(e.dtype))
    x_BxTxD = jnp.concatenate([e, h], axis=-1) @ eh_proj.astype(cfg.compute_dtype)
    return Block(cfg, name='block')(x_BxTxD, positions_BxT, kv)


class ParallelHead(nn.Module):
  """Head k of Gloeckle et al.: one Transformer block over the trunk's last hidden state."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h0_BxTxD, emb_BxTxD, positions_BxT, kv=None):
    del emb_BxTxD  # parallel heads see only the trunk
    return Block(self.cfg, name='block')(h0_BxTxD, positions_BxT, kv)


class MedusaHead(nn.Module):
  """Head k of Medusa (Cai et al.): a residual SiLU layer over the trunk's last hidden state,
  h + SiLU(h W + b), with W zero-initialised so every head starts as the trunk's own output
  layer. Position-wise: it has no attention and its cache passes through untouched."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h0_BxTxD, emb_BxTxD, positions_BxT, kv=None):
    del emb_BxTxD, positions_BxT
    D, dt = self.cfg.d_model, self.cfg.compute_dtype
    w = param_with_axes(self, 'w', nn.initializers.zeros, (D, D), ('embed', 'mlp'))
    b = param_with_axes(self, 'b', nn.initializers.zeros, (D,), ('norm',))
    h = h0_BxTxD.astype(dt)
    return h + jax.nn.silu(h @ w.astype(dt) + b.astype(dt)), kv


HEADS = {'sequential': SequentialModule, 'parallel': ParallelHead, 'medusa': MedusaHead}
