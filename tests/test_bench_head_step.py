"""experiments/bench_head_step.py on a tiny model: each variant's step timed, with its compiled
memory, and a profiler trace summarised by operation kind; a malformed variant is one error
line. Timings themselves are not asserted (a busy machine makes them noisy)."""

import re

from conftest import assert_user_error, run_script, text_config
from mtp_jax.config import as_flags

VARIANTS = ['train.remat_logits=True', 'train.remat_logits=False,train.head_loss=data']


def test_bench_head_step_times_each_variant_and_summarises_a_trace(tmp_path):
  config = text_config(**{'mtp.depth': 2, 'train.batch_size': 2, 'train.seq_len': 16,
                          'data.cache_dir': str(tmp_path / 'data')})
  trace = tmp_path / 'trace'
  proc = run_script('experiments/bench_head_step.py', '--config', 'configs/base.py',
                    *[f'--variant={v}' for v in VARIANTS], '--steps', '1',
                    f'--trace={trace}', *as_flags(config), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert '32 / 32 positions a step' in out
  rows = re.findall(r'^\s*([\d.]+)\s+(\d+)\s+(\d+)\s+(\S.*)$', out, re.M)
  assert [r[3] for r in rows] == VARIANTS, out
  assert all(float(ms) > 0 and int(rate) > 0 and int(temp) > 0 for ms, rate, temp, _ in rows)
  kinds = re.findall(r'^\s*[\d.]+\s+([\d.]+)%\s+(\S+)$', out, re.M)
  assert kinds and 0 < sum(float(share) for share, _ in kinds) <= 100.01, out
  assert any(trace.rglob('*.trace.json.gz'))


def test_bench_head_step_refuses_a_malformed_variant():
  assert_user_error(run_script('experiments/bench_head_step.py', '--config', 'configs/base.py',
                               '--variant=train.remat_logits'), 'FIELD=VALUE')
  assert_user_error(run_script('experiments/bench_head_step.py', '--config', 'configs/base.py',
                               '--variant=train.nope=1'), 'train.nope')
