"""Where a decoding iteration's time goes: the `ar` and `mtp` loops per iteration, and the model
calls inside them timed one by one, so the speedup `bench` reports can be traced to its parts.

Run: python experiments/decode_profile.py --config configs/quickstart.py --workdir runs/quickstart
     python experiments/decode_profile.py --config configs/quickstart.py --random \
       --config.model.num_layers=8   (random weights: costs only, for any shape)
Prints, per batch size in --batches:
  1. per loop iteration (the decoder itself on the first B validation prompts of
     decode.prompt_len tokens, or random ones, and decode.max_new_tokens new tokens, greedy;
     (run - prefill) / iterations, fastest of --rounds interleaved rounds): `ar`, and `mtp` for
     S = 1..D, with the iteration-cost ratio r = t(mtp S) / t(ar), the run's tau (tokens per
     trunk forward, pooled over its rows; at batch 1 one prompt's, where bench pools 8) and
     tau / r, the speedup of the loop alone (bench's also counts the prefill). The bench
     target speedup >= 0.85 tau thus needs r <= 1 / 0.85 = 1.18;
  2. the model calls of one iteration, each alone in a jitted loop of --calls calls: the trunk
     over 1 position (the `ar` step), the trunk over S + 1 positions (the verify), and head k over
     its window of S + k positions plus its one-position vocabulary projection (draft k), each
     with its greedy argmax; the rest of an iteration (cache and token bookkeeping, acceptance) is
     the loop's time minus these.
Takes 1-2 minutes for the quickstart on 2 CPU cores. Config overrides work as in launch.py.
"""

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/quickstart.py',
                                          'Path to a config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', '', 'Run directory holding the checkpoint to profile.')
_RANDOM = flags.DEFINE_bool('random', False, 'Random weights and random prompts instead of a '
                            'checkpoint (per-iteration costs do not depend on the weights).')
_BATCHES = flags.DEFINE_list('batches', ['1', '8'], 'Batch sizes.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved timing rounds; the fastest is kept.')
_CALLS = flags.DEFINE_integer('calls', 100, 'Model calls per component timing loop.')


def loop_costs(cfg, params, prompts, S_max, max_new, rounds):
  """Seconds per iteration of the decoder for S = 0..S_max, the iteration counts and tau."""
  import jax
  from mtp_jax import decode as dec
  from mtp_jax import inference
  model = dec.DecodeModel(cfg)
  prompts_BxP, lens = dec.pad_prompts(prompts)
  per_S = [dec.Settings(draft_len=S, max_new_tokens=max_new) for S in range(S_max + 1)]
  runs = [inference.prepared_decoder(cfg, params, prompts, s) for s in per_S]
  prefills = [functools.partial(
      jax.jit(functools.partial(dec.prefill, model, s=s,
                                cache_len=dec.cache_length(prompts_BxP.shape[1], s))),
      params, prompts_BxP, lens, jax.random.key(0)) for s in per_S]
  times, states = inference.fastest(runs + prefills, rounds)
  iterations = [int(state.iterations) for state in states[:S_max + 1]]
  taus = [dec.stats(state, s)['tau'] for state, s in zip(states, per_S)]
  per_iter = [(times[S] - times[S_max + 1 + S]) / iterations[S] for S in range(S_max + 1)]
  return per_iter, iterations, taus


