"""Training under interruption and bad numbers, driven through real `launch.py` subprocesses:
SIGTERM/SIGINT, kill -9 (also in the middle of a checkpoint write), injected NaNs, damaged
checkpoint files and bad configs. Each test asserts what the user sees: the exit code, the
message, the step a rerun resumes from, the TensorBoard curve and the params, bit for bit."""

import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import (REPO, assert_bitwise_equal, assert_no_traceback, cpu_env, error_line,
                      launch_summary, raw_events, raw_steps, read_checkpoint, scalars, snapshot,
                      stdlib_corpus, tiny_config)
from mtp_jax.config import as_flags

PARTIAL = ocp.utils.TMP_DIR_SUFFIX
LOSS = 'train/loss/total'
# The kill and determinism runs: long enough that a kill lands while steps are running.
STEPS = 40

# tiny_config with one layer and one MTP head, batch 2; logs every step and evaluates only at the
# last.
TINY = {'data.vocab_size': 300, 'model.num_layers': 1, 'model.max_seq_len': 64, 'mtp.depth': 1,
        'train.batch_size': 2, 'train.eval_every': 1000}
_log_names = itertools.count()


class Launch:
  """One `python launch.py` training subprocess on TINY with `overrides`, then the raw `flags`.
  Its stdout and stderr go to files beside the workdir (never inside it), so that they can be
  read while it runs."""

  def __init__(self, workdir, corpus, overrides=None, env=None, flags=()):
    config = tiny_config(**{'data.sources': corpus, **TINY, **(overrides or {})})
    args = [sys.executable, 'launch.py', '--config', 'configs/base.py', f'--workdir={workdir}',
            *as_flags(config), *flags]
    env = cpu_env(PYTHONUNBUFFERED='1', **(env or {}))
    stem = f'{workdir.rstrip(os.sep)}.{next(_log_names)}'
    self.out_path, self.err_path = stem + '.out', stem + '.err'
    with open(self.out_path, 'w') as out, open(self.err_path, 'w') as err:
      self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=err)

  @property
  def err(self) -> str:
    with open(self.err_path) as f:
      return f.read()

  @property
  def out(self) -> str:
    with open(self.out_path) as f:
      return f.read()

  def finish(self, timeout=180) -> int:
    try:
      return self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise AssertionError(f'still running after {timeout}s; stderr:\n{self.err[-3000:]}')

  def kill(self, signum=signal.SIGKILL):
    os.kill(self.proc.pid, signum)

  def wait_until(self, condition, timeout=120, poll=0.002):
    """Polls `condition()` while the process runs; fails if it exits or time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
      if self.proc.poll() is not None:
        raise AssertionError(f'exited with {self.proc.returncode} before the awaited moment; '
                             f'stderr:\n{self.err[-3000:]}')
      if time.monotonic() > deadline:
        self.proc.kill()
        raise AssertionError(f'no awaited moment within {timeout}s; stderr:\n{self.err[-3000:]}')
      time.sleep(poll)

  def progress(self) -> int:
    """The last step the tqdm training bar has shown (0 before it shows one)."""
    shown = re.findall(r'(?:^|\r)train: [^\r\n]*?\| *(\d+)/\d+ \[', self.err, re.M)
    return int(shown[-1]) if shown else 0


def launch(workdir, corpus, overrides) -> Launch:
  """Runs to the end and asserts success."""
  run = Launch(workdir, corpus, overrides)
  assert run.finish() == 0, run.err[-3000:]
  return run


def steps_on_disk(workdir) -> list[int]:
  """Complete checkpoints: Orbax renames a step's directory to its number once it is written."""
  directory = os.path.join(workdir, 'checkpoints')
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


def partial_on_disk(workdir) -> list[str]:
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(n for n in os.listdir(directory) if PARTIAL in n) if os.path.isdir(directory) else []


def curve_diff(got, want) -> str:
  """'' when the curves are equal; otherwise what differs, for the assertion message."""
  steps = [s for s, _ in got]
  missing = sorted(set(s for s, _ in want) - set(steps))
  repeated = sorted(s for s in set(steps) if steps.count(s) > 1)
  values = [(g, w) for g, w in zip(got, want) if g != w][:3]
  return f'missing {missing}, repeated {repeated}, first differences {values}' if got != want else ''


