"""The decoding modes on a real (tiny, briefly trained) checkpoint: bench.json's contents, demo,
generate, the training-time decode check, and one-line errors for bad decoding input."""

import json
import os
import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import (assert_user_error, launch_summary, run_script, snapshot, text_config,
                      tiny_config)
from mtp_jax import atomic, data, inference, run, train
from mtp_jax import decode as dec
from mtp_jax.config import ConfigError, apply_overrides, as_flags


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  config = text_config(**{'train.steps': 4,
                          'train.eval_every': 4, 'decode.eval_prompts': 2,
                          'decode.max_new_tokens': 8, 'decode.prompt_len': 6,
                          'decode.bench_prompts': 8})
  summary = run.run('train', config, workdir)
  assert summary['step'] == 4
  return config, workdir


def test_a_bench_row_counts_the_prompts_whose_output_is_ars():
  """What a bench row's identical_to_ar rests on: a token changed, or an output cut short or run
  on, is a prompt that differs; outputs for other prompts are an error, not a count."""
  ar = [[5, 6, 7], [8, 9], [1]]
  assert inference.prompts_identical([[5, 6, 7], [8, 9], [1]], ar) == 3
  assert inference.prompts_identical([[5, 6, 4], [8, 9], [1]], ar) == 2
  assert inference.prompts_identical([[5, 6], [8, 9, 2], [1]], ar) == 1
  assert inference.prompts_identical([[1], [8, 9], [5, 6, 7]], ar) == 1
  with pytest.raises(ValueError):
    inference.prompts_identical([[5, 6, 7], [8, 9]], ar)


def test_bench_json_rows_and_identity(trained, capsys):
  config, workdir = trained
  result = run.run('bench', config, workdir)
  on_disk = json.load(open(os.path.join(workdir, 'bench.json')))
  assert on_disk['checkpoint_step'] == 4 and on_disk['machine'] == result['machine']
  assert on_disk['complete'] is True
  rows = on_disk['rows']
  keys = {'method', 'draft_len', 'batch', 'temperature', 'tau', 'acceptance_per_position',
          'tokens_per_s', 'speedup', 'candidates', 'candidate_depth', 'identical_to_ar',
          'prompts_identical_to_ar', 'prompts'}
  assert all(set(r) == keys for r in rows)
  D = config.mtp.depth
  assert len(rows) == 2 * 2 * (D + 1)  # temperatures x batches x (ar + S = 1..D)
  for r in rows:
    assert len(r['acceptance_per_position']) == r['draft_len']
    assert r['tokens_per_s'] > 0 and 1 <= r['tau'] <= r['draft_len'] + 1
    assert r['prompts'] == config.decode.bench_prompts
    # what the row ran with: ar verifies no alternatives, an mtp branch holds at most S drafts
    K = 1 if r['method'] == 'ar' else config.decode.candidates
    C = min(config.decode.candidate_depth, r['draft_len']) if K > 1 else 0
    assert (r['candidates'], r['candidate_depth']) == (K, C)
    if r['method'] == 'ar':
      assert r['tau'] == 1 and r['speedup'] == 1
      # at batch 8, greedy ar is compared with ar at batch 1: rows beside others change nothing
      assert r['identical_to_ar'] is (True if r['batch'] > 1 and r['temperature'] == 0 else None)
    elif r['temperature'] == 0:
      assert r['identical_to_ar'] is True and r['prompts_identical_to_ar'] == r['prompts']
    else:
      assert r['identical_to_ar'] is None and r['prompts_identical_to_ar'] is None
    # Acceptance can only fall with the draft position: reaching j needs accepting j - 1.
    acc = r['acceptance_per_position']
    assert all(a >= b for a, b in zip(acc, acc[1:]))
  # Each (temperature, batch) block is printed as it finishes, with its own header, after a line
  # of the settings every row shares (the sampled rows' filters among them)
  d = config.decode
  assert on_disk['settings'] == {
      'prompts': d.bench_prompts, 'max_new_tokens': d.max_new_tokens, 'top_k': d.top_k,
      'top_p': d.top_p, 'candidates': d.candidates, 'candidate_depth': d.candidate_depth,
      'rounds': d.bench_rounds}
  out = capsys.readouterr().out
  assert out.count('speedup') == 4
  assert out.startswith(f'bench: prompts {d.bench_prompts}, max_new_tokens {d.max_new_tokens}, '
                        f'top_k {d.top_k}, top_p {d.top_p}, ')


