"""MTP heads as one safetensors file, beside a trunk in any format: the head tensors in HF layout
(DeepSeek-V3's names for sequential modules), the token ranking a reduced draft vocabulary reads,
and metadata saying which model and trunk they belong to.
"""

import functools
import os

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mtp_jax import atomic
from mtp_jax.config import same_widths
from mtp_jax.pretrained import field, hf, llama
from mtp_jax.pretrained.base import PretrainedError, cast, finite

FORMAT = 'mtp_jax.heads.v1'
RANK = 'token_rank'  # every token id, most frequent in the heads' training data first
# Metadata key -> config path; a heads file fits a config when these agree (depth may be fewer).
_MATCH = {'kind': 'mtp.kind', 'head_mlp_dim': 'mtp.head_mlp_dim', 'd_model': 'model.d_model',
          'num_heads': 'model.num_heads', 'num_kv_heads': 'model.num_kv_heads',
          'mlp_dim': 'model.mlp_dim', 'vocab_size': 'data.vocab_size',
          'feature_layers': 'mtp.feature_layers', 'head_blocks': 'mtp.head_blocks',
          'qkv_bias': 'model.qkv_bias', 'qk_norm': 'model.qk_norm', 'head_dim': 'model.head_dim'}
# Keys added after the first heads files were written, with the value those files mean.
_ADDED = {'feature_layers': '', 'head_blocks': '1', 'qkv_bias': 'False', 'qk_norm': 'False',
          'head_dim': '0'}


def _value(config, path: str) -> str:
  """A config field as heads files record it (of a validated config: config.validate writes
  mtp.feature_layers in one form)."""
  return str(field(config, path))


def save(path: str, params: dict, config, trunk: str = '', token_rank=None,
         dtype=np.float16) -> None:
  """Writes the heads of params['params'] (atomically) as `dtype`."""
  kind, depth = config.mtp.kind, config.mtp.depth
  heads = llama.heads_from_params(params, kind, depth, config.mtp.head_blocks,
                                  config.model.qkv_bias, config.model.qk_norm)
  tensors = cast(heads, dtype)  # before the file is touched
  if token_rank is not None:
    tensors[RANK] = np.asarray(token_rank, np.int32)
  meta = {key: _value(config, path) for key, path in _MATCH.items()}
  meta.update(format=FORMAT, depth=str(depth), trunk=trunk)
  with atomic.replacing(path) as tmp:  # whole or not at all, with a plain file's mode
    save_file(tensors, tmp, metadata=meta)


# what the heads' tensors may hold (cast to float32 when loaded), and the ranking
_FLOATS, _INTEGERS = hf.DTYPES, ('I32', 'I64')


def _read_meta(path: str):
  """(metadata, {tensor name: shape}, {tensor name: dtype}) of a heads file."""
  if not os.path.isfile(path):
    raise PretrainedError(f"mtp.init_from: '{path}' is not a file (use '', 'last_block' or a "
                          'heads file)')
  try:
    with safe_open(path, framework='numpy') as f:
      slices = {n: f.get_slice(n) for n in f.keys()}
      return (f.metadata() or {}, {n: tuple(s.get_shape()) for n, s in slices.items()},
              {n: s.get_dtype() for n, s in slices.items()})
  except Exception as e:  # safetensors' own error type for a damaged header
    raise PretrainedError(f'mtp.init_from: {os.path.basename(path)} is not a readable '
                          f'safetensors file ({e})') from None


def expected_shapes(config) -> dict:
  """{name: shape} of the mtp.depth heads of config's model as a heads file holds them: the
  shapes of the model's own head params, laid out as save writes them (llama.head_shapes)."""
  from mtp_jax.config import ModelConfig
  return _head_shapes(ModelConfig.from_config(config))


@functools.lru_cache(maxsize=8)  # a session checks its heads file, then loads it
def _head_shapes(cfg) -> dict:
  import jax
  from mtp_jax.model import init_params
  abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))['params']
  return llama.head_shapes(abstract, cfg.mtp_kind, cfg.mtp_depth, cfg.head_blocks, cfg.qkv_bias,
                           cfg.qk_norm)


