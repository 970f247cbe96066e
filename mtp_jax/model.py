"""The MTP language model: a Llama-style trunk plus D multi-token-prediction heads, exposed as
small methods (trunk, mtp_step, logits) that training and the decoder compose.

Shape legend: B batch, T positions, D model width, V vocab. Depth k = 0 is the trunk's own
next-token head; depth k >= 1 predicts token t_{i+k+1} at position i.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtp_jax import kernels
from mtp_jax.config import ModelConfig
from mtp_jax.heads import HEADS
from mtp_jax.layers import Block, dense_param, norm_of, param_with_axes, rms_norm, rotary
from mtp_jax.matmul import matmul


class MTPLanguageModel(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    block = nn.remat(Block) if cfg.remat else Block
    self.embedding = param_with_axes(self, 'embedding', nn.initializers.normal(0.02),
                                     (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'))
    self.blocks = [block(cfg) for _ in range(cfg.num_layers)]
    self.final_norm = norm_of(cfg, cfg.d_model)
    if not cfg.tie_embeddings:
      self.unembedding = dense_param(self, 'unembedding', nn.initializers.normal(0.02),
                                     (cfg.d_model,), (cfg.vocab_size,), ('embed',), ('vocab',), cfg)
    head = nn.remat(HEADS[cfg.mtp_kind]) if cfg.remat else HEADS[cfg.mtp_kind]
    self.mtp = [head(cfg) for _ in range(cfg.mtp_depth)]
    # Sequential modules have their own output norm; the other kinds share the trunk's.
    if cfg.mtp_chains:
      self.mtp_norms = [norm_of(cfg, cfg.d_model) for _ in range(cfg.mtp_depth)]

  def embed(self, tokens_BxT):
    emb = jnp.take(self.embedding, tokens_BxT, axis=0, mode='clip')
    return emb.astype(self.cfg.compute_dtype)

  def trunk(self, tokens_BxT, positions_BxT, caches=None, slots_BxT=None, segments_BxT=None):
    """Returns the trunk's features h^0 and updated caches: its last hidden state (before the
    final norm), followed by the outputs of the blocks mtp.feature_layers names (B x T x
    feature_dim). With caches, `slots` says where the new entries go (layers.attend); without,
    `segments` (a row id per position) keeps rows packed into one window apart."""
    x_BxTxD = self.embed(tokens_BxT)
    new_caches, taken = [], {}
    angles = rotary(positions_BxT, self.cfg)
    for i, block in enumerate(self.blocks):
      x_BxTxD, kv = block(x_BxTxD, positions_BxT, angles, None if caches is None else caches[i],
                          slots_BxT, segments_BxT)
      new_caches.append(kv)
      if i in self.cfg.feature_layers:
        taken[i] = x_BxTxD
    if taken:
      x_BxTxD = jnp.concatenate([x_BxTxD] + [taken[i] for i in self.cfg.feature_layers], axis=-1)
    return x_BxTxD, (None if caches is None else new_caches)

  def mtp_step(self, k: int, h_in_BxTxD, tokens_BxT, positions_BxT, kv=None, segments_BxT=None):
    """Depth k >= 1. h_in is h^{k-1} for sequential modules and h^0 for parallel heads;
    tokens_BxT holds t_{i+k} at position i (used by sequential modules only); `segments` keeps
    rows packed into one training window apart in the heads' attention."""
    return self.mtp[k - 1](h_in_BxTxD, self.embed(tokens_BxT), positions_BxT, kv, segments_BxT)

  def head_weights(self, k: int):
    """(norm scale, output matrix) of depth k, as arrays, so the loss can project to the
    vocabulary one depth at a time (rematerialized with train.remat_logits). The matrix is returned as
    stored (V x D embedding when tied, D x V otherwise) and `project` contracts it in place in
    float32 and in decoding, never through a transposed copy (which XLA's CPU backend would
    rebuild at every decoding step); only a bfloat16 training step on CPU copies it transposed,
    once per step (mtp_jax/matmul.py)."""
    if k > 0 and self.cfg.mtp_chains:
      norm = self.mtp_norms[k - 1]
    else:
      norm = self.final_norm
    # decoding's params may hold the output matrix as scaled tiles too (tile_trunk)
    tiles = self.get_variable('params', 'output_tiles') if self.cfg.kernels else None
    if tiles is not None:
      return norm.scale, tiles
    return norm.scale, self.embedding if self.cfg.tie_embeddings else self.unembedding

  def logits(self, h_BxTxD, k: int = 0):
    return project(h_BxTxD, *self.head_weights(k), self.cfg)

  def hidden_states(self, inputs_BxT, tokens_BxW, segments_BxT=None):
    """Every depth's hidden state over T positions (no cache): the trunk on `inputs_BxT`, then
    the heads (head_states); with `segments` (a row id per position) the trunk's and the heads'
    attention stay inside each position's row."""
    T = inputs_BxT.shape[1]
    h0, _ = self.trunk(inputs_BxT, jnp.broadcast_to(jnp.arange(T), inputs_BxT.shape),
                       segments_BxT=segments_BxT)
    return self.head_states(h0, tokens_BxW, segments_BxT)

  def head_states(self, h0_BxTxD, tokens_BxW, segments_BxT=None):
    """[h0, h1, .., hD] from the trunk's h0 over T positions: depth k reads
    t_{i+k} = tokens_BxW[:, i + k]. With `segments` (a row id per position) a head's attention
    stays inside each position's row."""
    T = h0_BxTxD.shape[1]
    positions_BxT = jnp.broadcast_to(jnp.arange(T), h0_BxTxD.shape[:2])
    hidden, h = [h0_BxTxD], h0_BxTxD
    for k in range(1, self.cfg.mtp_depth + 1):
      h_in = h if self.cfg.mtp_chains else h0_BxTxD
      if k > 1 and self.cfg.detach_chain:
        h_in = jax.lax.stop_gradient(h_in)
      h, _ = self.mtp_step(k, h_in, tokens_BxW[:, k:k + T], positions_BxT, None, segments_BxT)
      hidden.append(h)
    return hidden

  def __call__(self, tokens_BxW):
    """Every depth's logits for a window of T + D + 1 tokens (also the initialization path)."""
    T = tokens_BxW.shape[1] - self.cfg.mtp_depth - 1
    hidden = self.hidden_states(tokens_BxW[:, :T], tokens_BxW)
    return [self.logits(h, k) for k, h in enumerate(hidden)]


