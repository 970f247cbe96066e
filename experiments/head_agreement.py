"""How often each head's top draft token is the trunk's, teacher-forced: on the trunk's own greedy
answers to held-out prompts (the text decoding drafts on), and with --cache on a feature cache's
held-out split with its user-turn and answer positions apart (training's agree@k pools them; the
user turns, from a few templates, are easy to agree on). With --by_confidence the greedy answers'
positions are split by the probability the trunk gave the token a head should draft, with
--by_head_confidence by the probability the head gave its own top token (how well a head knows
when it is right, which a rule that stops drafting at low confidence would rely on); with
--answer_split N by whether they are among an answer's first N tokens (decoding's answers are
decode.max_new_tokens long, the cache's up to data.self_answer_len); with
--misses N it prints the N answer tokens the trunk was surest of that the first head missed. With
--simulate it replays greedy speculative decoding of those answers for S = 1..D from the heads'
teacher-forced drafts (exact for float32 heads: a draft after an accepted one reads the true
tokens, as decoding's does; the decoder's narrower draft dtypes can move a near tie), beside
drafts copied from earlier in the text (prompt lookup), the copy where one is found and the
heads elsewhere, and at each iteration whichever of the two is accepted further (what a perfect
choice between them would give): tau and acceptance per position, without the decoder. With
--table CACHE,.. also beside drafts from a table of the trunk's own continuations (REST's
retrieval from a datastore, built from the trunk's answers instead of a corpus): after each 1 to
TABLE_CONTEXT tokens of the caches' training rows, the trunk's top next tokens there; a draft is
the commonest after the longest context the table holds, and 'either (table)' is whichever of the
table's and the heads' drafts is accepted further. With --stop_below THETA,.. also a chain whose
length each iteration sets: drafting stops at the first draft where the product of the heads'
probabilities of their own tokens falls below THETA (as EAGLE-2 grows its trees by confidence),
that draft made but not verified; it prints the mean drafts made and positions verified per
iteration. With --price AR,DRAFT,POSITION (decode_profile.py's times of an `ar` iteration, a
draft and a verify position past the first) it prices the heads' fixed and cut chains as a
speedup over `ar`.
With --top K it also replays decode.candidates = 2..K (the first head's runner-up tokens verified
beside the chain), each --tree W1,W2,.. a full token tree: W1 first drafts, under each of them
W2 second drafts, and so on (a draft tree's node is accepted when it is the trunk's token, and
the heads under it then read true tokens, so teacher-forced top-W lists replay it exactly), and
each --sparse N the static tree of N drafts that keeps the branches most often accepted, as
Medusa builds its tree: chosen on one half of the prompts and replayed on the other.

Run: python experiments/head_agreement.py --config configs/smollm2.py --workdir runs/smollm2 \
       [--cache runs/cache/features/HASH] [--by_confidence | --by_head_confidence |
       --answer_split N] [--top K] [--misses N] [--simulate [--tree W1,W2,..]... [--sparse N,..]
       [--table CACHE,..] [--stop_below THETA,..] [--price AR,DRAFT,POSITION]]
Prints, per depth k, the share of positions where head k's top token (over the draft vocabulary,
decode.draft_vocab) is the trunk's next token k + 1 ahead, and how many positions were counted.
Depth k reads the tokens before its target, so this is the acceptance of each head on its own;
decoding accepts position k only after positions 1..k-1, so its per-position rates are lower.
"""

import functools
import itertools
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mtp_jax import atomic, cli  # noqa: E402
from mtp_jax.config import positive_ints  # noqa: E402


