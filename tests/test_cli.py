"""launch.py as a user runs it, in a subprocess: a tiny quickstart run and its rerun, and bad
input that ends in one 'error:' line, before anything is compiled or written; every experiment
script refuses a stray argument the same way."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from configs import quickstart
from conftest import (REPO, assert_no_traceback, assert_user_error, cpu_env, launch_summary,
                      pretrained_config, run_script, shrunk, snapshot, start_as_in_a_terminal)
from mtp_jax.config import as_flags
from mtp_jax.pretrained.base import PretrainedError

QUICKSTART = 'configs/quickstart.py'
EMPTY = object()  # stands for a directory holding one empty .txt file


def launch(workdir, overrides=None, flags=(), config=QUICKSTART, **env):
  """launch.py on the tiny quickstart with `overrides`, then `flags` as a user types them, and
  `env` variables."""
  tiny = shrunk(quickstart.get_config(), **{'decode.eval_prompts': 0, 'run_after_train': '',
                                            **(overrides or {})})
  return run_script('launch.py', '--config', config, '--workdir', str(workdir), *as_flags(tiny),
                    *flags, **env)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('cli') / 'run'
  result = launch(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


@pytest.fixture(scope='module')
def empty_corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('empty_corpus')
  (root / 'blank.txt').write_text('')
  return str(root)


def test_a_run_prints_its_summary_and_the_same_command_resumes(trained):
  workdir, result = trained
  summary = launch_summary(result.stdout)
  assert summary['step'] == 2 and summary['stopped_by'] is None
  depth = 3  # the quickstart's mtp.depth
  assert sorted(summary['eval']) == sorted(
      f'{m}/depth_{k}' for m in ['loss', 'accuracy', 'perplexity'] for k in range(depth + 1))
  with open(workdir / 'summary.json') as f:
    assert json.load(f) == summary
  with open(workdir / 'config.json') as f:
    saved = json.load(f)
  assert saved['model']['d_model'] == 32 and saved['mtp']['depth'] == depth
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2']

  checkpoints = snapshot(workdir / 'checkpoints')
  again = launch(workdir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'already trained to step 2' in again.stderr
  assert 'Traceback' not in again.stderr
  resumed = launch_summary(again.stdout)
  assert resumed['step'] == 2 and resumed['eval'] == summary['eval']
  assert snapshot(workdir / 'checkpoints') == checkpoints


def test_compiled_programs_persist_between_runs(trained, tmp_path):
  """With no JAX_COMPILATION_CACHE_DIR (the suite sets one), launch.py keeps what it compiles
  under $MTP_JAX_CACHE/xla; the next run finds every program there and gives the same results."""
  workdir, result = trained
  cache = tmp_path / 'xla'
  env = {'JAX_COMPILATION_CACHE_DIR': None, 'MTP_JAX_CACHE': str(tmp_path),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  used, evals = [], []  # {entry: when it was last read or written}, per run
  for _ in range(2):
    run = launch(workdir, flags=['--mode=eval'], **env)
    assert run.returncode == 0, run.stderr[-3000:]
    evals.append(launch_summary(run.stdout)['eval'])
    used.append({p.name: p.read_bytes() for p in cache.glob('*-atime')})
  assert used[0] and sorted(used[1]) == sorted(used[0])  # nothing compiled anew
  assert all(used[1][name] != used[0][name] for name in used[0])  # every entry read
  assert evals[0] == evals[1] == launch_summary(result.stdout)['eval']


# name: (overrides, raw flags, config file, words of the error line). A misspelled field is only
# a raw flag: no config holds it.
CASES = {
    'missing corpus': ({'data.sources': '/nonexistent/x'}, [], QUICKSTART,
                       ['data.sources', "'/nonexistent/x' does not exist"]),
    'empty corpus': ({'data.sources': EMPTY}, [], QUICKSTART, ['data.sources', 'corpus is empty']),
    'unknown key': ({}, ['--config.train.stepz=3'], QUICKSTART, ['no such field', 'stepz']),
    'heads do not divide width': ({'model.num_heads': 3}, [], QUICKSTART,
                                  ['model.num_heads=3 must divide model.d_model=32']),
    'odd head width': ({'model.head_dim': 7}, [], QUICKSTART,
                       ['model.head_dim must be an even integer', '7']),
    'negative depth': ({'mtp.depth': -1}, [], QUICKSTART, ['mtp.depth', '-1']),
    'negative head width': ({'mtp.head_mlp_dim': -8}, [], QUICKSTART,
                            ['mtp.head_mlp_dim', '-8']),
    'no head blocks': ({'mtp.head_blocks': 0}, [], QUICKSTART, ['mtp.head_blocks', '0']),
    'negative feature weight': ({'train.feature_weight': -0.5}, [], QUICKSTART,
                                ['train.feature_weight must be a number >= 0', '-0.5']),
    'missing config file': ({}, [], 'configs/nope.py', ['cannot load the config file', 'nope.py']),
    'negative seed': ({}, ['--config.seed=-1'], QUICKSTART,
                      ['seed must be an integer in 0..4294967295', '-1']),
    'a model past memory': ({'model.d_model': 2**30}, [], QUICKSTART,
                            ['the model needs at least', 'more than the', 'model.* and mtp.*']),
    # eval reads batches of train.batch_size windows too, also as a later mode (run.check_modes)
    'eval batches past memory': ({'train.batch_size': 2**31 - 1}, ['--mode=eval'], QUICKSTART,
                                 ['a batch of train.batch_size=2147483647 token windows',
                                  'model.* and mtp.* and train.batch_size']),
    'eval after demo past memory': ({'train.batch_size': 2**31 - 1}, ['--mode=demo,eval'],
                                    QUICKSTART,
                                    ['a batch of train.batch_size=2147483647 token windows']),
}


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, trained, empty_corpus, tmp_path):
  overrides, flags, config, words = CASES[case]
  overrides = {k: empty_corpus if v is EMPTY else v for k, v in overrides.items()}

  # A fresh workdir: the error comes before any checkpoint, log or config is written, and
  # before anything is compiled (JAX says each compilation); not even the directory is made.
  fresh = tmp_path / 'fresh'
  result = launch(fresh, overrides, flags, config, JAX_LOG_COMPILES='1')
  assert_user_error(result, *words)
  assert 'Compiling' not in result.stderr, result.stderr[-3000:]
  assert not fresh.exists()

  # The workdir of a finished run: the same error, and not one file changes.
  workdir, _ = trained
  before = snapshot(workdir)
  assert_user_error(launch(workdir, overrides, flags, config), *words)
  assert snapshot(workdir) == before


def test_input_outside_the_config_fields_is_one_line_and_writes_nothing(tmp_path):
  """What launch.py is given besides config fields: an extra argument, a config file whose own
  code fails, a workdir that is a file or lies under one, or empty, or where it cannot be made, a
  workdir whose config.json is damaged."""
  assert_user_error(launch(tmp_path / 'a', flags=['train']), 'unexpected arguments: train')
  assert_user_error(run_script('launch.py', '--config', 'configs/nope.py'),  # no override
                    'cannot load the config file', 'nope.py')
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config():\n  return undefined_name\n')
  assert_user_error(launch(tmp_path / 'b', config=str(broken)), 'cannot load the config file',
                    "NameError: name 'undefined_name' is not defined")
  assert_user_error(launch(tmp_path / 'c', config=QUICKSTART + ':extra'), 'Error whilst parsing',
                    'get_config() takes 0 positional arguments but 1 was given')
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  assert_user_error(launch(a_file), f'--workdir {a_file} is a file')
  assert_user_error(launch(a_file / 'run'), f'--workdir {a_file / "run"}: {a_file} is a file')
  # an empty value is not the default folder (whose run it would resume); a folder no one can
  # make, though os.access says root may (/proc), is said before anything
  assert_user_error(launch(''), '--workdir is empty: give a folder, or leave the flag out')
  assert_user_error(launch('/proc/mtp_jax_run'), '--workdir /proc/mtp_jax_run: /proc is not a '
                    'directory this user can write in')
  assert_user_error(launch(tmp_path / 'd', {'data.cache_dir': '/proc/mtp_jax_cache'}),
                    'data.cache_dir /proc/mtp_jax_cache: /proc is not a directory')
  damaged = tmp_path / 'damaged'
  damaged.mkdir()
  (damaged / 'checkpoints' / '1').mkdir(parents=True)  # the config.json of a run that saved
  for text in (b'{"model": ', b'\xff\xfe{}', b'[1, 2]'):  # cut short, not UTF-8, not an object
    (damaged / 'config.json').write_bytes(text)
    assert_user_error(launch(damaged), 'config.json is not a readable run config')
  assert sorted(os.listdir(tmp_path)) == ['a_file', 'broken.py', 'damaged']
  assert sorted(os.listdir(damaged)) == ['checkpoints', 'config.json']


def test_a_misspelled_field_in_a_config_file_is_one_line(tmp_path):
  """base's fields are locked, so a config file's typo is refused as a flag's is (it was a new
  field, ignored, and recorded in config.json)."""
  typo = tmp_path / 'typo.py'
  typo.write_text('from configs import base\n\n\ndef get_config():\n  c = base.get_config()\n'
                  '  c.train.stepz = 3\n  return c\n')
  result = run_script('launch.py', '--config', str(typo), '--workdir', str(tmp_path / 'run'))
  assert_user_error(result, 'the config has no such field', 'Did you mean "steps" instead of '
                    '"stepz"?', '(in the config file)')
  # with no --config, the default file is loaded, and its overrides applied, as its flag is
  # defined (a traceback there)
  result = run_script('launch.py', '--workdir', str(tmp_path / 'run'), '--config.train.stepz=3')
  assert_user_error(result, 'the config has no such field', 'overrides given: --config.train.stepz')
  assert sorted(os.listdir(tmp_path)) == ['typo.py']


def test_a_config_without_a_model_file_is_checked_before_jax_is_imported(tmp_path):
  """launch.py reports a bad --mode, a --workdir that is a file or lies under one, a prompt file
  generate could not read and a bad field of a config that names no model file (an infinite
  number, an unknown run_after_train mode among them) before it imports JAX: with a `jax` that cannot be imported first on the
  path, each is still its one line, while a run that passes them meets the broken import."""
  fake = tmp_path / 'nojax' / 'jax'
  fake.mkdir(parents=True)
  (fake / '__init__.py').write_text("raise ImportError('jax imported')\n")
  path = str(tmp_path / 'nojax')
  assert_user_error(launch(tmp_path / 'a', {'mtp.depth': -1}, PYTHONPATH=path),
                    'mtp.depth must be an integer >= 0, got -1')
  assert_user_error(launch(tmp_path / 'b', flags=['--mode=nope'], PYTHONPATH=path),
                    '--mode: nope is not one of train, eval')
  # prompts given to modes that would ignore them
  assert_user_error(launch(tmp_path / 'b', flags=['--mode=bench', '--prompt=x'], PYTHONPATH=path),
                    '--prompt is read by --mode demo and generate, not by bench')
  assert_user_error(launch(tmp_path / 'b', flags=['--mode=demo', '--prompt_file=p.txt'],
                           PYTHONPATH=path),
                    '--prompt_file is read by --mode generate, not by demo')
  assert_user_error(launch(tmp_path / 'b', flags=['--mode=generate', '--prompt=x',
                                                  '--prompt_file=p.txt'], PYTHONPATH=path),
                    'give generate --prompt or --prompt_file, not both')
  (tmp_path / 'file').write_text('')
  assert_user_error(launch(tmp_path / 'file', flags=['--mode=eval'], PYTHONPATH=path),
                    f'--workdir {tmp_path / "file"} is a file, not a directory')
  assert_user_error(launch(tmp_path / 'file' / 'run', flags=['--mode=eval'], PYTHONPATH=path),
                    f'--workdir {tmp_path / "file" / "run"}: {tmp_path / "file"} is a file')
  # infinities pass every bound (train.lr=inf is > 0); run_after_train's modes
  assert_user_error(launch(tmp_path / 'a', {'train.lr': float('inf')}, PYTHONPATH=path),
                    'train.lr must be a finite number, got inf')
  # ... but train.grad_clip=inf is no clipping: it passes, to the broken import
  proc = launch(tmp_path / 'c', {'train.grad_clip': float('inf')}, PYTHONPATH=path)
  assert proc.returncode == 1 and 'ImportError: jax imported' in proc.stderr
  assert_user_error(launch(tmp_path / 'a', {'run_after_train': 'bench,nope'}, PYTHONPATH=path),
                    "run_after_train: 'nope' is not one of demo, bench, eval")
  # a prompt file generate could not read, said before the modes before it run and write
  (fake / 'latin1.txt').write_bytes(b'caf\xe9\n')
  for prompt_file, words in ((tmp_path / 'none.txt', f"--prompt_file: no file '{tmp_path}/none.txt'"),
                             (fake / 'latin1.txt', 'latin1.txt\' as UTF-8 text')):
    assert_user_error(launch(tmp_path / 'a', flags=['--mode=train,generate',
                                                    f'--prompt_file={prompt_file}'],
                             PYTHONPATH=path), words)
  assert_user_error(launch(tmp_path / 'a', flags=['--mode=generate', '--prompt=abc\udcff'],
                           PYTHONPATH=path), '--prompt is not UTF-8 text')
  # a prompt file that holds no prompt, as --prompt_file and as decode.prompts
  (fake / 'blank.txt').write_text('\n  \n')
  assert_user_error(launch(tmp_path / 'a', flags=['--mode=train,generate',
                                                  f'--prompt_file={fake / "blank.txt"}'],
                           PYTHONPATH=path), f'--prompt_file: {fake / "blank.txt"} has no prompt')
  assert_user_error(launch(tmp_path / 'a', {'decode.prompts': str(fake / 'blank.txt')},
                           PYTHONPATH=path), 'decode.prompts:', 'has no prompt')
  # folders that cannot be: a cache that is a file, a workdir that links to nothing
  assert_user_error(launch(tmp_path / 'a', {'data.cache_dir': str(tmp_path / 'file')},
                           PYTHONPATH=path), f'data.cache_dir {tmp_path / "file"} is a file')
  os.symlink(tmp_path / 'gone', fake / 'link')
  for workdir, shown in ((fake / 'link', ''), (fake / 'link' / 'run', f': {fake / "link"}')):
    assert_user_error(launch(workdir, PYTHONPATH=path),
                      f'--workdir {workdir}{shown} is a link to {tmp_path / "gone"}, which does not')
  # values of the wrong kind
  assert_user_error(launch(tmp_path / 'a', {'model.rope_factors': ('a',) * 4}, PYTHONPATH=path),
                    'model.rope_factors must be empty or', "'a' among them")
  assert_user_error(launch(tmp_path / 'a', {'distributed.coordinator_address': 'nonsense',
                                            'distributed.num_processes': 2}, PYTHONPATH=path),
                    "'host:port' (a port in 1..65535), got 'nonsense'")
  # config files that give no config
  (fake / 'plain.py').write_text('def get_config():\n  return {"model": 1, "data": 2}\n')
  (fake / 'none.py').write_text('def get_config():\n  pass\n')
  for config, words in ((fake / 'plain.py', 'get_config() must return an ml_collections ConfigDict'),
                        (fake / 'none.py', "get_config() returned None (no return statement?)"),
                        ('configs/__init__.py', 'the config file: it defines no get_config()')):
    assert_user_error(run_script('launch.py', '--config', str(config), '--workdir',
                                 str(tmp_path / 'a'), PYTHONPATH=path), words)
  assert_user_error(run_script('launch.py', f'--config={fake / "plain.py"}', '--workdir',
                               str(tmp_path / 'a'), '--config.train.steps=3', PYTHONPATH=path),
                    'get_config() must return an ml_collections ConfigDict')
  proc = launch(tmp_path / 'c', flags=['--mode=eval'], PYTHONPATH=path)
  assert proc.returncode == 1 and 'ImportError: jax imported' in proc.stderr
  assert sorted(os.listdir(tmp_path)) == ['file', 'nojax']


def test_eval_prompts_the_cache_cannot_hold_stop_the_run_at_its_start(trained):
  """The training-time decode's prompts are checked when training starts, not at the first
  evaluation, where the error would also cost that step's checkpoint."""
  workdir, _ = trained
  before = snapshot(workdir)
  result = launch(workdir, {'decode.max_new_tokens': 480, 'decode.eval_prompts': 2,
                           'train.steps': 999})
  assert_user_error(result, 'decode.max_new_tokens=480', 'more than model.max_seq_len')
  assert snapshot(workdir) == before


