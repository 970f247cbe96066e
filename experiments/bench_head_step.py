"""Times a config's training step on its own data (token windows, or the trunk's cached features
as configs/smollm2_heads.py trains on), for one or more variants of the config, interleaved.
bench_train.py times token windows across depths and kinds; this times the step a config runs.

Run: python experiments/bench_head_step.py --config configs/smollm2_heads.py \
       --variant train.remat_logits=True --variant train.remat_logits=False [--steps 12] \
       [--trace DIR]
Each --variant is a comma-separated list of FIELD=VALUE overrides of the config (none: the config
as it is). Prints per variant: the fastest step in ms, tokens/s, and XLA's temporary buffers for
the step (MiB, its compiled memory analysis). With --trace DIR, also writes a jax.profiler trace
of two steps of the first variant there and prints its operations' time by kind (summed over
threads, so the total exceeds the step). The data is the config's: a missing feature cache (or
token dataset) is built in data.cache_dir first, as training would; the runs themselves live in a
temporary directory, removed at the end.
"""

import ast
import collections
import os
import re
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mtp_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/smollm2_heads.py',
                                          'Path to a config file.', lock_config=True)
_VARIANTS = flags.DEFINE_multi_string('variant', [], 'FIELD=VALUE[,FIELD=VALUE...] overrides.')
_STEPS = flags.DEFINE_integer('steps', 12, 'Timed steps per variant, one of each variant in '
                              'turn after one warm-up step each; the fastest is kept.',
                              lower_bound=1)
_TRACE = flags.DEFINE_string('trace', '', 'Write a profiler trace of the first variant here.')


def parse_variant(text: str) -> dict:
  """'a.b=1,c.d=x' -> {'a.b': 1, 'c.d': 'x'} (values read as Python literals where they are)."""
  out = {}
  for item in filter(None, text.split(',')):
    key, sep, value = item.partition('=')
    if not sep or not key:
      raise ValueError(f'--variant takes FIELD=VALUE pairs, got {item!r}')
    try:
      out[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key.strip()] = value
  return out


def op_kinds(trace_dir: str, steps: int) -> list[tuple[str, float]]:
  """(operation kind, ms per step) from the newest jax.profiler trace in trace_dir (this run's,
  where it holds earlier ones too), largest first: XLA's thunks by name without their numeric
  suffix."""
  from mtp_jax import measure
  total = collections.Counter()
  for e in measure.trace_events(trace_dir):
    if not e['name'].startswith(('ThunkExecutor', '$')):
      total[re.sub(r'\.\d+$', '', e['name'])] += e['dur'] / 1e3 / steps
  return total.most_common()


def main(argv):
  cli.start(argv, persist=False)
  import jax
  from mtp_jax import measure, sharding, train
  from mtp_jax.config import ConfigError, apply_overrides, write_problem
  texts = _VARIANTS.value or ['']
  root = tempfile.mkdtemp(prefix='bench_head_step_')
  try:
    try:
      problem = _TRACE.value and write_problem(_TRACE.value, '--trace')
      if problem:  # before the data and the timings, not after them
        raise ConfigError(problem)
      configs = [apply_overrides(_CONFIG.value, parse_variant(v)) for v in texts]
      sessions = [train.Session(c, os.path.join(root, str(i))) for i, c in enumerate(configs)]
    except (ConfigError, ValueError, TypeError) as e:  # TypeError: a value of the wrong type
      cli.fail(e)
    tokens = [c.train.batch_size * c.train.seq_len for c in configs]
    calls, memory = [], []
    for session in sessions:
      _, state, _ = session.restore_or_init()
      batch = session.device_batch(session.batch(0))
      with sharding.active(session.mesh):  # compiled once, for the timings and the memory
        step = session.lower_train_step(batch, session.draft_ids).compile()
      analysis = step.memory_analysis()
      memory.append(analysis.temp_size_in_bytes / 2**20 if analysis else float('nan'))
      held = {'state': state}  # the step donates its state: each call runs on the last one's

      def call(session=session, step=step, batch=batch, held=held):
        with sharding.active(session.mesh):
          held['state'], metrics = step(held['state'], batch, session.draft_ids)
        return metrics
      calls.append(call)
    # Every variant one step in turn, so a slow spell of the machine slows them alike.
    best, _ = measure.fastest(calls, _STEPS.value, warmup=True, desc='bench_head_step: steps')
    print(f'machine: {measure.machine()}')
    print(f"{' / '.join(map(str, tokens))} positions a step; the fastest of {_STEPS.value} "
          'steps')
    print(f"{'ms/step':>8} {'tokens/s':>9} {'temp MiB':>8}  variant")
    for text, seconds, n, temp in zip(texts, best, tokens, memory):
      print(f'{seconds * 1e3:>8.1f} {n / seconds:>9.0f} {temp:>8.0f}  {text or "(config)"}')
    if _TRACE.value:
      jax.profiler.start_trace(_TRACE.value, create_perfetto_trace=True)
      measure.timings(calls[:1], 2)
      jax.profiler.stop_trace()
      kinds = op_kinds(_TRACE.value, 2)
      total = sum(ms for _, ms in kinds)
      print(f'\n{texts[0] or "(config)"}: operations by kind, ms per step (of {total:.0f} summed '
            f'over threads)')
      for name, ms in kinds[:12]:
        print(f'{ms:>8.1f} {100 * ms / total:>5.1f}%  {name}')
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(_CONFIG))
