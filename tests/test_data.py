"""Tests for mtp_jax.data on real files and the real tokenizers library.

Covers sources, the split, the tokenizer, the token cache and batches."""

import json
import os
import re
import time

import ml_collections
import numpy as np
import pytest
import tokenizers

from mtp_jax import data
from mtp_jax.config import ConfigError, prompt_lines

TEXTS = {
    'a.txt': 'The quick brown fox jumps over the lazy dog.\n' * 20,
    'sub/b.md': '# Title\n\nSome *markdown* text, with unicode: héllo wörld ✓.\n' * 20,
    'sub/deeper/c.py': 'def add(a, b):\n  """Adds two numbers."""\n  return a + b\n' * 20,
}


def write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return str(path)


def make_corpus(root, n=24):
  for name, text in TEXTS.items():
    write(os.path.join(root, name), text)
  for i in range(n):
    text = f'Document {i}: ' + 'lorem ipsum dolor ' * (5 + i)
    write(os.path.join(root, f'gen/file{i:02d}.txt'), text)
  return str(root)


def data_cfg(sources, **overrides):
  cfg = ml_collections.ConfigDict(dict(
      sources=sources, text_field='text', vocab_size=400, tokenizer='', valid_fraction=0.2,
      cache_dir=''))
  cfg.update(overrides)
  return cfg


def test_sources_collect_directory_glob_and_jsonl(tmp_path):
  corpus = make_corpus(tmp_path / 'corpus', n=0)
  write(tmp_path / 'corpus/image.bin', 'not a text suffix')
  write(tmp_path / 'corpus/.git/notes.txt', 'hidden directory')
  write(tmp_path / 'extra/one.txt', 'one')
  write(tmp_path / 'extra/two.txt', 'two')
  write(tmp_path / 'extra/three.md', 'not matched by the glob')
  records = [{'text': 'first record'}, {'text': 'second record', 'id': 7}]
  jsonl = write(tmp_path / 'recs.jsonl', '\n'.join(json.dumps(r) for r in records) + '\n\n')

  docs = dict(data.list_documents(f'{corpus}, {tmp_path}/extra/*.txt,{jsonl}'))

  expected = {os.path.join(corpus, name): text for name, text in TEXTS.items()}
  expected.update({f'{tmp_path}/extra/one.txt': 'one', f'{tmp_path}/extra/two.txt': 'two',
                   f'{jsonl}:1': 'first record', f'{jsonl}:2': 'second record'})
  assert docs == expected


def test_sources_are_listed_in_sorted_order(tmp_path):
  corpus = make_corpus(tmp_path)
  keys = [key for key, _ in data.list_documents(corpus)]
  assert keys == sorted(keys)