@pytest.fixture(scope='module')
def reference(corpus, tmp_path_factory):
  """STEPS uninterrupted steps: (per-step losses, final params) that interrupted runs must match."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  launch(workdir, corpus, {'train.steps': STEPS, 'train.checkpoint_every': STEPS})
  losses = scalars(workdir)[LOSS]
  assert [s for s, _ in losses] == list(range(1, STEPS + 1))
  return losses, read_checkpoint(workdir, STEPS)[0]['params']


@pytest.fixture(scope='module')
def trained(corpus, tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4; tests work on copies."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  launch(workdir, corpus, {'train.steps': 4, 'train.checkpoint_every': 2})
  assert steps_on_disk(workdir) == [2, 4]
  return workdir


# 1. Preemption.

@pytest.mark.parametrize('signum, eval_every', [
    (signal.SIGTERM, 1000), (signal.SIGINT, 1000),
    # Evaluating at every step, the signal nearly always lands during an evaluation, after
    # the step decided whether to checkpoint.
    (signal.SIGTERM, 1),
], ids=['SIGTERM', 'SIGINT', 'SIGTERM-during-eval'])
def test_a_signal_checkpoints_flushes_and_exits_0(corpus, tmp_path, signum, eval_every):
  """The step finishes, a checkpoint is saved, TensorBoard is flushed and the run exits 0; the
  modes after train in --mode (eval here) do not run: its summary is the last printed."""
  workdir = str(tmp_path / 'run')
  run = Launch(workdir, corpus, {'train.steps': 200, 'train.checkpoint_every': 1000,
                                'train.eval_every': eval_every}, flags=['--mode=train,eval'])
  run.wait_until(lambda: run.progress() >= 3)
  run.kill(signum)
  assert run.finish(60) == 0, run.err[-3000:]
  name = signal.Signals(signum).name
  stopped = re.findall(rf'^{name}: stopped after step (\d+); checkpoint saved', run.err, re.M)
  assert len(stopped) == 1, run.err[-3000:]
  k = int(stopped[0])
  assert 3 <= k < 200
  summary = launch_summary(run.out)
  assert summary['step'] == k and summary['stopped_by'] == name
  # Only the preemption saved, and it saved the step it reported.
  assert steps_on_disk(workdir) == [k] and partial_on_disk(workdir) == []
  state, meta = read_checkpoint(workdir, k)
  assert meta == {'step': k, 'nonfinite_skipped': 0} and int(state['step']) == k
  # TensorBoard was flushed up to that step: every step once, the last one included.
  logged = scalars(workdir)
  assert [s for s, _ in logged[LOSS]] == list(range(1, k + 1))
  if eval_every == 1:
    assert [s for s, _ in logged['eval/loss/depth_0']] == list(range(1, k + 1))


def test_a_second_signal_exits_at_once_and_leaves_a_resumable_workdir(corpus, tmp_path):
  workdir = str(tmp_path / 'run')
  run = Launch(workdir, corpus, {'train.steps': 200, 'train.checkpoint_every': 1000})
  run.wait_until(lambda: run.progress() >= 3)
  run.kill(signal.SIGTERM)
  time.sleep(0.02)  # the first one is handled; the checkpoint is being written
  run.kill(signal.SIGTERM)
  # The second signal ended it: the first alone saves and exits 0 (the test above). Not a
  # timing: finish's 60 s only keeps a hang from stalling the suite.
  rc = run.finish(60)
  assert rc == 128 + signal.SIGTERM, (rc, run.err[-3000:])
  assert_no_traceback(run.err)

  # Whatever the second signal interrupted, a rerun (to two steps past it) resumes from a
  # complete checkpoint, or from scratch when none completed, and reports a partial one.
  complete, partial = steps_on_disk(workdir), partial_on_disk(workdir)
  assert len(complete) <= 1
  start = complete[-1] if complete else 0
  rerun = launch(workdir, corpus, {'train.steps': start + 2, 'train.checkpoint_every': 1000})
  if start:
    assert f'resuming from step {start}\n' in rerun.err
  else:
    assert 'resuming' not in rerun.err
  for name in partial:
    assert f'ignoring incomplete checkpoint {name}' in rerun.err
  assert 'is damaged' not in rerun.err
  assert_no_traceback(rerun.err)
  assert launch_summary(rerun.out)['step'] == start + 2
  assert steps_on_disk(workdir)[-1] == start + 2


# 2. Hard kill.

def test_kill_9_at_random_moments_resumes_from_the_last_complete_checkpoint(
    corpus, reference, tmp_path):
  """Three kills, each followed by a rerun of the same command that is killed by the next;
  a save is in flight at nearly every moment (checkpoint_every=1)."""
  rng = random.Random(2)
  workdir = str(tmp_path / 'run')
  overrides = {'train.steps': STEPS, 'train.checkpoint_every': 1}

  def check_resume(run, complete, partial):
    """The run resumed from the newest complete checkpoint and reported the partial ones."""
    if complete:
      assert f'resuming from step {complete[-1]}\n' in run.err, run.err[-3000:]
    else:
      assert 'resuming' not in run.err
    for name in partial:
      assert f'ignoring incomplete checkpoint {name}' in run.err, (name, run.err[-3000:])
    assert 'is damaged' not in run.err
    assert_no_traceback(run.err)

  kills = []
  for moment in ['startup', 'mid-save', 'random step']:
    complete, partial = steps_on_disk(workdir), partial_on_disk(workdir)
    run = Launch(workdir, corpus, overrides)
    start = complete[-1] if complete else 0
    if moment == 'startup':  # imports, data preparation or compilation
      time.sleep(rng.uniform(0.2, 2.0))
    elif moment == 'mid-save':
      # Once this run has completed a save of its own, kill it as soon as the next save's
      # temporary directory appears.
      run.wait_until(lambda: steps_on_disk(workdir)[-1:] > [start], poll=0.001)
      first = steps_on_disk(workdir)[-1]
      run.wait_until(lambda: any(int(n.split('.')[0]) > first for n in partial_on_disk(workdir)),
                     poll=0.0005)
    else:
      target = rng.randint(min(start + 2, STEPS - 8), STEPS - 8)
      run.wait_until(lambda: steps_on_disk(workdir)[-1:] >= [target])
      time.sleep(rng.uniform(0, 0.1))
    run.kill()
    assert run.finish(30) == -signal.SIGKILL, f'{moment}: the run ended before the kill'
    check_resume(run, complete, partial)
    kills.append((moment, steps_on_disk(workdir), partial_on_disk(workdir)))

  complete, partial = steps_on_disk(workdir), partial_on_disk(workdir)
  final = launch(workdir, corpus, overrides)
  check_resume(final, complete, partial)
  assert launch_summary(final.out)['step'] == STEPS, kills
  assert partial_on_disk(workdir) == []
  # Every step appears once in TensorBoard, with the uninterrupted run's value.
  losses, params = reference
  diff = curve_diff(scalars(workdir)[LOSS], losses)
  assert not diff, (diff, kills)
  assert_bitwise_equal(read_checkpoint(workdir, STEPS)[0]['params'], params)


def test_kill_9_during_a_checkpoint_steps_evaluation_is_made_good_by_the_rerun(corpus, tmp_path):
  """Step 5 checkpoints, then evaluates (1024 validation batches): killed once the checkpoint is
  on disk, while it evaluates, the run leaves an evaluation that the rerun, resuming after step
  5, would never run. The rerun logs it first; every evaluation is in TensorBoard once."""
  workdir = str(tmp_path / 'run')
  overrides = {'train.steps': 10, 'train.checkpoint_every': 5, 'train.eval_every': 5,
               'train.eval_batches': 1024}
  run = Launch(workdir, corpus, overrides)
  run.wait_until(lambda: 5 in steps_on_disk(workdir), poll=0.001)
  run.kill()
  assert run.finish(30) == -signal.SIGKILL, 'the run ended before the kill'
  with open(os.path.join(workdir, 'evaluated.json')) as f:
    assert json.load(f) == {'step': 5, 'logged': []}, 'the kill came after the evaluation'
  assert raw_steps(workdir, 'eval/loss/depth_0') == []
  rerun = launch(workdir, corpus, overrides)
  assert 'resuming from step 5\n' in rerun.err, rerun.err[-3000:]
  assert 'step 5: logging its evaluation' in rerun.err
  assert raw_steps(workdir, 'eval/loss/depth_0') == [5, 10]


# 3. Determinism.

def test_resume_after_kill_9_equals_the_uninterrupted_run(corpus, reference, tmp_path):
  """Checkpoints every 5 steps, so the kill loses steps that the resumed run computes again."""
  rng = random.Random(3)
  workdir = str(tmp_path / 'run')
  overrides = {'train.steps': STEPS, 'train.checkpoint_every': 5}
  run = Launch(workdir, corpus, overrides)
  target = rng.randint(STEPS // 2 - 3, STEPS // 2 + 3)
  run.wait_until(lambda: run.progress() >= target)
  time.sleep(rng.uniform(0, 0.2))
  run.kill()
  assert run.finish(30) == -signal.SIGKILL, 'the run ended before the kill'
  n = steps_on_disk(workdir)[-1]
  assert n >= 5

  killed_files = set(os.listdir(os.path.join(workdir, 'tb')))
  resumed = launch(workdir, corpus, overrides)
  assert f'resuming from step {n}\n' in resumed.err
  losses, params = reference
  assert_bitwise_equal(read_checkpoint(workdir, STEPS)[0]['params'], params)
  # The resumed run's own event files hold steps n+1.. with the uninterrupted losses; all
  # files together show each step once.
  new_files = sorted(set(os.listdir(os.path.join(workdir, 'tb'))) - killed_files)
  assert [e for f in new_files
          for e in raw_events(os.path.join(workdir, 'tb', f), LOSS)] == losses[n:]
  diff = curve_diff(scalars(workdir)[LOSS], losses)
  assert not diff, diff


# 4. Non-finite numbers.

def test_a_nan_loss_stops_with_its_step_and_keeps_the_last_finite_checkpoint(corpus, tmp_path):
  workdir = str(tmp_path / 'run')
  run = Launch(workdir, corpus, {'train.steps': 8, 'train.checkpoint_every': 2,
                                'train.inject_nan_step': 5, 'train.nonfinite': 'stop'})
  assert run.finish() != 0
  error_line(run.err, r'\bstep 5\b', r'\bloss\b')
  assert steps_on_disk(workdir) == [2, 4] and partial_on_disk(workdir) == []
  state, meta = read_checkpoint(workdir, 4)
  assert meta == {'step': 4, 'nonfinite_skipped': 0}
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def test_an_overflowing_gradient_with_a_finite_loss_stops_and_names_the_gradient(
    corpus, tmp_path):
  # No hook needed: step 1 applies lr=1e30, which leaves the params finite but so large that
  # step 2's gradient overflows while its loss stays finite.
  workdir = str(tmp_path / 'run')
  run = Launch(workdir, corpus, {'train.steps': 8, 'train.checkpoint_every': 1,
                                'train.lr': 1e30, 'train.warmup_steps': 0})
  assert run.finish() != 0
  line = error_line(run.err, r'non-finite gradient at step 2\b')
  assert np.isfinite(float(re.search(r'\(loss (\S+)\)', line).group(1))), line
  assert steps_on_disk(workdir) == [1] and partial_on_disk(workdir) == []
  state, _ = read_checkpoint(workdir, 1)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def test_a_nan_loss_with_nonfinite_skip_is_counted_and_logged(corpus, tmp_path):
  workdir = str(tmp_path / 'run')
  run = launch(workdir, corpus, {'train.steps': 8, 'train.checkpoint_every': 4,
                                'train.inject_nan_step': 5, 'train.nonfinite': 'skip'})
  summary = launch_summary(run.out)
  assert summary['step'] == 8 and summary['nonfinite_skipped'] == 1
  assert re.search(r'^step 5: non-finite loss, update skipped', run.out + run.err, re.M)
  logged = scalars(workdir)
  assert logged['train/nonfinite'] == [(s, float(s == 5)) for s in range(1, 9)]
  assert logged['train/nonfinite_skipped'] == [(s, float(s >= 5)) for s in range(1, 9)]
  state, _ = read_checkpoint(workdir, 8)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


# 5. Damaged checkpoint.

def _damage(workdir, step, how):
  """Truncates or deletes the largest array data file of a checkpoint step."""
  files = [os.path.join(root, n)
           for root, _, names in os.walk(os.path.join(workdir, 'checkpoints', str(step), 'state'))
           for n in names]
  data = max((f for f in files if f'{os.sep}d{os.sep}' in f), key=os.path.getsize)
  if how == 'truncate':
    os.truncate(data, os.path.getsize(data) // 2)
  else:
    os.remove(data)


@pytest.mark.parametrize('how', ['truncate', 'delete'])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(trained, tmp_path, corpus, how):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  _damage(workdir, 4, how)
  run = launch(workdir, corpus, {'train.steps': 6, 'train.checkpoint_every': 2})
  reports = re.findall(r'^checkpoint step .*', run.err, re.M)
  assert len(reports) == 1, run.err[-3000:]
  assert re.match(r'checkpoint step 4 is damaged \(.+\); falling back to step 2$', reports[0])
  assert_no_traceback(run.err)
  # the fixture's run trained to step 4; this one goes on to 6 and says so
  assert 'resuming from step 2 with changed settings: train.steps: 4 -> 6\n' in run.err
  assert launch_summary(run.out)['step'] == 6
  assert steps_on_disk(workdir) == [2, 4, 6]
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4.damaged'))


def test_eval_reads_past_a_damaged_checkpoint_and_leaves_it(trained, tmp_path, corpus):
  """A mode that only reads the workdir (another process may be training there) falls back to
  the previous step as training would, but renames nothing."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  _damage(workdir, 4, 'truncate')
  run = Launch(workdir, corpus, flags=['--mode=eval'])
  assert run.finish() == 0, run.err[-3000:]
  assert re.search(r'^checkpoint step 4 is damaged \(.+\); falling back to step 2$', run.err, re.M)
  assert launch_summary(run.out)['step'] == 2
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def test_every_checkpoint_damaged_is_one_clear_error(trained, tmp_path, corpus):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  _damage(workdir, 4, 'truncate')
  _damage(workdir, 2, 'delete')
  run = Launch(workdir, corpus, {'train.steps': 6, 'train.checkpoint_every': 2})
  assert run.finish() == 2
  error_line(run.err, r'every checkpoint .* is damaged', r'\b4\b', r'\b2\b')
  assert steps_on_disk(workdir) == [2, 4]


