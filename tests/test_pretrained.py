"""Pretrained trunks: a tiny random Llama written by the formats' own libraries (GGUF, float32 and
quantized; safetensors, single and sharded) imports to the logits of an independent NumPy
forward; the tokenizer and chat template come with the model; heads and trunk export and load
back; a frozen trunk stays bit for bit what the file holds."""

import contextlib
import copy
import functools
import glob
import json
import os
import re
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
import pytest

from conftest import (CHAT, LLAMA, QWEN2, QWEN3, another_run_holding, assert_bitwise_equal,
                      assert_user_error, gguf_rounded, numpy_llama_logits, pretrained_config, random_llama,
                      run_script, stdlib_corpus, tiny_config, write_gguf, write_hf)
from mtp_jax import sharding, train
from mtp_jax.checkpoint import CheckpointError
from mtp_jax.config import ConfigError, ModelConfig, apply_overrides, validate
from mtp_jax.model import MTPLanguageModel, init_params
from mtp_jax.pretrained import gguf_file, heads_file, llama
from mtp_jax.pretrained import resolve as pretrained
from mtp_jax.pretrained.base import PretrainedError

TOKENS = [5, 71, 200, 3, 99, 142, 17, 256, 8, 250, 33, 64]


def our_logits(source, tokens=TOKENS):
  """The trunk's logits after importing `source` into this project's model."""
  config = pretrained.resolve_config(pretrained_config(source, **{'mtp.depth': 0}))
  cfg = ModelConfig.from_config(config)
  params = init_params(cfg, jax.random.key(0))
  params = {'params': pretrained.merge(params['params'], pretrained.trunk_params(source))}
  model = MTPLanguageModel(cfg)
  positions = jnp.arange(len(tokens))[None]
  h, _ = model.apply(params, jnp.asarray([tokens]), positions, method=model.trunk)
  return np.asarray(model.apply(params, h, method=model.logits))[0]


FIELDS = {'llama': LLAMA, 'qwen2': QWEN2, 'qwen3': QWEN3}


@pytest.mark.parametrize('qtype,arch', [(None, 'llama'), ('Q8_0', 'llama'), (None, 'qwen2'),
                                        ('Q8_0', 'qwen2'), (None, 'qwen3'), ('Q8_0', 'qwen3')])
def test_gguf_import_matches_numpy_forward(tmp_path, qtype, arch):
  """Every architecture: Qwen2 is a Llama with biases on q, k and v, Qwen3 one with q and k
  normalised per head and heads wider than d_model / num_heads; llama.cpp's converter leaves
  their q and k rows in Hugging Face's order."""
  import gguf
  fields = FIELDS[arch]
  tensors = random_llama(fields)
  q = getattr(gguf.GGMLQuantizationType, qtype) if qtype else None
  path = write_gguf(tmp_path / 'tiny.gguf', tensors, fields, qtype=q, arch=arch)
  if q is not None:  # the reference reads the same rounded weights llama.cpp would
    tensors = {n: gguf.quants.dequantize(gguf.quants.quantize(t, q), q).reshape(t.shape)
               if t.ndim == 2 else t for n, t in tensors.items()}
  np.testing.assert_allclose(our_logits(path), numpy_llama_logits(tensors, TOKENS, fields),
                             atol=1e-4, rtol=1e-4)
  model = pretrained.resolve_config(pretrained_config(path)).model
  assert (model.qkv_bias, model.qk_norm, model.head_dim) == (
      arch == 'qwen2', arch == 'qwen3', 16 if arch == 'qwen3' else 0)


def test_a_gguf_file_rewritten_in_another_type_holds_that_types_rounding(tmp_path):
  """gguf_file.rewritten: the file's matrices quantized again to the type by gguf's quantizer
  (the norms kept in float32), the metadata kept, written once beside the file; a type it
  cannot write is one clear error."""
  import gguf
  tensors = random_llama()
  source = write_gguf(tmp_path / 'tiny.gguf', tensors, qtype=gguf.GGMLQuantizationType.Q8_0)
  path = gguf_file.rewritten(source, gguf.GGMLQuantizationType.Q4_0)
  assert path == str(tmp_path / 'tiny.Q4_0.gguf')
  types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
  assert types['blk.0.ffn_down.weight'] == gguf.GGMLQuantizationType.Q4_0
  assert types['blk.0.attn_norm.weight'] == gguf.GGMLQuantizationType.F32
  rounded = {n: gguf_rounded(gguf_rounded(t, gguf.GGMLQuantizationType.Q8_0),
                             gguf.GGMLQuantizationType.Q4_0) if t.ndim == 2 else t
             for n, t in tensors.items()}
  np.testing.assert_allclose(our_logits(path), numpy_llama_logits(
      {n: np.asarray(t) for n, t in rounded.items()}, TOKENS), atol=1e-4, rtol=1e-4)
  assert gguf_file.rewritten(source, gguf.GGMLQuantizationType.Q4_0) == path  # not again
  with pytest.raises(PretrainedError, match='cannot rewrite a GGUF file as Q6_K'):
    gguf_file.rewritten(source, gguf.GGMLQuantizationType.Q6_K)
  # experiments/gguf_forms.py, which times such files, refuses what it cannot run at once
  for args, words in ((['--types', 'Q4_1,Q6_K'], ['--types', 'Q6_K']),
                      (['--types', 'Q4_1,Q4_1'], ['distinct']),
                      (['--draft_len', '0'], ['--draft_len']),
                      (['--config.model.init_from', str(path)], ['model.init_from', 'smollm2'])):
    assert_user_error(run_script('experiments/gguf_forms.py', *args, timeout=60), *words)


@pytest.mark.parametrize('qtype,arch', [('Q4_0', 'llama'), ('Q4_1', 'llama'), ('Q4_1', 'qwen2'),
                                        ('Q4_1', 'qwen3')])
