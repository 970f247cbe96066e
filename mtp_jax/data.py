"""Text sources -> byte-level BPE tokenizer -> cached token arrays -> fixed-shape batches.

A batch is a pure function of (seed, step), so a resumed run continues the exact data order.
"""

import dataclasses
import functools
import glob
import hashlib
import json
import os
import sys
import sysconfig
import time

import numpy as np
import tokenizers
import tqdm
from tokenizers import decoders, models, pre_tokenizers, trainers

from mtp_jax import atomic

EOS = '<|endoftext|>'
TEXT_SUFFIXES = ('.txt', '.md', '.py', '.rst')
# Test suites are mostly fixtures and assertions, not the code and docstrings we want to model.
_STDLIB_SKIP = ('site-packages', 'dist-packages', 'test', 'tests', 'idle_test', '__pycache__')
# Evaluation's batches are drawn as at this step: its fixed windows of the validation split,
# drawn apart from any training step's (the training split's draws count from step 0).
_EVAL_STEP = 10**9


class DataError(ValueError):
  """Unusable data or settings; the message is one line naming the source or field."""


@dataclasses.dataclass(frozen=True)
class TokenData:
  train: np.ndarray  # 1-D np.memmap of token ids, one EOS after every document.
  valid: np.ndarray
  tokenizer: tokenizers.Tokenizer
  eos_id: int
  vocab_size: int


def _walk(root, suffixes, skip=()):
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith('.')]
    paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(suffixes)]
  return paths


def _source_files(sources):
  """Returns sorted (path, key) pairs; the key, which decides the split, is the path as written,
  normalised ('./data/a.txt' is 'data/a.txt'; an absolute spelling is another key, and the token
  cache keeps the keys, so it is another cache).

  Standard-library keys are relative ('stdlib/json/decoder.py'), so every machine splits alike.
  """
  files = {}
  for entry in (e.strip() for e in sources.split(',')):
    if not entry:
      continue
    root = sysconfig.get_paths()['stdlib']
    if entry == 'stdlib':
      for path in _walk(root, ('.py',), _STDLIB_SKIP):
        files[path] = os.path.join('stdlib', os.path.relpath(path, root))
      continue
    if entry.startswith('stdlib/'):  # one file or folder of the standard library, by its path
      path = os.path.join(root, entry[len('stdlib/'):])
      if not os.path.exists(path):
        raise DataError(f"data.sources: the standard library has no '{entry[len('stdlib/'):]}'")
      found = _walk(path, ('.py',), _STDLIB_SKIP) if os.path.isdir(path) else [path]
      files.update((p, os.path.join('stdlib', os.path.relpath(p, root))) for p in found)
      continue
    if os.path.exists(entry):
      matches = [entry]
    elif any(c in entry for c in '*?['):
      matches = sorted(glob.glob(entry, recursive=True))
      if not matches:
        raise DataError(f"data.sources: no files match '{entry}'")
    else:
      raise DataError(f"data.sources: '{entry}' does not exist")
    for match in matches:
      found = _walk(match, TEXT_SUFFIXES + ('.jsonl',)) if os.path.isdir(match) else [match]
      if not found:
        raise DataError(f"data.sources: no {'/'.join(TEXT_SUFFIXES)}/.jsonl files under '{match}'")
      files.update((path, os.path.normpath(path)) for path in found)
  if not files:
    raise DataError(f"data.sources: no sources given in '{sources}'")
  # A file named twice (a folder and a file in it, a relative and an absolute spelling) is read
  # once: its documents, keyed by each spelling, could be trained on and held out.
  once = {}
  for path, key in files.items():  # in the order given: a file's first spelling names it
    once.setdefault(os.path.realpath(path), (path, key))
  return sorted(once.values(), key=lambda item: (item[1], item[0]))


def _read_documents(files, text_field):
  docs = []
  for path, key in files:
    with open(path, encoding='utf-8-sig', errors='replace') as f:  # a byte-order mark left out
      text = f.read()
    if not path.endswith('.jsonl'):
      docs.append((key, text))
      continue
    # Not splitlines(): JSON strings may hold raw U+2028 and other characters it splits on.
    for lineno, line in enumerate(text.split('\n'), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f'data.sources: {path}:{lineno}: invalid JSON ({e.msg})') from None
      if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise DataError(
            f"data.sources: {path}:{lineno}: not a JSON object with a string field '{text_field}'"
            ' (data.text_field)')
      docs.append((f'{key}:{lineno}', record[text_field]))
  docs = [(key, text) for key, text in docs if text.strip()]
  if not docs:
    raise DataError(f'data.sources: corpus is empty (no text in {len(files)} files)')
  return docs