def define_flags():
  """The command line's flags, defined only when run as a script (tests import this module
  beside other scripts that define flags of the same names)."""
  global _CONFIG, _WORKDIR, _CACHE, _TOP, _JSON, _BY_CONFIDENCE, _BY_HEAD_CONFIDENCE, _MISSES
  global _SIMULATE, _TREE, _SPARSE, _DEPTHS, _ANSWER_SPLIT, _TABLE, _STOP_BELOW, _PRICE
  _CONFIG = config_flags.DEFINE_config_file('config', 'configs/smollm2.py',
                                            'Path to a config file.', lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', 'runs/smollm2',
                                 'Run directory (its checkpoint, if any).')
  _CACHE = flags.DEFINE_string('cache', '',
                               'A feature cache directory: also count its valid split.')
  _TOP = flags.DEFINE_integer('top', 1, 'Count a head as agreeing when the trunk\'s token is '
                              'among its TOP most likely (decode.candidates verifies that many '
                              'at the first draft position).', lower_bound=1)
  _JSON = flags.DEFINE_string('json', '', 'Write the results to this JSON file.')
  _BY_CONFIDENCE = flags.DEFINE_boolean(
      'by_confidence', False, 'Split the greedy answers\' positions by the probability the '
      'trunk gave its own token there (CONFIDENCE buckets).')
  _BY_HEAD_CONFIDENCE = flags.DEFINE_boolean(
      'by_head_confidence', False, 'Split the greedy answers\' positions by the probability '
      'each head gave its own top token (over the draft vocabulary; CONFIDENCE buckets).')
  _ANSWER_SPLIT = flags.DEFINE_integer(
      'answer_split', 0, 'Split the answers\' positions (greedy and, with --cache, the cache\'s) '
      'into an answer\'s first N tokens and those after them.', lower_bound=0)
  _MISSES = flags.DEFINE_integer('misses', 0, 'Print the N answer tokens the trunk was surest '
                                 'of where the first head\'s top token differs, in context.',
                                 lower_bound=0)
  _SIMULATE = flags.DEFINE_boolean(
      'simulate', False, 'Replay greedy decoding of the answers for S = 1..D with the heads\' '
      'drafts, drafts copied from earlier in the text, and the two combined (DRAFTERS); '
      'with --top K also first-draft candidates 2..K.')
  _TREE = flags.DEFINE_multi_string(
      'tree', [], 'With --simulate: also replay a full draft tree of these widths per depth '
      '(W1,W2,..: W1 first drafts, W2 second drafts under each, ..; each W <= --top).')
  _DEPTHS = flags.DEFINE_list(
      'candidate_depth', ['1'], 'With --simulate --top K: replay first-draft candidates with '
      'branches of each of these numbers of drafts (decode.candidate_depth, 1..D).')
  _SPARSE = flags.DEFINE_list(
      'sparse', [], 'With --simulate: also replay, per N, the tree of N drafts (ranks up to '
      '--top, depths up to D) most often accepted on the other half of the prompts.')
  _TABLE = flags.DEFINE_list(
      'table', [], 'With --simulate: also replay drafts from a table of the trunk\'s next tokens '
      'after each 1 to TABLE_CONTEXT tokens of these feature caches\' training rows.')
  _STOP_BELOW = flags.DEFINE_list(
      'stop_below', [], 'With --simulate: also replay, per THETA in [0, 1], chains that stop '
      'drafting where the product of the heads\' probabilities of their tokens falls below it.')
  _PRICE = flags.DEFINE_list(
      'price', [], 'AR,DRAFT,POSITION: with --simulate, also price the heads\' chains (fixed and '
      'cut) by these times of an ar iteration, a draft and a verify position past the first '
      '(decode_profile.py\'s), as a speedup over ar.')


CONFIDENCE = (0.3, 0.5, 0.7, 0.9)  # bucket edges of a probability (the trunk's or a head's)
DRAFTERS = ('heads', 'copy', 'copy, else heads', 'either')  # what --simulate replays
COPY_NGRAM = (3, 2)  # the longest and shortest text ending a draft's context that a copy matches
TABLE_DRAFTERS = ('table', 'either (table)')  # what --simulate --table adds
TABLE_CONTEXT = 3  # the longest context, in tokens, the continuation table keys


def confidence_bucket(p: float, whose: str = 'trunk') -> str:
  """The CONFIDENCE bucket of `whose` probability p, as a label that sorts in order."""
  edges = (0.0,) + CONFIDENCE + (1.0,)
  i = sum(p >= e for e in CONFIDENCE)
  return f'{whose} p in [{edges[i]:.1f}, {edges[i + 1]:.1f}{"]" if i == len(CONFIDENCE) else ")"}'


def head_tokens(session, params, draft_ids, top: int = 1):
  """fn(tokens_1xW, h0_1xLxD or None) -> (D arrays (L, top) of each head's `top` most likely
  token ids at every position, the trunk's probability of its own most likely next token at every
  position (L,), D arrays (L,) of each head's probability of its most likely token, over the
  draft vocabulary when there is one); h0 comes from the trunk over tokens[:, :L] when None;
  W = L + D + 1."""
  import jax
  import jax.numpy as jnp
  from mtp_jax.model import MTPLanguageModel
  model, D = MTPLanguageModel(session.cfg), session.cfg.mtp_depth
  ids = jnp.asarray(draft_ids) if draft_ids is not None else None

  def heads(m, tokens_1xW, h0_1xLxD):
    if h0_1xLxD is None:
      L = tokens_1xW.shape[1] - D - 1
      h0_1xLxD, _ = m.trunk(tokens_1xW[:, :L], jnp.arange(L)[None])
    hidden = m.head_states(h0_1xLxD.astype(jnp.float32), tokens_1xW)
    out, sure = [], []
    for k, h in enumerate(hidden[1:], start=1):
      logits = m.logits(h, k)[0]
      logits = logits if ids is None else logits[:, ids]
      index = jax.lax.top_k(logits, top)[1]
      out.append(index if ids is None else ids[index])
      sure.append(jax.nn.softmax(logits, axis=-1).max(axis=-1))
    return out, jax.nn.softmax(m.logits(hidden[0], 0)[0], axis=-1).max(axis=-1), sure
  fn = jax.jit(lambda p, t, h: model.apply({'params': p['params']}, t, h, method=heads))
  return lambda tokens_1xW, h0=None: jax.device_get(fn(params, tokens_1xW, h0))