def test_a_quantized_trunk_decodes_from_scaled_tiles(tmp_path, qtype, arch):
  """A Q4_0 or Q4_1 file's block matrices are scaled tiles where they run (both
  as integers 0 to 15 two to a byte with offsets), and the trunk's logits through them (and
  through the kernels' stacked q, k and v, Qwen2's biases stacked alike) are the float32 ones
  to rounding."""
  import gguf
  from mtp_jax import decode as dec
  from mtp_jax import kernels
  fields = FIELDS[arch]
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama(fields), fields, arch=arch,
                    qtype=getattr(gguf.GGMLQuantizationType, qtype))
  config = pretrained.resolve_config(pretrained_config(path, **{'mtp.depth': 0}))
  cfg = ModelConfig.from_config(config)
  params = {'params': pretrained.merge(init_params(cfg, jax.random.key(0))['params'],
                                       pretrained.trunk_params(path))}
  tiled = dec.decode_model(cfg, True)
  # q, k and v as one matrix, o, gate and up as one, down; the 264-token embedding is no whole
  # number of tiles
  assert tiled.tiled_matrices(params) == (4 * cfg.num_layers if tiled.tiles else 0)
  if tiled.tiles:
    blocks = tiled.prepare(params)['params']['blocks_0']
    assert isinstance(blocks['mlp']['down'], kernels.ScaledTiles)
    assert blocks['mlp']['down'].q.dtype == jnp.uint8 and blocks['mlp']['down'].affine
  tokens, positions = jnp.asarray([TOKENS]), jnp.arange(len(TOKENS))[None]
  logits = []
  for model in (tiled, dec.decode_model(cfg, False)):
    cache = model.init_cache(1, len(TOKENS))['trunk']
    logits.append(np.asarray(model.trunk(model.prepare(params), tokens, positions, cache)[0]))
  np.testing.assert_allclose(logits[0], logits[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('shards,transformers5,arch', [
    (1, False, 'Llama'), (3, False, 'Llama'), (1, True, 'Llama'), (2, False, 'Qwen2'),
    (1, False, 'Qwen3')])
def test_safetensors_import_matches_numpy_forward(tmp_path, shards, transformers5, arch):
  fields = {**FIELDS[arch.lower()], 'model.tie_embeddings': False}
  extra, files = {}, {}
  if transformers5:
    # Where transformers 5 keeps the rotary base (a base other than the 10000 a reader falls back
    # to), a head_dim of null, and the rotary buffers transformers before 4.31 saved.
    fields['model.rope_theta'] = 500000.0
    extra = {'head_dim': None}
    files = {f'model.layers.{i}.self_attn.rotary_emb.inv_freq': np.ones(4, np.float32)
             for i in range(LLAMA['model.num_layers'])}
  tensors = random_llama(fields, seed=1)
  directory = write_hf(tmp_path / 'hf', {**tensors, **files}, fields, shards=shards,
                       transformers5=transformers5, config_extra=extra,
                       architecture=f'{arch}ForCausalLM')
  np.testing.assert_allclose(our_logits(directory), numpy_llama_logits(tensors, TOKENS, fields),
                             atol=1e-4, rtol=1e-4)


# per architecture: a tensor of a block only it has, and where that lies in our params
OWN_TENSORS = {'qwen2': ('model.layers.1.self_attn.k_proj.bias', ('attn', 'v_bias')),
               'qwen3': ('model.layers.1.self_attn.k_norm.weight', ('attn', 'q_norm', 'scale'))}


@pytest.mark.parametrize('arch', ['qwen2', 'qwen3'])
def test_a_qwen_model_decodes_exactly_and_exports_as_itself(tmp_path, capsys, arch):
  """Qwen2 and Qwen3 from end to end: heads copied from the last block (its biases, or its q and
  k norms and wide heads, too) draft, and greedy `mtp`, through the decoding kernels' stacked q,
  k, v (Qwen2's biases stacked alike), is `ar` token for token; --mode export writes a
  Qwen2ForCausalLM or Qwen3ForCausalLM directory that imports back to the same tensors, with a
  heads file, those tensors included, that loads beside it."""
  from mtp_jax import run
  fields = FIELDS[arch]
  # seeds whose heads have some drafts accepted (an iteration that accepts exercises more)
  seed = {'qwen2': 3, 'qwen3': 1}[arch]
  path = write_gguf(tmp_path / 'qwen.gguf', random_llama(fields, seed=seed), fields, arch=arch)
  workdir = str(tmp_path / 'run')
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('the tin\nan apple\n')
  outputs = {}
  for method in ('ar', 'mtp'):
    config = pretrained_config(path, **{'mtp.init_from': 'last_block', 'decode.method': method,
                                        'decode.max_new_tokens': 16})
    result = run.run('generate', config, workdir, prompt_file=str(prompts))
    outputs[method] = result['outputs']
    assert result['tau'] > 1 or method == 'ar'
  assert outputs['mtp'] == outputs['ar'] and all(len(o) > 4 for o in outputs['ar'])
  # What mtp = ar cannot show (both read the same biases): through the kernels, with q, k, v
  # and their biases stacked, and with drafts in int8 (biases kept in float32), the trunk's and
  # a head's outputs are the plain forward's to rounding.
  from mtp_jax import decode as dec
  from mtp_jax import kernels
  assert kernels.usable()  # CI's machine builds them (test_kernels)
  config = pretrained.resolve_config(config)
  cfg = ModelConfig.from_config(config)
  trunk = pretrained.trunk_params(path)
  params = {'params': pretrained.merge(init_params(cfg, jax.random.key(0))['params'],
                                       {**trunk, **pretrained.head_params(config, trunk)})}
  T = len(TOKENS)
  tokens, positions = jnp.asarray([TOKENS]), jnp.arange(T)[None]
  got = []
  for model in (dec.decode_model(cfg, False), dec.decode_model(cfg, True),
                dec.decode_model(cfg, True, draft_dtype='int8')):
    prepared, cache = model.prepare(params), model.init_cache(1, T)
    logits, h, _ = model.trunk(prepared, tokens, positions, cache['trunk'])
    h1, _ = model.head(prepared, 1, h, tokens, positions, cache['heads'][0])
    got.append((np.asarray(logits), np.asarray(model.head_logits(prepared, 1, h1))))
  for trunk_logits, head_logits in got[1:]:
    np.testing.assert_allclose(trunk_logits, got[0][0], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got[1][1], got[0][1], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got[2][1], got[0][1], atol=0.05 * np.abs(got[0][1]).max())
  summary = run.run('export', config, workdir)
  export = os.path.join(workdir, 'export')
  assert json.load(open(os.path.join(export, 'config.json')))['architectures'] == [
      f'Qwen{arch[-1]}ForCausalLM']
  back, original = pretrained.open_model(export), pretrained.open_model(path)
  assert back.fields == original.fields
  own, ours = OWN_TENSORS[arch]
  assert own in llama.trunk_shapes(original.fields)
  for name in llama.trunk_shapes(original.fields):  # every tensor of the trunk
    np.testing.assert_array_equal(back.get(name), original.get(name), err_msg=name)
  heads = os.path.join(export, 'mtp_heads.safetensors')
  assert 'mtp_heads.safetensors' in summary['files']
  config = pretrained.resolve_config(pretrained_config(export, **{'mtp.init_from': heads}))
  pretrained.check_heads_init(config)
  loaded = pretrained.head_params(config, pretrained.trunk_params(export))
  held = lambda tree: functools.reduce(lambda t, key: t[key], ours, tree)
  np.testing.assert_array_equal(held(loaded['mtp_0']['block']),
                                held(pretrained.trunk_params(path)['blocks_1']))


def test_export_refuses_a_trunk_no_hugging_face_class_holds(tmp_path):
  """q, k and v biases with q and k norms: a model this project trains, which no transformers
  class describes; rotary factors, which a config.json gives only as the parameters they came
  from: export says so before writing anything, but writes the heads of an unchanged trunk with
  factors (they load beside its own file)."""
  from mtp_jax.pretrained import export
  for overrides, words in (({'model.qkv_bias': True, 'model.qk_norm': True},
                            'no Hugging Face architecture has both'),
                           ({'model.rope_factors': (1.0, 2.0, 4.0, 8.0)},
                            'scales its rotary frequencies by factors')):
    cfg = ModelConfig.from_config(tiny_config(**overrides))
    with pytest.raises(PretrainedError, match=words):
      export.export(str(tmp_path / 'out'), init_params(cfg, jax.random.key(0))['params'], None,
                    cfg, tokenizer=None, eos_id=None, bos_id=None, chat_template='')
    assert not os.path.exists(tmp_path / 'out')
  # Llama 3's scaling with the trunk unchanged: the heads alone, loading beside the trunk's file
  config = tiny_config(**{'model.rope_factors': (1.0, 2.0, 4.0, 8.0)})
  cfg = ModelConfig.from_config(config)
  written = export.export(str(tmp_path / 'out'), init_params(cfg, jax.random.key(0))['params'],
                          config, cfg, tokenizer=None, eos_id=None, bos_id=None, chat_template='',
                          same_trunk_as='0' * 64)
  assert written == ['mtp_heads.safetensors'] == os.listdir(tmp_path / 'out')
  meta, _, _ = heads_file._read_meta(str(tmp_path / 'out' / written[0]))
  assert meta['trunk'] == '0' * 64
  # a weight past float16's range, in the trunk or a head: refused, the earlier export kept
  config = tiny_config()
  cfg = ModelConfig.from_config(config)
  params = jax.tree.map(np.array, init_params(cfg, jax.random.key(0))['params'])
  for tree, name in ((params['blocks_1']['mlp']['down'], 'model.layers.1.mlp.down_proj.weight'),
                     (params['mtp_0']['block']['mlp']['down'], 'mtp.0.block.mlp.down_proj.weight')):
    tree[0, 0] = 1e5
    with pytest.raises(PretrainedError, match=f'{re.escape(name)} holds 100000, which float16 '
                                              'cannot hold'):
      export.export(str(tmp_path / 'out'), params, config, cfg, tokenizer=None, eos_id=None,
                    bos_id=None, chat_template='', dtype='float16')
    assert os.listdir(tmp_path / 'out') == written
    tree[0, 0] = 0


# Llama 3's scaling for 8-wide heads at base 1e4 (frequencies 1, 0.1, 0.01, 0.001: wavelengths
# 2 pi / frequency, 6.28, 62.8, 628, 6283) and an original context of 64: under 64 /
# high_freq_factor = 16 kept, past 64 / low_freq_factor = 64 divided by 8, between them by
# 1 / ((1 - s) / 8 + s), s = (64 / 62.83 - 1) / 3.
LLAMA3 = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
          'original_max_position_embeddings': 64}
_S = (64 / (2 * np.pi / 0.1) - 1) / 3
LLAMA3_FACTORS = (1.0, 1 / ((1 - _S) / 8 + _S), 8.0, 8.0)


@pytest.mark.parametrize('source', ['gguf', 'hf', 'hf5'])
def test_llama3_rotary_scaling_matches_numpy_forward(tmp_path, source):
  """Llama 3's scaled rotary frequencies: from a Hugging Face config's parameters (as
  transformers 4 and 5 write them), or from the factors a GGUF file holds (rope_freqs.weight, as
  llama.cpp's converter writes them); the scaled forward is not the unscaled one."""
  from mtp_jax.pretrained import hf
  np.testing.assert_allclose(hf.llama3_factors(10000.0, 8, LLAMA3), LLAMA3_FACTORS, rtol=1e-12)
  fields = {**LLAMA, 'model.rope_factors': LLAMA3_FACTORS}
  tensors = random_llama(fields)
  if source == 'gguf':
    path = write_gguf(tmp_path / 'l3.gguf', tensors, fields)
  else:
    path = write_hf(tmp_path / 'l3', tensors, fields, transformers5=source == 'hf5',
                    config_extra={'rope_scaling' if source == 'hf' else 'rope_parameters': {
                        **LLAMA3, 'rope_theta': 10000.0}})
  np.testing.assert_allclose(pretrained.resolve_config(pretrained_config(path)).model.rope_factors,
                             LLAMA3_FACTORS, rtol=1e-6)  # the GGUF file's float32
  got = our_logits(path)
  np.testing.assert_allclose(got, numpy_llama_logits(tensors, TOKENS, fields), atol=1e-4,
                             rtol=1e-4)
  assert not np.allclose(got, numpy_llama_logits(tensors, TOKENS), atol=1e-2)
  with pytest.raises(ConfigError, match='model.rope_factors must be empty or 4 numbers > 0'):
    validate(tiny_config(**{'model.d_model': 32, 'model.num_heads': 4,
                            'model.rope_factors': (1.0, 2.0)}))


def test_model_fields_and_tokenizer_come_from_the_file(tmp_path):
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  config = pretrained.resolve_config(pretrained_config(path))
  for field, value in LLAMA.items():
    section, key = field.split('.')
    assert config[section][key] == pytest.approx(value), field
  model = pretrained.open_model(path)
  ids = model.tokenizer.encode('<|im_start|>user\nthe tin<|im_end|>', add_special_tokens=False).ids
  assert ids[0] == 262 and ids[-1] == model.eos_id == 263  # special tokens are single ids
  assert model.tokenizer.decode(ids, skip_special_tokens=False) == '<|im_start|>user\nthe tin<|im_end|>'
  # 'the' is one merged token: the BPE merges came from the metadata
  assert 'Ġthe' in [model.tokenizer.id_to_token(i) for i in model.tokenizer.encode(' the').ids]


def test_a_config_field_that_contradicts_the_file_is_refused(tmp_path):
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  config = pretrained_config(path, **{'model.d_model': 64})
  with pytest.raises(PretrainedError, match=r'model\.d_model=64 contradicts tiny\.gguf, which has 32'):
    pretrained.resolve_config(config)
  # Agreeing with the file is fine, a head width of d_model / num_heads (the file's 0) too, and
  # validate writes it as the file does, so heads files and checkpoints name one model.
  pretrained.resolve_config(pretrained_config(path, **{'model.num_layers': 2}))
  config = pretrained.resolve_config(pretrained_config(path, **{'model.head_dim': 8}))
  validate(config)
  assert config.model.head_dim == 0
  with pytest.raises(PretrainedError,
                     match=r'model\.head_dim=16 contradicts tiny\.gguf, which has 0'):
    pretrained.resolve_config(pretrained_config(path, **{'model.head_dim': 16}))


@pytest.mark.parametrize('break_it,message', [
    (dict(arch='gemma'), "architecture 'gemma'; only 'llama', 'qwen2', 'qwen3' are supported"),
    (dict(arch='qwen3'), "has no tensor 'blk.0.attn_q_norm.weight'"),  # Qwen3 has q and k norms
    (dict(arch='qwen2'), "has no tensor 'blk.0.attn_q.bias'"),  # Qwen2 has biases
    (dict(drop=('model.layers.1.mlp.up_proj.weight',)), "no tensor 'blk.1.ffn_up.weight'"),
    (dict(reshape={'model.layers.0.self_attn.v_proj.weight': (32, 16)}),
     "tensor 'blk.0.attn_v.weight' of tiny.gguf has shape (32, 16), expected (16, 32)"),
    (dict(extra={'blk.0.attn_q.bias': np.zeros(32, np.float32)}), "tensor 'blk.0.attn_q.bias'"),
    # llama.cpp scales the rotary frequencies by a factor given without a type, or by the key
    # older files use
    (dict(floats={'llama.rope.scaling.factor': 4.0}), 'uses RoPE scaling (linear, factor 4.0)'),
    (dict(floats={'llama.rope.scale_linear': 2.0}), 'uses RoPE scaling (linear, factor 2.0)'),
    # llama.cpp refuses both: no default for the norms' epsilon, and token ids past the embedding
    (dict(drop=('llama.attention.layer_norm_rms_epsilon',)),
     'has no llama.attention.layer_norm_rms_epsilon in its metadata'),
    (dict(floats={'llama.vocab_size': 200.0}),
     'tokens in tokenizer.ggml.tokens, more than its vocabulary of 200 (llama.vocab_size)'),
    (dict(drop=('llama.attention.head_count',), floats={'llama.attention.head_count': 0.0}),
     'has llama.attention.head_count=0'),
    # a tokenizer's metadata that would fail later (an index error, generation that never
    # stops) or read as another tokenizer (no special tokens)
    (dict(eos=999), 'tokenizer.ggml.eos_token_id=999 is not a token id of its 264-token vocab'),
    (dict(eot=264), 'tokenizer.ggml.eot_token_id=264 is not a token id'),
    (dict(chat=5), 'tokenizer.chat_template is not text (int)'),
    (dict(types=[1] * 10), 'has 10 token types for 264 tokens (tokenizer.ggml.token_type)'),
    (dict(merges=['Ġ t', 'zz']), "a merge that is not two tokens apart by a space: 'zz'"),
    (dict(merges=['Ġ t', 'q zz']), "a merge, 'q zz', whose tokens or their join are not in its"),
    (dict(texts={'llama.rope.dimension_count': 'eight'}),
     "llama.rope.dimension_count='eight' is not an integer"),
    (dict(texts={'llama.rope.freq_base': 'high'}), "llama.rope.freq_base='high' is not a number"),
    # a vocabulary wider than the tokens listed: an id past them names no token
    (dict(fields={'data.vocab_size': 300}, floats={'llama.vocab_size': 300.0}, eos=290),
     'tokenizer.ggml.eos_token_id=290 is not a token id of its 264-token vocab'),
])
def test_broken_gguf_files_are_one_clear_error(tmp_path, break_it, message):
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama(break_it.get('fields')), **break_it)
  with pytest.raises(PretrainedError, match=None) as e:
    gguf_file.read(path)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_an_unsupported_tensor_type_and_a_truncated_file_are_refused(tmp_path):
  tensors = random_llama()
  tensors['model.norm.weight'] = tensors['model.norm.weight'].astype(np.float64)
  path = write_gguf(tmp_path / 'f64.gguf', tensors)
  with pytest.raises(PretrainedError, match="tensor 'output_norm.weight' of f64.gguf has type F64"):
    gguf_file.read(path)
  # Llama 3's frequency divisors too, which were read apart from the other tensors
  path = write_gguf(tmp_path / 'f64.gguf', random_llama(),
                    extra={'rope_freqs.weight': np.ones(4)})  # float64
  with pytest.raises(PretrainedError, match="tensor 'rope_freqs.weight' of f64.gguf has type F64"):
    gguf_file.read(path)
  good = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  data = open(good, 'rb').read()
  for cut in (len(data) - 1, len(data) - 1000, 2000):  # in the last tensor, an earlier, the header
    with open(tmp_path / 'cut.gguf', 'wb') as f:
      f.write(data[:cut])
    with pytest.raises(PretrainedError, match='^model.init_from: cut.gguf is not a readable GGUF '
                                              r'file \(truncated or damaged: '):
      gguf_file.read(str(tmp_path / 'cut.gguf'))