@pytest.mark.parametrize('line, problem', [
    ('{"text": "ok"', 'invalid JSON'),
    ('{"body": "no text field"}', "string field 'text'"),
    ('["a list"]', "string field 'text'"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, problem):
  path = write(tmp_path / 'recs.jsonl', '{"text": "fine"}\n\n' + line + '\n')
  with pytest.raises(data.DataError, match=f'{path}:3: .*{problem}'):
    data.list_documents(path)


def test_jsonl_reads_the_configured_field(tmp_path):
  path = write(tmp_path / 'recs.jsonl', '{"content": "from content"}\n')
  assert data.list_documents(path, text_field='content') == [(f'{path}:1', 'from content')]
  # a byte-order mark (Windows editors write one) is not part of the first record, nor a text's
  (tmp_path / 'bom.jsonl').write_bytes('\ufeff{"text": "first"}\n'.encode())
  (tmp_path / 'bom.txt').write_bytes('\ufefftext'.encode())
  assert [t for _, t in data.list_documents(f'{tmp_path}/bom.jsonl,{tmp_path}/bom.txt')] == [
      'first', 'text']


def test_missing_sources_raise(tmp_path):
  with pytest.raises(data.DataError, match='does not exist'):
    data.list_documents(str(tmp_path / 'nope.txt'))
  with pytest.raises(data.DataError, match="no files match '.*nope/\\*.txt'"):
    data.list_documents(str(tmp_path / 'nope/*.txt'))
  write(tmp_path / 'dir/image.bin', 'x')
  with pytest.raises(data.DataError, match='no .* files under'):
    data.list_documents(str(tmp_path / 'dir'))


def test_empty_corpus_raises(tmp_path):
  for name in ('a.txt', 'b.txt', 'c.md'):
    write(tmp_path / name, ' \n\t\n' if name == 'b.txt' else '')
  with pytest.raises(data.DataError, match=r'corpus is empty \(no text in 3 files\)'):
    data.list_documents(str(tmp_path))


def test_split_is_deterministic_and_by_file(tmp_path):
  docs = data.list_documents(make_corpus(tmp_path, n=60))
  train, valid = data.split_documents(docs, 0.2)
  assert (train, valid) == data.split_documents(list(docs), 0.2)
  train_keys, valid_keys = {k for k, _ in train}, {k for k, _ in valid}
  assert not train_keys & valid_keys
  assert train_keys | valid_keys == {k for k, _ in docs}
  assert 0 < len(valid) < len(train)
  # Hashing the key keeps every other file on its side when one file is removed.
  train2, valid2 = data.split_documents(docs[1:], 0.2)
  assert {k for k, _ in valid2} == valid_keys - {docs[0][0]}
  # ... and the same in every process and on every machine (not Python's salted hash()): a
  # resumed run or another process holds out what the first did
  fixed = [(f'doc{i}', 'text') for i in range(20)]
  assert sorted(k for k, _ in data.split_documents(fixed, 0.2)[1]) == [
      'doc0', 'doc1', 'doc15', 'doc17', 'doc3', 'doc8']


def test_a_path_spelled_another_way_splits_alike_or_caches_apart(tmp_path, monkeypatch):
  """'corpus' and './corpus' are the same keys, so the same split and the same token cache; an
  absolute spelling keys its files otherwise, and gets a cache of its own, never one made under
  another split."""
  make_corpus(tmp_path / 'corpus', n=60)
  monkeypatch.chdir(tmp_path)
  split = lambda sources: data.split_documents(data.list_documents(sources), 0.2)
  assert split('corpus') == split('./corpus') == split('corpus/')
  # named twice in one list, a file is read once (its documents, keyed by each spelling, could
  # land on both sides of the split)
  assert (data.list_documents(f'corpus,{tmp_path}/corpus,corpus/gen/file00.txt')
          == data.list_documents('corpus'))
  for sources in ('corpus', './corpus', str(tmp_path / 'corpus')):
    data.prepare(data_cfg(sources, cache_dir=str(tmp_path / 'cache')), str(tmp_path / 'work'))
  assert len(os.listdir(tmp_path / 'cache')) == 2


def test_split_never_leaves_a_side_empty():
  docs = [(f'doc{i}', f'text {i}') for i in range(5)]
  train, valid = data.split_documents(docs, 0.0)
  assert (train, valid) == (docs[:4], docs[4:])
  train, valid = data.split_documents(docs, 1.0)
  assert (train, valid) == (docs[:1], docs[1:])
  train, valid = data.split_documents([('only', 'abcdefghij')], 0.3)
  assert (train, valid) == ([('only', 'abcdefg')], [('only', 'hij')])


def test_prepare_trains_tokenizer_and_caches_tokens(tmp_path):
  corpus = make_corpus(tmp_path / 'corpus')
  workdir = str(tmp_path / 'work')
  cfg = data_cfg(corpus)
  first = data.prepare(cfg, workdir)

  tok_path = os.path.join(workdir, 'tokenizer.json')
  assert first.vocab_size == first.tokenizer.get_vocab_size() <= cfg.vocab_size
  assert first.tokenizer.id_to_token(first.eos_id) == '<|endoftext|>'
  assert first.train.dtype == first.valid.dtype == np.uint16
  assert isinstance(first.train, np.memmap) and isinstance(first.valid, np.memmap)
  # The arrays hold exactly the documents of each split, each followed by EOS.
  train, valid = data.split_documents(data.list_documents(corpus), cfg.valid_fraction)
  for tokens, docs in ((first.train, train), (first.valid, valid)):
    assert data.decode(first.tokenizer, tokens) == ''.join(t + '<|endoftext|>' for _, t in docs)
    assert (np.asarray(tokens) == first.eos_id).sum() == len(docs)

  (cache,) = os.listdir(os.path.join(workdir, 'data'))
  cache = os.path.join(workdir, 'data', cache)
  meta = json.load(open(os.path.join(cache, 'meta.json')))
  assert (meta['train_tokens'], meta['valid_tokens']) == (len(first.train), len(first.valid))
  assert sorted(os.listdir(cache)) == ['meta.json', 'train.bin', 'valid.bin']
  mtimes = {p: os.stat(p).st_mtime_ns
            for p in (tok_path, os.path.join(cache, 'train.bin'), os.path.join(cache, 'valid.bin'))}

  time.sleep(0.01)
  second = data.prepare(cfg, workdir)
  assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes
  np.testing.assert_array_equal(second.train, first.train)
  np.testing.assert_array_equal(second.valid, first.valid)
  text = 'def f(x):\n  return x  # ünïcode ✓ and\ttabs\r\n'
  assert data.encode(second.tokenizer, text) == data.encode(first.tokenizer, text)
  assert data.decode(second.tokenizer, data.encode(second.tokenizer, text)) == text
  # arrays cut short or gone after the cache was finished (a copy of it interrupted): one line
  # naming the cache, not numpy's traceback
  del first, second
  for damage in ('cut', 'gone'):
    path = os.path.join(cache, 'train.bin')
    whole = open(path, 'rb').read()
    if damage == 'cut':
      open(path, 'wb').write(whole[:len(whole) // 2])
    else:
      os.remove(path)
    with pytest.raises(data.DataError, match=f'the token cache in {cache} is damaged'):
      data.prepare(cfg, workdir)
    open(path, 'wb').write(whole)


def test_changed_source_invalidates_cache_but_keeps_tokenizer(tmp_path):
  """In a workdir whose checkpoints were trained on its tokenizer (keep), changed sources make
  new tokens with that tokenizer."""
  corpus = make_corpus(tmp_path / 'corpus')
  workdir = str(tmp_path / 'work')
  cfg = data_cfg(corpus, cache_dir=str(tmp_path / 'cache'))
  first = data.prepare(cfg, workdir)
  tokenizer_json = open(os.path.join(workdir, 'tokenizer.json')).read()
  write(os.path.join(corpus, 'a.txt'), 'Entirely new words appear here.\n')
  second = data.prepare(cfg, workdir, keep=True)
  assert len(os.listdir(tmp_path / 'cache')) == 2
  assert len(second.train) + len(second.valid) < len(first.train) + len(first.valid)
  assert open(os.path.join(workdir, 'tokenizer.json')).read() == tokenizer_json


def test_user_tokenizer_is_checked_and_copied(tmp_path):
  corpus = make_corpus(tmp_path / 'corpus')
  trained = data.prepare(data_cfg(corpus, vocab_size=400), str(tmp_path / 'a'))
  user_tok = os.path.join(tmp_path, 'a', 'tokenizer.json')
  # (how many merges it learns depends on the split, which hashes the corpus's absolute paths)
  V = trained.vocab_size
  assert V > 257
  with pytest.raises(data.DataError, match=f'{V - 1} is smaller than the {V} tokens'):
    data.prepare(data_cfg(corpus, vocab_size=V - 1, tokenizer=user_tok), str(tmp_path / 'b'))
  with pytest.raises(data.DataError, match='does not exist'):
    data.prepare(data_cfg(corpus, tokenizer=str(tmp_path / 'missing.json')), str(tmp_path / 'b'))

  no_eos = tokenizers.Tokenizer(tokenizers.models.BPE())
  no_eos.add_tokens(['hello'])
  no_eos.save(str(tmp_path / 'no_eos.json'))
  with pytest.raises(data.DataError, match=re.escape('has no <|endoftext|> token')):
    data.prepare(data_cfg(corpus, tokenizer=str(tmp_path / 'no_eos.json')), str(tmp_path / 'b'))

  loaded = data.prepare(data_cfg(corpus, vocab_size=512, tokenizer=user_tok), str(tmp_path / 'c'))
  assert open(os.path.join(tmp_path, 'c', 'tokenizer.json')).read() == open(user_tok).read()
  np.testing.assert_array_equal(loaded.train, trained.train)


def test_a_model_tokenizer_without_an_end_token_is_one_error(tmp_path):
  """Text documents are joined with an end token between them: a model whose tokenizer has no
  <|endoftext|> and which names no end token of its own is refused in one line."""
  given = tokenizers.Tokenizer(tokenizers.models.WordLevel({'[UNK]': 0, 'a': 1}, unk_token='[UNK]'))
  with pytest.raises(data.DataError,
                     match=re.escape("model.init_from's tokenizer has no <|endoftext|> token")):
    data.prepare(data_cfg(make_corpus(tmp_path / 'corpus')), str(tmp_path / 'work'), given, None)
  assert data.prepare(data_cfg(str(tmp_path / 'corpus')), str(tmp_path / 'work'), given,
                      1).eos_id == 1


def test_vocab_size_below_bytes_raises(tmp_path):
  with pytest.raises(data.DataError, match='data.vocab_size: 100 is below 257'):
    data.prepare(data_cfg(make_corpus(tmp_path / 'corpus'), vocab_size=100), str(tmp_path / 'w'))


def test_get_batch_is_a_function_of_seed_and_step():
  tokens = np.arange(1000, dtype=np.uint16)
  kw = dict(batch_size=8, window=17)
  batch = data.get_batch(tokens, seed=3, step=5, **kw)
  assert batch.shape == (8, 17) and batch.dtype == np.int32
  np.testing.assert_array_equal(batch, data.get_batch(tokens, seed=3, step=5, **kw))
  assert not np.array_equal(batch, data.get_batch(tokens, seed=3, step=6, **kw))
  assert not np.array_equal(batch, data.get_batch(tokens, seed=4, step=5, **kw))
  # Token i is i, so a contiguous window is an arithmetic run starting anywhere in range.
  np.testing.assert_array_equal(np.diff(batch, axis=1), 1)
  assert batch[:, 0].min() >= 0 and batch[:, -1].max() < len(tokens)
  # the same starts in every process and run (a resumed run draws what the first would have)
  assert batch[:, 0].tolist() == [23, 134, 55, 869, 805, 884, 295, 568]


def test_get_batch_process_slices_make_the_global_batch():
  tokens = np.random.default_rng(0).integers(0, 500, 300).astype(np.uint16)
  kw = dict(seed=1, step=2, batch_size=6, window=9)
  parts = [data.get_batch(tokens, **kw, process_index=i, process_count=2) for i in range(2)]
  assert parts[0].shape == (3, 9)
  np.testing.assert_array_equal(np.concatenate(parts), data.get_batch(tokens, **kw))
  with pytest.raises(data.DataError, match='not divisible'):
    data.get_batch(tokens, **kw, process_count=4)


def test_get_batch_windows_may_end_at_the_last_token():
  tokens = np.arange(10, dtype=np.uint16)
  np.testing.assert_array_equal(data.get_batch(tokens, seed=0, step=0, batch_size=2, window=10),
                                np.stack([tokens, tokens]))
  with pytest.raises(data.DataError, match='has 10 tokens, fewer than one window of 11'):
    data.get_batch(tokens, seed=0, step=0, batch_size=2, window=11)


def test_eval_batches_are_fixed_and_differ_from_training():
  tokens = np.arange(5000, dtype=np.uint16)
  kw = dict(batch_size=4, window=8)
  steps = data.eval_steps(3)
  assert list(steps) == list(data.eval_steps(3))
  batches = [data.get_batch(tokens, seed=data.EVAL_SEED, step=s, **kw) for s in steps]
  assert len(batches) == 3 and batches[0].shape == (4, 8)
  assert not np.array_equal(batches[0], batches[1])
  # no training run of any seed reaches the evaluation steps in its first million steps
  assert min(steps) > 10**6
  first_train_batch = data.get_batch(tokens, seed=0, step=0, **kw)
  assert not np.array_equal(batches[0], first_train_batch)


def test_stdlib_path_sources():
  keys = [key for key, _ in data.list_documents('stdlib/pydoc_data/topics.py,stdlib/json')]
  assert os.path.join('stdlib', 'pydoc_data', 'topics.py') in keys
  assert os.path.join('stdlib', 'json', 'decoder.py') in keys and len(keys) < 10
  with pytest.raises(data.DataError, match="the standard library has no 'nope.py'"):
    data.list_documents('stdlib/nope.py')


def test_a_prompt_file_that_is_not_utf8_text_is_one_error(tmp_path):
  """decode.prompts or --prompt_file in another encoding, or without a prompt: a ConfigError
  naming the file (launch.py prints it as its one line), not a traceback."""
  path = tmp_path / 'latin1.txt'
  path.write_bytes(b'caf\xe9\n')
  with pytest.raises(ConfigError, match=f"^--prompt_file: cannot read '{path}' as UTF-8 text"):
    prompt_lines(str(path), '--prompt_file')
  (tmp_path / 'ok.txt').write_text('one\n\n  \ntwo\n')
  assert prompt_lines(str(tmp_path / 'ok.txt'), 'p') == ['one', 'two']
  (tmp_path / 'blank.txt').write_text('\n \n')
  with pytest.raises(ConfigError, match='^decode.prompts: .*blank.txt has no prompt$'):
    prompt_lines(str(tmp_path / 'blank.txt'), 'decode.prompts')
  # as a Windows editor writes it: a byte-order mark (an 'ids:' line would read as text) and
  # CRLF line ends
  (tmp_path / 'bom.txt').write_bytes(b'\xef\xbb\xbfids: 1 2\r\nhi\r\n')
  assert prompt_lines(str(tmp_path / 'bom.txt'), 'p') == ['ids: 1 2', 'hi']


def test_stdlib_sources():
  keys = [key for key, _ in data.list_documents('stdlib')]
  assert len(keys) > 100
  for key in keys:
    assert key.startswith('stdlib' + os.sep) and key.endswith('.py'), key
    assert not {'test', 'tests', 'idle_test', 'site-packages'} & set(key.split(os.sep)), key
  assert os.path.join('stdlib', 'json', 'decoder.py') in keys


def test_prepare_stdlib(tmp_path):
  tokens = data.prepare(data_cfg('stdlib', vocab_size=512, valid_fraction=0.05), str(tmp_path))
  assert len(tokens.train) > 2_000_000 and len(tokens.valid) > 50_000
  source = open(os.path.join(os.path.dirname(json.__file__), 'decoder.py')).read()
  assert data.decode(tokens.tokenizer, data.encode(tokens.tokenizer, source)) == source
