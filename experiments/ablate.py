"""Ablation sweeps: a grid of short trainings as config overrides, one workdir per point,
collected into results.csv, results.md and a PNG plot.

Run: python experiments/ablate.py --config configs/ablate_cpu.py --sweep depth
Sweeps (grids from the config's `sweep` section): depth (per-depth validation accuracy vs D),
loss_weight (main-head validation loss vs lambda), kind (the head kinds side by side),
draft_len (tau and decoding speedup vs S, from one model trained at the largest S), and seed
(the base config at several seeds: how far apart two runs of one config land, the noise that
the other sweeps' differences must exceed).
The kind sweep compares the kinds at equal head parameters: each kind's mtp.head_mlp_dim is
solved for so that its heads hold as many parameters as the sequential modules. The recipe
sweep (configs/smollm2_ablate.py) compares ways of training heads on a frozen pretrained trunk
(RECIPES): fitting data tokens or the trunk's own distribution, on text or on data the trunk
wrote itself, from the trunk's last block or from random; all are scored by the acceptance of
greedy speculative decoding on held-out instruct prompts.
Each point runs `launch.py` in its own process and workdir (ROOT/SWEEP/NAME=VALUE), so a
failing point is reported without losing the others, and a rerun skips finished points. Each
point's workdir records the arguments it ran with (point.json); a rerun whose arguments for a
point differ (another base config, other flags) stops with one line before anything runs, since
that workdir's checkpoints hold the other run.
"""

import csv
import functools
import io
import json
import os
import signal
import subprocess
import sys

from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mtp_jax import atomic  # noqa: E402
from mtp_jax import cli  # noqa: E402
from mtp_jax.config import ModelConfig, as_flags  # noqa: E402
from mtp_jax.pretrained.resolve import resolve_config  # noqa: E402

try:  # the default file is loaded here, with the --config.FIELD overrides in argv
  _CONFIG = config_flags.DEFINE_config_file('config', os.path.join(ROOT, 'configs/ablate_cpu.py'),
                                            'Base config of every point.', lock_config=True)
except Exception as e:
  cli.config_failed(e, sys.argv)
_SWEEP = flags.DEFINE_enum('sweep', 'depth', ['depth', 'loss_weight', 'kind', 'draft_len', 'seed',
                                             'recipe'], 'Which question to answer.')
_ROOT = flags.DEFINE_string('root', 'runs/ablate', 'Where the points\' workdirs go.')

# Sweep name -> the config field its values override (the recipe sweep's are whole recipes).
FIELDS = {'depth': 'mtp.depth', 'loss_weight': 'mtp.loss_weight', 'kind': 'mtp.kind',
          'seed': 'seed', 'recipe': 'recipe'}
# Head-training recipes on a frozen pretrained trunk: name -> overrides of the sweep's config.
TEXT = 'stdlib/pydoc_data/topics.py'  # English prose that ships with Python
RECIPES = {
    'text_tokens': {'data.sources': TEXT, 'train.head_loss': 'data'},
    'text_distill': {'data.sources': TEXT, 'train.head_loss': 'distill'},
    'self_distill': {'data.sources': 'self', 'train.head_loss': 'distill'},
    # the chats' user turns invented by the trunk (sampled at 1) instead of given
    'self_invented_distill': {'data.sources': 'self', 'train.head_loss': 'distill',
                              'data.self_prompts': '', 'data.self_tokens': 600_000,
                              'data.self_temperature': 0.7},
    'self_distill_random_init': {'data.sources': 'self', 'train.head_loss': 'distill',
                                 'mtp.init_from': ''},
}


def point_args(config, overrides: list[str]) -> list[str]:
  """launch.py's config flags for a point: every field of the sweep's config, then its own."""
  return [*as_flags(config, skip=('sweep',)), *overrides]


def check_reusable(workdir: str, args: list[str]) -> None:
  """Exits with one error line when `workdir` holds a point run with other arguments than
  `args` (its checkpoints and summary are that run's: resuming or reusing them would mix two
  settings). A workdir without point.json is new, or from before the file was written."""
  path = os.path.join(workdir, 'point.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)['args']
  if old != args:
    was = ', '.join(a for a in old if a not in args) or 'the same flags in another order'
    now = ', '.join(a for a in args if a not in old) or '-'
    cli.fail(f'{workdir} holds this point run with other settings ({was}; now {now}): give '
             f'another --root, or remove that workdir to train the point again')


def run_point(workdir: str, args: list[str], mode: str = 'train') -> tuple[int, str]:
  os.makedirs(workdir, exist_ok=True)
  atomic.write_json(os.path.join(workdir, 'point.json'), {'args': args})
  command = [sys.executable, os.path.join(ROOT, 'launch.py'), '--config',
             os.path.join(ROOT, 'configs/base.py'), '--workdir', workdir, '--mode', mode, *args]
  with open(os.path.join(workdir, f'{mode}.log'), 'w') as log:
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)

    def forward(signum, frame):  # `kill` of the sweep: passed on, then stopped as by Ctrl-C
      proc.send_signal(signum)
      raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, forward)
    try:
      returncode = proc.wait()
    except KeyboardInterrupt:
      # Ctrl-C reached the point's run too (one process group): it finishes its step, writes a
      # checkpoint and exits, which a rerun of the sweep resumes; a second Ctrl-C stops it at once
      proc.wait()
      raise
    finally:
      signal.signal(signal.SIGTERM, previous)
  lines = open(os.path.join(workdir, f'{mode}.log')).read().strip().splitlines()
  return returncode, (lines[-1] if lines else '')


