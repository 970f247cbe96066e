"""Decoding on a trained checkpoint: the demo, text generation, the ar-vs-mtp benchmark, and the
speculative-decoding check that runs during training's evaluations.
"""

import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from mtp_jax import checkpoint as ckpt_lib
from mtp_jax import data as data_lib
from mtp_jax import decode as dec
from mtp_jax.config import ConfigError, draft_len


def settings(config, *, method=None, draft=None, temperature=None, max_new=None,
             eos_id=-1) -> dec.Settings:
  d = config.decode
  S = draft_len(config) if draft is None else draft
  if method == 'ar':
    S = 0
  return dec.Settings(draft_len=S, max_new_tokens=d.max_new_tokens if max_new is None else max_new,
                      temperature=d.temperature if temperature is None else temperature,
                      top_k=d.top_k, top_p=d.top_p, eos_id=eos_id)


def check_prompts(prompts: list[list[int]], vocab_size: int, s: dec.Settings, max_len: int):
  """One-line errors for prompts the decoder cannot take, before anything compiles."""
  for i, p in enumerate(prompts):
    if not p:
      raise ConfigError(f'prompt {i} is empty')
    bad = [t for t in p if not 0 <= t < vocab_size]
    if bad:
      raise ConfigError(f'prompt {i} has token ids outside the vocabulary 0..{vocab_size - 1}: '
                        f'{bad[:5]}')
  need = dec.cache_length(max(len(p) for p in prompts), s)
  if need > max_len:
    raise ConfigError(
        f'prompt of {max(len(p) for p in prompts)} tokens + decode.max_new_tokens='
        f'{s.max_new_tokens} + {s.draft_len + 1} draft slots needs a cache of {need}, more than '
        f'model.max_seq_len={max_len}')


def prepared_decoder(cfg, params, prompts: list[list[int]], s: dec.Settings, key=0):
  """Checks the prompts against the model config and returns call() -> final state, decoding
  them with the compiled decoder (compiled on the first call for these settings and shapes)."""
  check_prompts(prompts, cfg.vocab_size, s, cfg.max_seq_len)
  prompts_BxP, lens = dec.pad_prompts(prompts)
  fn = dec.compiled_decoder(dec.DecodeModel(cfg), s, dec.cache_length(prompts_BxP.shape[1], s))
  return functools.partial(fn, params, prompts_BxP, lens, jax.random.key(key))


def fastest(calls, rounds: int):
  """Runs each call once (compiling and warming it up), then every call in turn for `rounds`
  rounds, so a slow spell of a shared machine slows all of them alike. Returns (each call's
  fastest seconds, each call's last output)."""
  outputs = [jax.block_until_ready(call()) for call in calls]
  best = [float('inf')] * len(calls)
  for _ in range(rounds):
    for i, call in enumerate(calls):
      start = time.perf_counter()
      outputs[i] = jax.block_until_ready(call())
      best[i] = min(best[i], time.perf_counter() - start)
  return best, outputs


def decode(session, params, prompts: list[list[int]], s: dec.Settings, key=0):
  """Decodes a batch of prompts; returns (final state, seconds excluding compilation)."""
  (seconds,), (state,) = fastest([prepared_decoder(session.cfg, params, prompts, s, key)], 1)
  return state, seconds


def validation_prompts(session, count: int, length: int) -> list[list[int]]:
  """`count` windows of `length` tokens, evenly spaced over the validation split."""
  valid = session.data.valid
  starts = np.linspace(0, len(valid) - length - 1, count).astype(int)
  return [valid[s:s + length].astype(int).tolist() for s in starts]


def load_params(session):
  step, state, _ = session.checkpointer.restore_latest_valid(session.abstract_state)
  if state is None:
    raise ckpt_lib.CheckpointError(f'no checkpoint in {session.workdir}; train first')
  return step, state['params']


def _text(session, ids) -> str:
  return data_lib.decode(session.data.tokenizer, ids)


def _top5(session, logits_V) -> str:
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits_V, jnp.float32)))
  top = np.argsort(-probs)[:5]
  return '  '.join(f'{_text(session, [t])!r} {probs[t]:.2f}' for t in top)


