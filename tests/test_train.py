"""The train step and loop on a tiny model: learning, gradient accumulation, bitwise resume,
TensorBoard logs, non-finite steps and evaluation, with the real Orbax and TensorBoard files."""

import dataclasses
import functools
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import (another_run_holding, assert_bitwise_equal, checkpoint_steps, flat,
                      raw_steps, restore, scalars, text_config, tiny_config)
from mtp_jax import checkpoint as ckpt_lib
from mtp_jax import data as data_lib
from mtp_jax import sharding, train
from mtp_jax.config import ModelConfig
from mtp_jax.model import init_params

N = 3  # the shared run checkpoints and evaluates every N steps and stops at 2N


def shared_config():
  return text_config(**{'train.steps': 2 * N, 'train.checkpoint_every': N,
                       'train.eval_every': N, 'train.log_every': 1})


@dataclasses.dataclass
class Run:
  workdir: str
  summary: dict
  state: dict  # the restored final checkpoint


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """One uninterrupted 2N-step run; tests that change its workdir work on a copy."""
  workdir = str(tmp_path_factory.mktemp('straight') / 'run')
  summary = train.train(shared_config(), workdir)
  assert summary['step'] == 2 * N and summary['stopped_by'] is None
  return Run(workdir, summary, restore(shared_config(), workdir)[1])


def copy_run(run, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(run.workdir, workdir)
  return workdir


@functools.cache
def initial_params(cfg: ModelConfig):
  # Compiling the initializer takes seconds on CPU; the in-process tests share one.
  return jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))


def fresh_state(config, tx):
  params = initial_params(ModelConfig.from_config(config))
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}


def compiled_step(config, tx, grad_accum=1):
  sc = train.StepConfig(train.loss_spec(config, ModelConfig.from_config(config)), grad_accum,
                        config.mtp.loss_weight, config.mtp.loss_weight_schedule)
  return jax.jit(functools.partial(train.train_step, tx=tx, sc=sc))


def random_batch(config, seed=1):
  window = train.window_length(config)
  return jax.random.randint(jax.random.key(seed), (config.train.batch_size, window), 0,
                            config.data.vocab_size)


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


def test_weight_decay_reaches_matrices_only():
  """Not norms (Qwen3's q and k norms among them), biases (Medusa's, and Qwen2's q, k and v
  biases, stored per head as 2-D) or the (un)embedding."""
  for overrides in ({'model.qkv_bias': True, 'model.tie_embeddings': False},
                    {'model.qk_norm': True}, {'mtp.kind': 'medusa'}):
    cfg = ModelConfig.from_config(tiny_config(**overrides))
    mask = flat(train._decay_mask(init_params(cfg, jax.random.key(0))['params']))
    decayed = {name for name, kept in mask.items() if kept}
    # every weight matrix by its name, whatever its shape: the projections of attention and the
    # MLP, the modules' input projection, Medusa's layer
    matrices = {name for name in mask if name.endswith((
        "['q']", "['k']", "['v']", "['o']", "['gate']", "['up']", "['down']", "['eh_proj']",
        "['w']"))}
    assert decayed == matrices and len(matrices) >= 7 * cfg.num_layers, sorted(decayed ^ matrices)
    spared = [name for name in mask if 'bias' in name or 'norm' in name or name.endswith("['b']")]
    assert not any(mask[name] for name in spared)
    assert any('bias' in name or "['b']" in name or 'q_norm' in name for name in spared)


def test_grad_accumulation_matches_one_big_batch():
  # Plain SGD keeps the update proportional to the gradient (Adam would normalize differences
  # away), and make_optimizer's schedule gives the first step lr 0, which would hide them.
  config = tiny_config(**{'train.batch_size': 4})
  tx = optax.sgd(1.0)
  batch = random_batch(config)
  start = fresh_state(config, tx)
  one_step = compiled_step(config, tx, grad_accum=1)
  whole, m1 = one_step(start, batch)
  split, m2 = compiled_step(config, tx, grad_accum=2)(start, batch)
  for name in ['loss/total', 'loss/depth_0', 'accuracy/depth_2', 'grad_norm']:
    np.testing.assert_allclose(m2[name], m1[name], rtol=1e-6, err_msg=name)
  for w, s in zip(jax.tree.leaves(whole['params']), jax.tree.leaves(split['params'])):
    np.testing.assert_allclose(s, w, atol=1e-6, rtol=0)
  # The tolerance is far below what the second micro-batch contributes: replacing it moves
  # the params by much more.
  other = batch.at[2:].set(random_batch(config, seed=2)[2:])
  changed, _ = one_step(start, other)
  off = max(float(jnp.max(jnp.abs(w - c))) for w, c in zip(
      jax.tree.leaves(whole['params']), jax.tree.leaves(changed['params'])))
  assert off > 1e-4, off


