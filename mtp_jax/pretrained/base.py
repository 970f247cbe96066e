"""What every format reader returns: the model fields, the tokenizer and a lazy tensor getter."""

import dataclasses
import hashlib
from typing import Callable

import numpy as np
import tokenizers

from mtp_jax.config import ConfigError


class PretrainedError(ConfigError):
  """A model file that cannot be used as given; the message names the file, field or tensor."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
  path: str
  identity: str  # sha256 over the file(s) read: what a feature cache is keyed by
  fields: dict  # config path -> value, e.g. {'model.d_model': 576, 'data.vocab_size': 49152}
  context_length: int | None
  tokenizer: tokenizers.Tokenizer | None
  eos_id: int | None
  bos_id: int | None
  chat_template: str
  get: Callable[[str], np.ndarray]  # HF tensor name -> float32 array in HF layout
  stop_ids: tuple[int, ...] = ()  # the tokens that end generation, eos_id first
  # the padding and unknown tokens the file names (None: none), which an export passes on
  pad_id: int | None = None
  unk_id: int | None = None
  # sha256 over the other files that shape what the model computes and writes (its config,
  # tokenizer, chat template) where `identity` does not cover them (a Hugging Face directory's
  # identity is its weights'); '' where it does (a GGUF file)
  setup_identity: str = ''
  # generation_config.json's settings other than its token ids (sampling, penalties), which an
  # export passes on
  generation: dict = dataclasses.field(default_factory=dict)


def stop_tokens(*ids) -> tuple[int, ...]:
  """Each token id once, in order, from ids that are ints, lists of ints or None (files give the
  end of a turn or a message beside EOS, or several EOS ids in a list)."""
  found = []
  for entry in ids:
    for t in entry if isinstance(entry, (list, tuple)) else [entry]:
      if t is not None and int(t) not in found:
        found.append(int(t))
  return tuple(found)


def cast(tensors: dict, dtype) -> dict:
  """Each tensor as `dtype` for writing, refused (one line naming the first) where a finite value
  would not stay finite (float16 stops at 65504: it would be written as inf)."""
  out = {}
  for name, w in tensors.items():
    with np.errstate(over='ignore'):  # said below, as one line
      out[name] = w.astype(dtype)
    overflowed = np.isfinite(w) & ~np.isfinite(out[name])
    if overflowed.any():
      raise PretrainedError(f'{name} holds {w[overflowed].flat[0]:.6g}, which '
                            f'{np.dtype(dtype).name} cannot hold (it would be written as inf); '
                            'export in float32 (--export_dtype float32)')
  return out


def finite(get, field: str, name: str):
  """`get` (tensor name -> float32 array) checking each array it returns: values that are not
  finite (damaged data, a model of NaNs said by no error) are one line naming the tensor and the
  file `name` that `field` gives."""
  def checked(tensor: str) -> np.ndarray:
    w = get(tensor)
    if not np.isfinite(w).all():
      raise PretrainedError(f"{field}: tensor '{tensor}' of {name} holds values that are not "
                            'finite numbers')
    return w
  return checked


def sha256(paths: list[str]) -> str:
  digest = hashlib.sha256()
  for path in paths:
    with open(path, 'rb') as f:
      for chunk in iter(lambda: f.read(1 << 22), b''):
        digest.update(chunk)
  return digest.hexdigest()
