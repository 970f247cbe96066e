"""experiments/decode_profile.py on random tiny weights, read from its JSON: every method's loop
row with the iteration count the decoder really ran, one timing per model call of an iteration,
and the traced breakdowns by kind of operation of a trunk call and of each loop's iteration.
Timings themselves are not asserted (a busy machine makes them noisy)."""

import json

from conftest import assert_user_error, run_script, tiny_config
from mtp_jax.config import as_flags


def test_profile_reports_loop_and_model_calls(tmp_path):
  config = tiny_config(**{'model.num_layers': 1, 'data.vocab_size': 256, 'model.d_model': 64,
                          'decode.max_new_tokens': 16, 'decode.prompt_len': 6})
  out = tmp_path / 'profile.json'
  proc = run_script('experiments/decode_profile.py', '--config', 'configs/base.py', '--random',
                    '--batches', '1,2', '--rounds', '2', '--calls', '3', '--breakdown',
                    '--positions', '6', f'--json={out}',
                    *as_flags(config), timeout=600, JAX_LOG_COMPILES='1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  # the positive control of the tests that no compilation comes before a script's one-line
  # error (test_cli): compilations do reach a script's stderr
  assert 'Compiling' in proc.stderr
  result = json.loads(out.read_text())
  assert [b['batch'] for b in result['batches']] == [1, 2]
  for batch in result['batches']:
    loops = batch['loops']
    assert [row['S'] for row in loops] == [0, 1, 2]
    # 16 new tokens: the first from the prefill, then one an iteration for ar; a draft that is
    # accepted saves iterations, so mtp never runs more.
    assert loops[0]['iterations'] == 15 and loops[0]['tau'] == 1.0
    assert all(1 <= row['iterations'] <= 15 for row in loops[1:])
    for row in loops[1:]:  # tau: the 15 tokens of a row over its trunk forwards
      assert 1.0 <= row['tau'] <= 3.0
      if batch['batch'] == 1:  # one row: a forward per iteration
        assert abs(row['tau'] * row['iterations'] - 15) < 1e-9
      else:  # a row may finish early and stop counting forwards
        assert row['tau'] * row['iterations'] >= 15 - 1e-9
      # the loop's speedup: its iterations and their cost against ar's; at batch 1, tau / r. A
      # loop's time per iteration is its decode's less its prefill's, each the fastest of the
      # rounds; this tiny model's 15 iterations can drown in the prefill's spread on a loaded
      # machine, and then the script reports no ratio rather than a negative one.
      if loops[0]['seconds'] > 0 and row['seconds'] > 0:
        assert row['speedup'] == (
            loops[0]['iterations'] * loops[0]['seconds'] / (row['iterations'] * row['seconds']))
        if batch['batch'] == 1:
          assert abs(row['speedup'] - row['tau'] / row['r']) < 1e-9
      else:
        assert row['speedup'] is None and (row['r'] is None) == (loops[0]['seconds'] <= 0)
    names = [c['name'] for c in batch['calls']]
    assert names == ['trunk over 1 positions', 'trunk over 2 positions', 'trunk over 3 positions',
                     'trunk over 6 positions',  # --positions: a tree's verify
                     'draft 1: head 1 over 3 positions + projection',
                     'draft 2: head 2 over 4 positions + projection']
    assert batch['calls'][0]['over_ar'] == 1.0 and all(c['seconds'] > 0 for c in batch['calls'])
    # The trunk over 1 and over D + 1 = 3 positions, traced. The tiny float32 model on one CPU
    # device decodes on the kernels (test_kernels asserts they build here; width 64 gives head
    # dim 16, which the attention kernel takes), so every product and the attention are kernel
    # calls (the argmax too), and norms, rotary and cache writes are XLA's.
    breakdown = {row['positions']: row['ms_per_call'] for row in batch['breakdown']}
    assert sorted(breakdown) == [1, 3]
    for kinds in breakdown.values():
      assert list(kinds) == ['weight products (row kernel)', 'unembedding (row kernel)',
                             'attention (kernel)', 'argmax (kernel)', 'XLA dots',
                             'other XLA ops']
      assert kinds['XLA dots'] == 0
      assert all(ms > 0 for kind, ms in kinds.items() if kind != 'XLA dots'), kinds
    # Each loop's iteration, traced (the operations inside the while loop): every kind the trunk
    # call has, and the mtp iterations running more products than ar's (the drafts' and the
    # verify's: counted, not timed). ar's iteration runs one trunk step's: the layer's qkv, o,
    # gate-up and down products, an unembedding and an argmax.
    loops = {row['S']: row for row in batch['loop_breakdown']}
    assert sorted(loops) == [0, 1, 2]
    for S, row in loops.items():
      kinds, runs = row['ms_per_iteration'], row['runs_per_iteration']
      assert list(kinds) == list(runs) == list(breakdown[1]) and kinds['XLA dots'] == 0
      assert all(ms > 0 for kind, ms in kinds.items() if kind != 'XLA dots'), (S, kinds)
      if S:
        assert runs['weight products (row kernel)'] > (
            loops[0]['runs_per_iteration']['weight products (row kernel)']), (S, loops)
    assert {kind: loops[0]['runs_per_iteration'][kind] for kind in
            ('weight products (row kernel)', 'unembedding (row kernel)', 'argmax (kernel)')} == {
                'weight products (row kernel)': 4, 'unembedding (row kernel)': 1,
                'argmax (kernel)': 1}
  assert 'a trunk call by kind of operation' in proc.stdout
  assert 'a loop iteration by kind of operation' in proc.stdout
  assert 'batch 2: model calls' in proc.stdout


def test_profile_times_sampled_loops(tmp_path):
  """--temperature samples in the loops (part 1); a negative one is refused before anything
  compiles."""
  config = tiny_config(**{'model.num_layers': 1, 'data.vocab_size': 256, 'model.d_model': 64,
                          'decode.max_new_tokens': 16, 'decode.prompt_len': 6})
  out = tmp_path / 'profile.json'
  proc = run_script('experiments/decode_profile.py', '--config', 'configs/base.py', '--random',
                    '--batches', '1', '--rounds', '1', '--calls', '2', '--temperature', '1',
                    f'--json={out}', *as_flags(config), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result['temperature'] == 1.0 and 'temperature 1 loops' in proc.stdout
  loops = result['batches'][0]['loops']
  assert [row['S'] for row in loops] == [0, 1, 2] and loops[0]['iterations'] == 15
  assert all(1 <= row['iterations'] <= 15 and 1.0 <= row['tau'] <= 3.0 for row in loops[1:])
  assert_user_error(run_script('experiments/decode_profile.py', '--random', '--temperature',
                               '-1'), '--temperature', '-1')
  for bad, said in (('1e-300', '1e-300'), ('1e300', '1e+300')):  # 0 and inf in float32
    assert_user_error(run_script('experiments/decode_profile.py', '--random', '--temperature',
                                 bad), '--temperature must be 0 (greedy) or from', f'got {said}')
  assert_user_error(run_script('experiments/decode_profile.py', '--random', '--positions', '4,0'),
                    '--positions', '4,0')
