"""Decoding: cache consistency, exactness of speculative decoding, acceptance bookkeeping on a
stub model, the sampling distribution, and EOS / length handling."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import depth_logits, tiny_model
from mtp_jax import decode as dec
from mtp_jax.config import KINDS
from mtp_jax.model import init_params

# Each head kind, and sequential modules reading a second trunk layer (mtp.feature_layers).
MODELS = {kind: {'mtp.kind': kind} for kind in KINDS}
MODELS['sequential+features'] = {'mtp.kind': 'sequential', 'mtp.feature_layers': '0'}


@pytest.mark.parametrize('name', list(MODELS))
def test_cached_chunks_match_full_forward(name):
  """Feeding a window through the caches in uneven chunks gives the full forward's logits."""
  cfg = tiny_model(**MODELS[name], **{'mtp.depth': 2})
  params = init_params(cfg, jax.random.key(0))
  model = dec.DecodeModel(cfg)
  B, T, L = 2, 11, 16
  tokens = jax.random.randint(jax.random.key(1), (B, T + 3), 0, cfg.vocab_size)
  want = depth_logits(params, cfg, tokens)
  cache = model.init_cache(B, L)
  got = [[] for _ in range(3)]
  for lo, hi in [(0, 4), (4, 5), (5, 9), (9, 11)]:
    positions = jnp.broadcast_to(jnp.arange(lo, hi), (B, hi - lo))
    logits, h, cache['trunk'] = model.trunk(params, tokens[:, lo:hi], positions, cache['trunk'])
    got[0].append(logits)
    h0 = h
    for k in (1, 2):
      h_in = h if cfg.mtp_chains else h0
      h, cache['heads'][k - 1] = model.head(params, k, h_in, tokens[:, lo + k:hi + k],
                                            positions, cache['heads'][k - 1])
      got[k].append(model.head_logits(params, k, h))
  for k in range(3):
    np.testing.assert_allclose(np.concatenate(got[k], axis=1), want[k], rtol=2e-5, atol=2e-5)


def test_a_cache_past_the_rope_range_is_refused():
  """Positions past model.max_seq_len would all take the last rotary angle."""
  cfg = tiny_model(**{'mtp.depth': 1})
  s = dec.Settings(draft_len=1, max_new_tokens=8)
  dec.compiled_decoder(dec.DecodeModel(cfg), s, cfg.max_seq_len)
  with pytest.raises(ValueError, match=f'a cache of {cfg.max_seq_len + 1} positions is past '
                                       f'model.max_seq_len={cfg.max_seq_len}'):
    dec.compiled_decoder(dec.DecodeModel(cfg), s, cfg.max_seq_len + 1)


def run(model, params, prompts, settings, key=0):
  prompts_BxP, lens = dec.pad_prompts(prompts)
  fn = dec.compiled_decoder(model, settings, dec.cache_length(prompts_BxP.shape[1], settings))
  return fn(params, prompts_BxP, lens, jax.random.key(key))


@pytest.mark.parametrize('kind', KINDS)
def test_greedy_mtp_equals_ar(kind):
  cfg = tiny_model(**{'mtp.kind': kind, 'mtp.depth': 3})
  params = init_params(cfg, jax.random.key(7))
  model = dec.DecodeModel(cfg)
  rng = np.random.default_rng(0)
  for batch, lengths in [(1, [5]), (4, [1, 9, 2, 13])]:
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]
    ar = dec.outputs(run(model, params, prompts, dec.Settings(draft_len=0, max_new_tokens=17)))
    for S in (1, 3):  # fewer drafts than heads, and all of them
      state = run(model, params, prompts, dec.Settings(draft_len=S, max_new_tokens=17))
      assert dec.outputs(state) == ar, (batch, S)
      # every token past each prompt's first came from a counted iteration
      st = dec.stats(state, dec.Settings(draft_len=S))
      assert st['emitted'] + len(prompts) == sum(len(o) for o in ar)


@dataclasses.dataclass(frozen=True)
class TableHeads(dec.DecodeModel):
  """A real model (trunk, heads, caches) whose head k, reading token t at position i, drafts
  params['table'][i, t]: what `ar` wrote after t at i (the table is made from `ar`'s outputs),
  where params['right'][i, k - 1] says so, and another token elsewhere. So drafts are accepted
  part of the time at every depth, and a slot, window or position that is off by one after a
  partial acceptance turns into a wrong draft or a wrong token. Each hidden state carries i and
  t in two extra entries; the heads compute on the rest."""

  @property
  def hidden_dim(self) -> int:
    return self.cfg.d_model + 2

  def head(self, params, k, h_in, tokens_BxT, positions_BxT, cache):
    h, cache = super().head(params, k, h_in[..., :self.cfg.d_model], tokens_BxT, positions_BxT,
                            cache)
    where = jnp.stack([positions_BxT + k, tokens_BxT], -1).astype(h.dtype)
    return jnp.concatenate([h, where], -1), cache

  def head_logits(self, params, k, h_BxTxD):
    D = self.cfg.d_model
    logits = super().head_logits(params, k, h_BxTxD[..., :D])
    table = params['table']
    i = jnp.clip(h_BxTxD[..., D].astype(jnp.int32), 0, table.shape[0] - 1)
    want = table[i, h_BxTxD[..., D + 1].astype(jnp.int32)]
    draft = jnp.where(params['right'][i, k - 1], want, (want + 1) % logits.shape[-1])
    return logits + 1e4 * jax.nn.one_hot(draft, logits.shape[-1])


