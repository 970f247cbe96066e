"""Where a decoding iteration's time goes: the `ar` and `mtp` loops per iteration, and the model
calls inside them timed one by one, so the speedup `bench` reports can be traced to its parts.

Run: python experiments/decode_profile.py --config configs/smollm2.py --workdir runs/smollm2
     python experiments/decode_profile.py --config configs/quickstart.py --workdir runs/quickstart
     python experiments/decode_profile.py --config configs/quickstart.py --random \\
       --config.model.num_layers=8   (random weights: costs only, for any shape)
Prints, per batch size in --batches:
  1. per loop iteration (the decoder on the first B held-out prompts, decode.max_new_tokens new
     tokens, greedy or at --temperature; (run - prefill) / iterations, fastest of --rounds
     interleaved rounds):
     `ar`, and `mtp` for S = 1..D, with the iteration-cost ratio r = t(mtp S) / t(ar), the run's
     tau (tokens per trunk forward, pooled over its rows), tau / r (a row's speedup) and the
     loop's own speedup, its iterations times their cost against `ar`'s (a batch's loop runs
     until its slowest row is done, so at batch > 1 this can be below tau / r);
  2. the model calls of an iteration, each alone in a jitted loop of --calls calls with the
     decoder's argmax (DecodeModel.argmax), at positions spread over those the decoder writes
     (from the prompt's end):
     the trunk over 1 position (the `ar` step) and over S + 1 positions (the verify of S drafts)
     for S = 1..D (and over each width in --positions: a draft tree's verify, 1 + S + (K - 1) C
     positions), each as a multiple of the `ar` step, and head k over its window plus its
     projection onto the draft vocabulary (draft k), as a share of the `ar` step.
     The rest of an iteration (cache and token bookkeeping, acceptance) is the loop's time minus
     these.
  3. with --breakdown, where a trunk call's time goes: the trunk over 1 and over D + 1 positions,
     each loop of --calls calls traced once with jax.profiler, its operations' times summed by
     kind (the row kernel's weight products, its unembedding, the attention kernel, the argmax
     kernel, the dots XLA runs itself, which are every product when the kernels are off, and
     XLA's other operations: norms, rotary embedding, cache writes; the argmax without the
     kernels), per call,
     and what the D + 1 positions add to each kind. Operations may overlap on the threads, and
     tracing slows them a little: read the kinds against each other, not against part 2.
     Also each loop of part 1 (`ar`, `mtp` at S = 1..D) traced once the same way, counting the
     operations inside the decoder's while loop (not the prefill's), per iteration: where an
     `mtp` iteration's time beyond `ar`'s goes (the drafts' products and projections join the
     weight products; the JSON also has how many operations of each kind ran an iteration), and
     the loop's own time (part 1) minus the traced operations': time no
     operation holds, less what tracing adds to them, so read its change from `ar` to `mtp`.
--json FILE writes every number. Config overrides work as in launch.py (decode.kernels,
decode.draft_vocab, ...).
"""

import collections
import dataclasses
import functools
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mtp_jax import atomic, cli  # noqa: E402
from mtp_jax.config import ConfigError, check_temperature  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/quickstart.py',
                                          'Path to a config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', '', 'Run directory holding the checkpoint to profile '
                               '(a pretrained model needs none).')
_RANDOM = flags.DEFINE_bool('random', False, 'Random weights and random prompts instead of a '
                            'checkpoint (per-iteration costs do not depend on the weights).')