def project(h_BxTxD, scale_D, out, cfg: ModelConfig):
  """Norm then output matrix (V x D when tied to the embedding, D x V otherwise); logits in
  float32. Of the trunk's features (wider than D with mtp.feature_layers) it reads the first D,
  the last hidden state."""
  x = rms_norm(h_BxTxD[..., :cfg.d_model], scale_D, cfg.norm_eps, cfg.kernels)
  if cfg.kernels:  # V x D: kernel_layout's unembedding
    logits = kernels.rows_matmul(x, out, exact=cfg.exact_products)  # widens out to x's dtype
  else:  # V x D when tied to the embedding, D x V otherwise
    logits = matmul(x.reshape(-1, cfg.d_model), out.T if cfg.tie_embeddings else out,
                    jnp.float32).reshape(*x.shape[:-1], -1)
  return nn.with_logical_constraint(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))


# Matrices that layers.dense contracts: parameter name -> its number of input axes.
_DENSE = {'q': 1, 'k': 1, 'v': 1, 'o': 2, 'gate': 1, 'up': 1, 'down': 1, 'eh_proj': 1,
          'unembedding': 1, 'qkv': 1, 'gate_up': 1}  # the last two: kernel_layout's stacks


def _keys(path) -> list[str]:
  return [str(getattr(p, 'key', '')) for p in path]


def _in_heads(keys) -> bool:
  """Whether the param at this path (keys) belongs to an MTP head."""
  return any(k.startswith('mtp_') for k in keys)


def trunk_path(path) -> bool:
  """Whether the leaf at this pytree path belongs to the trunk: not an MTP head's, and not the
  draft vocabulary's rows a decoder adds beside the params (DecodeModel.prepare)."""
  keys = _keys(path)
  return not _in_heads(keys) and keys[:1] != ['draft']


def _dense_inputs(keys) -> int:
  """Input axes of the dense matrix at this param path (keys), 0 for any other param: Medusa's
  layers, norms, the embedding."""
  name = keys[-1]
  if name not in _DENSE or (name in ('q', 'k', 'v', 'o') and 'attn' not in keys[:-1]):
    return 0
  return _DENSE[name]


def outputs_first(path, leaf):
  """A dense matrix of the stored params, (in..., out...), as kernel_layout keeps it: (out...,
  in...), one output per row; any other leaf as it is."""
  n_in = _dense_inputs(_keys(path))
  if not n_in:
    return leaf
  return jnp.moveaxis(leaf, tuple(range(n_in)), tuple(range(leaf.ndim - n_in, leaf.ndim)))


def matrix_rows(path, leaf):
  """A dense matrix of kernel_layout's params, (out..., in...), as the 2-D matrix the kernels
  multiply: (outputs, inputs); None for any other leaf."""
  n_in = _dense_inputs(_keys(path))
  return leaf.reshape(-1, math.prod(leaf.shape[leaf.ndim - n_in:])) if n_in else None