def test_grad_accumulation_over_uneven_rows_matches_one_big_batch():
  """Rows packed into windows (chats the trunk wrote) leave the micro-batches different numbers
  of positions: here the first holds rows of 2 tokens, where depth 1 and 2 have no position at
  all, the second one long row. Each position still weighs what it does in one big batch."""
  config = tiny_config(**{'train.batch_size': 4})
  tx = optax.sgd(1.0)
  tokens = random_batch(config)
  row_start = np.zeros(tokens.shape, bool)
  row_start[:2, ::2] = True
  row_start[2:, 0] = True
  batch = {'tokens': tokens, 'row_start': jnp.asarray(row_start)}
  start = fresh_state(config, tx)
  whole, m1 = compiled_step(config, tx, grad_accum=1)(start, batch)
  split, m2 = compiled_step(config, tx, grad_accum=2)(start, batch)
  for name in ['loss/total', 'loss/depth_0', 'loss/depth_1', 'accuracy/depth_2', 'grad_norm']:
    np.testing.assert_allclose(m2[name], m1[name], rtol=1e-6, err_msg=name)
  for w, s in zip(jax.tree.leaves(whole['params']), jax.tree.leaves(split['params'])):
    np.testing.assert_allclose(s, w, atol=1e-6, rtol=0)


def test_resume_after_preemption_is_bitwise(straight_run, tmp_path, capfd):
  config, workdir = shared_config(), str(tmp_path / 'run')

  def preempt_at_n(session, params, step, writer):
    if step == N:
      # Without the loop's handler, SIGTERM would end pytest itself.
      assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
      signal.raise_signal(signal.SIGTERM)

  # The signal arrives during step N's evaluation; the loop stops at N or, if it has already
  # passed its check, after the next step, always with a checkpoint of the step it stopped at.
  first = train.train(config, workdir, eval_hook=preempt_at_n)
  stopped = first['step']
  assert first['stopped_by'] == 'SIGTERM' and N <= stopped < 2 * N
  assert checkpoint_steps(workdir)[-1] == stopped
  capfd.readouterr()
  resumed = train.train(config, workdir)
  assert f'resuming from step {stopped}\n' in capfd.readouterr().err  # the same settings
  assert resumed['step'] == 2 * N and resumed['stopped_by'] is None
  assert resumed['eval'] == straight_run.summary['eval']
  saved = checkpoint_steps(workdir)
  assert saved[-1] == 2 * N
  _, state = restore(config, workdir)
  assert int(state['step']) == 2 * N
  assert_bitwise_equal(state, straight_run.state)
  # The loss curve is the uninterrupted one, each step logged once.
  curve = scalars(workdir)['train/loss/total']
  assert [s for s, _ in curve] == list(range(1, 2 * N + 1))
  assert curve == scalars(straight_run.workdir)['train/loss/total']

  # The same command again finds the work done: no step runs, no checkpoint is written.
  again = train.train(config, workdir)
  assert f'already trained to step {2 * N}' in capfd.readouterr().err
  assert again['step'] == 2 * N and again['eval'] == straight_run.summary['eval']
  assert checkpoint_steps(workdir) == saved
  assert_bitwise_equal(restore(config, workdir)[1], straight_run.state)
  assert [s for s, _ in scalars(workdir)['train/loss/total']] == list(range(1, 2 * N + 1))
  # With an eval hook (launch.py's decoding), its metrics join the finished run's eval dict
  # as they did at the last step's evaluation.
  hooked = train.train(config, workdir, eval_hook=lambda session, params, step, w: {'hook': step})
  assert hooked['eval'] == {**straight_run.summary['eval'], 'hook': 2 * N}