def test_decoding_settings_that_would_do_nothing_or_mislead_are_said(trained):
  """decode.candidates with decode.method=ar (silently ignored), and demo's prompt too long for
  the cache, whose line named decode.max_new_tokens, which demo does not read."""
  workdir, _ = trained
  before = snapshot(workdir)
  result = launch(workdir, {'decode.method': 'ar', 'decode.candidates': 3},
                  ['--mode=generate', '--prompt=def'])
  assert_user_error(result, 'decode.candidates=3 verifies alternatives to the first MTP draft, '
                    'and decode.method=ar drafts none')
  result = launch(workdir, flags=['--mode=demo', '--prompt=' + 'word ' * 600])
  assert_user_error(result, "new tokens + a verify block of", "demo's")
  assert 'decode.max_new_tokens' not in result.stderr
  assert snapshot(workdir) == before


def test_what_a_mode_would_write_over_is_refused_untouched(trained):
  """A folder where bench writes bench.json, a file where export writes its folder: one line,
  and the thing in the way stays (a traceback, and export's leftovers, before)."""
  workdir, _ = trained
  in_the_way = {'bench': workdir / 'bench.json', 'export': workdir / 'export'}
  in_the_way['bench'].mkdir()
  in_the_way['export'].write_text('notes')
  try:
    for mode, path in in_the_way.items():
      assert_user_error(launch(workdir, flags=[f'--mode={mode}']), f'{path} is not a')
    assert in_the_way['bench'].is_dir() and in_the_way['export'].read_text() == 'notes'
    assert not [name for name in os.listdir(workdir) if name.startswith('export.')]
  finally:
    in_the_way['bench'].rmdir()
    in_the_way['export'].unlink()