def answer_part(start: int, split: int):
  """`count`'s part for answer positions j, the answer starting at position `start`: 'answer',
  or with split > 0 whether j is among its first `split` tokens."""
  if split <= 0:
    return lambda j, k: 'answer'
  return lambda j, k: (f'answer tokens 1-{split}' if j - start < split
                       else f'answer tokens past {split}')


def count(tops, want, first: int, last: int, sums: dict, part=lambda j, k: 'answer'):
  """Adds to sums[(part(j, k), k)] = [agreeing, counted]: head k's tokens at position i
  (tops[k - 1][i], its most likely first) against want[j], j = i + k + 1 (the trunk's token
  there), for first - 1 <= i and j < last, where first >= 1: the positions decoding drafts from
  when `first` is the first position it writes."""
  for k, top in enumerate(tops, start=1):
    for j in range(first + k, last):
      s = sums.setdefault((part(j, k), k), [0, 0])
      s[0] += int(want[j] in top[j - k - 1])
      s[1] += 1


def greedy_agreement(session, params, prompts, draft_ids, top: int = 1, by: str = '',
                     missed: list | None = None, tops_out: list | None = None,
                     answer_split: int = 0, sure_out: list | None = None) -> tuple[dict, list]:
  """(sums as `count` keeps them, the answers): each prompt's greedy `ar` answer, then every head
  teacher-forced over prompt + answer, counted on the answer's positions; `by` 'trunk' splits
  them by the CONFIDENCE bucket of the trunk's probability of the token a head should draft,
  'head' by that of the head's probability of its own top token; `answer_split` > 0 splits them
  into each answer's first `answer_split` tokens and the rest.
  `missed`, when given, receives (trunk's probability, prompt index, position j, head's token)
  for every answer token j the first head's top token misses; `tops_out`, when given, receives
  each prompt's D arrays of the heads' top tokens at every position (head_tokens'), and
  `sure_out` their D arrays of each head's probability of its top token."""
  import numpy as np
  from mtp_jax import decode as dec
  from mtp_jax import inference
  s = inference.settings(session.config, draft=0, temperature=0.0, stop_ids=session.stop_ids)
  width = max(len(p) for p in prompts)
  answers = [dec.outputs(inference.prepared_decoder(session.decode_model, params, [p], s,
                                                    width=width)())[0] for p in prompts]
  fn, D = head_tokens(session, params, draft_ids, top), session.cfg.mtp_depth
  L = width + s.max_new_tokens
  sums = {}
  for i, (p, a) in enumerate(zip(prompts, answers)):
    seq = np.array(p + a, np.int32)
    tokens = np.zeros((1, L + D + 1), np.int32)
    tokens[0, :len(seq)] = seq
    # p_max[j - 1]: the trunk's probability of its token j; sure[k - 1][i]: head k's of its
    # top token at i, which drafts token i + k + 1.
    tops, p_max, sure = fn(tokens)
    if tops_out is not None:
      tops_out.append(tops)
    if sure_out is not None:
      sure_out.append(sure)
    part = answer_part(len(p), answer_split)
    if by == 'trunk':
      part = lambda j, k, p_max=p_max: confidence_bucket(p_max[j - 1])  # noqa: E731
    elif by == 'head':
      part = lambda j, k, sure=sure: confidence_bucket(sure[k - 1][j - k - 1], 'head')  # noqa: E731
    count(tops, seq, len(p), len(seq), sums, part)
    if missed is not None:
      missed.extend((float(p_max[j - 1]), i, j, int(tops[0][j - 2, 0]))
                    for j in range(len(p) + 1, len(seq)) if tops[0][j - 2, 0] != seq[j])
  return sums, answers


def copy_drafts(seq: list, j: int, S: int, ngram=COPY_NGRAM) -> list:
  """Prompt lookup: S tokens for seq[j], seq[j + 1], .. given seq[:j], the ones that followed the
  latest earlier occurrence of the text ending seq[:j], tried from ngram[0] tokens of it down to
  ngram[1] (a copy that reaches position j goes on through its own drafts, so repeated text is
  copied S tokens deep); [] when none occurs."""
  for n in range(ngram[0], ngram[1] - 1, -1):
    suffix = seq[j - n:j]
    for start in range(j - n - 1, -1, -1):
      if seq[start:start + n] == suffix:
        text = list(seq[:j])
        for m in range(S):
          text.append(text[start + n + m])
        return text[j:]
  return []