@pytest.mark.parametrize('kind', KINDS)
def test_greedy_mtp_equals_ar_when_drafts_are_partly_right(kind):
  """Random-init heads are almost never right; these (TableHeads) are right part of the time at
  every depth, so rows advance by different amounts each iteration, through the queue and with
  alternatives to the first draft, and rows end at a stop token: every output is ar's."""
  cfg = tiny_model(**{'mtp.kind': kind, 'mtp.depth': 3})
  params = init_params(cfg, jax.random.key(7))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (1, 9, 2, 13, 4)]
  model, N, L = dec.DecodeModel(cfg), 20, 64
  ar = dec.outputs(run(model, params, prompts, dec.Settings(max_new_tokens=N)))
  stop = (ar[1][7],)
  ar_stopped = dec.outputs(run(model, params, prompts, dec.Settings(max_new_tokens=N,
                                                                    stop_ids=stop)))
  table = np.zeros((L, cfg.vocab_size), np.int32)
  for seq in (p + o for p, o in zip(prompts, ar)):
    for i in range(len(seq) - 1):
      table[i, seq[i]] = seq[i + 1]
  for S, K, C, batch, right, stop_ids in [(3, 1, 1, None, 0.8, ()), (3, 3, 2, 2, 0.7, ()),
                                          (2, 1, 1, 2, 0.9, stop)]:
    given = dict(params, table=jnp.asarray(table),
                 right=jnp.asarray(rng.random((L, 3)) < right))
    s = dec.Settings(draft_len=S, max_new_tokens=N, candidates=K, candidate_depth=C,
                     stop_ids=stop_ids)
    state = run_queued(TableHeads(cfg), given, prompts, s, batch)
    assert dec.outputs(state) == (ar_stopped if stop_ids else ar), (S, K, C, batch)
    accepted = np.asarray(state.out_accepted).sum(0)
    assert np.all(accepted[:S] > 0), accepted  # every depth was right at times


@pytest.mark.parametrize('kind,candidates,depth,blocks', [(kind, 1, 1, 1) for kind in KINDS]
                         + [('sequential', 24, 1, 1), ('sequential', 24, 2, 1),
                            ('sequential', 1, 1, 2)])