def finished(workdir: str, steps: int) -> dict | None:
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    return None
  summary = json.load(open(path))
  return summary if summary.get('step') == steps and not summary.get('stopped_by') else None


def finished_bench(path: str) -> dict | None:
  """A run's bench.json if its bench finished (one stopped part way leaves the blocks it
  finished, marked incomplete), else None."""
  if not os.path.exists(path):
    return None
  bench = json.load(open(path))
  return bench if bench.get('complete', True) else None


def log_hparams(workdir: str, hparams: dict, metrics: dict):
  from tensorboardX import SummaryWriter
  with SummaryWriter(os.path.join(workdir, 'tb')) as writer:
    writer.add_hparams(hparams, {f'hparam/{k}': v for k, v in metrics.items()}, name='hparams')


def head_params(config, kind: str, head_mlp_dim: int) -> int:
  """Parameters of the MTP heads (everything but the trunk) of `config` with this kind."""
  import dataclasses
  from mtp_jax import costs
  cfg = dataclasses.replace(ModelConfig.from_config(config), mtp_kind=kind,
                            head_mlp_dim=head_mlp_dim)
  return costs.param_counts(cfg)['heads']


def matched_head_mlp_dim(config, kind: str, target: int) -> int:
  """The mtp.head_mlp_dim at which `kind`'s heads hold closest to `target` parameters (head
  parameters are affine in that width, so two evaluations fix the line)."""
  p64, p128 = head_params(config, kind, 64), head_params(config, kind, 128)
  return max(1, round(64 + (target - p64) * 64 / (p128 - p64)))


def sweep_points(config, sweep: str) -> list[tuple[str, list[str], dict]]:
  """(value, launch.py overrides, extra result columns) for each point of the grid."""
  field = FIELDS[sweep]
  if sweep not in config.get('sweep', {}):
    cli.fail(f'the config has no sweep.{sweep}, the values --sweep {sweep} runs (the recipes '
             'are configs/smollm2_ablate.py\'s)')
  values = [v.strip() for v in config.sweep[sweep].split(',') if v.strip()]
  if not values:
    cli.fail(f'sweep.{sweep} is empty: give its values, comma-separated')
  if sweep == 'recipe':
    unknown = [v for v in values if v not in RECIPES]
    if unknown:
      cli.fail(f"sweep.recipe: unknown recipe {unknown[0]} ({', '.join(RECIPES)})")
    for v in values:
      check_point(config, sweep, v, {k: str(x) for k, x in RECIPES[v].items()})
    return [(v, [f'--config.{k}={x}' for k, x in RECIPES[v].items()], {}) for v in values]
  for v in values:  # each value a config of its own: all checked before the first trains
    check_point(config, sweep, v, {field: v})
  if sweep != 'kind' or not config.mtp.depth:
    return [(v, [f'--config.{field}={v}'], {}) for v in values]
  target = head_params(config, 'sequential', config.mtp.head_mlp_dim)
  points = []
  for kind in values:
    width = (config.mtp.head_mlp_dim if kind == 'sequential'
             else matched_head_mlp_dim(config, kind, target))
    count = target if kind == 'sequential' else head_params(config, kind, width)
    blocks = [] if kind != 'medusa' else ['--config.mtp.head_blocks=1']  # Medusa has none
    points.append((kind, [f'--config.{field}={kind}', f'--config.mtp.head_mlp_dim={width}']
                   + blocks, {'head_mlp_dim': width, 'head_params': count}))
  return points


def check_point(config, sweep: str, value: str, overrides: dict) -> None:
  """Exits with one line where a grid value, read as its field's type, does not make a valid
  config (a point that would fail only once the points before it had trained)."""
  from mtp_jax.config import ConfigError, apply_overrides, validate
  typed = {}
  for key, text in overrides.items():
    kind = type(functools.reduce(lambda node, part: node[part], key.split('.'), config))
    try:
      typed[key] = ({'True': True, 'False': False}[text] if kind is bool else kind(text))
    except (KeyError, ValueError):
      cli.fail(f'sweep.{sweep}: {text!r} is not a value of {key} ({kind.__name__})')
  try:
    validate(apply_overrides(config, typed))
  except ConfigError as e:
    cli.fail(f'sweep.{sweep}={value}: {e}')