def continuation_table(splits, longest: int = TABLE_CONTEXT) -> dict:
  """{context: the trunk's next token after it}: for each feature-cache split (its tokens, row
  starts and the trunk's top next token at each position, top_ids[:, 0]) and every 1 to `longest`
  tokens ending a position within its row, the token the trunk most often put next there (the
  first seen of a tie). A row's last position is left out: a row the trunk wrote keeps no
  distribution there (zeros, which training's loss leaves out too)."""
  import collections
  import numpy as np
  counts = collections.defaultdict(collections.Counter)
  for split in splits:
    tokens = np.asarray(split.tokens).tolist()
    nexts = np.asarray(split.top_ids[:, 0]).tolist()
    starts = np.append(np.asarray(split.row_start), True)  # the split's end closes its last row
    row = 0
    for i, token in enumerate(nexts):
      row = i if starts[i] else row
      if starts[i + 1]:
        continue
      for n in range(1, min(longest, i - row + 1) + 1):
        counts[tuple(tokens[i - n + 1:i + 1])][token] += 1
  return {context: c.most_common(1)[0][0] for context, c in counts.items()}


def table_sources(directories) -> list:
  """The training splits of these feature caches, for continuation_table; ValueError naming
  one that is not a finished cache or keeps no trunk tokens."""
  from mtp_jax import features
  splits = []
  for directory in directories:
    found = features.load(directory)
    if found is None:
      raise ValueError(f'--table: {directory} is not a finished feature cache')
    if found['train'].top_ids is None:
      raise ValueError(f'--table: {directory} keeps no trunk tokens (top_ids)')
    splits.append(found['train'])
  return splits


def table_drafts(table: dict, seq: list, j: int, S: int, longest: int = TABLE_CONTEXT) -> list:
  """S tokens for seq[j], .. given seq[:j] from a continuation_table: each the trunk's commonest
  next token after the longest text ending the draft's context that the table holds (the drafts
  before it in that context); stops early where not even the last token is in the table."""
  text = list(seq[:j])
  for _ in range(S):
    for n in range(min(longest, len(text)), 0, -1):
      if tuple(text[-n:]) in table:
        text.append(table[tuple(text[-n:])])
        break
    else:
      break
  return text[j:]


def confident_length(probs, theta: float) -> tuple[int, int]:
  """(drafts made, drafts verified) when drafting stops at the first draft where the product of
  the heads' probabilities of their own tokens so far (probs, draft 1 first) falls below theta:
  that draft is made, since its probability is known only then, but not verified."""
  product = 1.0
  for k, p in enumerate(probs):
    product *= p
    if product < theta:
      return k + 1, k
  return len(probs), len(probs)


def accepted_run(seq: list, j: int, drafts: list) -> int:
  """How many of `drafts` (for seq[j], ..) greedy verification accepts: those before the first
  that is not seq's token (none past seq's end)."""
  a = 0
  while a < len(drafts) and j + a < len(seq) and drafts[a] == seq[j + a]:
    a += 1
  return a


def rank_path(seq: list, j: int, tops_at: list) -> tuple:
  """Where seq[j], seq[j + 1], .. stand in head 1, 2, ..'s lists of likeliest tokens
  (tops_at[k - 1], most likely first, rank 0), up to the first token a list does not hold."""
  path = []
  for k, listed in enumerate(tops_at):
    if j + k >= len(seq) or seq[j + k] not in list(listed):
      break
    path.append(list(listed).index(seq[j + k]))
  return tuple(path)


def tree_run(path: tuple, tree) -> int:
  """How many drafts a token tree accepts where the trunk's tokens take this rank path
  (rank_path). A tree is a set of rank paths, each node the path of ranks from the root (node
  (0, 1): head 2's second likeliest token under head 1's likeliest); greedy verification follows
  the trunk's tokens as far as their path is in the tree."""
  a = 0
  while a < len(path) and path[:a + 1] in tree:
    a += 1
  return a


def candidate_tree(S: int, K: int, C: int = 1) -> frozenset:
  """decode.candidates = K, decode.candidate_depth = C at draft length S as a tree: the chain of
  each head's likeliest token, and beside its first draft the first head's 2nd..K-th likeliest,
  each followed by the next heads' likeliest to C drafts."""
  return frozenset([(0,) * k for k in range(1, S + 1)]
                   + [(r,) + (0,) * d for r in range(1, K) for d in range(C)])


