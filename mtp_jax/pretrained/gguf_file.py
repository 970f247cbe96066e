"""llama.cpp's GGUF files, read and dequantized with the `gguf` package: the model fields and the
tokenizer from the metadata, tensors renamed to Hugging Face's Llama names, and a Llama's q/k rows
put back from llama.cpp's rotary layout (its converter leaves Qwen2's as they are, and rotates
them as Hugging Face does).
"""

import functools
import os

import gguf
import numpy as np

from mtp_jax import atomic
from mtp_jax.config import stored_head_dim
from mtp_jax.pretrained import gguf_header, llama, tokenizer as tok_lib
from mtp_jax.pretrained.base import Pretrained, PretrainedError, sha256, stop_tokens

Q = gguf.GGMLQuantizationType
# Every type gguf.quants dequantizes in NumPy that llama.cpp uses for Llama weights.
SUPPORTED = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K,
             Q.Q4_K, Q.Q5_K, Q.Q6_K}

_NAMES = {'attn_norm': 'input_layernorm.weight', 'attn_q': 'self_attn.q_proj.weight',
          'attn_k': 'self_attn.k_proj.weight', 'attn_v': 'self_attn.v_proj.weight',
          'attn_output': 'self_attn.o_proj.weight', 'ffn_norm': 'post_attention_layernorm.weight',
          'ffn_gate': 'mlp.gate_proj.weight', 'ffn_up': 'mlp.up_proj.weight',
          'ffn_down': 'mlp.down_proj.weight', 'attn_q_norm': 'self_attn.q_norm.weight',
          'attn_k_norm': 'self_attn.k_norm.weight'}
_BIASES = ('attn_q', 'attn_k', 'attn_v')  # blk.N.attn_q.bias, ...
ROPE_FREQS = 'rope_freqs'  # its key among the tensors _tensors returns
_TOP = {'token_embd.weight': 'model.embed_tokens.weight', 'output_norm.weight': 'model.norm.weight',
        'output.weight': 'lm_head.weight'}


def hf_name(name: str) -> str | None:
  if name in _TOP:
    return _TOP[name]
  parts = name.split('.')
  if len(parts) == 4 and parts[0] == 'blk' and parts[3] == 'weight' and parts[2] in _NAMES:
    return f'model.layers.{parts[1]}.{_NAMES[parts[2]]}'
  if len(parts) == 4 and parts[0] == 'blk' and parts[3] == 'bias' and parts[2] in _BIASES:
    return f"model.layers.{parts[1]}.{_NAMES[parts[2]].replace('.weight', '.bias')}"
  return None


