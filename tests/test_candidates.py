"""experiments/candidates.py on a model trained here (its tokenizer and validation prompts come
from its data): the chain and first-draft candidates beside `ar`, every greedy row `ar`'s.
Timings are not asserted."""

import json

from conftest import assert_user_error, run_script, text_config
from mtp_jax import train
from mtp_jax.config import as_flags


def test_candidates_sweep_on_a_model_trained_here(tmp_path):
  config = text_config(**{'decode.max_new_tokens': 8, 'decode.prompt_len': 6,
                          'decode.bench_prompts': 2, 'decode.prompts': ''})
  workdir = str(tmp_path / 'run')
  train.train(config, workdir)
  out = tmp_path / 'rows.json'
  proc = run_script('experiments/candidates.py', '--config', 'configs/base.py', '--workdir',
                    workdir, '--draft_lens', '1,2', '--candidates', '1,2', '--depths', '1',
                    '--rounds', '1', f'--json={out}', *as_flags(config), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())['rows']
  assert [(r['draft_len'], r['candidates']) for r in rows] == [(0, 1), (1, 1), (1, 2), (2, 1),
                                                                (2, 2)]
  assert all(r['identical_to_ar'] for r in rows[1:])
  assert all(1 <= r['tau'] <= r['draft_len'] + 1 for r in rows)
  # --tiles forms compares two bfloat16 halves, which only the tile unit multiplies (turned off
  # here, so that every machine refuses it)
  forms = run_script('experiments/candidates.py', '--config', 'configs/base.py', '--workdir',
                     workdir, '--draft_lens', '1', '--candidates', '1', '--rounds', '1',
                     '--tiles', 'forms', *as_flags(config), timeout=600, MTP_JAX_TILES='0')
  assert_user_error(forms, '--tiles forms', 'tile unit (AMX)')