def full_tree(widths) -> frozenset:
  """Every path with rank < widths[k - 1] at depth k: W1 first drafts, W2 under each, .."""
  return frozenset(p for k in range(1, len(widths) + 1)
                   for p in itertools.product(*(range(w) for w in widths[:k])))


def sparse_tree(paths, size: int) -> frozenset:
  """The `size` nodes the trunk's tokens reached most often over these rank paths (Medusa's
  static tree). A node is reached at least as often as each node under it, and ties go to the
  shorter path, so the nodes kept always include their parents."""
  counts = {}
  for path in paths:
    for k in range(1, len(path) + 1):
      counts[path[:k]] = counts.get(path[:k], 0) + 1
  return frozenset(sorted(counts, key=lambda p: (-counts[p], len(p), p))[:size])


def parse_tree(text: str, top: int, depth: int) -> tuple:
  """--tree's widths per depth, checked against --top (the heads' lists) and the heads' depth."""
  try:
    widths = tuple(int(w) for w in text.split(','))
  except ValueError:
    widths = ()
  if not widths or len(widths) > depth or not all(1 <= w <= top for w in widths):
    raise ValueError(f"--tree must be 1 to {depth} widths per depth 'W1,W2,..', each 1..--top "
                     f"({top}), got '{text}'")
  return widths


def _finite(text: str) -> float | None:
  """`text` as a finite number, or None."""
  try:
    value = float(text)
  except ValueError:
    return None
  return value if math.isfinite(value) else None


def parse_fraction(text: str) -> float:
  """One of --stop_below's thresholds, a number in [0, 1]."""
  theta = _finite(text)
  if theta is None or not 0.0 <= theta <= 1.0:
    raise ValueError(f"--stop_below must be numbers 'THETA,..', each in [0, 1], got '{text}'")
  return theta


def replay_options(depth: int, *, simulate: bool, top: int, trees, sparse, candidate_depth,
                   table, stop_below, prompts: int = 2) -> tuple[list, list, list, list]:
  """(tree widths, sparse tree sizes, candidate depths, stop thresholds: each once, in
  order) from --simulate's flags as given (lists of strings), or ValueError naming the flag
  that is malformed, out of range for heads of this depth or `prompts` (decode.bench_prompts),
  or given without --simulate."""
  widths = [parse_tree(t, top, depth) for t in trees]
  sizes = positive_ints(sparse, '--sparse', allow_empty=True)
  if sizes and prompts < 2:  # each half of the prompts chooses the other's tree
    raise ValueError('--sparse chooses each tree on one half of the prompts and replays it on '
                     f'the other: decode.bench_prompts={prompts} has no two halves')
  depths = positive_ints(candidate_depth, '--candidate_depth')
  if max(depths) > depth:
    raise ValueError(f'--candidate_depth must be 1..mtp.depth={depth}, got '
                     f'{",".join(candidate_depth)}')
  stops = sorted({parse_fraction(t) for t in stop_below})
  given = {'--tree': widths, '--sparse': sizes, '--candidate_depth': depths != [1],
           '--table': table, '--stop_below': stops}
  for flag, value in given.items():
    if value and not simulate:
      raise ValueError(f'{flag} is replayed by --simulate: give both')
  return widths, sizes, depths, stops


def parse_costs(values, simulate: bool) -> tuple[float, float, float] | None:
  """--price's three times (an `ar` iteration, a draft, a verify position past the first), or
  None when it is not given; ValueError when they are not three positive numbers, or are given
  without --simulate."""
  if not values:
    return None
  if not simulate:
    raise ValueError('--price is replayed by --simulate: give both')
  costs = tuple(_finite(v) for v in values)
  if len(costs) != 3 or not all(c is not None and c > 0 for c in costs):
    raise ValueError(f"--price must be three times 'AR,DRAFT,POSITION', each > 0, got "
                     f"'{','.join(values)}'")
  return costs


def priced_speedup(tau: float, drafts: float, positions: float, costs) -> float:
  """A chain's speed over `ar` when its iterations make `drafts` drafts and verify `positions`
  positions (means) and commit tau tokens, at costs = (an `ar` iteration, a draft, a verify
  position past the first) in one unit: tau x ar / (ar + draft x drafts + position x
  (positions - 1))."""
  ar, draft, position = costs
  return tau * ar / (ar + draft * drafts + position * (positions - 1))


def replay(seq: list, start: int, S: int, accept) -> tuple[int, int, list]:
  """Greedy speculative decoding of seq[start:] replayed: each iteration accepts accept(j) <= S
  drafts for seq[j], .. (given seq[:j]) and commits them and the trunk's next token, stopping at
  the end of seq as decoding stops at a stop token or max_new_tokens. Returns (tokens committed,
  iterations, accepted drafts per position)."""
  j, emitted, forwards, accepted = start, 0, 0, [0] * S
  while j < len(seq):
    a = accept(j)
    for k in range(a):
      accepted[k] += 1
    count = min(a + 1, len(seq) - j)
    emitted, forwards, j = emitted + count, forwards + 1, j + count
  return emitted, forwards, accepted