# 6. Validation before work.

# (overrides, raw flags, environment, patterns of the error line). A value of the wrong type is
# only a raw flag: no config holds it.
@pytest.mark.parametrize('overrides, flags, env, patterns', [
    ({'train.seq_len': 64}, [], None,
     [r'train\.seq_len \+ mtp\.depth = 65', r'model\.max_seq_len=64']),
    ({'train.batch_size': 3, 'train.grad_accum': 2}, [], None,
     [r'train\.grad_accum=2', r'train\.batch_size=3', 'divide']),
    ({'model.dtype': 'float16'}, [], None, [r'model\.dtype', 'bfloat16', 'float32', 'float16']),
    ({'train.dtype': 'float16'}, [], None, [r'train\.dtype', 'bfloat16', 'float32', 'float16']),
    ({'mtp.kind': 'foo'}, [], None, [r'mtp\.kind', 'sequential', 'parallel', 'foo']),
    ({'model.attention': 'flash'}, [], None, [r'model\.attention', 'einsum', 'fused', 'flash']),
    ({'train.lr': 0}, [], None, [r'train\.lr', '> 0']),
    ({'decode.top_p': 1.5}, [], None, [r'decode\.top_p', r'\(0, 1\]', '1.5']),
    ({}, ['--config.train.steps=ten'], None, [r'train\.steps', 'ten']),
    ({'data.vocab_size': 200}, [], None, [r'data\.vocab_size', '257']),
    ({'train.batch_size': 2}, [], {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'},
     [r'train\.batch_size', r'mesh\.data \* mesh\.fsdp = 4']),
    ({'mesh.tensor': 3}, [], None, [r'mesh', r'\b3\b', r'\b1 devices?\b']),
], ids=['rope-range', 'grad-accum', 'dtype', 'train-dtype', 'mtp-kind', 'attention', 'lr', 'top-p', 'type', 'vocab',
        'device-count', 'mesh'])
def test_a_bad_config_is_one_error_line_before_anything_is_written(
    corpus, tmp_path, overrides, flags, env, patterns):
  workdir = str(tmp_path / 'run')
  run = Launch(workdir, corpus, overrides, env, flags)
  assert run.finish() != 0
  error_line(run.err, *patterns)
  assert not os.path.exists(workdir) or os.listdir(workdir) == [], os.listdir(workdir)


@pytest.mark.parametrize('fraction, split, advice', [(0.01, 'valid', 'larger'),
                                                    (0.99, 'train', 'smaller')])
def test_a_window_longer_than_a_split_is_refused_before_training(tmp_path, fraction, split,
                                                                 advice):
  # One document is split by length: its last 1% (a few hundred tokens) is held out, too
  # short for one window, which the first evaluation (here after step 3) would find out (or
  # 99% held out, and the training split is too short).
  # The split sizes are known once the data is prepared, so data/ may exist; nothing may be
  # trained, checkpointed or logged.
  workdir = str(tmp_path / 'run')
  run = Launch(workdir, stdlib_corpus('difflib.py'), {
      'data.valid_fraction': fraction, 'model.max_seq_len': 1024, 'train.seq_len': 1000,
      'train.steps': 3})
  assert run.finish() != 0
  assert run.progress() == 0
  assert not {'checkpoints', 'tb', 'config.json'} & set(os.listdir(workdir)), os.listdir(workdir)
  error_line(run.err, r'train\.seq_len=1000', f'{split} split', r'train\.seq_len <= \d+',
             f'{advice} data\\.valid_fraction')


def test_a_deeper_mtp_than_the_checkpoint_is_refused_without_touching_files(
    trained, tmp_path, corpus):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  before = snapshot(workdir)
  run = Launch(workdir, corpus, {'train.steps': 6, 'mtp.depth': 2})
  assert run.finish() == 2
  error_line(run.err, r'mtp\.depth: 1 -> 2')
  assert snapshot(workdir) == before
