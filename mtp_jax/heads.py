"""The multi-token-prediction heads that sit on the trunk: DeepSeek-V3 sequential modules and
Gloeckle et al. parallel heads. Each maps an input hidden state to the hidden state of depth k.

Shape legend: B batch, T positions, D model width.
"""

import flax.linen as nn
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


HEADS = {'sequential': SequentialModule, 'parallel': ParallelHead}