def kernel_layout(params):
  """The params as the decoding kernels read them (ModelConfig.kernels): every dense matrix
  stored (out..., in...), one output per row, and the matrices that read the same input stacked
  into one, so that one pass over it computes them all: an attention's q, k and v along the head
  axis ('qkv', H + 2K heads; their biases, where there are, 'qkv_bias'), an MLP's gate and up
  ('gate_up', 2 x F). All in float32;
  narrow_heads stores the MTP heads' matrices narrower."""
  def stack(tree, name=''):
    if not isinstance(tree, dict):
      return tree
    tree = {k: stack(v, k) for k, v in tree.items()}
    if name == 'attn' and {'q', 'k', 'v'} <= tree.keys():
      tree['qkv'] = jnp.concatenate([tree.pop('q'), tree.pop('k'), tree.pop('v')], axis=0)
    if name == 'attn' and {'q_bias', 'k_bias', 'v_bias'} <= tree.keys():  # Qwen2's, alike
      tree['qkv_bias'] = jnp.concatenate([tree.pop(f'{n}_bias') for n in 'qkv'], axis=0)
    if name == 'mlp' and {'gate', 'up'} <= tree.keys():
      tree['gate_up'] = jnp.stack([tree.pop('gate'), tree.pop('up')])
    return tree
  return stack(jax.tree_util.tree_map_with_path(outputs_first, params))


def narrow_heads(layout, head_dtype: str):
  """kernel_layout's params with the MTP heads' dense matrices in `head_dtype`: float32 (as they
  are), bfloat16 (the kernel reads it as it is), int8 (kernels.Int8Rows, a scale per output
  row) or q4_1 (kernels.ScaledTiles: kernels.narrowed). Every other leaf is the same array
  object (Medusa's layers, norms, the trunk), so copies for several dtypes share the trunk."""
  def narrow(path, leaf):
    keys = _keys(path)
    n_in = _dense_inputs(keys)
    if head_dtype == 'float32' or not n_in or not _in_heads(keys):
      return leaf
    return kernels.narrowed(leaf, head_dtype, n_in)
  return jax.tree_util.tree_map_with_path(narrow, layout)


def output_matrix(inner, kernel_layout_: bool):
  """The output matrix of params['params'] (`inner`), V x D: the embedding when tied (there is
  no unembedding), else the unembedding (D x V as stored, V x D in kernel_layout's params)."""
  if 'unembedding' not in inner:
    return inner['embedding']
  return inner['unembedding'] if kernel_layout_ else inner['unembedding'].T


def tile_trunk(layout, scaled: bool = True, halves: bool = True):
  """kernel_layout's params with each of the trunk's dense matrices that the tile kernels can take
  exactly (its shape in whole tiles) stored for them: as kernels.ScaledTiles where every run of 32
  entries along a row is a scale times small integers, with or without an offset (a GGUF Q8_0,
  Q4_0, Q5_0 or Q4_1 tensor: 1 byte an entry, or half of one for Q4_1 and Q4_0), else tiled in
  two bfloat16 halves where every entry splits so (kernels.tiled: 4 bytes an entry). The heads'
  matrices, the embedding and every other leaf stay as they are. A tied output matrix (the
  embedding) in ScaledTiles' form is added beside it as such, under 'output_tiles', which the
  projections onto the vocabulary then read; the embedding stays for looking tokens up. Without
  `scaled` (kept for comparisons), the blocks' matrices are all in two halves, as before
  ScaledTiles; a tied output matrix is still added. Without `halves` (a CPU without the tile
  unit, whose FMAs multiply ScaledTiles but gain nothing from two halves), no matrix is tiled in
  two halves."""
  def tile(path, leaf):
    w = matrix_rows(path, leaf)
    if w is None or _in_heads(_keys(path)) or leaf.dtype != jnp.float32:
      return leaf
    if w.shape[0] % kernels.TILE_ROWS or w.shape[1] % kernels.TILE_COLUMNS:
      return leaf
    t = kernels.scaled_tiles_if_exact(w) if scaled else None
    if t is None and halves:
      t = kernels.tiled_if_exact(w)
    return leaf if t is None else t.reshape(*leaf.shape)
  tiled = jax.tree_util.tree_map_with_path(tile, layout)
  inner = tiled['params']
  if 'unembedding' in inner:  # untied: tiled in place, or not at all
    return tiled
  output = kernels.scaled_tiles_if_exact(inner['embedding'])
  return tiled if output is None else {**tiled, 'params': {**inner, 'output_tiles': output}}


def init_params(cfg: ModelConfig, rng):
  """Parameters as a plain pytree (boxes with logical axis names removed)."""
  return nn.meta.unbox(MTPLanguageModel(cfg).init(rng, init_tokens(cfg)))


def init_tokens(cfg: ModelConfig):
  """A dummy window that reaches every parameter at init."""
  return jnp.zeros((1, cfg.mtp_depth + 2), jnp.int32)
