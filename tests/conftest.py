"""Shared tiny configs for the CPU test suite."""

import hashlib
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from mtp_jax.config import ModelConfig  # noqa: E402
from mtp_jax.model import MTPLanguageModel  # noqa: E402


def tiny_config(**overrides):
  """base config shrunk to a 2-layer width-32 model; overrides as 'section.field'=value."""
  c = base.get_config()
  c.model.d_model = 32
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.max_seq_len = 128
  c.data.vocab_size = 96
  c.mtp.depth = 2
  c.train.steps = 4
  c.train.batch_size = 4
  c.train.seq_len = 16
  c.train.warmup_steps = 1
  c.train.checkpoint_every = 2
  c.train.eval_every = 4
  c.train.eval_batches = 1
  c.train.log_every = 1
  c.decode.eval_prompts = 0
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = value
  return c


def tiny_model(**overrides) -> ModelConfig:
  return ModelConfig.from_config(tiny_config(**overrides))


def depth_logits(params, cfg, tokens_BxW):
  """Every depth's logits over a window of T + D + 1 tokens (the training path, no cache)."""
  return [np.asarray(x) for x in MTPLanguageModel(cfg).apply(params, tokens_BxW)]


def assert_bitwise_equal(got, want):
  """Same tree, and every leaf the same dtype, shape and bytes."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    name = jax.tree_util.keystr(path)
    assert g.dtype == w.dtype and g.shape == w.shape, name
    assert g.tobytes() == w.tobytes(), name


def snapshot(root) -> dict:
  """{path under root: sha1 of its bytes} for every file."""
  hashes = {}
  for dirpath, _, filenames in os.walk(root):
    for name in filenames:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        hashes[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
  return hashes


@pytest.fixture
def corpus(tmp_path):
  """A small real-text corpus: a slice of the standard library's source, as files."""
  import sysconfig
  stdlib = sysconfig.get_paths()['stdlib']
  out = tmp_path / 'corpus'
  out.mkdir()
  for name in ['textwrap.py', 'string.py', 'bisect.py', 'heapq.py', 'shlex.py', 'fnmatch.py',
               'colorsys.py', 'keyword.py', 'glob.py', 'calendar.py', 'difflib.py', 'queue.py']:
    src = os.path.join(stdlib, name)
    (out / name.replace('.py', '.txt')).write_text(open(src, encoding='utf-8').read())
  return str(out)
