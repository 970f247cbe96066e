"""The train step and loop on a tiny model: learning, gradient accumulation, bitwise resume,
TensorBoard logs, non-finite steps and evaluation, with the real Orbax and TensorBoard files."""

import functools
import glob
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

from conftest import tiny_config
from mtp_jax import checkpoint as ckpt_lib
from mtp_jax import sharding, train
from mtp_jax.config import ModelConfig
from mtp_jax.model import init_params


def run_config(corpus, **overrides):
  """tiny_config on the real-text corpus; 300 tokens leaves room for 43 BPE merges."""
  return tiny_config(**{'data.sources': corpus, 'data.vocab_size': 300, **overrides})


def fresh_state(config, tx):
  params = init_params(ModelConfig.from_config(config), jax.random.key(0))
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}


def compiled_step(config, tx, grad_accum=1):
  sc = train.StepConfig(ModelConfig.from_config(config), grad_accum, config.mtp.loss_weight,
                        config.mtp.loss_weight_schedule)
  return jax.jit(functools.partial(train.train_step, tx=tx, sc=sc))


def random_batch(config, seed=1):
  window = config.train.seq_len + config.mtp.depth + 1
  return jax.random.randint(jax.random.key(seed), (config.train.batch_size, window), 0,
                            config.data.vocab_size)


def restore(config, workdir, step=None):
  """(step, state) of a checkpoint in workdir, restored onto the run's own abstract state."""
  session = train.Session(config, workdir)
  try:
    if step is None:
      step = session.checkpointer.latest_step()
    state, _ = session.checkpointer.restore(step, session.abstract_state)
  finally:
    session.checkpointer.close()
  return step, state


def checkpoint_steps(workdir):
  ckpt = ckpt_lib.Checkpointer(workdir)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def assert_bitwise_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    assert g.dtype == w.dtype and g.shape == w.shape
    assert g.tobytes() == w.tobytes()


def scalars(workdir):
  """{tag: [(step, value), ...]} as TensorBoard shows them (orphaned events purged)."""
  acc = EventAccumulator(os.path.join(workdir, 'tb'), size_guidance={'scalars': 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


def raw_steps(workdir, tag):
  """Every step at which any event file under WORKDIR/tb holds `tag`, duplicates included."""
  steps = []
  for path in sorted(glob.glob(os.path.join(workdir, 'tb', 'events.out.tfevents.*'))):
    for event in LegacyEventFileLoader(path).Load():
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return sorted(steps)


def test_steps_on_one_batch_lower_the_loss():
  config = tiny_config(**{'train.steps': 8, 'train.lr': 1e-2})
  tx = train.make_optimizer(config.train)
  step_fn = compiled_step(config, tx)
  state, batch = fresh_state(config, tx), random_batch(config)
  losses = []
  for _ in range(8):
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics['loss/total']))
  assert int(state['step']) == 8
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.9 * losses[0], losses


def test_grad_accumulation_matches_one_big_batch():
  # Plain SGD makes the update proportional to the gradient (Adam would normalize the
  # difference away), and the schedule of make_optimizer gives its first step lr 0.
  config = tiny_config(**{'train.batch_size': 4})
  tx = optax.sgd(1.0)
  batch = random_batch(config)
  whole, m1 = compiled_step(config, tx, grad_accum=1)(fresh_state(config, tx), batch)
  split, m2 = compiled_step(config, tx, grad_accum=2)(fresh_state(config, tx), batch)
  half, _ = compiled_step(config, tx, grad_accum=1)(fresh_state(config, tx), batch[:2])
  for name in ['loss/total', 'loss/depth_0', 'accuracy/depth_2', 'grad_norm']:
    np.testing.assert_allclose(m2[name], m1[name], rtol=1e-6, err_msg=name)
  for w, s in zip(jax.tree.leaves(whole['params']), jax.tree.leaves(split['params'])):
    np.testing.assert_allclose(s, w, atol=1e-6, rtol=0)
  # The comparison is sensitive: the step moved the params, and half the batch moves them
  # elsewhere by far more than the tolerance.
  moved = max(float(jnp.max(jnp.abs(w - i))) for w, i in zip(
      jax.tree.leaves(whole['params']), jax.tree.leaves(fresh_state(config, tx)['params'])))
  off = max(float(jnp.max(jnp.abs(w - h))) for w, h in zip(
      jax.tree.leaves(whole['params']), jax.tree.leaves(half['params'])))
  assert moved > 1e-3 and off > 1e-4, (moved, off)