def test_a_bench_after_training_that_cannot_run_stops_the_run_at_its_start(trained):
  """run_after_train=bench: the bench's prompts at every S are checked before any step, not after
  the training they would follow (with decode.eval_prompts=0 nothing else decodes)."""
  workdir, _ = trained
  before = snapshot(workdir)
  result = launch(workdir, {'decode.max_new_tokens': 480, 'decode.eval_prompts': 0,
                           'run_after_train': 'bench', 'train.steps': 999})
  assert_user_error(result, 'decode.max_new_tokens=480', 'more than model.max_seq_len')
  assert snapshot(workdir) == before


def test_ctrl_c_while_decoding_is_one_line_and_keeps_what_bench_wrote(trained, tmp_path):
  """Decoding modes have no signal handler of their own (a training stops at its next step and
  saves): Ctrl-C there ends the run with one line and exit code 130, not a traceback, and the
  bench.json a stopped bench has written stays whole, marked incomplete."""
  workdir = shutil.copytree(trained[0], tmp_path / 'run')
  tiny = shrunk(quickstart.get_config(), **{'decode.eval_prompts': 0, 'run_after_train': '',
                                            'decode.bench_rounds': 1000})
  proc = start_as_in_a_terminal('launch.py', '--config', QUICKSTART, '--workdir', str(workdir),
                                *as_flags(tiny), '--mode=bench')
  try:
    deadline = time.time() + 120  # bench.json is first written before anything is compiled
    while not (workdir / 'bench.json').exists() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.2)
    assert proc.poll() is None and (workdir / 'bench.json').exists(), (
        proc.poll(), proc.poll() is not None and proc.communicate()[1][-3000:])
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 130, stderr[-3000:]
  assert_no_traceback(stderr)
  assert stderr.rstrip().endswith('stopped by Ctrl-C'), stderr[-3000:]
  assert json.loads((workdir / 'bench.json').read_text())['complete'] is False


