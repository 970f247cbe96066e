"""Token rows a model wrote itself, and cached trunk features for training heads on a frozen trunk:
at every position the trunk's features h0 (bfloat16; its last hidden state, then the layers of
mtp.feature_layers) and its top-K next-token log-probabilities. A cache is keyed by the trunk's
identity (its file hash; a Hugging Face directory's config and tokenizer files beside its
weights) and what made it, so a different model never reads a stale cache; it is built in
shards, each written atomically, so an interrupted build resumes at the first missing shard.

Shape legend: N positions of a split, D width, K kept entries, B batch, T trunk positions of a
window, W = T + D + 1 tokens.
"""

import dataclasses
import hashlib
import json
import os
import shutil

import ml_dtypes
import numpy as np

from mtp_jax import atomic
from mtp_jax.data import DataError

SPLITS = ('train', 'valid')
# name -> (dtype, whether the array has a trailing dimension)
ARRAYS = {'tokens': (np.int32, False), 'row_start': (np.bool_, False),
          'h0': (ml_dtypes.bfloat16, True), 'top_ids': (np.int32, True),
          'top_logp': (np.float16, True)}
TOKENS_ONLY = ('tokens', 'row_start')


@dataclasses.dataclass(frozen=True)
class Split:
  tokens: np.ndarray  # N int32
  row_start: np.ndarray  # N bool: the first token of a row
  h0: np.ndarray | None = None  # N x feature_dim bfloat16
  top_ids: np.ndarray | None = None  # N x K int32
  top_logp: np.ndarray | None = None  # N x K float16

  @property
  def has_features(self) -> bool:
    return self.h0 is not None


def cache_dir(root: str, spec: dict) -> str:
  """root/<hash of spec>: spec names the trunk (its sha256) and everything that made the rows."""
  return os.path.join(root, hashlib.sha1(json.dumps(spec, sort_keys=True).encode())
                      .hexdigest()[:16])


def meta(directory: str) -> dict:
  with open(os.path.join(directory, 'meta.json')) as f:
    return json.load(f)


def load(directory: str) -> dict[str, Split] | None:
  """The finished cache in directory, or None (meta.json is written last)."""
  path = os.path.join(directory, 'meta.json')
  if not os.path.exists(path):
    return None
  out = {}
  try:
    with open(path) as f:
      meta = json.load(f)
    for split in SPLITS:
      n, arrays = meta[split]['positions'], {}
      for name in meta['arrays']:
        dtype, wide = ARRAYS[name]
        shape = (n, meta['widths'][name]) if wide else (n,)
        arrays[name] = np.memmap(os.path.join(directory, f'{split}.{name}'), dtype=dtype,
                                 mode='r', shape=shape)
      out[split] = Split(**arrays)
  except (OSError, ValueError, KeyError, TypeError) as e:  # a file cut short, meta.json damaged
    raise DataError(f'the feature cache in {directory} is damaged ({type(e).__name__}: {e}); '
                    'delete it to build it again') from None
  return out


# Spec keys that choose which features a cache keeps, not which rows it holds.
FEATURE_KEYS = ('topk', 'feature_layers')
# In a cache made from another cache's rows: that cache's directory. Its shards are forward
# batches, not the shards writing chats makes, so it is never a base to grow from.
ROWS_FROM = 'rows_from'


def _finished(root: str):
  """(directory, spec) of every finished cache under root."""
  if not os.path.isdir(root):
    return
  for name in sorted(os.listdir(root)):
    directory = os.path.join(root, name)
    try:
      yield directory, meta(directory)['spec']
    except (OSError, ValueError, KeyError):
      continue


def same_rows(root: str, spec: dict) -> str | None:
  """A finished cache under root holding exactly the rows `spec` names, with other features
  (another 'topk' or 'feature_layers'), whose rows a forward pass can give the features asked
  for; None when there is none."""
  rows_of = lambda s: {k: v for k, v in s.items() if k not in FEATURE_KEYS}
  for directory, other in _finished(root):
    if other != spec and rows_of(other) == rows_of(spec):
      return directory
  return None