def test_bench_keeps_finished_blocks(trained, monkeypatch):
  """A bench stopped part way (a time limit, a crash) leaves the blocks it finished in
  bench.json, marked incomplete, and the earlier run's complete file as bench.previous.json,
  which a second stopped run leaves as it is."""
  config, workdir = trained
  path = os.path.join(workdir, 'bench.json')
  with open(path, 'w') as f:  # as benches wrote it before they said whether they were complete
    json.dump({'rows': ['an earlier run']}, f)
  real = inference.bench_blocks

  def stopped_after_one(*args):
    blocks = real(*args)
    yield next(blocks)
    raise KeyboardInterrupt

  monkeypatch.setattr(inference, 'bench_blocks', stopped_after_one)
  for _ in range(2):
    with pytest.raises(KeyboardInterrupt):
      run.run('bench', config, workdir)
    on_disk = json.load(open(path))
    assert on_disk['complete'] is False
    assert [(r['temperature'], r['batch']) for r in on_disk['rows']] == \
        [(0.0, 1)] * (config.mtp.depth + 1)
    previous = json.load(open(os.path.join(workdir, 'bench.previous.json')))
    assert previous == {'rows': ['an earlier run']}


def test_a_bench_of_fewer_than_8_prompts_names_the_batch_it_ran(trained, monkeypatch):
  """3 prompts fill 3 of the 8 rows: the rows of that block say batch 3."""
  config, workdir = trained
  config = apply_overrides(config, {'decode.bench_prompts': 3})
  real = inference.bench_blocks

  def greedy_blocks(*args):  # batch 1 and the batch of all prompts, at temperature 0
    blocks = real(*args)
    yield next(blocks)
    yield next(blocks)
    raise KeyboardInterrupt

  monkeypatch.setattr(inference, 'bench_blocks', greedy_blocks)
  with pytest.raises(KeyboardInterrupt):
    run.run('bench', config, workdir)
  rows = json.load(open(os.path.join(workdir, 'bench.json')))['rows']
  assert [r['batch'] for r in rows] == [1] * (config.mtp.depth + 1) + [3] * (config.mtp.depth + 1)
  assert all(r['prompts'] == 3 for r in rows)


def test_a_bench_after_training_cut_short_runs_on_the_rerun(trained, monkeypatch, tmp_path):
  """run_after_train=bench stopped part way (a crash, a time limit): the rerun of the finished
  run finds it missing from summary.json and runs it; the next rerun finds it done."""
  config, workdir = trained
  config = apply_overrides(config, {'run_after_train': 'bench', 'decode.bench_prompts': 2})
  workdir = shutil.copytree(workdir, str(tmp_path / 'run'))
  real = inference.bench_blocks

  def stopped_after_one(*args):
    yield next(real(*args))
    raise KeyboardInterrupt

  monkeypatch.setattr(inference, 'bench_blocks', stopped_after_one)
  with pytest.raises(KeyboardInterrupt):
    run.run('train', config, workdir)
  assert json.load(open(os.path.join(workdir, 'summary.json')))['after_train'] == []
  monkeypatch.undo()
  summary = run.run('train', config, workdir)
  assert summary['after_train'] == ['bench'] and summary['bench'].endswith('bench.json')
  assert json.load(open(summary['bench']))['complete'] is True
  assert json.load(open(os.path.join(workdir, 'summary.json'))) == json.loads(
      json.dumps(summary, default=float))
  os.remove(summary['bench'])
  assert run.run('train', config, workdir)['after_train'] == ['bench']
  assert not os.path.exists(summary['bench'])  # done: not run again
  # The summary of an earlier, shorter training (train.steps raised since, and the longer
  # training killed before it wrote its own): its bench was of another checkpoint.
  earlier = json.load(open(os.path.join(workdir, 'summary.json')))
  atomic.write_json(os.path.join(workdir, 'summary.json'), {**earlier, 'step': earlier['step'] - 1})
  assert run.run('train', config, workdir)['after_train'] == ['bench']
  assert json.load(open(summary['bench']))['complete'] is True  # run again


def test_greedy_mtp_equals_ar_as_users_compile(trained, tmp_path):
  """The suite compiles with its own XLA flags (conftest); here `generate` runs as users run it,
  with XLA's defaults, and greedy speculative decoding still emits `ar`'s tokens."""
  config, workdir = trained
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('def f(x):\nimport os\nclass Parser(object):\n    return\n')
  outputs = {}
  for method in ('ar', 'mtp'):
    proc = run_script('launch.py', '--config', 'configs/base.py', '--workdir', workdir, '--mode',
                      'generate', *as_flags(config), f'--prompt_file={prompts}',
                      f'--config.decode.method={method}', xla_flags='')
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs[method] = launch_summary(proc.stdout)['outputs']
  assert len(outputs['ar']) == 4 and all(outputs['ar'])
  assert outputs['mtp'] == outputs['ar']


