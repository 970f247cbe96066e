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
from mtp_jax.pretrained import field, llama
from mtp_jax.pretrained.base import PretrainedError, cast

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


def _read_meta(path: str):
  """(metadata, {tensor name: shape}) of a heads file."""
  if not os.path.isfile(path):
    raise PretrainedError(f"mtp.init_from: '{path}' is not a file (use '', 'last_block' or a "
                          'heads file)')
  try:
    with safe_open(path, framework='numpy') as f:
      return f.metadata() or {}, {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
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
  meta, shapes = _read_meta(path)
  name = os.path.basename(path)
  if meta.get('format') != FORMAT:
    raise PretrainedError(f'mtp.init_from: {name} is not a heads file written by this project')
  held = same_widths({path_: meta.get(key, _ADDED.get(key)) for key, path_ in _MATCH.items()})
  wanted = same_widths({path_: _value(config, path_) for path_ in _MATCH.values()})
  for path_ in _MATCH.values():
    if held[path_] != wanted[path_]:
      raise PretrainedError(f'mtp.init_from: {name} holds heads with {path_}={held[path_]!r}, '
                            f'the config has {wanted[path_]!r}')
  if not str(meta.get('depth', '')).isdigit():
    raise PretrainedError(f"mtp.init_from: {name} records no number of heads (its 'depth' "
                          f"metadata is {meta.get('depth')!r})")
  if int(meta['depth']) < config.mtp.depth:
    raise PretrainedError(f"mtp.init_from: {name} holds {meta['depth']} heads, fewer than "
                          f'mtp.depth={config.mtp.depth}')
  for tensor, shape in expected_shapes(config).items():
    if tensor not in shapes:
      raise PretrainedError(f"mtp.init_from: {name} has no tensor '{tensor}'")
    if shapes[tensor] != tuple(shape):
      raise PretrainedError(f"mtp.init_from: tensor '{tensor}' of {name} has shape "
                            f'{shapes[tensor]}, expected {tuple(shape)}')
  return meta


def load(path: str, config) -> dict:
  check(path, config)
  with safe_open(path, framework='numpy') as f:
    names = list(f.keys())
    return llama.heads_to_params(lambda n: f.get_tensor(n).astype(np.float32), names,
                                 config.mtp.kind, config.mtp.depth, config.model.num_heads,
                                 config.model.num_kv_heads, config.mtp.head_blocks,
                                 config.model.qkv_bias, config.model.qk_norm)


def token_rank(path: str):
  """The ranking saved with the heads, or None."""
  _, shapes = _read_meta(path)
  if RANK not in shapes:
    return None
  with safe_open(path, framework='numpy') as f:
    return f.get_tensor(RANK)

