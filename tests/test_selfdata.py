"""A frozen trunk writing its own training data (chats through its chat template), with the
features it kept while writing equal to a fresh forward over the written rows, a build that
an interruption leaves resumable, and written chats given other features by one forward."""

import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CHAT, pretrained_config, random_llama, write_gguf, write_hf
from mtp_jax import atomic
from mtp_jax import features as feat_lib
from mtp_jax import inference, selfdata, train
from mtp_jax.config import ConfigError
from mtp_jax.model import MTPLanguageModel
from mtp_jax.pretrained import resolve


def tiny_trunk(tmp_path, **overrides) -> selfdata.Trunk:
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  config = resolve.resolve_config(pretrained_config(path, **overrides))
  session = train.Session(config, str(tmp_path / 'run'), data=False)
  return session.data_trunk()


def test_written_chats_carry_the_trunks_own_features(tmp_path):
  trunk = tiny_trunk(tmp_path)
  before, after = selfdata.chat_frame(trunk)
  text = trunk.tokenizer.decode(before + after, skip_special_tokens=False)
  assert text == '<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n'
  spec = {'test': 1}
  builder = feat_lib.Builder(str(tmp_path / 'cache'), spec, features=True)
  selfdata.write_chats(trunk, builder, tokens=100, temperature=1.0, answer_len=12, topk=4,
                       seed=0, valid_fraction=0.3)
  assert builder.positions() >= 100
  cache = builder.finish()
  split = cache['train']
  starts = np.flatnonzero(split.row_start)
  rows = np.split(np.arange(len(split.tokens)), starts[1:])
  for row in rows[:3]:
    tokens = split.tokens[row]
    assert tokens[:len(before)].tolist() == before  # every row opens a user turn
    # The features the decoder kept equal one forward over the finished row (the last position
    # has none: nothing was predicted from it).
    positions = jnp.arange(len(tokens))[None]
    logits, h0, _ = trunk.model.trunk(trunk.model.prepare(trunk.params),
                                      jnp.asarray(tokens)[None], positions, None)
    np.testing.assert_allclose(split.h0[row][:-1].astype(np.float32), h0[0, :-1], rtol=2e-2,
                               atol=2e-2)
    want = np.argsort(-np.asarray(logits[0, :-1]), axis=-1)[:, :1]
    np.testing.assert_array_equal(split.top_ids[row][:-1, :1], want)
    logp = jax.nn.log_softmax(logits[0, :-1])
    np.testing.assert_allclose(split.top_logp[row][:-1, 0].astype(np.float32),
                               np.take_along_axis(np.asarray(logp), want, -1)[:, 0], atol=1e-2)


def test_greedy_chats_are_the_trunks_argmax_continuations(tmp_path):
  """data.self_temperature=0: every answer token is the trunk's top token at the position
  before it, as the features kept while writing record."""
  trunk = tiny_trunk(tmp_path)
  before, after = selfdata.chat_frame(trunk)
  query = 'Name a fruit.'
  start = len(before) + len(selfdata.encode(trunk, query)) + len(after)  # first answer token
  builder = feat_lib.Builder(str(tmp_path / 'cache'), {'test': 3}, features=True)
  # the turn twice: a turn's rows are held out together, and each split needs a row
  selfdata.write_chats(trunk, builder, tokens=60, temperature=0.0, answer_len=10, topk=2,
                       seed=0, valid_fraction=0.5, queries=[query, query])
  split = builder.finish()['train']
  rows = np.split(np.arange(len(split.tokens)), np.flatnonzero(split.row_start)[1:])
  assert len(rows) >= 2
  for row in rows:
    tokens, top = split.tokens[row], split.top_ids[row][:, 0]
    assert len(tokens) > start
    np.testing.assert_array_equal(tokens[start:], top[start - 1:-1])