def test_a_damaged_gguf_header_is_one_line_not_a_hang(tmp_path):
  """gguf's reader takes a read past the end as an empty one (a count of 2**40 tokens looped,
  its memory growing, until the machine had none) and a tensor's offset as it is (one that wraps
  round read the header as weights); text it decodes only when asked. Each is one line."""
  good = open(write_gguf(tmp_path / 'tiny.gguf', random_llama()), 'rb').read()

  def damaged(after: bytes, fmt: str, value, skip: int = 0) -> str:
    data = bytearray(good)
    struct.pack_into(fmt, data, data.index(after) + len(after) + skip, value)
    path = tmp_path / 'damaged' / after.decode()
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(bytes(data))
    return str(path)

  cases = [  # (the damage, the end of its line)
      # the count after token_type's value type and item type
      (damaged(b'tokenizer.ggml.token_type', '<Q', 2**40, skip=8),
       'tokenizer.ggml.token_type is an array of 1099511627776 items, past the end of the file'),
      # the first tensor's offset (after its dimension count and two dimensions, and its type)
      (damaged(b'token_embd.weight', '<Q', 2**64 - 32, skip=4 + 16 + 4),
       "tensor 'token_embd.weight' has offset 18446744073709551584, expected 0"),
      (damaged(b'tokenizer.ggml.model', 'B', 0xFF, skip=4 + 8),  # its value's first byte
       'tokenizer.ggml.model is not UTF-8 text')]
  for path, words in cases:
    with pytest.raises(PretrainedError, match=re.escape(
        f'model.init_from: {os.path.basename(path)} is not a readable GGUF file (truncated or '
        f'damaged: {words}')):
      gguf_file.read(path)
  # a block count the tensors do not hold is said before every block's shapes are listed
  with pytest.raises(PretrainedError, match=re.escape(
      "has no tensor 'blk.2.attn_q.weight' (its fields give 10000000 blocks)")):
    gguf_file.read(write_gguf(tmp_path / 'deep.gguf', random_llama(),
                              fields={'model.num_layers': 10**7}))
  # metadata of another kind than the tokenizer's lists
  with pytest.raises(PretrainedError, match='tokenizer.ggml.merges is not a list of texts'):
    gguf_file.read(write_gguf(tmp_path / 'merges.gguf', random_llama(), merges=[1, 2]))