_BATCHES = flags.DEFINE_list('batches', ['1', '8'], 'Batch sizes.')
_ROUNDS = cli.rounds_flag(5)
_CALLS = flags.DEFINE_integer('calls', 100, 'Model calls per component timing loop.', lower_bound=1)
_JSON = flags.DEFINE_string('json', '', 'Write every number to this JSON file.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'Temperature of the loops in part 1 (0: '
                                   'greedy), with the config\'s decode.top_k and decode.top_p; '
                                   'the model calls of part 2 are timed greedy.', lower_bound=0.0)
_POSITIONS = flags.DEFINE_list('positions', [], 'Also time the trunk over these numbers of '
                               'positions in part 2 (a draft tree\'s verify: 1 + S + (K - 1) C).')
_BREAKDOWN = flags.DEFINE_bool('breakdown', False, 'Also trace the trunk over 1 and over D + 1 '
                               'positions, and each loop\'s iteration, and print their time by '
                               'kind of operation.')


def loop_costs(model, params, prompts, S_max, rounds, base, breakdown: bool = False):
  """Seconds per iteration of the decoder for S = 0..S_max, each with `base`'s other settings
  (decode.Settings), the iteration counts and tau; with `breakdown` also each loop's iteration
  by kind of operation ({S: ({kind: ms per iteration}, {kind: operations run per iteration})}:
  traced_kinds over the operations inside the decoder's while loop; None where the trace names
  no operation), else None."""
  import jax
  from mtp_jax import decode as dec
  from mtp_jax import inference
  from mtp_jax import measure
  prompts_BxP, lens = dec.pad_prompts(prompts)
  per_S = [dataclasses.replace(base, draft_len=S) for S in range(S_max + 1)]
  runs = [inference.prepared_decoder(model, params, prompts, s) for s in per_S]
  prepared = model.prepare(params)
  prefills = [functools.partial(
      jax.jit(functools.partial(dec.prefill, model, s=s,
                                cache_len=dec.cache_length(prompts_BxP.shape[1], s))),
      prepared, prompts_BxP, lens, jax.random.key(0)) for s in per_S]
  times, states = measure.fastest(runs + prefills, rounds, warmup=True)
  iterations = [int(state.iterations) for state in states[:S_max + 1]]
  taus = [dec.stats(state, s)['tau'] for state, s in zip(states, per_S)]
  per_iter = [(times[S] - times[S_max + 1 + S]) / max(iterations[S], 1)
              for S in range(S_max + 1)]
  kinds = None
  if breakdown:
    kinds = {}
    for S in range(S_max + 1):
      kinds[S] = traced_kinds(runs[S].func, runs[S].args, max(iterations[S], 1), in_loop=True)
      if kinds[S] is None:
        return per_iter, iterations, taus, None
  return per_iter, iterations, taus, kinds


def call_loop(body, calls: int):
  """`calls` calls of body(params, i, carry) in one jitted fori_loop: fn(params, carry). Params
  are an argument, as in the decoder, so XLA cannot fold weight-only work into constants."""
  import jax
  return jax.jit(lambda p, c: jax.lax.fori_loop(0, calls, functools.partial(body, p), c))


def call_span(prompt_len: int, cache_len: int, S_max: int) -> int:
  """Positions the timed calls' starts spread over: from prompt_len to the last start that leaves
  the widest call room in the cache."""
  return cache_len - prompt_len - 2 * S_max - 2


def trunk_body(model, B: int, T: int, prompt_len: int, span: int, calls: int):
  """body(params, i, carry) of a loop of trunk calls over T positions: call i starts at position
  prompt_len + i * span // calls and is fed the previous call's argmax, so that nothing is
  hoisted out of the loop."""
  import jax.numpy as jnp

  def body(params, i, carry):
    cache, tokens = carry
    positions = jnp.broadcast_to(prompt_len + i * span // calls + jnp.arange(T), (B, T))
    logits, _, cache = model.trunk(params, tokens, positions, cache)
    return cache, model.argmax(logits)
  return body


def trunk_init(model, B: int, T: int, cache_len: int):
  import jax.numpy as jnp
  return model.init_cache(B, cache_len)['trunk'], jnp.zeros((B, T), jnp.int32)


def trunk_loops(model, prepared, B, S_max, prompt_len, cache_len, calls, more=()) -> dict:
  """{T: (compiled loop of `calls` trunk calls over T positions, its arguments)} for T = 1..S_max
  + 1 and each T in `more`, compiled once for both the timings and the breakdown. The calls
  start at positions spread evenly over those decoding writes (call_span), since attention's cost
  grows with the position."""
  span = call_span(prompt_len, cache_len, S_max)
  loops = {}
  for T in sorted(set(range(1, S_max + 2)) | set(more)):
    # The calls start where the chain's do; the cache has room past them for T positions.
    args = (prepared, trunk_init(model, B, T, cache_len + max(T - S_max - 1, 0)))
    fn = call_loop(trunk_body(model, B, T, prompt_len, span, calls), calls)
    loops[T] = fn.lower(*args).compile(), args
  return loops


def component_costs(model, prepared, trunks, B, S_max, prompt_len, cache_len, calls, rounds):
  """Seconds per call of the trunk over T = 1..S_max + 1 positions (the loops of `trunks`) and of
  each draft k = 1..S_max (its window at S = S_max), each call fed the previous call's argmax so
  that nothing is hoisted out of the timing loop, the calls spread as trunk_loops spreads
  them."""
  import jax.numpy as jnp
  from mtp_jax import decode as dec
  from mtp_jax import measure
  span = call_span(prompt_len, cache_len, S_max)

  def draft(k):
    W = dec.window_width(model, k, S_max)

    def body(params, i, carry):
      kv, tokens, h_in = carry
      positions = jnp.broadcast_to(prompt_len + i * span // calls + jnp.arange(W), (B, W))
      h, kv = model.head(params, k, h_in, tokens, positions, kv)
      index = model.argmax(model.head_logits(params, k, h[:, -1:]))
      token = model.draft_tokens(params, index)
      # The output feeds the next call where it has the input's width (not the first module's
      # input, when it reads wider trunk features).
      h = h if h.shape == h_in.shape else h_in
      return kv, jnp.roll(tokens, -1, axis=1).at[:, -1:].set(token), h
    width = model.cfg.feature_dim if k == 1 or not model.chains else model.hidden_dim
    init = (model.init_cache(B, cache_len)['heads'][k - 1], jnp.zeros((B, W), jnp.int32),
            jnp.zeros((B, W, width), model.hidden_dtype))
    return call_loop(body, calls), (prepared, init)

  parts = [(f'trunk over {T} positions', *trunks[T]) for T in sorted(trunks)]
  parts += [(f'draft {k}: head {k} over {dec.window_width(model, k, S_max)} positions + '
             f'projection', *draft(k)) for k in range(1, S_max + 1)]
  times, _ = measure.fastest([functools.partial(fn, *args) for _, fn, args in parts], rounds,
                               warmup=True)
  return {name: t / calls for (name, _, _), t in zip(parts, times)}


KINDS = ('weight products (row kernel)', 'unembedding (row kernel)', 'attention (kernel)',
         'argmax (kernel)', 'XLA dots', 'other XLA ops')


def op_kinds(hlo_text: str) -> dict:
  """Each operation of a compiled module's text (its instruction name, as the profiler names
  it) -> its kind in KINDS; loops and calls, which contain other operations, are left out."""
  kinds = {}
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT\s+)?%?([\w.\-]+) = ', line)
    if not match or match.group(1).startswith(('while', 'conditional', 'call')):
      continue
    if 'custom_call_target="mtpjax_cache_attention"' in line:
      kind = 'attention (kernel)'
    elif 'custom_call_target="mtpjax_argmax"' in line:
      kind = 'argmax (kernel)'
    elif 'custom_call_target="mtpjax_rows_matmul' in line:
      kind = ('unembedding (row kernel)' if 'MTPLanguageModel.logits' in line else
              'weight products (row kernel)')
    elif ' dot(' in line or match.group(1).startswith(('dot', 'ynn_fusion', 'xnn_fusion')):
      kind = 'XLA dots'
    else:
      kind = 'other XLA ops'
    kinds[match.group(1)] = kind
  return kinds


def traced_kinds(compiled, args, calls: int, in_loop: bool = False):
  """Milliseconds per call of each kind of operation, and how many operations of each kind ran
  per call ({kind: ms}, {kind: runs}), from one traced run of `compiled` (a loop of `calls`
  calls, run before: component_costs times it first), with `in_loop` counting only the
  operations inside its while loop (measure.loop_operations); None when the trace names none of
  the module's operations (a backend whose trace names its device kernels instead)."""
  import jax
  from mtp_jax import measure
  text = compiled.as_text()
  kinds = op_kinds(text)
  if in_loop:
    inside = measure.loop_operations(text)
    kinds = {name: kind for name, kind in kinds.items() if name in inside}
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      jax.block_until_ready(compiled(*args))
    events = measure.trace_events(directory)
  totals = collections.Counter({kind: 0.0 for kind in KINDS})
  runs = collections.Counter({kind: 0 for kind in KINDS})
  for event in events:
    if event['name'] in kinds:
      totals[kinds[event['name']]] += event['dur'] / 1e3 / calls  # dur: microseconds
      runs[kinds[event['name']]] += 1
  if not sum(runs.values()):
    return None
  return dict(totals), {kind: n / calls for kind, n in runs.items()}


def trunk_breakdown(trunks, S_max, calls):
  """{T: {kind: ms per call}} for the trunk over T = 1 and T = S_max + 1 positions (the loops of
  trunk_loops), or None when the trace cannot be read by kind (traced_kinds)."""
  out = {}
  for T in (1, S_max + 1):
    traced = traced_kinds(*trunks[T], calls)
    if traced is None:
      return None
    out[T] = traced[0]
  return out


def main(argv):
  cli.start(argv)
  cli.output_file(_JSON.value, '--json')
  config = _CONFIG.value
  try:
    check_temperature(_TEMPERATURE.value, '--temperature', 'greedy')
  except ConfigError as e:
    cli.fail(e)
  more = cli.positive_ints(_POSITIONS.value, '--positions', allow_empty=True)
  batches = cli.positive_ints(_BATCHES.value, '--batches')
  cli.weights_source(_WORKDIR.value, _RANDOM.value)
  if config.mtp.depth < 1:  # before the model is made
    cli.fail('the model has no MTP heads (mtp.depth=0)')
  if more and max(more) >= config.model.max_seq_len:  # with any prompt (checked again below)
    cli.fail(f'--positions {max(more)}: past model.max_seq_len={config.model.max_seq_len}')
  from mtp_jax import decode as dec
  from mtp_jax import inference
  from mtp_jax import measure
  from mtp_jax import run, sharding
  try:
    inputs = inference.decode_inputs(config, _WORKDIR.value, max(batches), _RANDOM.value,
                                     rows=max(batches), rows_flag='--batches')
  except run.USER_ERRORS as e:  # a missing checkpoint too
    cli.fail(e)
  config, cfg, model, prompts, mesh = (
      inputs.config, inputs.cfg, inputs.model, inputs.prompts, inputs.mesh)
  prompt_len = max(len(p) for p in prompts)
  if more and prompt_len + max(more) > cfg.max_seq_len:  # the positions RoPE encodes
    cli.fail(f'--positions {max(more)}: after a prompt of {prompt_len} tokens they pass '
             f'model.max_seq_len={cfg.max_seq_len}')
  d = config.decode
  # No end-of-sequence token, so every row runs its decode.max_new_tokens.
  base = inference.settings(config, draft=0, temperature=_TEMPERATURE.value, stop_ids=())
  D = cfg.mtp_depth
  cli.batch1_checked(cfg, prompts, [dataclasses.replace(base, draft_len=S) for S in range(D + 1)])
  params, source = inputs.params, inputs.source  # made (random weights compiled) after the checks
  vocab = len(model.draft) if model.draft else cfg.vocab_size
  result = {'machine': measure.machine(), 'source': source, 'layers': cfg.num_layers,
            'width': cfg.d_model, 'vocab': cfg.vocab_size, 'draft_vocab': vocab,
            'depth': D, 'kind': cfg.mtp_kind, 'kernels': model.kernels,
            'tiled_matrices': model.tiled_matrices(params),
            'max_new_tokens': d.max_new_tokens, 'temperature': _TEMPERATURE.value, 'batches': []}
  print(f"machine: {result['machine']}")
  print(f'model: {cfg.num_layers} layers, width {cfg.d_model}, vocab {cfg.vocab_size} (drafts '
        f'over {vocab}), D = {D} {cfg.mtp_kind} ({source}); {d.max_new_tokens} new tokens, '
        f"{f'temperature {_TEMPERATURE.value:g}' if _TEMPERATURE.value else 'greedy'} loops, "
        f"kernels {'on' if model.kernels else 'off'}, {result['tiled_matrices']} matrices tiled")
  cache_len = dec.cache_length(prompt_len, dec.Settings(draft_len=D,
                                                        max_new_tokens=d.max_new_tokens))
  with sharding.active(mesh):
    prepared = model.prepare(params)  # once, for every batch's model-call loops
  for B in batches:
    with sharding.active(mesh):  # on the config's mesh, as launch.py's decoding modes run
      per_iter, iterations, taus, traced = loop_costs(model, params, prompts[:B], D,
                                                      _ROUNDS.value, base, _BREAKDOWN.value)
      trunks = trunk_loops(model, prepared, B, D, prompt_len, cache_len, _CALLS.value, more)
      parts = component_costs(model, prepared, trunks, B, D, prompt_len, cache_len, _CALLS.value,
                              _ROUNDS.value)
      breakdown = trunk_breakdown(trunks, D, _CALLS.value) if _BREAKDOWN.value else None
    ar = parts['trunk over 1 positions']
    loops = [{'S': S, 'iterations': iterations[S], 'seconds': t,
              'r': t / per_iter[0] if per_iter[0] > 0 else None, 'tau': taus[S],
              'speedup': (iterations[0] * per_iter[0] / (iterations[S] * t)
                          if iterations[S] * t > 0 and per_iter[0] > 0 else None)}
             for S, t in enumerate(per_iter)]
    calls = [{'name': name, 'seconds': t, 'over_ar': t / ar} for name, t in parts.items()]
    result['batches'].append({'batch': B, 'loops': loops, 'calls': calls})
    if breakdown:
      result['batches'][-1]['breakdown'] = [{'positions': T, 'ms_per_call': kinds}
                                            for T, kinds in breakdown.items()]
    loop_rows = [{'S': S, 'ms_per_iteration': kinds, 'runs_per_iteration': runs,
                  'untraced_ms': per_iter[S] * 1e3 - sum(kinds.values())}
                 for S, (kinds, runs) in (traced or {}).items()]
    if loop_rows:
      result['batches'][-1]['loop_breakdown'] = loop_rows
    print(f'\nbatch {B}: per loop iteration')
    print(f"{'method':6} {'S':>2} {'iterations':>10} {'ms/iter':>9} {'r = t/t(ar)':>11} "
          f"{'tau':>5} {'tau / r':>7} {'speedup':>7}")
    for row in loops:
      nan = float('nan')  # a loop too short to time
      r = row['r'] if row['r'] is not None else nan
      speedup = row['speedup'] if row['speedup'] is not None else nan
      print(f"{'ar' if row['S'] == 0 else 'mtp':6} {row['S']:>2} {row['iterations']:>10} "
            f"{row['seconds'] * 1e3:>9.3f} {r:>11.2f} {row['tau']:>5.2f} {row['tau'] / r:>7.2f} "
            f"{speedup:>7.2f}")
    print(f'batch {B}: model calls, each timed alone (x ar: over the trunk over 1 position)')
    for row in calls:
      print(f"  {row['name']:52} {row['seconds'] * 1e3:9.3f} ms  {row['over_ar']:6.3f} x ar")
    if _BREAKDOWN.value and not breakdown:
      print(f'batch {B}: no breakdown: the trace names none of the compiled operations here')
    if breakdown:
      (one, first), (wide, last) = breakdown.items()
      print(f'batch {B}: a trunk call by kind of operation (traced, ms per call)')
      print(f"  {'kind':30} {f'{one} position':>12} {f'{wide} positions':>12} {'added':>8}")
      for kind in KINDS + ('all',):
        a, b = ((sum(first.values()), sum(last.values())) if kind == 'all' else
                (first[kind], last[kind]))
        print(f'  {kind:30} {a:12.3f} {b:12.3f} {b - a:+8.3f}')
    if loop_rows:
      print(f'batch {B}: a loop iteration by kind of operation (traced: the operations inside '
            f'the loop, ms per iteration; + S: beyond ar\'s)')
      labels = ['ar' if r['S'] == 0 else f"S = {r['S']}" for r in loop_rows]
      head = ' '.join(f"{label:>9} {'' if i == 0 else '+ S':>7}" for i, label in enumerate(labels))
      print(f"  {'kind':30} {head}")
      rows = [(kind, [r['ms_per_iteration'][kind] for r in loop_rows]) for kind in KINDS]
      rows.append(('all traced', [sum(r['ms_per_iteration'].values()) for r in loop_rows]))
      rows.append(('untraced (loop time - traced)', [r['untraced_ms'] for r in loop_rows]))
      rows.append(('loop time (part 1)', [t * 1e3 for t in per_iter]))
      for kind, ms in rows:
        cells = ' '.join(f'{v:9.3f} {"" if S == 0 else f"{v - ms[0]:+7.3f}":>7}'
                         for S, v in enumerate(ms))
        print(f'  {kind:30} {cells}')
  if _JSON.value:
    atomic.write_json(_JSON.value, result, indent=2)  # a crash leaves the previous file whole


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(_CONFIG))