def test_a_failing_evaluation_keeps_its_steps_checkpoint(straight_run, tmp_path, capfd):
  """Step N both checkpoints and evaluates; an evaluation that fails there (a decoding hook out of
  memory, say) leaves step N saved, and the rerun goes on from it to the uninterrupted result,
  after it has logged the part of step N's evaluation that failed (the loop, going on from step
  N + 1, would never log it)."""
  config, workdir = shared_config(), str(tmp_path / 'run')

  def hook(fail, at=N):
    def log_step(session, params, step, writer):
      if fail and step == at:
        raise MemoryError('the eval hook ran out of memory')
      if writer is not None:  # None where a finished run's rerun evaluates for its summary
        writer.add_scalar('hook/step', step, step)
      return {'hook': step}
    return log_step

  with pytest.raises(MemoryError):
    train.train(config, workdir, eval_hook=hook(fail=True))
  assert checkpoint_steps(workdir) == [N]
  failing = shutil.copytree(workdir, tmp_path / 'failing')
  cut = shutil.copytree(workdir, tmp_path / 'cut')
  capfd.readouterr()
  resumed = train.train(config, workdir, eval_hook=hook(fail=False))
  assert (f'step {N}: logging its evaluation (hook), which is not on disk from the run that '
          'saved the step' in capfd.readouterr().err)
  assert resumed['resumed_from'] == N and resumed['step'] == 2 * N
  assert_bitwise_equal(restore(config, workdir)[1], straight_run.state)
  # step N's evaluation, logged before the hook failed, is on disk once, and so is the hook's
  assert [s for s, _ in scalars(workdir)['eval/loss/depth_0']] == [N, 2 * N]
  assert [s for s, _ in scalars(workdir)['hook/step']] == [N, 2 * N]
  # finished and recorded: a rerun logs nothing again
  again = train.train(config, workdir, eval_hook=hook(fail=False))
  assert again['eval']['hook'] == 2 * N and 'logging its evaluation' not in capfd.readouterr().err
  assert [s for s, _ in scalars(workdir)['hook/step']] == [N, 2 * N]
  # A part that fails every time is tried once more by the next run, then left out: the run after
  # that goes on without it, where every rerun had stopped at it.
  with pytest.raises(MemoryError):
    train.train(config, str(failing), eval_hook=hook(fail=True))
  assert checkpoint_steps(failing) == [N]
  capfd.readouterr()
  assert train.train(config, str(failing), eval_hook=hook(fail=True))['step'] == 2 * N
  assert (f'step {N}: its evaluation (hook) failed again when a rerun retried it (or '
          f'{train.RETRIES} reruns were cut short while they did); going on without it'
          in capfd.readouterr().err)
  assert [s for s, _ in scalars(failing)['hook/step']] == [2 * N]
  # A retry cut short (here by an interrupt; a kill -9 runs no code at all) is no failure of the
  # part: the next rerun tries again, until RETRIES reruns were cut short.
  def cut_short(session, params, step, writer):
    raise KeyboardInterrupt
  for tries in range(1, train.RETRIES + 1):
    with pytest.raises(KeyboardInterrupt):
      train.train(config, str(cut), eval_hook=cut_short)
    rerun = shutil.copytree(cut, tmp_path / f'rerun{tries}')
    capfd.readouterr()
    assert train.train(config, str(rerun), eval_hook=hook(fail=False))['step'] == 2 * N
    steps = [s for s, _ in scalars(rerun)['hook/step']]
    if tries < train.RETRIES:
      assert steps == [N, 2 * N] and 'logging its evaluation (hook)' in capfd.readouterr().err
    else:
      assert steps == [2 * N] and 'going on without it' in capfd.readouterr().err
  # The same at the last step, where a finished run's rerun evaluates for its summary: it leaves
  # the part out there too, and writes its summary.
  last = copy_run(straight_run, tmp_path)
  with pytest.raises(MemoryError):
    train.train(config, last, eval_hook=hook(fail=True, at=2 * N))
  summary = train.train(config, last, eval_hook=hook(fail=True, at=2 * N))
  assert summary['step'] == 2 * N and 'hook' not in summary['eval']
  assert summary['eval'] == straight_run.summary['eval']