def test_demo_and_generate(trained, capsys, tmp_path):
  config, workdir = trained
  D = config.mtp.depth
  demo = run.run('demo', config, workdir, prompt='def f(x):')
  chain = demo['ar_chain']
  assert len(chain) == D + 1 and len(demo['drafts']) == D
  # One verification accepts exactly the leading drafts that the greedy chain agrees with.
  agree = next((j for j in range(D) if demo['drafts'][j] != chain[j + 1]), D)
  assert demo['accepted'] == agree
  # Greedy verification emits the trunk's own tokens: the chain's first accepted + 2 of them
  # (the step may emit no more than the chain's D + 1).
  assert demo['emitted'] == chain[:min(agree + 2, D + 1)]
  out = capsys.readouterr().out
  for k in range(D + 1):
    assert f'step {k} (t+{k + 1}' in out
  assert 'top-5 predictions at the end of the prompt:' in out
  # over a draft vocabulary the heads' probabilities are over its tokens, and the header says so
  run.run('demo', apply_overrides(config, {'decode.draft_vocab': 16}), workdir, prompt='def f(x):')
  assert ("top-5 predictions at the end of the prompt (the heads' over their 16-token draft "
          'vocabulary):') in capsys.readouterr().out
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('import os\nids: 5 6 7 8\n')
  session = train.Session(config, workdir)
  assert inference.read_prompts(session, '', str(prompts)) == [
      data.encode(session.tokenizer, 'import os'), [5, 6, 7, 8]]
  result = run.run('generate', config, workdir, prompt_file=str(prompts))
  assert len(result['outputs']) == 2
  assert all(0 < len(o) <= config.decode.max_new_tokens for o in result['outputs'])
  # The 'ids:' line is those four tokens: the same as decoding them directly.
  _, params = inference.load_params(session)
  s = inference.settings(session.config, stop_ids=session.stop_ids)
  direct = inference.prepared_decoder(session.decode_model, params, [[5, 6, 7, 8]], s)()
  assert result['outputs'][1] == dec.outputs(direct)[0]
  # and the text line is the text's tokens
  text = inference.prepared_decoder(session.decode_model, params,
                                    [data.encode(session.tokenizer, 'import os')], s)()
  assert result['outputs'][0] == dec.outputs(text)[0]


def test_training_logs_decode_metrics(trained):
  config, workdir = trained
  acc = EventAccumulator(os.path.join(workdir, 'tb'), size_guidance={'tensors': 0})
  acc.Reload()
  scalars = acc.Tags()['scalars']
  assert 'decode/tau' in scalars
  assert {f'decode/acceptance_{j}' for j in range(1, config.mtp.depth + 1)} <= set(scalars)
  tau = acc.Scalars('decode/tau')
  assert [e.step for e in tau] == [4] and 1 <= tau[0].value <= config.mtp.depth + 1
  assert any('decode/sample' in t for t in acc.Tags()['tensors'])
  # The same numbers reach the run's summary (which the sweep driver tabulates).
  summary = json.load(open(os.path.join(workdir, 'summary.json')))['eval']
  assert summary['decode/tau'] == pytest.approx(tau[0].value, rel=1e-6)
  for j in range(1, config.mtp.depth + 1):
    assert summary[f'decode/acceptance_{j}'] == pytest.approx(
        acc.Scalars(f'decode/acceptance_{j}')[0].value, rel=1e-6)


def test_validation_windows_longer_than_the_split_are_refused(trained):
  """Bench and evaluation prompts of decode.prompt_len tokens drawn from a validation split that
  holds fewer were cut short or empty, then decoded as prompts: one line instead."""
  config, workdir = trained
  session = train.Session(config, workdir, reads='bench')
  session.checkpointer.close()
  n = len(session.data.valid)
  assert [len(p) for p in inference.validation_prompts(session, 3, n - 1)] == [n - 1] * 3
  with pytest.raises(ConfigError, match=f'decode.prompt_len={n}: the validation split holds {n} '
                                        'tokens, too few'):
    inference.validation_prompts(session, 3, n)


