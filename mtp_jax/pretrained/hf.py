"""Hugging Face model directories: config.json, *.safetensors (one file, or shards listed by
model.safetensors.index.json) and tokenizer.json, for LlamaForCausalLM, Qwen2ForCausalLM and
Qwen3ForCausalLM.
"""

import hashlib
import json
import os

import numpy as np
import tokenizers
from safetensors import safe_open

from mtp_jax.config import rotary_frequencies, stored_head_dim
from mtp_jax.pretrained import gguf_file, llama
from mtp_jax.pretrained.base import Pretrained, PretrainedError, sha256, stop_tokens

DTYPES = ('F32', 'F16', 'BF16')
# generation_config.json's fields an export writes from the model it writes (and the version of
# transformers that wrote the file)
GENERATION_IDS = ('bos_token_id', 'eos_token_id', 'pad_token_id', 'transformers_version',
                  '_from_model_config')
SETUP_FILES = ('config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json',
               'chat_template.jinja')


def setup_identity(directory: str) -> str:
  """sha256 over the SETUP_FILES the directory has, each by name, length and content. Heads name
  their trunk by the weights' sha256 alone; what the trunk computes and writes depends on these
  files as well."""
  digest = hashlib.sha256()
  for name in SETUP_FILES:
    path = os.path.join(directory, name)
    if os.path.exists(path):
      with open(path, 'rb') as f:
        data = f.read()
      digest.update(f'{name}\0{len(data)}\0'.encode())
      digest.update(data)
  return digest.hexdigest()


def _chat_template(value, name: str) -> str:
  """tokenizer_config.json's chat_template: a template, or a list of named ones, of which the one
  named 'default' is the chat's (as transformers takes it); '' when there is none."""
  if isinstance(value, list):
    named = {str(t.get('name')): t.get('template') for t in value if isinstance(t, dict)}
    value = named.get('default')
    if value is None:
      raise PretrainedError(f'model.init_from: {name}/tokenizer_config.json lists chat templates '
                            f"named {', '.join(map(str, named))}, none of them 'default'")
  if value is not None and not isinstance(value, str):
    raise PretrainedError(f'model.init_from: {name}/tokenizer_config.json has a chat_template '
                          f'that is not text ({type(value).__name__})')
  return value or ''


def _json(path: str, name: str) -> dict:
  """A JSON file that holds one object, else the one-line error naming it."""
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except json.JSONDecodeError as e:
    raise PretrainedError(f'model.init_from: {name} is not valid JSON ({e.msg})') from None
  except UnicodeDecodeError:
    raise PretrainedError(f'model.init_from: {name} is not UTF-8 text') from None
  except (RecursionError, ValueError) as e:  # nested past Python's stack, a 5000-digit number
    raise PretrainedError(f'model.init_from: {name} cannot be read as JSON '
                          f'({type(e).__name__}: {str(e)[:80]})') from None
  except OSError as e:  # a folder where the file should be, a file this user cannot read
    raise PretrainedError(f'model.init_from: {name} cannot be read ({e.strerror})') from None
  if not isinstance(value, dict):
    raise PretrainedError(f'model.init_from: {name} holds a JSON {type(value).__name__}, not an '
                          'object')
  return value


def weight_files(directory: str) -> tuple[list[str], dict]:
  """model.safetensors, else the shards its index names (in that order, as transformers looks
  for them in a local directory), with the index's weight_map ({} for one file)."""
  single = os.path.join(directory, 'model.safetensors')
  index = os.path.join(directory, 'model.safetensors.index.json')
  for path in (single, index):  # a cache's link whose blob is gone
    if os.path.islink(path) and not os.path.exists(path):
      raise PretrainedError(f'model.init_from: {directory}/{os.path.basename(path)} is a link to '
                            'a file that is gone')
  if os.path.exists(single):
    return [single], {}
  if not os.path.exists(index):
    raise PretrainedError(f'model.init_from: {directory} has neither model.safetensors nor '
                          'model.safetensors.index.json')
  weight_map = _json(index, 'model.safetensors.index.json').get('weight_map')
  if (not isinstance(weight_map, dict) or not weight_map
      or not all(isinstance(s, str) for s in weight_map.values())):
    raise PretrainedError(f'model.init_from: {directory}/model.safetensors.index.json has no '
                          'weight_map of tensor names to file names')
  return [os.path.join(directory, s) for s in sorted(set(weight_map.values()))], weight_map


