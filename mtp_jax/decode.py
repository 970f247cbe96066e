"""Autoregressive and self-speculative MTP decoding in one jitted jax.lax.while_loop.

Each iteration drafts S tokens with the MTP heads, verifies them with one trunk forward over
S + 1 positions, and commits the accepted prefix plus one trunk token. Verification is
speculative sampling (Leviathan et al.), which at temperature 0 reduces to "accept while the
draft is the trunk's argmax", so output is exactly the trunk's own. S = 0 is plain
autoregressive decoding through the same loop.

With `candidates` K > 1, the first head's K - 1 most likely tokens besides the chain's first
draft (its argmax, or its draw when sampling) are verified beside the chain, each as the start
of a branch of `candidate_depth` C drafts (C - 1 more from the heads run on the branch: a token
tree with K first drafts and one token under each after that, K,1,..,1). The verify forward
takes the pending token, the S chain drafts, then the branches, each stored in the trunk cache
past the chain but at the positions of the chain tokens it stands in for, seeing only the
committed prefix and itself (layers.visible_slots; SpecInfer's tree attention). When the
chain's first draft is rejected and a branch starts with the trunk's token, the branch is
accepted as far as the trunk agrees, committed with the token the trunk gives after it, and its
cache entries and features move to the chain's slots. (K - 1) C more rows of one forward,
where separate chains per candidate would take (K - 1) (S + 1) and as many draft calls. Output
stays the trunk's own: greedy, its tokens; sampling, its law (_take_branch).

Prompts wait in a queue; the loop decodes `batch` of them at a time and gives a row whose prompt
has finished the next prompt of the queue (prefilled alone, between two iterations), so no row
idles while a slow one finishes.

The loop knows the model only through the interface `DecodeModel` implements: trunk(tokens,
positions, cache, slots) -> (logits, hidden, cache) (slots: where the new cache entries go),
head(k, hidden_in, tokens, positions, cache) -> (hidden, cache), head_logits(k, hidden) ->
logits over the draft vocabulary (all tokens, or the N most frequent), draft_tokens(params,
index) -> token ids, draft_to_vocab(params, q, V) -> q over all V tokens, argmax(logits),
init_cache(batch, length), prepare(params) -> params as those functions read them; the flags
`chains` (head k reads head k-1's hidden state and its draft) and `attends` (the heads keep a KV
cache), and hidden_dim, hidden_dtype (the heads' hidden states) and max_positions
(`WholeVocabulary` gives the parts a model drafting over every token shares). Shape legend: Q
queued prompts, B rows decoded at once, L cache length, P prompt length, S draft length, D width,
V vocab, N draft vocabulary.

Position bookkeeping: a row holds n committed tokens t_0..t_{n-1}; the trunk cache holds
positions 0..n-2 and t_{n-1} is the pending input of the next verify. Head k at position i reads
h^{k-1}_i and t_{i+k}; a cache entry built from a draft is rewritten once the truth is known,
because each iteration recomputes head k over the window [n-1-S-k, n-2] (S+1 wide for parallel
heads, which read only the trunk), which covers every position committed since it last ran.
Medusa heads keep no cache, so they run on the last position alone.
"""

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax import kernels as kernels_lib
from mtp_jax.config import ModelConfig
from mtp_jax.layers import empty_kv, greedy, write_cache
from mtp_jax.model import (MTPLanguageModel, kernel_layout, narrow_heads, output_matrix, project,
                           tile_trunk, trunk_path)


class WholeVocabulary:
  """The parts of the decoder's model interface for a model that drafts over every token and
  reads its params as given (test stubs build on it)."""
  max_positions = None  # the positions the model can encode (None: no limit)

  def prepare(self, params):
    return params

  def draft_tokens(self, params, index):
    return index

  def draft_to_vocab(self, params, q_xN, vocab: int):
    return q_xN

  def argmax(self, logits_xV):
    """The argmax every token choice of the decoder takes (greedy ones, and the Gumbel draws
    when sampling): layers.greedy."""
    return greedy(logits_xV)


_PREPARED = []  # (params, what prepare() made of them), most recently asked for first
_KEEP = 2  # params objects whose conversions are kept


def _made_from(params) -> dict:
  """What prepare() has made of this params object (compared by identity), kept while it is
  among the _KEEP most recently asked for."""
  for i, (held, made) in enumerate(_PREPARED):
    if held is params:
      _PREPARED.insert(0, _PREPARED.pop(i))
      return made
  _PREPARED.insert(0, (params, {}))
  del _PREPARED[_KEEP:]
  return _PREPARED[0][1]


def _draft(params, ids: tuple, kernel_layout_: bool, dtype: str) -> dict:
  """The draft vocabulary's ids and output rows (N x D, in `dtype`: kernels.narrowed) from the
  output matrix (model.output_matrix)."""
  matrix = kernels_lib.float32_matrix(output_matrix(params['params'], kernel_layout_))
  index = jnp.asarray(ids, jnp.int32)
  rows = jnp.take(matrix, index, axis=0)
  return {'ids': index, 'out': kernels_lib.narrowed(rows, dtype)}


def decode_model(cfg: ModelConfig, use_kernels: bool = True, draft_ids=None,
                 draft_dtype: str = 'float32', use_tiles: bool = True) -> 'DecodeModel':
  """The decoder's view of a model: with the native kernels where they can run (a float32 model
  on one CPU device whose kernels built, mtp_jax.kernels), drafting over `draft_ids` (a reduced
  vocabulary; None: every token) with the heads' matrices in `draft_dtype` (kernels only: XLA
  would widen them at every call; q4_1 where scaled tiles run, int8 where they do not); with
  `use_tiles`, the trunk's matrices that a scaled-tile kernel takes exactly are multiplied there
  (kernels.scaled_usable, model.tile_trunk: on the tile unit, where two bfloat16 halves run too,
  else on the FMAs of AVX-512 or AVX2)."""
  draft = None if draft_ids is None else tuple(sorted(int(t) for t in draft_ids))
  kernels = use_kernels and cfg.dtype == 'float32' and kernels_lib.usable()
  tiles = kernels and kernels_lib.scaled_usable()
  if not kernels:
    draft_dtype = 'float32'
  elif draft_dtype == 'q4_1' and not tiles:
    draft_dtype = 'int8'
  return DecodeModel(cfg, kernels=kernels, draft=draft, draft_dtype=draft_dtype,
                     tiles=tiles and use_tiles)