def test_a_model_without_its_tokenizer_says_what_it_needs(tmp_path):
  """A Hugging Face directory without tokenizer.json (a tokenizer.model alone, say): the line
  names the file and how to write it; data.tokenizer is not a way round it."""
  directory = write_hf(tmp_path / 'm', random_llama())
  os.remove(os.path.join(directory, 'tokenizer.json'))
  with pytest.raises(train.data_lib.DataError, match=r'^model.init_from: \S+ has no tokenizer.json \(transformers '
                                      r'writes one beside the weights: AutoTokenizer'):
    train.Session(pretrained.resolve_config(pretrained_config(directory)), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_an_hf_directory_names_its_padding_and_unknown_tokens(tmp_path):
  """tokenizer_config.json's pad_token, unk_token and bos_token (text, or {'content': text}),
  which an export passes on; config.json's ids where tokenizer_config.json names none (a
  config.json's bos_token_id can name another token than the tokenizer's bos_token, as
  DeepSeek-R1's distills do: a chat template's bos_token is the tokenizer's)."""
  directory = write_hf(tmp_path / 'm', random_llama(),
                       config_extra={'pad_token_id': 5, 'bos_token_id': 262})
  assert (pretrained.open_model(directory).pad_id, pretrained.open_model(directory).unk_id,
          pretrained.open_model(directory).bos_id) == (5, None, 262)
  path = os.path.join(directory, 'tokenizer_config.json')
  with open(path) as f:
    tok_config = json.load(f)
  tok_config.update(pad_token='<|im_end|>', unk_token={'content': '<|endoftext|>'},
                    bos_token='<|endoftext|>')
  with open(path, 'w') as f:
    json.dump(tok_config, f)
  model = pretrained.open_model(directory)
  assert (model.pad_id, model.unk_id, model.bos_id) == (263, 261, 261)


def test_an_export_keeps_the_model_directorys_generation_settings(tmp_path):
  """generation_config.json's sampling settings go with an export of a Hugging Face directory,
  and its padding token, so transformers' generate on the export does what it did on the
  source; the token ids are the export's."""
  from mtp_jax import run
  directory = write_hf(tmp_path / 'm', random_llama(), config_extra={'pad_token_id': 5})
  settings = {'do_sample': True, 'temperature': 0.7, 'top_p': 0.8, 'repetition_penalty': 1.05}
  with open(os.path.join(directory, 'generation_config.json'), 'w') as f:
    json.dump({**settings, 'eos_token_id': 263, 'transformers_version': '4.0'}, f)
  run.run('export', pretrained_config(directory, **{'mtp.init_from': 'last_block'}),
          str(tmp_path / 'run'))
  with open(tmp_path / 'run' / 'export' / 'generation_config.json') as f:
    written = json.load(f)
  assert written == {**settings, 'bos_token_id': pretrained.open_model(directory).bos_id,
                     'eos_token_id': 263, 'pad_token_id': 5}


def test_hf_directory_errors(tmp_path):
  tensors = random_llama()
  # the refusals of config.json's settings are said as they are (they were wrapped in "a field of
  # the wrong kind or value")
  with pytest.raises(PretrainedError, match=r'^model.init_from: \S+ is a GPT2LMHeadModel; only '
                                            'LlamaForCausalLM, Qwen2ForCausalLM, '
                                            'Qwen3ForCausalLM are supported$'):
    pretrained.open_model(write_hf(tmp_path / 'a', tensors, architecture='GPT2LMHeadModel'))
  # transformers' Qwen3Config takes heads 128 wide where config.json does not say
  wide = {**QWEN3, 'model.head_dim': 128}
  no_width = write_hf(tmp_path / 'q3', random_llama(wide), wide, architecture='Qwen3ForCausalLM',
                      config_extra={'head_dim': None})
  assert pretrained.open_model(no_width).fields['model.head_dim'] == 128
  with pytest.raises(PretrainedError, match=r'^model.init_from: \S+ sets use_sliding_window=true; '
                                            'only full attention is supported$'):
    pretrained.open_model(write_hf(tmp_path / 'q', random_llama(QWEN2), QWEN2,
                                   architecture='Qwen2ForCausalLM',
                                   config_extra={'use_sliding_window': True}))
  for key, value in (('eos_token_id', 999), ('bos_token_id', -1)):
    with pytest.raises(PretrainedError, match=f'config.json: {key} must be a token id of its '
                                              f'264-token vocabulary'):
      pretrained.open_model(write_hf(tmp_path / key, tensors, config_extra={key: value}))
  for key, value in (('num_hidden_layers', 2.0), ('num_attention_heads', 0)):
    with pytest.raises(PretrainedError, match=f'config.json: {key} must be a positive integer, '
                                              f'got {value}$'):
      pretrained.open_model(write_hf(tmp_path / key, tensors, config_extra={key: value}))
  with pytest.raises(PretrainedError, match="has no tensor 'model.layers.0.self_attn.q_proj.bias'"):
    pretrained.open_model(write_hf(tmp_path / 'nb', tensors, architecture='Qwen2ForCausalLM'))
  directory = write_hf(tmp_path / 'b', tensors, shards=2)
  os.remove(os.path.join(directory, 'model-00002-of-00002.safetensors'))
  with pytest.raises(PretrainedError, match='shard model-00002-of-00002.safetensors'):
    pretrained.open_model(directory)
  directory = write_hf(tmp_path / 'c', tensors)
  path = os.path.join(directory, 'model.safetensors')
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:-100])
  with pytest.raises(PretrainedError, match='model.safetensors is not a readable'):
    pretrained.open_model(directory)
  # Scalings other than Llama 3's are refused, in transformers 4's and 5's forms; so is Llama 3's
  # without its parameters, or given twice, differently.
  scaled = {'rope_scaling': {'type': 'linear', 'factor': 2.0}}
  with pytest.raises(PretrainedError, match="sets rope_scaling of type 'linear'"):
    pretrained.open_model(write_hf(tmp_path / 'd', tensors, config_extra=scaled))
  scaled = {'rope_parameters': {'rope_theta': 5e5, 'rope_type': 'yarn', 'factor': 8.0}}
  with pytest.raises(PretrainedError, match="sets rope_parameters of type 'yarn'"):
    pretrained.open_model(write_hf(tmp_path / 'e', tensors, config_extra=scaled))
  scaled = {'rope_parameters': {'rope_theta': 5e5, 'rope_type': 'llama3', 'factor': 8.0}}
  with pytest.raises(PretrainedError, match="llama3 rotary scaling has no low_freq_factor"):
    pretrained.open_model(write_hf(tmp_path / 'e2', tensors, config_extra=scaled))
  scaled = {'rope_scaling': LLAMA3, 'rope_parameters': {**LLAMA3, 'factor': 32.0}}
  with pytest.raises(PretrainedError, match="rope_scaling and rope_parameters to different"):
    pretrained.open_model(write_hf(tmp_path / 'e3', tensors, config_extra=scaled))
  directory = write_hf(tmp_path / 'f', tensors, shards=2)
  with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
    f.write('{"metadata": {}}')
  with pytest.raises(PretrainedError, match='index.json has no weight_map'):
    pretrained.open_model(directory)
  # model.safetensors beside an index and its shards (re-saved unsharded over an old copy) is read,
  # as transformers reads a local directory
  sharded = write_hf(tmp_path / 'i', tensors, shards=2)
  single = write_hf(tmp_path / 'j', random_llama(seed=1))
  shutil.copy(os.path.join(single, 'model.safetensors'), sharded)
  jax.tree.map(np.testing.assert_array_equal, pretrained.trunk_params(sharded),
               pretrained.trunk_params(single))
  # JSON of another shape than transformers writes: one line each, not a traceback
  for name, extra, words in [('h2', {'hidden_size': None}, 'TypeError'),
                             ('h3', {'rope_scaling': 'linear'}, 'AttributeError')]:
    with pytest.raises(PretrainedError, match=f'{name}/config.json has a field of the wrong kind '
                                              f'or value \\({words}'):
      pretrained.open_model(write_hf(tmp_path / name, tensors, config_extra=extra))
  directory = write_hf(tmp_path / 'h4', tensors)
  with open(os.path.join(directory, 'generation_config.json'), 'w') as f:
    f.write('[2]')
  with pytest.raises(PretrainedError, match='generation_config.json holds a JSON list, not an '):
    pretrained.open_model(directory)
  directory = write_hf(tmp_path / 'g', tensors)
  with open(os.path.join(directory, 'tokenizer.json'), 'r+') as f:
    f.truncate(100)
  with pytest.raises(PretrainedError, match='g/tokenizer.json cannot be read'):
    pretrained.open_model(directory)
  for name, extra, words in [('k1', {'eos_token_id': 'x'}, 'eos_token_id must be a token id'),
                             ('k2', {'max_position_embeddings': '256'},
                              "max_position_embeddings must be a positive integer, got '256'")]:
    with pytest.raises(PretrainedError, match=f'{name}/config.json: {words}'):
      pretrained.open_model(write_hf(tmp_path / name, tensors, config_extra=extra))
  directory = write_hf(tmp_path / 'k3', tensors)
  with open(os.path.join(directory, 'generation_config.json'), 'w') as f:
    json.dump({'eos_token_id': [2, 'x']}, f)
  with pytest.raises(PretrainedError, match='k3/generation_config.json: eos_token_id must be'):
    pretrained.open_model(directory)
  directory = write_hf(tmp_path / 'k4', tensors)
  with open(os.path.join(directory, 'chat_template.jinja'), 'wb') as f:
    f.write(b'{{ caf\xe9 }}')
  with pytest.raises(PretrainedError, match='k4/chat_template.jinja is not UTF-8 text'):
    pretrained.open_model(directory)
  # a broken link to a file the model does not read (a cache's deleted blob) is no obstacle; to
  # one it reads, one line (its settings would be lost)
  directory = write_hf(tmp_path / 'k5', tensors)
  os.symlink(tmp_path / 'gone', os.path.join(directory, 'README.md'))
  assert pretrained.open_model(directory).fields == pretrained.open_model(
      write_hf(tmp_path / 'k6', tensors)).fields
  os.symlink(tmp_path / 'gone', os.path.join(directory, 'generation_config.json'))
  with pytest.raises(PretrainedError, match='k5/generation_config.json is a link to a file that '
                                            'is gone'):
    pretrained.open_model(directory)
  directory = write_hf(tmp_path / 'k7', tensors)  # so are the weights, not "has neither"
  os.remove(os.path.join(directory, 'model.safetensors'))
  os.symlink(tmp_path / 'gone', os.path.join(directory, 'model.safetensors'))
  with pytest.raises(PretrainedError, match='k7/model.safetensors is a link to a file that is'):
    pretrained.open_model(directory)
  # a tokenizer wider than the embedding would hand out ids past it
  narrow = {**LLAMA, 'data.vocab_size': 200}
  with pytest.raises(PretrainedError, match='k8/tokenizer.json has 264 tokens, more than the '
                                            'vocabulary of 200 in its config.json'):
    pretrained.open_model(write_hf(tmp_path / 'k8', random_llama(narrow), narrow,
                                   config_extra={'bos_token_id': 0, 'eos_token_id': 1}))
  # JSON nested past Python's stack or with a number past its digits; a number past float's
  # range; numbers that are not finite (a model of NaNs); a tensor in two shards is taken from
  # the one the index names, as transformers takes it (it was the one of the last file read),
  # and refused where the index names neither
  directory = write_hf(tmp_path / 'm1', tensors)
  (tmp_path / 'm1' / 'generation_config.json').write_text('[' * 100000 + ']' * 100000)
  with pytest.raises(PretrainedError, match='m1/generation_config.json cannot be read as JSON '
                                            r'\(RecursionError'):
    pretrained.open_model(directory)
  for key, value, words in (('rope_theta', 10**400, 'has a field of the wrong kind or value'),
                            ('rope_theta', float('inf'), 'gives model.rope_theta a value of inf'),
                            ('rms_norm_eps', float('nan'), 'gives model.norm_eps a value of nan')):
    with pytest.raises(PretrainedError, match=re.escape(words)):
      pretrained.open_model(write_hf(tmp_path / f'm2{key}{words[:4]}', tensors,
                                     config_extra={key: value}))
  directory = write_hf(tmp_path / 'm3', tensors, shards=2)
  shard = os.path.join(directory, 'model-00002-of-00002.safetensors')
  with safe_open(os.path.join(directory, 'model-00001-of-00002.safetensors'), 'numpy') as f:
    key = next(iter(f.keys()))
    first = f.get_tensor(key)
  with safe_open(shard, 'numpy') as f:
    save_file({**{n: f.get_tensor(n) for n in f.keys()}, key: first + 1}, shard)
  assert pretrained.open_model(directory).get(key).tolist() == first.tolist()
  index = json.load(open(os.path.join(directory, 'model.safetensors.index.json')))
  del index['weight_map'][key]
  json.dump(index, open(os.path.join(directory, 'model.safetensors.index.json'), 'w'))
  with pytest.raises(PretrainedError, match=f"tensor '{key}' of m3 is in two files, model-00001-"
                                            'of-00002.safetensors and model-00002-of-00002.'
                                            'safetensors, and model.safetensors.index.json names '
                                            'neither'):
    pretrained.open_model(directory)
  # a folder where a file it reads should be: one line, not an IsADirectoryError
  for name in ('config.json', 'generation_config.json', 'chat_template.jinja'):
    directory = write_hf(tmp_path / f'k9{name}', tensors)
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(directory, name))
    os.mkdir(os.path.join(directory, name))
    with pytest.raises(PretrainedError, match=f'{name} cannot be read \\(Is a directory\\)$'):
      pretrained.open_model(directory)