def test_caches_after_decoding_equal_one_fresh_pass(kind, candidates, depth, blocks):
  """After many rejected drafts, every cache entry (and captured top token) at a committed
  position equals what one pass over the final sequence computes: rollback and window rewrites
  leave no stale entry. With alternatives to the first draft (24 of the 96 tokens, so that
  some are accepted), also where one was: its entries (with `depth` 2, its branch's) moved to
  the slots they were committed at. With two blocks per module, each block's cache."""
  cfg = tiny_model(**{'mtp.kind': kind, 'mtp.depth': 2, 'mtp.head_blocks': blocks})
  # With branches of 2, a seed where one branch's second draft is accepted (checked below).
  params = init_params(cfg, jax.random.key(6 if depth > 1 else 3))
  model = dec.DecodeModel(cfg)
  prompts = [[5, 6, 7, 8], [9, 10]]
  s = dec.Settings(draft_len=2, max_new_tokens=12, candidates=candidates,
                   candidate_depth=depth, capture_topk=2)
  result = run(model, params, prompts, s)
  # One more iteration, which commits nothing (every row is done), lets the heads see the last
  # committed tokens: the last real one may have committed up to S + 1 at once.
  rows = jax.jit(lambda st: dec.step(model, model.prepare(params), st, s)[0])(result).rows
  n = np.asarray(rows.n)
  np.testing.assert_array_equal(n, result.rows.n)
  fresh, _ = dec.prefill(model, params, jnp.asarray(np.asarray(rows.tokens)[:, :int(n.max())]),
                         jnp.asarray(n), jax.random.key(0),
                         dataclasses.replace(s, max_new_tokens=1, candidates=1),
                         rows.tokens.shape[1])
  fresh = fresh.rows
  state = rows
  if candidates > 1:  # an alternative was accepted: more first drafts than the chain alone had
    chain = run(model, params, prompts, dataclasses.replace(s, candidates=1))
    assert dec.outputs(chain) == dec.outputs(result)
    assert np.sum(result.out_accepted[:, 0]) > np.sum(chain.out_accepted[:, 0])
  if depth > 1:  # ... and a branch past its first draft: both its entries moved
    alone = run(model, params, prompts, dataclasses.replace(s, candidate_depth=1))
    assert dec.outputs(alone) == dec.outputs(result)
    assert np.sum(result.out_accepted[:, 1]) > np.sum(alone.out_accepted[:, 1])
  for b in range(len(prompts)):
    # The trunk cache and features cover positions 0..n-2; head k's entries are exact up to
    # n-2-k (parallel: n-2), past which they were built from tokens that are not committed yet.
    valid = {'trunk': n[b] - 1}
    np.testing.assert_allclose(state.hidden[0][b, :valid['trunk']],
                               fresh.hidden[0][b, :valid['trunk']], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(state.top_ids[b, :valid['trunk']],
                                  fresh.top_ids[b, :valid['trunk']])
    for layer in range(cfg.num_layers):
      for name in ('k', 'v'):
        np.testing.assert_allclose(state.cache['trunk'][layer][name][b, :valid['trunk']],
                                   fresh.cache['trunk'][layer][name][b, :valid['trunk']],
                                   rtol=2e-5, atol=2e-5)
    assert all(cache == [] for cache in state.cache['heads']) == (not cfg.mtp_attends)
    for k in (1, 2) if cfg.mtp_attends else ():
      upto = n[b] - 1 - (k if cfg.mtp_chains else 1)
      for block in range(cfg.head_blocks):
        for name in ('k', 'v'):
          np.testing.assert_allclose(state.cache['heads'][k - 1][block][name][b, :upto],
                                     fresh.cache['heads'][k - 1][block][name][b, :upto],
                                     rtol=2e-5, atol=2e-5)


def placeholder_cache(batch, length, depth):
  """Caches for stubs, which keep nothing: zeros with the row and position axes real caches have
  (the decoder moves an accepted alternative's entries within every cache leaf)."""
  return {'trunk': jnp.zeros((batch, length)), 'heads': [jnp.zeros((batch, length))] * depth}


@dataclasses.dataclass(frozen=True)
class CountingStub(dec.WholeVocabulary):
  """A model with known outputs: the trunk always predicts t + 1 (mod V). Heads predict
  t_{i+k} + 1 for rows whose `head_error` is 0, and t_{i+k} + 2 (always wrong) otherwise.
  Hidden states carry the token (trunk) or the predicted token (heads) as a float."""
  vocab: int = 32
  depth: int = 3
  chains: bool = True
  attends: bool = True
  hidden_dim: int = 1
  hidden_dtype = jnp.float32
  head_error: tuple = (1, 0)

  def init_cache(self, batch, length):
    return placeholder_cache(batch, length, self.depth)

  def _logits(self, next_BxT):
    return 10.0 * jax.nn.one_hot(next_BxT % self.vocab, self.vocab)

  def trunk(self, params, tokens_BxT, positions_BxT, cache, slots_BxT=None, logits_at_BxN=None):
    return (dec.take_positions(self._logits(tokens_BxT + 1), logits_at_BxN),
            tokens_BxT[..., None].astype(jnp.float32), cache)

  def head(self, params, k, h_in, tokens_BxT, positions_BxT, cache):
    err = jnp.asarray(self.head_error)[:tokens_BxT.shape[0], None]
    return (tokens_BxT + 1 + err)[..., None].astype(jnp.float32), cache

  def head_logits(self, params, k, h_BxTxD):
    return self._logits(h_BxTxD[..., 0].astype(jnp.int32))


# Greedy decoding takes its own path (argmax comparisons, no random bits); temperature 1 with
# top_k = 1 sends the same one-hot p and q through the speculative-sampling rule, which must
# give exactly the same tokens and counts.
ONE_HOT_PATHS = pytest.mark.parametrize('sampled', [False, True], ids=['greedy', 'top_k=1'])


def one_hot_settings(sampled: bool, **fields) -> dec.Settings:
  return dec.Settings(temperature=1.0 if sampled else 0.0, top_k=1 if sampled else 0, **fields)


@ONE_HOT_PATHS
def test_stub_decoder_exact_tokens_and_acceptance(sampled):
  stub = CountingStub()
  s = one_hot_settings(sampled, draft_len=3, max_new_tokens=9)
  state = run(stub, None, [[3, 4], [10]], s)
  assert dec.outputs(state) == [list(range(5, 14)), list(range(11, 20))]
  # Row 1 accepts all 3 drafts plus a bonus token per iteration: 1 (prefill) + 4 + 4 = 9.
  # Row 0 rejects the first draft every time: one token per iteration, 8 iterations.
  assert int(state.iterations) == 8
  np.testing.assert_array_equal(state.out_forwards, [8, 2])
  np.testing.assert_array_equal(state.out_accepted, [[0, 0, 0], [2, 2, 2]])
  np.testing.assert_array_equal(state.out_emitted, [8, 8])
  assert dec.stats(state, s)['tau'] == pytest.approx(16 / 10)


@ONE_HOT_PATHS
def test_stub_decoder_stop_tokens_and_max_length(sampled):
  stub = CountingStub(head_error=(0, 0, 1, 0))
  # Stop token 8 arrives inside an accepted block for row 0 (prompt 5 -> 6 7 8), mid-way for row
  # 1 (prompt 1 -> 2..8); the other stop token, 16, ends row 3 (12 -> 13..16); row 2 meets
  # neither and stops at max_new_tokens.
  s = one_hot_settings(sampled, draft_len=3, max_new_tokens=10, stop_ids=(8, 16))
  prompts = [[5], [1], [20], [12]]
  state = run(stub, None, prompts, s)
  assert dec.outputs(state) == [[6, 7, 8], [2, 3, 4, 5, 6, 7, 8], list(range(21, 31)),
                                [13, 14, 15, 16]]
  ar = run(stub, None, prompts, dataclasses.replace(s, draft_len=0))
  assert dec.outputs(ar) == dec.outputs(state)
  # A first token that is already EOS ends the row without any iteration.
  state = run(stub, None, [[7]], s)
  assert dec.outputs(state) == [[8]] and int(state.iterations) == 0
  # One iteration (as `demo` runs it) reports the drafts its rows committed as accepted: row 0's
  # three drafts 7 8 9 all agree with the trunk, but its stop token 8 commits two.
  prompts_BxP, lens = dec.pad_prompts([[5], [1]])
  first, _ = dec.prefill(stub, None, prompts_BxP, lens, jax.random.key(0), s,
                         dec.cache_length(1, s))
  _, info = dec.step(stub, None, first, s)
  np.testing.assert_array_equal(info['count'], [2, 4])
  np.testing.assert_array_equal(info['accepted'], [2, 3])


@dataclasses.dataclass(frozen=True)
class TableStub(dec.WholeVocabulary):
  """Trunk: p(next | t) = softmax(P[t]); head k: q_k(next | t_{i+k}) = softmax(Q[k-1][t]),
  deliberately different from p, so drafts are often rejected."""
  vocab: int = 4
  depth: int = 2
  chains: bool = True
  attends: bool = True
  hidden_dim: int = 1
  hidden_dtype = jnp.float32

  P = np.log(np.array([[.1, .6, .2, .1], [.5, .1, .1, .3], [.25, .25, .4, .1], [.7, .1, .1, .1]]))
  Q = np.log(np.array([[[.4, .2, .2, .2], [.1, .1, .7, .1], [.3, .3, .3, .1], [.1, .1, .1, .7]],
                       [[.25] * 4, [.6, .2, .1, .1], [.1, .2, .3, .4], [.2, .5, .2, .1]]]))

  def init_cache(self, batch, length):
    return placeholder_cache(batch, length, self.depth)

  def trunk(self, params, tokens_BxT, positions_BxT, cache, slots_BxT=None, logits_at_BxN=None):
    return (dec.take_positions(jnp.asarray(self.P, jnp.float32)[tokens_BxT], logits_at_BxN),
            jnp.zeros(tokens_BxT.shape + (1,)), cache)

  def head(self, params, k, h_in, tokens_BxT, positions_BxT, cache):
    return tokens_BxT[..., None].astype(jnp.float32), cache

  def head_logits(self, params, k, h_BxTxD):
    return jnp.asarray(self.Q[k - 1], jnp.float32)[h_BxTxD[..., 0].astype(jnp.int32)]


def filtered(p, top_k, top_p=1.0, temperature=1.0):
  """p as the decoder's filters leave it: at the temperature, its top_k entries, then the fewest
  largest entries whose sum reaches top_p (with every entry tied with the last of them)."""
  p = p ** (1 / temperature)
  if top_k:
    p = np.where(p >= np.sort(p)[-top_k], p, 0.0)
  p = p / p.sum()
  if top_p < 1:
    ordered = np.sort(p)[::-1]
    p = np.where(p >= ordered[np.cumsum(ordered) - ordered < top_p].min(), p, 0.0)
  return p / p.sum()


def sample_rows(stub, s: dec.Settings, rows: int, batch=None):
  prompts = np.zeros((rows, 1), np.int32)
  fn = dec.compiled_decoder(stub, s, dec.cache_length(1, s), batch)
  return fn(None, prompts, np.ones(rows, np.int32), jax.random.key(42))


@pytest.mark.parametrize('temperature,top_k,top_p,stub,candidates,depth,batch', [
    (1, 0, 1, 'full', 1, 1, None), (1, 3, 1, 'full', 1, 1, None), (1, 0, 1, 'reduced', 1, 1, None),
    (1, 0, 1, 'full', 3, 2, None), (1, 3, 1, 'full', 2, 1, None), (1, 0, 1, 'reduced', 3, 2, None),
    (1, 0, 0.75, 'full', 1, 1, 4), (1, 0, 0.9, 'reduced', 2, 2, 8),
    (0.6, 3, 0.9, 'full', 1, 1, None), (0.6, 0, 1, 'reduced', 2, 2, 1), (1, 0, 1, 'full', 1, 1, 1)])
def test_speculative_sampling_reproduces_trunk_distribution(temperature, top_k, top_p, stub,
                                                            candidates, depth, batch):
  """The joint law of the first generated tokens equals the trunk's own, within a chi-square
  bound that an acceptance rule ignoring q (or skipping the residual) fails; also with heads
  that draft over part of the vocabulary, and with first-draft alternatives and their branches
  verified beside the chain (a branch's later tokens drawn greedily instead fail it), which then
  accept more first drafts than the chain alone; with top_p, below temperature 1 (p and q both
  tempered), and through a queue of the rows taking 1, 4 or 8 at a time (each refilled row
  draws with its own keys; one row at a time, keys shared between draws of different shapes
  would meet in that row). Four tokens: the bonus after both drafts are accepted, and the draw
  after a branch's second token, are among them."""
  stub = TableStub() if stub == 'full' else ReducedTableStub()
  rows, new = 12000, 4
  s = dec.Settings(draft_len=2, max_new_tokens=new, temperature=temperature, top_k=top_k,
                   top_p=top_p, candidates=candidates, candidate_depth=depth)
  state = sample_rows(stub, s, rows, batch)
  if candidates > 1:
    chain = sample_rows(stub, dataclasses.replace(s, candidates=1, candidate_depth=1), rows,
                        batch)
    first = lambda st, s: dec.stats(st, s)['acceptance_per_position'][0]
    assert first(state, s) > first(chain, s) + 0.1, (first(state, s), first(chain, s))
  out = np.asarray(dec.outputs(state))
  assert out.shape == (rows, new)
  P = np.exp(stub.P)
  expected = np.zeros((4,) * new)
  for seq in itertools.product(range(4), repeat=new):
    expected[seq] = np.prod([filtered(P[t], top_k, top_p, temperature)[u]
                             for t, u in zip((0,) + seq, seq)])
  counts = np.zeros((4,) * new)
  np.add.at(counts, tuple(out.T), 1)
  assert counts[expected == 0].sum() == 0
  # chi-square's bound holds where each cell expects about 5 draws or more: the rarer sequences
  # (at temperature 0.6, some expect 0.02) are pooled into one cell
  common = rows * expected >= 5
  rare = (expected > 0) & ~common
  e = np.append(rows * expected[common], rows * expected[rare].sum() if rare.any() else [])
  c = np.append(counts[common], counts[rare].sum() if rare.any() else [])
  chi2 = np.sum((c - e) ** 2 / e)
  dof = len(e) - 1
  # ~5 standard deviations above the chi-square mean.
  assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)
  assert 0 < dec.stats(state, s)['acceptance_per_position'][0] < 1