def list_documents(sources: str, text_field: str = 'text') -> list[tuple[str, str]]:
  """Returns (key, text) for every non-blank document, in a fixed order."""
  return _read_documents(_source_files(sources), text_field)


def split_documents(docs, valid_fraction):
  """Splits (key, text) documents into (train, valid) by a hash of each key."""
  if len(docs) == 1:
    (key, text), = docs
    cut = min(max(int(len(text) * (1 - valid_fraction)), 1), len(text))
    return [(key, text[:cut])], [(key, text[cut:])]
  # A hash, not a random draw, keeps a file on the same side as files are added or removed.
  held_out = [
      int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10_000 < valid_fraction * 10_000
      for key, _ in docs]
  train = [doc for doc, h in zip(docs, held_out) if not h]
  valid = [doc for doc, h in zip(docs, held_out) if h]
  if not valid:
    valid.append(train.pop())
  if not train:
    train.append(valid.pop(0))
  return train, valid


def _train_tokenizer(texts, vocab_size):
  if vocab_size < 257:
    raise DataError(f'data.vocab_size: {vocab_size} is below 257, the 256 bytes plus {EOS}')
  print(f'data: training a {vocab_size}-token BPE tokenizer on {len(texts)} documents',
        file=sys.stderr)
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(texts, trainer)
  return tokenizer


def _read(path):
  with open(path, 'rb') as f:
    return f.read()


def _tokenizer(data_cfg, path, train_texts, given=None, keep=False):
  """The model's tokenizer (`given`), data.tokenizer, with `keep` (the workdir holds checkpoints
  trained on its ids) the one at `path`, else a new one trained on the training texts; left at
  `path`, which with `keep` it may not replace. A workdir without checkpoints binds nothing: its
  tokenizer may be of other sources or another data.vocab_size, and is made again. Returns it and
  the id that ends each document: EOS, or for a given tokenizer without one, the model's own end
  token."""
  source = data_cfg.tokenizer or path
  if given is not None:
    tokenizer, blob = given, given.to_str().encode()
  elif os.path.exists(source) and (data_cfg.tokenizer or keep):
    try:
      tokenizer = tokenizers.Tokenizer.from_file(source)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files.
      raise DataError(f"data.tokenizer: cannot load '{source}': {e}") from None
    blob = _read(source)
  elif data_cfg.tokenizer:
    raise DataError(f"data.tokenizer: '{source}' does not exist")
  else:
    tokenizer = _train_tokenizer(train_texts(), data_cfg.vocab_size)
    blob = tokenizer.to_str().encode()
  size = tokenizer.get_vocab_size()
  if size > data_cfg.vocab_size:
    raise DataError(
        f"data.vocab_size: {data_cfg.vocab_size} is smaller than the {size} tokens of '{source}';"
        ' the model embedding is sized by data.vocab_size')
  eos_id = tokenizer.token_to_id(EOS)
  if eos_id is None and given is None:
    raise DataError(f"data.tokenizer: '{source}' has no {EOS} token")
  if not os.path.exists(path) or _read(path) != blob:
    if keep and os.path.exists(path):
      named = 'model.init_from\'s tokenizer' if given is not None else f"data.tokenizer '{source}'"
      raise DataError(f'{named} is not {path}, the one this workdir\'s checkpoints were trained '
                      'on (their embeddings are of its ids); train with that one, or use another '
                      '--workdir')
    atomic.write_bytes(path, blob)
  return tokenizer, eos_id


def _tokenize(tokenizer, texts, eos_id, dtype, name):
  ids = []
  with tqdm.tqdm(total=len(texts), desc=f'data: tokenizing {name}', unit='doc',
                 file=sys.stderr) as bar:
    for i in range(0, len(texts), 256):
      for encoding in tokenizer.encode_batch(texts[i:i + 256]):
        ids.append(np.array(encoding.ids + [eos_id], dtype))
      bar.update(len(texts[i:i + 256]))
  return np.concatenate(ids)


def _load_cache(cache):
  """The token arrays of the finished cache in `cache`, or None. meta.json is written after both
  arrays, so a cache with one is finished; arrays cut short or gone after that (a copy of a
  shared cache_dir interrupted) are one line naming the cache."""
  path = os.path.join(cache, 'meta.json')
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      meta = json.load(f)
    return {split: np.memmap(os.path.join(cache, f'{split}.bin'), dtype=meta['dtype'], mode='r',
                             shape=(meta[f'{split}_tokens'],))
            for split in ('train', 'valid')}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f'the token cache in {cache} is damaged ({type(e).__name__}: {e}); delete it '
                    'to build it again') from None