def test_a_ctrl_c_that_lands_in_a_callback_python_only_prints_still_stops_the_command():
  """The race the test above can meet: Ctrl-C while the main thread runs a garbage-collection
  callback (JAX's runs often while a program compiles). Python prints an exception raised there
  and goes on, so without cli.start's hook the command ran on to its end; with it the
  KeyboardInterrupt reaches the command's own code. Other exceptions there are printed as before,
  and so is a Ctrl-C in an exit callback, which ends that callback alone (delivered again, it
  would cut the next one short)."""
  script = textwrap.dedent('''
      import atexit, gc, signal, sys, time
      signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal's process
      from mtp_jax import cli
      cli.start(['command'], persist=False)
      raised = []
      def callback(phase, info):
        if not raised:
          raised.append(phase)
          raise ValueError('printed, not raised')
        if len(raised) == 1:
          raised.append(phase)
          signal.raise_signal(signal.SIGINT)  # KeyboardInterrupt here, inside the callback
      gc.callbacks.append(callback)
      try:
        gc.collect()
        gc.collect()
        time.sleep(30)  # a signal ends it at once
        print('ran on')
      except KeyboardInterrupt:
        print('stopped', flush=True)
        atexit.register(lambda: (time.sleep(0.5), print('the next exit callback ran')))
        atexit.register(signal.raise_signal, signal.SIGINT)  # the first to run
        sys.exit(130)
      ''')
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=cpu_env())
  assert (result.returncode, result.stdout) == (
      130, 'stopped\nthe next exit callback ran\n'), result.stderr[-3000:]
  assert 'ValueError: printed, not raised' in result.stderr
  # the exit callback's KeyboardInterrupt alone is printed
  assert result.stderr.count('KeyboardInterrupt') == 1, result.stderr[-3000:]
  assert 'Exception ignored in atexit callback' in result.stderr