def test_a_chat_template_renders_as_transformers_renders_it():
  """No tools or documents (a template that tests `tools is not none` writes no tool list), loop
  controls, and a fixed date (a template's default where strftime_now is undefined)."""
  from mtp_jax.pretrained.tokenizer import render_chat
  assert render_chat('{% if tools is not none %}TOOLS{% endif %}{% if documents is not none %}'
                     'DOCS{% endif %}{{ messages[0].content }}', 'hi') == 'hi'
  assert render_chat('{% for m in messages %}{{ m.content }}{% break %}{% endfor %}', 'x') == 'x'
  assert render_chat('{% if strftime_now is defined %}{{ strftime_now("%Y") }}{% else %}26 Jul '
                     '2024{% endif %}', 'x') == '26 Jul 2024'


def test_an_hf_chat_template_is_read_in_each_form_transformers_writes(tmp_path):
  """In tokenizer_config.json as text, or as a list of named templates (the one named 'default'
  is the chat's), or beside it as chat_template.jinja (transformers' own layout now), which comes
  first, as transformers reads it; a list without 'default', or a template that is not text, is
  one clear error."""
  tensors = random_llama()

  def opened(name, template=None, jinja=None):
    directory = write_hf(tmp_path / name, tensors)
    with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
      json.dump({'eos_token': '<|im_end|>',
                 **({} if template is None else {'chat_template': template})}, f)
    if jinja is not None:
      with open(os.path.join(directory, 'chat_template.jinja'), 'w') as f:
        f.write(jinja)
    return pretrained.open_model(directory)

  assert opened('text', CHAT).chat_template == CHAT
  assert opened('jinja', jinja=CHAT).chat_template == CHAT
  assert opened('both', [{'name': 'tool_use', 'template': 'x'}], jinja=CHAT).chat_template == CHAT
  assert opened('listed', [{'name': 'tool_use', 'template': 'x'},
                           {'name': 'default', 'template': CHAT}]).chat_template == CHAT
  assert opened('none').chat_template == ''
  with pytest.raises(PretrainedError, match="lists chat templates named tool_use, none of them "
                                            "'default'"):
    opened('no_default', [{'name': 'tool_use', 'template': 'x'}])
  with pytest.raises(PretrainedError, match='has a chat_template that is not text'):
    opened('number', 7)


