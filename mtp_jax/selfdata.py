"""Training data for heads, made by the frozen trunk itself: chats it samples (a user turn it
invents from its chat template's opening, then its own answer), and its features (h0 and the
top-K next-token distribution) at every position, kept from the decoding that wrote them or, for
text from files, from one forward pass. Either way the trunk runs once per training token.
"""

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tqdm

from mtp_jax import decode as dec
from mtp_jax import features as feat_lib
from mtp_jax.config import FEATURE_PIECE_LEN, ConfigError
from mtp_jax.pretrained.tokenizer import chat_turn

ROWS_PER_SHARD = 16
QUERY_LEN = 48  # longest invented user turn, in tokens
_MARK = '\u2063MTPJAX\u2063'  # stands for the user's text while splitting the template


@dataclasses.dataclass(frozen=True)
class Trunk:
  """What writing data needs of the model: its depth-0 config, the trunk's params, the tokenizer
  and the chat format."""
  model: object  # decode.DecodeModel of a depth-0 config
  params: dict
  tokenizer: object
  eos_id: int
  bos_id: int | None
  chat_template: str
  stop_ids: tuple[int, ...]  # the tokens that end a turn or an answer


def chat_frame(trunk: Trunk) -> tuple[list[int], list[int]]:
  """Token ids before and after a user turn's text in the model's chat template (a single start
  token when it has none)."""
  if not trunk.chat_template:
    start = trunk.bos_id if trunk.bos_id is not None else trunk.eos_id
    return [start], []
  text = chat_turn(trunk, _MARK)
  before, after = text.split(_MARK)
  return encode(trunk, before), encode(trunk, after)


def encode(trunk: Trunk, text: str) -> list[int]:
  return trunk.tokenizer.encode(text, add_special_tokens=False).ids


def _decode(trunk: Trunk, prompts: list[list[int]], s: dec.Settings, key, width: int):
  prompts_BxP, lens = dec.pad_prompts(prompts, width)
  fn = dec.compiled_decoder(trunk.model, s, dec.cache_length(prompts_BxP.shape[1], s))
  return jax.device_get(fn(trunk.params, prompts_BxP, lens, key))


def check_fits(model, queries: list[list[int]] | None, answer_len: int, max_len: int) -> None:
  """One-line error, before anything runs, when a chat (the template around the longest user
  turn, then an answer of answer_len tokens) would pass max_len positions, the RoPE range (an
  invented turn fits where its answer does). `model` is the Session that will write the chats
  (the decoder refuses a cache past the range as well)."""
  before, after = chat_frame(model)
  turn = max(map(len, queries)) if queries else QUERY_LEN
  need = dec.cache_length(len(before) + turn + len(after), dec.Settings(max_new_tokens=answer_len))
  if need > max_len:
    raise ConfigError(f'data.self_answer_len={answer_len}: a chat of the longest user turn '
                      f'({turn} tokens, with the chat template around it) and its answer needs '
                      f'{need} positions, more than model.max_seq_len={max_len}')


def _user_turn(model, ids: list[int]) -> list[int]:
  """A user turn's tokens as a chat holds them: without the stop tokens that would end it (an
  invented turn ends with one; the template's text after it closes the turn)."""
  return [t for t in ids if t not in model.stop_ids]


def row_key(seed: int, index: int, b: int, given: int = 0) -> str:
  """The key that decides whether row b of shard `index` is held out (feat_lib.is_valid_row).
  With `given` user turns, taken in turn, a row that asks a turn again takes the key of the
  turn's first row, so a turn's answers are all held out or all trained on (a held-out answer
  to a turn trained on would score the heads on what they learned)."""
  row = index * ROWS_PER_SHARD + b
  first = row % given if given else row
  return f'{seed}:{first // ROWS_PER_SHARD}:{first % ROWS_PER_SHARD}'


def check_held_out(model, queries: list[list[int]] | None, *, tokens: int, answer_len: int,
                   valid_fraction: float, seed: int, window: int) -> None:
  """One-line error, before any chat is written, when the held-out rows, or the training rows,
  cannot hold one training window whatever the trunk answers. Which rows are held out is fixed
  by their keys (write_chats), and each row's length is bounded: the template around its user
  turn, then 1 to answer_len answer tokens. The shards are counted as if every row were shortest, so the rows
  counted include every row that can be written."""
  before, after = chat_frame(model)
  frame = len(before) + len(after)
  turns = [len(_user_turn(model, q)) for q in queries] if queries else None
  written, room, index = 0, {True: 0, False: 0}, 0
  while written < tokens:
    for b in range(ROWS_PER_SHARD):
      if turns:
        shortest = longest = turns[(index * ROWS_PER_SHARD + b) % len(turns)]
      else:  # an invented turn: 0 to QUERY_LEN tokens
        shortest, longest = 0, QUERY_LEN
      written += frame + shortest + 1
      held = feat_lib.is_valid_row(row_key(seed, index, b, len(turns or ())), valid_fraction)
      room[held] += frame + longest + answer_len
    index += 1
  more_turns = ', or give more user turns (a turn\'s answers are held out together)'
  if room[True] < window:
    raise ConfigError(f'data.self_tokens={tokens}, data.valid_fraction={valid_fraction}: the '
                      f'held-out chats can hold at most {room[True]} positions, fewer than one '
                      f'window ({window}, train.seq_len + mtp.depth + 1); raise data.self_tokens '
                      'or data.valid_fraction' + (more_turns if turns else ''))
  if room[False] < window:  # every turn held out: only given turns can do that
    raise ConfigError(f'data.valid_fraction={valid_fraction}: the training chats can hold at most '
                      f'{room[False]} positions, fewer than one window ({window}); lower '
                      'data.valid_fraction' + more_turns)


