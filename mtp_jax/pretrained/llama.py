"""The one mapping between Llama tensors, named as Hugging Face's LlamaForCausalLM names them, and
this project's parameter tree (trunk and MTP heads). Format readers translate their own names to
these; `to_trunk` and `heads_to_params` build param subtrees from them, `trunk_from_params` and
`heads_from_params` go back. Qwen2 is
a Llama with biases on q, k and v (model.qkv_bias), Qwen3 one with q and k normalised per head
(model.qk_norm) and heads that may be wider than d_model / num_heads (model.head_dim); their
tensors are named as Qwen2ForCausalLM's and Qwen3ForCausalLM's.

HF stores a linear layer's weight as (out, in); ours are (in, out) with heads split out:
q (D, H, E), k and v (D, K, E), o (H, E, D). Shape legend: D width, H query heads, K kv heads,
E head dim, F MLP width, V vocab.
"""

from typing import NamedTuple

import numpy as np

from mtp_jax.config import block_name


class Architecture(NamedTuple):
  name: str  # GGUF's general.architecture, and config.json's model_type
  hf_class: str  # transformers' class, config.json's architectures
  qkv_bias: bool  # biases on q, k and v (model.qkv_bias)
  qk_norm: bool  # q and k normalised per head (model.qk_norm)
  config: dict  # what else an exported config.json says of it


# The architectures the readers take, and export writes.
ARCHITECTURES = (
    Architecture('llama', 'LlamaForCausalLM', False, False,
                 {'attention_bias': False, 'mlp_bias': False}),
    Architecture('qwen2', 'Qwen2ForCausalLM', True, False,
                 {'use_sliding_window': False, 'sliding_window': None}),
    Architecture('qwen3', 'Qwen3ForCausalLM', False, True,
                 {'attention_bias': False, 'use_sliding_window': False, 'sliding_window': None}),
)


def architecture(name: str) -> Architecture | None:
  """The architecture named `name` (GGUF's, or transformers' class), or None."""
  return next((a for a in ARCHITECTURES if name in (a.name, a.hf_class)), None)


def architecture_of(qkv_bias: bool, qk_norm: bool) -> Architecture | None:
  """The architecture of a trunk with these fields (model.qkv_bias, model.qk_norm), or None."""
  return next((a for a in ARCHITECTURES if (a.qkv_bias, a.qk_norm) == (qkv_bias, qk_norm)),
              None)


def arch_fields(arch: Architecture) -> dict:
  """The model fields an architecture sets."""
  return {'model.qkv_bias': arch.qkv_bias, 'model.qk_norm': arch.qk_norm}

# Per block: (HF suffix, our path inside the block).
_BLOCK = (
    ('input_layernorm.weight', ('attn_norm', 'scale')),
    ('self_attn.q_proj.weight', ('attn', 'q')),
    ('self_attn.k_proj.weight', ('attn', 'k')),
    ('self_attn.v_proj.weight', ('attn', 'v')),
    ('self_attn.o_proj.weight', ('attn', 'o')),
    ('post_attention_layernorm.weight', ('mlp_norm', 'scale')),
    ('mlp.gate_proj.weight', ('mlp', 'gate')),
    ('mlp.up_proj.weight', ('mlp', 'up')),
    ('mlp.down_proj.weight', ('mlp', 'down')),
)
# Qwen2's biases (model.qkv_bias), after the block's other tensors.
_BIASES = (
    ('self_attn.q_proj.bias', ('attn', 'q_bias')),
    ('self_attn.k_proj.bias', ('attn', 'k_bias')),
    ('self_attn.v_proj.bias', ('attn', 'v_bias')),
)
# Qwen3's norms of q and k (model.qk_norm).
_QK_NORMS = (
    ('self_attn.q_norm.weight', ('attn', 'q_norm', 'scale')),
    ('self_attn.k_norm.weight', ('attn', 'k_norm', 'scale')),
)
# The DeepSeek-V3 module's own tensors, beside its block (named as in its released weights).
_MODULE = (
    ('enorm.weight', ('enorm', 'scale')),
    ('hnorm.weight', ('hnorm', 'scale')),
    ('eh_proj.weight', ('eh_proj',)),
)
HEADS_PREFIX = 'mtp'


def block_tensors(qkv_bias: bool, qk_norm: bool = False) -> tuple:
  """(HF suffix, our path inside the block) of every tensor of a block."""
  return _BLOCK + (_BIASES if qkv_bias else ()) + (_QK_NORMS if qk_norm else ())