def test_llama3_tokenizer_takes_whole_pieces_and_starts_with_bos(tmp_path):
  """llama.cpp's defaults for the 'llama-bpe' pre-tokenizer: a piece that is a vocabulary entry
  is one token even where the merges do not reach it, and a BOS starts the text unless the file
  says otherwise."""
  from tokenizers import pre_tokenizers
  from mtp_jax.pretrained import tokenizer as tok_lib
  tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ['ab', 'abc']
  make = lambda pre: tok_lib.from_gguf_metadata(
      'test', tokens=tokens, merges=['a b'], token_types=[1] * len(tokens), model='gpt2',
      pre=pre, add_bos=False, bos_id=None)
  assert make('llama-bpe').encode('abc').ids == [tokens.index('abc')]
  # Qwen2's split is Llama 3's with every digit its own piece (llama.cpp's 'qwen2')
  pieces = lambda pre: [p for p, _ in make(pre).pre_tokenizer.pre_tokenize_str("it's 2024!\n")]
  assert pieces('llama-bpe') == ['it', "'s", 'Ġ', '202', '4', '!Ċ']
  assert pieces('qwen2') == ['it', "'s", 'Ġ', '2', '0', '2', '4', '!Ċ']
  assert pieces('deepseek-r1-qwen') == pieces('qwen2')  # llama.cpp's name for the same split
  assert make('gpt-2').encode('abc').ids == [tokens.index('ab'), tokens.index('c')]
  # llama.cpp's 'default' (also a file without the key): punctuation runs, GPT-2's split, digit
  # runs, groups of three digits, each on the pieces before (experiments/tokenizer_parity.py
  # compares whole texts with llama.cpp's ids).
  pieces = lambda pre: [p for p, _ in
                        make(pre).pre_tokenizer.pre_tokenize_str("don't stop!!! 12345")]
  assert pieces('default') == pieces('') == ['don', "'", 't', 'Ġstop', '!!!', 'Ġ', '123', '45']
  assert pieces('gpt-2') == ['don', "'t", 'Ġstop', '!!!', 'Ġ12345']
  for pre, first in (('llama-bpe', [262]), ('default', [])):
    model = pretrained.open_model(write_gguf(tmp_path / f'{pre}.gguf', random_llama(), pre=pre))
    ids = model.tokenizer.encode('hi').ids
    assert ids[:len(first)] == first and 262 not in ids[len(first):]


@pytest.mark.parametrize('blocks', [1, 2])
def test_heads_file_round_trip_and_mismatch(tmp_path, blocks):
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  config = pretrained.resolve_config(pretrained_config(path, **{'mtp.depth': 2,
                                                                'mtp.head_blocks': blocks}))
  params = init_params(ModelConfig.from_config(config), jax.random.key(3))['params']
  out = str(tmp_path / 'heads.safetensors')
  rank = np.arange(config.data.vocab_size)[::-1]
  heads_file.save(out, params, config, trunk='abc', token_rank=rank, dtype=np.float32)
  loaded = heads_file.load(out, config)
  for key, tree in loaded.items():
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), tree, params[key])
  assert set(loaded) == {k for k in params if k.startswith('mtp')}
  np.testing.assert_array_equal(heads_file.token_rank(out), rank)
  # last_block copies the trunk's last blocks, in order
  config.mtp.init_from = 'last_block'
  trunk = pretrained.trunk_params(path)
  L = config.model.num_layers
  for head in pretrained.head_params(config, trunk).values():
    assert sorted(head) == sorted(['block', 'block_1'][:blocks])
    for j, name in enumerate(['block', 'block_1'][:blocks]):
      jax.tree.map(np.testing.assert_array_equal, head[name], trunk[f'blocks_{L - blocks + j}'])
  config.mtp.head_blocks = 3 - blocks
  with pytest.raises(PretrainedError, match=f"mtp.head_blocks='{blocks}', the config has '{3 - blocks}'"):
    heads_file.check(out, config)
  config.mtp.head_blocks = blocks
  config.mtp.head_blocks = L + 1
  with pytest.raises(PretrainedError, match=f'more blocks than the trunk has \\({L}\\)'):
    pretrained.check_heads_init(config)
  config.mtp.head_blocks = blocks
  # heads know the trunk they were trained on
  other = str(tmp_path / 'other.safetensors')
  heads_file.save(other, params, config, trunk='0' * 64)
  config.mtp.init_from = other
  with pytest.raises(PretrainedError, match='heads trained on another trunk'):
    pretrained.check_heads_init(config)
  # ... and do not go on a trunk trained from random
  with pytest.raises(PretrainedError, match='heads trained on a pretrained trunk; give that model '
                                            'file as model.init_from'):
    pretrained.check_heads_init(apply_overrides(config, {'model.init_from': ''}))
  config.mtp.kind = 'parallel'
  with pytest.raises(PretrainedError, match="mtp.kind='sequential', the config has 'parallel'"):
    heads_file.check(out, config)
  config.mtp.kind = 'sequential'  # an empty value is shown as one, not as nothing
  config.mtp.feature_layers = '0'
  with pytest.raises(PretrainedError, match="mtp.feature_layers='', the config has '0'$"):
    heads_file.check(out, config)
  config.mtp.feature_layers = ''
  # heads of width 0 (the trunk's MLP width) fit a config that names that width, and no other
  config.mtp.head_mlp_dim = config.model.mlp_dim
  heads_file.check(out, config)
  config.mtp.head_mlp_dim = config.model.mlp_dim + 64
  with pytest.raises(PretrainedError, match=f"mtp.head_mlp_dim='{config.model.mlp_dim}', the "
                                            f"config has '{config.model.mlp_dim + 64}'"):
    heads_file.check(out, config)