def gguf_name(hf: str) -> str:
  """The inverse of hf_name, for messages about a tensor a file lacks."""
  for name, mapped in _TOP.items():
    if mapped == hf:
      return name
  _, _, i, suffix = hf.split('.', 3)
  base, kind = suffix.rsplit('.', 1)
  return f'blk.{i}.' + next(k for k, v in _NAMES.items() if v == base + '.weight') + '.' + kind


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp stores each head's q/k rows as interleaved (x0, y0, x1, y1, ...) rotary pairs; our
  RoPE (and HF's) rotates the two halves (x0..x_{E/2-1}, y0..). Undoes the conversion's shuffle."""
  return w.reshape(heads, -1, 2, w.shape[-1]).swapaxes(1, 2).reshape(w.shape)


def _value(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _list(reader, name: str, key: str, kind: type):
  """An array of `kind` (str or int) in the metadata, or None where the file has none; one line
  naming the key where it is something else."""
  value = _value(reader, key)
  if value is None or (isinstance(value, list) and all(
      isinstance(v, kind) and not isinstance(v, bool) for v in value)):
    return value
  raise PretrainedError(f'model.init_from: {name}: {key} is not a list of '
                        f"{'texts' if kind is str else 'integers'}")


def _number(reader, name: str, key: str, default=None, kind=int):
  """A numeric metadata value as `kind` (int, which also takes a whole float, or float), or
  `default` where the file has none; one line naming the key where it is something else."""
  value = _value(reader, key, default)
  if value is None:
    return None
  if isinstance(value, (int, float)) and not isinstance(value, bool) and (
      kind is float or float(value).is_integer()):
    return kind(value)
  raise PretrainedError(f'model.init_from: {name}: {key}={value!r} is not '
                        f"{'an integer' if kind is int else 'a number'}")


def read(path: str) -> Pretrained:
  """The header of a GGUF file, every check made; tensors are dequantized only when asked for."""
  name = os.path.basename(path)
  reader, arch = _open(path, name)
  tensors = _tensors(reader, name, arch)
  tokens = _list(reader, name, 'tokenizer.ggml.tokens', str)  # decoded once: 49152 for SmolLM2
  fields = _fields(reader, name, arch, tensors, tokens)
  check_tensors(name, {n: tuple(int(s) for s in reversed(t.shape)) for n, t in tensors.items()},
                fields, gguf_name)

  def get(hf: str) -> np.ndarray:
    t = tensors[hf]
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    w = w.reshape(tuple(int(s) for s in reversed(t.shape)))
    if arch.name == 'llama' and hf.endswith('q_proj.weight'):
      w = unpermute(w, fields['model.num_heads'])
    elif arch.name == 'llama' and hf.endswith('k_proj.weight'):
      w = unpermute(w, fields['model.num_kv_heads'])
    return w

  # ids of the tokens the file lists (it may list fewer than its vocabulary)
  ids = _token_ids(reader, name, len(tokens) if tokens else fields['data.vocab_size'])
  chat_template = _value(reader, 'tokenizer.chat_template', '') or ''
  if not isinstance(chat_template, str):
    raise PretrainedError(f'model.init_from: {name}: tokenizer.chat_template is not text '
                          f'({type(chat_template).__name__})')
  return Pretrained(
      path=path, identity=sha256([path]), fields=fields,
      context_length=_number(reader, name, f'{arch.name}.context_length', 0) or None,
      tokenizer=_tokenizer(reader, name, tokens, ids['bos']),
      eos_id=ids['eos'], bos_id=ids['bos'], chat_template=chat_template, get=get,
      # llama.cpp ends generation at the end of a turn or a message too (Llama 3's <|eot_id|>).
      stop_ids=stop_tokens(ids['eos'], ids['eot'], ids['eom']),
      pad_id=ids['padding'], unk_id=ids['unknown'])


def _token_ids(reader, name: str, vocab: int) -> dict:
  """The special tokens' ids the metadata names ({'bos': id or None, ...}). One that decoding
  reads (bos, eos, eot, eom) must be a token of the vocabulary; a padding or unknown id outside
  it is taken as none, as llama.cpp takes it (only an export writes them)."""
  ids = {}
  for kind in ('bos', 'eos', 'eot', 'eom', 'padding', 'unknown'):
    key = f'tokenizer.ggml.{kind}_token_id'
    value = _value(reader, key)
    if value is not None and not (isinstance(value, int) and 0 <= value < vocab):
      if kind in ('padding', 'unknown'):
        value = None
      else:
        raise PretrainedError(f'model.init_from: {name}: {key}={value!r} is not a token id of '
                              f'its {vocab}-token vocabulary')
    ids[kind] = value
  return ids


def _open(path: str, name: str):
  """The file's reader and architecture, once it is known to be whole and of an architecture
  read here, with the metadata needed."""
  try:
    gguf_header.check(path)  # first: the reader loops on a damaged count, and reads past the end
    reader = gguf.GGUFReader(path)
  except Exception as e:  # the reader raises ValueError, struct errors or IndexError on damage
    reason = str(e) if isinstance(e, gguf_header.Damaged) else f'{type(e).__name__}: {e}'
    raise PretrainedError(f'model.init_from: {name} is not a readable GGUF file '
                          f'(truncated or damaged: {reason})') from None
  arch = _value(reader, 'general.architecture', '')
  if llama.architecture(arch) is None:
    raise PretrainedError(f"model.init_from: {name} has architecture '{arch}'; only "
                          f"{', '.join(repr(a.name) for a in llama.ARCHITECTURES)} are supported")
  # llama.cpp refuses a file without any of these; the others have defaults it shares
  missing = [k for k in ('block_count', 'embedding_length', 'feed_forward_length',
                         'attention.head_count', 'attention.layer_norm_rms_epsilon')
             if _value(reader, f'{arch}.{k}') is None]
  if missing:
    raise PretrainedError(f'model.init_from: {name} has no {arch}.{missing[0]} in its metadata')
  # llama.cpp divides the rotary frequencies by rope.scaling.factor (older files:
  # rope.scale_linear; 0 means 1) unless the type is 'none', linear being the type a file that
  # names none gets; YaRN and the like change them further.
  kind = _value(reader, f'{arch}.rope.scaling.type', '') or ''
  factor = (_number(reader, name, f'{arch}.rope.scaling.factor', kind=float)
            or _number(reader, name, f'{arch}.rope.scale_linear', kind=float) or 0.0)
  if kind not in ('', 'none', 'linear') or (kind != 'none' and factor not in (0.0, 1.0)):
    raise PretrainedError(f'model.init_from: {name} uses RoPE scaling ({kind or "linear"}, '
                          f'factor {factor or "unset"}), which is not supported')
  return reader, llama.architecture(arch)


def _tensors(reader, name: str, arch: llama.Architecture) -> dict:
  """{HF name: the file's tensor}, every tensor one this project knows, of a type that can be
  read (check_tensors checks that they are its architecture's)."""
  tensors = {}
  for t in reader.tensors:
    hf = hf_name(t.name)
    if t.name == 'rope_freqs.weight' and arch.name == 'llama':  # Llama 3's scaling: each frequency's
      hf = ROPE_FREQS                                           # divisor
    if hf is None:
      raise PretrainedError(f"model.init_from: {name} has tensor '{t.name}', which is not part of "
                            f'a {arch.name} model this project reads')
    if t.tensor_type not in SUPPORTED:
      raise PretrainedError(f"model.init_from: tensor '{t.name}' of {name} has type "
                            f'{t.tensor_type.name}, which is not supported '
                            f"({', '.join(sorted(q.name for q in SUPPORTED))})")
    tensors[hf] = t
  return tensors


def _fields(reader, name: str, arch: llama.Architecture, tensors: dict, tokens) -> dict:
  """The config fields the file defines (Pretrained.fields)."""
  a = arch.name + '.'
  number = functools.partial(_number, reader, name)
  d = number(a + 'embedding_length')
  heads = number(a + 'attention.head_count')
  if heads < 1:
    raise PretrainedError(f'model.init_from: {name} has {a}attention.head_count={heads}')
  vocab = number(a + 'vocab_size', len(tokens) if tokens else 0)
  if 'model.embed_tokens.weight' in tensors and not vocab:
    vocab = int(tensors['model.embed_tokens.weight'].shape[1])
  if tokens and len(tokens) > vocab:  # its tokenizer would hand out ids the embedding lacks
    raise PretrainedError(f'model.init_from: {name} lists {len(tokens)} tokens in '
                          f'tokenizer.ggml.tokens, more than its vocabulary of {vocab} '
                          f'({a}vocab_size)')
  head_dim = number(a + 'attention.key_length', d // heads)
  if number(a + 'attention.value_length', head_dim) != head_dim:
    raise PretrainedError(f'model.init_from: {name} has keys and values of different widths; '
                          'only equal ones are supported')
  factors = ()
  if ROPE_FREQS in tensors:
    t = tensors.pop(ROPE_FREQS)
    factors = tuple(float(f) for f in gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1))
  rope_dims = number(a + 'rope.dimension_count', head_dim)
  if rope_dims != head_dim:
    raise PretrainedError(f'model.init_from: {name} rotates {rope_dims} of each head\'s '
                          f'{head_dim} dimensions; only full rotary embeddings are supported')
  return {
      'model.d_model': d, 'model.num_layers': number(a + 'block_count'),
      'model.num_heads': heads,
      'model.num_kv_heads': number(a + 'attention.head_count_kv', heads),
      'model.mlp_dim': number(a + 'feed_forward_length'),
      'model.rope_theta': number(a + 'rope.freq_base', 10000.0, float),
      'model.rope_factors': factors,
      'model.norm_eps': number(a + 'attention.layer_norm_rms_epsilon', kind=float),
      'model.tie_embeddings': 'lm_head.weight' not in tensors,
      **llama.arch_fields(arch), 'model.head_dim': stored_head_dim(d, heads, head_dim),
      'data.vocab_size': vocab}


def _tokenizer(reader, name: str, tokens, bos_id):
  """The tokenizer the metadata describes, or None when the file has no vocabulary."""
  if not tokens:
    return None
  pre = _value(reader, 'tokenizer.ggml.pre', 'default')
  return tok_lib.from_gguf_metadata(
      name, tokens=list(tokens), merges=_list(reader, name, 'tokenizer.ggml.merges', str) or [],
      token_types=_list(reader, name, 'tokenizer.ggml.token_type', int) or [],
      model=_value(reader, 'tokenizer.ggml.model', ''), pre=pre,
      # llama.cpp's default where the file does not say: a BOS first for Llama 3's tokenizer
      add_bos=bool(_value(reader, 'tokenizer.ggml.add_bos_token', pre == 'llama-bpe')),
      bos_id=bos_id)


def check_tensors(name: str, shapes: dict, fields: dict, shown=lambda hf: hf):
  """Every tensor the fields call for is present with its shape, and no other. `shown` maps an
  HF name to the name the file uses, for the message."""
  # a block the fields call for and the file lacks, said before the shapes of all of them are
  # listed (a damaged count of 2**40 blocks would fill the memory first)
  blocks = {hf.split('.')[2] for hf in shapes if hf.startswith('model.layers.')}
  missing = next(i for i in range(len(blocks) + 1) if str(i) not in blocks)
  if missing < fields['model.num_layers']:
    raise PretrainedError(f"model.init_from: {name} has no tensor "
                          f"'{shown(f'model.layers.{missing}.self_attn.q_proj.weight')}' (its "
                          f"fields give {fields['model.num_layers']} blocks)")
  wanted = llama.trunk_shapes(fields)
  extra = sorted(set(shapes) - set(wanted))
  if extra:
    arch = llama.architecture_of(fields['model.qkv_bias'], fields['model.qk_norm'])
    raise PretrainedError(f"model.init_from: {name} has tensor '{shown(extra[0])}', which is not "
                          f'part of a {arch.name} model this project reads')
  for hf, shape in wanted.items():
    label = shown(hf)
    if hf not in shapes:
      raise PretrainedError(f"model.init_from: {name} has no tensor '{label}'")
    if tuple(shapes[hf]) != tuple(shape):
      raise PretrainedError(f"model.init_from: tensor '{label}' of {name} has shape "
                            f'{tuple(shapes[hf])}, expected {tuple(shape)}')


# The types a file can be rewritten in (rewritten), each with the file type it then records
FILE_TYPES = {gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
               gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
               gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
               gguf.GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
               gguf.GGMLQuantizationType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0}


def rewritten(source: str, qtype: gguf.GGMLQuantizationType) -> str:
  """`source` with its tensors in another type, under their own names, in llama.cpp's own layout
  and with the same metadata (but the file type): with F32 every tensor dequantized; with a
  quantized type each quantized matrix dequantized and quantized again to it by gguf's own
  quantizer (the other tensors dequantized to float32), so the file holds that type's rounding
  of the source's weights. Written once beside it (NAME.TYPE.gguf), whole or not at all
  (atomic.replacing)."""
  if qtype not in FILE_TYPES:
    raise PretrainedError(f'cannot rewrite a GGUF file as {qtype.name} (one of '
                          f'{", ".join(t.name for t in FILE_TYPES)})')
  path = f'{source.removesuffix(".gguf")}.{qtype.name}.gguf'
  if os.path.exists(path):
    return path
  reader = gguf.GGUFReader(source)
  plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
           gguf.GGMLQuantizationType.BF16)
  with atomic.replacing(path) as tmp:
    writer = gguf.GGUFWriter(tmp, arch=reader.fields['general.architecture'].contents())
    for field in reader.fields.values():
      if field.name.startswith('GGUF.') or field.name == 'general.architecture':
        continue  # the writer's own
      value = FILE_TYPES[qtype] if field.name == 'general.file_type' else field.contents()
      writer.add_key_value(field.name, value, field.types[0],
                           field.types[1] if len(field.types) > 1 else None)
    for t in reader.tensors:
      w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
      w = w.reshape(tuple(int(s) for s in reversed(t.shape)))
      if qtype != gguf.GGMLQuantizationType.F32 and t.tensor_type not in plain and w.ndim == 2:
        writer.add_tensor(t.name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
      else:
        writer.add_tensor(t.name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
  return path
