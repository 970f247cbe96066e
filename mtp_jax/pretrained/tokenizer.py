"""The tokenizer that comes with a model, as an HF `tokenizers.Tokenizer` (built from GGUF
metadata, or read from tokenizer.json), and its chat template rendered with Jinja2.
"""

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from mtp_jax.pretrained.base import PretrainedError

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r'\p{N}{1,3}', r'\p{N}')  # every digit its own piece


# llama.cpp's split for 'default' (and for a file without the key): runs of punctuation, then
# GPT-2's pattern, then runs of digits, then groups of three digits, each splitting the pieces
# the one before it made.
_DEFAULT_SPLITS = (r'[\p{P}\$\+<=>\^~\|]+', _GPT2_SPLIT, r'\p{N}+', r'[0-9][0-9][0-9]')


def _splits(*patterns):
  """Each regex splits every piece in turn (matches and the text between them both kept), then
  bytes become GPT-2's symbols."""
  return pre_tokenizers.Sequence(
      [pre_tokenizers.Split(tokenizers.Regex(p), behavior='isolated') for p in patterns]
      + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _pre_tokenizer(pre: str):
  """llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) as HF pre-tokenizers."""
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ('default', ''):
    return _splits(*_DEFAULT_SPLITS)
  if pre == 'gpt-2':
    return byte_level
  if pre == 'smollm':  # every digit its own token, then GPT-2's split
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre == 'llama-bpe':
    return _splits(_LLAMA3_SPLIT)
  if pre in ('qwen2', 'deepseek-r1-qwen'):  # the second: DeepSeek-R1's Qwen2 distillations
    return _splits(_QWEN2_SPLIT)
  return None


CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types that are never split


def from_gguf_metadata(name: str, *, tokens, merges, token_types, model, pre, add_bos,
                       bos_id) -> tokenizers.Tokenizer:
  if model != 'gpt2':
    raise PretrainedError(f"model.init_from: {name} has a '{model}' tokenizer; only byte-level "
                          "BPE ('gpt2') is read from GGUF files (give a Hugging Face directory "
                          'with tokenizer.json instead)')
  pre_tok = _pre_tokenizer(pre)
  if pre_tok is None:
    raise PretrainedError(f"model.init_from: {name} has pre-tokenizer '{pre}', which is not "
                          'supported (default, gpt-2, smollm, llama-bpe, qwen2, '
                          'deepseek-r1-qwen)')
  if token_types and len(token_types) != len(tokens):
    raise PretrainedError(f'model.init_from: {name} has {len(token_types)} token types for '
                          f'{len(tokens)} tokens (tokenizer.ggml.token_type)')
  vocab = {t: i for i, t in enumerate(tokens)}
  pairs = [tuple(m.split(' ', 1)) for m in merges]
  bad = next((m for m, pair in zip(merges, pairs) if len(pair) != 2 or not all(pair)), None)
  if bad is not None:
    raise PretrainedError(f'model.init_from: {name} has a merge that is not two tokens apart by '
                          f'a space: {bad!r} (tokenizer.ggml.merges)')
  # (tokenizers raises on a part outside the vocabulary and panics on a result outside it)
  bad = next((m for m, (a, b) in zip(merges, pairs) if not {a, b, a + b} <= vocab.keys()), None)
  if bad is not None:
    raise PretrainedError(f'model.init_from: {name} has a merge, {bad!r}, whose tokens or their '
                          'join are not in its vocabulary (tokenizer.ggml.merges)')
  # Llama 3's tokenizer takes a piece that is a whole vocabulary entry as one token, whether
  # or not the merges reach it (llama.cpp does the same for this pre-tokenizer).
  tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                                              ignore_merges=pre == 'llama-bpe'))
  tokenizer.pre_tokenizer = pre_tok
  tokenizer.decoder = decoders.ByteLevel()
  special = [tokens[i] for i, kind in enumerate(token_types) if kind in (CONTROL, USER_DEFINED)]
  tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in special])
  if add_bos and bos_id is not None:
    bos = tokens[bos_id]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A {bos} $B', special_tokens=[(bos, bos_id)])
  return tokenizer


def chat_turn(model, prompt: str) -> str:
  """`prompt` as a user turn of `model`'s chat template, followed by the assistant's header;
  `model` has chat_template, tokenizer, bos_id and eos_id (a training Session, or the trunk that
  writes data). The template's bos_token and eos_token are the model's own (Llama 3 starts its
  template with bos_token)."""
  text = lambda i: (model.tokenizer.id_to_token(int(i)) or '') if i is not None and i >= 0 else ''
  return render_chat(model.chat_template, prompt, text(model.bos_id), text(model.eos_id))


def render_chat(template: str, prompt: str, bos: str = '', eos: str = '') -> str:
  """One user turn and the assistant's header, through the model's own template, rendered as
  transformers renders chat templates: in a sandbox, with the trimming conventions they are
  written for, {% break %} and {% continue %}, no tools or documents. Unlike transformers, no
  strftime_now: Llama 3's templates would print today's date, so a prompt, and the data and
  benchmarks made from it, would change from day to day (they print their fixed default).
  """
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=['jinja2.ext.loopcontrols'])

  def raise_exception(message):
    raise PretrainedError(f'chat template: {message}')
  env.globals['raise_exception'] = raise_exception
  try:
    return env.from_string(template).render(
        messages=[{'role': 'user', 'content': prompt}], add_generation_prompt=True,
        bos_token=bos, eos_token=eos, tools=None, documents=None)
  except jinja2.TemplateError as e:
    raise PretrainedError(f'chat template: cannot render ({e})') from None