def demo(session, params, prompt: str) -> dict:
  """Each depth's top-5 at the end of the prompt, the step-by-step chain beside the MTP draft,
  and what one verification step accepted."""
  D = session.cfg.mtp_depth
  if D < 1:
    raise ConfigError('demo needs MTP heads, but the checkpoint has mtp.depth=0')
  ids = data_lib.encode(session.data.tokenizer, prompt)
  model = dec.DecodeModel(session.cfg)
  s_mtp = dec.Settings(draft_len=D, max_new_tokens=D + 1)
  check_prompts([ids], session.cfg.vocab_size, s_mtp, session.cfg.max_seq_len)
  prompts_BxP, lens = dec.pad_prompts([ids])
  cache_len = dec.cache_length(len(ids), s_mtp)

  @jax.jit
  def one_step(params, prompts, lens):
    """Prefill (trunk token + D drafts), then exactly one draft-and-verify iteration."""
    first = dec.prefill(model, params, prompts, lens, jax.random.key(0), s_mtp, cache_len)
    return first, dec._iteration(model, params, first, s_mtp)

  trunk_logits = jax.jit(model.trunk)(params, jnp.asarray(prompts_BxP),
                                      jnp.arange(len(ids))[None], model.init_cache(1, cache_len)['trunk'])[0]
  jax.block_until_ready(one_step(params, prompts_BxP, lens))
  t0 = time.perf_counter()
  first, after = jax.block_until_ready(one_step(params, prompts_BxP, lens))
  mtp_time = time.perf_counter() - t0
  ar_state, ar_time = decode(session, params, [ids], dec.Settings(draft_len=0, max_new_tokens=D + 1))
  chain = dec.outputs(ar_state)[0]

  print(f'prompt: {prompt!r} ({len(ids)} tokens)')
  print('top-5 predictions at the end of the prompt:')
  print(f'  step 0 (t+1, trunk):   {_top5(session, trunk_logits[0, -1])}')
  for k in range(1, D + 1):
    print(f'  step {k} (t+{k + 1}, depth {k}): {_top5(session, first.draft_logits[0, k - 1])}')
  print(f'autoregressive chain, {D + 1} trunk forwards ({ar_time * 1e3:.1f} ms):')
  for j in range(1, len(chain) + 1):
    print(f'  prompt + {_text(session, chain[:j])!r}')
  drafts = np.argmax(np.asarray(first.draft_logits[0]), axis=-1).tolist()
  n0, n1 = int(first.n[0]), int(after.n[0])
  emitted = np.asarray(after.tokens[0, n0:n1]).tolist()
  t1 = int(first.tokens[0, n0 - 1])
  print(f'MTP one-shot draft ({mtp_time * 1e3:.1f} ms for prefill + one draft-and-verify step): '
        f'{_text(session, [t1])!r} + drafts {[_text(session, [d]) for d in drafts]}')
  print(f'verification accepted {n1 - n0 - 1} of {D} drafts and emitted '
        f'{_text(session, [t1] + emitted)!r} ({1 + len(emitted)} tokens from 2 trunk forwards)')
  return {'prompt_tokens': len(ids), 'ar_chain': chain, 'drafts': drafts,
          'accepted': n1 - n0 - 1, 'ar_ms': ar_time * 1e3, 'mtp_ms': mtp_time * 1e3}


def read_prompts(prompt: str, prompt_file: str, tokenizer) -> list[list[int]]:
  """--prompt TEXT, or --prompt_file with one prompt a line ('ids: 1 2 3' for raw token ids)."""
  if prompt_file:
    if not os.path.isfile(prompt_file):
      raise ConfigError(f'--prompt_file: no file {prompt_file!r}')
    lines = [l.rstrip('\n') for l in open(prompt_file, encoding='utf-8') if l.strip()]
  else:
    lines = [prompt] if prompt else []
  if not lines:
    raise ConfigError('give a non-empty --prompt or --prompt_file')
  prompts = []
  for line in lines:
    if line.startswith('ids:'):
      try:
        prompts.append([int(t) for t in line[4:].split()])
      except ValueError:
        raise ConfigError(f'--prompt_file: bad token ids line {line!r}') from None
    else:
      prompts.append(data_lib.encode(tokenizer, line))
  return prompts


def generate(session, params, prompts: list[list[int]], config) -> dict:
  s = settings(config, eos_id=session.data.eos_id)
  state, seconds = decode(session, params, prompts, s, key=config.seed)
  out = dec.outputs(state)
  for p, o in zip(prompts, out):
    print(f'--- prompt: {_text(session, p)!r}')
    print(_text(session, p) + _text(session, o))
  result = dec.stats(state, s)
  result['tokens_per_s'] = sum(len(o) for o in out) / seconds
  print(f"--- {config.decode.method} S={s.draft_len}: tau {result['tau']:.2f}, "
        f"acceptance {np.round(result['acceptance_per_position'], 3).tolist()}, "
        f"{result['tokens_per_s']:.1f} tokens/s")
  return result


def machine() -> str:
  dev = jax.devices()[0]
  return (f'{platform.node() or "host"}: {dev.platform} {dev.device_kind} x{jax.device_count()}, '
          f'{os.cpu_count()} CPUs, jax {jax.__version__}')