def rows_source(directory: str, spec: dict) -> str | None:
  """The finished cache of spec's rows with other features that the unfinished cache in
  `directory` is to be made from (kept in its ROWS_FROM file, so that an interrupted build
  resumes as it began); None when there is none or the cache is finished."""
  marker = os.path.join(directory, ROWS_FROM)
  if not spec['topk'] or load(directory) is not None:
    return None
  if os.path.isdir(os.path.join(directory, 'partial')):  # begun: as it began
    if not os.path.isfile(marker):
      return None
    with open(marker) as f:
      found = f.read()
    if load(found) is None:
      raise DataError(f'{directory} was begun from the rows in {found}, which are gone; delete '
                      'it to start again')
    return found
  found = same_rows(os.path.dirname(directory), spec)
  if found:
    load(found)  # a damaged one is said now (delete it), before this cache is begun from it
    atomic.write_text(marker, found)
  elif os.path.exists(marker):  # left by a run stopped before it began; rows are written now
    os.remove(marker)
  return found


def rows(split: Split) -> list[np.ndarray]:
  """The split's token rows, cut where row_start is set."""
  starts = np.flatnonzero(split.row_start)
  ends = np.append(starts[1:], len(split.tokens))
  return [np.asarray(split.tokens[a:b]) for a, b in zip(starts, ends)]


def smaller_cache(root: str, spec: dict) -> str | None:
  """The finished cache under root with the most rows whose spec equals `spec` but for a smaller
  'tokens' count: its shards are the first ones a build of `spec` would write, so that build can
  start from them (Builder's base). None when there is none."""
  if not isinstance(spec.get('tokens'), int):
    return None
  best, most = None, 0
  for directory, other in _finished(root):
    if os.path.exists(os.path.join(directory, ROWS_FROM)):
      continue
    tokens = other.get('tokens')
    if (isinstance(tokens, int) and most < tokens < spec['tokens']
        and {**other, 'tokens': None} == {**spec, 'tokens': None}):
      best, most = directory, tokens
  return best