def test_a_second_run_in_the_workdir_waits_for_the_first(straight_run, tmp_path, capfd):
  """While a run trains in a workdir (here: the test holds its lock, as that run's process 0
  does, and saves that run's step N while the other waits), another started there waits before
  it writes or restores anything, where it would have written its tokenizer over the first's
  and saved over its steps; then it resumes from what the first saved (it had kept the steps it
  saw before it waited, none, and trained again from step 0 over them)."""
  config, workdir = shared_config(), str(tmp_path / 'run')

  def first_run():  # its steps up to N
    shutil.copytree(straight_run.workdir, workdir, dirs_exist_ok=True)
    shutil.rmtree(os.path.join(workdir, 'checkpoints', str(2 * N)))

  with another_run_holding(workdir, capfd, first_run) as seen:
    result = train.train(config, workdir)
  assert f'waiting for another run training in {workdir}' in seen['err']
  assert seen['files'] == []  # nothing written while it waited
  assert result['resumed_from'] == N and result['step'] == 2 * N
  assert_bitwise_equal(restore(config, workdir)[1], straight_run.state)


def test_a_finished_run_rerun_with_other_data_keeps_its_records(straight_run, tmp_path):
  """Nothing trains in a finished workdir, so its config.json and the token frequencies its
  draft vocabulary is cut from stay those of the run that trained it (a rerun with another data
  setting rewrote both, and the next rerun reported the original setting as a change)."""
  workdir = copy_run(straight_run, tmp_path)
  kept = {name: open(os.path.join(workdir, name), 'rb').read()
          for name in ('config.json', 'token_rank.npy')}
  config = shared_config()
  config.data.valid_fraction = 0.3
  result = train.train(config, workdir)
  assert result['resumed_from'] == result['step'] == 2 * N
  for name, before in kept.items():
    assert open(os.path.join(workdir, name), 'rb').read() == before, name


def test_a_damaged_summary_reads_as_none(tmp_path):
  """summary.json is rewritten by the run that reads it: cut short, not UTF-8 or not an object,
  it is read as no summary (a traceback had stopped the rerun of a finished run)."""
  assert train.read_summary(str(tmp_path)) == {}
  for text in (b'{"step": ', b'\xff{}', b'[1, 2]'):
    (tmp_path / 'summary.json').write_bytes(text)
    assert train.read_summary(str(tmp_path)) == {}
  (tmp_path / 'summary.json').write_text('{"step": 3, "after_train": ["bench"]}')
  assert train.read_summary(str(tmp_path)) == {'step': 3, 'after_train': ['bench']}


def test_a_run_that_saved_no_checkpoint_binds_nothing(tmp_path):
  """config.json and tokenizer.json are written when a run starts; one that stopped before its
  first checkpoint (bad input, a non-finite first step, a kill during its first save, which
  leaves Orbax's temporary folder) leaves no model that a rerun with other fields or another
  tokenizer must match."""
  config, workdir = shared_config(), str(tmp_path / 'run')
  other = text_config(**{'model.d_model': 64, 'train.steps': 1})
  ckpt_lib.save_config(workdir, other)
  killed_save = os.path.join(workdir, 'checkpoints', f'{N}.orbax-checkpoint-tmp-1765000000')
  os.makedirs(os.path.join(killed_save, 'state'))
  with pytest.raises(ckpt_lib.CheckpointError, match='no checkpoint in'):  # nor for the modes
    train.check_trained('eval', config, workdir)
  stale = data_lib._train_tokenizer(['a tokenizer of other text'], 280).to_str()
  with open(os.path.join(workdir, 'tokenizer.json'), 'w') as f:
    f.write(stale)
  train.train(config, workdir)
  assert checkpoint_steps(workdir) == [N, 2 * N]
  assert ckpt_lib.load_config(workdir)['model']['d_model'] == config.model.d_model
  # the tokenizer was made again for this run's data (it trained on the stale one's ids)
  with open(os.path.join(workdir, 'tokenizer.json')) as f:
    made = f.read()
  assert made != stale
  assert made == data_lib.prepare(config.data, str(tmp_path / 'fresh')).tokenizer.to_str()


