"""Transformer building blocks: RMSNorm, grouped-query attention with RoPE and an optional KV
cache, SwiGLU MLP, and the pre-norm block that combines them.

Shape legend: B batch, T query positions, L key positions (the cache length), D model width,
H query heads, K kv heads, G = H / K, E head dim, F MLP width, V vocab.
"""

import contextlib
import functools
import math
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax import kernels
from mtp_jax.config import ModelConfig, rotary_frequencies
from mtp_jax.matmul import matmul, precision


def param_with_axes(module: nn.Module, name: str, init, shape, axes):
  """A float32 parameter annotated with logical axis names for sharding. A matrix that decoding
  keeps as kernels.ScaledTiles (model.tile_trunk) is taken as it is: it carries the matrix's
  shape, which its arrays (integers two to a byte) do not have for Flax's check of a param's
  shape against its first array."""
  if module.has_variable('params', name):
    value = module.get_variable('params', name)
    if isinstance(value, kernels.ScaledTiles):
      if value.shape != tuple(shape):
        raise ValueError(f'param {name}: scaled tiles of shape {value.shape}, {tuple(shape)} '
                         'expected')
      return value
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def dense_param(module: nn.Module, name: str, init, in_shape: tuple, out_shape: tuple,
                in_axes: tuple, out_axes: tuple, cfg: ModelConfig):
  """A matrix that `dense` contracts: stored (in..., out...), or (out..., in...) under
  cfg.kernels, the layout model.kernel_layout gives the decoding params."""
  if cfg.kernels:
    return param_with_axes(module, name, init, out_shape + in_shape, out_axes + in_axes)
  return param_with_axes(module, name, init, in_shape + out_shape, in_axes + out_axes)


def fused_param(module: nn.Module, name: str, shape: tuple):
  """Matrices that model.kernel_layout stacks along their first (output) axis so that one
  kernel call reads them all: decoding-only (the layout is made from trained params, never
  initialised), on one device (no sharding axes)."""
  return param_with_axes(module, name, nn.initializers.zeros, shape, (None,) * len(shape))


def fan_in_init(in_axis, out_axis):
  return nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal',
                                          in_axis=in_axis, out_axis=out_axis)


def dense(x, w, in_dims: int, cfg: ModelConfig):
  """x's last `in_dims` axes contracted with w's input axes, in the compute dtype. w is stored
  (in..., out...); with cfg.kernels (decoding with model.kernel_layout's params) it is
  (out..., in...), for the few-row kernel, which also reads it in bfloat16 as it is."""
  lead = x.shape[:x.ndim - in_dims]
  if not cfg.kernels:
    k = math.prod(w.shape[:in_dims])
    w = w.astype(cfg.compute_dtype)
    return matmul(x.reshape(-1, k), w.reshape(k, -1)).reshape(*lead, *w.shape[in_dims:])
  out_dims = w.shape[:w.ndim - in_dims]
  y = kernels.rows_matmul(x.reshape(*lead, -1), w.reshape(math.prod(out_dims), -1),
                          exact=cfg.exact_products)
  return y.reshape(*lead, *out_dims)


def rms_norm(x, scale, eps, exact_rows: bool = False):
  """RMSNorm in float32 (the statistics are unstable in bfloat16), returned in x's dtype. With
  `exact_rows` (decoding with the kernels, model.cfg.kernels) each row's sum of squares is taken
  in a fixed order (kernels.square_sums where the kernels run, else row_sums), so a row's result
  does not depend on the rows beside it: a verify of several positions, or a batch, normalises
  each as one row alone would, which greedy decoding's equality with `ar` needs where logits
  nearly tie. Training keeps XLA's reduction, which compiles faster than row_sums."""
  x32 = x.astype(jnp.float32)
  if not exact_rows:
    sums = jnp.sum(x32 * x32, axis=-1, keepdims=True)
  elif (sums := kernels.square_sums(x32)) is None:
    sums = row_sums(x32 * x32)
  y = x32 * jax.lax.rsqrt(sums / x.shape[-1] + eps)
  return (y * scale).astype(x.dtype)