def test_probabilities_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  p = dec.probabilities(logits, dec.Settings(temperature=1.0))
  np.testing.assert_allclose(p, [[0.5, 0.3, 0.15, 0.05]], rtol=1e-5)
  p = dec.probabilities(logits, dec.Settings(temperature=1.0, top_k=2))
  np.testing.assert_allclose(p, [[0.625, 0.375, 0, 0]], rtol=1e-5)
  p = dec.probabilities(logits, dec.Settings(temperature=1.0, top_p=0.8))
  np.testing.assert_allclose(p, [[0.625, 0.375, 0, 0]], rtol=1e-5)
  p = dec.probabilities(logits, dec.Settings(temperature=1.0, top_p=0.81))
  np.testing.assert_allclose(p, [[0.5, 0.3, 0.15, 0]] / np.float32(0.95), rtol=1e-5)
  # top_k keeps k tokens where logits lie closer together than the largest's rounding: the
  # filters compare the logits themselves, not the shifted values the softmax reads
  close = jnp.array([[20.0, 1e-7, 2e-7, -5.0]])
  p = dec.probabilities(close, dec.Settings(temperature=1.0, top_k=2))
  assert np.count_nonzero(np.asarray(p)) == 2 and float(p[0, 2]) > 0


def test_a_tiny_temperature_samples_what_greedy_decoding_writes():
  """At temperature 1e-10 the distribution is the argmax's one-hot, jitted as the decoder runs
  it, and sampled decoding writes greedy decoding's tokens (logits / T near 1e10 made XLA's fused
  softmax NaN, and every sampled token the last id)."""
  logits = jax.random.normal(jax.random.key(0), (3, 300)) * 5  # a shape XLA fused into NaN
  for T in (1e-10, 1e-30):
    p = jax.jit(lambda l: dec.probabilities(l, dec.Settings(temperature=T)))(logits)
    np.testing.assert_array_equal(p, jax.nn.one_hot(jnp.argmax(logits, -1), 300))
  cfg = tiny_model(**{'mtp.depth': 2})
  params = init_params(cfg, jax.random.key(7))
  prompts = [np.random.default_rng(0).integers(0, cfg.vocab_size, n).tolist() for n in (5, 9)]
  model = dec.DecodeModel(cfg)
  greedy = dec.outputs(run(model, params, prompts, dec.Settings(draft_len=0, max_new_tokens=17)))
  for S in (0, 2):
    sampled = run(model, params, prompts, dec.Settings(draft_len=S, max_new_tokens=17,
                                                       temperature=1e-10))
    assert dec.outputs(sampled) == greedy, S