def write_chats(trunk: Trunk, builder: feat_lib.Builder, *, tokens: int, temperature: float,
                answer_len: int, topk: int, seed: int, valid_fraction: float,
                queries: list[str] | None = None) -> None:
  """Samples chats shard by shard until `tokens` positions exist (resuming after the shards
  already written): the user turn, taken in turn from `queries` or, without them, sampled at
  temperature 1 (for variety) until it ends; then the answer at `temperature`, keeping features
  when topk > 0."""
  before, after = chat_frame(trunk)
  ask = dec.Settings(max_new_tokens=QUERY_LEN, temperature=1.0, stop_ids=trunk.stop_ids)
  given = [encode(trunk, q) for q in queries] if queries else None
  answer = dec.Settings(max_new_tokens=answer_len, temperature=temperature,
                        stop_ids=trunk.stop_ids, capture_topk=topk)
  width = len(before) + (max(map(len, given)) if given else QUERY_LEN) + len(after)
  have = builder.positions()
  index = max(builder.done(), default=-1) + 1
  with tqdm.tqdm(total=tokens, initial=min(have, tokens), desc='data: trunk writes chats',
                 unit='tok', file=sys.stderr, dynamic_ncols=True) as bar:
    while have < tokens:
      start = time.perf_counter()
      key = jax.random.fold_in(jax.random.key(seed), index)
      if given:
        turns = [given[(index * ROWS_PER_SHARD + b) % len(given)] for b in range(ROWS_PER_SHARD)]
      else:
        turns = dec.outputs(_decode(trunk, [before] * ROWS_PER_SHARD, ask,
                                    jax.random.fold_in(key, 0), len(before)))
      # The template's text after the user's closes the turn (one cut off at QUERY_LEN too).
      prompts = [before + _user_turn(trunk, q) + after for q in turns]
      done = _decode(trunk, prompts, answer, jax.random.fold_in(key, 1),
                     width).rows  # row b decoded prompt b
      rows = []
      for b in range(ROWS_PER_SHARD):
        n = int(done.n[b])
        row = {'tokens': np.asarray(done.tokens[b, :n], np.int32)}
        if topk:
          row['h0'] = np.asarray(done.hidden[0][b, :n]).astype(ml_dtypes.bfloat16)
          row['top_ids'] = np.asarray(done.top_ids[b, :n])
          row['top_logp'] = np.asarray(done.top_logp[b, :n]).astype(np.float16)
        rows.append(row)
      builder.add(index, rows, [feat_lib.is_valid_row(row_key(seed, index, b, len(given or ())),
                                                      valid_fraction)
                                for b in range(ROWS_PER_SHARD)], time.perf_counter() - start)
      added = sum(len(r['tokens']) for r in rows)
      have += added
      index += 1
      bar.update(added)


FORWARD_ROWS, FORWARD_LEN = 8, FEATURE_PIECE_LEN
_WIDTH_STEP = 64  # forward batches are padded to a multiple of this, so few shapes compile


def pieces(tokens, length: int = FORWARD_LEN) -> list[np.ndarray]:
  """Consecutive pieces of at most `length` tokens."""
  return [np.asarray(tokens[i:i + length]) for i in range(0, len(tokens), length)]


def write_features(trunk: Trunk, builder: feat_lib.Builder, splits: dict, topk: int) -> None:
  """Features of existing token rows ({'train': rows, 'valid': rows}), from one trunk forward
  over batches of FORWARD_ROWS rows, each row whole (text is cut into `pieces` first, whose
  first positions see less context)."""

  @jax.jit
  def forward(params, tokens_BxT):
    positions = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    logits, h0, _ = trunk.model.trunk(params, tokens_BxT, positions, None)
    logp, ids = jax.lax.top_k(jax.nn.log_softmax(logits), topk)
    return h0.astype(jnp.bfloat16), ids, logp.astype(jnp.float16)

  chunks = []
  for split, rows in splits.items():
    chunks += [(split, rows[i:i + FORWARD_ROWS]) for i in range(0, len(rows), FORWARD_ROWS)]
  done = set(builder.done())
  size = lambda rows: sum(len(r) for r in rows)
  # a resumed build's bar starts where it stopped (a burst of updates would read as its rate)
  with tqdm.tqdm(total=sum(size(c) for _, c in chunks), desc='data: trunk features', unit='tok',
                 initial=sum(size(c) for i, (_, c) in enumerate(chunks) if i in done),
                 file=sys.stderr, dynamic_ncols=True) as bar:
    for index, (split, rows) in enumerate(chunks):
      if index in done:
        continue
      start = time.perf_counter()
      width = -(-max(len(r) for r in rows) // _WIDTH_STEP) * _WIDTH_STEP
      batch = np.zeros((FORWARD_ROWS, width), np.int32)
      for b, r in enumerate(rows):
        batch[b, :len(r)] = r
      h0, ids, logp = jax.device_get(forward(trunk.model.prepare(trunk.params), batch))
      out = [{'tokens': np.asarray(r, np.int32), 'h0': np.asarray(h0[b, :len(r)]),
              'top_ids': ids[b, :len(r)], 'top_logp': logp[b, :len(r)]}
             for b, r in enumerate(rows)]
      builder.add(index, out, [split == 'valid'] * len(out), time.perf_counter() - start)
      bar.update(size(rows))