def rope(c: dict, name: str, head_dim: int) -> tuple[float, tuple]:
  """(rotary base, what divides each frequency) of a config.json: top-level `rope_theta` with
  `rope_scaling` (transformers 4), or both inside `rope_parameters` (transformers 5). Unscaled
  rotary embeddings, or Llama 3's scaling ('llama3'); another type is refused rather than
  ignored."""
  theta = float((c.get('rope_parameters') or {}).get('rope_theta', c.get('rope_theta', 10000.0)))
  scaled = {}
  for key in ('rope_scaling', 'rope_parameters'):
    given = c.get(key) or {}
    kind = given.get('rope_type', given.get('type', 'default'))
    if kind not in ('default', 'llama3'):
      raise PretrainedError(f'model.init_from: {name} sets {key} of type {kind!r}; only unscaled '
                            "rotary embeddings ('default') and Llama 3's ('llama3') are supported")
    if kind == 'llama3':
      scaled[key] = given
  if not scaled:
    return theta, ()
  if len({json.dumps({k: v for k, v in p.items() if k != 'rope_theta'}, sort_keys=True)
          for p in scaled.values()}) > 1:
    raise PretrainedError(f'model.init_from: {name} sets rope_scaling and rope_parameters to '
                          'different scalings')
  params = dict(next(iter(scaled.values())))
  # as transformers: the original context from the top level, else the model's own
  params.setdefault('original_max_position_embeddings',
                    c.get('original_max_position_embeddings', c.get('max_position_embeddings')))
  missing = [k for k in ('factor', 'low_freq_factor', 'high_freq_factor',
                         'original_max_position_embeddings') if params.get(k) is None]
  if missing:
    raise PretrainedError(f"model.init_from: {name}'s llama3 rotary scaling has no {missing[0]}")
  return theta, llama3_factors(theta, head_dim, params)