def test_tau_is_nan_where_no_verify_ran():
  """max_new_tokens=1: every row's one token comes from its prefill, no trunk forward runs in the
  loop, and tokens per forward is undefined (it read 0, as a decoder that emits nothing), and so
  is the acceptance at each position (it read 0, as heads never right)."""
  cfg = tiny_model(**{'mtp.depth': 2})
  params = init_params(cfg, jax.random.key(7))
  s = dec.Settings(draft_len=2, max_new_tokens=1)
  st = dec.stats(run(dec.DecodeModel(cfg), params, [[1, 2, 3]], s), s)
  assert st['forwards'] == 0 and np.isnan(st['tau'])
  assert len(st['acceptance_per_position']) == 2 and np.isnan(st['acceptance_per_position']).all()


def test_top_p_keeps_the_nucleus_a_descending_sort_keeps():
  """The nucleus against a float64 reference that sorts: the smallest prefix of the tokens in
  descending order whose mass reaches top_p, with every token tied to its last value. Flat and
  peaked rows, rows of many ties, -inf entries (a top_k filter's), -0.0 beside 0.0. A row whose
  reference has a prefix mass within float32 rounding of top_p is not compared (few are)."""
  rng = np.random.default_rng(3)
  V, rows = 1000, 48
  logits = rng.standard_normal((rows, V)) * np.repeat([0.1, 1.0, 3.0, 10.0], rows // 4)[:, None]
  logits[::3] = np.round(logits[::3], 1)  # many ties
  logits[1::4, rng.choice(V, 300, replace=False)] = -np.inf
  logits = logits.astype(np.float32)
  compared = 0
  for top_p in (0.1, 0.5, 0.9, 0.99):
    got = np.asarray(dec.probabilities(jnp.asarray(logits), dec.Settings(temperature=1.0,
                                                                         top_p=top_p)))
    for row, p in zip(logits.astype(np.float64), got):
      probs = np.exp(row - row.max())
      probs /= probs.sum()
      order = np.argsort(-row, kind='stable')
      before = np.cumsum(probs[order]) - probs[order]
      if np.any(np.abs(before - top_p) < 1e-5):
        continue
      cutoff = row[order][before < top_p].min()
      kept = row >= cutoff
      np.testing.assert_array_equal(p > 0, kept)
      np.testing.assert_allclose(p[kept], probs[kept] / probs[kept].sum(), rtol=1e-4)
      compared += 1
  assert compared >= 0.9 * 4 * rows, compared
  # 0.0 and -0.0 are one value: at top_p 0.3 the nucleus ends on it and keeps both.
  p = dec.probabilities(jnp.array([[0.0, -0.0, -9.0, -9.0]]), dec.Settings(temperature=1.0,
                                                                            top_p=0.3))
  np.testing.assert_array_equal(np.asarray(p) > 0, [[True, True, False, False]])


def test_greedy_is_argmax_with_first_index_on_ties():
  rng = np.random.default_rng(0)
  for V in (2048, 100):  # lane-folded and plain
    logits = rng.standard_normal((3, 4, V)).astype(np.float32)
    logits[0, 0] = 1.0  # all tied: index 0
    logits[1, 2, [7, V - 3]] = logits[1, 2].max() + 1  # a tie between two maxima
    np.testing.assert_array_equal(dec.greedy(jnp.asarray(logits)), np.argmax(logits, axis=-1))
    logits[2, 1, 5] = np.nan  # a NaN row gives some token id, never one outside the vocabulary
    assert 0 <= int(dec.greedy(jnp.asarray(logits))[2, 1]) < V


def test_top_tokens_are_the_largest_in_order_with_ties_to_the_lower_id():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((3, 2, 300)).astype(np.float32)
  logits[0, 1, [40, 7, 250]] = 9.0  # a three-way tie at the top
  logits[2, 0] = 0.0  # all tied
  expected = np.argsort(-logits, axis=-1, kind='stable')[..., :4]
  for K in (1, 2, 4):
    np.testing.assert_array_equal(dec.top_tokens(jnp.asarray(logits), K), expected[..., :K])


def test_top_k_selections_compile_without_a_vocabulary_sort():
  """XLA's CPU backend sorts the whole vocabulary for lax.top_k, instead of running its TopK
  kernel, when a use of its output starts past index 0: the candidates' split into chain draft
  and alternatives, and the top_k filter's k-th value. The top_p filter sorts nothing either."""
  logits = jnp.zeros((2, 3, 4096))

  def sorts(fn):
    return [line for line in jax.jit(fn).lower(logits).compile().as_text().splitlines()
            if ' sort(' in line]
  assert not sorts(lambda x: (lambda top: (top[..., 0], top[..., 1:]))(dec.top_tokens(x, 3)))
  assert not sorts(lambda x: dec.probabilities(x, dec.Settings(temperature=1.0, top_k=40)))
  assert not sorts(lambda x: dec.probabilities(x, dec.Settings(temperature=1.0, top_p=0.9)))
  assert sorts(lambda x: jax.lax.top_k(x, 40)[0][..., -1:])  # the form the test guards against


def run_queued(model, params, prompts, settings, batch, key=0):
  prompts_QxP, lens = dec.pad_prompts(prompts)
  fn = dec.compiled_decoder(model, settings, dec.cache_length(prompts_QxP.shape[1], settings),
                            batch)
  return fn(params, prompts_QxP, lens, jax.random.key(key))


@dataclasses.dataclass(frozen=True)
class OddTokenStub(CountingStub):
  """CountingStub whose heads go wrong after an odd token, whichever row it is in (rows change
  prompts when queued)."""

  def head(self, params, k, h_in, tokens_BxT, positions_BxT, cache):
    return (tokens_BxT + 1 + tokens_BxT % 2)[..., None].astype(jnp.float32), cache


@ONE_HOT_PATHS
def test_rows_take_the_next_prompt_when_theirs_finishes(sampled):
  """Five prompts through two rows: the outputs and per-prompt counts equal decoding all five at
  once, and the loop runs fewer iterations than one row decoding them in turn."""
  stub = OddTokenStub()
  s = one_hot_settings(sampled, draft_len=3, max_new_tokens=9, stop_ids=(8,))
  prompts = [[3, 4], [10], [5], [20, 21, 22], [1]]
  together = run(stub, None, prompts, s)
  queued = run_queued(stub, None, prompts, s, batch=2)
  assert dec.outputs(queued) == dec.outputs(together)
  assert dec.outputs(queued) == [[5, 6, 7, 8], list(range(11, 20)), [6, 7, 8], list(range(23, 32)),
                                 [2, 3, 4, 5, 6, 7, 8]]
  for name in ('out_len', 'out_emitted'):
    np.testing.assert_array_equal(getattr(queued, name), getattr(together, name))
  one_row = run_queued(stub, None, prompts, s, batch=1)
  assert dec.outputs(one_row) == dec.outputs(together)
  assert int(queued.iterations) < int(one_row.iterations)


def test_every_finished_row_takes_a_prompt_before_the_next_iteration():
  """16 prompts through 8 rows that all finish in the same iteration: each takes the next prompt
  at once, so the loop runs two rows' worth of iterations (one refill an iteration left row j
  idle, verifying nothing, for j iterations)."""
  s = dec.Settings(draft_len=0, max_new_tokens=9)
  state = run_queued(CountingStub(), None, [[i] for i in range(16)], s, batch=8)
  assert dec.outputs(state) == [list(range(i + 1, i + 10)) for i in range(16)]
  assert int(state.iterations) == 2 * 8  # the prefill writes each prompt's first token


@pytest.mark.parametrize('name', list(MODELS))
def test_queued_greedy_mtp_equals_ar_on_a_model(name):
  """Through the queue, and with alternatives to the first draft all at once or queued: the
  tokens are ar's."""
  cfg = tiny_model(**MODELS[name], **{'mtp.depth': 2})
  params = init_params(cfg, jax.random.key(5))
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 9, 4, 7, 2)]
  model = dec.DecodeModel(cfg)
  ar = dec.outputs(run(model, params, prompts, dec.Settings(max_new_tokens=11)))
  for S, K, C, batch in [(2, 1, 1, 2), (1, 3, 1, None), (2, 2, 1, 2), (2, 3, 2, 2)]:
    s = dec.Settings(draft_len=S, max_new_tokens=11, candidates=K, candidate_depth=C)
    assert dec.outputs(run_queued(model, params, prompts, s, batch)) == ar, (S, K, C, batch)


