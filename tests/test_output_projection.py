"""experiments/output_projection.py on the real SmolLM2 file: a row per M with each path's time
(the scaled tiles where they run; every output checked against XLA's dot by the
script), and bad flags are one line and exit 2. Timings themselves are not asserted."""

import re

from conftest import assert_user_error, run_script
from mtp_jax import kernels


def test_output_projection_times_each_path_on_smollm2s_matrix():
  proc = run_script('experiments/output_projection.py', '--config', 'configs/smollm2.py',
                    '--rows', '1,3', '--rounds', '1', timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  paths = ['float32 kernel'] + ['scaled tiles'] * kernels.scaled_usable() + ['xla']
  assert lines[0] == 'smollm2: output matrix 49152 x 576; ' + (
      'scaled tiles' if kernels.scaled_usable() else
      'in the form of scaled tiles, but no scaled-tile kernel here')
  assert [p.split(':')[0].strip() for p in lines[1].split('|')[1:]] == paths
  assert [line.split('|')[0].strip() for line in lines[2:]] == ['1', '3']
  for line in lines[2:]:
    cells = line.split('|')
    assert len(cells) == len(paths) + 1
    for cell in cells[1:]:  # ms, GB/s, x float32
      assert len(re.findall(r'\d+\.\d+', cell)) == 3, line


def test_output_projection_refuses_bad_flags():
  for args, words in ((['--rows', '0'], ['--rows', 'positive']),
                      (['--rounds', '0'], ['--rounds=0', 'not a positive integer']),
                      (['--config', 'configs/quickstart.py'], ['no pretrained trunk'])):
    assert_user_error(run_script('experiments/output_projection.py', *args), *words)


def test_output_projection_says_when_no_scaled_tile_kernel_runs():
  proc = run_script('experiments/output_projection.py', '--config', 'configs/smollm2.py',
                    '--rows', '1', '--rounds', '1', timeout=600, MTP_JAX_TILES='0')
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0] == ('smollm2: output matrix 49152 x 576; in the form of scaled tiles, but no '
                      'scaled-tile kernel here')
  assert [p.split(':')[0].strip() for p in lines[1].split('|')[1:]] == ['float32 kernel', 'xla']
