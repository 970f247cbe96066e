"""The decoder's argmax through the kernel (kernels.argmax, DecodeModel.argmax) against XLA's
(layers.greedy): alone and in whole greedy decodes (decode_profile.py times the trunk's calls,
which end in the model's argmax).

Run: python experiments/argmax.py --config configs/smollm2.py --workdir runs/smollm2
     python experiments/argmax.py --config configs/quickstart.py --random  (random weights)
Prints, each part timed in interleaved rounds (the fastest of --rounds):
  1. the argmax alone over B x T x V logits (B in --batches, T = 1 and D + 1, V the trunk's
     vocabulary and the draft vocabulary), after a check that both take the same tokens there:
     microseconds per call, a loop of --calls calls;
  2. greedy decoding of --prompts held-out prompts, each alone at batch 1: `ar` and `mtp` at
     S = 1..D with each argmax, tokens/s and whether every output is `ar`'s with XLA's argmax
     (exit status 1 when one is not).
"""

import dataclasses
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mtp_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/smollm2.py', 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', '', 'Run directory holding the heads (any directory '
                               'for a pretrained model without trained heads).')
_RANDOM = flags.DEFINE_bool('random', False, 'Random weights and random prompts instead of a '
                            'checkpoint (the times do not depend on the weights).')
_BATCHES = flags.DEFINE_list('batches', ['1', '8'], 'Batch sizes of part 1.')
_ROUNDS = cli.rounds_flag(5)
_CALLS = flags.DEFINE_integer('calls', 50, 'Calls per timing loop in part 1.', lower_bound=1)
_PROMPTS = flags.DEFINE_integer('prompts', 8, 'Held-out prompts decoded in part 2 (0: skip it).',
                                lower_bound=0)


def argmax_loop(argmax, calls: int):
  """A jitted loop of `calls` argmaxes of x, each fed the previous one's tokens (written into
  x's first entry) so that nothing is hoisted out of it."""
  import jax
  import jax.numpy as jnp

  def body(_, carry):
    total, x = carry
    x = x.at[..., 0].set((total % 2).astype(x.dtype))
    return total + argmax(x).sum(), x
  return jax.jit(lambda x: jax.lax.fori_loop(0, calls, body, (jnp.int32(0), x))[0])


def main(argv):
  cli.start(argv, persist=False)
  batches = cli.positive_ints(_BATCHES.value, '--batches')
  cli.weights_source(_WORKDIR.value, _RANDOM.value)
  import jax.numpy as jnp
  import numpy as np
  from mtp_jax import inference, kernels, measure, run
  from mtp_jax.layers import greedy

  if not kernels.usable():
    cli.fail('the kernels are not available here (MTP_JAX_KERNELS=0, no compiler, or several '
             'devices)')
  if not _CONFIG.value.decode.kernels:  # before the model is made
    cli.fail('the config decodes without kernels (decode.kernels)')
  run.persist_compiled_programs()
  try:
    inputs = inference.decode_inputs(_CONFIG.value, _WORKDIR.value,
                                     _PROMPTS.value, _RANDOM.value)
  except run.USER_ERRORS as e:  # a missing checkpoint too
    cli.fail(e)
  model, prompts, cfg = inputs.model, inputs.prompts, inputs.cfg
  if not model.kernels:  # what else turns them off (model.dtype bfloat16)
    cli.fail(f'the model decodes without kernels (model.dtype={cfg.dtype})')
  D = cfg.mtp_depth
  base = inference.settings(_CONFIG.value, draft=0, temperature=0.0, stop_ids=())
  stop = inputs.session.stop_ids if inputs.session else ()  # random prompts: no stop token
  sweep = [dataclasses.replace(base, draft_len=S, stop_ids=stop) for S in range(D + 1)]
  if prompts:  # part 2's prompts, before part 1 compiles (and the params are made)
    cli.batch1_checked(cfg, prompts, sweep)
  cli.check_bytes(4 * max(batches) * (D + 1) * cfg.vocab_size,
                  f'logits of {max(batches):,} x {D + 1} x {cfg.vocab_size} need', 'float32',
                  '--batches')

  @dataclasses.dataclass(frozen=True)
  class XlaArgmax(type(model)):  # the same model, its argmax XLA's
    def argmax(self, logits_xV):
      return greedy(logits_xV)
  models = {'kernel': model,
            'xla': XlaArgmax(**{f.name: getattr(model, f.name)
                                for f in dataclasses.fields(model)})}
  draft_vocab = len(model.draft) if model.draft else cfg.vocab_size
  print(f'machine: {measure.machine()}')
  print(f'model: {cfg.num_layers} layers, vocab {cfg.vocab_size} (drafts over {draft_vocab}), '
        f'D = {D} ({inputs.source})')

  print('\n1. the argmax alone: us per call (kernel, xla, xla / kernel)')
  rng = np.random.default_rng(0)
  shapes = [(B, T, V) for B in batches for T in sorted({1, D + 1})
            for V in sorted({cfg.vocab_size, draft_vocab}, reverse=True)]
  loops = []
  for shape in shapes:
    x = jnp.asarray(rng.standard_normal(shape, np.float32))
    if not np.array_equal(models['kernel'].argmax(x), greedy(x)):
      print(f'error: the kernel\'s argmax differs from XLA\'s over {shape}', file=sys.stderr)
      sys.exit(1)
    loops += [functools.partial(argmax_loop(m.argmax, _CALLS.value), x) for m in models.values()]
  seconds, _ = measure.fastest(loops, _ROUNDS.value, warmup=True)
  for i, shape in enumerate(shapes):
    k, x = (t / _CALLS.value * 1e6 for t in seconds[2 * i:2 * i + 2])
    print(f"  {' x '.join(map(str, shape)):>18}: {k:8.1f} {x:8.1f} {x / k:6.1f}x")

  if not _PROMPTS.value:
    return
  print(f'\n2. greedy decoding of {_PROMPTS.value} held-out prompts, each alone')
  variants, names = [], []
  for s in sweep:
    for name in ('xla', 'kernel'):
      variants.append((models[name], s))
      names.append(f"{'ar' if s.draft_len == 0 else 'mtp'} S = {s.draft_len}, {name} argmax")
  rows = cli.batch1_sweep(inputs.params, prompts, variants, _ROUNDS.value, desc='argmax')
  for name, row in zip(names, rows):
    print(f"  {name:26} tau {row['tau']:.2f}  {row['tokens_per_s']:7.1f} tokens/s  "
          f"x{row['speedup']:.3f} over ar (xla)  same as it: {row['identical_to_ar']}")
  if not all(row['identical_to_ar'] for row in rows):
    print('error: a greedy output differs from ar\'s with XLA\'s argmax (above)', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(_CONFIG))