def test_validation_windows_the_split_cannot_hold_stop_training_before_its_first_step(tmp_path):
  """The training-time decode draws decode.prompt_len tokens from the validation split: a split
  too short for them is found when the data is ready, before any step (stand-ins of that length
  were checked, and the run stopped at its first evaluation)."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for name, words in (('a', 'the quick brown fox '), ('b', 'jumps over a lazy dog ')):
    (corpus / f'{name}.txt').write_text(words * 6)
  overrides = {'data.sources': str(corpus), 'decode.eval_prompts': 1, 'decode.max_new_tokens': 4}
  probe = train.Session(text_config(**overrides), str(tmp_path / 'probe'))
  probe.checkpointer.close()
  n = len(probe.data.valid)
  # (a cache that holds the prompt: one too short is refused before the data is made)
  config = text_config(**overrides, **{'decode.prompt_len': n, 'model.max_seq_len': 256})
  with pytest.raises(ConfigError, match=f'decode.prompt_len={n}: the validation split holds {n}'):
    train.train(config, str(tmp_path / 'run'), eval_hook=inference.eval_hook(config))
  assert not (tmp_path / 'run' / 'checkpoints').exists()


@pytest.mark.parametrize('extra,message', [
    (['--prompt='], 'prompt'),
    (['--prompt=x', '--config.decode.max_new_tokens=200'], 'model.max_seq_len'),
    (['--prompt=x', '--config.decode.draft_len=3'], 'decode.draft_len'),
    (['--prompt=x', '--config.decode.draft_len=0'], 'decode.draft_len'),
    (['--prompt=x', '--config.decode.temperature=-1.0'], 'decode.temperature'),
    (['--prompt=x', '--config.decode.top_p=0.0'], 'decode.top_p'),
    (['--prompt=x', '--config.decode.candidates=0'], 'decode.candidates'),
    (['--prompt=x', '--config.decode.candidates=5', '--config.decode.draft_vocab=4'],
     'decode.candidates=5: the draft vocabulary holds 4 tokens'),
    (['--prompt=x', '--config.decode.candidate_depth=3'], 'decode.candidate_depth'),
    (['--prompt=x', '--config.decode.draft_dtype=float16'], 'decode.draft_dtype'),
    (['--prompt_file=IDS'], 'outside the vocabulary'),
    (['--prompt=ids: 1 x'], "--prompt: bad token ids line 'ids: 1 x'"),
])
def test_bad_decoding_input_is_one_line(trained, tmp_path, extra, message):
  config, workdir = trained
  ids = tmp_path / 'ids.txt'
  ids.write_text('ids: 1 2 99999\n')
  extra = [e.replace('IDS', str(ids)) for e in extra]
  before = snapshot(workdir)
  proc = run_script('launch.py', '--config', 'configs/base.py', '--workdir', workdir, '--mode',
                    'generate', *as_flags(config), *extra)
  assert_user_error(proc, message)
  assert snapshot(workdir) == before


def test_random_weights_draft_over_the_configs_draft_vocabulary():
  """decode_profile.py --random times drafts over decode.draft_vocab tokens, as the config says
  (it drafted over every token)."""
  inputs = inference.decode_inputs(tiny_config(**{'decode.draft_vocab': 64}), '', 2, True)
  assert inputs.model.draft == tuple(range(64)) and len(inputs.prompts) == 2


def test_mtp_decoding_needs_heads(tmp_path):
  config = text_config(**{'mtp.depth': 0,
                          'train.steps': 1, 'decode.method': 'ar'})
  run.run('train', config, str(tmp_path))
  proc = run_script('launch.py', '--config', 'configs/base.py', '--workdir', str(tmp_path),
                    '--mode', 'generate', '--prompt=x', *as_flags(config),
                    '--config.decode.method=mtp')
  assert_user_error(proc, 'mtp.depth=0')


def test_prompts_padded_past_the_cache_are_one_error(trained):
  """A bench pads every prompt to the longest one, so that all share a compilation: a short
  prompt padded past the cache is the one-line error, not the decoder's exception."""
  config, workdir = trained
  session = train.Session(config, workdir)
  _, params = inference.load_params(session)
  s = inference.settings(session.config, stop_ids=session.stop_ids)
  fits = max(P for P in range(1, session.cfg.max_seq_len)
             if dec.cache_length(P, s) <= session.cfg.max_seq_len)
  inference.prepared_decoder(session.decode_model, params, [[5]], s, width=fits)
  with pytest.raises(ConfigError, match=f'prompt of {fits + 1} tokens'):
    inference.prepared_decoder(session.decode_model, params, [[5]], s, width=fits + 1)
  # a script's S past the heads (gguf_forms.py --draft_len): said, not an IndexError
  D = session.cfg.mtp_depth
  with pytest.raises(ConfigError, match=f'a draft of {D + 1} tokens needs as many heads; the '
                                        f'model has mtp.depth={D}'):
    inference.settings(session.config, draft=D + 1, stop_ids=session.stop_ids)


def test_each_s_decodes_with_the_branches_it_can_hold():
  """The settings a bench row records: ar verifies no alternatives, and a branch holds at most
  S drafts (the config's candidate_depth is cut to each row's S)."""
  config = text_config(**{'mtp.depth': 3, 'decode.candidates': 3, 'decode.candidate_depth': 2})
  got = [inference.settings(config, draft=S, stop_ids=()) for S in range(4)]
  assert [(s.candidates, s.candidate_depth) for s in got] == [(1, 1), (3, 1), (3, 2), (3, 2)]
