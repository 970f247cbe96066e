"""Whether this project reads and writes models as the libraries that define their formats do.
For each architecture it takes (Llama, also with Llama 3's rotary scaling; Qwen2; Qwen3),
transformers makes a small model with random weights (norm scales and Qwen2's q, k and v biases
random too, where transformers would start them at 1 and 0; Qwen3's heads twice d_model /
num_heads wide) and saves it itself
(save_pretrained); this project imports that directory (model.init_from) and its trunk's logits
are compared with transformers' own forward on the same tokens. Then --mode export's writer saves
the import, transformers loads that directory, and the logits are compared again. Last, the same
weights go into a GGUF file in the layout llama.cpp's converter writes for the architecture (a
Llama's q and k rows interleaved for its rotary pairs, the Qwens' left as they are), and in the
other layout; llama.cpp (llama-cpp-python) and this project each read it, and both sets of
logits are compared with transformers'.

Run (in the peers' environment, see bench_peers.py):
  .venv-peers/bin/python experiments/hf_parity.py
Prints, per architecture and check, the largest logit difference (float32 throughout).
"""

import dataclasses
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from mtp_jax import cli  # noqa: E402

_TOKENS = flags.DEFINE_integer('tokens', 24, 'Positions of the compared sequence.', lower_bound=1)

# Llama 3's scaling, its original context short enough that the compared positions see it:
# of the 8 frequencies of 16-wide heads at base 1e5, 1 kept, 1 blended, 6 divided by 8
LLAMA3 = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
          'original_max_position_embeddings': 64}
SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.2)


def transformers_model(architecture: str, scaled: bool = False):
  """A random model of `architecture` made by transformers, every parameter drawn at random;
  `scaled`: with Llama 3's rotary scaling."""
  import torch
  import transformers
  config_class = {'LlamaForCausalLM': transformers.LlamaConfig,
                  'Qwen2ForCausalLM': transformers.Qwen2Config,
                  'Qwen3ForCausalLM': transformers.Qwen3Config}[architecture]
  extra = {'head_dim': 32} if architecture == 'Qwen3ForCausalLM' else {}
  if scaled:
    extra['rope_parameters'] = {**LLAMA3, 'rope_theta': 100000.0}
  torch.manual_seed(0)
  model = getattr(transformers, architecture)(config_class(**{'rope_theta': 100000.0, **SHAPE,
                                                              **extra}))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'norm' in name:  # transformers starts these at 0 and 1
        p.copy_((1.0 if 'norm' in name else 0.0) + 0.3 * torch.randn_like(p))
  return model.eval()


def their_logits(model, tokens):
  import torch
  with torch.no_grad():
    return model(torch.tensor([tokens])).logits[0].float().numpy()


def our_import(directory: str):
  """(config, ModelConfig, params) of the trunk this project reads from `directory`."""
  import jax
  from configs import base
  from mtp_jax.config import ModelConfig
  from mtp_jax.model import init_params
  from mtp_jax.pretrained import resolve
  config = base.pretrained(directory)
  config.mtp.depth = 0
  config.model.max_seq_len = SHAPE['max_position_embeddings']
  config = resolve.resolve_config(config)
  cfg = ModelConfig.from_config(config)
  params = init_params(cfg, jax.random.key(0))
  return config, cfg, {'params': resolve.merge(params['params'], resolve.trunk_params(directory))}


def our_logits(cfg, params, tokens):
  import jax.numpy as jnp
  import numpy as np
  from mtp_jax.model import MTPLanguageModel
  model = MTPLanguageModel(cfg)
  h, _ = model.apply(params, jnp.asarray([tokens]), jnp.arange(len(tokens))[None],
                     method=model.trunk)
  return np.asarray(model.apply(params, h, method=model.logits))[0]