def simulate(prompts, answers, tops, depth: int, trees=(), sparse=(), branch_depths=(1,),
             table: dict | None = None, sure=None, stops=()) -> dict:
  """{(drafter, S): (tokens committed, iterations, accepted per position, positions a verify
  forward takes with the pending token)} over every answer, for each of DRAFTERS and
  S = 1..depth, for ('candidates K', S) with K = 2..the tops' width (and ('candidates K, depth C', S)
  for each C > 1 in branch_depths up to S: decode.candidate_depth), for ('tree W1,W2,..',
  len(widths)) for each widths tuple in `trees`, and for ('sparse tree N', depth) for each N in
  `sparse` (its nodes from the rank paths of every answer position of the prompts of the other
  parity), and with a continuation `table` for each of TABLE_DRAFTERS and S = 1..depth; tops[i]
  are prompt i's heads' top tokens (greedy_agreement's tops_out). For each theta in `stops` and
  S = 1..depth, (f'stop below {theta:g}', S) holds chains of at most S drafts cut by
  confident_length from sure[i], prompt i's heads' teacher-forced probabilities of their tokens
  (greedy_agreement's sure_out), with the mean positions verified and, fifth, drafts made per
  iteration: tau and acceptance are exact, those means approximate (after a wrong draft the
  decoder's next head reads that draft, not the true token, and gives another probability;
  what it accepts is the same). Decoding commits an
  answer's first token at prefill, then drafts from the pending token on: head k at position
  j - 2 drafts seq[j + k - 1]."""
  totals, cut = {}, {}  # cut: the cut chains' sums, made means per iteration at the end

  def add(key, positions, got):  # a sparse tree may have fewer nodes in one half: the most
    e, f, acc, most = totals.get(key, (0, 0, [0] * len(got[2]), positions))
    totals[key] = (e + got[0], f + got[1], [x + y for x, y in zip(acc, got[2])],
                   max(most, positions))

  seqs = [list(p) + list(a) for p, a in zip(prompts, answers)]
  starts = [len(p) + 1 for p in prompts]
  # Where the trunk's tokens from each drafting position on stand in the heads' lists.
  paths = [[rank_path(seq, j, [t[j - 2] for t in top]) for j in range(start, len(seq))]
           for seq, top, start in zip(seqs, tops, starts)]
  for i, (seq, top, start) in enumerate(zip(seqs, tops, starts)):

    def drafts(name, j, S):
      heads = [int(t[j - 2, 0]) for t in top[:S]]
      if name == 'heads':
        return heads
      other = table_drafts(table, seq, j, S) if 'table' in name else copy_drafts(seq, j, S)
      if name in ('copy', 'table'):
        return other
      if name == 'copy, else heads':
        return other or heads
      return max(heads, other, key=lambda d: accepted_run(seq, j, d))  # either of the two

    def add_tree(name, S, tree):
      add((name, S), 1 + len(tree),
          replay(seq, start, S, lambda j: tree_run(paths[i][j - start], tree)))

    for S in range(1, depth + 1):
      for name in DRAFTERS + (TABLE_DRAFTERS if table is not None else ()):
        chain = lambda j, name=name, S=S: accepted_run(seq, j, drafts(name, j, S))  # noqa: E731
        add((name, S), S + 1, replay(seq, start, S, chain))
      for K in range(2, top[0].shape[1] + 1):
        for C in (C for C in branch_depths if C <= S):
          add_tree(f'candidates {K}' + (f', depth {C}' if C > 1 else ''), S,
                   candidate_tree(S, K, C))
      for theta in stops:
        key = (f'stop below {theta:g}', S)
        totals.setdefault(key, None)  # its place among the rows
        sums = cut.setdefault(key, [0, 0, [0] * S, 0, 0])

        def confident(j, S=S, theta=theta, sums=sums):
          made, verified = confident_length([float(p[j - 2]) for p in sure[i][:S]], theta)
          sums[3] += 1 + verified  # the pending token and the drafts verified
          sums[4] += made
          return accepted_run(seq, j, [int(t[j - 2, 0]) for t in top[:verified]])

        emitted, forwards, accepted = replay(seq, start, S, confident)
        sums[:3] = [sums[0] + emitted, sums[1] + forwards,
                    [x + y for x, y in zip(sums[2], accepted)]]
    for widths in trees:
      add_tree(f'tree {",".join(map(str, widths))}', len(widths), full_tree(widths))
    others = [path for q in range(len(seqs)) if q % 2 != i % 2 for path in paths[q]]
    for n in sparse:
      add_tree(f'sparse tree {n}', depth, sparse_tree(others, n))
  for key, (emitted, forwards, accepted, positions, made) in cut.items():
    totals[key] = (emitted, forwards, accepted, positions / max(forwards, 1),
                   made / max(forwards, 1))
  return totals