def test_a_workdirs_checkpoints_keep_their_tokenizer(straight_run, tmp_path):
  """Its checkpoints' embeddings are of the ids of the workdir's tokenizer.json: a run there with
  another data.tokenizer is refused before anything is written, one with a copy of it goes on."""
  workdir = copy_run(straight_run, tmp_path)
  kept = os.path.join(workdir, 'tokenizer.json')
  before = open(kept, 'rb').read()
  other = str(tmp_path / 'other.json')
  with open(other, 'w') as f:
    f.write(data_lib._train_tokenizer(['a tokenizer of other text'], 280).to_str())
  config = shared_config()
  config.data.tokenizer = other
  with pytest.raises(data_lib.DataError, match=f"data.tokenizer '{other}' is not {kept}"):
    train.train(config, workdir)
  assert open(kept, 'rb').read() == before
  config.data.tokenizer = str(tmp_path / 'copy.json')
  shutil.copy(kept, config.data.tokenizer)
  assert train.train(config, workdir)['step'] == 2 * N


def test_tensorboard_scalars_at_their_steps(straight_run):
  config = shared_config()
  depth = config.mtp.depth
  logged = scalars(straight_run.workdir)
  every_step, evals = list(range(1, 2 * N + 1)), [N, 2 * N]
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
  # The last evaluation is the one the run returned.
  final_loss = straight_run.summary['eval']['loss/depth_0']
  assert logged['eval/loss/depth_0'][-1][1] == np.float32(final_loss)


class Clock:
  """Seconds that pass only when the test moves them on."""

  def __init__(self):
    self.now = 0.0

  def __call__(self) -> float:
    return self.now


def test_tokens_per_s_leaves_out_evaluations_and_saves(tmp_path, monkeypatch):
  """A pause (an evaluation, a checkpoint save) between two logged steps is not training time:
  the window's tokens/s counts only the time outside it; nor is the logged learning rate's
  evaluation, whose first call compiles."""
  t = tiny_config(**{'train.log_every': 2}).train
  clock = Clock()
  real = train.lr_schedule

  def compiling(t):
    clock.now += 7.0
    return real(t)
  monkeypatch.setattr(train, 'lr_schedule', compiling)
  log = train.MetricsLog(str(tmp_path), t, start=0, enabled=False, clock=clock)
  metrics = {'nonfinite': False, 'nonfinite_grad': False, 'loss/total': 1.0}
  log.push(1, dict(metrics))
  log.flush()  # the first step's window starts here
  clock.now += 0.25
  with log.paused():
    clock.now += 10.0
  clock.now += 0.25
  log.push(2, dict(metrics))
  log.flush()
  # one step in 0.5 s outside the pause (over the pause too it would be 10.5 s)
  assert float(log.postfix['tok_s']) == t.batch_size * t.seq_len / 0.5, log.postfix
  clock.now += 0.5
  log.push(3, dict(metrics))
  log.push(4, dict(metrics))
  log.flush()  # two steps in 0.5 s, the learning rate's 7 s at step 2 left out
  assert float(log.postfix['tok_s']) == 2 * t.batch_size * t.seq_len / 0.5, log.postfix


def test_tokens_per_s_leaves_out_the_first_step(tmp_path):
  """The first step of a run (or of a resume) compiles: the first logged window starts after it."""
  t = tiny_config(**{'train.log_every': 3}).train
  clock = Clock()
  log = train.MetricsLog(str(tmp_path), t, start=6, enabled=False, clock=clock)
  metrics = {'nonfinite': False, 'nonfinite_grad': False, 'loss/total': 1.0}
  for step in (7, 8, 9, 10):  # logged at 9, each step handled when the next is pushed
    log.push(step, dict(metrics))
    clock.now += 10.0 if step == 7 else 1.0  # step 7 compiles
  # steps 8 and 9 in 2 s (from the start of the run it would be 3 steps in 12 s)
  assert float(log.postfix['tok_s']) == t.batch_size * t.seq_len / 1.0, log.postfix


def test_crash_after_a_checkpoint_resumes_bitwise_and_logs_once(straight_run, tmp_path):
  # A crash after step N's checkpoint, once steps N+1..2N were logged: the rerun logs them
  # again; the files hold them twice, TensorBoard shows each step once.
  workdir = copy_run(straight_run, tmp_path)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(2 * N)))
  assert checkpoint_steps(workdir) == [N]
  train.train(shared_config(), workdir)
  assert_bitwise_equal(restore(shared_config(), workdir)[1], straight_run.state)
  tag = 'train/loss/total'
  assert raw_steps(workdir, tag) == sorted([*range(1, 2 * N + 1), *range(N + 1, 2 * N + 1)])
  logged, first = scalars(workdir), scalars(straight_run.workdir)
  assert sorted(logged) == sorted(first)
  for name in first:
    assert [s for s, _ in logged[name]] == [s for s, _ in first[name]], name
  # The rerun is deterministic, so the surviving values are the uninterrupted run's.
  assert logged[tag] == first[tag]