def test_ctrl_c_in_an_experiment_is_one_line():
  """An experiment stopped by Ctrl-C says so in one line (cli.start), not in a traceback through
  JAX, and ends as Ctrl-C ends a process (exit code 130 in a shell)."""
  proc = start_as_in_a_terminal('experiments/bench_matmul.py', '--shapes=8x8x8',
                                '--rounds=100000000', env=cpu_env(JAX_LOG_COMPILES='1'),
                                stdout=subprocess.DEVNULL)
  lines, compiling = [], threading.Event()

  def read():  # all of stderr; `compiling` once main has started, as it compiles
    for line in proc.stderr:
      lines.append(line)
      if 'Compiling' in line:
        compiling.set()
  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    started = compiling.wait(timeout=120)
    assert started, ''.join(lines)[-3000:]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
  finally:
    proc.kill()
  reader.join(timeout=10)
  stderr = ''.join(lines)
  assert proc.returncode == -signal.SIGINT, stderr[-3000:]
  assert stderr.rstrip().endswith('stopped by Ctrl-C'), stderr[-3000:]
  assert_no_traceback(stderr)


@pytest.mark.parametrize('mode', ['eval', 'demo', 'bench', 'export'])
def test_a_mode_that_reads_a_checkpoint_refuses_a_workdir_without_one(mode, tmp_path):
  """A mistyped --workdir: said at once, before the data and tokenizer a model trained here would
  be read with are made there."""
  workdir = tmp_path / 'typo'
  assert_user_error(launch(workdir, flags=[f'--mode={mode}']), f'no checkpoint in {workdir}; '
                    'train first')
  assert not workdir.exists()


def test_a_demo_after_training_that_cannot_run_stops_the_run_at_its_start(trained, tmp_path):
  """run_after_train=demo: a model without heads to show, or a demo prompt the cache cannot hold,
  is refused before any step, not after the training it would follow."""
  result = launch(tmp_path / 'd0', {'mtp.depth': 0, 'run_after_train': 'demo'})
  assert_user_error(result, "demo shows MTP heads' drafts, but mtp.depth=0")
  assert not (tmp_path / 'd0').exists()  # before its data and tokenizer were made
  workdir, _ = trained
  before = snapshot(workdir)
  result = launch(workdir, {'decode.demo_prompt': 'word ' * 600, 'run_after_train': 'demo',
                            'train.steps': 999})
  assert_user_error(result, 'more than model.max_seq_len')
  assert snapshot(workdir) == before


def test_a_mode_after_training_has_its_input_checked_before_the_first_step(trained, tmp_path):
  """train,generate and train,demo on a model trained here, whose tokenizer its data gives: the
  later mode's prompts are checked once the data is ready, before any step, not after the
  training they follow (nothing is written)."""
  workdir, _ = trained
  before = snapshot(workdir)
  ids = tmp_path / 'ids.txt'
  ids.write_text('def\nids: 1 2 99999\n')
  for flags, words in (
      (['--mode=train,generate', f'--prompt_file={ids}'],
       ['prompt 2 has token ids outside the vocabulary']),
      (['--mode=train,demo', '--prompt=ids: 5 99999'],  # token ids as generate takes them
       ['prompt 1 has token ids outside the vocabulary']),
      (['--mode=train,demo', '--prompt=' + 'word ' * 600], ['more than model.max_seq_len'])):
    assert_user_error(launch(workdir, {'train.steps': 3}, flags), *words)
    assert snapshot(workdir) == before


def test_a_workdir_of_another_model_is_refused_untouched(trained, tmp_path):
  workdir, _ = trained
  before = snapshot(workdir)
  result = launch(workdir, {'model.d_model': 64})
  assert_user_error(result, 'different model', 'model.d_model: 32 -> 64')
  assert snapshot(workdir) == before
  # without its config.json the checkpoints cannot be checked (another model's would read as
  # damaged): said so
  copy = shutil.copytree(workdir, tmp_path / 'copy')
  os.remove(copy / 'config.json')
  before = snapshot(copy)
  assert_user_error(launch(copy, {'model.d_model': 64}), 'holds checkpoints but no config.json')
  assert snapshot(copy) == before


def test_a_workdir_that_is_the_models_own_directory_is_refused_untouched(tmp_path):
  """--workdir given the model's directory: its config.json is not a run's, and training would
  have written its own over it (the directory no longer loaded anywhere); generate, which reads
  the model file alone, writes nothing there and runs."""
  from conftest import pretrained_config_file, random_llama, write_hf
  model = write_hf(tmp_path / 'model', random_llama())
  config = pretrained_config_file(tmp_path / 'config.py', model, {
      'mtp.depth': 1, 'mtp.init_from': 'last_block', 'model.max_seq_len': 256,
      'decode.max_new_tokens': 4})
  before = snapshot(model)
  result = run_script('launch.py', '--config', config, '--workdir', model,
                      '--config.train.steps=1')
  assert_user_error(result, f'{model} holds a config.json that is not a run\'s')
  assert snapshot(model) == before
  result = run_script('launch.py', '--config', config, '--workdir', model, '--mode', 'generate',
                      '--prompt', 'hi')
  assert result.returncode == 0, result.stderr[-3000:]
  assert snapshot(model) == before
  # its heads, 8 entries wide, are narrower than the attention kernel takes
  assert 'these (8 wide, 2 a kv head) attend in XLA instead' in result.stderr


