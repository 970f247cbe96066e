"""The cost model of a train step: its parameter counts and FLOPs from the model config alone, and
XLA's own FLOP count and memory of a lowered or compiled step, which check and complete them.

Names: d model width, L trunk layers, D MTP depth, T positions, V vocab, H and K query and kv
heads of E dims, F MLP width. FLOPs are per train step of B x T tokens. Per token forward, a
Linear (a, b) costs 2ab, and one block's attention 2 * 2 * T_ctx * H * E (scores, then values),
with T_ctx = T / 2 under the causal mask in model FLOPs and T in hardware FLOPs (the masked
attention is computed dense).
"""

import dataclasses

import jax
import numpy as np
# jax's only public form of this, jax.ad_checkpoint.print_saved_residuals, prints text; the
# shapes themselves are only returned by this function of jax's own module.
from jax._src.ad_checkpoint import saved_residuals

from mtp_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Piece:
  """A block or MTP head as counted per token. `matrices`: entries of the Linear weights applied
  to every token (2 FLOPs each, forward); `vectors`: its other parameters (norm scales, biases);
  `last`: entries of the matrix whose output only feeds the residual sum, which the backward pass
  never reads and model.remat so does not recompute; `raw_input`: entries of the matrix applied
  to the piece's input directly, with no trained norm between: when that input is a frozen
  trunk's, nothing needs its gradient."""
  matrices: int
  vectors: int
  attends: int  # attention layers (0 or 1 but in a head of several blocks)
  last: int
  raw_input: int


def block(cfg: ModelConfig, mlp_dim: int) -> Piece:
  """A Transformer block: q, k, v (with biases under model.qkv_bias), o and a SwiGLU MLP
  `mlp_dim` wide; two norms (four with model.qk_norm)."""
  d, HE, KE = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  biases = HE + 2 * KE if cfg.qkv_bias else 0  # Qwen2's
  biases += 2 * cfg.head_dim if cfg.qk_norm else 0  # Qwen3's q and k norms
  return Piece(matrices=2 * d * HE + 2 * d * KE + 3 * d * mlp_dim, vectors=2 * d + biases,
               attends=1, last=mlp_dim * d, raw_input=0)


def head(cfg: ModelConfig) -> Piece:
  """One MTP head of cfg.mtp_kind (see heads.py): a parallel head is mtp.head_blocks blocks
  (their MLPs mtp.head_mlp_dim wide when set), a sequential module adds eh_proj (2d x d) and
  three norms (enorm, hnorm and its own output norm), a Medusa head is h + SiLU(h W + b), or
  h + SiLU(h W_1 + b) W_2 with mtp.head_mlp_dim = F."""
  d, F = cfg.d_model, cfg.head_mlp_dim
  if cfg.mtp_kind == 'medusa':
    if F:
      return Piece(matrices=2 * d * F, vectors=F, attends=0, last=F * d, raw_input=d * F)
    return Piece(matrices=d * d, vectors=d, attends=0, last=0, raw_input=d * d)
  one = block(cfg, F or cfg.mlp_dim)
  n = cfg.head_blocks
  # Only the last block's down projection feeds nothing but the head's output.
  piece = dataclasses.replace(one, matrices=n * one.matrices, vectors=n * one.vectors, attends=n)
  if cfg.mtp_kind == 'parallel':
    return piece
  return dataclasses.replace(piece, matrices=piece.matrices + 2 * d * d,
                             vectors=piece.vectors + 3 * d)


def features_in(cfg: ModelConfig) -> Piece:
  """What the first sequential module adds to read mtp.feature_layers: eh_proj's extra d x d
  rows per layer and its hnorm's scale (after a trained norm, so fully differentiated)."""
  n = len(cfg.feature_layers) if cfg.mtp_depth and cfg.mtp_chains else 0
  return Piece(matrices=n * cfg.d_model ** 2, vectors=n * cfg.d_model, attends=0, last=0,
               raw_input=0)


def param_counts(cfg: ModelConfig) -> dict:
  """Parameters of the trunk (embedding, blocks, final norm, untied output layer) and of the D
  heads."""
  d, V = cfg.d_model, cfg.vocab_size
  trunk_block = block(cfg, cfg.mlp_dim)
  trunk = (V * d * (1 if cfg.tie_embeddings else 2)
           + cfg.num_layers * (trunk_block.matrices + trunk_block.vectors) + d)
  extra = features_in(cfg)
  heads = cfg.mtp_depth * (head(cfg).matrices + head(cfg).vectors) + extra.matrices + extra.vectors
  return {'trunk': trunk, 'heads': heads, 'total': trunk + heads}


