"""launch.py as a user runs it, in a subprocess: a tiny quickstart run and its rerun, and bad
input that ends in one 'error:' line, before anything is compiled or written."""

import json
import os
import subprocess
import sys
import sysconfig

import pytest

from conftest import snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STDLIB = sysconfig.get_paths()['stdlib']
CORPUS = ','.join(os.path.join(_STDLIB, name) for name in ['textwrap.py', 'difflib.py', 'shlex.py'])
# The quickstart, shrunk to a 1-layer width-32 model that trains 2 steps in seconds.
TINY = {
    'model.d_model': 32, 'model.num_layers': 1, 'train.steps': 2, 'train.batch_size': 2,
    'train.seq_len': 16, 'data.vocab_size': 300, 'data.sources': CORPUS,
    'train.eval_batches': 1, 'decode.eval_prompts': 0, 'run_after_train': '',
}
EMPTY = object()  # stands for a directory holding one empty .txt file


def launch(workdir, overrides=None, config='configs/quickstart.py'):
  flags = [f'--config.{key}={value}' for key, value in {**TINY, **(overrides or {})}.items()]
  return subprocess.run(
      [sys.executable, 'launch.py', '--config', config, '--workdir', str(workdir), *flags],
      cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True,
      timeout=300)


def printed_summary(stdout):
  # The summary is the JSON object on stdout (evaluation lines go to stderr).
  return json.loads(stdout[stdout.index('{'):])


def assert_user_error(result, *words):
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error:'), result.stderr[-3000:]
  for word in words:
    assert word in last, (word, last)


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
  summary = printed_summary(result.stdout)
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
  resumed = printed_summary(again.stdout)
  assert resumed['step'] == 2 and resumed['eval'] == summary['eval']
  assert snapshot(workdir / 'checkpoints') == checkpoints


CASES = {
    'missing corpus': ({'data.sources': '/nonexistent/x'}, None,
                       ['data.sources', "'/nonexistent/x' does not exist"]),
    'empty corpus': ({'data.sources': EMPTY}, None, ['data.sources', 'corpus is empty']),
    'unknown key': ({'train.stepz': 3}, None, ['no such field', 'stepz']),
    'heads do not divide width': ({'model.num_heads': 3}, None,
                                  ['model.num_heads=3 must divide model.d_model=32']),
    'negative depth': ({'mtp.depth': -1}, None, ['mtp.depth', '-1']),
    'negative head width': ({'mtp.head_mlp_dim': -8}, None, ['mtp.head_mlp_dim', '-8']),
    'missing config file': ({}, 'configs/nope.py', ['cannot load the config file', 'nope.py']),
}


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, trained, empty_corpus, tmp_path):
  overrides, config, words = CASES[case]
  overrides = {k: empty_corpus if v is EMPTY else v for k, v in overrides.items()}
  config = config or 'configs/quickstart.py'

  # A fresh workdir: the error comes before any checkpoint, log or config is written (and
  # so before anything is compiled); at most the empty directory exists.
  fresh = tmp_path / 'fresh'
  assert_user_error(launch(fresh, overrides, config), *words)
  assert not fresh.exists() or os.listdir(fresh) == []

  # The workdir of a finished run: the same error, and not one file changes.
  workdir, _ = trained
  before = snapshot(workdir)
  assert_user_error(launch(workdir, overrides, config), *words)
  assert snapshot(workdir) == before


def test_a_workdir_of_another_model_is_refused_untouched(trained):
  workdir, _ = trained
  before = snapshot(workdir)
  result = launch(workdir, {'model.d_model': 64})
  assert_user_error(result, 'different model', 'model.d_model: 32 -> 64')
  assert snapshot(workdir) == before
