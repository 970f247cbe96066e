"""The sweep driver on a two-point grid of tiny runs: metrics from both, a CSV whose values come
from the runs, a rerun that skips finished points, and a failing point that spares the rest."""

import csv
import json
import os
import re
import signal
import time

import pytest
from absl import flags
from ml_collections import config_flags

from configs import ablate_cpu
from conftest import model_param_counts, run_script, shrunk, start_as_in_a_terminal
from mtp_jax.config import ModelConfig, as_flags


def sweep(tmp_path, corpus, grid: str):
  # configs/ablate_cpu.py shrunk, each point decoding one prompt.
  config = shrunk(ablate_cpu.get_config(), **{
      'data.sources': corpus, 'train.eval_every': 2, 'train.checkpoint_every': 2,
      'decode.eval_prompts': 1, 'decode.max_new_tokens': 8, 'decode.prompt_len': 6,
      'sweep.depth': grid})
  proc = run_script('experiments/ablate.py', '--config', 'configs/ablate_cpu.py', '--sweep',
                    'depth', '--root', str(tmp_path), *as_flags(config), timeout=600)
  rows = list(csv.DictReader(open(tmp_path / 'depth' / 'results.csv')))
  return proc, rows


def with_flags(config, overrides: list[str]):
  """`config` after launch.py's --config.FIELD=VALUE flags, applied by the parser of
  ml_collections that launch.py's config flag uses."""
  argv = ['launch.py', *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_dict('config', config.copy_and_resolve_references(), lock_config=True,
                                  flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def test_sweep_collects_skips_and_survives_a_failing_point(tmp_path, corpus):
  proc, rows = sweep(tmp_path, corpus, '0,1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [r['value'] for r in rows] == ['0', '1'] and all(r['status'] == 'ok' for r in rows)
  assert {'loss/depth_0', 'accuracy/depth_0', 'accuracy/depth_1'} <= set(rows[0]) | set(rows[1])
  for row in rows:
    summary = json.load(open(tmp_path / 'depth' / f"depth={row['value']}" / 'summary.json'))
    for name, value in summary['eval'].items():
      assert float(row[name]) == value
  assert rows[0]['accuracy/depth_1'] == ''  # D = 0 has no depth 1
  assert rows[0]['decode/tau'] == '' and 1 <= float(rows[1]['decode/tau']) <= 2
  assert (tmp_path / 'depth' / 'depth.png').stat().st_size > 0
  assert '| value |' in (tmp_path / 'depth' / 'results.md').read_text().replace('| sweep ', '')

  # A grid value that makes no valid config (D < 0) is one line before any point runs.
  ckpt = tmp_path / 'depth' / 'depth=1' / 'checkpoints'
  before = sorted(os.listdir(ckpt))
  proc, _ = sweep(tmp_path, corpus, '0,1,-1')
  assert proc.returncode == 2 and proc.stdout == ''
  assert proc.stderr.strip().splitlines() == [
      'error: sweep.depth=-1: mtp.depth must be an integer >= 0, got -1']
  assert not (tmp_path / 'depth' / 'depth=-1').exists()
  # A rerun trains nothing; a new point that fails when it runs (its workdir another model's
  # directory) is reported, the others stay.
  (tmp_path / 'depth' / 'depth=2').mkdir()
  (tmp_path / 'depth' / 'depth=2' / 'config.json').write_text('{"architectures": []}')
  proc, rows = sweep(tmp_path, corpus, '0,1,2')
  assert proc.returncode == 1
  assert 'depth=0: skipped (finished)' in proc.stdout and 'depth=1: skipped' in proc.stdout
  assert sorted(os.listdir(ckpt)) == before
  assert [r['status'] for r in rows] == ['ok', 'ok', 'failed']
  assert "not a run's" in rows[2]['error'] and '1 failed' in proc.stdout
  # TensorBoard's hparams are logged once per point, by the run that trained it
  for value in (0, 1):
    events = os.listdir(tmp_path / 'depth' / f'depth={value}' / 'tb' / 'hparams')
    assert len(events) == 1, events

  # A rerun with another setting would resume or reuse runs of the old one: refused up front.
  point = tmp_path / 'depth' / 'depth=0'
  recorded = sorted(os.listdir(point))
  proc = run_script('experiments/ablate.py', '--config', 'configs/ablate_cpu.py', '--sweep',
                    'depth', '--root', str(tmp_path), *as_flags(shrunk(
                        ablate_cpu.get_config(), **{'data.sources': corpus, 'sweep.depth': '0',
                                                    'train.lr': 0.5})), timeout=600)
  assert proc.returncode == 2 and proc.stdout == ''
  error = proc.stderr.strip().splitlines()
  assert len(error) == 1 and error[0].startswith(f'error: {point} holds this point run with '
                                                 'other settings (')
  assert '--config.train.lr=0.5' in error[0]
  assert sorted(os.listdir(point)) == recorded


@pytest.mark.parametrize('args, words', [
    # the default config file, whose overrides are applied when its flag is defined
    (['--config.train.stepz=1'], 'the config has no such field (\'stepz\' Did you mean "steps"'),
    (['--sweep', 'depth', '--config.sweep.depth='], 'sweep.depth is empty'),
    (['--sweep', 'recipe'], 'the config has no sweep.recipe'),
    (['--sweep', 'seed', '--config.sweep.seed=0,1.5'], "sweep.seed: '1.5' is not a value of seed"),
    (['--sweep', 'kind', '--config.sweep.kind=sequential,foo'],
     "sweep.kind=foo: mtp.kind must be one of sequential, parallel, medusa, got 'foo'"),
    (['--sweep', 'loss_weight', '--config.train.lr=-1'], 'train.lr must be > 0, got -1.0'),
    (['--sweep', 'draft_len', '--config.sweep.draft_len=2,0'],
     'sweep.draft_len takes positive integers, got 2,0'),
])
def test_bad_sweep_input_is_one_line_before_any_point_runs(tmp_path, args, words):
  proc = run_script('experiments/ablate.py', '--root', str(tmp_path / 'root'), *args)
  assert proc.returncode == 2 and proc.stdout == '', proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and words in lines[0], lines
  assert not (tmp_path / 'root').exists()


def test_kind_sweep_matches_head_parameters():
  import ablate
  config = ablate_cpu.get_config()
  points = ablate.sweep_points(config, 'kind')
  assert [p[0] for p in points] == ['sequential', 'parallel', 'medusa']
  heads = []
  for kind, overrides, columns in points:
    # The model that the point's launch.py flags give, counted as initialized.
    c = with_flags(config, overrides)
    assert c.mtp.kind == kind
    # The reference kind keeps the config's width; every other kind gets a solved one.
    assert (c.mtp.head_mlp_dim == config.mtp.head_mlp_dim) == (kind == 'sequential'), kind
    heads.append(model_param_counts(ModelConfig.from_config(c))['heads'])
    assert heads[-1] == columns['head_params'], kind
  assert all(abs(h - heads[0]) <= 0.002 * heads[0] for h in heads), heads
  # Without matching, medusa's single D x D layer per head is a small fraction of a module.
  assert ablate.head_params(config, 'medusa', 0) < 0.1 * heads[0]


def test_seed_spread_shades_the_loss_weight_plot(tmp_path):
  import ablate
  assert ablate.seed_spread(str(tmp_path)) is None  # no seed sweep yet
  (tmp_path / 'seed').mkdir()
  seeds = [{'sweep': 'seed', 'value': str(i), 'status': status, 'loss/depth_0': loss}
           for i, (status, loss) in enumerate([('ok', 2.9), ('ok', 2.8), ('failed', ''),
                                               ('ok', 2.85)])]
  ablate.write_tables(seeds, str(tmp_path / 'seed'))
  spread = ablate.seed_spread(str(tmp_path))
  assert spread == (2.8, 2.9, 3)
  rows = [{'sweep': 'loss_weight', 'value': v, 'status': 'ok', 'loss/depth_0': 2.8 + float(v)}
          for v in ('0.0', '0.1')]
  path = ablate.plot(rows, 'loss_weight', str(tmp_path), spread)
  assert os.path.getsize(path) > 0


@pytest.mark.parametrize('how', ['ctrl_c', 'kill'])
def test_a_stopped_sweep_lets_the_running_point_checkpoint(tmp_path, corpus, how):
  """Ctrl-C reaches the sweep and the point it runs (one process group, as from a terminal), and
  the sweep passes a SIGTERM sent to it alone on to the point: either way the point finishes its
  step and writes a checkpoint, which a rerun resumes from, instead of being killed with the
  sweep or left running without it; the sweep says so and exits 130."""
  config = shrunk(ablate_cpu.get_config(), **{
      'data.sources': corpus, 'train.steps': 2000, 'train.eval_every': 2000,
      'train.checkpoint_every': 2000, 'decode.eval_prompts': 0, 'sweep.depth': '1'})
  log = tmp_path / 'depth' / 'depth=1' / 'train.log'
  proc = start_as_in_a_terminal('experiments/ablate.py', '--config', 'configs/ablate_cpu.py',
                                '--sweep', 'depth', '--root', str(tmp_path), *as_flags(config),
                                start_new_session=True)
  deadline = time.monotonic() + 300
  while not (log.exists() and re.search(r'train: +\d+%.*\| [1-9]\d*/2000', log.read_text())):
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.5)
  if how == 'ctrl_c':
    os.killpg(proc.pid, signal.SIGINT)
  else:
    os.kill(proc.pid, signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-3000:]
  assert 'the same command resumes it' in err.strip().splitlines()[-1]
  steps = [int(n) for n in os.listdir(log.parent / 'checkpoints') if n.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 2000
  assert 'stopped' in log.read_text()
