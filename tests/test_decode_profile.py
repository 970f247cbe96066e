"""experiments/decode_profile.py on random tiny weights: the loop table has every method with the
iteration counts the decoder really ran and tau / r consistent with its own columns, and there is
one timing per model call of an iteration. Timings themselves are not asserted (a busy machine
makes them noisy)."""

import math
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r'(-?[\d.]+|nan)'


def test_profile_reports_loop_and_model_calls():
  flags = [f'--config.{k}={v}' for k, v in {
      'model.d_model': 32, 'model.num_layers': 1, 'model.num_heads': 4, 'model.num_kv_heads': 2,
      'data.vocab_size': 256, 'mtp.depth': 2, 'decode.max_new_tokens': 16,
      'decode.prompt_len': 6}.items()]
  proc = subprocess.run([sys.executable, 'experiments/decode_profile.py', '--config',
                         'configs/base.py', '--random', '--batches', '1,2', '--rounds', '3',
                         '--calls', '3'] + flags, cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  for B in (1, 2):
    section = out.split(f'batch {B}: per loop iteration')[1].split('per loop iteration')[0]
    rows = re.findall(rf'^(ar|mtp)\s+(\d)\s+(\d+)' + rf'\s+{NUMBER}' * 4 + '$', section, re.M)
    assert [(m, int(S)) for m, S, *_ in rows] == [('ar', 0), ('mtp', 1), ('mtp', 2)]
    iterations = [int(r[2]) for r in rows]
    assert iterations[0] == 15  # 16 new tokens: the first from the prefill, then one an iteration
    assert all(1 <= it <= 15 for it in iterations[1:])
    assert float(rows[0][5]) == 1.0  # ar emits one token per trunk forward
    for _, _, _, _, r, tau, tau_r in rows:
      r, tau, tau_r = float(r), float(tau), float(tau_r)
      if math.isfinite(r) and r >= 0.5:  # printed to 2 decimals: bound the rounding
        assert abs(tau_r - tau / r) <= tau * 0.005 / r ** 2 + 0.005 / r + 0.005
    calls = re.findall(r'^  (trunk, \d+ positions?|draft \d)[^\n]*?([\d.]+) us$', section, re.M)
    assert [c[0] for c in calls] == ['trunk, 1 position', 'trunk, 3 positions', 'draft 1',
                                     'draft 2']
  assert 'bookkeeping' in out