def test_an_interrupted_build_resumes_after_its_last_shard(tmp_path):
  trunk = tiny_trunk(tmp_path)
  directory = str(tmp_path / 'cache')
  kw = dict(temperature=1.0, answer_len=8, topk=0, seed=0, valid_fraction=0.3)
  first = feat_lib.Builder(directory, {'test': 2}, features=False)
  selfdata.write_chats(trunk, first, tokens=1, **kw)  # one shard, then "killed"
  assert first.done() == [0]
  shard0 = open(f'{directory}/partial/000000/train.tokens.npy', 'rb').read()
  again = feat_lib.Builder(directory, {'test': 2}, features=False)
  selfdata.write_chats(trunk, again, tokens=again.positions() + 1, **kw)
  assert again.done() == [0, 1]
  again_positions = again.positions()
  assert open(f'{directory}/partial/000000/train.tokens.npy', 'rb').read() == shard0
  cache = again.finish()
  assert feat_lib.meta(directory)['shards'] == 2 and cache['train'].h0 is None
  # an uninterrupted build of the same two shards writes the same rows
  fresh = feat_lib.Builder(str(tmp_path / 'fresh'), {'test': 2}, features=False)
  selfdata.write_chats(trunk, fresh, tokens=again_positions, **kw)
  np.testing.assert_array_equal(fresh.finish()['train'].tokens, cache['train'].tokens)


def test_a_damaged_cache_is_one_error(tmp_path):
  """A build records its base before its first shard; a finished cache whose files were cut short
  (a power loss before they reached the disk) is refused with one line naming it."""
  directory = str(tmp_path / 'cache')
  builder = feat_lib.Builder(directory, {'test': 4}, features=False)
  assert open(f'{directory}/partial/BASE').read() == ''  # no base: what a resume reads
  rows = [{'tokens': np.arange(6, dtype=np.int32)} for _ in range(4)]
  builder.add(0, rows, [False, True, False, True], seconds=0.0)
  assert len(builder.finish()['train'].tokens) == 12
  assert not os.path.exists(f'{directory}/partial')
  with open(f'{directory}/train.tokens', 'r+b') as f:
    f.truncate(8)
  with pytest.raises(feat_lib.DataError, match=f'the feature cache in {directory} is damaged'):
    feat_lib.load(directory)
  with open(f'{directory}/meta.json', 'w') as f:
    f.write('{"spec": ')
  with pytest.raises(feat_lib.DataError, match='JSONDecodeError'):
    feat_lib.load(directory)


def test_a_second_build_of_a_cache_waits_for_the_first(tmp_path, capsys):
  """Two runs sharing data.cache_dir: the second waits for the first's build (here the test holds
  the lock and builds), then reads its cache instead of writing the rows again."""
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  session = train.Session(resolve.resolve_config(pretrained_config(path)), str(tmp_path / 'run'),
                          data=False)
  directory, spec, writes = str(tmp_path / 'features' / 'cache'), {'topk': 0, 'tokens': 8}, []

  def write(trunk, builder):
    writes.append(builder.directory)
    builder.add(0, [{'tokens': np.arange(6, dtype=np.int32)}] * 4, [False, True] * 2, 0.0)

  second = concurrent.futures.ThreadPoolExecutor(1)
  os.makedirs(directory)
  with atomic.exclusive(directory):
    waiting = second.submit(session._build_here, directory, spec, write)
    seen = ''
    while 'data: waiting for another run building' not in seen:  # until the second one waits
      assert not waiting.done(), waiting.result()
      seen += capsys.readouterr().err
      time.sleep(0.01)
    first = session._write_cache(directory, spec, write)
  np.testing.assert_array_equal(waiting.result(timeout=60)['train'].tokens, first['train'].tokens)
  assert writes == [directory]  # written once


