"""Autoregressive and self-speculative MTP decoding in one jitted jax.lax.while_loop.

Each iteration drafts S tokens with the MTP heads, verifies them with one trunk forward over
S + 1 positions, and commits the accepted prefix plus one trunk token. Verification is
speculative sampling (Leviathan et al.), which at temperature 0 reduces to "accept while the
draft is the trunk's argmax", so output is exactly the trunk's own. S = 0 is plain
autoregressive decoding through the same loop.

The loop knows the model only through `DecodeModel`: trunk(tokens, positions, cache) ->
(logits, hidden, cache), head(k, hidden_in, tokens, positions, cache) -> (hidden, cache) and
head_logits(k, hidden) -> logits, plus the flags `chains` (head k reads head k-1's hidden state
and its draft) and `attends` (the heads keep a KV cache). Shape legend: B batch, L cache length,
P prompt length, S draft length, D width, V vocab.

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

from mtp_jax.config import ModelConfig
from mtp_jax.layers import empty_kv, write_cache
from mtp_jax.model import MTPLanguageModel


@dataclasses.dataclass(frozen=True)
class DecodeModel:
  """Adapter from the Flax model to the decoder's small function interface."""
  cfg: ModelConfig

  @property
  def depth(self) -> int:
    return self.cfg.mtp_depth

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

  def init_cache(self, batch: int, length: int):
    """KV caches of the trunk's layers and of each head; Medusa heads, which do not attend, get
    an empty one."""
    head = (lambda: empty_kv(self.cfg, batch, length)) if self.attends else dict
    return {'trunk': [empty_kv(self.cfg, batch, length) for _ in range(self.cfg.num_layers)],
            'heads': [head() for _ in range(self.cfg.mtp_depth)]}

  def trunk(self, params, tokens_BxT, positions_BxT, cache):
    model = MTPLanguageModel(self.cfg)

    def fn(m, tokens, positions, caches):
      h, caches = m.trunk(tokens, positions, caches)
      return m.logits(h, 0), h, caches
    return model.apply(params, tokens_BxT, positions_BxT, cache, method=fn)

  def head(self, params, k: int, h_in_BxTxD, tokens_BxT, positions_BxT, kv):
    """Depth k's hidden states over a window; logits are asked for separately, at the one
    position that drafts, since the vocabulary projection dominates a small head's cost."""
    model = MTPLanguageModel(self.cfg)
    return model.apply(params, k, h_in_BxTxD, tokens_BxT, positions_BxT, kv,
                       method=MTPLanguageModel.mtp_step)

  def head_logits(self, params, k: int, h_BxTxD):
    model = MTPLanguageModel(self.cfg)
    return model.apply(params, h_BxTxD, k, method=MTPLanguageModel.logits)


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static decoding settings (part of the compiled function's identity)."""
  draft_len: int = 0  # S; 0 is plain autoregressive decoding.
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: int = -1  # -1: no end-of-sequence token.


@flax.struct.dataclass
class State:
  tokens: jax.Array  # B x L committed tokens, drafts written past them
  n: jax.Array  # B: committed tokens per row
  prompt_len: jax.Array  # B
  done: jax.Array  # B bool
  hidden: list  # h^0..h^{S-1}, each B x L x D: the inputs heads read
  cache: dict
  key: jax.Array
  iterations: jax.Array  # loop iterations so far
  forwards: jax.Array  # B: trunk forwards while the row was active (prefill excluded)
  emitted: jax.Array  # B: tokens committed by loop iterations (prefill excluded)
  accepted: jax.Array  # B x max(S, 1): times draft j was accepted
  draft_logits: jax.Array  # B x max(S, 1) x V: the heads' logits at the prompt's end (prefill)


def greedy(logits_xV):
  """The argmax over the vocabulary (the first index of the maximum, as jnp.argmax; a row with a
  NaN gives a valid but unspecified id), written as a max and then a min over indices, each
  folded over 128-wide lanes first. XLA's CPU backend runs these two plain reductions faster
  than the pair-valued reduction behind jnp.argmax (about 2.5x at 32 rows of V = 2048), and
  decoding takes an argmax for every drafted, verified and sampled token."""
  logits = logits_xV.astype(jnp.float32)
  V = logits.shape[-1]

  def fold(x, reduce):  # V // 128 rows of 128 lanes reduced to one row first, where V allows
    return reduce(x.reshape(*x.shape[:-1], V // 128, 128), axis=-2) if V % 128 == 0 else x
  top = jnp.max(fold(logits, jnp.max), axis=-1, keepdims=True)
  index = jnp.where(logits == top, jnp.arange(V, dtype=jnp.int32), V)
  # V where a NaN maximum matched nothing: clamped to a valid id.
  return jnp.minimum(jnp.min(fold(index, jnp.min), axis=-1), V - 1)


def probabilities(logits_xV, s: Settings):
  """The sampling distribution: one-hot argmax at temperature 0, else softmax(logits / T)
  restricted to the top_k tokens and the top_p nucleus. Drafts and verification both use it."""
  logits = logits_xV.astype(jnp.float32)
  V = logits.shape[-1]
  if s.temperature == 0:
    return jax.nn.one_hot(greedy(logits), V, dtype=jnp.float32)
  logits = logits / s.temperature
  if s.top_k and s.top_k < V:
    kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it
    # is still short of top_p.
    before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    cutoff = jnp.min(jnp.where(before < s.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.nn.softmax(logits, axis=-1)


def _sample(key, probs_xV):
  """A token drawn from probs: the Gumbel-max draw of jax.random.categorical, with the argmax
  taken by `greedy`."""
  return greedy(jnp.log(probs_xV) + jax.random.gumbel(key, probs_xV.shape, jnp.float32))


def _pick(key, logits_xV, s: Settings):
  """A token from `probabilities`: at temperature 0 the argmax itself, so greedy decoding draws
  no random bits (on CPU, one V-wide draw took longer than the quickstart trunk's forward)."""
  if s.temperature == 0:
    return greedy(logits_xV)
  return _sample(key, probabilities(logits_xV, s))


def _gather(buf_BxL, positions_BxT):
  """Row-wise buf[b, positions[b]] (trailing dims kept), positions clipped into range."""
  rows = jnp.arange(buf_BxL.shape[0])[:, None]
  return buf_BxL[rows, jnp.clip(positions_BxT, 0, buf_BxL.shape[1] - 1)]


def _positions(start_B, width: int):
  return start_B[:, None] + jnp.arange(width)[None, :]


def _run_heads(model, params, state: State, last_B, starts, widths, s: Settings):
  """Runs heads 1..S over their windows. Draft k comes from head k's output at position
  `last_B` (= n - 2) and is written into the token buffer at n - 1 + k at once, where the next
  sequential module reads it as its input token."""
  tokens, hidden, heads_cache = state.tokens, list(state.hidden), list(state.cache['heads'])
  draft_logits = []
  keys = jax.random.split(jax.random.fold_in(state.key, 1), max(s.draft_len, 1))
  for k in range(1, s.draft_len + 1):
    positions = _positions(starts[k - 1], widths[k - 1])
    h_in = _gather(hidden[k - 1] if model.chains else hidden[0], positions)
    h, heads_cache[k - 1] = model.head(params, k, h_in, _gather(tokens, positions + k),
                                       positions, heads_cache[k - 1])
    if k < s.draft_len and model.chains:
      hidden[k] = write_cache(hidden[k], h, positions)
    at_last = jnp.clip(last_B - starts[k - 1], 0, widths[k - 1] - 1)
    h_last_Bx1xD = jnp.take_along_axis(h, at_last[:, None, None], axis=1)
    logits_BxV = model.head_logits(params, k, h_last_Bx1xD)[:, 0]
    draft_logits.append(logits_BxV)
    draft = _pick(keys[k - 1], logits_BxV, s)
    tokens = write_cache(tokens, draft[:, None], (last_B + 1 + k)[:, None])
  cache = dict(state.cache, heads=heads_cache)
  return tokens, hidden, cache, draft_logits


def window_width(model, k: int, S: int) -> int:
  """Positions head k runs over in each iteration (see the module docstring): S + k for
  sequential modules, S + 1 for parallel heads, 1 for heads that keep no cache."""
  if not model.attends:
    return 1
  return S + (k if model.chains else 1)


def _head_windows(model, n_B, s: Settings):
  """Window start and width of each head this iteration, ending at position n - 2."""
  widths = [window_width(model, k, s.draft_len) for k in range(1, s.draft_len + 1)]
  return [jnp.maximum(n_B - 1 - width, 0) for width in widths], widths


def _commit(state: State, new_BxC, count_B, s: Settings):
  """Appends up to count tokens per row (new_BxC), stopping at EOS and max_new_tokens."""
  C = new_BxC.shape[1]
  idx = jnp.arange(C)[None, :]
  room = s.max_new_tokens - (state.n - state.prompt_len)
  count = jnp.minimum(count_B, room)
  is_eos = (new_BxC == s.eos_id) & (idx < count[:, None])
  first_eos = jnp.min(jnp.where(is_eos, idx, C), axis=1)
  count = jnp.where(state.done, 0, jnp.minimum(count, first_eos + 1))
  positions = state.n[:, None] + idx
  tokens = write_cache(state.tokens, jnp.where(idx < count[:, None], new_BxC,
                                                _gather(state.tokens, positions)), positions)
  n = state.n + count
  done = state.done | (first_eos < count) | (n - state.prompt_len >= s.max_new_tokens)
  return tokens, n, count, done


def prefill(model, params, prompts_BxP, prompt_len_B, key, s: Settings, cache_len: int) -> State:
  """One trunk forward over the prompts (right-padded), the first token, and the heads' caches."""
  B, P = prompts_BxP.shape
  S = s.draft_len
  tokens = jnp.zeros((B, cache_len), jnp.int32).at[:, :P].set(prompts_BxP)
  positions = _positions(jnp.zeros((B,), jnp.int32), P)
  cache = model.init_cache(B, cache_len)
  logits, h0, cache['trunk'] = model.trunk(params, prompts_BxP, positions, cache['trunk'])
  hidden = [jnp.zeros((B, cache_len, model.hidden_dim), model.hidden_dtype)
            for _ in range(max(S, 1) if model.chains else 1)]
  hidden[0] = write_cache(hidden[0], h0, positions)
  last = jnp.take_along_axis(logits, (prompt_len_B - 1)[:, None, None], axis=1)[:, 0]
  first = _pick(jax.random.fold_in(key, 0), last, s)
  V = logits.shape[-1]
  state = State(tokens=tokens, n=prompt_len_B, prompt_len=prompt_len_B,
                done=jnp.zeros((B,), bool), hidden=hidden, cache=cache, key=key,
                iterations=jnp.zeros((), jnp.int32), forwards=jnp.zeros((B,), jnp.int32),
                emitted=jnp.zeros((B,), jnp.int32),
                accepted=jnp.zeros((B, max(S, 1)), jnp.int32),
                draft_logits=jnp.zeros((B, max(S, 1), V), jnp.float32))
  tokens, n, _, done = _commit(state, first[:, None], jnp.ones((B,), jnp.int32), s)
  state = state.replace(tokens=tokens, n=n, done=done)
  if model.attends:
    # Heads see the whole prompt once, filling their caches; entries that used not-yet-known
    # tokens are rewritten by the first iteration's windows.
    starts, widths = [jnp.zeros((B,), jnp.int32)] * S, [P] * S
  else:
    starts, widths = _head_windows(model, n, s)  # no cache: the drafting position only
  tokens, hidden, cache, draft_logits = _run_heads(model, params, state, n - 2, starts, widths,
                                                   s)
  if S:
    state = state.replace(draft_logits=jnp.stack(draft_logits, axis=1))
  return state.replace(cache=cache, hidden=hidden)


def _verify(logits_BxS1xV, drafts_BxS, draft_logits, key, s: Settings):
  """Speculative sampling over one verify forward (`key` is the iteration's). Returns (accepted
  drafts per row, the token that follows them): the residual sample at the first rejection, or
  the bonus token from the trunk when every draft was accepted."""
  B, S = drafts_BxS.shape
  if s.temperature == 0:
    # The rule below with one-hot p and q: accept while the draft is the trunk's argmax, then
    # take the trunk's argmax. Written directly, it needs no random bits and no V-wide buffers.
    target_BxS1 = greedy(logits_BxS1xV)
    ok_BxS = drafts_BxS == target_BxS1[:, :S]
    n_acc = jnp.sum(jnp.cumprod(ok_BxS.astype(jnp.int32), axis=1), axis=1)
    return n_acc, jnp.take_along_axis(target_BxS1, n_acc[:, None], axis=1)[:, 0]
  p_BxS1xV = probabilities(logits_BxS1xV, s)
  k_accept, k_resid = jax.random.split(jax.random.fold_in(key, 2))
  if S:
    q_BxSxV = probabilities(jnp.stack(draft_logits, axis=1), s)
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
  return n_acc, _sample(k_resid, resid)


def _iteration(model, params, state: State, s: Settings) -> State:
  S = s.draft_len
  key = jax.random.fold_in(state.key, state.iterations + 1)  # unused (and compiled away) at T = 0
  last = state.n - 2
  starts, widths = _head_windows(model, state.n, s)
  tokens, hidden, cache, draft_logits = _run_heads(model, params, state.replace(key=key), last,
                                                   starts, widths, s)
  # Verify: the pending token and the S drafts, at positions n-1 .. n-1+S.
  positions = _positions(state.n - 1, S + 1)
  inputs = _gather(tokens, positions)
  logits_BxS1xV, h0, cache['trunk'] = model.trunk(params, inputs, positions, cache['trunk'])
  hidden[0] = write_cache(hidden[0], h0, positions)
  drafts_BxS = inputs[:, 1:]
  n_acc, bonus = _verify(logits_BxS1xV, drafts_BxS, draft_logits, key, s)
  B = tokens.shape[0]
  new_BxC = jnp.concatenate([drafts_BxS, jnp.zeros((B, 1), jnp.int32)], axis=1)
  new_BxC = jnp.where(jnp.arange(S + 1)[None] == n_acc[:, None], bonus[:, None], new_BxC)
  active = ~state.done
  tokens, n, count, done = _commit(state.replace(tokens=tokens), new_BxC, n_acc + 1, s)
  accepted = state.accepted + (active[:, None] &
                               (jnp.arange(max(S, 1))[None] < n_acc[:, None])).astype(jnp.int32)
  return state.replace(tokens=tokens, n=n, done=done, hidden=hidden, cache=cache,
                       iterations=state.iterations + 1,
                       forwards=state.forwards + active.astype(jnp.int32),
                       emitted=state.emitted + count, accepted=accepted)


def decode_loop(model, params, prompts_BxP, prompt_len_B, key, *, s: Settings, cache_len: int):
  state = prefill(model, params, prompts_BxP, prompt_len_B, key, s, cache_len)
  return jax.lax.while_loop(lambda st: ~jnp.all(st.done),
                            lambda st: _iteration(model, params, st, s), state)


@functools.lru_cache(maxsize=None)
def compiled_decoder(model, s: Settings, cache_len: int):
  """The jitted decoder for one (model, settings, cache length); params are an argument."""
  return jax.jit(functools.partial(decode_loop, model, s=s, cache_len=cache_len))


def cache_length(prompt_len: int, s: Settings) -> int:
  """Room for the prompt, the new tokens and one draft block past the end."""
  return prompt_len + s.max_new_tokens + s.draft_len + 1


def pad_prompts(prompts: list[list[int]]):
  P = max(len(p) for p in prompts)
  arr = np.zeros((len(prompts), P), np.int32)
  for i, p in enumerate(prompts):
    arr[i, :len(p)] = p
  return arr, np.array([len(p) for p in prompts], np.int32)


def outputs(state: State) -> list[list[int]]:
  """The generated tokens of each row (prompt excluded, up to and including EOS)."""
  tokens, n, start = (np.asarray(x) for x in (state.tokens, state.n, state.prompt_len))
  return [tokens[b, start[b]:n[b]].tolist() for b in range(tokens.shape[0])]


def rates(emitted: int, forwards: int, accepted) -> dict:
  """tau (tokens per trunk forward) and the acceptance rate at each draft position, from
  counts, so runs can be pooled by adding their counts first."""
  return {'tau': emitted / max(forwards, 1),
          'acceptance_per_position': (np.asarray(accepted) / max(forwards, 1)).tolist()}


def stats(state: State, s: Settings) -> dict:
  """A finished run's counts, and the rates they give."""
  forwards = int(np.sum(np.asarray(state.forwards)))
  emitted = int(np.sum(np.asarray(state.emitted)))
  accepted = np.asarray(state.accepted).sum(axis=0)[:s.draft_len]
  return {'iterations': int(state.iterations), 'forwards': forwards, 'emitted': emitted,
          'accepted': accepted.tolist(),
          'tokens_per_row': (np.asarray(state.n) - np.asarray(state.prompt_len)).tolist(),
          **rates(emitted, forwards, accepted)}