def nearly_tied(**overrides):
  """A model whose embedding holds every token twice, the copies a rounding apart, so greedy
  decoding meets near ties; with its decode model (kernels on)."""
  cfg = tiny_model(**{'mtp.depth': 3, 'model.num_heads': 2, 'model.num_kv_heads': 2,
                      **overrides})
  params = init_params(cfg, jax.random.key(0))
  table = np.asarray(params['params']['embedding']).copy()
  half = cfg.vocab_size // 2
  table[half:] = table[:half]
  table[half:, 0] = np.nextafter(table[half:, 0], np.float32(np.inf))
  params['params']['embedding'] = jnp.asarray(table)
  model = dec.decode_model(cfg)
  assert model.kernels
  return cfg, params, model


def test_draft_trees_keep_ar_where_logits_nearly_tie():
  """With the kernels a branch of a draft tree, in cache slots past the chain, is summed as the
  chain entry it stands in for, and its tokens stay ar's (summed in slot order, one prompt of
  these split from ar at its 28th token)."""
  cfg, params, model = nearly_tied()
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, cfg.vocab_size, 3).tolist() for _ in range(24)]
  ar = dec.outputs(run(model, params, prompts, dec.Settings(max_new_tokens=40)))
  for S, K, C in [(3, 4, 1), (2, 4, 2)]:
    s = dec.Settings(draft_len=S, max_new_tokens=40, candidates=K, candidate_depth=C)
    assert dec.outputs(run_queued(model, params, prompts, s, batch=1)) == ar, (S, K, C)


