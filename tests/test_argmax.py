"""experiments/argmax.py on random tiny weights: both argmaxes timed alone over every shape asked
for, and greedy decoding with each at every S giving `ar`'s output. Timings themselves are not
asserted (a busy machine makes them noisy)."""

import re

from conftest import assert_user_error, run_script, tiny_config
from mtp_jax.config import as_flags


def test_argmax_script_times_both_and_decodes_alike():
  config = tiny_config(**{'model.num_layers': 1, 'data.vocab_size': 256, 'model.d_model': 64,
                          'decode.max_new_tokens': 12, 'decode.prompt_len': 6})
  proc = run_script('experiments/argmax.py', '--config', 'configs/base.py', '--random',
                    '--batches', '1,2', '--rounds', '1', '--calls', '2', '--prompts', '2',
                    *as_flags(config), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # D = 2: T = 1 and 3; every token drafts (no reduced vocabulary), so V = 256 alone
  shapes = re.findall(r'^ +(\d+ x \d+ x \d+): +[\d.]+ +[\d.]+ +[\d.]+x$', proc.stdout, re.M)
  assert shapes == ['1 x 1 x 256', '1 x 3 x 256', '2 x 1 x 256', '2 x 3 x 256'], proc.stdout
  rows = re.findall(r'^  (ar|mtp) S = (\d), (xla|kernel) argmax .* same as it: (\w+)$',
                    proc.stdout, re.M)
  assert rows == [(m, str(S), a, 'True') for S, m in enumerate(['ar', 'mtp', 'mtp'])
                  for a in ('xla', 'kernel')], proc.stdout


def test_argmax_script_refuses_bad_flags_before_anything_runs():
  for flags, words in [(['--random', '--rounds', '0'], ['--rounds', '0']),
                       (['--random', '--prompts', '-1'], ['--prompts', '-1']),
                       (['--random', '--batches', '0'], ['--batches']),
                       ([], ['--workdir', '--random']),
                       (['--random', '--workdir=runs/x'],
                        ['--random decodes random weights and reads no --workdir'])]:
    assert_user_error(run_script('experiments/argmax.py', *flags), *words)