def train_points(config, sweep: str, root: str) -> list[dict]:
  """Trains every point of a depth / loss_weight / kind / seed sweep; one row per point."""
  field = FIELDS[sweep]
  points = [(value, os.path.join(root, sweep, f'{sweep}={value}'),
             point_args(config, [*overrides, '--config.run_after_train=']), columns)
            for value, overrides, columns in sweep_points(config, sweep)]
  for _, workdir, args, _ in points:  # all of them before any trains
    check_reusable(workdir, args)
  rows = []
  for value, workdir, args, columns in points:
    summary = finished(workdir, config.train.steps)
    status = 'skipped (finished)'
    if summary is None:
      code, last = run_point(workdir, args)
      summary = finished(workdir, config.train.steps)
      status = 'trained' if summary is not None else f'failed (exit {code}): {last}'
    print(f'{sweep}={value}: {status}', flush=True)
    row = {'sweep': sweep, 'value': value, **columns, 'status': 'ok' if summary else 'failed',
           'error': '' if summary else status}
    if summary:
      row.update(summary['eval'])
      key = 'loss/depth_0' if 'loss/depth_0' in summary['eval'] else 'loss/depth_1'
      if status == 'trained':  # a finished point logged them when it trained
        log_hparams(workdir, {field: value, **columns}, {'loss': summary['eval'][key]})
    rows.append(row)
  return rows


def draft_len_points(config, root: str) -> list[dict]:
  """One model at D = max S, then bench: tau and speedup vs S (greedy, batch 1 and 8)."""
  values = sorted(cli.positive_ints(
      [v.strip() for v in config.sweep.draft_len.split(',') if v.strip()], 'sweep.draft_len'))
  check_point(config, 'draft_len', str(values[-1]), {'mtp.depth': str(values[-1])})
  workdir = os.path.join(root, 'draft_len', f'depth={values[-1]}')
  args = point_args(config, [f'--config.mtp.depth={values[-1]}', '--config.run_after_train='])
  check_reusable(workdir, args)
  rows = []
  if finished(workdir, config.train.steps) is None:
    code, last = run_point(workdir, args)
    if finished(workdir, config.train.steps) is None:
      print(f'draft_len: training failed (exit {code}): {last}', flush=True)
      return [{'sweep': 'draft_len', 'value': v, 'status': 'failed', 'error': last}
              for v in values]
  bench_path = os.path.join(workdir, 'bench.json')
  bench = finished_bench(bench_path)
  if bench is None:
    code, last = run_point(workdir, args, mode='bench')
    bench = finished_bench(bench_path)
    if code or bench is None:
      return [{'sweep': 'draft_len', 'value': v, 'status': 'failed', 'error': last}
              for v in values]
  for r in bench['rows']:
    if r['temperature'] == 0 and (r['draft_len'] in values or r['draft_len'] == 0):
      rows.append({'sweep': 'draft_len', 'value': r['draft_len'], 'status': 'ok', 'error': '',
                   'batch': r['batch'], 'tau': r['tau'], 'speedup': r['speedup'],
                   'tokens_per_s': r['tokens_per_s'],
                   'acceptance': ' '.join(f'{a:.3f}' for a in r['acceptance_per_position'])})
  print(f'draft_len: {len(rows)} rows from {bench_path}', flush=True)
  return rows


def write_tables(rows: list[dict], out_dir: str) -> list[str]:
  seen = list(dict.fromkeys(k for r in rows for k in r))
  # The point's own columns first, then the metrics grouped by name (accuracy/..., loss/...).
  columns = [k for k in seen if '/' not in k] + sorted(k for k in seen if '/' in k)
  table = io.StringIO(newline='')
  writer = csv.DictWriter(table, columns)
  writer.writeheader()
  writer.writerows(rows)
  atomic.write_text(os.path.join(out_dir, 'results.csv'), table.getvalue())

  def fmt(v):  # 4 significant digits, but never an exponent for large values like tokens/s
    if not isinstance(v, float):
      return str(v)
    return f'{v:.0f}' if abs(v) >= 1000 else f'{v:.4g}'
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(fmt(r.get(c, '')) for c in columns) + ' |' for r in rows]
  atomic.write_text(os.path.join(out_dir, 'results.md'), '\n'.join(lines) + '\n')
  return columns


def seed_spread(root: str) -> tuple[float, float, int] | None:
  """(lowest, highest) main-head validation loss over the seed sweep's finished points and their
  count, if that sweep has been run under `root`."""
  path = os.path.join(root, 'seed', 'results.csv')
  if not os.path.exists(path):
    return None
  losses = [float(r['loss/depth_0']) for r in csv.DictReader(open(path)) if r['status'] == 'ok']
  return (min(losses), max(losses), len(losses)) if len(losses) >= 2 else None