def component_costs(model, params, B, S, cache_len, calls, rounds):
  """Seconds per call of the trunk over 1 and S + 1 positions and of each draft k = 1..S, each
  call fed the previous call's argmax so that nothing is hoisted out of the timing loop."""
  import jax
  import jax.numpy as jnp
  from mtp_jax import decode as dec
  from mtp_jax import inference
  span = cache_len - 2 * S - 2

  def loop(body):
    """`calls` calls of body(params, i, carry) in one jitted fori_loop; params are an argument,
    as in the decoder, so XLA cannot fold weight-only work into constants."""
    fn = jax.jit(lambda p, c: jax.lax.fori_loop(0, calls, functools.partial(body, p), c))
    return functools.partial(fn, params)

  def trunk(T):
    def body(params, i, carry):
      cache, tokens = carry
      positions = jnp.broadcast_to(i % span + jnp.arange(T), (B, T))
      logits, _, cache = model.trunk(params, tokens, positions, cache)
      return cache, dec.greedy(logits)
    init = (model.init_cache(B, cache_len)['trunk'], jnp.zeros((B, T), jnp.int32))
    return loop(body), init

  def draft(k):
    W = dec.window_width(model, k, S)

    def body(params, i, carry):
      kv, tokens, h_in = carry
      positions = jnp.broadcast_to(i % span + jnp.arange(W), (B, W))
      h, kv = model.head(params, k, h_in, tokens, positions, kv)
      token = dec.greedy(model.head_logits(params, k, h[:, -1:]))
      return kv, jnp.roll(tokens, -1, axis=1).at[:, -1:].set(token), h
    init = (model.init_cache(B, cache_len)['heads'][k - 1], jnp.zeros((B, W), jnp.int32),
            jnp.zeros((B, W, model.hidden_dim), model.hidden_dtype))
    return loop(body), init

  parts = [('trunk, 1 position (ar step)', *trunk(1)),
           (f'trunk, {S + 1} positions (verify)', *trunk(S + 1))]
  parts += [(f'draft {k}: head {k} over {dec.window_width(model, k, S)} positions + '
             f'projection', *draft(k)) for k in range(1, S + 1)]
  times, _ = inference.fastest([functools.partial(fn, init) for _, fn, init in parts], rounds)
  return [(name, t / calls) for (name, _, _), t in zip(parts, times)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  if not _RANDOM.value and not _WORKDIR.value:
    raise app.UsageError('give --workdir (a trained run) or --random')
  import jax
  import numpy as np
  from mtp_jax import decode as dec
  from mtp_jax import inference
  from mtp_jax import sharding
  from mtp_jax import train as train_lib
  from mtp_jax.config import ModelConfig, validate
  d = config.decode
  batches = [int(b) for b in _BATCHES.value]
  if _RANDOM.value:
    validate(config)
    cfg = ModelConfig.from_config(config)
    from mtp_jax.model import init_params
    params = init_params(cfg, jax.random.key(config.seed))
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (max(batches), d.prompt_len)).tolist()
    source, mesh = 'random weights', sharding.make_mesh(config.mesh)
  else:
    session = train_lib.Session(config, _WORKDIR.value)
    cfg = session.cfg
    step, params = inference.load_params(session)
    prompts = inference.validation_prompts(session, max(batches), d.prompt_len)
    source, mesh = f'{_WORKDIR.value} step {step}', session.mesh
  D = cfg.mtp_depth
  if D < 1:
    raise app.UsageError('the model has no MTP heads (mtp.depth=0)')
  model = dec.DecodeModel(cfg)
  print(f'machine: {inference.machine()}')
  print(f'model: {cfg.num_layers} layers, width {cfg.d_model}, vocab {cfg.vocab_size}, '
        f'D = {D} {cfg.mtp_kind} ({source}); prompts of {d.prompt_len} tokens, '
        f'{d.max_new_tokens} new, greedy')
  cache_len = dec.cache_length(d.prompt_len, dec.Settings(draft_len=D,
                                                          max_new_tokens=d.max_new_tokens))
  for B in batches:
    with sharding.active(mesh):  # on the config's mesh, as launch.py's decoding modes run
      per_iter, iterations, taus = loop_costs(cfg, params, prompts[:B], D, d.max_new_tokens,
                                              _ROUNDS.value)
      parts = component_costs(model, params, B, D, cache_len, _CALLS.value, _ROUNDS.value)
    print(f'\nbatch {B}: per loop iteration')
    print(f"{'method':6} {'S':>2} {'iterations':>10} {'us/iter':>9} {'r = t/t(ar)':>11} "
          f"{'tau':>5} {'tau / r':>7}")
    for S, t in enumerate(per_iter):
      r = t / per_iter[0] if per_iter[0] > 0 else float('nan')  # nan: too short to time
      print(f"{'ar' if S == 0 else 'mtp':6} {S:>2} {iterations[S]:>10} {t * 1e6:>9.1f} "
            f"{r:>11.2f} {taus[S]:>5.2f} {taus[S] / r:>7.2f}")
    print(f'batch {B}: model calls of one S = {D} iteration, each timed alone')
    for name, t in parts:
      print(f'  {name:48} {t * 1e6:9.1f} us')
    model_us = sum(t for _, t in parts[1:]) * 1e6
    print(f'  {"sum: verify + drafts":48} {model_us:9.1f} us = {model_us / (parts[0][1] * 1e6):.2f}'
          f' ar steps; the loop iteration {per_iter[D] * 1e6:.1f} us, so bookkeeping '
          f'{per_iter[D] * 1e6 - model_us:.1f} us')


if __name__ == '__main__':
  app.run(main)
