"""Two processes on 127.0.0.1, one CPU device each, joined by jax.distributed (Gloo collectives)
and started with launch.py's command line (through tests/multiprocess_driver.py, which records
who opens a TensorBoard writer): they train as one process does on the same global batches, only
process 0 writes TensorBoard, and their checkpoint restores in a single process."""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import (REPO, cpu_env, flat, heads_config_file, launch_summary, raw_steps, restore,
                      scalars, text_config)
from mtp_jax import train
from mtp_jax.config import apply_overrides, as_flags
from mtp_jax.features import is_valid_row

DRIVER = os.path.join(REPO, 'tests', 'multiprocess_driver.py')
TIMEOUT_S = 300


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def pair_commands(config, workdir: str, config_file: str = 'configs/base.py'
                  ) -> list[list[str]]:
  """launch.py's command line (through DRIVER) for each of two processes joined on 127.0.0.1:
  `config_file` with every field of `config` as a flag, or with no other flags (None)."""
  address = f'127.0.0.1:{free_port()}'
  commands = []
  for i in range(2):
    joined = {'distributed.coordinator_address': address, 'distributed.num_processes': 2,
              'distributed.process_id': i}
    flags = (as_flags(apply_overrides(config, joined)) if config is not None
             else [f'--config.{k}={v}' for k, v in joined.items()])
    commands.append([sys.executable, DRIVER, '--config', config_file, '--workdir', workdir,
                     *flags])
  return commands


def run_processes(commands, logdir: str, **extra_env) -> list[str]:
  """Runs the commands together; returns their stdouts. One failing, or TIMEOUT_S passing,
  kills the rest (a lone process would wait for its peer until JAX's own timeouts)."""
  env = cpu_env(devices=1, **extra_env)
  procs = []
  try:
    for i, command in enumerate(commands):
      with open(os.path.join(logdir, f'{i}.out'), 'w') as out, \
           open(os.path.join(logdir, f'{i}.err'), 'w') as err:
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err))
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in procs):
      failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
      assert not failed and time.monotonic() < deadline, (
          f'process {failed} failed' if failed else f'timed out after {TIMEOUT_S}s')
      time.sleep(0.2)
  except AssertionError as e:
    tails = [open(os.path.join(logdir, f'{i}.err')).read()[-2000:] for i in range(len(commands))]
    raise AssertionError(f'{e}; stderr tails:\n' + '\n---\n'.join(tails)) from None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, p in enumerate(procs):
    assert p.returncode == 0, open(os.path.join(logdir, f'{i}.err')).read()[-3000:]
  return [open(os.path.join(logdir, f'{i}.out')).read() for i in range(len(commands))]


