"""SPMD training on 8 CPU devices gives the one-device run: the same steps on the meshes
(8,1,1), (2,4,1) and (2,2,2) (data, fsdp, tensor) give the same losses and params, params are laid
out as the RULES say, checkpoints move between meshes, and speculative decoding on the mesh emits
the one-device tokens. The 8-device runs happen in a subprocess (tests/sharded_check.py); the
one-device references here."""

import importlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import sharded_check
from conftest import cpu_env, flat, model_param_counts, restore, scalars, tiny_config
from mtp_jax import sharding, train
from mtp_jax.config import ConfigError, ModelConfig, validate
from mtp_jax.model import init_params

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sharded_check.py')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(root, one-device summary, the helper's JSON), after the one-device run and the 8-device
  subprocess have trained the same config."""
  root = str(tmp_path_factory.mktemp('sharding'))
  one = os.path.join(root, 'one')
  summary = train.train(sharded_check.run_config(root), one)
  env = cpu_env(devices=8)
  proc = subprocess.run([sys.executable, HELPER, root, os.path.join(one, 'tokenizer.json')],
                        env=env, capture_output=True, text=True, timeout=600,
                        cwd=os.path.dirname(HELPER))
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(root, 'sharded.json')) as f:
    return root, summary, json.load(f)


def restore_on_one_device(root, directory):
  return restore(sharded_check.run_config(root), directory)


@pytest.mark.parametrize('mesh', sharded_check.MESHES, ids=lambda m: 'x'.join(map(str, m)))
def test_training_on_a_mesh_matches_one_device(runs, mesh):
  root, summary, result = runs
  directory = sharded_check.workdir(root, mesh)
  curve = scalars(directory)['train/loss/total']
  reference = scalars(os.path.join(root, 'one'))['train/loss/total']
  assert [s for s, _ in curve] == [s for s, _ in reference] == [1, 2, 3, 4]
  np.testing.assert_allclose([v for _, v in curve], [v for _, v in reference], rtol=1e-5)
  got_eval = result['eval']['x'.join(map(str, mesh))]
  assert sorted(got_eval) == sorted(summary['eval'])
  for name, value in summary['eval'].items():
    np.testing.assert_allclose(got_eval[name], value, rtol=1e-5, err_msg=name)

  session, want = restore_on_one_device(root, os.path.join(root, 'one'))
  _, got = restore_on_one_device(root, directory)
  want, got = flat(want), flat(got)
  assert sorted(got) == sorted(want)
  # Adam divides by sqrt(v), which magnifies the rounding differences of tiny gradients: an
  # entry near zero, summed in another order, can move by a visible fraction of lr. The bound
  # is 5% of lr, while the steps changed the params by far more (checked below).
  lr = session.config.train.lr
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=0.05 * lr, err_msg=name)
  init = flat({'params': init_params(session.cfg, jax.random.key(0))})
  assert max(np.max(np.abs(want[n] - init[n])) for n in init) > 1e-3


def test_gradient_accumulation_moves_no_rows_between_devices(runs):
  """On a data-parallel mesh each device holds rows of every micro-batch: the train step's only
  collectives are all-reduces (micro-batches of consecutive rows were gathered and permuted)."""
  _, _, result = runs
  counts = result['grad_accum_collectives']
  assert counts['all-reduce'] > 0, counts  # the count finds collectives: the gradients' sums
  assert {op: n for op, n in counts.items() if op != 'all-reduce'} == {
      'all-gather': 0, 'all-to-all': 0, 'collective-permute': 0, 'reduce-scatter': 0}, counts


def test_params_are_laid_out_by_the_rules(runs):
  _, _, result = runs
  layout = result['layout']  # on (data, fsdp, tensor) = (2, 2, 2)
  params = "['params']['params']"
  expected = {  # name: (spec, one device's shard) for D=32, H=4, K=2, E=8, F=128, V=300
      "['embedding']": (str(P('tensor', 'fsdp')), [150, 16]),
      "['blocks_0']['mlp']['gate']": (str(P('fsdp', 'tensor')), [16, 64]),
      "['blocks_1']['mlp']['down']": (str(P('tensor', 'fsdp')), [64, 16]),
      "['blocks_0']['attn']['q']": (str(P('fsdp', 'tensor', None)), [16, 2, 8]),
      "['blocks_0']['attn']['k']": (str(P('fsdp', 'tensor', None)), [16, 1, 8]),
      "['blocks_0']['attn']['o']": (str(P('tensor', None, 'fsdp')), [2, 8, 16]),
      "['mtp_0']['eh_proj']": (str(P(None, 'fsdp')), [64, 16]),
      "['final_norm']['scale']": (str(P(None)), [32]),
  }
  for name, (spec, shard) in expected.items():
    assert layout[params + name] == [spec, shard], name
  # Adam's moments are laid out like their params.
  for moment in ('.mu[', '.nu['):
    found = [v for k, v in layout.items()
             if moment in k and k.endswith("['blocks_0']['mlp']['gate']")]
    assert found == [[str(P('fsdp', 'tensor')), [16, 64]]], (moment, found)
  assert layout["['step']"] == [str(P()), []]
  # The Session names the field a mesh fails to divide before it compiles.
  assert result['rejected'] == ('model.num_kv_heads = 2 is not divisible by mesh.tensor = 4, '
                                'the mesh axes that shard it')
  # ... and a training batch it does not split only where the mode trains or evaluates.
  odd = ('train.batch_size / train.grad_accum = 4 is not divisible by mesh.data * mesh.fsdp = 8, '
         'the mesh axes that shard it')
  assert result['odd_batch'] == {'': odd, 'eval': odd, 'generate': None, 'export': None}


def test_checkpoint_restores_onto_another_mesh(runs):
  root, _, result = runs
  moved = result['cross_mesh']
  assert moved['bitwise_equal']
  assert moved['layout'] == result['layout']  # laid out for (2,2,2), not as saved on (2,4,1)
  _, on_one = restore_on_one_device(root, sharded_check.workdir(root, sharded_check.SAVED_ON))
  on_one = flat(on_one)
  with np.load(os.path.join(root, 'restored_on_2x2x2.npz')) as on_mesh:
    assert sorted(on_mesh.files) == sorted(on_one)
    for name, value in on_one.items():
      assert on_mesh[name].dtype == value.dtype and on_mesh[name].tobytes() == value.tobytes(), name


def test_speculative_decoding_on_the_mesh_matches_one_device(runs):
  root, _, result = runs
  assert result['decode']['prompt_spec'] == str(P(('data', 'fsdp'),))
  session, state = restore_on_one_device(
      root, sharded_check.workdir(root, sharded_check.RESTORED_ON))
  tokens, _ = sharded_check.greedy_decode(session, state['params'],
                                          sharded_check.prompts(session))
  assert [len(t) for t in tokens] == [sharded_check.GREEDY.max_new_tokens] * 8
  assert result['decode']['tokens'] == tokens
  assert result['decode']['replicated_prompts_tokens'] == tokens
  assert result['decode']['tree_tokens'] == tokens  # a draft tree on the mesh, rows repeated


@pytest.mark.parametrize('overrides, devices, processes, message', [
    ({'mesh.tensor': 8}, 8, 1, 'model.num_heads = 4 is not divisible by mesh.tensor = 8'),
    ({'mesh.tensor': 4}, 8, 1, 'model.num_kv_heads = 2 is not divisible by mesh.tensor = 4'),
    ({'mesh.tensor': 2, 'model.mlp_dim': 99}, 2, 1,
     'model.mlp_dim = 99 is not divisible by mesh.tensor = 2'),
    ({'mesh.tensor': 2, 'mtp.head_mlp_dim': 35}, 2, 1,
     'mtp.head_mlp_dim = 35 is not divisible by mesh.tensor = 2'),
    ({'mesh.tensor': 3, 'mtp.kind': 'medusa', 'model.num_heads': 3, 'model.num_kv_heads': 3,
      'model.mlp_dim': 96, 'data.vocab_size': 99, 'model.d_model': 40}, 3, 1,
     r'model.d_model \(medusa heads\) = 40 is not divisible by mesh.tensor = 3'),
    ({'mesh.tensor': 2, 'data.vocab_size': 97}, 2, 1,
     'data.vocab_size = 97 is not divisible by mesh.tensor = 2'),
    ({'mesh.fsdp': 3, 'train.batch_size': 6}, 3, 1,
     'model.d_model = 32 is not divisible by mesh.fsdp = 3'),
    ({'mesh.data': 8, 'train.batch_size': 4}, 8, 1,
     r'train.batch_size / train.grad_accum = 4 is not divisible by mesh.data \* mesh.fsdp = 8'),
    ({'mesh.tensor': 2}, 2, 2, 'mesh.data \\* mesh.fsdp = 1 must be a multiple of the 2 processes'),
])
def test_check_mesh_names_the_field(overrides, devices, processes, message):
  with pytest.raises(ConfigError, match='^' + message):
    sharding.check_mesh(tiny_config(**overrides), devices, processes)


def test_check_mesh_accepts_meshes_that_divide():
  for data, fsdp, tensor in sharded_check.MESHES + ((1, 4, 2), (1, 1, 2)):
    config = tiny_config(**{'mesh.data': data, 'mesh.fsdp': fsdp, 'mesh.tensor': tensor,
                            'train.batch_size': 8})
    sharding.check_mesh(config, data * fsdp * tensor)
  sharding.check_mesh(tiny_config(**{'train.batch_size': 8}), 8, 2)
  # The batch splits over data * fsdp only: 4 rows on (data 4, tensor 2) of 8 devices is fine.
  config = tiny_config(**{'mesh.tensor': 2, 'train.batch_size': 4})
  validate(config)
  sharding.check_mesh(config, 8)


def test_a_model_past_its_devices_memory_is_one_config_error():
  """A size typed wrong is said before anything is made: the float32 weights (and a training
  batch's token windows) against the devices' memory together."""
  config = tiny_config(**{'train.batch_size': 8})
  cfg = ModelConfig.from_config(config)
  weights = 4 * model_param_counts(cfg)['total']
  windows = 4 * 8 * (config.train.seq_len + cfg.mtp_depth + 1)
  sharding.check_memory(config, available=weights + windows)
  sharding.check_memory(config, batch=False, available=weights)
  with pytest.raises(ConfigError, match=r'^the model needs at least .* GiB \(.* parameters and a '
                     r'batch of train.batch_size=8 token windows, in float32\), more than the .* '
                     r'GiB of memory of its devices; check the sizes in model.\* and mtp.\* and '
                     r'train.batch_size$'):
    sharding.check_memory(config, available=weights + windows - 1)
  with pytest.raises(ConfigError, match=r'parameters, in float32\), more than .* in model.\* and '
                                        r'mtp.\*$'):
    sharding.check_memory(config, batch=False, available=weights - 1)
  # this machine's own memory: the tiny model fits, one 2**30 wide does not
  assert sharding.devices_memory() > 0
  sharding.check_memory(config)
  with pytest.raises(ConfigError, match='the model needs at least'):
    sharding.check_memory(tiny_config(**{'model.d_model': 2**30}))


@pytest.mark.parametrize('name, devices, processes, params', [
    ('gpu_125m', 1, 1, 118.4e6), ('gpu_1b', 8, 1, 1050.0e6), ('gpu_1b', 16, 2, 1050.0e6)])
def test_gpu_configs_fit_their_meshes_and_documented_size(name, devices, processes, params):
  config = importlib.import_module(f'configs.{name}').get_config()
  validate(config)
  sharding.check_mesh(config, devices, processes)
  total = model_param_counts(ModelConfig.from_config(config))['total']
  assert total == pytest.approx(params, rel=1e-3)


def test_activation_constraints_are_in_force_under_the_mesh():
  """sharding.active makes the mesh the abstract mesh that nn.with_logical_constraint reads, so
  the model's activation constraints reach the compiled program (under `with mesh:` alone they
  silently vanish)."""
  from mtp_jax.loss import LossSpec, combined_loss
  cfg = ModelConfig.from_config(tiny_config())
  params = init_params(cfg, jax.random.key(0))
  tokens = np.zeros((4, 16 + cfg.mtp_depth + 1), np.int32)
  mesh = sharding.make_mesh(tiny_config().mesh)
  step = jax.jit(lambda p, t: combined_loss(p, t, LossSpec(cfg), 0.3)[0])
  with sharding.active(mesh):
    text = step.lower(params, tokens).as_text()
  # The MLP's hidden activations: batch over (data, fsdp), width over tensor.
  assert '[{"data", "fsdp"}, {}, {"tensor"}]' in text
