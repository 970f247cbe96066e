"""experiments/tile_split.py on the real SmolLM2 file: every matrix of its 4-bit blocks splits
exactly into two bfloat16 numbers and is in ScaledTiles' affine form (Q4_1's), so the tile unit
takes the whole trunk but the embedding; the Q8_0 embedding splits almost all of it, and all of
it is in the scaled form; and a config without a pretrained trunk is one line."""

from conftest import run_script


def test_smollm2s_block_matrices_split_into_two_bfloat16_numbers():
  proc = run_script('experiments/tile_split.py', '--config', 'configs/smollm2.py', timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert lines[-1] == 'output matrix as scaled tiles (kernels.ScaledTiles): True'
  rows = {line.split()[0]: line.split() for line in lines[2:-1]}
  assert set(rows) == {'embedding', 'q', 'k', 'v', 'o', 'gate', 'up', 'down'}
  for kind in ('q', 'k', 'v', 'o', 'gate', 'up', 'down'):
    count, _, share, every, gap, form = rows[kind][1:]
    assert (count, share, every, float(gap), form) == ('30', '1.00000', 'True', 0.0, 'affine')
  share, every, gap, form = rows['embedding'][3:]
  assert 0.98 < float(share) < 1 and every == 'False' and 0 < float(gap) < 1e-4
  assert form == 'scale'


def test_a_config_without_a_pretrained_trunk_is_one_line():
  proc = run_script('experiments/tile_split.py', '--config', 'configs/quickstart.py', timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == ('error: the config has no pretrained trunk '
                                                  '(model.init_from)')