def plot(rows: list[dict], sweep: str, out_dir: str, spread=None) -> str:
  """The sweep's plot; `spread` (from seed_spread) shades the main-head loss's run-to-run range
  on the loss_weight plot."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  ok = [r for r in rows if r['status'] == 'ok']
  # A second panel for tau when the points decoded during training (depth and kind sweeps).
  with_tau = sweep != 'draft_len' and any('decode/tau' in r for r in ok)
  fig, axes = plt.subplots(1, 2 if with_tau else 1, figsize=(11 if with_tau else 6, 4))
  panels = list(axes) if with_tau else [axes]
  ax = panels[0]
  if sweep == 'draft_len':
    batches = sorted({r['batch'] for r in ok})
    for batch in batches:
      pts = [r for r in ok if r['batch'] == batch]
      if batch == batches[0]:  # greedy tokens, and so tau, do not depend on the batch
        ax.plot([r['value'] for r in pts], [r['tau'] for r in pts], 'o-', label='tau (greedy)')
      ax.plot([r['value'] for r in pts], [r['speedup'] for r in pts], 's--',
              label=f'speedup over ar, batch {batch}')
    ax.axhline(1.0, color='gray', lw=0.8)
    ax.set_xlabel('draft length S')
    ax.set_xticks(sorted({r['value'] for r in ok}))
  else:
    # Numeric grids plot on a numeric axis; head kinds as categories.
    categorical = sweep in ('kind', 'recipe')
    labels = [r['value'] if categorical else float(r['value']) for r in ok]
    style = 'o' if categorical else 'o-'  # no lines between categories
    if sweep == 'loss_weight':
      ax.plot(labels, [r['loss/depth_0'] for r in ok], 'o-')
      ax.set_ylabel('main-head validation loss')
      if spread:
        ax.axhspan(spread[0], spread[1], color='gray', alpha=0.2,
                   label=f'range over {spread[2]} seeds (seed sweep)')
    else:
      # Recipes train on different data, so their held-out splits differ: they are compared by
      # what decoding the same instruct prompts accepted; the other sweeps by held-out accuracy.
      metric, name = (('decode/acceptance', 'acceptance at draft position {k}, greedy')
                      if sweep == 'recipe' else ('accuracy/depth', 'validation top-1 accuracy'))
      depths = sorted({int(k.split('_')[-1]) for r in ok for k in r if k.startswith(metric)})
      for k in depths:
        ax.plot(labels, [r.get(f'{metric}_{k}', float('nan')) for r in ok], style,
                label=f'depth {k}', markersize=8)
      ax.set_ylabel(name.format(k='k') if sweep == 'recipe' else name)
    if with_tau:
      panels[1].plot(labels, [r.get('decode/tau', float('nan')) for r in ok], style, markersize=8)
      panels[1].set_ylabel('tau, greedy (tokens per trunk forward)')
    for a in panels:
      a.set_xlabel(FIELDS[sweep])
      if not categorical:
        a.set_xticks(labels)
      elif sweep == 'recipe':
        a.tick_params(axis='x', labelrotation=15)
  if ax.get_legend_handles_labels()[0]:
    ax.legend()
  for a in panels:
    a.grid(alpha=0.3)
  path = os.path.join(out_dir, f'{sweep}.png')
  fig.tight_layout()
  with atomic.replacing(path) as tmp:
    fig.savefig(tmp, dpi=120, format='png')
  return path


def main(argv):
  cli.start(argv, persist=False)
  from mtp_jax.config import ConfigError, write_problem
  try:
    config, sweep = resolve_config(_CONFIG.value), _SWEEP.value
    problem = write_problem(_ROOT.value, '--root')
    if problem:
      raise ConfigError(problem)
  except ConfigError as e:  # the model file's errors (a PretrainedError is one)
    cli.fail(e)
  out_dir = os.path.join(_ROOT.value, sweep)
  try:
    rows = (draft_len_points(config, _ROOT.value) if sweep == 'draft_len'
            else train_points(config, sweep, _ROOT.value))
  except KeyboardInterrupt:
    print('stopped: the point that was running wrote a checkpoint; the same command resumes it '
          'and skips the finished points', file=sys.stderr)
    return 130
  os.makedirs(out_dir, exist_ok=True)
  write_tables(rows, out_dir)
  png = plot(rows, sweep, out_dir, seed_spread(_ROOT.value) if sweep == 'loss_weight' else None)
  failed = [r for r in rows if r['status'] != 'ok']
  print(f'wrote {out_dir}/results.csv, results.md, {png}; {len(rows) - len(failed)} ok, '
        f'{len(failed)} failed')
  return 1 if failed else 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.flags_parser(_CONFIG))