def test_resume_after_preemption_is_bitwise(corpus, tmp_path, capfd):
  n = 3
  config = run_config(corpus, **{'train.steps': 2 * n, 'train.checkpoint_every': n,
                                 'train.eval_every': n})
  dir_a, dir_b = str(tmp_path / 'a'), str(tmp_path / 'b')
  straight = train.train(config, dir_a)
  assert straight['step'] == 2 * n and straight['stopped_by'] is None

  def preempt_at_n(session, params, step, writer):
    if step == n:
      os.kill(os.getpid(), signal.SIGTERM)

  first = train.train(config, dir_b, eval_hook=preempt_at_n)
  assert first['step'] == n and first['stopped_by'] == 'SIGTERM'
  assert checkpoint_steps(dir_b) == [n]
  capfd.readouterr()
  resumed = train.train(config, dir_b)
  assert f'resuming from step {n}' in capfd.readouterr().err
  assert resumed['step'] == 2 * n and resumed['stopped_by'] is None
  assert resumed['eval'] == straight['eval']
  assert checkpoint_steps(dir_b) == [n, 2 * n]
  _, state_a = restore(config, dir_a)
  _, state_b = restore(config, dir_b)
  assert int(state_b['step']) == 2 * n
  assert_bitwise_equal(state_b, state_a)
  # The loss curve is the uninterrupted one, each step logged once.
  curve_a, curve_b = scalars(dir_a)['train/loss/total'], scalars(dir_b)['train/loss/total']
  assert [s for s, _ in curve_b] == list(range(1, 2 * n + 1))
  assert curve_b == curve_a

  # The same command again finds the work done: no step runs, no checkpoint is written.
  again = train.train(config, dir_b)
  assert 'already trained to step 6' in capfd.readouterr().err
  assert again['step'] == 2 * n and again['eval'] == straight['eval']
  assert checkpoint_steps(dir_b) == [n, 2 * n]
  assert_bitwise_equal(restore(config, dir_b)[1], state_a)
  assert [s for s, _ in scalars(dir_b)['train/loss/total']] == list(range(1, 2 * n + 1))


def test_tensorboard_scalars_and_purge_after_a_crash(corpus, tmp_path):
  workdir = str(tmp_path / 'run')
  config = run_config(corpus, **{'train.steps': 4, 'train.checkpoint_every': 2,
                                 'train.eval_every': 2, 'train.log_every': 1})
  depth = config.mtp.depth
  train.train(config, workdir)
  logged = scalars(workdir)
  every_step, evals = [1, 2, 3, 4], [2, 4]
  expected = {'train/loss/total': every_step, 'train/lr': every_step,
              'train/grad_norm': every_step, 'train/tokens_per_s': every_step}
  for k in range(depth + 1):
    expected.update({f'train/accuracy/depth_{k}': every_step, f'train/loss/depth_{k}': every_step,
                     f'eval/loss/depth_{k}': evals, f'eval/accuracy/depth_{k}': evals,
                     f'eval/perplexity/depth_{k}': evals})
  for tag, steps in expected.items():
    assert tag in logged, (tag, sorted(logged))
    assert [s for s, _ in logged[tag]] == steps, tag
  schedule = train.lr_schedule(config.train)
  np.testing.assert_allclose([v for _, v in logged['train/lr']],
                             [schedule(s - 1) for s in every_step], rtol=1e-6)
  assert all(v > 0 for _, v in logged['train/tokens_per_s'])
  for k in range(depth + 1):
    losses = np.array([v for _, v in logged[f'eval/loss/depth_{k}']])
    np.testing.assert_allclose([v for _, v in logged[f'eval/perplexity/depth_{k}']],
                               np.exp(losses), rtol=1e-5)
    assert all(0 <= v <= 1 for _, v in logged[f'eval/accuracy/depth_{k}'])

  # A crash after step 2's checkpoint: the run resumes from step 2 and logs steps 3 and 4
  # again; the files hold them twice, TensorBoard shows each step once.
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  assert checkpoint_steps(workdir) == [2]
  train.train(config, workdir)
  assert raw_steps(workdir, 'train/loss/total') == [1, 2, 3, 3, 4, 4]
  logged_again = scalars(workdir)
  for tag, steps in expected.items():
    assert [s for s, _ in logged_again[tag]] == steps, tag
  # The rerun is deterministic, so the surviving values are the same as the first run's.
  assert logged_again['train/loss/total'] == logged['train/loss/total']