def train_flops(cfg: ModelConfig, batch: int, seq_len: int, *, frozen: bool = False,
                draft_vocab: int = 0, remat_logits: bool = True) -> dict:
  """FLOPs of one train step on batch x seq_len tokens. Model FLOPs: the forward pass plus a
  backward pass that costs twice the forward of what it differentiates (the input and the
  weight gradients); every depth projects to the vocabulary, the heads to `draft_vocab` tokens
  when > 0. With a `frozen` trunk only the heads are differentiated: the trunk and its own
  output projection run forward only, the heads' projection (a frozen matrix) needs only its
  input gradient, and a head's `raw_input` matrix (it reads the trunk's output) only its weight
  gradient.

  Hardware FLOPs are what the compiled step does: the masked attention is dense (T x T), the loss
  recomputes the differentiated projections in the backward pass (with `remat_logits`), and
  model.remat recomputes the forward of every differentiated block and head, but its `last`
  matrix. Neither counts elementwise work (norms, softmaxes, the optimizer's ~20 FLOPs per trained
  parameter), which XLA's count includes."""
  d, D, L, T = cfg.d_model, cfg.mtp_depth, cfg.num_layers, seq_len
  trunk_block, mtp_head, extra = block(cfg, cfg.mlp_dim), head(cfg), features_in(cfg)
  HE = cfg.num_heads * cfg.head_dim

  def attention(hardware):  # per block: the causal half of T x T, or all of it
    return 2 * 2 * (T if hardware else T / 2) * HE

  def forward(piece, hardware):
    return 2 * piece.matrices + piece.attends * attention(hardware)

  trunk_out, heads_out = 2 * d * cfg.vocab_size, D * 2 * d * (draft_vocab or cfg.vocab_size)

  def step(hardware: bool):
    trunk = L * forward(trunk_block, hardware)
    heads = D * forward(mtp_head, hardware) + forward(extra, hardware)
    if frozen:
      backward = 2 * heads - D * 2 * mtp_head.raw_input + heads_out
      recomputed = heads_out
    else:
      backward = 2 * (trunk + heads + trunk_out + heads_out)
      recomputed = trunk_out + heads_out
    total = trunk + heads + trunk_out + heads_out + backward
    if not hardware:
      return total
    remat = D * (forward(mtp_head, hardware) - 2 * mtp_head.last) + forward(extra, hardware)
    if not frozen:
      remat += L * (forward(trunk_block, hardware) - 2 * trunk_block.last)
    return total + (recomputed if remat_logits else 0) + (remat if cfg.remat else 0)

  tokens = batch * seq_len
  parts = {'trunk_linear': L * 2 * trunk_block.matrices,
           'heads_linear': D * 2 * mtp_head.matrices + 2 * extra.matrices,
           'attention_causal': (L + D * mtp_head.attends) * attention(False),
           'output_projection': trunk_out + heads_out}
  return {'tokens': tokens, 'forward_per_token': sum(parts.values()),
          'model': step(False) * tokens, 'hardware': step(True) * tokens,
          'parts_forward_per_token': parts}


def train_flops_of(cfg: ModelConfig, t) -> dict:
  """train_flops of the step a config trains: `cfg` its model, `t` its train section (batch,
  window, frozen trunk, draft vocabulary, kept or recomputed logits)."""
  return train_flops(cfg, t.batch_size, t.seq_len, frozen=t.freeze_trunk,
                     draft_vocab=t.draft_vocab, remat_logits=t.remat_logits)


def xla_cost(stage) -> dict:
  """XLA's FLOPs and bytes accessed of a lowered or compiled function (cost_analysis returns a
  dict or, in older jax, a list of them)."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  cost = cost or {}
  return {'flops': cost.get('flops'), 'bytes': cost.get('bytes accessed')}


def memory_stats(compiled) -> dict:
  """XLA's temp/argument/output/alias/code bytes of a compiled function (per device), and
  temp + argument as the peak estimate; {} where the backend does not say."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  names = ('temp', 'argument', 'output', 'alias', 'generated_code')
  out = {n: int(getattr(m, f'{n}_size_in_bytes', 0)) for n in names}
  out['peak_estimate'] = out['temp'] + out['argument']
  return out


def tree_bytes(tree) -> int:
  """Bytes of every array (or ShapeDtypeStruct) in a pytree."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def saved_residual_bytes(f, *args) -> int:
  """Bytes the backward pass of f(*args) keeps from its forward pass, its arguments excluded
  (args may be ShapeDtypeStructs). This is what model.remat trades for recomputation; XLA CPU's
  memory_analysis does not show it, as its scheduler keeps similar buffers either way."""
  return tree_bytes([aval for aval, source in saved_residuals(f, *args)
                     if 'argument' not in source])