def test_two_processes_train_as_one_and_restore_in_one(tmp_path):
  # The evaluation after training is a second mode of the same processes, an export a third.
  # The params are split over the two processes (FSDP), so neither holds them all.
  config = text_config(run_after_train='eval', **{'mesh.data': 1, 'mesh.fsdp': 2})
  pair, one = str(tmp_path / 'pair'), str(tmp_path / 'one')
  stdouts = run_processes([c + ['--mode=train,export'] for c in pair_commands(config, pair)],
                          str(tmp_path))
  first, second = (launch_summary(out, 0) for out in stdouts)  # the training's
  assert first == second and first['step'] == config.train.steps
  # process 0 alone wrote the export, whole
  assert ['written to' in out for out in stdouts] == [True, False]
  assert 'export' in os.listdir(pair) and not [n for n in os.listdir(pair) if '.writing-' in n]

  # One process, one device, the same global batches: each of the pair read only its half.
  single = apply_overrides(config, {'mesh.data': -1, 'mesh.fsdp': 1})
  alone = train.train(single, one)
  for name, value in alone['eval'].items():
    np.testing.assert_allclose(first['eval'][name], value, rtol=1e-5, err_msg=name)
  curve, reference = scalars(pair)['train/loss/total'], scalars(one)['train/loss/total']
  assert [s for s, _ in curve] == [s for s, _ in reference] == [1, 2, 3, 4]
  np.testing.assert_allclose([v for _, v in curve], [v for _, v in reference], rtol=1e-5)
  # Only process 0 opened a writer, and the events hold each step once.
  assert sorted(f for f in os.listdir(pair) if f.startswith('tb_opened_by')) == [
      'tb_opened_by_process_0']
  assert raw_steps(pair, 'train/loss/total') == [1, 2, 3, 4]

  # The pair's checkpoint restores here, in one process, to the one-process run's state.
  session, restored = restore(single, pair)
  assert int(restored['step']) == config.train.steps
  _, want = restore(single, one)
  got, want = flat(restored), flat(want)
  assert sorted(got) == sorted(want)
  # Adam divides by sqrt(v): a gradient entry near zero, summed in another order across the
  # two processes, can move its parameter by a visible fraction of lr, so the bound is in lr.
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=0.05 * config.train.lr,
                               err_msg=name)
  # The export holds the whole trunk, gathered from both processes' halves.
  exported = load_file(os.path.join(pair, 'export', 'model.safetensors'))
  np.testing.assert_array_equal(exported['model.embed_tokens.weight'],
                                np.asarray(restored['params']['params']['embedding']))
  # Evaluated here, the restored params give the pair's own final evaluation.
  evaluated = session.evaluate(restored['params'])
  for name, value in first['eval'].items():
    np.testing.assert_allclose(evaluated[name], value, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize('signalled,stopped', [(3, 4), (8, 8)])
def test_a_signal_to_one_process_stops_both_at_the_same_checkpoint(tmp_path, signalled, stopped):
  """SIGTERM reaches process 1 alone during a step: both processes stop after the next one (they
  agree one step late), or after the last, and save it together (one saving while the other ran
  on would leave both waiting)."""
  config = text_config(**{'train.steps': 8, 'train.checkpoint_every': 8, 'train.eval_every': 8,
                          'run_after_train': 'eval'})
  pair = str(tmp_path / 'pair')
  first, second = map(launch_summary, run_processes(
      pair_commands(config, pair), str(tmp_path), MTP_TEST_SIGTERM=f'1:{signalled}'))
  assert (first['step'], second['step']) == (stopped, stopped)
  assert second['stopped_by'] == 'SIGTERM' and first['stopped_by'] == 'a signal to another process'
  session, restored = restore(config, pair)
  assert int(restored['step']) == stopped


def test_two_processes_share_the_data_the_trunk_writes(tmp_path):
  """data.sources=self with cached features: process 0 writes the chats and their features while
  process 1 waits for the finished cache; then both train their heads on it as one run."""
  pair = str(tmp_path / 'pair')
  stdouts = run_processes(pair_commands(None, pair, heads_config_file(tmp_path)), str(tmp_path))
  first, second = map(launch_summary, stdouts)
  assert first == second and first['step'] == 2
  caches = os.listdir(os.path.join(pair, 'data', 'features'))
  assert len(caches) == 1
  assert sorted(os.listdir(os.path.join(pair, 'data', 'features', caches[0]))) == sorted(
      ['meta.json', 'spec.json', *(f'{s}.{n}' for s in ('train', 'valid')
                                   for n in ('tokens', 'row_start', 'h0', 'top_ids',
                                             'top_logp'))])
  # process 0 wrote the chats; process 1 only read them
  assert 'data: trunk writes chats' in open(os.path.join(str(tmp_path), '0.err')).read()
  assert 'data: trunk writes chats' not in open(os.path.join(str(tmp_path), '1.err')).read()


def test_a_cache_process_0_cannot_build_ends_the_others_with_its_reason(tmp_path):
  """No row held out: process 0's build fails, and process 1, waiting for the cache, stops
  with process 0's one-line reason instead of waiting on. The check before any chat is written
  counts shards of chats as if every chat were shortest: two shards for 500 positions, and the
  second holds a held-out row at valid_fraction 0.03; the trunk's chats fill the 500 positions
  within the first shard, which holds none."""
  assert [sum(is_valid_row(f'0:{i}:{b}', 0.03) for b in range(16)) for i in (0, 1)] == [0, 1]
  config = heads_config_file(tmp_path, **{'data.self_tokens': 500, 'data.valid_fraction': 0.03})
  commands = pair_commands(None, str(tmp_path / 'pair'), config)
  procs = [subprocess.Popen(c, cwd=REPO, env=cpu_env(devices=1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for c in commands]
  try:
    results = [p.communicate(timeout=TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [2, 2], [r[1][-2000:] for r in results]
  assert results[0][1].strip().splitlines()[-1].startswith('error: the valid split of')
  assert results[1][1].strip().splitlines()[-1].startswith('error: process 0 could not build')
  assert 'the valid split of' in results[1][1].strip().splitlines()[-1]
