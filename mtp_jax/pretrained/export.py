"""Writes a model back out in Hugging Face's layout: the trunk as LlamaForCausalLM, Qwen2ForCausalLM
where q, k and v have biases or Qwen3ForCausalLM where q and k are normalised per head
(config.json, model.safetensors, tokenizer files),
which transformers loads, and the MTP heads beside it in mtp_heads.safetensors (heads_file), which
mtp.init_from reads.
"""

import os

import numpy as np
from safetensors.numpy import save_file

from mtp_jax import atomic
from mtp_jax.pretrained import heads_file, llama
from mtp_jax.pretrained.base import PretrainedError, cast, sha256

DTYPES = {'float32': np.float32, 'float16': np.float16}
HEADS = 'mtp_heads.safetensors'


def hf_config(cfg, eos_id, bos_id, dtype: str, context_length: int | None = None) -> dict:
  """config.json of LlamaForCausalLM (Qwen2ForCausalLM with model.qkv_bias, Qwen3ForCausalLM with
  model.qk_norm) for a ModelConfig, with the heads described under 'mtp'; `context_length`: the
  positions the trunk was made for (default: model.max_seq_len)."""
  arch = llama.architecture_of(cfg.qkv_bias, cfg.qk_norm)
  if arch is None:
    raise PretrainedError('--mode export: no Hugging Face architecture has both q, k and v '
                          'biases (model.qkv_bias) and q and k norms (model.qk_norm)')
  return {
      'architectures': [arch.hf_class], 'model_type': arch.name, **arch.config,
      'hidden_act': 'silu',
      'hidden_size': cfg.d_model, 'intermediate_size': cfg.mlp_dim,
      'num_attention_heads': cfg.num_heads, 'num_hidden_layers': cfg.num_layers,
      'num_key_value_heads': cfg.num_kv_heads, 'head_dim': cfg.head_dim,
      'rms_norm_eps': cfg.norm_eps, 'rope_theta': cfg.rope_theta, 'rope_scaling': None,
      'tie_word_embeddings': cfg.tie_embeddings, 'vocab_size': cfg.vocab_size,
      'max_position_embeddings': context_length or cfg.max_seq_len,
      'bos_token_id': bos_id, 'eos_token_id': eos_id, 'torch_dtype': dtype,
      'mtp': {'kind': cfg.mtp_kind, 'depth': cfg.mtp_depth, 'file': HEADS,
              'feature_layers': list(cfg.feature_layers), 'head_blocks': cfg.head_blocks,
              'head_mlp_dim': cfg.head_mlp_dim}}


def export(directory: str, params: dict, config, cfg, *, tokenizer, eos_id, bos_id,
           chat_template: str, stop_ids=(), dtype: str = 'float32', token_rank=None,
           same_trunk_as: str = '', context_length: int | None = None,
           special: dict | None = None, generation: dict | None = None) -> list[str]:
  """Writes the model (`params` is params['params'], `config` the run's config and `cfg` its
  ModelConfig) to `directory`; returns the files written. The heads file names the trunk written
  beside it (its sha256) and `same_trunk_as`, the identity of the model file the trunk was read
  from when training left it unchanged: the heads load on either. generation_config.json lists
  every token in `stop_ids` (the end of a turn beside EOS), as transformers' generate reads it,
  the padding token and the model file's other settings (`generation`: sampling, penalties);
  tokenizer_config.json names the tokens in `special` ({'pad_token': id, ...}, None: none) too,
  as the model file did (without a pad_token, transformers cannot pad a batch).
  A trunk with rotary factors (model.rope_factors) is not written: only the heads, when the
  trunk is unchanged. The directory is replaced whole (atomic.replacing_folder): a crash leaves
  the previous export or none, never one with some files of each."""
  writes = DTYPES[dtype]
  if cfg.rope_factors:  # Llama 3's scaling: a config.json states only the parameters behind it
    if not same_trunk_as or not cfg.mtp_depth:
      raise PretrainedError('--mode export: the trunk scales its rotary frequencies by factors '
                            "(model.rope_factors, Llama 3's scaling), which a config.json states "
                            'only as the parameters they came from, so only the heads of an '
                            'unchanged trunk are written (they load beside its own file)')
    config_json = None
  else:
    config_json = hf_config(cfg, eos_id, bos_id, dtype, context_length)  # refused before writing
  with atomic.replacing_folder(directory) as tmp:
    heads, written = os.path.join(tmp, HEADS), []
    if config_json is None:
      heads_file.save(heads, params, config, trunk=same_trunk_as, token_rank=token_rank,
                      dtype=writes)
      return [HEADS]
    fields = {'model.num_layers': cfg.num_layers, 'model.tie_embeddings': cfg.tie_embeddings,
              'model.qkv_bias': cfg.qkv_bias, 'model.qk_norm': cfg.qk_norm}
    trunk = cast(llama.trunk_from_params(params, fields), writes)
    weights = os.path.join(tmp, 'model.safetensors')
    save_file(trunk, weights, metadata={'format': 'pt'})
    os.chmod(weights, atomic.new_mode())  # safetensors' own is 0600, unlike the files beside it
    atomic.write_json(os.path.join(tmp, 'config.json'), config_json, indent=2)
    pad_id = (special or {}).get('pad_token')
    atomic.write_json(os.path.join(tmp, 'generation_config.json'),
                      {**(generation or {}), 'bos_token_id': bos_id,
                       'eos_token_id': list(stop_ids) if len(stop_ids) > 1 else eos_id,
                       **({} if pad_id is None else {'pad_token_id': pad_id})}, indent=2)
    written += ['model.safetensors', 'config.json', 'generation_config.json']
    if tokenizer is not None:
      tokenizer.save(os.path.join(tmp, 'tokenizer.json'))
      token = lambda i: tokenizer.id_to_token(i) if i is not None and i >= 0 else None
      named = {k: token(i) for k, i in (special or {}).items() if token(i) is not None}
      atomic.write_json(os.path.join(tmp, 'tokenizer_config.json'),
                        {'tokenizer_class': 'PreTrainedTokenizerFast',
                         'chat_template': chat_template, 'eos_token': token(eos_id),
                         'bos_token': token(bos_id), **named,
                         'model_max_length': context_length or cfg.max_seq_len},
                        indent=2)
      written += ['tokenizer.json', 'tokenizer_config.json']
    if cfg.mtp_depth:
      trunks = [sha256([weights])] + ([same_trunk_as] if same_trunk_as else [])
      heads_file.save(heads, params, config, trunk=','.join(trunks), token_rank=token_rank,
                      dtype=writes)
      written.append(HEADS)
  return written