def row_sums(x):
  """Sums over the last axis (kept, of size 1) in a fixed order, with elementwise adds alone:
  halved while its length is even (a zero added to an odd length past 16), then what is left
  added in turn. XLA's reduction picks its order by the array's size (a (8, 576) array's row
  sums differ in their last bits from one row's); the adds do not."""
  while x.shape[-1] > 16 or x.shape[-1] % 2 == 0 and x.shape[-1] > 1:
    if x.shape[-1] % 2:
      x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, 1)])
    half = x.shape[-1] // 2
    x = x[..., :half] + x[..., half:]
  total = x[..., :1]
  for j in range(1, x.shape[-1]):
    total = total + x[..., j:j + 1]
  return total


class RMSNorm(nn.Module):
  """RMSNorm over the last axis, or, with `groups`, over each of that many equal slices of it
  (features of several layers side by side, each at its own scale)."""
  dim: int
  eps: float
  groups: int = 1
  exact_rows: bool = False  # rms_norm's

  def setup(self):
    self.scale = param_with_axes(self, 'scale', nn.initializers.ones, (self.dim,), ('norm',))

  def __call__(self, x):
    sliced = x.reshape(*x.shape[:-1], self.groups, self.dim // self.groups)
    return rms_norm(sliced, self.scale.reshape(self.groups, -1), self.eps,
                    self.exact_rows).reshape(x.shape)


def norm_of(cfg: ModelConfig, dim: int, groups: int = 1, name: str | None = None) -> RMSNorm:
  """The model's RMSNorm over `dim` features: its epsilon, and rows summed exactly where
  decoding runs the kernels (cfg.kernels), as every norm of a decoding step must be for greedy
  `mtp` to equal `ar`."""
  return RMSNorm(dim, cfg.norm_eps, groups, cfg.kernels, name=name)


@functools.lru_cache(maxsize=8)
def _angle_table(length: int, half: int, theta: float, factors: tuple = ()):
  """cos and sin of every position's rotary angles, length x half each, in float64 rounded to
  float32 (NumPy's, so they do not depend on the backend's approximations); each frequency
  divided by its factor when `factors` are given (Llama 3's scaling)."""
  freq = rotary_frequencies(theta, half)
  if factors:
    freq = freq / np.asarray(factors, np.float64)
  angle = np.arange(length, dtype=np.float64)[:, None] * freq
  return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def rotary(positions_BxT, cfg: ModelConfig):
  """(cos, sin) of cfg's rotary angles (its base, and factors where it scales them) at absolute
  positions below model.max_seq_len, B x T x 1 x head_dim / 2, looked up in a table. XLA's CPU
  backend fuses a sin or cos into every operation that reads it, so angles computed in the
  forward were evaluated again, element by element, in each of the 60 rotations of a trunk call;
  a lookup is all those fusions now repeat."""
  cos, sin = _angle_table(cfg.max_seq_len, cfg.head_dim // 2, float(cfg.rope_theta),
                          tuple(cfg.rope_factors))
  take = lambda table: jnp.take(table, positions_BxT, axis=0, mode='clip')[:, :, None, :]
  return take(cos), take(sin)


def rope(x_BxTxNxE, rotary_BxTx1xE):
  """Rotary embedding of pairs (i, i + E/2) by the angles `rotary` holds (cos, sin)."""
  cos, sin = rotary_BxTx1xE
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


def visible_slots(positions_BxT, slots_BxT, length: int):
  """The cache slots each new entry attends to: slots before `before` and slots first..own.
  New entries form runs of consecutive slots that start at the row's first position past the
  pending one (the lowest new position + 1): the entry at position p is the last of a run of
  r = p - (lowest + 1) entries (0 for the pending entry), its ancestors, stored in the slots just
  before its own, and it sees the slots before p - r (the committed prefix and the pending
  entry) and the run. A chain at slots == positions is plain causal attention; a branch of
  drafts stored past the chain, at the positions of the chain tokens it stands in for, sees the
  prefix and itself. Returns (before, first, own), own clipped to the cache."""
  lowest_Bx1 = jnp.min(positions_BxT, axis=1, keepdims=True)
  run_BxT = jnp.maximum(positions_BxT - lowest_Bx1 - 1, 0)
  own_BxT = jnp.minimum(slots_BxT, length - 1)
  return positions_BxT - run_BxT, own_BxT - run_BxT, own_BxT


def attend(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, positions_BxT, kv, use_kernel: bool = False,
           slots_BxT=None, segments_BxT=None):
  """Attention written out: writes the cache if there is one, then masks and takes a float32
  softmax over the T x L scores. Returns (B x T x H x E output, cache). Without a cache the
  mask is causal by position, and with `segments` (an id per position) a position sees only
  those of its own segment: rows packed into one window stay apart. With a cache, the new
  entries are written at `slots` (their positions by default) and each sees what
  `visible_slots` says: causal attention for a chain at slots == positions, and a branch of a
  token tree stored past the chain sees the committed prefix and its own branch (new entries
  must be stored as the runs it describes). With `use_kernel`, attention over a cache goes to
  the kernel, which reads only the entries each query sees."""
  B, T, H, E = q_BxTxHxE.shape
  K = k_BxTxKxE.shape[2]
  if kv is None:
    k_BxLxKxE, v_BxLxKxE = k_BxTxKxE, v_BxTxKxE
    visible_BxTxL = positions_BxT[:, None, :] <= positions_BxT[:, :, None]
    if segments_BxT is not None:
      visible_BxTxL = visible_BxTxL & (segments_BxT[:, None, :] == segments_BxT[:, :, None])
  else:
    slots_BxT = positions_BxT if slots_BxT is None else slots_BxT
    kv = {'k': write_cache(kv['k'], k_BxTxKxE, slots_BxT),
          'v': write_cache(kv['v'], v_BxTxKxE, slots_BxT)}
    k_BxLxKxE, v_BxLxKxE = kv['k'], kv['v']
    out = kernels.cache_attention(q_BxTxHxE, k_BxLxKxE, v_BxLxKxE, positions_BxT, slots_BxT,
                                  use_kernel)
    if out is not None:
      return out.astype(q_BxTxHxE.dtype), kv
    before_BxT, first_BxT, own_BxT = visible_slots(positions_BxT, slots_BxT, kv['k'].shape[1])
    slot_L = jnp.arange(k_BxLxKxE.shape[1])
    visible_BxTxL = ((slot_L < before_BxT[:, :, None]) |
                     ((slot_L >= first_BxT[:, :, None]) & (slot_L <= own_BxT[:, :, None])))
  q_BxTxKxGxE = q_BxTxHxE.reshape(B, T, K, H // K, E)
  scores = jnp.einsum('btkge,blke->bkgtl', q_BxTxKxGxE, k_BxLxKxE,
                      precision=precision(q_BxTxKxGxE)).astype(jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(E))
  scores = jnp.where(visible_BxTxL[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q_BxTxHxE.dtype)
  out_BxTxKxGxE = jnp.einsum('bkgtl,blke->btkge', probs, v_BxLxKxE, precision=precision(probs))
  return out_BxTxKxGxE.reshape(B, T, H, E), kv


_NOTED = set()  # fused_attention's notes already printed


def fused_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segments_BxT=None):
  """Causal jax.nn.dot_product_attention (within each segment, when given, as `attend`):
  cuDNN's flash attention on a GPU for bfloat16 and float16 (jax's own default is XLA's
  implementation, which keeps the T x T scores like `attend`), XLA's on other backends, in
  float32, or where cuDNN refuses the shapes when the step is traced (a failure later, while XLA
  compiles the step, is not caught)."""
  q_dtype = jnp.dtype(q_BxTxHxE.dtype)
  mask = (None if segments_BxT is None else
          segments_BxT[:, None, :, None] == segments_BxT[:, None, None, :])
  if jax.default_backend() == 'gpu' and q_dtype in (jnp.bfloat16, jnp.float16):
    try:
      return jax.nn.dot_product_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, mask=mask,
                                          is_causal=True, implementation='cudnn')
    except (ValueError, NotImplementedError, RuntimeError) as e:
      # jax raises RuntimeError where this jaxlib has no cuDNN (ROCm, a CUDA build without it),
      # ValueError / NotImplementedError for shapes cuDNN does not take
      why = ('cuDNN is not available' if isinstance(e, RuntimeError)
             else 'cuDNN refused these shapes')
      note = (f"note: model.attention=fused: {why} ({e}); using XLA's attention, which keeps "
              'the T x T scores')
      if note not in _NOTED:  # once, not once per layer and trace
        _NOTED.add(note)
        print(note, file=sys.stderr)
  highest = precision(q_BxTxHxE) is not None  # the precision every other product asks for
  with jax.default_matmul_precision('highest') if highest else contextlib.nullcontext():
    return jax.nn.dot_product_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, mask=mask,
                                        is_causal=True, implementation='xla')