def test_a_larger_build_starts_from_a_smaller_finished_one(tmp_path):
  trunk = tiny_trunk(tmp_path)
  root = str(tmp_path / 'features')
  kw = dict(temperature=1.0, answer_len=8, topk=4, seed=0, valid_fraction=0.3)
  small = {'kind': 'chats', 'tokens': 1, 'temperature': 1.0}
  build = feat_lib.Builder(feat_lib.cache_dir(root, small), small, features=True)
  selfdata.write_chats(trunk, build, tokens=1, **kw)
  one = build.finish()
  # only a spec that differs in its token count alone qualifies, and only a smaller one
  assert feat_lib.smaller_cache(root, {**small, 'temperature': 0.5, 'tokens': 99}) is None
  assert feat_lib.smaller_cache(root, small) is None
  big = {**small, 'tokens': len(one['train'].tokens) + len(one['valid'].tokens) + 1}
  base = feat_lib.smaller_cache(root, big)
  assert base == feat_lib.cache_dir(root, small)
  grown = feat_lib.Builder(feat_lib.cache_dir(root, big), big, features=True, base=base)
  selfdata.write_chats(trunk, grown, tokens=big['tokens'], **kw)
  assert grown.done() == [0, 1]
  # a damaged base is named as itself, with the cache begun from it (deleting that one alone
  # would not help): before a build begins, and when it ends
  path = os.path.join(base, 'train.h0')
  whole = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(whole[:-8])
  damaged = (f'the feature cache in {base} is damaged .*, and '
             f'{feat_lib.cache_dir(root, big)}, which extends it')
  with pytest.raises(feat_lib.DataError, match=damaged):
    grown.finish()
  with pytest.raises(feat_lib.DataError, match=damaged):
    feat_lib.Builder(feat_lib.cache_dir(root, big), big, features=True, base=base)
  other = {**big, 'tokens': big['tokens'] + 1}  # a new build writes nothing
  with pytest.raises(feat_lib.DataError, match=f'the feature cache in {base} is damaged .*again$'):
    feat_lib.Builder(feat_lib.cache_dir(root, other), other, features=True, base=base)
  assert not os.path.exists(feat_lib.cache_dir(root, other))
  with open(path, 'wb') as f:
    f.write(whole)
  grown = grown.finish()
  fresh = feat_lib.Builder(str(tmp_path / 'fresh'), big, features=True)
  selfdata.write_chats(trunk, fresh, tokens=big['tokens'], **kw)
  fresh = fresh.finish()
  for split in feat_lib.SPLITS:
    for name in feat_lib.ARRAYS:
      np.testing.assert_array_equal(getattr(grown[split], name), getattr(fresh[split], name))
  assert feat_lib.meta(feat_lib.cache_dir(root, big))['shards'] == 2


def test_a_resumed_build_keeps_the_base_it_began_with(tmp_path):
  """A build stopped after its first shard, then a smaller cache of the same kind finished
  beside it: the resumed build goes on from its own shard, not from that cache's as well."""
  rows = lambda n, first: [{'tokens': np.arange(first, first + n, dtype=np.int32)}] * 2
  root = tmp_path / 'features'
  big = feat_lib.Builder(str(root / 'big'), {'tokens': 100}, features=False)
  big.add(0, rows(30, 0), [False, True], 1.0)
  small = feat_lib.Builder(str(root / 'small'), {'tokens': 50}, features=False)
  small.add(0, rows(30, 500), [False, True], 1.0)
  small.finish()
  base = feat_lib.smaller_cache(str(root), {'tokens': 100})
  assert base == str(root / 'small')
  resumed = feat_lib.Builder(str(root / 'big'), {'tokens': 100}, features=False, base=base)
  assert resumed.done() == [0] and resumed.positions() == 60
  resumed.add(1, rows(10, 100), [False, True], 1.0)
  split = resumed.finish()['train']
  np.testing.assert_array_equal(split.tokens, np.r_[np.arange(30), np.arange(100, 110)])


def test_given_user_turns_are_answered_in_turn(tmp_path):
  trunk = tiny_trunk(tmp_path)
  builder = feat_lib.Builder(str(tmp_path / 'cache'), {'test': 3}, features=False)
  queries = ['the tin', 'he', 'an inn']
  selfdata.write_chats(trunk, builder, tokens=1, temperature=1.0, answer_len=4, topk=0, seed=1,
                       valid_fraction=0.3, queries=queries)
  cache = builder.finish()

  def turns(split):
    starts = list(np.flatnonzero(split.row_start)) + [len(split.tokens)]
    texts = [trunk.tokenizer.decode(split.tokens[a:b].tolist(), skip_special_tokens=False)
             for a, b in zip(starts, starts[1:])]
    return [t.split('<|im_start|>user\n')[1].split('<|im_end|>')[0] for t in texts]
  # each split's rows, in order, cycling through the turns; a turn asked again is held out with
  # its first row, so no turn is in both splits
  rows = range(selfdata.ROWS_PER_SHARD)
  held = [feat_lib.is_valid_row(selfdata.row_key(1, 0, b, 3), 0.3) for b in rows]
  assert held == [feat_lib.is_valid_row(f'1:0:{b % 3}', 0.3) for b in rows]
  assert turns(cache['train']) == [queries[b % 3] for b in rows if not held[b]]
  assert turns(cache['valid']) == [queries[b % 3] for b in rows if held[b]]
  assert 0 < sum(held) < len(held)
  assert not set(turns(cache['train'])) & set(turns(cache['valid']))


