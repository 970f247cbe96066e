"""The sweep driver on a two-point grid of tiny runs: metrics from both, a CSV whose values come
from the runs, a rerun that skips finished points, and a failing point that spares the rest."""

import csv
import json
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sweep(tmp_path, corpus, grid: str, **extra):
  flags = [f'--config.{k}={v}' for k, v in {
      'model.d_model': 32, 'model.num_layers': 1, 'model.num_heads': 4, 'model.num_kv_heads': 2,
      'data.sources': corpus, 'data.vocab_size': 300, 'train.steps': 2, 'train.batch_size': 2,
      'train.seq_len': 16, 'train.eval_every': 2, 'train.eval_batches': 1,
      'train.checkpoint_every': 2, 'decode.eval_prompts': 1, 'decode.max_new_tokens': 8,
      'decode.prompt_len': 6, 'sweep.depth': grid,
      **extra}.items()]
  proc = subprocess.run([sys.executable, 'experiments/ablate.py', '--config',
                         'configs/ablate_cpu.py', '--sweep', 'depth', '--root', str(tmp_path)]
                        + flags, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  rows = list(csv.DictReader(open(tmp_path / 'depth' / 'results.csv')))
  return proc, rows


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

  # A rerun trains nothing; a new point that cannot run (D < 0) is reported, the others stay.
  ckpt = tmp_path / 'depth' / 'depth=1' / 'checkpoints'
  before = sorted(os.listdir(ckpt))
  proc, rows = sweep(tmp_path, corpus, '0,1,-1')
  assert proc.returncode == 1
  assert 'depth=0: skipped (finished)' in proc.stdout and 'depth=1: skipped' in proc.stdout
  assert sorted(os.listdir(ckpt)) == before
  assert [r['status'] for r in rows] == ['ok', 'ok', 'failed']
  assert 'mtp.depth' in rows[2]['error'] and '1 failed' in proc.stdout


def test_kind_sweep_matches_head_parameters():
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  import ablate
  from configs import ablate_cpu
  config = ablate_cpu.get_config()
  points = ablate.sweep_points(config, 'kind')
  assert [p[0] for p in points] == ['sequential', 'parallel', 'medusa']
  import jax
  import numpy as np
  from mtp_jax.config import ModelConfig
  from mtp_jax.model import init_params

  def total_params(c):
    shapes = jax.eval_shape(lambda: init_params(ModelConfig.from_config(c), jax.random.key(0)))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))

  trunk_only = config.copy_and_resolve_references()
  trunk_only.mtp.depth = 0
  trunk = total_params(trunk_only)
  heads = []
  for kind, overrides, columns in points:
    # Apply the point's launch.py overrides as launch.py would, then count the whole model:
    # what it holds beyond the D = 0 trunk is what its heads add.
    c = config.copy_and_resolve_references()
    for flag in overrides:
      path, value = flag.removeprefix('--config.').split('=')
      section, field = path.split('.')
      c[section][field] = type(c[section][field])(value)
    assert c.mtp.kind == kind
    # The reference kind keeps the config's width; every other kind gets a solved one.
    assert (c.mtp.head_mlp_dim == config.mtp.head_mlp_dim) == (kind == 'sequential'), kind
    heads.append(total_params(c) - trunk)
    assert heads[-1] == columns['head_params'], kind
  assert all(abs(h - heads[0]) <= 0.002 * heads[0] for h in heads), heads
  # Without matching, medusa's single D x D layer per head is a small fraction of a module.
  assert ablate.head_params(config, 'medusa', 0) < 0.1 * heads[0]


def test_seed_spread_shades_the_loss_weight_plot(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
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