def write_gguf(path: str, model, arch: str, interleave: bool) -> None:
  """model's weights as an `arch` GGUF file, q and k rows interleaved for rotary pairs or not,
  with a byte-level vocabulary of the model's size (llama.cpp loads no model without one)."""
  import gguf
  import numpy as np
  from tokenizers import pre_tokenizers
  from mtp_jax.pretrained import gguf_file
  c = model.config
  heads = {'q_proj': c.num_attention_heads, 'k_proj': c.num_key_value_heads}
  head_dim = getattr(c, 'head_dim', None) or c.hidden_size // c.num_attention_heads
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_rope_freq_base(float(model.config.rope_parameters['rope_theta']))
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  if c.rope_parameters.get('rope_type') == 'llama3':  # as llama.cpp's converter writes it
    from mtp_jax.pretrained import hf
    w.add_tensor('rope_freqs.weight', np.asarray(
        hf.llama3_factors(c.rope_parameters['rope_theta'], head_dim, c.rope_parameters),
        np.float32))
  symbols = sorted(pre_tokenizers.ByteLevel.alphabet()) + ['Ġt']
  tokens = symbols + [f'<|unused_{i}|>' for i in range(c.vocab_size - len(symbols))]
  w.add_tokenizer_model('gpt2')
  w.add_tokenizer_pre('default')
  w.add_token_list(tokens)
  w.add_token_merges(['Ġ t'])
  w.add_token_types([1] * len(symbols) + [3] * (len(tokens) - len(symbols)))
  for name, tensor in model.state_dict().items():
    t = tensor.float().numpy()
    proj = name.split('.')[-2]
    if interleave and proj in heads and name.endswith('.weight'):  # rotary pairs adjacent
      n = heads[proj]
      t = t.reshape(n, 2, t.shape[0] // n // 2, t.shape[1]).swapaxes(1, 2).reshape(t.shape)
    w.add_tensor(gguf_file.gguf_name(name), np.ascontiguousarray(t))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def llama_cpp_logits(path: str, tokens, float32_cache: bool = True):
  """llama.cpp's logits; its KV cache in float32 (type 0), so that rounding is float32's alone,
  or in its default float16."""
  import numpy as np
  from llama_cpp import Llama
  cache = {'type_k': 0, 'type_v': 0} if float32_cache else {}
  llm = Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False, **cache)
  llm.eval(tokens)
  return np.asarray(llm.scores[:len(tokens)], np.float32)


def main(argv):
  cli.start(argv, persist=False)
  cli.require_peers('torch', 'transformers', 'llama_cpp')
  import jax
  import numpy as np
  import transformers
  from mtp_jax.pretrained import export
  tokens = list(np.random.default_rng(0).integers(0, SHAPE['vocab_size'], _TOKENS.value))
  tokens = [int(t) for t in tokens]
  print(f'transformers {transformers.__version__}, {len(tokens)} tokens')
  with tempfile.TemporaryDirectory() as tmp:
    for architecture, scaled in (('LlamaForCausalLM', False), ('LlamaForCausalLM', True),
                                 ('Qwen2ForCausalLM', False), ('Qwen3ForCausalLM', False)):
      theirs = transformers_model(architecture, scaled)
      saved = os.path.join(tmp, architecture + ('_llama3' if scaled else ''))
      theirs.save_pretrained(saved)
      config, cfg, params = our_import(saved)
      want, got = their_logits(theirs, tokens), our_logits(cfg, params, tokens)
      print(f'{architecture}{" with llama3 rotary scaling" if scaled else ""}: qkv_bias='
            f'{cfg.qkv_bias}, qk_norm={cfg.qk_norm}, head_dim={cfg.head_dim}, read here: '
            f'largest logit difference '
            f'{np.max(np.abs(got - want)):.2e} (logits up to {np.max(np.abs(want)):.1f})')
      if scaled:  # what the scaling changes, read unscaled
        plain = our_logits(dataclasses.replace(cfg, rope_factors=()), params, tokens)
        print(f'  (read without the scaling: {np.max(np.abs(plain - want)):.2e})')
      if not scaled:  # export takes no rotary factors
        written = saved + '_export'
        export.export(written, jax.device_get(params)['params'], config, cfg, tokenizer=None,
                      eos_id=None, bos_id=None, chat_template='')
        back = transformers.AutoModelForCausalLM.from_pretrained(written).eval()
        print(f'{architecture}: written here, read by transformers as {type(back).__name__}: '
              f'largest logit difference {np.max(np.abs(their_logits(back, tokens) - got)):.2e}')
      from mtp_jax.pretrained import llama
      arch = llama.architecture(architecture).name
      path, other = saved + '.gguf', saved + '_other.gguf'
      write_gguf(path, theirs, arch, interleave=arch == 'llama')  # as llama.cpp's converter
      write_gguf(other, theirs, arch, interleave=arch != 'llama')  # the other layout
      _, cfg, params = our_import(path)
      print(f'{arch}.gguf in llama.cpp\'s layout: largest logit difference from transformers\' '
            f'{np.max(np.abs(llama_cpp_logits(path, tokens) - want)):.2e} read by llama.cpp '
            f'({np.max(np.abs(llama_cpp_logits(path, tokens, False) - want)):.2e} with its '
            'default float16 KV cache, '
            f'{np.max(np.abs(llama_cpp_logits(other, tokens) - want)):.2e} in the other '
            f'layout), {np.max(np.abs(our_logits(cfg, params, tokens) - want)):.2e} read here')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser())