def test_chats_past_the_rope_range_are_refused_before_anything_is_written(tmp_path):
  """A user turn and its answer must fit model.max_seq_len (128 here), whose last rotary angle
  every later position would silently take; an empty file of user turns is refused too."""
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('the tin\n')
  common = {'data.sources': 'self', 'train.freeze_trunk': True, 'data.self_prompts': str(prompts)}
  workdir = tmp_path / 'run'
  config = resolve.resolve_config(pretrained_config(path, **common))
  trunk = train.Session(config, str(workdir), data=False).data_trunk()
  before, after = selfdata.chat_frame(trunk)
  query = [selfdata.encode(trunk, 'the tin')]
  # the longest answer that fits: the decoder keeps one verify slot past the last token
  room = 128 - len(before) - len(query[0]) - len(after) - 1
  selfdata.check_fits(trunk, query, room, 128)
  config.data.self_answer_len = room + 1
  with pytest.raises(ConfigError, match=rf'data.self_answer_len={room + 1}: .* needs 129 '
                                        r'positions, more than model.max_seq_len=128'):
    train.Session(config, str(workdir))
  assert not workdir.exists()
  # The training-time decode's prompts, checked before the trunk writes any chat.
  config.data.self_answer_len = room
  config.decode.eval_prompts, config.decode.max_new_tokens = 1, 200
  with pytest.raises(ConfigError, match='decode.max_new_tokens=200 .* more than model.max_seq_len'):
    train.train(config, str(workdir), eval_hook=inference.eval_hook(config))
  assert not workdir.exists()
  prompts.write_text('\n')
  with pytest.raises(ConfigError, match='holds no user turn'):
    train.Session(config, str(workdir))
  prompts.write_text('the tin\nids: 5 6\n')  # user turns for the chat template, not token ids
  with pytest.raises(ConfigError, match=r"prompt 2 of .* is token ids \('ids: ...'\)"):
    train.Session(config, str(workdir))
  prompts.write_text('the tin\nthe cat\n\nthe tin\n')
  with pytest.raises(ConfigError, match='turn 3 of .* repeats turn 1'):
    train.Session(config, str(workdir))
  assert not workdir.exists()


def test_held_out_chats_that_cannot_hold_a_window_are_refused_before_writing(tmp_path):
  """Which chats are held out is fixed by their keys, and a chat's length is bounded, so a build
  whose held-out rows cannot reach one training window is refused before it starts (it used to
  fail once every chat was written). The bound holds for what a build writes."""
  trunk = tiny_trunk(tmp_path)
  kw = dict(tokens=100, answer_len=12, valid_fraction=0.3, seed=0)
  builder = feat_lib.Builder(str(tmp_path / 'cache'), {'test': 4}, features=False)
  selfdata.write_chats(trunk, builder, temperature=1.0, topk=0, **kw)
  held_out = len(builder.finish()['valid'].tokens)
  assert held_out > 0
  selfdata.check_held_out(trunk, None, window=held_out, **kw)
  with pytest.raises(ConfigError, match='held-out chats can hold at most'):
    selfdata.check_held_out(trunk, None, window=10 ** 6, **kw)
  # One given turn is held out or trained on whole: here held out (its key is held at 0.5)
  assert feat_lib.is_valid_row(selfdata.row_key(0, 0, 0, 1), 0.5)
  with pytest.raises(ConfigError, match=r'data.valid_fraction=0.5: the training chats can hold at '
                                        r'most 0 positions.*give more user turns'):
    selfdata.check_held_out(trunk, [selfdata.encode(trunk, 'the tin')], window=8,
                            **{**kw, 'valid_fraction': 0.5})
  # One shard of chats (16 rows), none of them held out at the default 5%.
  assert not any(feat_lib.is_valid_row(f'0:0:{b}', 0.05) for b in range(16))
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  config = resolve.resolve_config(pretrained_config(path, **{
      'data.sources': 'self', 'train.freeze_trunk': True, 'data.self_tokens': 40,
      'data.valid_fraction': 0.05, 'data.self_answer_len': 16}))
  workdir = tmp_path / 'run'
  with pytest.raises(ConfigError, match=r'data.self_tokens=40, data.valid_fraction=0.05: the '
                                        r'held-out chats can hold at most 0 positions'):
    train.Session(config, str(workdir))
  assert not workdir.exists()


