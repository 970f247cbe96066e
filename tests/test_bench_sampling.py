"""experiments/bench_sampling.py on random tiny weights, read from its JSON: the filter timed
alone at each row count beside a vocabulary sort, and decoding with each filter for `ar` and
`mtp`. Timings themselves are not asserted (a busy machine makes them noisy)."""

import json

import pytest

from conftest import assert_user_error, run_script, tiny_config
from mtp_jax.config import as_flags


def test_bench_sampling_times_each_filter_and_decodes_with_it(tmp_path):
  config = tiny_config(**{'data.vocab_size': 512, 'decode.max_new_tokens': 8,
                          'decode.prompt_len': 6})
  out = tmp_path / 'sampling.json'
  proc = run_script('experiments/bench_sampling.py', '--config', 'configs/base.py', '--random',
                    '--rows', '1,3', '--decode_prompts', '2', '--rounds', '1', '--top_p', '0.8',
                    '--top_k', '5', f'--json={out}', *as_flags(config), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert (result['vocab'], result['prompts'], result['draft_len'], result['top_p']) == (512, 2, 2,
                                                                                      0.8)
  names = ['temperature only', 'top_p 0.8', 'top_k 5']
  assert [f['rows'] for f in result['filters']] == [1, 3]
  for f in result['filters']:
    assert list(f['ms']) == names + ['vocabulary sort'] and all(t > 0 for t in f['ms'].values())
  rows = result['decoding']
  assert [(r['method'], r['filter']) for r in rows] == [(m, n) for m in ('ar', 'mtp')
                                                        for n in names]
  base = {r['method']: r['tokens_per_s'] for r in rows if r['filter'] == 'temperature only'}
  for r in rows:  # each filter's rate over its method's unfiltered one
    assert r['tokens_per_s'] > 0 and 1 <= r['tau'] <= (1 if r['method'] == 'ar' else 3)
    assert r['over_unfiltered'] == pytest.approx(r['tokens_per_s'] / base[r['method']])
  assert_user_error(run_script('experiments/bench_sampling.py', '--random', '--rows', '0'),
                    '--rows takes positive integers, got 0')
  assert_user_error(run_script('experiments/bench_sampling.py', '--random', '--rounds', '0'),
                    '--rounds', '0')
