"""What sampling's filters cost: decode.top_p and decode.top_k against plain temperature sampling,
as one call of the filter (the decoder runs it on every verified position and every draft) and in
whole decodes at batch 1.

Run: python experiments/bench_sampling.py --config configs/smollm2.py --workdir runs/smollm2
     python experiments/bench_sampling.py --config configs/quickstart.py --random
Prints
  1. the filter alone (decode.probabilities) over the model's vocabulary for --rows rows at once:
     temperature only, top_p = --top_p, top_k = --top_k, and a sort of the vocabulary (the
     yardstick: top_p sorted it until it found its nucleus by bisection instead), in ms per call;
  2. decoding (unless --decode_prompts=0): that many held-out prompts (random ones with
     --random), each alone at temperature 1, `ar` and `mtp` at S = --draft_len (default D), each
     with no filter, with top_p and with top_k: tau, tokens/s and the speed over the unfiltered
     row of the same method.
Every timing is the fastest of --rounds interleaved rounds. --json FILE keeps the numbers.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mtp_jax import atomic, cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/smollm2.py', 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', '', 'Run directory (its checkpoint, if any; any '
                               'directory for a pretrained model).')
_RANDOM = flags.DEFINE_bool('random', False, 'Random weights and prompts (costs only).')
_ROWS = flags.DEFINE_list('rows', ['1', '4', '32'], 'Rows per filter call.')
_TOP_P = flags.DEFINE_float('top_p', 0.9, 'The nucleus timed.')
_TOP_K = flags.DEFINE_integer('top_k', 40, 'The top_k timed.', lower_bound=1)
_DECODE_PROMPTS = flags.DEFINE_integer('decode_prompts', 8, 'Prompts decoded (0: filters only).',
                                       lower_bound=0)
_DRAFT_LEN = flags.DEFINE_integer('draft_len', 0, 'S of the mtp rows (0: every head, D).',
                                  lower_bound=0)
_ROUNDS = cli.rounds_flag(3)
_JSON = flags.DEFINE_string('json', '', 'Write every number to this JSON file.')


def main(argv):
  cli.start(argv, persist=False)
  cli.output_file(_JSON.value, '--json')
  rows = cli.positive_ints(_ROWS.value, '--rows')
  if not 0 < _TOP_P.value < 1:  # the counts' bounds are their flags'
    cli.fail(f'--top_p must be in (0, 1), got {_TOP_P.value}')
  cli.weights_source(_WORKDIR.value, _RANDOM.value)
  if not _DECODE_PROMPTS.value and _DRAFT_LEN.value:
    cli.fail('--draft_len sets the mtp rows of --decode_prompts, which is 0')
  from mtp_jax import run
  run.persist_compiled_programs()  # as launch.py: a rerun compiles nothing
  import jax
  import jax.numpy as jnp
  from mtp_jax import decode as dec
  from mtp_jax import inference
  from mtp_jax import measure
  from mtp_jax.pretrained.resolve import resolve_config
  try:  # the flags against the model, before it is made
    config = resolve_config(_CONFIG.value)
  except run.USER_ERRORS as e:
    cli.fail(e)
  D, V = config.mtp.depth, config.data.vocab_size
  S = _DRAFT_LEN.value or D
  if _DECODE_PROMPTS.value and not 1 <= S <= D:
    cli.fail(f'the mtp rows draft 1 to {D} tokens (the model\'s heads), got --draft_len {S}')
  if _TOP_K.value >= V:
    cli.fail(f'--top_k {_TOP_K.value} keeps every one of the {V} tokens: give fewer')
  cli.check_bytes(8 * max(rows) * V, f'{max(rows):,} rows of logits need',
                  'them and their probabilities in float32', '--rows')
  try:
    inputs = inference.decode_inputs(_CONFIG.value, _WORKDIR.value, _DECODE_PROMPTS.value,
                                     _RANDOM.value)
  except (*run.USER_ERRORS, ValueError) as e:  # a missing checkpoint too
    cli.fail(e)
  prompts, session, d = inputs.prompts, inputs.session, inputs.config.decode
  stop_ids = session.stop_ids if session else ()
  filters = {'temperature only': dec.Settings(temperature=1.0),
             f'top_p {_TOP_P.value:g}': dec.Settings(temperature=1.0, top_p=_TOP_P.value),
             f'top_k {_TOP_K.value}': dec.Settings(temperature=1.0, top_k=_TOP_K.value)}
  variants = [(name, method, dataclasses.replace(s, draft_len=draft, stop_ids=stop_ids,
                                                 max_new_tokens=d.max_new_tokens))
              for method, draft in (('ar', 0), ('mtp', S)) for name, s in filters.items()]
  if prompts:  # part 2's prompts, before part 1 compiles (and the params are made)
    cli.batch1_checked(inputs.cfg, prompts, [s for *_, s in variants])
  result = {'machine': measure.machine(), 'source': inputs.source, 'vocab': V,
            'top_p': _TOP_P.value, 'top_k': _TOP_K.value, 'rounds': _ROUNDS.value,
            'prompts': len(prompts), 'draft_len': S, 'max_new_tokens': d.max_new_tokens,
            'filters': [], 'decoding': []}
  print(f"machine: {result['machine']}")
  print(f'1. the filter alone over {V} logits, ms per call (fastest of {_ROUNDS.value} rounds)')
  print(f"{'rows':>5} " + ' '.join(f'{name:>16}' for name in filters) + f" {'vocabulary sort':>16}")
  for R in rows:
    logits = 3 * jax.random.normal(jax.random.key(R), (R, V))
    fns = [jax.jit(lambda x, s=s: dec.probabilities(x, s)) for s in filters.values()]
    fns.append(jax.jit(lambda x: jnp.sort(x, axis=-1)))
    seconds, _ = measure.fastest([lambda fn=fn: fn(logits) for fn in fns], _ROUNDS.value,
                                 warmup=True)
    result['filters'].append({'rows': R, 'ms': dict(zip([*filters, 'vocabulary sort'],
                                                        [t * 1e3 for t in seconds]))})
    print(f'{R:>5} ' + ' '.join(f'{t * 1e3:>16.3f}' for t in seconds), flush=True)
  if prompts:
    found = cli.batch1_sweep(inputs.params, prompts,
                             [(inputs.model, s) for _, _, s in variants], _ROUNDS.value,
                             'bench_sampling: decoding')
    print(f'\n2. decoding {len(prompts)} prompts at batch 1, temperature 1, up to '
          f'{d.max_new_tokens} new tokens (mtp: S = {S})')
    print(f"{'method':6} {'filter':>16} {'tau':>5} {'tokens/s':>9} {'x unfiltered':>12}")
    for i, ((name, method, _), r) in enumerate(zip(variants, found)):
      base = found[i - i % len(filters)]['tokens_per_s']
      row = {'method': method, 'filter': name, 'tau': r['tau'],
             'tokens_per_s': r['tokens_per_s'], 'over_unfiltered': r['tokens_per_s'] / base}
      result['decoding'].append(row)
      print(f"{method:6} {name:>16} {r['tau']:>5.2f} {r['tokens_per_s']:>9.1f} "
            f"{row['over_unfiltered']:>12.2f}")
  if _JSON.value:  # a crash leaves the previous file whole
    atomic.write_json(_JSON.value, result, indent=2)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(_CONFIG))
