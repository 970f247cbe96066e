"""A frozen trunk writing its own training data (chats through its chat template), with the
features it kept while writing equal to a fresh forward over the written rows, and a build that
an interruption leaves resumable."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import pretrained_config, random_llama, write_gguf
from mtp_jax import features as feat_lib
from mtp_jax import selfdata, train
from mtp_jax.pretrained import resolve


def tiny_trunk(tmp_path) -> selfdata.Trunk:
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  config = resolve.resolve_config(pretrained_config(path))
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
  grown = grown.finish()
  fresh = feat_lib.Builder(str(tmp_path / 'fresh'), big, features=True)
  selfdata.write_chats(trunk, fresh, tokens=big['tokens'], **kw)
  fresh = fresh.finish()
  for split in feat_lib.SPLITS:
    for name in feat_lib.ARRAYS:
      np.testing.assert_array_equal(getattr(grown[split], name), getattr(fresh[split], name))
  assert feat_lib.meta(feat_lib.cache_dir(root, big))['shards'] == 2


def test_given_user_turns_are_answered_in_turn(tmp_path):
  trunk = tiny_trunk(tmp_path)
  builder = feat_lib.Builder(str(tmp_path / 'cache'), {'test': 3}, features=False)
  queries = ['the tin', 'he', 'an inn']
  selfdata.write_chats(trunk, builder, tokens=1, temperature=1.0, answer_len=4, topk=0, seed=0,
                       valid_fraction=0.3, queries=queries)
  split = builder.finish()['train']
  starts = list(np.flatnonzero(split.row_start)) + [len(split.tokens)]
  turns = []
  for a, b in zip(starts, starts[1:]):
    text = trunk.tokenizer.decode(split.tokens[a:b].tolist(), skip_special_tokens=False)
    turns.append(text.split('<|im_start|>user\n')[1].split('<|im_end|>')[0])
  # the rows not held out, in order, cycling through the turns
  rows = range(selfdata.ROWS_PER_SHARD)
  assert turns == [queries[b % 3] for b in rows if not feat_lib.is_valid_row(f'0:0:{b}', 0.3)]