@pytest.mark.parametrize('kind', ['sequential', 'medusa'])
def test_a_heads_file_that_lacks_or_misshapes_a_tensor_is_refused(tmp_path, kind):
  """Every tensor of the config's heads is checked, by the name and shape the file holds, before
  anything is loaded (a Medusa file lacking a head's matrix was taken, that head left as
  initialised; a sequential one with a cut matrix failed in a reshape)."""
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  config = pretrained.resolve_config(pretrained_config(path, **{'mtp.depth': 2, 'mtp.kind': kind}))
  params = init_params(ModelConfig.from_config(config), jax.random.key(3))['params']
  good = str(tmp_path / 'good.safetensors')
  heads_file.save(good, params, config, dtype=np.float32)
  heads_file.check(good, config)
  # a file of more heads than the config takes: its first, the later one's tensors no extra
  heads_file.check(good, apply_overrides(config, {'mtp.depth': 1}))
  with safe_open(good, framework='numpy') as f:
    meta, tensors = f.metadata(), {n: f.get_tensor(n) for n in f.keys()}
  name = sorted(n for n, w in tensors.items() if n.startswith('mtp.1.') and w.ndim == 2)[0]
  cut = tensors[name][:-2]
  for edit, words in (
      (lambda t, m: t.update({name: cut}),
       f"tensor '{name}' of bad.safetensors has shape {cut.shape}, expected {tensors[name].shape}"),
      (lambda t, m: t.pop(name), f"bad.safetensors has no tensor '{name}'"),
      (lambda t, m: m.pop('depth'), "bad.safetensors records no number of heads"),
      (lambda t, m: m.update(depth='²'), "bad.safetensors records no number of heads"),
      # a tensor loading would take into a head, or of another type, or past its heads
      (lambda t, m: t.update({'mtp.0.foo': cut}),
       "bad.safetensors has tensor 'mtp.0.foo', which is not part of its 2 heads"),
      (lambda t, m: t.update({name: tensors[name] > 0}),
       f"tensor '{name}' of bad.safetensors has type BOOL, not one of F32, F16, BF16"),
      (lambda t, m: t.update({'mtp.7.x': cut}), "has tensor 'mtp.7.x', which is not part of"),
      # the ranking a draft vocabulary takes its first N of: every token id once
      (lambda t, m: t.update({heads_file.RANK: np.zeros(config.data.vocab_size, np.int32)}),
       f"bad.safetensors's token_rank does not hold each of the {config.data.vocab_size} token "
       'ids once'),
      (lambda t, m: t.update({heads_file.RANK: np.arange(10, dtype=np.int32)}),
       "bad.safetensors's token_rank is I32 of shape (10,), not the")):
    t, m = dict(tensors), dict(meta)
    edit(t, m)
    save_file(t, str(tmp_path / 'bad.safetensors'), metadata=m)
    with pytest.raises(PretrainedError, match=re.escape(words)):
      heads_file.check(str(tmp_path / 'bad.safetensors'), config)
  # values that are not finite are said as the heads are loaded
  save_file({**tensors, name: np.full_like(tensors[name], np.nan)},
            str(tmp_path / 'nan.safetensors'), metadata=meta)
  with pytest.raises(PretrainedError, match=re.escape(
      f"tensor '{name}' of nan.safetensors holds values that are not finite numbers")):
    heads_file.load(str(tmp_path / 'nan.safetensors'), config)


def test_timing_scripts_take_random_heads_on_a_pretrained_trunk(tmp_path):
  """The scripts that time decoding calls (decode_profile, argmax, bench_sampling, through
  inference.decode_inputs) run a pretrained trunk with untrained heads, as their help says; bench
  refuses them."""
  from mtp_jax import inference
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  (tmp_path / 'prompts.txt').write_text('hello\n')  # no data to prepare
  config = pretrained.resolve_config(pretrained_config(
      path, **{'mtp.depth': 2, 'decode.prompts': str(tmp_path / 'prompts.txt')}))
  with pytest.raises(CheckpointError, match='the 2 MTP heads would be random'):
    train.check_trained('bench', config, str(tmp_path / 'run'))
  inputs = inference.decode_inputs(config, str(tmp_path / 'run'), 1, False)
  assert inputs.source.endswith('step 0') and len(inputs.prompts) == 1


def test_a_split_too_short_is_refused_before_the_trunk_writes_features(tmp_path):
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  config = pretrained_config(path, **{'data.sources': stdlib_corpus('colorsys.py', 'antigravity.py'),
                                      'train.freeze_trunk': True, 'data.features': True,
                                      'model.max_seq_len': 512, 'train.seq_len': 500,
                                      'data.valid_fraction': 0.5})
  with pytest.raises(train.data_lib.DataError, match='fewer than one window'):
    train.Session(pretrained.resolve_config(config), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'data' / 'features')


def test_heads_that_cannot_start_from_the_last_block_are_refused_before_the_data(tmp_path,
                                                                                 corpus):
  """mtp.init_from=last_block with Medusa heads (no block) or another head MLP width: one line
  before the data is prepared (or, with data.sources=self, written by the trunk)."""
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  for overrides, words in (({'mtp.kind': 'medusa'}, 'Medusa heads have no block to copy into'),
                           ({'mtp.head_mlp_dim': 7}, 'needs mtp.head_mlp_dim = 0')):
    config = pretrained_config(path, **{'data.sources': corpus, 'mtp.init_from': 'last_block',
                                        **overrides})
    with pytest.raises(PretrainedError, match=words):
      train.Session(pretrained.resolve_config(config), str(tmp_path / 'run'))
    assert not (tmp_path / 'run').exists()


def test_frozen_trunk_stays_bitwise_and_heads_train(tmp_path, corpus):
  """train.freeze_trunk: after steps the trunk is exactly the file's, the heads moved, and the
  optimizer holds state for the heads alone; the same on cached trunk features, there with the
  heads also fitted to the trunk's hidden states (train.feature_weight)."""
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  want = pretrained.trunk_params(path)
  for features in (False, True):
    config = pretrained_config(path, **{'data.sources': corpus, 'train.freeze_trunk': True,
                                        'train.head_loss': 'distill', 'data.features': features,
                                        'mtp.init_from': 'last_block', 'train.distill_topk': 4,
                                        'train.feature_weight': 0.5 if features else 0.0,
                                        # text is cut into 512-token pieces for its features
                                        'model.max_seq_len': 512 if features else 128})
    workdir = str(tmp_path / f'run{features}')
    if features:  # the pieces must fit the RoPE range
      with pytest.raises(ConfigError, match='pieces of 512 tokens, past model.max_seq_len=128'):
        validate(pretrained.resolve_config(pretrained_config(
            path, **{'data.features': True, 'train.freeze_trunk': True})))
    summary = train.train(config, workdir)
    assert summary['step'] == 3
    session = train.Session(config, workdir)
    state, _ = session.checkpointer.restore(None, session.abstract_state)
    session.checkpointer.close()
    # the optimizer state holds the heads alone: a run that trains the trunk cannot resume it
    unfrozen = copy.deepcopy(config)
    unfrozen.train.freeze_trunk, unfrozen.data.features, unfrozen.train.feature_weight = (
        False, False, 0.0)
    with pytest.raises(CheckpointError, match=r'train.freeze_trunk=False: .* trains with '
                                              r'train.freeze_trunk=True'):
      train.Session(unfrozen, workdir)
    heads, trunk = train.split_heads(state['params'])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), trunk['params'],
                 want)
    start = session.initial_params()
    moved = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(heads), jax.tree.leaves(train.split_heads(start)[0]))]
    assert sum(moved) > len(moved) // 2
    assert jax.tree.structure(state['opt_state']) == jax.tree.structure(
        session.tx.init(heads))
    assert 'agreement/depth_1' in summary['eval']
    assert ('feature/depth_1' in summary['eval']) == features
  # The same file by another path (moved, or named relatively): the checkpoints record its
  # sha256, which decides, not how the path is written.
  moved = str(tmp_path / 'moved' / 'tiny.gguf')
  os.makedirs(os.path.dirname(moved))
  shutil.copy(path, moved)
  for name in (moved, os.path.relpath(moved)):
    elsewhere = copy.deepcopy(config)
    elsewhere.model.init_from = name
    train.Session(elsewhere, workdir, reads='eval').checkpointer.close()
  # Checkpoints from before that record name the file by its path alone (the record emptied,
  # padded to its size, which each step's manifest holds).
  older = shutil.copytree(workdir, tmp_path / 'older')
  metas = glob.glob(os.path.join(older, 'checkpoints', '*', 'meta', 'metadata'))
  assert metas
  for meta in metas:
    with open(meta) as f:
      text = f.read()
    held = json.loads(text)
    assert len(held.pop('trunk')) == 64
    with open(meta, 'w') as f:
      f.write(json.dumps(held).ljust(len(text)))
  with pytest.raises(CheckpointError, match='different model: model.init_from: '):
    train.Session(elsewhere, str(older), reads='eval')
  train.Session(config, str(older), reads='eval').checkpointer.close()
  # The file replaced at its path by other weights of the same shapes: the checkpoints trained
  # from the first are refused before anything is built for the second, not resumed,
  # evaluated or exported on it (an export would name it the heads' trunk).
  write_gguf(path, random_llama(seed=1))
  for reads in ('', 'eval', 'export'):
    with pytest.raises(CheckpointError, match=r"tiny.gguf is not the model file this workdir's "
                                              r'checkpoints were trained from'):
      train.Session(config, workdir, reads=reads)