class Attention(nn.Module):
  """Causal grouped-query attention, queries and keys rotated by `rotary` (layers.rotary at these
  positions, which the caller computes once for all its blocks). With `kv` (a cache dict), the
  new keys and values are written at `slots` (default: `positions`) and each query attends as
  `attend` describes; entries past a row's true length are stale drafts and are hidden by that
  same test. Without a cache, `segments` keeps packed rows apart (`attend`). With
  model.qkv_bias, q, k and v have biases (Qwen2); with model.qk_norm, q and k are RMS-normalised
  per head before the rotation (Qwen3)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, rotary_BxTx1xE, kv=None, slots_BxT=None,
               segments_BxT=None):
    cfg = self.cfg
    D, H, K, E = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dt = cfg.compute_dtype
    x = x_BxTxD.astype(dt)
    if cfg.kernels:  # model.kernel_layout's q, k and v stacked head-wise: one product
      qkv_BxTxNxE = dense(x, fused_param(self, 'qkv', (H + 2 * K, E, D)), 1, cfg)
      if cfg.qkv_bias:  # stacked the same way
        qkv_BxTxNxE = qkv_BxTxNxE + fused_param(self, 'qkv_bias', (H + 2 * K, E)).astype(dt)
      q_BxTxHxE, k_BxTxKxE, v_BxTxKxE = jnp.split(qkv_BxTxNxE, (H, H + K), axis=-2)
    else:
      w_q = dense_param(self, 'q', fan_in_init(0, (1, 2)), (D,), (H, E), ('embed',),
                        ('heads', 'head_dim'), cfg)
      w_k = dense_param(self, 'k', fan_in_init(0, (1, 2)), (D,), (K, E), ('embed',),
                        ('kv_heads', 'head_dim'), cfg)
      w_v = dense_param(self, 'v', fan_in_init(0, (1, 2)), (D,), (K, E), ('embed',),
                        ('kv_heads', 'head_dim'), cfg)
      q_BxTxHxE, k_BxTxKxE, v_BxTxKxE = (dense(x, w, 1, cfg) for w in (w_q, w_k, w_v))
      if cfg.qkv_bias:  # Qwen2's
        q_BxTxHxE, k_BxTxKxE, v_BxTxKxE = (
            y + param_with_axes(self, f'{n}_bias', nn.initializers.zeros, (N, E),
                                (axis, 'head_dim')).astype(dt)
            for y, n, N, axis in ((q_BxTxHxE, 'q', H, 'heads'), (k_BxTxKxE, 'k', K, 'kv_heads'),
                                  (v_BxTxKxE, 'v', K, 'kv_heads')))
    w_o = dense_param(self, 'o', fan_in_init((0, 1), 2), (H, E), (D,), ('heads', 'head_dim'),
                      ('embed',), cfg)
    if cfg.qk_norm:  # Qwen3's, per head, before the rotation
      q_BxTxHxE = norm_of(cfg, E, name='q_norm')(q_BxTxHxE)
      k_BxTxKxE = norm_of(cfg, E, name='k_norm')(k_BxTxKxE)
    q_BxTxHxE = rope(q_BxTxHxE, rotary_BxTx1xE)
    k_BxTxKxE = rope(k_BxTxKxE, rotary_BxTx1xE)
    if kv is None and cfg.attention == 'fused':
      # No cache means positions 0..T-1 in every row (the training path), so the position mask
      # of `attend` is the plain causal mask.
      out_BxTxHxE = fused_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segments_BxT)
    else:
      out_BxTxHxE, kv = attend(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, positions_BxT, kv, cfg.kernels,
                               slots_BxT, segments_BxT)
    out_BxTxD = dense(out_BxTxHxE.astype(dt), w_o, 2, cfg)
    out_BxTxD = nn.with_logical_constraint(out_BxTxD, ('batch', 'length', 'embed'))
    return out_BxTxD, kv


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.cfg
    D, F, dt = cfg.d_model, cfg.mlp_dim, cfg.compute_dtype
    x = x_BxTxD.astype(dt)
    if cfg.kernels:  # model.kernel_layout's gate and up stacked: one product
      gate_up_BxTx2xF = dense(x, fused_param(self, 'gate_up', (2, F, D)), 1, cfg)
      gate_BxTxF, up_BxTxF = gate_up_BxTx2xF[..., 0, :], gate_up_BxTx2xF[..., 1, :]
    else:
      w_gate = dense_param(self, 'gate', fan_in_init(0, 1), (D,), (F,), ('embed',), ('mlp',), cfg)
      w_up = dense_param(self, 'up', fan_in_init(0, 1), (D,), (F,), ('embed',), ('mlp',), cfg)
      gate_BxTxF, up_BxTxF = dense(x, w_gate, 1, cfg), dense(x, w_up, 1, cfg)
    w_down = dense_param(self, 'down', fan_in_init(0, 1), (F,), (D,), ('mlp',), ('embed',), cfg)
    h_BxTxF = jax.nn.silu(gate_BxTxF) * up_BxTxF
    h_BxTxF = nn.with_logical_constraint(h_BxTxF, ('batch', 'length', 'mlp'))
    return dense(h_BxTxF, w_down, 1, cfg)


class Block(nn.Module):
  """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, rotary_BxTx1xE, kv=None, slots_BxT=None,
               segments_BxT=None):
    D = self.cfg.d_model
    attn_in = norm_of(self.cfg, D, name='attn_norm')(x_BxTxD)
    attn_out, kv = Attention(self.cfg, name='attn')(attn_in, positions_BxT, rotary_BxTx1xE, kv,
                                                    slots_BxT, segments_BxT)
    x_BxTxD = x_BxTxD + attn_out
    x_BxTxD = x_BxTxD + MLP(self.cfg, name='mlp')(norm_of(self.cfg, D, name='mlp_norm')(x_BxTxD))
    return nn.with_logical_constraint(x_BxTxD, ('batch', 'length', 'embed')), kv


def greedy(logits_xV):
  """The argmax over the vocabulary (the first index of the maximum, as jnp.argmax; a row with a
  NaN gives a valid but unspecified id), written as a max and then a min over indices, each
  folded over 128-wide lanes first. XLA's CPU backend runs these two plain reductions faster
  than the pair-valued reduction behind jnp.argmax (about 2.5x at 32 rows of V = 2048), and
  training takes one per position and depth for its accuracy and agreement; decoding takes one
  for every drafted, verified and sampled token, through its kernel (kernels.argmax, the same
  token for rows without a NaN) where the decoding kernels run."""
  logits = logits_xV.astype(jnp.float32)
  V = logits.shape[-1]

  def fold(x, reduce):  # V // 128 rows of 128 lanes reduced to one row first, where V allows
    return reduce(x.reshape(*x.shape[:-1], V // 128, 128), axis=-2) if V % 128 == 0 else x
  top = jnp.max(fold(logits, jnp.max), axis=-1, keepdims=True)
  index = jnp.where(logits == top, jnp.arange(V, dtype=jnp.int32), V)
  # V where a NaN maximum matched nothing: clamped to a valid id.
  return jnp.minimum(jnp.min(fold(index, jnp.min), axis=-1), V - 1)