def test_a_chats_cache_names_the_stop_tokens_and_a_dtype_other_than_float32(tmp_path):
  """Chats end at any of the model's stop tokens, so a cache of them is keyed by the set when
  it is more than EOS, and the trunk writes them in model.dtype, which keys it when it is not
  float32 (a cache of a model that stops at EOS alone, written in float32, keeps the key it
  had)."""
  tensors, specs = random_llama(), {}
  for name, eot, dtype in (('plain', None, 'float32'), ('eot', 261, 'float32'),
                           ('bf16', None, 'bfloat16')):
    path = write_gguf(tmp_path / f'{name}.gguf', tensors, eot=eot)
    root = tmp_path / f'cache_{name}'
    train.Session(resolve.resolve_config(pretrained_config(path, **{
        'data.sources': 'self', 'train.freeze_trunk': True, 'data.self_tokens': 200,
        'data.self_answer_len': 16, 'data.valid_fraction': 0.3, 'data.cache_dir': str(root),
        'model.dtype': dtype})), str(tmp_path / name))
    [spec_file] = (root / 'features').glob('*/spec.json')
    specs[name] = json.loads(spec_file.read_text())
  assert 'stop_ids' not in specs['plain'] and specs['eot']['stop_ids'] == [263, 261]
  assert 'dtype' not in specs['plain'] and specs['bf16'] == {**specs['plain'], 'dtype': 'bfloat16'}


def test_a_chats_cache_of_a_hugging_face_directory_names_its_config_and_tokenizer(tmp_path):
  """A Hugging Face directory's identity is its weights' sha256 (heads name their trunk by it);
  the chats its trunk writes also depend on its config, tokenizer and chat template, so a cache
  of them is keyed by those files too: a changed template makes a new cache."""
  directory = write_hf(tmp_path / 'hf', random_llama())
  specs = []
  for name in ('before', 'after'):
    root = tmp_path / f'cache_{name}'
    train.Session(resolve.resolve_config(pretrained_config(directory, **{
        'data.sources': 'self', 'train.freeze_trunk': True, 'data.self_tokens': 200,
        'data.self_answer_len': 16, 'data.valid_fraction': 0.3, 'data.cache_dir': str(root)})),
        str(tmp_path / name))
    [spec_file] = (root / 'features').glob('*/spec.json')
    specs.append(json.loads(spec_file.read_text()))
    model = resolve.open_model(directory)
    assert specs[-1]['trunk'] == model.identity
    assert specs[-1]['setup'] == model.setup_identity
    with open(os.path.join(directory, 'chat_template.jinja'), 'w') as f:  # read first
      f.write(CHAT.replace('<|im_start|>', '<|im_start|> '))
  assert specs[0]['trunk'] == specs[1]['trunk'] and specs[0]['setup'] != specs[1]['setup']
  assert resolve.open_model(write_gguf(tmp_path / 'tiny.gguf', random_llama())).setup_identity == ''


def test_token_windows_of_chats_carry_their_row_starts(tmp_path):
  """data.features=False on chats the trunk wrote: each batch holds the token windows and, beside
  them, where each chat starts (a chat's first token, the template's opening), which the loss
  needs to leave out what reaches into the next chat."""
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  session = train.Session(resolve.resolve_config(pretrained_config(path, **{
      'data.sources': 'self', 'data.features': False, 'data.self_tokens': 300,
      'data.self_answer_len': 16, 'data.valid_fraction': 0.3, 'train.seq_len': 32})),
      str(tmp_path / 'run'))
  before, _ = selfdata.chat_frame(session.data_trunk())
  batch = session.batch(0)
  assert sorted(batch) == ['row_start', 'tokens']
  assert batch['tokens'].shape == batch['row_start'].shape and batch['row_start'].dtype == bool
  assert batch['row_start'].any()
  assert np.all(batch['tokens'][batch['row_start']] == before[0])