@dataclasses.dataclass(frozen=True)
class DecodeModel(WholeVocabulary):
  """Adapter from the Flax model to the decoder's small function interface. With `kernels`, the
  decoding steps use the native CPU kernels (mtp_jax.kernels); with `draft`, the heads project
  onto those token ids only (FR-Spec's reduced draft vocabulary), which keeps decoding exact:
  verification still uses the trunk's full distribution. With kernels, `draft_dtype` is the dtype
  the heads' matrices and the draft rows are stored in (drafting only)."""
  cfg: ModelConfig
  kernels: bool = False
  draft: tuple | None = None
  draft_dtype: str = 'float32'  # the heads' matrices and draft output rows (kernels only)
  tiles: bool = False  # the trunk's matrices the tile kernels take exactly, tiled (kernels only)
  # with tiles: the trunk's matrices as kernels.ScaledTiles where they have the form, else in
  # two bfloat16 halves; False: the blocks' in two halves, a tied output matrix still as scaled
  # tiles (model.tile_trunk; for comparisons)
  scaled_trunk: bool = True

  @property
  def max_positions(self) -> int:  # past it every position takes the last RoPE angle
    return self.cfg.max_seq_len

  @property
  def chains(self) -> bool:
    return self.cfg.mtp_chains

  @property
  def attends(self) -> bool:
    return self.cfg.mtp_attends

  @property
  def hidden_dim(self) -> int:
    return self.cfg.d_model

  @property
  def hidden_dtype(self):
    return self.cfg.compute_dtype

  @property
  def _model(self):
    return MTPLanguageModel(dataclasses.replace(self.cfg, kernels=self.kernels))

  def prepare(self, params):
    """The params as this model's functions read them, converted once per params object: with
    kernels every dense matrix one output per row (model.kernel_layout), the heads' in
    draft_dtype, and with tiles the trunk's matrices that the tile kernels take exactly stored for
    them (model.tile_trunk; two halves on the tile unit only); with a draft vocabulary, its ids
    and output rows (N x D) under 'draft'.
    Models share the kernel layouts of the same params (one per tile form, one without; only the
    heads' narrowed copies and the draft rows differ), and all of it is dropped with the params
    object it was made from."""
    made = _made_from(params)
    key = (self.kernels, self.tiles, self.scaled_trunk, self.draft_dtype, self.draft)
    if key not in made:
      out = params
      if self.kernels:
        base = ('scaled' if self.scaled_trunk else 'tiled') if self.tiles else 'layout'
        if base not in made:
          layout = made.get('layout')
          layout = jax.jit(kernel_layout)(params) if layout is None else layout
          # the tiled layouts alone are kept (a model without tiles makes the other again)
          made[base] = (tile_trunk(layout, self.scaled_trunk, kernels_lib.tiles_usable())
                        if self.tiles else layout)
        out = narrow_heads(made[base], self.draft_dtype)
      if self.draft is not None:
        out = {**out, 'draft': _draft(out, self.draft, self.kernels, self.draft_dtype)}
      made[key] = out
    return made[key]

  def tiled_matrices(self, params) -> int:
    """How many of the trunk's matrices this model multiplies tiled: the blocks' and an output
    matrix, as scaled tiles or in two halves (0 without tiles, or when no matrix has either
    form); heads drafting in q4_1 are not counted."""
    if not self.tiles:
      return 0
    return sum(isinstance(leaf, kernels_lib.ScaledTiles) or leaf.dtype == jnp.uint32  # two halves
               for _, leaf in self._trunk_leaves(params))

  def step_bytes(self, params) -> int:
    """What one decoding step reads of the trunk's weights as this model keeps them: its
    matrices (tiled ones as their tiles: two halves, or scaled tiles' integers, scales and
    offsets) and the output matrix, as scaled tiles where the tile kernels read it so, else the
    unembedding, else the embedding it is tied to; an embedding table that is not the output
    matrix is only looked up, a row a token, and not counted."""
    leaves = [(path[1].key, leaf) for path, leaf in self._trunk_leaves(params)]  # by module
    held = {module for module, _ in leaves}
    output = next(m for m in ('output_tiles', 'unembedding', 'embedding') if m in held)
    looked_up = {'output_tiles', 'unembedding', 'embedding'} - {output}
    return sum(array.nbytes for module, leaf in leaves if module not in looked_up
               for array in jax.tree.leaves(leaf))

  def _trunk_leaves(self, params) -> list:
    """(path, leaf) for each of the prepared params' trunk leaves (model.trunk_path: under
    'params'), a scaled matrix one leaf."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(
        self.prepare(params), is_leaf=lambda leaf: isinstance(leaf, kernels_lib.ScaledTiles))
    return [(path, leaf) for path, leaf in leaves if trunk_path(path)]

  def init_cache(self, batch: int, length: int):
    """KV caches of the trunk's layers and of each head; Medusa heads, which do not attend, get
    an empty one."""
    def head():
      blocks = self.cfg.head_blocks if self.attends else 0
      return [empty_kv(self.cfg, batch, length) for _ in range(blocks)]
    return {'trunk': [empty_kv(self.cfg, batch, length) for _ in range(self.cfg.num_layers)],
            'heads': [head() for _ in range(self.cfg.mtp_depth)]}

  def cache_bytes(self, batch: int, length: int) -> int:
    """Bytes of init_cache(batch, length), counted from its shapes without making it."""
    from mtp_jax.costs import tree_bytes
    return tree_bytes(jax.eval_shape(lambda: self.init_cache(batch, length)))

  def trunk(self, params, tokens_BxT, positions_BxT, cache, slots_BxT=None, logits_at_BxN=None):
    """(logits, the trunk's features, caches): logits at every position, or only at the indices
    into T that logits_at gives (a prompt's last position: the projection onto the vocabulary
    is the largest product of a position)."""
    def fn(m, tokens, positions, caches, slots):
      h, caches = m.trunk(tokens, positions, caches, slots)
      return m.logits(take_positions(h, logits_at_BxN), 0), h, caches
    return self._model.apply({'params': params['params']}, tokens_BxT, positions_BxT, cache,
                             slots_BxT, method=fn)

  def head(self, params, k: int, h_in_BxTxD, tokens_BxT, positions_BxT, kv):
    """Depth k's hidden states over a window; logits are asked for separately, at the one
    position that drafts, since the vocabulary projection dominates a small head's cost."""
    return self._model.apply({'params': params['params']}, k, h_in_BxTxD, tokens_BxT,
                             positions_BxT, kv, method=MTPLanguageModel.mtp_step)

  def head_logits(self, params, k: int, h_BxTxD):
    model = self._model
    if self.draft is None:
      return model.apply({'params': params['params']}, h_BxTxD, k, method=MTPLanguageModel.logits)
    scale, _ = model.apply({'params': params['params']}, k, method=MTPLanguageModel.head_weights)
    cfg = dataclasses.replace(model.cfg, tie_embeddings=True)  # N x D, as the embedding is
    return project(h_BxTxD, scale, params['draft']['out'], cfg)

  def draft_tokens(self, params, index):
    return index if self.draft is None else params['draft']['ids'][index]

  def argmax(self, logits_xV):
    """layers.greedy's token, from the kernel (kernels.argmax) with the kernels: XLA's CPU
    backend takes about a nanosecond an entry (experiments/argmax.py: 168 us for a 4-position
    verify over 49152 tokens, 13 us in the kernel)."""
    out = kernels_lib.argmax(logits_xV, self.kernels)
    return greedy(logits_xV) if out is None else out

  def draft_to_vocab(self, params, q_xN, vocab: int):
    """A distribution over the draft vocabulary as one over every token (zero elsewhere)."""
    if self.draft is None:
      return q_xN
    full = jnp.zeros(q_xN.shape[:-1] + (vocab,), q_xN.dtype)
    return full.at[..., params['draft']['ids']].set(q_xN)


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static decoding settings (part of the compiled function's identity)."""
  draft_len: int = 0  # S; 0 is plain autoregressive decoding.
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  stop_ids: tuple[int, ...] = ()  # tokens that end a row (the model's EOS, end of turn, ...)
  capture_topk: int = 0  # K > 0: keep the trunk's top-K log-probabilities at every position
  candidates: int = 1  # K > 1 (S >= 1): first drafts verified, see the module doc
  candidate_depth: int = 1  # C in 1..S: drafts per branch, the alternative and C - 1 after it

  @property
  def branch_depth(self) -> int:
    """The drafts per alternative's branch as results record it: 0 without alternatives."""
    return self.candidate_depth if self.candidates > 1 else 0


@flax.struct.dataclass
class Rows:
  """The B rows being decoded; every leaf has the row axis first, so that a row can be replaced
  by a freshly prefilled one."""
  tokens: jax.Array  # B x L committed tokens, drafts written past them
  n: jax.Array  # B: committed tokens
  prompt_len: jax.Array  # B
  done: jax.Array  # B bool: finished (or idle)
  prompt: jax.Array  # B: the queue index of the row's prompt
  # h^0..h^{S-1} (h^0 alone for heads that do not chain), each B x L x D (h^0: the trunk's
  # features): the inputs heads read
  hidden: list
  cache: dict
  forwards: jax.Array  # B: trunk forwards while the row was active (prefill excluded)
  emitted: jax.Array  # B: tokens committed by loop iterations (prefill excluded)
  accepted: jax.Array  # B x max(S, 1): times draft j was accepted
  top_ids: jax.Array  # B x L x capture_topk: the trunk's most likely next tokens per position
  top_logp: jax.Array  # B x L x capture_topk: their log-probabilities


@flax.struct.dataclass
class State:
  rows: Rows
  key: jax.Array
  iterations: jax.Array  # loop iterations so far
  queue: jax.Array  # Q x P prompts
  queue_len: jax.Array  # Q
  next_prompt: jax.Array  # the queue index the next free row takes
  out_tokens: jax.Array  # Q x max_new_tokens: each prompt's tokens, once its row finished
  out_len: jax.Array  # Q
  out_forwards: jax.Array  # Q
  out_emitted: jax.Array  # Q
  out_accepted: jax.Array  # Q x max(S, 1)


def top_tokens(logits_xN, K: int, taken=None, argmax=greedy):
  """The ids of the K largest logits, largest first, ties to the lower id, leaving out the id
  `taken` (one per row) when given: K argmaxes (`argmax`: the model's, DecodeModel.argmax),
  each with the ids already taken masked. For the few first-draft candidates this is cheaper
  than lax.top_k, which XLA's CPU backend runs as its TopK kernel only when every use of the
  result starts at index 0; split into the chain's draft and its alternatives, it became a full
  sort of the draft vocabulary, 1.3 ms of each iteration."""
  x = logits_xN.astype(jnp.float32)
  ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
  mask = lambda x, id_: jnp.where(ids == id_[..., None], -jnp.inf, x)
  if taken is not None:
    x = mask(x, taken)
  picks = []
  for _ in range(K):
    picks.append(argmax(x))
    x = mask(x, picks[-1])
  return jnp.stack(picks, axis=-1)


def probabilities(logits_xV, s: Settings):
  """The sampling distribution, softmax(logits / T) restricted to the top_k tokens and the top_p
  nucleus (temperature > 0). Drafts and verification both use it. The filters compare the
  logits themselves (their order is logits / T's); the softmax reads them with the largest taken
  off before the division: at a small temperature (1e-10) logits / T reach 1e10, where XLA's
  fused softmax can round the largest past its own max by some units (exp of thousands: inf,
  then NaN); shifted, the largest is exactly 0 at any temperature."""
  logits = logits_xV.astype(jnp.float32)
  kept = jnp.ones(logits.shape, bool)
  V = logits.shape[-1]
  if s.top_k and s.top_k < V:
    # The smallest of the top_k, taken over all of them: a slice of lax.top_k's output that does
    # not start at index 0 makes XLA's CPU backend sort the whole vocabulary instead.
    kept = logits >= jnp.min(jax.lax.top_k(logits, s.top_k)[0], axis=-1, keepdims=True)
  shifted = (logits - jnp.max(logits, axis=-1, keepdims=True)) / s.temperature
  if s.top_p < 1.0:
    keys = _ordered_keys(logits)
    kept &= keys >= _nucleus_cutoff(
        keys, jax.nn.softmax(jnp.where(kept, shifted, -jnp.inf), axis=-1), s.top_p)
  return jax.nn.softmax(jnp.where(kept, shifted, -jnp.inf), axis=-1)


def _ordered_keys(x_xV):
  """float32 values as uint32 keys in the same order (-0.0 taken as 0.0): a negative value's bits
  inverted, a positive value's sign bit set."""
  x_xV = jnp.where(x_xV == 0, jnp.float32(0), x_xV.astype(jnp.float32))
  bits = jax.lax.bitcast_convert_type(x_xV, jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _nucleus_cutoff(keys_xV, probs_xV, top_p: float):
  """The top_p nucleus's smallest key, per row (keys_xV keeps its last axis): the nucleus is the
  smallest prefix of the tokens in descending order whose mass reaches top_p, so a value is in
  it when the tokens above it hold less than top_p, ties included. Found by bisection over the
  32-bit keys (32 masked sums over the vocabulary) rather than by sorting it, which takes XLA's
  CPU backend about 10 ms for 49152 logits."""
  def halve(_, bounds):  # the mass above lo reaches top_p, the mass above hi does not
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    above = jnp.sum(jnp.where(keys_xV > mid, probs_xV, 0.0), axis=-1, keepdims=True)
    short = above < top_p
    return jnp.where(short, lo, mid), jnp.where(short, mid, hi)
  lo = jnp.zeros(keys_xV.shape[:-1] + (1,), jnp.uint32)  # below every float's key
  hi = jnp.max(keys_xV, axis=-1, keepdims=True)  # nothing above the largest
  return jax.lax.fori_loop(0, 32, halve, (lo, hi))[1]


def _sample(key, probs_xV, argmax=greedy):
  """A token drawn from probs: the Gumbel-max draw of jax.random.categorical, with the argmax
  taken by `argmax` (the model's, DecodeModel.argmax)."""
  return argmax(jnp.log(probs_xV) + jax.random.gumbel(key, probs_xV.shape, jnp.float32))


def _pick(key, logits_xV, s: Settings, argmax=greedy):
  """A token from `probabilities`: at temperature 0 the argmax itself, so greedy decoding draws
  no random bits (on CPU, one V-wide draw took longer than the quickstart trunk's forward).
  `argmax`: the model's (DecodeModel.argmax)."""
  if s.temperature == 0:
    return argmax(logits_xV)
  return _sample(key, probabilities(logits_xV, s), argmax)


def _capture(rows: Rows, logits_BxTxV, positions_BxT, s: Settings) -> Rows:
  """Writes the trunk's top-K log-probabilities at these positions (nothing when K = 0). With the
  hidden states the loop keeps anyway, this is a head-training feature cache made by decoding."""
  if not s.capture_topk:
    return rows
  logp, ids = jax.lax.top_k(jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32)), s.capture_topk)
  return rows.replace(top_ids=write_cache(rows.top_ids, ids, positions_BxT),
                      top_logp=write_cache(rows.top_logp, logp, positions_BxT))


def take_positions(x_BxTx_, at_BxN):
  """x at the indices into its T axis that `at` gives (all of x when `at` is None)."""
  return x_BxTx_ if at_BxN is None else jnp.take_along_axis(x_BxTx_, at_BxN[..., None], axis=1)


def _gather(buf_BxL, positions_BxT):
  """Row-wise buf[b, positions[b]] (trailing dims kept), positions clipped into range."""
  rows = jnp.arange(buf_BxL.shape[0])[:, None]
  return buf_BxL[rows, jnp.clip(positions_BxT, 0, buf_BxL.shape[1] - 1)]


def _positions(start_B, width: int):
  return start_B[:, None] + jnp.arange(width)[None, :]


def window_width(model, k: int, S: int) -> int:
  """Positions head k runs over in each iteration (see the module docstring): S + k for
  sequential modules, S + 1 for parallel heads, 1 for heads that keep no cache."""
  if not model.attends:
    return 1
  return S + (k if model.chains else 1)


def _head(model, params, k: int, tokens, hidden, cache_k, start_B, width: int, last_B,
          logits: bool = True):
  """Head k over its window (start, width): returns its output (B x width x D), the window's
  positions, its cache, and with `logits` its logits at position last (B x N, over the draft
  vocabulary; else None)."""
  positions = _positions(start_B, width)
  h_in = _gather(hidden[k - 1] if model.chains else hidden[0], positions)
  h, cache_k = model.head(params, k, h_in, _gather(tokens, positions + k), positions, cache_k)
  if not logits:
    return h, positions, cache_k, None
  at_last = jnp.clip(last_B - start_B, 0, width - 1)
  h_last_Bx1xD = jnp.take_along_axis(h, at_last[:, None, None], axis=1)
  return h, positions, cache_k, model.head_logits(params, k, h_last_Bx1xD)[:, 0]


def _run_heads(model, params, rows: Rows, key, starts, widths, S: int, s: Settings, draft: bool):
  """Runs heads 1..S over their windows (start_B, width). With `draft`, draft k comes from head
  k's output at position n - 2 and is written into the token buffer at n - 1 + k at once, where
  the next sequential module reads it as its input token; returns the rows, the drafts' logits
  (over the draft vocabulary) and the branches (B x candidates - 1 x candidate_depth: the first
  head's most likely tokens besides its draft, each continued by the heads, see _branches)."""
  tokens, hidden, heads_cache = rows.tokens, list(rows.hidden), list(rows.cache['heads'])
  last_B = rows.n - 2
  draft_logits = []
  branches = jnp.zeros((tokens.shape[0], 0, s.candidate_depth), jnp.int32)
  keys = jax.random.split(jax.random.fold_in(key, 1), max(S, 1))
  for k in range(1, S + 1):
    h, positions, heads_cache[k - 1], logits_BxN = _head(
        model, params, k, tokens, hidden, heads_cache[k - 1], starts[k - 1], widths[k - 1],
        last_B, logits=draft)
    if k < S and model.chains:
      hidden[k] = write_cache(hidden[k], h, positions)
    if not draft:
      continue
    draft_logits.append(logits_BxN)
    index = _pick(keys[k - 1], logits_BxN, s, model.argmax)
    if k == 1 and s.candidates > 1:  # the most likely tokens besides the chain's branch off
      others = model.draft_tokens(
          params, top_tokens(logits_BxN, s.candidates - 1, taken=index, argmax=model.argmax))
    token = model.draft_tokens(params, index)
    tokens = write_cache(tokens, token[:, None], (last_B + 1 + k)[:, None])
  if draft and s.candidates > 1:
    branches = _branches(model, params, others, tokens, hidden, heads_cache, last_B,
                         s.candidate_depth)
  rows = rows.replace(tokens=tokens, hidden=hidden, cache=dict(rows.cache, heads=heads_cache))
  return rows, draft_logits, branches


def _branches(model, params, first_BxO, tokens, hidden, heads_cache, last_B, C: int):
  """Each alternative first draft continued greedily by heads 2..C as a chain of its own, from
  the state the chain's heads left: the rows are repeated once per alternative, the alternative
  written at position n in place of the chain's first draft, and head k runs over the positions
  whose inputs the branch changes, n - k..n - 2 (sequential modules: head k at position i reads
  t_{i+k} and h^{k-1}_i; parallel and Medusa heads read no tokens, so only n - 2, their draft),
  attending to the entries the chain's heads wrote for the committed positions before them.
  What the branches write is dropped. Returns their drafts, B x O x C."""
  B, O = first_BxO.shape
  if C == 1:
    return first_BxO[:, :, None]
  rep = lambda tree: jax.tree.map(lambda x: jnp.repeat(x, O, axis=0), tree)
  last = rep(last_B)
  tokens = write_cache(rep(tokens), first_BxO.reshape(-1, 1), (last + 2)[:, None])
  hidden = [rep(h) if (1 <= i < C if model.chains else i == 0) else None
            for i, h in enumerate(hidden)]
  drafts = [first_BxO.reshape(-1)]
  for k in range(2, C + 1):
    width = k - 1 if model.chains and model.attends else 1
    h, positions, _, logits = _head(model, params, k, tokens, hidden, rep(heads_cache[k - 1]),
                                    jnp.maximum(last + 1 - width, 0), width, last)
    if k < C and model.chains:
      hidden[k] = write_cache(hidden[k], h, positions)
    drafts.append(model.draft_tokens(params, model.argmax(logits)))
    tokens = write_cache(tokens, drafts[-1][:, None], (last + 1 + k)[:, None])
  return jnp.stack(drafts, axis=1).reshape(B, O, C)


def _head_windows(model, n_B, S: int):
  """Window start and width of each head this iteration, ending at position n - 2."""
  widths = [window_width(model, k, S) for k in range(1, S + 1)]
  return [jnp.maximum(n_B - 1 - width, 0) for width in widths], widths


def _commit(rows: Rows, new_BxC, count_B, s: Settings):
  """Appends up to count tokens per row (new_BxC), stopping after a stop token and at
  max_new_tokens. Returns the rows and how many tokens each took."""
  C = new_BxC.shape[1]
  idx = jnp.arange(C)[None, :]
  room = s.max_new_tokens - (rows.n - rows.prompt_len)
  count = jnp.minimum(count_B, room)
  stops = jnp.zeros(new_BxC.shape, bool)
  for t in s.stop_ids:
    stops = stops | (new_BxC == t)
  first_stop = jnp.min(jnp.where(stops & (idx < count[:, None]), idx, C), axis=1)
  count = jnp.where(rows.done, 0, jnp.minimum(count, first_stop + 1))
  positions = rows.n[:, None] + idx
  tokens = write_cache(rows.tokens, jnp.where(idx < count[:, None], new_BxC,
                                               _gather(rows.tokens, positions)), positions)
  n = rows.n + count
  done = rows.done | (first_stop < count) | (n - rows.prompt_len >= s.max_new_tokens)
  return rows.replace(tokens=tokens, n=n, done=done), count


def prefill_rows(model, params, prompts_BxP, prompt_len_B, prompt_ids_B, key, s: Settings,
                 cache_len: int):
  """Rows for these prompts (right-padded): one trunk forward over them, the first token, and
  the heads run over the prompt to fill their caches. Also
  returns the trunk's logits at each prompt's last position (B x V)."""
  B, P = prompts_BxP.shape
  S = s.draft_len
  tokens = jnp.zeros((B, cache_len), jnp.int32).at[:, :P].set(prompts_BxP)
  positions = _positions(jnp.zeros((B,), jnp.int32), P)
  cache = model.init_cache(B, cache_len)
  # Logits at every prompt position only to capture them; else at the last one alone.
  last_B1 = (prompt_len_B - 1)[:, None]
  logits, h0, cache['trunk'] = model.trunk(params, prompts_BxP, positions, cache['trunk'],
                                           logits_at_BxN=None if s.capture_topk else last_B1)
  # h^0 is the trunk's features (mtp.feature_layers can make them wider than a head's output).
  hidden = [jnp.zeros((B, cache_len, h0.shape[-1] if k == 0 else model.hidden_dim),
                      model.hidden_dtype) for k in range(max(S, 1) if model.chains else 1)]
  hidden[0] = write_cache(hidden[0], h0, positions)
  last = take_positions(logits, last_B1 if s.capture_topk else None)[:, 0]
  first = _pick(jax.random.fold_in(key, 0), last, s, model.argmax)
  zeros = jnp.zeros((B,), jnp.int32)
  rows = Rows(tokens=tokens, n=prompt_len_B, prompt_len=prompt_len_B, done=zeros.astype(bool),
              prompt=prompt_ids_B, hidden=hidden, cache=cache, forwards=zeros, emitted=zeros,
              accepted=jnp.zeros((B, max(S, 1)), jnp.int32),
              top_ids=jnp.zeros((B, cache_len, s.capture_topk), jnp.int32),
              top_logp=jnp.zeros((B, cache_len, s.capture_topk), jnp.float32))
  rows = _capture(rows, logits, positions, s)
  rows, _ = _commit(rows, first[:, None], jnp.ones((B,), jnp.int32), s)
  if model.attends:
    # Heads see the whole prompt once, filling their caches; entries that used not-yet-known
    # tokens are rewritten by the first iteration's windows. Heads that keep no cache have
    # nothing to fill.
    rows, _, _ = _run_heads(model, params, rows, key, [zeros] * S, [P] * S, S, s, draft=False)
  return rows, last


def prefill(model, params, prompts_QxP, prompt_len_Q, key, s: Settings, cache_len: int,
            batch: int | None = None):
  """The loop's first state: the first `batch` prompts (all by default) prefilled as rows, the
  rest queued; and the trunk's logits at the end of each row's prompt (B x V), which the loop
  does not keep."""
  Q = prompts_QxP.shape[0]
  B = Q if batch is None else min(batch, Q)
  rows, logits = prefill_rows(model, params, prompts_QxP[:B], prompt_len_Q[:B], jnp.arange(B),
                              key, s, cache_len)
  S1 = max(s.draft_len, 1)
  zeros = jnp.zeros((Q,), jnp.int32)
  state = State(rows=rows, key=key, iterations=jnp.zeros((), jnp.int32), queue=prompts_QxP,
                queue_len=prompt_len_Q, next_prompt=jnp.asarray(B, jnp.int32),
                out_tokens=jnp.zeros((Q, s.max_new_tokens), jnp.int32), out_len=zeros,
                out_forwards=zeros, out_emitted=zeros,
                out_accepted=jnp.zeros((Q, S1), jnp.int32))
  return _finish(state, jnp.zeros_like(rows.done), s), logits


def _finish(state: State, was_done_B, s: Settings) -> State:
  """Copies the rows that finished since `was_done` into their prompts' outputs."""
  rows = state.rows
  just = rows.done & ~was_done_B
  target = jnp.where(just, rows.prompt, state.queue.shape[0])  # out of range: dropped
  new = _gather(rows.tokens, _positions(rows.prompt_len, s.max_new_tokens))
  put = lambda buf, value: buf.at[target].set(value, mode='drop')
  return state.replace(
      out_tokens=put(state.out_tokens, new), out_len=put(state.out_len, rows.n - rows.prompt_len),
      out_forwards=put(state.out_forwards, rows.forwards),
      out_emitted=put(state.out_emitted, rows.emitted),
      out_accepted=put(state.out_accepted, rows.accepted))


_REFILL = 0x52454649  # a stream of random bits apart from the iterations' (fold_in(key, i))


def _refill(model, params, state: State, s: Settings, cache_len: int) -> State:
  """Gives the first finished row the next queued prompt, prefilled alone."""
  rows = state.rows
  row = jnp.argmax(rows.done)
  q = state.next_prompt
  key = jax.random.fold_in(jax.random.fold_in(state.key, _REFILL), q)
  fresh, _ = prefill_rows(model, params, jax.lax.dynamic_slice_in_dim(state.queue, q, 1),
                          jax.lax.dynamic_slice_in_dim(state.queue_len, q, 1), q[None], key, s,
                          cache_len)
  rows = jax.tree.map(lambda old, new: jax.lax.dynamic_update_slice_in_dim(old, new, row, 0),
                      rows, fresh)
  state = state.replace(rows=rows, next_prompt=q + 1)
  return _finish(state, jnp.arange(rows.done.shape[0]) != row, s)


def _verify(logits_BxS1xV, drafts_BxS, q_BxSxV, key, s: Settings, argmax=greedy):
  """Speculative sampling over one verify forward (`key` is the iteration's). Returns (accepted
  drafts per row, the token that follows them): the residual sample at the first rejection, or
  the bonus token from the trunk when every draft was accepted."""
  B, S = drafts_BxS.shape
  if s.temperature == 0:
    # The rule below with one-hot p and q: accept while the draft is the trunk's argmax, then
    # take the trunk's argmax. Written directly, it needs no random bits and no V-wide buffers.
    target_BxS1 = argmax(logits_BxS1xV)
    ok_BxS = drafts_BxS == target_BxS1[:, :S]
    n_acc = jnp.sum(jnp.cumprod(ok_BxS.astype(jnp.int32), axis=1), axis=1)
    return n_acc, jnp.take_along_axis(target_BxS1, n_acc[:, None], axis=1)[:, 0]
  p_BxS1xV = probabilities(logits_BxS1xV, s)
  k_accept, k_resid = jax.random.split(jax.random.fold_in(key, 2))
  if S:
    p_draft = jnp.take_along_axis(p_BxS1xV[:, :S], drafts_BxS[..., None], axis=-1)[..., 0]
    q_draft = jnp.take_along_axis(q_BxSxV, drafts_BxS[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(k_accept, (B, S))
    ok_BxS = u * q_draft < p_draft  # u < p/q without dividing by a zero q
    n_acc = jnp.sum(jnp.cumprod(ok_BxS.astype(jnp.int32), axis=1), axis=1)
    q_pad = jnp.concatenate([q_BxSxV, jnp.zeros_like(q_BxSxV[:, :1])], axis=1)
    q_at = jnp.take_along_axis(q_pad, n_acc[:, None, None], axis=1)[:, 0]
  else:
    n_acc = jnp.zeros((B,), jnp.int32)
    q_at = 0.0
  p_at = jnp.take_along_axis(p_BxS1xV, n_acc[:, None, None], axis=1)[:, 0]
  # At the first rejection sample from normalize(max(0, p - q)); after S acceptances q is zero
  # there and this is p itself (the bonus token).
  resid = jnp.maximum(p_at - q_at, 0.0)
  total = jnp.sum(resid, axis=-1, keepdims=True)
  resid = jnp.where(total > 0, resid / jnp.where(total > 0, total, 1.0), p_at)
  return n_acc, _sample(k_resid, resid, argmax)


def _take_branch(n_acc_B, bonus_B, drafts_BxS, branches_BxOxC, logits_BxTxV, h0_BxTxD, cache,
                 n_B, key, s: Settings, argmax=greedy):
  """Verification of the branches (_branches), which the verify forward ran after the chain's
  S + 1 entries: branch j's draft d at T index S + 1 + j C + d (cache slot n - 1 + that index,
  position n + d). The first drafts of the chain and the branches differ, so where the chain's
  first draft was rejected at most one branch starts with the trunk's token there (the bonus).
  That branch is accepted as far as each of its drafts is the trunk's token after the one
  before, the trunk's token after its last accepted draft is the new bonus, and its entries'
  logits, features and trunk cache entries replace the chain's at T indices 1..C (slots n..),
  where its drafts are committed. Returns n_acc, bonus, drafts, logits, features and cache,
  updated.

  The trunk's token is its argmax at temperature 0, else a draw from `probabilities` (`key`).
  Sampling keeps the trunk's law because a branch's drafts are fixed tokens (SpecInfer's naive
  sampling): after the chain's first draft is rejected, the bonus is drawn from the residual
  distribution, and each token after it from the trunk's distribution there, whether or not it
  matches a draft; a match only lets the loop go on from the forward it already ran."""
  B, S = drafts_BxS.shape
  C = branches_BxOxC.shape[2]
  rows_Bx1, d_C = jnp.arange(B)[:, None], jnp.arange(C)
  match_BxO = branches_BxOxC[:, :, 0] == bonus_B[:, None]
  won_B = (n_acc_B == 0) & jnp.any(match_BxO, axis=1)
  j_B = jnp.argmax(match_BxO, axis=1)
  branch_BxC = branches_BxOxC[rows_Bx1[:, 0], j_B]
  # The winning branch's T indices, else the chain's own 1..C (copies that change nothing).
  src_BxC = jnp.where(won_B[:, None], S + 1 + j_B[:, None] * C + d_C, 1 + d_C)
  after_BxC = _pick(jax.random.fold_in(key, 3), logits_BxTxV[rows_Bx1, src_BxC], s, argmax)
  ok_BxC1 = branch_BxC[:, 1:] == after_BxC[:, :-1]
  run_B = 1 + jnp.sum(jnp.cumprod(ok_BxC1.astype(jnp.int32), axis=1), axis=1)
  after_B = jnp.take_along_axis(after_BxC, (run_B - 1)[:, None], axis=1)[:, 0]
  drafts_BxS = drafts_BxS.at[:, :C].set(jnp.where(won_B[:, None], branch_BxC, drafts_BxS[:, :C]))
  move = lambda x: x.at[:, 1:C + 1].set(x[rows_Bx1, src_BxC])
  cache = jax.tree.map(lambda buf: write_cache(buf, _gather(buf, n_B[:, None] - 1 + src_BxC),
                                               n_B[:, None] + d_C), cache)
  return (jnp.where(won_B, run_B, n_acc_B), jnp.where(won_B, after_B, bonus_B), drafts_BxS,
          move(logits_BxTxV), move(h0_BxTxD), cache)


def step(model, params, state: State, s: Settings):
  """One iteration: draft S tokens, verify them in one trunk forward, commit. Returns the new
  state and what happened: 'draft_logits' (B x S x N, the heads' logits over the draft
  vocabulary), 'drafts' (B x S token ids), 'accepted' (B, the drafts committed: a stop token or
  max_new_tokens can cut an accepted block) and 'count' (B, tokens committed)."""
  S = s.draft_len
  rows = state.rows
  key = jax.random.fold_in(state.key, state.iterations + 1)  # unused (and compiled away) at T = 0
  starts, widths = _head_windows(model, rows.n, S)
  rows, draft_logits, branches_BxOxC = _run_heads(model, params, rows, key, starts, widths, S, s,
                                                  draft=True)
  # Verify: the pending token and the S drafts at positions (and cache slots) n-1 .. n-1+S,
  # then the branches, each at positions n.. in slots past the chain (see _take_branch).
  positions = _positions(rows.n - 1, S + 1)
  B, O, C = branches_BxOxC.shape
  inputs = jnp.concatenate([_gather(rows.tokens, positions), branches_BxOxC.reshape(B, O * C)],
                           axis=1)
  at_n = rows.n[:, None] + jnp.tile(jnp.arange(C), O)[None]
  cache = dict(rows.cache)
  logits_BxTxV, h0, cache['trunk'] = model.trunk(
      params, inputs, jnp.concatenate([positions, at_n], axis=1), cache['trunk'],
      jnp.concatenate([positions, rows.n[:, None] + S + jnp.arange(O * C)], axis=1))
  drafts_BxS = inputs[:, 1:S + 1]
  V = logits_BxTxV.shape[-1]
  if S and s.temperature > 0:
    q_BxSxV = model.draft_to_vocab(params, probabilities(jnp.stack(draft_logits, axis=1), s), V)
  else:
    q_BxSxV = None
  n_acc, bonus = _verify(logits_BxTxV[:, :S + 1], drafts_BxS, q_BxSxV, key, s, model.argmax)
  if O:
    n_acc, bonus, drafts_BxS, logits_BxTxV, h0, cache['trunk'] = _take_branch(
        n_acc, bonus, drafts_BxS, branches_BxOxC, logits_BxTxV, h0, cache['trunk'], rows.n,
        key, s, model.argmax)
  logits_BxS1xV, h0 = logits_BxTxV[:, :S + 1], h0[:, :S + 1]
  hidden = list(rows.hidden)
  hidden[0] = write_cache(hidden[0], h0, positions)
  rows = _capture(rows.replace(hidden=hidden, cache=cache), logits_BxS1xV, positions, s)
  new_BxC = jnp.concatenate([drafts_BxS, jnp.zeros((B, 1), jnp.int32)], axis=1)
  new_BxC = jnp.where(jnp.arange(S + 1)[None] == n_acc[:, None], bonus[:, None], new_BxC)
  active = ~rows.done
  rows, count = _commit(rows, new_BxC, n_acc + 1, s)
  # Drafts count as accepted where they were committed: a stop token or max_new_tokens can cut
  # the block. A block so cut ends in a draft, not in a token of the trunk's own, so for its row
  # 1 + the acceptances per forward passes tau by one over the row's forwards.
  kept = jnp.minimum(n_acc, count)
  accepted = rows.accepted + (active[:, None] &
                              (jnp.arange(max(S, 1))[None] < kept[:, None])).astype(jnp.int32)
  rows = rows.replace(forwards=rows.forwards + active.astype(jnp.int32),
                      emitted=rows.emitted + count, accepted=accepted)
  state = _finish(state.replace(rows=rows, iterations=state.iterations + 1), ~active, s)
  info = {'draft_logits': (jnp.stack(draft_logits, axis=1) if S else None),
          'drafts': drafts_BxS, 'accepted': kept, 'count': count}
  return state, info


def decode_loop(model, params, prompts_QxP, prompt_len_Q, key, *, s: Settings, cache_len: int,
                batch: int | None = None):
  state, _ = prefill(model, params, prompts_QxP, prompt_len_Q, key, s, cache_len, batch)
  Q = prompts_QxP.shape[0]

  def body(state):
    if batch is not None and batch < Q:  # every finished row takes a prompt before the step
      state = jax.lax.while_loop(lambda st: jnp.any(st.rows.done) & (st.next_prompt < Q),
                                 lambda st: _refill(model, params, st, s, cache_len), state)
    return step(model, params, state, s)[0]
  return jax.lax.while_loop(
      lambda st: ~jnp.all(st.rows.done) | (st.next_prompt < Q), body, state)


class Decoder:
  """The jitted decoder for one (model, settings, cache length, rows at once). It takes params as
  stored (the model prepares them): decoder(params, prompts_QxP, prompt_len_Q, key) -> State."""

  def __init__(self, model, s: Settings, cache_len: int, batch: int | None):
    if s.candidates < 1 or (s.candidates > 1 and s.draft_len < 1):
      raise ValueError(f'candidates={s.candidates}: alternatives to the first draft need a '
                       f'draft (draft_len >= 1)')
    if not 1 <= s.candidate_depth <= max(s.draft_len, 1):
      raise ValueError(f'candidate_depth={s.candidate_depth}: a branch holds 1..draft_len='
                       f'{s.draft_len} drafts')
    if model.max_positions is not None and cache_len > model.max_positions:
      raise ValueError(f'a cache of {cache_len} positions is past model.max_seq_len='
                       f'{model.max_positions}')
    self.model = model
    self.jitted = jax.jit(functools.partial(decode_loop, model, s=s, cache_len=cache_len,
                                            batch=batch))
    self._executables = {}  # queue shape -> compiled decoder

  def __call__(self, params, prompts_QxP, prompt_len_Q, key):
    return self.jitted(self.model.prepare(params), prompts_QxP, prompt_len_Q, key)

  def compiled(self, params, prompts_QxP, prompt_len_Q, key):
    """Compiles now, ahead of time (once per queue shape and form of the prepared params: the
    same model may decode params whose matrices take other forms, say another file's tensor
    types), and returns call() -> State for these arguments."""
    args = (self.model.prepare(params), prompts_QxP, prompt_len_Q, key)
    leaves, tree = jax.tree.flatten(args[0])
    form = (np.shape(prompts_QxP), tree, tuple((leaf.shape, leaf.dtype) for leaf in leaves))
    if form not in self._executables:
      self._executables[form] = self.jitted.lower(*args).compile()
    return functools.partial(self._executables[form], *args)


@functools.lru_cache(maxsize=64)  # a sweep's settings, not every decoder a long session made
def compiled_decoder(model, s: Settings, cache_len: int, batch: int | None = None) -> Decoder:
  return Decoder(model, s, cache_len, batch)


def verify_width(s: Settings) -> int:
  """Positions one verify forward takes: the pending token, the S chain drafts and the
  branches."""
  return 1 + s.draft_len + (s.candidates - 1) * s.candidate_depth


def cache_length(prompt_len: int, s: Settings) -> int:
  """Room for the prompt, the new tokens and one verify block past the end."""
  return prompt_len + s.max_new_tokens + verify_width(s)


def pad_prompts(prompts: list[list[int]], width: int = 0):
  """Right-padded prompts (to the longest, or to `width`, so that calls share one compilation)
  and their lengths."""
  P = max(width, max(len(p) for p in prompts))
  arr = np.zeros((len(prompts), P), np.int32)
  for i, p in enumerate(prompts):
    arr[i, :len(p)] = p
  return arr, np.array([len(p) for p in prompts], np.int32)


def outputs(state: State) -> list[list[int]]:
  """The generated tokens of each prompt (up to and including its stop token), in queue order."""
  tokens, n = np.asarray(state.out_tokens), np.asarray(state.out_len)
  return [tokens[q, :n[q]].tolist() for q in range(tokens.shape[0])]


def rates(emitted: int, forwards: int, accepted) -> dict:
  """tau (tokens per trunk forward) and the acceptance rate at each draft position, from
  counts, so runs can be pooled by adding their counts first. With no forward (every row done
  by its prefill's token) there is no tau and no acceptance: NaN, not 0."""
  accepted = np.asarray(accepted, np.float64)
  return {'tau': emitted / forwards if forwards else float('nan'),
          'acceptance_per_position': (accepted / forwards if forwards
                                      else np.full_like(accepted, np.nan)).tolist()}


def pooled_rates(states: list, s: Settings) -> dict:
  """`rates` over several finished runs' counts together."""
  counts = [stats(state, s) for state in states]
  return rates(sum(c['emitted'] for c in counts), sum(c['forwards'] for c in counts),
               np.sum([c['accepted'] for c in counts], axis=0))


def stats(state: State, s: Settings) -> dict:
  """A finished run's counts, and the rates they give."""
  forwards = int(np.sum(np.asarray(state.out_forwards)))
  emitted = int(np.sum(np.asarray(state.out_emitted)))
  accepted = np.asarray(state.out_accepted).sum(axis=0)[:s.draft_len]
  return {'iterations': int(state.iterations), 'forwards': forwards, 'emitted': emitted,
          'accepted': accepted.tolist(), 'tokens_per_row': np.asarray(state.out_len).tolist(),
          **rates(emitted, forwards, accepted)}