def check_cache(directory: str, feature_layers: tuple) -> None:
  """A --cache to count on: a finished feature cache that keeps the blocks the heads read
  (mtp.feature_layers); ValueError otherwise."""
  from mtp_jax import features
  found = features.load(directory)
  if found is None or not found['valid'].has_features:
    raise ValueError(f'--cache: {directory} is not a finished feature cache')
  kept = features.meta(directory)['spec'].get('feature_layers', [])
  if tuple(kept) != tuple(feature_layers):
    raise ValueError(f'--cache: {directory} keeps the features of blocks {kept}, the heads read '
                     f'{list(feature_layers)} (mtp.feature_layers)')


def draft_ids(session):
  """The token ids the heads draft over (decode.draft_vocab of the session's token ranking), or
  None for the whole vocabulary."""
  import numpy as np
  rank, n = session.token_rank(), session.config.decode.draft_vocab
  return None if not n or rank is None else np.asarray(rank[:n])


def cache_agreement(session, params, directory: str, draft_ids, top: int = 1,
                    answer_split: int = 0) -> dict:
  """Sums as `count` keeps them over the cache's valid split, from its h0 (as training reads it),
  against the trunk's top token it kept; positions of the user turn (before the chat template's
  assistant header) are 'prompt', the rest 'answer' (split as `answer_part` splits them)."""
  import numpy as np
  from mtp_jax import features as feat_lib
  from mtp_jax import selfdata
  split, D = feat_lib.load(directory)['valid'], session.cfg.mtp_depth
  frame = selfdata.Trunk(model=None, params=None, tokenizer=session.tokenizer,
                         eos_id=session.eos_id, bos_id=None, chat_template=session.chat_template,
                         stop_ids=session.stop_ids)
  after = selfdata.chat_frame(frame)[1]
  starts = np.flatnonzero(split.row_start).tolist() + [len(split.tokens)]
  L = max(b - a for a, b in zip(starts[:-1], starts[1:]))
  fn, sums = head_tokens(session, params, draft_ids, top), {}
  for a, b in zip(starts[:-1], starts[1:]):
    row = np.asarray(split.tokens[a:b])
    # The answer starts after the first assistant header (a row cut short may have none).
    opens = [j + len(after) for j in range(len(row) - len(after) + 1)
             if after and row[j:j + len(after)].tolist() == after]
    answer = opens[0] if opens else len(row)
    tokens = np.zeros((1, L + D + 1), np.int32)
    tokens[0, :len(row)] = row
    h0 = np.zeros((1, L, split.h0.shape[1]), np.float32)
    h0[0, :len(row)] = np.asarray(split.h0[a:b], np.float32)
    want = np.concatenate([[-1], np.asarray(split.top_ids[a:b, 0])])  # token j from position j-1
    in_answer = answer_part(answer, answer_split)
    count(fn(tokens, h0)[0], want, 1, len(row), sums,
          part=lambda j, k, in_answer=in_answer: in_answer(j, k) if j >= answer else 'prompt')
  return sums