def test_a_run_that_waited_refuses_what_a_run_on_another_model_file_saved_meanwhile(
    tmp_path, corpus, capfd):
  """Two runs started in one workdir on two model files of the same shapes: the second waits for
  the first, which saves checkpoints meanwhile; once it holds the workdir the second refuses
  them, which record the first's file (its checks had found the workdir empty, and it resumed
  them on its own trunk)."""
  models = [write_gguf(tmp_path / f'{name}.gguf', random_llama(seed=seed))
            for name, seed in (('a', 0), ('b', 1))]
  config = lambda model: pretrained_config(model, **{
      'data.sources': corpus, 'train.freeze_trunk': True, 'mtp.init_from': 'last_block',
      'model.max_seq_len': 128})
  trained, workdir = str(tmp_path / 'trained'), str(tmp_path / 'run')
  train.train(config(models[0]), trained)
  with another_run_holding(workdir, capfd,
                           lambda: shutil.copytree(trained, workdir, dirs_exist_ok=True)):
    with pytest.raises(CheckpointError, match="b.gguf is not the model file this workdir's "
                                              'checkpoints were trained from'):
      train.train(config(models[1]), workdir)


def test_checkpoints_follow_a_directorys_weights_and_its_other_files(tmp_path, corpus):
  """A Hugging Face directory's identity is its weights' sha256; its config, tokenizer and chat
  template are recorded beside it. A copy elsewhere resumes; a copy with another chat template
  (the same weights) is refused, as heads exported with it would carry the other template."""
  directory = write_hf(tmp_path / 'a', random_llama())
  config = pretrained_config(directory, **{'data.sources': corpus, 'train.freeze_trunk': True,
                                           'mtp.init_from': 'last_block',
                                           'model.max_seq_len': 128})
  workdir = str(tmp_path / 'run')
  train.train(config, workdir)
  for name, edit in (('same', None), ('other', 'chat_template')):
    copy_dir = shutil.copytree(directory, tmp_path / name)
    if edit:
      path = os.path.join(copy_dir, 'tokenizer_config.json')
      with open(path) as f:
        tok_config = json.load(f)
      tok_config[edit] = '{{ messages[0].content }}'
      with open(path, 'w') as f:
        json.dump(tok_config, f)
    elsewhere = copy.deepcopy(config)
    elsewhere.model.init_from = str(copy_dir)
    if edit:
      with pytest.raises(CheckpointError, match='holds the weights this workdir\'s checkpoints '
                                                'were trained from, but another config'):
        train.Session(elsewhere, workdir, reads='eval')
    else:
      train.Session(elsewhere, workdir, reads='eval').checkpointer.close()


@pytest.mark.parametrize('heads', ['', 'last_block'])
def test_a_pretrained_start_is_the_random_start_with_the_files_in_place(tmp_path, heads):
  """The start never computes the random values the files replace (they are most of a real
  model's start-up), and gives what computing them and overwriting them gives."""
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  config = pretrained.resolve_config(pretrained_config(path, **{'mtp.init_from': heads}))
  session = train.Session(config, str(tmp_path / 'run'), data=False)
  with sharding.active(session.mesh):
    random_state = session.init(jax.random.key(config.seed))
  trunk = pretrained.trunk_params(path)
  inner = pretrained.merge(random_state['params']['params'], trunk)
  want = {'params': pretrained.merge(inner, pretrained.head_params(config, trunk))}
  assert_bitwise_equal(session.initial_params(), want)
  step, state, _ = session.restore_or_init()
  assert step == 0
  assert_bitwise_equal(state, {**random_state, 'params': want})


def test_generation_stops_at_every_end_token_the_file_names(tmp_path, capsys):
  """Llama 3 ends a turn with <|eot_id|>, which GGUF files name as the end-of-turn token beside
  EOS (llama.cpp stops at either) and HF files list among several EOS ids: decoding stops at the
  first of any of them."""
  from mtp_jax import inference
  tensors = random_llama()

  def generated(path, workdir):
    config = pretrained.resolve_config(pretrained_config(path))
    session = train.Session(config, str(tmp_path / workdir), data=False)
    prompt = inference.encode_prompt(session, 'the tin', chat=True)
    out = inference.generate(session, inference.load_params(session)[1], [prompt], config)
    return session, out['outputs'][0]

  session, out = generated(write_gguf(tmp_path / 'plain.gguf', tensors), 'plain')
  assert session.stop_ids == (263,) and len(out) == 8 and 263 not in out
  # The end-of-turn token is one the model emits, after another token, so the loop must stop.
  j = next(j for j in range(1, len(out)) if out[j] not in out[:j])
  session, cut = generated(write_gguf(tmp_path / 'eot.gguf', tensors, eot=out[j]), 'eot')
  assert session.stop_ids == (263, out[j]) and session.eos_id == 263
  assert cut == out[:j + 1]
  # The demo's one verification step reports the stop: a first token that ends the answer
  # verifies nothing.
  assert out[1] != out[0]
  for first_stops, eot in ((False, out[1]), (True, out[0])):
    session, _ = generated(write_gguf(tmp_path / f'eot{eot}.gguf', tensors, eot=eot), f'd{eot}')
    demo = inference.demo(session, inference.load_params(session)[1], 'the tin')
    if first_stops:
      assert demo['emitted'] == [out[0]] and demo['accepted'] == 0
      assert 'ended the answer at its first token' in capsys.readouterr().out
    else:
      assert demo['emitted'] == out[:2]  # greedy: the trunk's own tokens, to the stop
  hf = write_hf(tmp_path / 'hf', tensors, config_extra={'eos_token_id': [263, out[j]]})
  model = pretrained.open_model(hf)
  assert model.eos_id == 263 and model.stop_ids == (263, out[j])
  with open(os.path.join(hf, 'generation_config.json'), 'w') as f:
    json.dump({'eos_token_id': [out[j], 261]}, f)
  assert pretrained.open_model(hf).stop_ids == (263, out[j], 261)


def test_chat_template_and_eos_in_generation(tmp_path):
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  config = pretrained.resolve_config(pretrained_config(path))
  session = train.Session(config, str(tmp_path / 'run'), data=False)
  from mtp_jax import inference
  ids = inference.encode_prompt(session, 'hi', chat=True)
  text = session.tokenizer.decode(ids, skip_special_tokens=False)
  assert text == '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'
  assert inference.encode_prompt(session, 'hi', chat=False) == session.tokenizer.encode('hi').ids
  assert session.eos_id == 263
  # A template that writes the model's own BOS and EOS (as Llama 3's writes bos_token) gets them.
  chat = CHAT.replace('<|im_end|>', '{{ eos_token }}')
  path = write_gguf(tmp_path / 'bos.gguf', random_llama(), chat='{{ bos_token }}' + chat)
  session = train.Session(pretrained.resolve_config(pretrained_config(path)),
                          str(tmp_path / 'run2'), data=False)
  ids = inference.encode_prompt(session, 'hi', chat=True)
  assert session.tokenizer.decode(ids, skip_special_tokens=False) == (
      '<|im_start|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n')
  assert ids[:2] == [262, 262] and 263 in ids