def check(path: str, config) -> dict:
  """The heads file's metadata, once it is known to fit config (one-line errors otherwise)."""
  meta, shapes, dtypes = _read_meta(path)
  name = os.path.basename(path)
  if meta.get('format') != FORMAT:
    raise PretrainedError(f'mtp.init_from: {name} is not a heads file written by this project')
  held = same_widths({path_: meta.get(key, _ADDED.get(key)) for key, path_ in _MATCH.items()})
  wanted = same_widths({path_: _value(config, path_) for path_ in _MATCH.values()})
  for path_ in _MATCH.values():
    if held[path_] != wanted[path_]:
      raise PretrainedError(f'mtp.init_from: {name} holds heads with {path_}={held[path_]!r}, '
                            f'the config has {wanted[path_]!r}')
  depth = str(meta.get('depth', ''))
  if not (depth.isascii() and depth.isdigit() and len(depth) <= 9):  # not '²', nor 5000 digits
    raise PretrainedError(f"mtp.init_from: {name} records no number of heads (its 'depth' "
                          f"metadata is {meta.get('depth')!r})")
  if int(depth) < config.mtp.depth:
    raise PretrainedError(f"mtp.init_from: {name} holds {depth} heads, fewer than "
                          f'mtp.depth={config.mtp.depth}')
  expected = expected_shapes(config)
  for tensor, shape in expected.items():
    if tensor not in shapes:
      raise PretrainedError(f"mtp.init_from: {name} has no tensor '{tensor}'")
    if shapes[tensor] != tuple(shape):
      raise PretrainedError(f"mtp.init_from: tensor '{tensor}' of {name} has shape "
                            f'{shapes[tensor]}, expected {tuple(shape)}')
    if dtypes[tensor] not in _FLOATS:
      raise PretrainedError(f"mtp.init_from: tensor '{tensor}' of {name} has type "
                            f"{dtypes[tensor]}, not one of {', '.join(_FLOATS)}")
  # any other tensor is the ranking or one of the heads past mtp.depth the file records
  later = lambda t: (t.startswith(f'{llama.HEADS_PREFIX}.') and t.split('.')[1].isdigit()
                     and config.mtp.depth <= int(t.split('.')[1]) < int(depth))
  extra = sorted(t for t in shapes if t not in expected and t != RANK and not later(t))
  if extra:
    raise PretrainedError(f"mtp.init_from: {name} has tensor '{extra[0]}', which is not part of "
                          f'its {depth} heads')
  if RANK in shapes:
    _check_rank(path, name, shapes[RANK], dtypes[RANK], config.data.vocab_size)
  return meta


def _check_rank(path: str, name: str, shape: tuple, dtype: str, vocab: int) -> None:
  """The ranking is every token id once (a draft vocabulary is its first N)."""
  if shape != (vocab,) or dtype not in _INTEGERS:
    raise PretrainedError(f"mtp.init_from: {name}'s {RANK} is {dtype} of shape {shape}, not the "
                          f'{vocab} token ids of the vocabulary as integers')
  with safe_open(path, framework='numpy') as f:
    rank = f.get_tensor(RANK)
  if not np.array_equal(np.sort(rank), np.arange(vocab)):
    raise PretrainedError(f"mtp.init_from: {name}'s {RANK} does not hold each of the {vocab} "
                          'token ids once')


def load(path: str, config) -> dict:
  check(path, config)
  with safe_open(path, framework='numpy') as f:
    names = list(f.keys())
    get = finite(lambda n: f.get_tensor(n).astype(np.float32), 'mtp.init_from',
                 os.path.basename(path))
    return llama.heads_to_params(get, names,
                                 config.mtp.kind, config.mtp.depth, config.model.num_heads,
                                 config.model.num_kv_heads, config.mtp.head_blocks,
                                 config.model.qkv_bias, config.model.qk_norm)


def token_rank(path: str):
  """The ranking saved with the heads, or None."""
  _, shapes, _ = _read_meta(path)
  if RANK not in shapes:
    return None
  with safe_open(path, framework='numpy') as f:
    return f.get_tensor(RANK)