class Builder:
  """Writes rows shard by shard under directory/partial, then joins them into the cache. With a
  `base` (a finished cache of the same kind), its shards count as the first ones written. A
  resumed build keeps the base it began with (recorded in partial/BASE), whatever finished
  caches appeared since."""

  def __init__(self, directory: str, spec: dict, features: bool, base: str | None = None):
    self.directory, self.spec = directory, spec
    self.names = tuple(ARRAYS) if features else TOKENS_ONLY
    self.partial = os.path.join(directory, 'partial')
    marker = os.path.join(self.partial, 'BASE')
    resumed = os.path.isfile(marker)
    if resumed:
      with open(marker) as f:
        base = f.read() or None
      if base and not os.path.exists(os.path.join(base, 'meta.json')):
        raise DataError(f'{directory} was begun from the cache in {base}, which is gone; delete '
                        'it to start again')
    self.base_dir = base
    if base:  # before anything is written here
      self._check_base()
    if not resumed and not os.path.isdir(self.partial):  # new (one begun before BASE keeps base)
      staging = self.partial + '.tmp'  # partial/ appears with its BASE, or not at all
      shutil.rmtree(staging, ignore_errors=True)
      os.makedirs(staging)
      atomic.write_text(os.path.join(staging, 'BASE'), base or '')
      os.replace(staging, self.partial)
      atomic.sync(directory)
    self.base = meta(base) if base else None
    if self.base and list(self.names) != self.base['arrays']:
      raise ValueError(f'{base} holds {self.base["arrays"]}, not {list(self.names)}')
    self.first = self.base['shards'] if self.base else 0  # the shards the base stands for
    atomic.write_json(os.path.join(directory, 'spec.json'), spec)

  def _check_base(self) -> None:
    """The base's arrays are whole (load), or a DataError naming it, and this cache when it was
    begun from it (it must go with it)."""
    try:
      load(self.base_dir)
    except DataError as e:
      if not os.path.isdir(self.partial):
        raise
      raise DataError(f'{e}, and {self.directory}, which extends it, with it') from None

  def _written(self) -> list[int]:
    """The shards written here (not the base's)."""
    return sorted(int(n) for n in os.listdir(self.partial) if n.isdigit())

  def _counts(self) -> list[dict]:
    """Positions per split (and seconds) of each shard written here, then the base's totals."""
    counts = []
    for index in self._written():
      with open(os.path.join(self.partial, f'{index:06d}', 'count.json')) as f:
        counts.append(json.load(f))
    if self.base:
      counts.append({**{s: self.base[s]['positions'] for s in SPLITS},
                     'seconds': self.base['seconds']})
    return counts

  def done(self) -> list[int]:
    return list(range(self.first)) + self._written()

  def positions(self) -> int:
    """Positions in the finished shards (both splits)."""
    return sum(c['train'] + c['valid'] for c in self._counts())

  def add(self, index: int, rows: list[dict], valid: list[bool], seconds: float) -> None:
    """Shard `index`: each row a dict of arrays over its positions ('tokens' and, with features,
    'h0', 'top_ids', 'top_logp'); `valid` says which rows are held out; `seconds`, what making
    it took."""
    tmp = os.path.join(self.partial, f'{index:06d}.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    counts = {}
    for split, keep in (('train', False), ('valid', True)):
      chosen = [r for r, v in zip(rows, valid) if v == keep]
      counts[split] = int(sum(len(r['tokens']) for r in chosen))
      for name in self.names:
        parts = [_row_array(r, name) for r in chosen]
        dtype, _ = ARRAYS[name]
        joined = np.concatenate(parts) if parts else np.zeros((0,), dtype)
        np.save(os.path.join(tmp, f'{split}.{name}.npy'), joined.astype(dtype))
    with open(os.path.join(tmp, 'count.json'), 'w') as f:
      json.dump({**counts, 'seconds': seconds}, f)
    for name in os.listdir(tmp):  # on disk before the shard counts as written
      atomic.sync(os.path.join(tmp, name))
    atomic.sync(tmp)
    os.replace(tmp, os.path.join(self.partial, f'{index:06d}'))
    atomic.sync(self.partial)

  def finish(self) -> dict[str, Split]:
    """Joins every shard, in order, into one memory-mapped array per split and name (after the
    base's rows, checked again first: a base damaged meanwhile is reported as itself, not as
    this cache cut short)."""
    if self.base_dir:
      self._check_base()
    shards = [os.path.join(self.partial, f'{i:06d}') for i in self._written()]
    counts = self._counts()
    meta = {'spec': self.spec, 'arrays': list(self.names),
            'widths': dict(self.base['widths']) if self.base else {},
            'shards': self.first + len(shards),
            # None when a shard does not say (written before shards were timed)
            'seconds': (None if any(c.get('seconds') is None for c in counts)
                        else sum(c['seconds'] for c in counts))}
    for split in SPLITS:
      for name in self.names:
        path = os.path.join(self.directory, f'{split}.{name}')
        with open(path + '.tmp', 'wb') as out:
          if self.base:  # the base's rows first, as they are
            with open(os.path.join(self.base_dir, f'{split}.{name}'), 'rb') as f:
              shutil.copyfileobj(f, out, 1 << 24)
          for shard in shards:
            a = np.load(os.path.join(shard, f'{split}.{name}.npy'))
            if a.ndim == 2:
              meta['widths'][name] = a.shape[1]
            out.write(np.ascontiguousarray(a).tobytes())
          out.flush()
          os.fsync(out.fileno())
        os.replace(path + '.tmp', path)
      meta[split] = {'positions': sum(c[split] for c in counts)}
      if meta[split]['positions'] < 2:
        raise DataError(f'the {split} split of {self.directory} is empty; make more rows '
                        '(data.self_tokens) or raise data.valid_fraction')
    # meta.json last, after the arrays' renames, and on disk before the shards are removed
    atomic.sync(self.directory)
    atomic.write_json(os.path.join(self.directory, 'meta.json'), meta)
    shutil.rmtree(self.partial)
    return load(self.directory)


def _row_array(row: dict, name: str) -> np.ndarray:
  if name == 'row_start':
    start = np.zeros(len(row['tokens']), np.bool_)
    start[:1] = True
    return start
  return np.asarray(row[name])


def is_valid_row(key: str, valid_fraction: float) -> bool:
  """Held out by a hash of the row's key, as data.split_documents holds out documents."""
  return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10_000 < valid_fraction * 10_000


def window_batch(split: Split, starts, seq_len: int, depth: int) -> dict:
  """Windows at `starts`: 'tokens' and 'row_start' over W = T + D + 1 positions, 'h0' over T,
  'top_ids' and 'top_p' over T + D (the trunk's distribution at the positions heads aim at)."""
  W = seq_len + depth + 1
  take = lambda a, n: np.stack([a[s:s + n] for s in starts])
  batch = {'tokens': take(split.tokens, W).astype(np.int32), 'row_start': take(split.row_start, W)}
  if split.has_features:
    batch['h0'] = take(split.h0, seq_len)
    batch['top_ids'] = take(split.top_ids, seq_len + depth)
    batch['top_p'] = np.exp(take(split.top_logp, seq_len + depth).astype(np.float32))
  return batch