def test_a_verify_of_many_rows_keeps_ar_where_logits_nearly_tie():
  """40 prompts verified 4 positions at a time are 160 rows of 128 entries for each norm, past the
  4096 where XLA's row reduction changed its order (7 of 8 prompts split from ar then), and past
  the 128 rows where the products once went to XLA's dot; queued 8 at a time, the prompts are
  prefilled in other groups (136 rows, then 17) than all at once (680). With XLA's dot past 128
  rows, 14 of the 40 split from ar in the verify and 11 when queued."""
  cfg, params, model = nearly_tied(**{'model.d_model': 128})
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, cfg.vocab_size, 17).tolist() for _ in range(40)]
  ar = dec.outputs(run(model, params, prompts, dec.Settings(max_new_tokens=24)))
  assert dec.outputs(run(model, params, prompts, dec.Settings(draft_len=3,
                                                               max_new_tokens=24))) == ar
  assert dec.outputs(run_queued(model, params, prompts, dec.Settings(max_new_tokens=24),
                                batch=8)) == ar


def test_a_step_reads_the_output_matrix_once_and_no_embedding_table():
  """step_bytes (bench_peers' fraction of the memory limit): every trunk matrix and norm, and the
  output matrix, which is the embedding when the two are tied; an untied model's embedding is
  only looked up."""
  for tied in (True, False):
    cfg = tiny_model(**{'model.tie_embeddings': tied})
    params = init_params(cfg, jax.random.key(0))
    trunk = {k: v for k, v in params['params'].items() if not k.startswith('mtp')}
    everything = sum(a.nbytes for a in jax.tree.leaves(trunk))
    table = trunk['embedding'].nbytes
    model = dec.decode_model(cfg, use_tiles=False)
    assert model.step_bytes(params) == everything - (0 if tied else table), tied


def test_draft_vocabulary_keeps_greedy_exact():
  """Heads drafting over the 40 lowest ids only: drafts outside it cannot be made, acceptance
  may drop, but the tokens stay the trunk's."""
  cfg = tiny_model(**{'mtp.depth': 2})
  params = init_params(cfg, jax.random.key(6))
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (4, 6)]
  full = dec.DecodeModel(cfg)
  reduced = dec.decode_model(cfg, use_kernels=False, draft_ids=range(40))
  ar = dec.outputs(run(full, params, prompts, dec.Settings(max_new_tokens=15)))
  state = run(reduced, params, prompts, dec.Settings(draft_len=2, max_new_tokens=15))
  assert dec.outputs(state) == ar
  prepared = reduced.prepare(params)
  assert prepared['draft']['out'].shape == (40, cfg.d_model)
  h = jax.random.normal(jax.random.key(0), (2, 1, cfg.d_model))
  np.testing.assert_allclose(reduced.head_logits(prepared, 1, h),
                             full.head_logits(params, 1, h)[..., :40], rtol=1e-5, atol=1e-5)


@dataclasses.dataclass(frozen=True)
class ReducedTableStub(TableStub):
  """TableStub whose heads draft over tokens 0, 2 and 3 only (their q renormalised there)."""
  ids = (0, 2, 3)

  def head_logits(self, params, k, h_BxTxD):
    return super().head_logits(params, k, h_BxTxD)[..., list(self.ids)]

  def draft_tokens(self, params, index):
    return jnp.asarray(self.ids)[index]

  def draft_to_vocab(self, params, q_xN, vocab):
    return jnp.zeros(q_xN.shape[:-1] + (vocab,)).at[..., list(self.ids)].set(q_xN)


@dataclasses.dataclass(frozen=True)
class RunnerUpStub(CountingStub):
  """CountingStub whose heads rank a wrong token (t + 2) first and the trunk's (t + 1) second."""

  def head(self, params, k, h_in, tokens_BxT, positions_BxT, cache):
    return (tokens_BxT + 2)[..., None].astype(jnp.float32), cache

  def head_logits(self, params, k, h_BxTxD):
    t = h_BxTxD[..., 0].astype(jnp.int32)
    return self._logits(t) + 0.5 * self._logits(t - 1)


@ONE_HOT_PATHS
def test_the_runner_up_first_draft_is_accepted_beside_the_chain(sampled):
  """With 2 candidates the first draft's second choice, the trunk's token, is verified beside the
  chain and kept with the trunk's token after it, so each iteration commits 2 tokens."""
  stub = RunnerUpStub(depth=2)
  prompts = [[3, 4], [10]]
  s = one_hot_settings(sampled, draft_len=2, max_new_tokens=9)
  chain = run(stub, None, prompts, s)
  both = run(stub, None, prompts, dataclasses.replace(s, candidates=2))
  assert dec.outputs(both) == dec.outputs(chain) == [list(range(5, 14)), list(range(11, 20))]
  np.testing.assert_array_equal(chain.out_accepted, [[0, 0], [0, 0]])
  np.testing.assert_array_equal(both.out_forwards, [4, 4])  # 1 (prefill) + 4 x 2 = 9 tokens
  np.testing.assert_array_equal(both.out_accepted, [[4, 0], [4, 0]])
  with pytest.raises(ValueError, match='need a draft'):
    run(stub, None, prompts, dataclasses.replace(s, draft_len=0, candidates=2))