def block_shapes(d: int, heads: int, kv_heads: int, mlp: int, qkv_bias: bool = False,
                 qk_norm: bool = False, head_dim: int = 0) -> dict:
  """HF shape of each block tensor, by suffix (head_dim 0: d / heads)."""
  e = head_dim or d // heads
  shapes = {'input_layernorm.weight': (d,), 'post_attention_layernorm.weight': (d,),
            'self_attn.q_proj.weight': (heads * e, d), 'self_attn.k_proj.weight': (kv_heads * e, d),
            'self_attn.v_proj.weight': (kv_heads * e, d), 'self_attn.o_proj.weight': (d, heads * e),
            'mlp.gate_proj.weight': (mlp, d), 'mlp.up_proj.weight': (mlp, d),
            'mlp.down_proj.weight': (d, mlp)}
  if qkv_bias:
    shapes.update({'self_attn.q_proj.bias': (heads * e,), 'self_attn.k_proj.bias': (kv_heads * e,),
                   'self_attn.v_proj.bias': (kv_heads * e,)})
  if qk_norm:
    shapes.update({'self_attn.q_norm.weight': (e,), 'self_attn.k_norm.weight': (e,)})
  return shapes


def trunk_shapes(f: dict) -> dict:
  """Every trunk tensor's HF name and shape, for model fields `f` (config paths -> values)."""
  d, v = f['model.d_model'], f['data.vocab_size']
  shapes = {'model.embed_tokens.weight': (v, d), 'model.norm.weight': (d,)}
  if not f['model.tie_embeddings']:
    shapes['lm_head.weight'] = (v, d)
  per_block = block_shapes(d, f['model.num_heads'], f['model.num_kv_heads'], f['model.mlp_dim'],
                           f['model.qkv_bias'], f['model.qk_norm'], f['model.head_dim'])
  for i in range(f['model.num_layers']):
    shapes.update({f'model.layers.{i}.{s}': shape for s, shape in per_block.items()})
  return shapes