@pytest.fixture(scope='module')
def tiny_llama(tmp_path_factory):
  """A tiny random Llama as a GGUF file, good and broken copies, and a config file on it."""
  import gguf
  from conftest import pretrained_config_file, random_llama, write_gguf
  root = tmp_path_factory.mktemp('llama')
  tensors = random_llama()
  files = {'good': write_gguf(root / 'good.gguf', tensors),
           'gemma': write_gguf(root / 'gemma.gguf', tensors, arch='gemma'),
           'qwen': write_gguf(root / 'qwen.gguf', tensors, arch='qwen2'),  # without its biases
           'f64': write_gguf(root / 'f64.gguf', {**tensors, 'model.norm.weight':
                                                 tensors['model.norm.weight'].astype(np.float64)}),
           'q4': write_gguf(root / 'q4.gguf', tensors, qtype=gguf.GGMLQuantizationType.Q8_0,
                            eot=261, pad='<|im_end|>')}
  data = open(files['good'], 'rb').read()
  files['cut'] = str(root / 'cut.gguf')
  with open(files['cut'], 'wb') as f:
    f.write(data[:len(data) // 2])
  configs = {name: pretrained_config_file(root / f'{name}_config.py', path, {
      'mtp.depth': 2, 'model.max_seq_len': 256, 'decode.max_new_tokens': 8, 'decode.prompts': ''})
      for name, path in files.items()}
  return files, configs


def test_several_modes_check_each_decoding_modes_input_before_the_first_runs(tiny_llama,
                                                                             tmp_path):
  """demo,generate: generate's prompts and the cache they need are checked before demo runs (it
  compiled and printed its demo first), as demo's are, and an eval's checkpoint (it ran after
  the demo); nothing is written. A prompt file read once only (a pipe) is read once."""
  _, configs = tiny_llama
  empty_ids, short = tmp_path / 'prompts.txt', tmp_path / 'short.txt'
  empty_ids.write_text('the tin\nids:\n')
  short.write_text('the tin\n')
  common = ['--config', configs['good'], '--workdir', str(tmp_path / 'run'),
            '--config.mtp.init_from=last_block']
  for flags, words in (
      (['--mode=demo,generate', f'--prompt_file={empty_ids}'], ['prompt 2 is empty']),
      (['--mode=demo,generate', '--prompt=hi', '--config.decode.max_new_tokens=3000'],
       ['decode.max_new_tokens=3000', 'more than model.max_seq_len=256']),
      (['--mode=generate,demo', f'--prompt_file={short}', '--prompt=' + 'word ' * 300],
       ["demo's 3 new tokens"]),
      (['--mode=demo,eval'], [f'no checkpoint in {tmp_path / "run"}; train first'])):
    result = run_script('launch.py', *common, *flags)
    assert_user_error(result, *words)
    assert 'top-5' not in result.stdout and '--- prompt' not in result.stdout
  assert sorted(os.listdir(tmp_path)) == ['prompts.txt', 'short.txt']
  result = run_script('launch.py', *common, '--mode=demo,generate', '--prompt_file=/dev/stdin',
                      stdin='the tin\nids: 5 6\n')
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(launch_summary(result.stdout)['outputs']) == 2


# name: (model file, flags, words of the error line). The config files leave the file's fields
# unset, so a field that contradicts the file comes as the flag a user types.
PRETRAINED_CASES = {
    'contradicting field': ('good', ['--config.model.d_model=64'],
                            ['model.d_model=64 contradicts good.gguf, which has 32']),
    'architecture': ('gemma', [], ["architecture 'gemma'; only 'llama', 'qwen2', 'qwen3'"]),
    'missing tensor': ('qwen', [], ["qwen.gguf has no tensor 'blk.0.attn_q.bias'"]),
    'tensor type': ('f64', [], ["tensor 'output_norm.weight'", 'type F64']),
    'truncated file': ('cut', [], ['cut.gguf is not a readable GGUF file (truncated or damaged']),
    'heads without a trunk': (None, ['--config.mtp.init_from=last_block'],
                              ['mtp.init_from=last_block needs a pretrained trunk']),
    # found only once the model's tokenizer is open, after the run's checkpoints are looked up
    'missing prompt file': ('good', ['--prompt_file=/nonexistent/prompts.txt',
                                     '--config.decode.method=ar'],
                            ["--prompt_file: no file '/nonexistent/prompts.txt'"]),
    # with no checkpoint here and no heads file, the heads would be random
    'random heads': ('good', [], ['no checkpoint in', 'mtp.init_from is empty: the 2 MTP heads '
                                  'would be random']),
}


@pytest.mark.parametrize('case', list(PRETRAINED_CASES))
def test_bad_pretrained_input_is_one_line_and_writes_nothing(case, tiny_llama, tmp_path):
  files, configs = tiny_llama
  model, flags, words = PRETRAINED_CASES[case]
  fresh = tmp_path / 'fresh'
  config = configs[model] if model else QUICKSTART
  prompt = [] if any(f.startswith('--prompt_file') for f in flags) else ['--prompt', 'hello']
  result = run_script('launch.py', '--config', config, '--workdir', str(fresh), '--mode',
                      'generate', *prompt, *flags)
  assert_user_error(result, *words)
  assert not fresh.exists() or os.listdir(fresh) == []


def test_a_pretrained_model_generates_and_exports(tiny_llama, tmp_path):
  """generate with no checkpoint uses the file's trunk (through its chat template); export
  writes an HF directory that imports back to the same logits, and a heads file."""
  files, configs = tiny_llama
  workdir = tmp_path / 'run'
  # a shorter window than the file's 512 positions, which the exported config still gives
  common = ['--workdir', str(workdir), '--config.mtp.init_from=last_block',
            '--config.model.max_seq_len=128', '--config.train.seq_len=64']
  result = run_script('launch.py', '--config', configs['q4'], *common, '--mode', 'generate,export',
                      '--prompt', 'the tin', '--config.decode.method=ar')
  assert result.returncode == 0, result.stderr[-3000:]
  # the prompt as the chat template made it, printed as a Python string
  assert repr('<|im_start|>user\nthe tin<|im_end|>\n<|im_start|>assistant\n') in result.stdout
  export = workdir / 'export'
  assert sorted(os.listdir(export)) == sorted(
      ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json',
       'tokenizer_config.json', 'mtp_heads.safetensors'])
  # every file with a plain file's mode (safetensors writes its own 0600, unreadable to others)
  from mtp_jax import atomic
  assert {name: os.stat(export / name).st_mode & 0o777 for name in os.listdir(export)} == {
      name: atomic.new_mode() for name in os.listdir(export)}
  from mtp_jax.pretrained import resolve
  back, original = resolve.open_model(str(export)), resolve.open_model(files['q4'])
  assert back.fields == original.fields and back.eos_id == original.eos_id
  assert back.stop_ids == original.stop_ids == (263, 261)  # the end of a turn too
  # the padding token passed on (transformers pads a batch with it)
  assert back.pad_id == original.pad_id == 263
  assert json.load(open(export / 'tokenizer_config.json'))['pad_token'] == '<|im_end|>'
  from mtp_jax.pretrained import llama
  for name in llama.trunk_shapes(original.fields):  # every tensor of the trunk
    np.testing.assert_array_equal(back.get(name), original.get(name), err_msg=name)
  assert json.load(open(export / 'config.json'))['max_position_embeddings'] == 512
  # No training changed the trunk, so the heads load beside the exported trunk and the original.
  from mtp_jax.pretrained import resolve as pretrained_lib
  for trunk in (str(export), files['q4']):
    config = pretrained_config(trunk, **{'mtp.init_from': str(export / 'mtp_heads.safetensors')})
    pretrained_lib.check_heads_init(pretrained_lib.resolve_config(config))
  with pytest.raises(PretrainedError, match='heads trained on another trunk'):
    config = pretrained_config(files['good'],
                               **{'mtp.init_from': str(export / 'mtp_heads.safetensors')})
    pretrained_lib.check_heads_init(pretrained_lib.resolve_config(config))


EXPERIMENTS = sorted(os.path.relpath(p, REPO) for p in glob.glob(f'{REPO}/experiments/*.py'))


@pytest.mark.parametrize('script', EXPERIMENTS)
def test_every_experiment_refuses_a_stray_argument_in_one_line(script):
  """Each experiment starts through cli.start, as launch.py does: a positional argument (a flag
  typed without its dashes) is one error line and exit 2, before any work."""
  assert_user_error(run_script(script, 'rounds=3'), 'unexpected arguments: rounds=3')


def test_an_experiments_bad_flag_value_is_one_line_before_any_work(tmp_path, capsys):
  """A count out of its bounds (a timing of 0 rounds printed inf, 0 threads was a traceback), an
  empty or unknown list value, a folder that is a file: one error line, exit 2, before the
  script loads or times anything; a peer package missing is said, not an ImportError."""
  (tmp_path / 'file').write_text('')
  (tmp_path / 'ids.txt').write_text('ids: 1 2 3\n')
  for args, words in (
      (['experiments/bench_matmul.py', '--rounds=0'], 'flag --rounds=0: 0 is not a positive'),
      (['experiments/bench_matmul.py', '--shapes='], '--shapes: give at least one'),
      (['experiments/bench_peers.py', '--threads=0'], 'flag --threads=0: 0 is not a positive'),
      (['experiments/bench_peers.py', '--skip=hf,hf_lookup,llama_f32,llama_q4_1,llama_lookup',
        f'--prompts={tmp_path / "ids.txt"}'],
       f'--prompts: prompt 1 of {tmp_path}/ids.txt is token'),
      (['experiments/draft_vocab.py', '--dtypes=bogus'], '--dtypes takes some of float32,'),
      (['experiments/draft_vocab.py', '--sizes=-5'], "--sizes takes 'full' or positive"),
      (['experiments/ablate.py', f'--root={tmp_path / "file"}'], f'--root {tmp_path}/file is a'),
      (['experiments/bench_train.py', '--flops_only', '--config.train.seq_len=0'],
       'train.seq_len must be an integer >= 1, got 0'),
      (['experiments/bench_train.py', '--flops_only', '--markdown'],
       '--flops_only prints the FLOP table alone; it takes no --markdown'),
      (['experiments/bench_train.py', '--flops_only', '--depths='], '--depths: give at least one'),
      (['experiments/candidates.py', '--candidates=x'], '--candidates takes positive integers'),
      (['experiments/draft_vocab.py', f'--json={tmp_path}'], f'--json {tmp_path} is a directory'),
      (['experiments/bench_peers.py', '--threads=999', '--skip=hf,hf_lookup,llama_f32,llama_q4_1,'
        'llama_lookup'], '--threads=999: this process may use'),
      # a workdir with no checkpoint: CheckpointError is a user's mistake too
      (['experiments/decode_profile.py', '--config=configs/quickstart.py',
        f'--workdir={tmp_path / "none"}'], f'no checkpoint in {tmp_path / "none"}; train first'),
      # a workdir that is a file, an output where no file can be made, the flags against the
      # model: before the model is made (they were tracebacks, or said after compiling)
      (['experiments/decode_profile.py', '--config=configs/quickstart.py',
        f'--workdir={tmp_path / "file"}'], f'--workdir {tmp_path / "file"} is a file, not a'),
      ([*tiny_random('experiments/bench_sampling.py'), '--json=/proc/mtp_jax.json'],
       '--json /proc: /proc is not a directory this user can write in'),
      ([*tiny_random('experiments/bench_sampling.py'), '--draft_len=5'],
       "the mtp rows draft 1 to 1 tokens (the model's heads), got --draft_len 5"),
      ([*tiny_random('experiments/bench_sampling.py'), '--top_k=256'],
       '--top_k 256 keeps every one of the 256 tokens'),
      ([*tiny_random('experiments/bench_sampling.py'), '--decode_prompts=0', '--draft_len=1'],
       '--draft_len sets the mtp rows of --decode_prompts, which is 0'),
      ([*tiny_random('experiments/argmax.py'), '--config.decode.kernels=False'],
       'the config decodes without kernels'),
      ([*tiny_random('experiments/decode_profile.py'), '--config.mtp.depth=0'],
       'the model has no MTP heads'),
      (['experiments/bench_train.py', '--flops_only', f'--depths={2**40}'],
       'mtp.depth=1099511627776 is past 2147483647'),
      (['experiments/bench_train.py', '--peak_tflops=nan'],
       '--peak_tflops must be a finite number, got nan'),
      # sizes past memory (they were out-of-memory errors after minutes of work)
      ([*tiny_random('experiments/decode_profile.py'), '--batches=1,100000000'],
       'decoding 100,000,000 rows at once needs at least'),
      (['experiments/row_kernel.py', '--layers=100000000'], 'the matrices need at least'),
      ([*tiny_random('experiments/argmax.py'), '--batches=8,2147483647'],
       'logits of 2,147,483,647 x 2 x 256 need at least'),
      ([*tiny_random('experiments/bench_sampling.py'), '--rows=4,2147483647'],
       '2,147,483,647 rows of logits need at least'),
      (['experiments/output_projection.py', '--rows=2147483647'],
       '2,147,483,647 rows need at least'),
      (['experiments/bench_matmul.py', '--shapes=8x8x8,100000x100000x100000'],
       'the product 100000x100000x100000 needs at least'),
      (['experiments/bench_matmul.py', '--shapes=2x\u00b2x3'], '--shapes takes M x K x N')):
    result = run_script(*args, JAX_LOG_COMPILES='1')
    assert_user_error(result, words)
    assert 'Compiling' not in result.stderr, (args, result.stderr[-3000:])
  from mtp_jax import cli
  with pytest.raises(SystemExit) as stop:
    cli.require_peers('json', 'no_such_peer_package')
  assert stop.value.code == 2
  assert capsys.readouterr().err.startswith('error: no_such_peer_package is not installed in')
  assert sorted(os.listdir(tmp_path)) == ['file', 'ids.txt']


@pytest.mark.parametrize('script, flags, words', [
    ('experiments/argmax.py', [], ['prompt of 250 tokens', 'more than model.max_seq_len=256']),
    ('experiments/bench_sampling.py', [],
     ['prompt of 250 tokens', 'more than model.max_seq_len=256']),
    ('experiments/decode_profile.py', [],
     ['prompt of 250 tokens', 'more than model.max_seq_len=256']),
    ('experiments/decode_profile.py', ['--positions=8'],
     ['--positions 8: after a prompt of 250 tokens they pass model.max_seq_len=256']),
    # the memory check a Session makes, on the random weights' path too
    ('experiments/decode_profile.py', ['--config.model.d_model=1048576'],
     ['the model needs at least', 'check the sizes in model.* and mtp.*'])])
def test_random_weights_come_after_the_checks(script, flags, words):
  """Random weights (inference.decode_inputs) are made, and compiled, only when a script reads
  them: a prompt its sweep or loops cannot hold (a cache past model.max_seq_len) is one line, exit
  2, before anything compiles, though each script compiles other work first (argmax.py's and
  bench_sampling.py's parts 1). argmax.py's was a traceback; then a line after compiling. That
  compilations reach a script's stderr is shown where decode_profile.py runs
  (test_decode_profile)."""
  result = run_script(*tiny_random(script), '--config.decode.prompt_len=250',
                      '--config.model.max_seq_len=256', *flags, JAX_LOG_COMPILES='1')
  assert_user_error(result, *words)
  assert 'Compiling' not in result.stderr, result.stderr[-3000:]


def tiny_random(script: str) -> list[str]:
  """A decoding script on random weights in a tiny shape."""
  return [script, '--config=configs/base.py', '--random', '--config.model.num_layers=1',
          '--config.model.d_model=64', '--config.data.vocab_size=256']


def test_list_flags_take_positive_integers_in_ascii_digits():
  """config.positive_ints, which every experiment's list flags go through: '²' is a digit to
  str.isdigit but not to int(), and was a traceback; an empty list only where the flag allows
  none; counts a run can hold, each once."""
  from mtp_jax.config import ConfigError, positive_ints
  assert positive_ints(['1', '32'], '--rows') == [1, 32]
  assert positive_ints([], '--rows', allow_empty=True) == []
  with pytest.raises(ConfigError, match='--rows takes positive integers, got none'):
    positive_ints([], '--rows')
  for bad in ('0', 'x', '²', '-1', ' 2', ''):
    with pytest.raises(ConfigError, match='--rows takes positive integers'):
      positive_ints(['4', bad], '--rows')
  # a count past the step counter's (a memory error after compiling), a value given twice (timed
  # twice)
  with pytest.raises(ConfigError, match='--rows: 1099511627776 is past 2147483647'):
    positive_ints(['4', str(2**40)], '--rows')
  with pytest.raises(ConfigError, match='--rows takes each value once, got 4,1,4'):
    positive_ints(['4', '1', '4'], '--rows')