def prepare(data_cfg, workdir: str, tokenizer=None, end_id=None, keep=False) -> TokenData:
  """Returns token arrays for data_cfg, reusing workdir's tokenizer and cached tokens. The
  split, tokenizer and token arrays are deterministic: no seed enters them. A pretrained model
  brings its `tokenizer` (and `end_id`, which ends documents where it has no EOS token). With
  `keep`, a tokenizer other than the workdir's is refused."""
  files = _source_files(data_cfg.sources)
  docs = functools.cache(lambda: split_documents(
      _read_documents(files, data_cfg.text_field), data_cfg.valid_fraction))
  tok_path = os.path.join(workdir, 'tokenizer.json')
  tokenizer, eos_id = _tokenizer(data_cfg, tok_path, lambda: [t for _, t in docs()[0]], tokenizer,
                                 keep)
  eos_id = end_id if eos_id is None else eos_id
  if eos_id is None:
    raise DataError(f"model.init_from's tokenizer has no {EOS} token and the model names no end "
                    'token, which text documents need between them')
  vocab_size = tokenizer.get_vocab_size()

  # Any change to a source file, to the keys that split them or to the tokenizer changes the
  # key, so stale tokens are never read.
  inputs = {
      'files': [(os.path.abspath(p), s.st_size, s.st_mtime_ns, key)
                for p, key in files for s in [os.stat(p)]],
      'text_field': data_cfg.text_field,
      'valid_fraction': data_cfg.valid_fraction,
      'tokenizer_sha1': hashlib.sha1(_read(tok_path)).hexdigest(),
      'eos_id': int(eos_id),  # the id between documents
  }
  key = hashlib.sha1(json.dumps(inputs).encode()).hexdigest()[:16]
  cache = os.path.join(data_cfg.cache_dir or os.path.join(workdir, 'data'), key)
  arrays = _load_cache(cache)
  if arrays is None:
    splits = docs()  # reads (and checks) the corpus before anything is written
    os.makedirs(cache, exist_ok=True)
    dtype = np.uint16 if vocab_size <= 65535 else np.uint32
    meta = {'dtype': np.dtype(dtype).name, 'vocab_size': vocab_size, 'sources': data_cfg.sources,
            'files_count': len(files), **{k: v for k, v in inputs.items() if k != 'files'}}
    start = time.time()
    for split, split_docs in zip(('train', 'valid'), splits):
      tokens = _tokenize(tokenizer, [t for _, t in split_docs], eos_id, dtype, split)
      atomic.write_bytes(os.path.join(cache, f'{split}.bin'), tokens.tobytes())
      meta.update({f'{split}_tokens': len(tokens), f'{split}_documents': len(split_docs)})
    atomic.write_json(os.path.join(cache, 'meta.json'), meta)
    print(f"data: {meta['train_tokens']} train / {meta['valid_tokens']} valid tokens in"
          f' {time.time() - start:.1f}s, cached in {cache}', file=sys.stderr)
    arrays = _load_cache(cache)
  return TokenData(train=arrays['train'], valid=arrays['valid'], tokenizer=tokenizer,
                   eos_id=eos_id, vocab_size=vocab_size)


def window_starts(length: int, *, seed: int, step: int, batch_size: int, window: int,
                  process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """This process's window starts in a split of `length` positions for batch (seed, step).

  Every process draws the same global starts and keeps its own rows, so the global batch
  depends on neither the process count nor anything but (seed, step).
  """
  if batch_size % process_count:
    raise DataError(
        f'train.batch_size: {batch_size} is not divisible by the {process_count} processes')
  if length < window:
    raise DataError(
        f'data: a split has {length} tokens, fewer than one window of {window}; add data,'
        ' raise data.valid_fraction or lower train.seq_len')
  starts = np.random.default_rng([seed, step]).integers(0, length - window + 1, batch_size)
  rows = batch_size // process_count
  return starts[process_index * rows:(process_index + 1) * rows]


def get_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int, window: int,
              process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """Returns this process's int32 [batch_size // process_count, window] rows of the global batch."""
  starts = window_starts(len(tokens), seed=seed, step=step, batch_size=batch_size, window=window,
                         process_index=process_index, process_count=process_count)
  return np.stack([tokens[s:s + window] for s in starts]).astype(np.int32)


EVAL_SEED = 0


def eval_steps(num_batches: int) -> range:
  """The (seed EVAL_SEED) steps evaluation batches are drawn at: the same on every call and for
  every run on the same data, whatever its training seed, so evaluations of different runs are
  comparable."""
  return range(_EVAL_STEP, _EVAL_STEP + num_batches)


def encode(tokenizer: tokenizers.Tokenizer, text: str) -> list[int]:
  return tokenizer.encode(text).ids


def decode(tokenizer: tokenizers.Tokenizer, ids) -> str:
  # EOS stays visible so generated text shows where the model ended a document.
  return tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=False)