def test_written_chats_get_other_features_from_one_forward_per_row(tmp_path, capsys):
  """A cache of the same chats with the trunk's block-0 output beside its last hidden state
  (mtp.feature_layers), made from the written rows: same rows, the last hidden state and the
  distribution as decoding kept them, and the build resumes from where it was stopped (its
  progress bar too)."""
  trunk = tiny_trunk(tmp_path)
  root = str(tmp_path / 'features')
  spec = {'kind': 'chats', 'tokens': 150, 'topk': 4}
  written = feat_lib.Builder(feat_lib.cache_dir(root, spec), spec, features=True)
  selfdata.write_chats(trunk, written, tokens=150, temperature=1.0, answer_len=12, topk=4,
                       seed=0, valid_fraction=0.3)
  chats = written.finish()
  wide = {**spec, 'feature_layers': [0]}
  wide_dir = feat_lib.cache_dir(root, wide)
  assert feat_lib.same_rows(root, wide) == feat_lib.cache_dir(root, spec)
  assert feat_lib.same_rows(root, {**wide, 'tokens': 151}) is None
  assert feat_lib.same_rows(root, spec) is None  # itself is not another
  assert feat_lib.rows_source(wide_dir, wide) == feat_lib.cache_dir(root, spec)
  # a damaged source is said before a cache is begun from it (one error and one deletion, not a
  # second error about the cache begun from rows then gone)
  broken = str(tmp_path / 'broken')
  os.makedirs(feat_lib.cache_dir(broken, wide))
  shutil.copytree(feat_lib.cache_dir(root, spec), feat_lib.cache_dir(broken, spec))
  with open(os.path.join(feat_lib.cache_dir(broken, spec), 'train.tokens'), 'r+b') as f:
    f.truncate(8)
  with pytest.raises(feat_lib.DataError, match='is damaged.*; delete it to build it again'):
    feat_lib.rows_source(feat_lib.cache_dir(broken, wide), wide)
  assert os.listdir(feat_lib.cache_dir(broken, wide)) == []

  (tmp_path / 'two').mkdir()
  two = tiny_trunk(tmp_path / 'two', **{'mtp.feature_layers': '0'})
  rows = {s: feat_lib.rows(split) for s, split in chats.items()}
  assert [len(r) for r in rows['train']] == np.diff(
      np.append(np.flatnonzero(chats['train'].row_start), len(chats['train'].tokens))).tolist()
  first = feat_lib.Builder(wide_dir, wide, features=True)
  selfdata.FORWARD_ROWS, keep = 2, selfdata.FORWARD_ROWS
  try:
    selfdata.write_features(two, first, {'train': rows['train'][:2]}, 4)  # "killed" after one
    assert first.done() == [0]
    # begun: the build goes on from the same rows (its rows_from file), not from new chats
    assert feat_lib.rows_source(wide_dir, wide) == feat_lib.cache_dir(root, spec)
    again = feat_lib.Builder(wide_dir, wide, features=True)
    capsys.readouterr()
    selfdata.write_features(two, again, rows, 4)
    shown = re.findall(r'data: trunk features:[^|]*\|[^|]*\| *(\d+)/(\d+)',
                       capsys.readouterr().err)
    assert shown[0] == (str(sum(map(len, rows['train'][:2]))),
                        str(sum(len(r) for s in rows.values() for r in s)))
  finally:
    selfdata.FORWARD_ROWS = keep
  made = again.finish()
  first_block = dataclasses.replace(two.model.cfg, num_layers=1, feature_layers=())
  assert feat_lib.rows_source(wide_dir, wide) is None  # finished
  # its shards are forward batches, not chats' shards: never a base for more chats
  assert feat_lib.smaller_cache(root, {**wide, 'tokens': 10 ** 6}) is None
  assert feat_lib.smaller_cache(root, {**spec, 'tokens': 10 ** 6}) == feat_lib.cache_dir(root, spec)
  for split in feat_lib.SPLITS:
    old, new = chats[split], made[split]
    np.testing.assert_array_equal(new.tokens, old.tokens)
    np.testing.assert_array_equal(new.row_start, old.row_start)
    assert new.h0.shape == (len(old.tokens), 64)
    last = np.flatnonzero(np.append(old.row_start[1:], True))  # no prediction was kept there
    keep_rows = np.setdiff1d(np.arange(len(old.tokens)), last)
    np.testing.assert_allclose(new.h0[keep_rows, :32].astype(np.float32),
                               old.h0[keep_rows].astype(np.float32), rtol=2e-2, atol=2e-2)
    np.testing.assert_array_equal(new.top_ids[keep_rows, 0], old.top_ids[keep_rows, 0])
    # the added half is block 0's output: the same params' trunk cut after its first block
    starts = np.flatnonzero(old.row_start)
    for start, end in zip(starts, np.append(starts[1:], len(old.tokens))):
      tokens = jnp.asarray(old.tokens[start:end])[None]
      block0, _ = MTPLanguageModel(first_block).apply(
          two.params, tokens, jnp.arange(end - start)[None], method=MTPLanguageModel.trunk)
      np.testing.assert_allclose(new.h0[start:end - 1, 32:].astype(np.float32),
                                 block0[0, :-1], rtol=2e-2, atol=2e-2)
