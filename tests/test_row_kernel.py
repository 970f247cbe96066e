"""experiments/row_kernel.py in tiny shapes: the kernel, a --baseline build of another version of
its source and XLA's dot each print a row per M (their outputs checked equal by the script, here
on --cached weights, one layer's reused); --decompose adds the scaled products with parts left
out where the tile unit runs, and refuses elsewhere; bad flags are one line and exit 2. Timings
themselves are not asserted."""

import re

from conftest import assert_user_error, run_script
from mtp_jax import kernels


# Widths with rows left over past the kernel's blocks and chunks and a tail past its last full
# vector, so the check of every output covers those paths.
SHAPE = ['--width', '72', '--kv_width', '30', '--ffn', '100', '--layers', '2']


def test_row_kernel_times_a_baseline_beside_the_kernel(tmp_path):
  old = tmp_path / 'old.cc'  # another version of the kernel: here the same source
  old.write_text(open(kernels.SOURCE).read())
  proc = run_script('experiments/row_kernel.py', '--rows', '1,5', *SHAPE, '--rounds', '2',
                    f'--baseline={old}', '--cached', timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0] == "8 products, 0 MB of float32 weights (one layer's 0.1 MB, reused)"
  assert [p.split(':')[0].strip() for p in lines[1].split('|')[1:]] == ['kernel', 'baseline',
                                                                        'xla']
  assert [line.split('|')[0].strip() for line in lines[2:]] == ['1', '5']
  for line in lines[2:]:
    cells = line.split('|')
    assert len(cells) == 4
    for cell in cells[1:]:  # ms, GFLOP/s, GB/s, x first
      assert len(re.findall(r'\d+\.\d+', cell)) == 4, line


def test_row_kernel_decomposes_the_scaled_products():
  """Where the tile unit runs, --decompose times the scaled products built with parts left out
  (the script exits 1 if such a build still gives the right sums, so the switch is checked);
  elsewhere it is one error line."""
  args = ['--rows', '1,3', '--width', '64', '--kv_width', '32', '--ffn', '96', '--layers', '1',
          '--rounds', '1', '--cached', '--decompose']
  proc = run_script('experiments/row_kernel.py', *args, timeout=600)
  if not kernels.tiles_usable():
    assert_user_error(proc, '--decompose', 'does not have')
    return
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert [p.split(':')[0].strip() for p in lines[1].split('|')[1:]] == [
      'kernel', 'tiled', 'scaled', 'no scaling', 'products only', 'xla']
  assert [line.split('|')[0].strip() for line in lines[2:]] == ['1', '3']
  # shapes that are not whole tiles: refused before anything is built
  assert_user_error(run_script('experiments/row_kernel.py', *args[:2], *SHAPE, '--decompose'),
                    '--decompose needs whole tiles')


def test_row_kernel_refuses_bad_flags(tmp_path):
  for args, words in ((['--rows', '1,x'], ['--rows', 'positive']),
                      (['--rounds', '0'], ['--rounds=0', 'not a positive integer']),
                      ([f'--baseline={tmp_path / "missing.cc"}'], ['--baseline', 'no such file'])):
    assert_user_error(run_script('experiments/row_kernel.py', *args), *words)
  broken = tmp_path / 'broken.cc'
  broken.write_text('this is not C++\n')
  assert_user_error(run_script('experiments/row_kernel.py', '--layers', '1', '--width', '32',
                               '--kv_width', '16', '--ffn', '32', f'--baseline={broken}'),
                    '--baseline', 'does not build')


def test_row_kernel_refuses_a_baseline_that_computes_something_else(tmp_path):
  """The check of every output catches a kernel version whose rows past the first block are
  wrong (each product's row 0, all the timed chain reads, stays right)."""
  source = open(kernels.SOURCE).read()
  store = 'y[m * N + n + r * blocks] = s;'
  assert source.count(store) == 1
  wrong = tmp_path / 'wrong.cc'
  wrong.write_text(source.replace(store, 'y[m * N + n + r * blocks] = n + r * blocks ? 2 * s : s;'))
  proc = run_script('experiments/row_kernel.py', '--rows', '3', *SHAPE, '--rounds', '1',
                    f'--baseline={wrong}', timeout=600)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert re.fullmatch(r"error: the baseline path's 3 x \d+ by \d+ product differs from XLA's "
                      r'dot by up to \S+', proc.stderr.strip().splitlines()[-1]), proc.stderr