def _to_ours(suffix: str, w: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
  """One HF block tensor in our layout."""
  if suffix.endswith('norm.weight'):  # the block's norms, Qwen3's per-head q and k norms
    return w
  if suffix == 'self_attn.o_proj.weight':  # (D, H*E) -> (H, E, D)
    return np.ascontiguousarray(w.T).reshape(heads, -1, w.shape[0])
  n = heads if suffix.startswith('self_attn.q') else kv_heads
  if suffix.endswith('.bias'):  # (N*E,) -> (N, E)
    return w.reshape(n, -1)
  if suffix.startswith('self_attn.'):  # (N*E, D) -> (D, N, E)
    return np.ascontiguousarray(w.T).reshape(w.shape[1], n, -1)
  return np.ascontiguousarray(w.T)  # MLP: (out, in) -> (in, out)


def _hf_view(suffix: str, w: np.ndarray) -> np.ndarray:
  """A block tensor of ours in HF layout, as a view where numpy makes one."""
  if suffix.endswith('norm.weight'):
    return w
  if suffix.endswith('.bias'):  # (N, E) -> (N*E,)
    return w.reshape(-1)
  if suffix == 'self_attn.o_proj.weight':  # (H, E, D) -> (D, H*E)
    return w.reshape(-1, w.shape[-1]).T
  if suffix.startswith('self_attn.'):  # (D, N, E) -> (N*E, D)
    return w.reshape(w.shape[0], -1).T
  return w.T


def _to_hf(suffix: str, w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(_hf_view(suffix, w))


def _set(tree: dict, path: tuple, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _block_to_ours(get, prefix: str, heads: int, kv_heads: int, tensors: tuple) -> dict:
  block = {}
  for suffix, path in tensors:
    _set(block, path, _to_ours(suffix, get(prefix + suffix), heads, kv_heads))
  return block


def to_trunk(get, f: dict) -> dict:
  """Our trunk params (the keys of params['params'] that are not heads) from HF-named tensors;
  `get(name)` returns one as float32."""
  heads, kv = f['model.num_heads'], f['model.num_kv_heads']
  trunk = {'embedding': get('model.embed_tokens.weight'),
           'final_norm': {'scale': get('model.norm.weight')}}
  if not f['model.tie_embeddings']:
    trunk['unembedding'] = np.ascontiguousarray(get('lm_head.weight').T)
  for i in range(f['model.num_layers']):
    trunk[f'blocks_{i}'] = _block_to_ours(get, f'model.layers.{i}.', heads, kv,
                                          block_tensors(f['model.qkv_bias'], f['model.qk_norm']))
  return trunk


def last_blocks(trunk: dict, num_layers: int, n: int = 1) -> dict:
  """The trunk's last n blocks, copied, under a head's block names (the initialisation
  `mtp.init_from=last_block` uses): block j of the head is trunk block num_layers - n + j."""
  return {block_name(j): _copy(trunk[f'blocks_{num_layers - n + j}']) for j in range(n)}


def _copy(tree):
  return {k: _copy(v) if isinstance(v, dict) else np.array(v, copy=True) for k, v in tree.items()}


def head_names(kind: str, k: int, blocks: int, qkv_bias: bool = False,
               qk_norm: bool = False) -> list[tuple[str, tuple, str]]:
  """(HF-style name, our path under params['params'], the block tensor's HF suffix or '') of head
  k's tensors (k from 1) for a sequential module or parallel head of `blocks` blocks (with the
  trunk's q, k and v biases, or q and k norms, when it has them). Sequential modules are named as
  DeepSeek-V3's: enorm, hnorm, eh_proj, the block ('block.', then 'block_1.', ...), and their own
  output norm; parallel heads are blocks."""
  p = f'{HEADS_PREFIX}.{k - 1}.'
  names = []
  if kind == 'sequential':
    names += [(p + s, (f'mtp_{k - 1}',) + path, '') for s, path in _MODULE]
    names.append((p + 'shared_head.norm.weight', (f'mtp_norms_{k - 1}', 'scale'), ''))
  for j in range(blocks):
    names += [(f'{p}{block_name(j)}.{s}', (f'mtp_{k - 1}', block_name(j)) + path, s)
              for s, path in block_tensors(qkv_bias, qk_norm)]
  return names


def _head_views(params: dict, kind: str, depth: int, blocks: int, qkv_bias: bool,
                qk_norm: bool, leaf):
  """(HF name, leaf(param) viewed in HF layout) of every head tensor of params['params']."""
  for k in range(1, depth + 1):
    if kind == 'medusa':
      for name, w in sorted(params[f'mtp_{k - 1}'].items()):
        yield f'{HEADS_PREFIX}.{k - 1}.{name}', leaf(w)
      continue
    for name, path, suffix in head_names(kind, k, blocks, qkv_bias, qk_norm):
      w = leaf(_get(params, path))
      yield name, _hf_view(suffix, w) if suffix else w.T if path[-1] == 'eh_proj' else w


def heads_from_params(params: dict, kind: str, depth: int, blocks: int = 1,
                      qkv_bias: bool = False, qk_norm: bool = False) -> dict:
  """Every head tensor of params['params'], HF-named and HF-shaped (float32 numpy)."""
  return {name: np.ascontiguousarray(w) for name, w in _head_views(
      params, kind, depth, blocks, qkv_bias, qk_norm, lambda w: np.asarray(w, np.float32))}


def head_shapes(params: dict, kind: str, depth: int, blocks: int = 1, qkv_bias: bool = False,
                qk_norm: bool = False) -> dict:
  """{HF name: shape} of what heads_from_params makes of params (abstract values will do), with
  no data made: each tensor is a view of one zero."""
  zero = lambda w: np.broadcast_to(np.float32(0), w.shape)
  return {name: w.shape for name, w in _head_views(params, kind, depth, blocks, qkv_bias,
                                                    qk_norm, zero)}


def heads_to_params(get, names: list[str], kind: str, depth: int, heads: int,
                    kv_heads: int, blocks: int = 1, qkv_bias: bool = False,
                    qk_norm: bool = False) -> dict:
  """The inverse of heads_from_params: head subtrees of params['params'] from HF-named tensors."""
  tree = {}
  for k in range(1, depth + 1):
    if kind == 'medusa':
      prefix = f'{HEADS_PREFIX}.{k - 1}.'
      for name in names:
        if name.startswith(prefix):
          _set(tree, (f'mtp_{k - 1}', name[len(prefix):]), get(name))
      continue
    for name, path, suffix in head_names(kind, k, blocks, qkv_bias, qk_norm):
      w = get(name)
      if suffix:
        w = _to_ours(suffix, w, heads, kv_heads)
      elif path[-1] == 'eh_proj':
        w = np.ascontiguousarray(w.T)
      _set(tree, path, w)
  return tree


def trunk_from_params(params: dict, f: dict) -> dict:
  """The trunk of params['params'] as HF-named, HF-shaped float32 tensors."""
  out = {'model.embed_tokens.weight': np.asarray(params['embedding'], np.float32),
         'model.norm.weight': np.asarray(params['final_norm']['scale'], np.float32)}
  if not f['model.tie_embeddings']:
    out['lm_head.weight'] = np.ascontiguousarray(np.asarray(params['unembedding'], np.float32).T)
  for i in range(f['model.num_layers']):
    for suffix, path in block_tensors(f['model.qkv_bias'], f['model.qk_norm']):
      w = np.asarray(_get(params[f'blocks_{i}'], path), np.float32)
      out[f'model.layers.{i}.{suffix}'] = _to_hf(suffix, w)
  return out