def test_nonfinite_loss_stops_at_its_step(corpus, tmp_path):
  workdir = str(tmp_path / 'run')
  config = run_config(corpus, **{'train.inject_nan_step': 3, 'train.nonfinite': 'stop'})
  with pytest.raises(train.TrainingError, match=r'non-finite loss at step 3\b'):
    train.train(config, workdir)
  assert checkpoint_steps(workdir) == [2]
  step, state = restore(config, workdir)
  assert step == 2 and int(state['step']) == 2


def test_nonfinite_loss_skip_leaves_out_that_update(corpus, tmp_path):
  workdir = str(tmp_path / 'run')
  config = run_config(corpus, **{'train.inject_nan_step': 3, 'train.nonfinite': 'skip'})
  summary = train.train(config, workdir)
  assert summary['step'] == 4 and summary['nonfinite_skipped'] == 1
  assert [v for _, v in scalars(workdir)['train/nonfinite']] == [0, 0, 1, 0]
  _, final = restore(config, workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(final['params']))

  # Step 3 changed nothing but the step counter: step 4 applied to step 2's state gives the
  # final state.
  session = train.Session(run_config(corpus), workdir)
  state, _ = session.checkpointer.restore(2, session.abstract_state)
  session.checkpointer.close()
  before = jax.tree.map(np.asarray, state['params'])
  state['step'] = jnp.asarray(3, jnp.int32)
  with session.mesh, sharding.axis_rules():
    want, metrics = session.train_step(state, session.device_batch(session.batch(3)))
  assert int(metrics['nonfinite']) == 0
  assert jax.tree.structure(final) == jax.tree.structure(want)
  for got, ref in zip(jax.tree.leaves(final), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-7)
  assert any(not np.allclose(np.asarray(w), o)
             for w, o in zip(jax.tree.leaves(want['params']), jax.tree.leaves(before)))


def test_evaluate_reports_the_latest_checkpoint(corpus, tmp_path):
  workdir = str(tmp_path / 'run')
  config = run_config(corpus)
  summary = train.train(config, workdir)
  result = train.evaluate(config, workdir)
  assert result['step'] == 4
  depth = config.mtp.depth
  assert sorted(result['eval']) == sorted(
      f'{m}/depth_{k}' for m in ['loss', 'accuracy', 'perplexity'] for k in range(depth + 1))
  # The same params on the same held-out batches as the evaluation at the end of training.
  assert result['eval'] == summary['eval']
  for k in range(depth + 1):
    loss = result['eval'][f'loss/depth_{k}']
    assert 0 < loss < 2 * np.log(config.data.vocab_size)
    np.testing.assert_allclose(result['eval'][f'perplexity/depth_{k}'], np.exp(loss), rtol=1e-12)
    assert 0 <= result['eval'][f'accuracy/depth_{k}'] <= 1

  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  earlier = train.evaluate(config, workdir)
  assert earlier['step'] == 2
  assert earlier['eval']['loss/depth_0'] != result['eval']['loss/depth_0']


def test_evaluate_without_a_checkpoint_says_so(corpus, tmp_path):
  with pytest.raises(ckpt_lib.CheckpointError, match='no checkpoint.*train first'):
    train.evaluate(run_config(corpus), str(tmp_path / 'empty'))
