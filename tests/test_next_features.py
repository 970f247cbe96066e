"""experiments/next_features.py: inside reading_next the heads read the chosen block's features
at the next position, exactly as they read features shifted by hand, and the trunk's own
features stay; outside it nothing changes. The script trains and scores one run per block, and
the shifted features reach training (the runs differ); its flags are one line before any work."""

import json
import os

import jax
import numpy as np
import pytest

import head_agreement  # experiments/, on the path conftest sets
import next_features
from conftest import assert_user_error, heads_config_file, run_script, tiny_model
from mtp_jax.model import MTPLanguageModel, init_params


def test_the_heads_read_the_block_at_the_next_position():
  cfg = tiny_model(**{'model.num_layers': 3, 'mtp.depth': 2, 'mtp.feature_layers': '0,1'})
  params = init_params(cfg, jax.random.key(0))
  B, T, D = 2, 6, cfg.d_model
  h0 = jax.random.normal(jax.random.key(1), (B, T, 3 * D))  # the last hidden state, blocks 0, 1
  tokens = jax.random.randint(jax.random.key(2), (B, T + cfg.mtp_depth + 1), 0, cfg.vocab_size)

  def states(h):  # looked up at each call, as the training step and the scoring do
    return MTPLanguageModel(cfg).apply(params, h, tokens, method=lambda m, *a: m.head_states(*a))

  plain = states(h0)
  by_hand = states(h0.at[:, :-1, 2 * D:].set(h0[:, 1:, 2 * D:]))  # block 1's slice, one on
  with next_features.reading_next((0, 1), 1):
    shifted = states(h0)
  np.testing.assert_array_equal(shifted[0], h0)  # the trunk's own features as they were
  for got, want in zip(shifted[1:], by_hand[1:]):
    np.testing.assert_array_equal(got, want)
  assert not np.allclose(shifted[1], plain[1])
  with next_features.reading_next((0, 1), 0):  # a block with another after it
    first = states(h0)
  by_hand = states(h0.at[:, :-1, D:2 * D].set(h0[:, 1:, D:2 * D]))
  for got, want in zip(first[1:], by_hand[1:]):
    np.testing.assert_array_equal(got, want)
  with next_features.reading_next((0, 1), None):
    np.testing.assert_array_equal(states(h0)[1], plain[1])
  np.testing.assert_array_equal(states(h0)[2], plain[2])  # the patch is gone after it


def test_a_run_per_block_trained_and_scored(tmp_path):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('hello there\nwhat is a cat\n')
  config = heads_config_file(tmp_path, **{'mtp.depth': 1, 'mtp.init_from': '',
                                          'mtp.feature_layers': '0',
                                          'decode.prompts': str(prompts),
                                          'decode.bench_prompts': 2})
  root, out = tmp_path / 'runs', tmp_path / 'next.json'
  proc = run_script('experiments/next_features.py', '--config', config, '--blocks=none,0',
                    f'--root={root}', f'--json={out}', timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert [r['block'] for r in result['runs']] == [None, 0]
  for run in result['runs']:
    assert list(run['agreement']) == ['held-out prompts']
    assert 0 <= run['agreement']['held-out prompts'] <= 1
  assert '| block 0 at i + 1, the others at i | 1 |' in proc.stdout
  # the same data (one cache, under ROOT/cache), seed and steps: only the shifted features tell
  # the runs apart
  losses = [json.loads((root / f'next_{b}' / 'summary.json').read_text())['eval']['loss/depth_1']
            for b in ('none', '0')]
  assert losses[0] != losses[1]
  # one feature cache for both, under ROOT/cache: none in a run's own workdir
  assert len(os.listdir(root / 'cache' / 'features')) == 1
  assert not any((root / f'next_{b}' / 'data').exists() for b in ('none', '0'))
  # that cache as --cache (head_agreement.check_cache): it keeps block 0's features, not 1's
  cache = str(root / 'cache' / 'features' / os.listdir(root / 'cache' / 'features')[0])
  head_agreement.check_cache(cache, (0,))
  with pytest.raises(ValueError, match=r'keeps the features of blocks \[0\], the heads read \[1\]'):
    head_agreement.check_cache(cache, (1,))

  for flags, words in ((['--blocks=1'], "--blocks takes 'none' and blocks of mtp.feature_layers "
                                        "(0), got '1'"),
                       (['--blocks=0,0'], '--blocks names 0 twice'),
                       (['--blocks=none', f'--cache={tmp_path / "none"}'],
                        f'--cache: {tmp_path / "none"} is not a finished feature cache'),
                       (['--blocks=0', '--config.decode.eval_prompts=2'],
                        'a run whose module reads one at i + 1 cannot decode')):
    result = run_script('experiments/next_features.py', '--config', config, *flags,
                        f'--root={tmp_path / "other"}', JAX_LOG_COMPILES='1')
    assert_user_error(result, words)
    assert 'Compiling' not in result.stderr, result.stderr[-3000:]
  assert not (tmp_path / 'other').exists()