def llama3_factors(theta: float, head_dim: int, p: dict) -> tuple:
  """Llama 3's scaling as a factor per frequency: frequencies whose wavelength is past
  original_max_position_embeddings / low_freq_factor are divided by `factor`, those under
  it / high_freq_factor kept, those between divided by a blend of the two."""
  freq = rotary_frequencies(theta, head_dim // 2)
  old = p['original_max_position_embeddings']
  factor, low, high = p['factor'], p['low_freq_factor'], p['high_freq_factor']
  wavelength = 2 * np.pi / freq
  with np.errstate(divide='ignore', invalid='ignore'):  # low == high: no band between them
    smooth = (old / wavelength - low) / (high - low)
  scaled = np.where(wavelength > old / low, freq / factor,
                    np.where(wavelength < old / high, freq,
                             (1 - smooth) * freq / factor + smooth * freq))
  return tuple(float(f) for f in freq / scaled)


def fields_from_config(c: dict, name: str) -> dict:
  listed = c.get('architectures') or [c.get('model_type', '?')]
  arch = next((a for a in map(llama.architecture, listed) if a), None)
  if arch is None:
    raise PretrainedError(f"model.init_from: {name} is a {listed[0]}; only "
                          f"{', '.join(a.hf_class for a in llama.ARCHITECTURES)} are supported")
  for key in ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads',
              'intermediate_size', 'vocab_size', 'head_dim',
              'max_position_embeddings'):  # the missing: KeyError below, or optional
    if c.get(key) is not None and not (type(c[key]) is int and c[key] > 0):
      raise PretrainedError(f'model.init_from: {name}/config.json: {key} must be a positive '
                            f'integer, got {c[key]!r}')
  # Llama's attention_bias would also put one on o_proj
  for key, ok in (('attention_bias', False), ('mlp_bias', False)):
    if c.get(key, ok) not in (ok, None):
      raise PretrainedError(f'model.init_from: {name} sets {key}={c[key]!r}, which is not '
                            'supported')
  if c.get('use_sliding_window'):
    raise PretrainedError(f'model.init_from: {name} sets use_sliding_window=true; only full '
                          'attention is supported')
  if c.get('hidden_act', 'silu') != 'silu':
    raise PretrainedError(f"model.init_from: {name} sets hidden_act={c['hidden_act']!r}; only "
                          'silu is supported')
  d, heads = c['hidden_size'], c['num_attention_heads']
  # transformers' Qwen3Config defaults to 128 where config.json says nothing
  head_dim = c.get('head_dim') or (128 if arch.name == 'qwen3' else d // heads)
  theta, factors = rope(c, name, head_dim)
  return {'model.d_model': d, 'model.num_layers': c['num_hidden_layers'],
          'model.num_heads': heads,
          'model.num_kv_heads': c.get('num_key_value_heads') or heads,
          'model.mlp_dim': c['intermediate_size'],
          'model.rope_theta': theta, 'model.rope_factors': factors,
          'model.norm_eps': float(c.get('rms_norm_eps', 1e-6)),
          'model.tie_embeddings': bool(c.get('tie_word_embeddings', False)),
          **llama.arch_fields(arch), 'model.head_dim': stored_head_dim(d, heads, head_dim),
          'data.vocab_size': c['vocab_size']}


def read(directory: str) -> Pretrained:
  name = os.path.basename(os.path.normpath(directory))
  config_path = os.path.join(directory, 'config.json')
  if not os.path.exists(config_path):
    raise PretrainedError(f'model.init_from: {directory} has no config.json')
  config = _json(config_path, f'{name}/config.json')
  try:
    fields = fields_from_config(config, name)
  except KeyError as e:
    raise PretrainedError(f'model.init_from: {name}/config.json has no {e.args[0]}') from None
  except PretrainedError:  # a refusal of its own (an architecture, a setting): said as it is
    raise
  except (TypeError, ValueError, ZeroDivisionError, AttributeError, OverflowError) as e:  # a value
    raise PretrainedError(f'model.init_from: {name}/config.json has a field of the wrong kind '
                          f'or value ({type(e).__name__}: {e})') from None
  files, weight_map = weight_files(directory)
  where, shapes = {}, {}
  for path in files:
    if not os.path.exists(path):
      raise PretrainedError(f'model.init_from: {name} lists the shard {os.path.basename(path)}, '
                            'which does not exist')
    try:
      with safe_open(path, framework='flax') as f:
        for key in f.keys():
          s = f.get_slice(key)
          if s.get_dtype() not in DTYPES:
            raise PretrainedError(f"model.init_from: tensor '{key}' of {name} has type "
                                  f"{s.get_dtype()}, which is not supported ({', '.join(DTYPES)})")
          if key in where:  # the copy the index names, as transformers reads it
            owner = weight_map.get(key)
            if owner == os.path.basename(where[key]):
              continue
            if owner != os.path.basename(path):
              raise PretrainedError(
                  f"model.init_from: tensor '{key}' of {name} is in two files, "
                  f'{os.path.basename(where[key])} and {os.path.basename(path)}, and '
                  f'model.safetensors.index.json names neither')
          where[key], shapes[key] = path, tuple(s.get_shape())
    except PretrainedError:
      raise
    except Exception as e:  # safetensors' own error type, for a damaged or truncated file
      raise PretrainedError(f'model.init_from: {os.path.basename(path)} is not a readable '
                            f'safetensors file (truncated or damaged: {e})') from None
  if fields['model.tie_embeddings'] and 'lm_head.weight' in shapes:
    shapes.pop('lm_head.weight')  # some exports store the tied matrix twice
  for key in [k for k in shapes if k.endswith('.self_attn.rotary_emb.inv_freq')]:
    shapes.pop(key)  # a buffer older transformers saved; the angles come from rope_theta
  gguf_file.check_tensors(name, shapes, fields)

  def get(key: str) -> np.ndarray:
    with safe_open(where[key], framework='flax') as f:
      return np.asarray(f.get_tensor(key), np.float32)

  for file in SETUP_FILES:  # a cache's link whose blob is gone: the file's settings would be lost
    if os.path.islink(os.path.join(directory, file)) and not os.path.exists(
        os.path.join(directory, file)):
      raise PretrainedError(f'model.init_from: {name}/{file} is a link to a file that is gone')
  tokenizer, chat_template, bos_id = None, '', config.get('bos_token_id')
  pad_id, unk_id = config.get('pad_token_id'), None
  # config.json and generation_config.json may each give one EOS id or a list (Llama 3.1:
  # <|end_of_text|>, <|eom_id|>, <|eot_id|>); generation stops at any of them.
  listed, generation = [config.get('eos_token_id')], {}
  generation_path = os.path.join(directory, 'generation_config.json')
  if os.path.exists(generation_path):
    generation = _json(generation_path, f'{name}/generation_config.json')
    listed.append(generation.get('eos_token_id'))
    generation = {k: v for k, v in generation.items() if k not in GENERATION_IDS}
  vocab = fields['data.vocab_size']
  token = lambda t: type(t) is int and 0 <= t < vocab
  for file, ids in zip(('config.json', 'generation_config.json'), listed):
    if not all(token(t) for t in (ids if isinstance(ids, list) else [ids]) if t is not None):
      raise PretrainedError(f'model.init_from: {name}/{file}: eos_token_id must be a token id of '
                            f'its {vocab}-token vocabulary or a list of them, got {ids!r}')
  if bos_id is not None and not token(bos_id):
    raise PretrainedError(f'model.init_from: {name}/config.json: bos_token_id must be a token id '
                          f'of its {vocab}-token vocabulary, got {bos_id!r}')
  eos_id = next(iter(stop_tokens(*listed)), None)
  if os.path.exists(os.path.join(directory, 'tokenizer.json')):
    try:
      tokenizer = tokenizers.Tokenizer.from_file(os.path.join(directory, 'tokenizer.json'))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
      raise PretrainedError(f'model.init_from: {name}/tokenizer.json cannot be read ({e})') from None
    if tokenizer.get_vocab_size() > vocab:  # it would hand out ids the embedding lacks
      raise PretrainedError(f'model.init_from: {name}/tokenizer.json has '
                            f'{tokenizer.get_vocab_size()} tokens, more than the vocabulary of '
                            f'{vocab} in its config.json (vocab_size)')
  jinja_path = os.path.join(directory, 'chat_template.jinja')  # first, as transformers reads it
  if os.path.exists(jinja_path):
    try:
      with open(jinja_path, encoding='utf-8') as f:
        chat_template = f.read()
    except UnicodeDecodeError as e:
      raise PretrainedError(f'model.init_from: {name}/chat_template.jinja is not UTF-8 text ({e})'
                            ) from None
    except OSError as e:
      raise PretrainedError(f'model.init_from: {name}/chat_template.jinja cannot be read '
                            f'({e.strerror})') from None
  tok_config_path = os.path.join(directory, 'tokenizer_config.json')
  if os.path.exists(tok_config_path):
    tok_config = _json(tok_config_path, f'{name}/tokenizer_config.json')
    if not chat_template:
      chat_template = _chat_template(tok_config.get('chat_template'), name)
    eos_id = _token_id(tokenizer, tok_config.get('eos_token'), eos_id)
    # transformers' tokenizer (a chat template's bos_token) reads it here, not from config.json
    bos_id = _token_id(tokenizer, tok_config.get('bos_token'), bos_id)
    pad_id = _token_id(tokenizer, tok_config.get('pad_token'), pad_id)
    unk_id = _token_id(tokenizer, tok_config.get('unk_token'), unk_id)
  return Pretrained(path=directory, identity=sha256(files), fields=fields,
                    setup_identity=setup_identity(directory),
                    context_length=config.get('max_position_embeddings'), tokenizer=tokenizer,
                    eos_id=eos_id, bos_id=bos_id, chat_template=chat_template, get=get,
                    stop_ids=stop_tokens(eos_id, *listed), pad_id=pad_id, unk_id=unk_id,
                    generation=generation)


def _token_id(tokenizer, token, default):
  """The id of a tokenizer_config.json special token (its text, or {'content': text}), else
  `default`."""
  token = token.get('content') if isinstance(token, dict) else token
  if tokenizer is not None and isinstance(token, str) and tokenizer.token_to_id(token) is not None:
    return tokenizer.token_to_id(token)
  return default