def main(argv):
  cli.start(argv)
  cli.output_file(_JSON.value, '--json')
  from mtp_jax import data as data_lib
  from mtp_jax import decode as dec
  from mtp_jax import inference
  from mtp_jax import measure, run, train
  from mtp_jax.config import ConfigError
  config = _CONFIG.value
  try:
    if config.mtp.depth < 1:
      raise ConfigError('mtp.depth=0: there are no heads to score')
    trees, sparse, depths, stops = replay_options(
        config.mtp.depth, simulate=_SIMULATE.value, top=_TOP.value, trees=_TREE.value,
        sparse=_SPARSE.value, candidate_depth=_DEPTHS.value, table=_TABLE.value,
        stop_below=_STOP_BELOW.value, prompts=config.decode.bench_prompts)
    table_splits = table_sources(_TABLE.value)
    costs = parse_costs(_PRICE.value, _SIMULATE.value)
    if _BY_CONFIDENCE.value + _BY_HEAD_CONFIDENCE.value + (_ANSWER_SPLIT.value > 0) > 1:
      raise ConfigError('--by_confidence, --by_head_confidence and --answer_split split the same '
                        'positions in different ways: give one')
    if _ANSWER_SPLIT.value < 0:
      raise ConfigError(f'--answer_split must be >= 0, got {_ANSWER_SPLIT.value}')
    session = train.Session(config, _WORKDIR.value, data=False, reads='bench')
    # the flags against the model, before its params are made
    drafts = config.decode.draft_vocab or session.cfg.vocab_size
    if _TOP.value > drafts:
      raise ConfigError(f'--top {_TOP.value}: the heads draft over {drafts} tokens')
    if _CACHE.value:
      check_cache(_CACHE.value, session.cfg.feature_layers)
    _, params = inference.load_params(session)
    ids = draft_ids(session)
    prompts = inference.held_out_prompts(session, config.decode.bench_prompts)
  except (*run.USER_ERRORS, ValueError) as e:  # a missing checkpoint too
    cli.fail(e)
  rows = {}
  missed = [] if _MISSES.value else None
  by = 'trunk' if _BY_CONFIDENCE.value else 'head' if _BY_HEAD_CONFIDENCE.value else ''
  tops = [] if _SIMULATE.value else None
  sure = [] if _SIMULATE.value else None
  sums, answers = greedy_agreement(session, params, prompts, ids, _TOP.value, by, missed,
                                   tops, _ANSWER_SPLIT.value, sure)
  rows['greedy answers to held-out prompts'] = sums
  if _CACHE.value:
    rows[f'valid split of {_CACHE.value}'] = cache_agreement(session, params, _CACHE.value,
                                                             ids, _TOP.value,
                                                             _ANSWER_SPLIT.value)
  print(f'machine: {measure.machine()}')
  print(f'heads: depth {config.mtp.depth}, draft vocabulary '
        f'{"all" if ids is None else len(ids)} tokens, agreeing when the trunk\'s '
        f'token is among the top {_TOP.value}; {len(prompts)} held-out prompts answered greedily')
  out = []
  for name, s in rows.items():
    for part in sorted({p for p, _ in s}):
      # A part may hold no position of a deeper head (depth k starts k tokens into an answer).
      got = [s.get((part, k), [0, 0]) for k in range(1, config.mtp.depth + 1)]
      rates = [agree / max(n, 1) for agree, n in got]
      counted = [n for _, n in got]
      print(f'{name}, {part} positions: agreement per depth '
            f'{" / ".join(f"{r:.3f}" for r in rates)} ({" / ".join(map(str, counted))} positions)')
      out.append({'data': name, 'positions': part, 'agreement': rates, 'counted': counted})
  if missed:
    print(f'first head\'s misses where the trunk was surest ({_MISSES.value} of {len(missed)}): '
          'the text before, the trunk\'s token (its probability) | the head\'s')
    text = functools.partial(data_lib.decode, session.tokenizer)
    for p_trunk, i, j, head in sorted(missed, reverse=True)[:_MISSES.value]:
      seq = prompts[i] + answers[i]
      print(f'  {text(seq[max(j - 6, 0):j])!r} -> {text([seq[j]])!r} ({p_trunk:.2f}) | '
            f'{text([head])!r}')
  replayed = []
  if tops is not None:
    table = continuation_table(table_splits) if table_splits else None
    if table is not None:
      print(f'continuation table: {len(table)} contexts of 1 to {TABLE_CONTEXT} tokens from '
            f'{sum(len(s.tokens) for s in table_splits)} positions of {",".join(_TABLE.value)}')
    print('greedy decoding of the answers replayed (tau: tokens per trunk forward; acceptance per '
          'draft position):')
    for (name, S), (emitted, forwards, accepted, positions, *made) in simulate(
        prompts, answers, tops, config.mtp.depth, trees, sparse, depths, table, sure,
        stops).items():
      rates = dec.rates(emitted, forwards, accepted)
      counts = (f'{positions:.3f} verify positions and {made[0]:.3f} drafts an iteration' if made
                else f'{positions} verify positions')
      # The heads' chains are priced: fixed (S drafts) and cut (their means).
      priced = (priced_speedup(rates['tau'], made[0] if made else S, positions, costs)
                if costs and (made or name == 'heads') else None)
      print(f'  S = {S}, {name} ({counts}): tau {rates["tau"]:.3f}, '
            f'acceptance {" / ".join(f"{r:.3f}" for r in rates["acceptance_per_position"])}'
            + (f', priced {priced:.3f}x ar' if priced else ''))
      # A cut chain's verify positions and drafts are means per iteration; others', counts.
      replayed.append({'drafter': name, 'draft_len': S, 'verify_positions': positions,
                       **({'drafts_made': made[0]} if made else {}),
                       **({'priced_speedup': priced} if priced else {}), **rates})
  if _JSON.value:
    atomic.write_json(_JSON.value, {'machine': measure.machine(), 'rows': out,
                                    'replayed': replayed}, indent=2)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.flags_parser(_CONFIG))
