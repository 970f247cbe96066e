"""Whether this project reads and writes Hugging Face models as transformers does. For each
architecture it takes (LlamaForCausalLM, Qwen2ForCausalLM), transformers makes a small model with
random weights (norm scales and Qwen2's q, k and v biases random too, where transformers would
start them at 1 and 0) and saves it itself (save_pretrained); this project imports that
directory (model.init_from) and its trunk's logits are compared with transformers' own forward on
the same tokens. Then --mode export's writer saves the import, transformers loads that directory,
and the logits are compared again.

Run (in the peers' environment, see bench_peers.py):
  .venv-peers/bin/python experiments/hf_parity.py
Prints, per architecture and direction, the largest logit difference (float32 on both sides).
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from mtp_jax import cli  # noqa: E402

_TOKENS = flags.DEFINE_integer('tokens', 24, 'Positions of the compared sequence.')

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.2)


def transformers_model(architecture: str):
  """A random model of `architecture` made by transformers, every parameter drawn at random."""
  import torch
  import transformers
  config_class = {'LlamaForCausalLM': transformers.LlamaConfig,
                  'Qwen2ForCausalLM': transformers.Qwen2Config}[architecture]
  torch.manual_seed(0)
  model = getattr(transformers, architecture)(config_class(**SHAPE, rope_theta=100000.0))
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


def main(argv):
  cli.start(argv, persist=False)
  import jax
  import numpy as np
  import transformers
  from mtp_jax.pretrained import export
  tokens = list(np.random.default_rng(0).integers(0, SHAPE['vocab_size'], _TOKENS.value))
  tokens = [int(t) for t in tokens]
  print(f'transformers {transformers.__version__}, {len(tokens)} tokens')
  with tempfile.TemporaryDirectory() as tmp:
    for architecture in ('LlamaForCausalLM', 'Qwen2ForCausalLM'):
      theirs = transformers_model(architecture)
      saved = os.path.join(tmp, architecture)
      theirs.save_pretrained(saved)
      config, cfg, params = our_import(saved)
      want, got = their_logits(theirs, tokens), our_logits(cfg, params, tokens)
      print(f'{architecture}: qkv_bias={cfg.qkv_bias}, read here: largest logit difference '
            f'{np.max(np.abs(got - want)):.2e} (logits up to {np.max(np.abs(want)):.1f})')
      written = os.path.join(tmp, architecture + '_export')
      export.export(written, jax.device_get(params)['params'], config, cfg, tokenizer=None,
                    eos_id=None, bos_id=None, chat_template='')
      back = transformers.AutoModelForCausalLM.from_pretrained(written).eval()
      print(f'{architecture}: written here, read by transformers as {type(back).__name__}: '
            f'largest logit difference {np.max(np.abs(their_logits(back, tokens) - got)):.2e}')


if __name__ == '__main__':
  app.run(main)