@dataclasses.dataclass(frozen=True)
class BranchStub(RunnerUpStub):
  """RunnerUpStub whose later heads draft the trunk's token after theirs: the chain fails at its
  first draft, the branch of the first head's second choice is right all the way. Head 2 reads
  the token before its draft, heads 3.. only the head before them (h_in), so a branch's third
  draft is right only if its second head's state reached its third."""

  def head(self, params, k, h_in, tokens_BxT, positions_BxT, cache):
    if k == 1:
      return (tokens_BxT + 2)[..., None].astype(jnp.float32), cache
    return (tokens_BxT[..., None] + 1.0) if k == 2 else h_in + 1.0, cache


@dataclasses.dataclass(frozen=True)
class FirstDraftForced(dec.DecodeModel):
  """A model whose first head drafts params['forced'][b] for row b, where params hold it."""

  def head_logits(self, params, k, h_BxTxD):
    logits = super().head_logits(params, k, h_BxTxD)
    if k > 1 or 'forced' not in params:
      return logits
    return logits + 1e4 * jax.nn.one_hot(params['forced'][:, None], logits.shape[-1])


def test_a_branch_drafts_what_the_chain_would_after_its_first_token():
  """Mid-decoding, each branch's drafts equal the chain the same sequential heads draft when
  their first draft is the branch's first token: the branch's heads see the same windows,
  hidden states and cache entries as the chain's would."""
  cfg = tiny_model(**{'mtp.depth': 3})
  model = FirstDraftForced(cfg)
  params = model.prepare(init_params(cfg, jax.random.key(4)))
  s = dec.Settings(draft_len=3, max_new_tokens=30, candidates=3, candidate_depth=3)
  prompts, lengths = dec.pad_prompts([[5, 6, 7, 8, 9], [9, 10]])
  state, _ = dec.prefill(model, params, jnp.asarray(prompts), jnp.asarray(lengths),
                         jax.random.key(0), s, dec.cache_length(5, s))
  step = jax.jit(lambda st: dec.step(model, params, st, s)[0])
  heads = jax.jit(lambda p, rows, st: dec._run_heads(
      model, p, rows, jax.random.key(1), *dec._head_windows(model, rows.n, 3), 3, st, True),
      static_argnums=2)
  for _ in range(6):
    state = step(state)
    _, _, branches = heads(params, state.rows, s)
    n = np.asarray(state.rows.n)
    for j in range(2):
      chain, _, _ = heads(dict(params, forced=branches[:, j, 0]), state.rows,
                          dataclasses.replace(s, candidates=1))
      drafts = [np.asarray(chain.tokens)[b, n[b]:n[b] + 3] for b in range(2)]
      np.testing.assert_array_equal(drafts, branches[:, j])


@ONE_HOT_PATHS
def test_a_branch_is_accepted_past_its_first_draft(sampled):
  """With candidate_depth 2 the runner-up first draft is continued by head 2 and both are
  accepted, with the trunk's token after them: 3 tokens per iteration where one-token branches
  commit 2; the tokens stay the trunk's."""
  stub = BranchStub(depth=3)
  prompts = [[3, 4], [10]]
  s = one_hot_settings(sampled, draft_len=3, max_new_tokens=10, candidates=2)
  alone = run(stub, None, prompts, s)
  deep = run(stub, None, prompts, dataclasses.replace(s, candidate_depth=2))
  full = run(stub, None, prompts, dataclasses.replace(s, candidate_depth=3))
  assert dec.outputs(full) == dec.outputs(deep) == dec.outputs(alone) == [
      list(range(5, 15)), list(range(11, 21))]
  np.testing.assert_array_equal(alone.out_forwards, [5, 5])  # 1 (prefill) + 9 in twos
  np.testing.assert_array_equal(alone.out_accepted, [[5, 0, 0]] * 2)
  np.testing.assert_array_equal(deep.out_forwards, [3, 3])  # 1 + 9 in threes
  np.testing.assert_array_equal(deep.out_accepted, [[3, 3, 0]] * 2)
  np.testing.assert_array_equal(full.out_forwards, [3, 3])  # 1 + 4 + 4 + 1
  # the last iteration has room for one token: its later accepted drafts are not committed
  np.testing.assert_array_equal(full.out_accepted, [[3, 2, 2]] * 2)
  with pytest.raises(ValueError, match='candidate_depth=3'):
    run(stub, None, prompts, dataclasses.replace(s, draft_len=2, candidate_depth=3))


@pytest.mark.parametrize('kind', KINDS)
def test_cache_bytes_are_the_caches_a_decoder_makes(kind):
  """DecodeModel.cache_bytes, by which a script refuses rows past memory before it makes them,
  counts the bytes of init_cache's caches: the trunk's layers and the heads' blocks where they
  attend (Medusa heads do not)."""
  cfg = tiny_model(**{'mtp.kind': kind, 'mtp.depth': 2, 'mtp.head_blocks': 2})
  model = dec.decode_model(cfg, use_kernels=False)
  made = sum(leaf.nbytes for leaf in jax.tree.leaves(model.init_cache(3, 17)))
  assert made > 0 and model.cache_bytes(3, 17) == made