BENCH_ROUNDS = 5


def bench(session, params, config, step: int) -> dict:
  """ar and mtp (S = 1..D) at batch 1 and 8, greedy and temperature 1, on validation prompts.
  Each call's time is its fastest of BENCH_ROUNDS rounds, every round running all methods in
  turn (a call is milliseconds on a small model)."""
  d, D = config.decode, session.cfg.mtp_depth
  prompts = validation_prompts(session, max(d.bench_prompts, 8), d.prompt_len)
  rows = []
  for temperature in (0.0, 1.0):
    for batch in (1, 8):
      groups = [prompts[i:i + batch] for i in range(0, d.bench_prompts, batch)]
      per_S = [settings(config, draft=S, temperature=temperature, eos_id=session.data.eos_id)
               for S in range(D + 1)]
      # Every (group, method) once per round; each keeps its fastest round.
      calls = [prepared_decoder(session.cfg, params, group, s, key=g)
               for g, group in enumerate(groups) for s in per_S]
      seconds, outputs = fastest(calls, BENCH_ROUNDS)
      best = np.asarray(seconds).reshape(len(groups), len(per_S)).T  # [method, group]
      states = [outputs[i::len(per_S)] for i in range(len(per_S))]
      reference = None
      for S, s in enumerate(per_S):
        outs, emitted, forwards, accepted = [], 0, 0, np.zeros(S)
        for state in states[S]:
          outs += dec.outputs(state)
          st = dec.stats(state, s)
          emitted += st['emitted']
          forwards += st['forwards']
          accepted += st['accepted']
        tokens_per_s = sum(len(o) for o in outs) / best[S].sum()
        if S == 0:
          reference = {'outs': outs, 'tokens_per_s': tokens_per_s}
        pooled = dec.rates(emitted, forwards, accepted)
        rows.append({
            'method': 'ar' if S == 0 else 'mtp', 'draft_len': S, 'batch': batch,
            'temperature': temperature, 'tau': pooled['tau'],
            'acceptance_per_position': np.round(pooled['acceptance_per_position'], 4).tolist(),
            'tokens_per_s': tokens_per_s, 'speedup': tokens_per_s / reference['tokens_per_s'],
            'identical_to_ar': (None if S == 0 or temperature > 0 else outs == reference['outs'])})
        _print_row(rows[-1])
  result = {'machine': machine(), 'checkpoint_step': step, 'rows': rows}
  with open(os.path.join(session.workdir, 'bench.json'), 'w') as f:
    json.dump(result, f, indent=2)
  return result


def _print_row(r: dict):
  if not getattr(_print_row, 'header', False):
    print(f"{'method':6} {'S':>2} {'batch':>5} {'temp':>4} {'tau':>5} {'tokens/s':>9} "
          f"{'speedup':>7} {'identical':>9}  acceptance per position")
    _print_row.header = True
  same = '-' if r['identical_to_ar'] is None else str(r['identical_to_ar'])
  print(f"{r['method']:6} {r['draft_len']:>2} {r['batch']:>5} {r['temperature']:>4.1f} "
        f"{r['tau']:>5.2f} {r['tokens_per_s']:>9.1f} {r['speedup']:>7.2f} {same:>9}  "
        f"{r['acceptance_per_position']}")


def eval_hook(config):
  """The training-time check: greedy speculative decoding on a few validation prompts, logging
  tau, per-position acceptance and one generated sample to TensorBoard; returns tau and the
  acceptances as metrics."""
  d = config.decode
  if d.eval_prompts < 1 or config.mtp.depth < 1:
    return None

  def hook(session, params, step, writer):
    prompts = validation_prompts(session, d.eval_prompts, d.prompt_len)
    s = dec.Settings(draft_len=config.mtp.depth, max_new_tokens=d.max_new_tokens)
    state = prepared_decoder(session.cfg, params, prompts, s)()  # untimed: one decode
    st = dec.stats(state, s)
    metrics = {'decode/tau': float(st['tau']),
               **{f'decode/acceptance_{j}': float(a)
                  for j, a in enumerate(st['acceptance_per_position'], start=1)}}
    if writer is not None:
      for name, value in metrics.items():
        writer.add_scalar(name, value, step)
      sample = _text(session, prompts[0]) + ' ⟶ ' + _text(session, dec.outputs(state)[0])
      writer.add_text('decode/sample', sample, step)
    tqdm.tqdm.write(f"step {step} decode: tau {st['tau']:.2f}, acceptance "
          f"{np.round(st['acceptance_per_position'], 3).tolist()}")
    return metrics
  return hook
