"""Tests of mtp_jax.checkpoint against the real Orbax: bitwise round trips, retention, and
resuming past damaged or unfinished checkpoints."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import assert_bitwise_equal
from mtp_jax import checkpoint
from mtp_jax.checkpoint import CheckpointError, Checkpointer

# Restoring a damaged checkpoint leaves some of Orbax's concurrent reads unfinished when its
# event loop closes; Python reports them, at garbage collection, against whichever test runs then.
pytestmark = [
    pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
    pytest.mark.filterwarnings('ignore:coroutine .* was never awaited:RuntimeWarning'),
]


def _state(seed: int):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {
      'params': {
          'w': jax.random.normal(k1, (64, 64), jnp.float32),
          'emb': jax.random.normal(k2, (16, 8), jnp.bfloat16),
      },
      'opt_state': {'count': jnp.asarray([seed, 3], jnp.int32),
                    'mu': jax.random.normal(k3, (64,), jnp.float32)},
      'step': jnp.asarray(seed, jnp.int32),
  }


def _target(state):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def _save_steps(workdir, steps, keep=3):
  ckpt = Checkpointer(workdir, keep=keep)
  for step in steps:
    ckpt.save(step, _state(step), {'data_position': 10 * step})
  ckpt.wait()
  ckpt.close()


def test_round_trip_is_bitwise_and_onto_the_target_sharding(tmp_path):
  state = _state(7)
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(7, state, {'data_position': 1234, 'loss': 2.5})
  ckpt.wait()
  ckpt.close()

  sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ('x',)), P())
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
  ckpt = Checkpointer(str(tmp_path))
  restored, meta = ckpt.restore(None, target)
  assert_bitwise_equal(restored, state)
  assert all(x.sharding == sharding for x in jax.tree.leaves(restored))
  assert meta == {'data_position': 1234, 'loss': 2.5}
  ckpt.close()


def test_save_copies_the_arrays_before_returning(tmp_path):
  # The train step donates the state, so its buffers may be gone while the save still writes.
  state = _state(1)
  want = jax.tree.map(np.asarray, state)
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(1, state)
  jax.tree.map(lambda x: x.delete(), state)
  ckpt.wait()
  restored, meta = ckpt.restore(1, _target(want))
  assert_bitwise_equal(restored, want)
  assert meta == {}
  ckpt.close()


def test_steps_and_keep(tmp_path):
  ckpt = Checkpointer(str(tmp_path))
  assert ckpt.latest_step() is None and ckpt.all_steps() == []
  assert ckpt.restore_latest_valid(_target(_state(0))) == (None, None, {})
  with pytest.raises(CheckpointError):
    ckpt.restore(None, _target(_state(0)))
  ckpt.close()

  _save_steps(str(tmp_path), [1, 2, 3], keep=2)
  ckpt = Checkpointer(str(tmp_path), keep=2)
  assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
  assert sorted(os.listdir(ckpt.directory)) == ['2', '3']
  ckpt.close()


def _truncate_data(step_dir):
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, 'state'))
           if os.path.basename(root) == 'd' for name in names]
  assert files
  for path in files:
    os.truncate(path, os.path.getsize(path) // 2)


def _delete_largest_file(step_dir):
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, 'state'))
           for name in names]
  os.remove(max(files, key=os.path.getsize))


@pytest.mark.parametrize('damage', [_truncate_data, _delete_largest_file])
def test_damaged_latest_falls_back_to_previous(tmp_path, capsys, damage):
  _save_steps(str(tmp_path), [1, 2])
  ckpt = Checkpointer(str(tmp_path))
  damage(os.path.join(ckpt.directory, '2'))

  step, state, meta = ckpt.restore_latest_valid(_target(_state(0)))
  assert step == 1 and meta == {'data_position': 10}
  assert_bitwise_equal(state, _state(1))
  lines = [l for l in capsys.readouterr().err.splitlines() if 'damaged' in l]
  assert len(lines) == 1
  assert lines[0].startswith('checkpoint step 2 is damaged (')
  assert lines[0].endswith('); falling back to step 1')

  # The damaged step is set aside, so the resumed run can save step 2 again.
  assert ckpt.all_steps() == [1]
  assert os.path.isdir(os.path.join(ckpt.directory, '2.damaged'))
  ckpt.save(2, _state(22))
  ckpt.wait()
  assert_bitwise_equal(ckpt.restore(2, _target(_state(0)))[0], _state(22))
  # damaged again: set aside beside the first, which stays
  damage(os.path.join(ckpt.directory, '2'))
  assert ckpt.restore_latest_valid(_target(_state(0)))[0] == 1
  assert sorted(n for n in os.listdir(ckpt.directory) if n.startswith('2')) == [
      '2.damaged', '2.damaged.1']
  ckpt.close()


def test_a_read_only_restore_falls_back_and_leaves_the_damaged_step(tmp_path, capsys):
  """eval and decoding (set_aside=False) may read a workdir another process trains in: they use
  the previous step and report the damaged one, and rename nothing."""
  _save_steps(str(tmp_path), [1, 2])
  ckpt = Checkpointer(str(tmp_path))
  _truncate_data(os.path.join(ckpt.directory, '2'))
  step, state, _ = ckpt.restore_latest_valid(_target(_state(0)), set_aside=False)
  assert step == 1
  assert_bitwise_equal(state, _state(1))
  assert 'checkpoint step 2 is damaged (' in capsys.readouterr().err
  assert sorted(os.listdir(ckpt.directory)) == ['1', '2']
  ckpt.close()


def test_all_damaged_raises(tmp_path):
  _save_steps(str(tmp_path), [1, 2])
  ckpt = Checkpointer(str(tmp_path))
  for step in ('1', '2'):
    _truncate_data(os.path.join(ckpt.directory, step))
  with pytest.raises(CheckpointError, match='every checkpoint'):
    ckpt.restore_latest_valid(_target(_state(0)))
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


def test_unfinished_save_is_ignored(tmp_path, capsys):
  _save_steps(str(tmp_path), [1, 2])
  # What a kill -9 during the save of step 2 leaves: Orbax renames STEP.orbax-checkpoint-tmp
  # to STEP only once every file is written.
  directory = os.path.join(tmp_path, 'checkpoints')
  os.rename(os.path.join(directory, '2'), os.path.join(directory, '2' + ocp.utils.TMP_DIR_SUFFIX))
  _delete_largest_file(os.path.join(directory, '2' + ocp.utils.TMP_DIR_SUFFIX))

  ckpt = Checkpointer(str(tmp_path))
  assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
  step, state, _ = ckpt.restore_latest_valid(_target(_state(0)))
  assert step == 1
  assert_bitwise_equal(state, _state(1))
  assert 'ignoring incomplete checkpoint 2.orbax-checkpoint-tmp' in capsys.readouterr().err

  ckpt.save(2, _state(22))
  ckpt.wait()
  assert sorted(os.listdir(directory)) == ['1', '2']
  ckpt.close()


def _config(d_model=128, depth=1, steps=100):
  return ml_collections.ConfigDict({
      'model': {'d_model': d_model, 'num_layers': 2, 'dtype': 'float32', 'max_seq_len': 512},
      'mtp': {'kind': 'sequential', 'depth': depth, 'loss_weight': 0.3},
      'data': {'vocab_size': 2048},
      'train': {'steps': steps, 'lr': 3e-3, 'mask_rows': True},
  })


def test_save_and_load_config(tmp_path):
  assert checkpoint.load_config(str(tmp_path)) is None
  checkpoint.save_config(str(tmp_path), _config())
  assert checkpoint.load_config(str(tmp_path)) == _config().to_dict()
  assert os.listdir(tmp_path) == ['config.json']


def test_changed_settings_name_what_a_resume_changes(tmp_path):
  checkpoint.save_config(str(tmp_path), _config())
  saved = checkpoint.load_config(str(tmp_path))
  assert checkpoint.changed_settings(saved, _config()) == []
  other = _config(steps=5000)
  other.train.lr *= 3
  other.model.dtype = 'bfloat16'  # how the same parameters are computed: a setting too
  assert checkpoint.changed_settings(saved, other) == [
      'model.dtype: "float32" -> "bfloat16"', f'train.lr: {saved["train"]["lr"]} -> '
      f'{other.train.lr}', f'train.steps: {saved["train"]["steps"]} -> 5000']
  # A config.json written before a field existed: the resumed run now uses the field's value.
  del saved['train']['mask_rows']
  assert checkpoint.changed_settings(saved, _config()) == ['train.mask_rows: absent -> true']
  # Model-defining fields are check_compatible's, not settings.
  assert checkpoint.changed_settings(saved, _config(d_model=256)) == [
      'train.mask_rows: absent -> true']


def test_check_compatible(tmp_path):
  checkpoint.save_config(str(tmp_path), _config())
  saved = checkpoint.load_config(str(tmp_path))
  checkpoint.check_compatible(saved, _config(steps=5000))
  other = _config()
  other.model.dtype, other.model.attention = 'bfloat16', 'fused'  # same parameters
  other.model.max_seq_len *= 2  # a rotary table over more positions: the same parameters too
  checkpoint.check_compatible(saved, other)
  # A config.json from before mtp.head_mlp_dim existed holds the default-width heads.
  other = _config()
  other.mtp.head_mlp_dim = 0
  checkpoint.check_compatible(saved, other)
  other.mtp.head_mlp_dim = 64
  with pytest.raises(CheckpointError, match='mtp.head_mlp_dim: 0 -> 64'):
    checkpoint.check_compatible(saved, other)
  # A width of 0 is the width it picks: 8/3 * d_model rounded up to 64, the trunk's for the heads.
  saved_zero = {**saved, 'model': {**saved['model'], 'mlp_dim': 0}}
  other = _config()
  other.model.mlp_dim, other.mtp.head_mlp_dim = 384, 384
  checkpoint.check_compatible(saved_zero, other)
  other.mtp.head_mlp_dim = 448
  with pytest.raises(CheckpointError, match='mtp.head_mlp_dim: 384 -> 448'):
    checkpoint.check_compatible(saved_zero, other)
  other = _config()
  other.mtp.head_blocks = 2
  with pytest.raises(CheckpointError, match='mtp.head_blocks: 1 -> 2'):
    checkpoint.check_compatible(saved, other)
  with pytest.raises(CheckpointError) as error:
    checkpoint.check_compatible(saved, _config(d_model=256, depth=2, steps=5000))
  assert str(error.value) == ('workdir holds a checkpoint of a different model: '
                              'model.d_model: 128 -> 256, mtp.depth: 1 -> 2')