def test_nonfinite_loss_stops_at_its_step_and_skip_leaves_it_out(tmp_path):
  workdir = str(tmp_path / 'run')
  config = text_config(**{'train.inject_nan_step': 3, 'train.nonfinite': 'stop'})
  with pytest.raises(train.TrainingError, match=r'non-finite loss at step 3\b'):
    train.train(config, workdir)
  assert checkpoint_steps(workdir) == [2]
  _, state = restore(config, workdir)
  assert int(state['step']) == 2

  # The same command with nonfinite=skip resumes from step 2 and goes past step 3; the
  # evaluation at step 4 hands over the run's session.
  config.train.nonfinite = 'skip'
  sessions = []
  summary = train.train(config, workdir, eval_hook=lambda session, *_: sessions.append(session))
  assert summary['step'] == 4 and summary['nonfinite_skipped'] == 1
  assert [v for _, v in scalars(workdir)['train/nonfinite']] == [0, 0, 1, 0]
  # step 3's update was skipped, so step 4 applied the schedule's third learning rate
  lr = dict(scalars(workdir)['train/lr'])
  np.testing.assert_allclose([lr[3], lr[4]], [train.lr_schedule(config.train)(c) for c in (2, 2)],
                             rtol=1e-6)
  _, final = restore(config, workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(final['params']))

  # Step 3 changed nothing but the step counter: the run's own compiled step 4, applied to
  # step 2's checkpoint, gives the final state bit for bit.
  session, = sessions
  _, state = restore(config, workdir, step=2)
  before = jax.tree.map(np.array, state['params'])
  state['step'] = jnp.asarray(3, jnp.int32)
  with sharding.active(session.mesh):
    want, metrics = session.train_step(state, session.device_batch(session.batch(3)))
  assert int(metrics['nonfinite']) == 0
  assert_bitwise_equal(final, want)
  assert any(not np.array_equal(np.asarray(w), b)
             for w, b in zip(jax.tree.leaves(want['params']), jax.tree.leaves(before)))

  # The count of skipped steps survives a resume.
  config.train.steps = 5
  assert train.train(config, workdir)['nonfinite_skipped'] == 1


def test_evaluate_reports_the_latest_checkpoint(straight_run, tmp_path):
  config = shared_config()
  depth = config.mtp.depth
  result = train.evaluate(config, straight_run.workdir)
  assert result['step'] == 2 * N
  assert sorted(result['eval']) == sorted(
      f'{m}/depth_{k}' for m in ['loss', 'accuracy', 'perplexity'] for k in range(depth + 1))
  # The same params on the same held-out batches as the evaluation at the end of training.
  assert result['eval'] == straight_run.summary['eval']
  for k in range(depth + 1):
    loss = result['eval'][f'loss/depth_{k}']
    assert 0 < loss < 2 * np.log(config.data.vocab_size)
    np.testing.assert_allclose(result['eval'][f'perplexity/depth_{k}'], np.exp(loss), rtol=1e-12)
    assert 0 <= result['eval'][f'accuracy/depth_{k}'] <= 1

  workdir = copy_run(straight_run, tmp_path)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(2 * N)))
  earlier = train.evaluate(config, workdir)
  assert earlier['step'] == N
  assert earlier['eval']['loss/depth_0'] != result['eval']['loss/depth_0']


def test_evaluate_without_a_checkpoint_says_so(tmp_path):
  with pytest.raises(ckpt_lib.CheckpointError, match='no checkpoint.*train first'):
    train.evaluate(text_config(), str(tmp_path / 'empty'))


def test_the_loss_recomputes_logits_as_train_remat_logits_says():
  for value in (True, False):
    config = tiny_config(**{'train.remat_logits': value})
    assert train.loss_spec(config, ModelConfig.from_config(config)).remat is value
