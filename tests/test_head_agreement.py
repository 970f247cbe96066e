"""experiments/head_agreement.py counts each head against the right token: Medusa heads at their
zero initialization are the trunk's own output layer, so head k at position i drafts the trunk's
next token t_{i+1}, and its agreement must be how often that equals the token k positions later,
and its confidence the trunk's at i; on a feature cache, the user turn and the answer are told
apart at the assistant header. Contradicting flags are one line and exit 2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import head_agreement  # experiments/, on the path conftest sets
from conftest import pretrained_config, random_llama, run_script, write_gguf
from mtp_jax import features as feat_lib
from mtp_jax import inference, selfdata, train


def medusa_at_init(tmp_path, prompts: list[str], max_new_tokens: int):
  """(config, session, params, token prompts): a tiny random Llama whose two Medusa heads are at
  their zero initialization (each the trunk's own output layer), with these held-out prompts."""
  path = write_gguf(tmp_path / 'tiny.gguf', random_llama())
  prompts_file = tmp_path / 'prompts.txt'
  prompts_file.write_text(''.join(p + '\n' for p in prompts))
  config = pretrained_config(path, **{'mtp.kind': 'medusa', 'mtp.init_from': '',
                                      'decode.prompts': str(prompts_file),
                                      'decode.max_new_tokens': max_new_tokens})
  session = train.Session(config, str(tmp_path / 'run'), data=False)
  _, params = inference.load_params(session)
  return config, session, params, inference.held_out_prompts(session, len(prompts))


def test_heads_are_scored_against_the_token_they_draft(tmp_path):
  _, session, params, prompts = medusa_at_init(tmp_path, ['hello there', 'what is a cat'], 12)
  sums, answers = head_agreement.greedy_agreement(session, params, prompts, None)
  sums3, _ = head_agreement.greedy_agreement(session, params, prompts, None, top=3)

  # Head k agrees (--top N) when t_{i+k+1} is among the trunk's N most likely next tokens at i.
  model = session.decode_model
  want = {1: {}, 3: {}}
  sure = []  # the trunk's probability of its top token at each position, per prompt
  for p, a in zip(prompts, answers):
    seq = np.array(p + a)
    logits, _, _ = model.trunk(model.prepare(params), jnp.asarray(seq)[None],
                               jnp.arange(len(seq))[None], None)
    ranked = np.argsort(-np.asarray(logits[0]), axis=-1, kind='stable')
    sure.append(np.asarray(jnp.max(jax.nn.softmax(logits[0], axis=-1), axis=-1)))
    for top in (1, 3):
      for k in (1, 2):
        js = np.arange(len(p) + k, len(seq))  # drafts from the last prompt position on
        w = want[top].setdefault(k, [0, 0])
        w[0] += int(np.sum(np.any(ranked[js - k - 1, :top] == seq[js, None], axis=-1)))
        w[1] += len(js)
  assert {k: sums[('answer', k)] for k in (1, 2)} == want[1]
  assert {k: sums3[('answer', k)] for k in (1, 2)} == want[3]
  assert want[1][1][1] == sum(len(a) - 1 for a in answers)
  assert want[3][1][0] > want[1][1][0]

  # --by_confidence splits the same counts by the trunk's probability of the drafted token.
  split, _ = head_agreement.greedy_agreement(session, params, prompts, None, by='trunk')
  labels = {head_agreement.confidence_bucket(p) for p in (0.1, 0.4, 0.6, 0.8, 0.95)}
  assert len(labels) == 5 and {part for part, _ in split} <= labels
  for k in (1, 2):
    parts = [v for (part, depth), v in split.items() if depth == k]
    assert [sum(v[0] for v in parts), sum(v[1] for v in parts)] == sums[('answer', k)]
  assert head_agreement.confidence_bucket(0.5) == 'trunk p in [0.5, 0.7)'
  assert head_agreement.confidence_bucket(1.0) == 'trunk p in [0.9, 1.0]'

  # by='head' splits them by the head's probability of its own top token. These heads are the
  # trunk's output layer, so head k drafting token j (from position j - k - 1) is as sure as
  # the trunk was at that position: each bucket holds exactly those positions.
  by_head, _ = head_agreement.greedy_agreement(session, params, prompts, None, by='head')
  for k in (1, 2):
    expected = {}
    for p, a, trunk_sure in zip(prompts, answers, sure):
      for j in range(len(p) + k, len(p) + len(a)):
        label = head_agreement.confidence_bucket(trunk_sure[j - k - 1], 'head')
        expected[label] = expected.get(label, 0) + 1
    got = {part: v[1] for (part, depth), v in by_head.items() if depth == k}
    assert got == expected
    parts = [v for (part, depth), v in by_head.items() if depth == k]
    assert [sum(v[0] for v in parts), sum(v[1] for v in parts)] == sums[('answer', k)]
  assert head_agreement.confidence_bucket(0.2, 'head') == 'head p in [0.0, 0.3)'

  # answer_split=N splits them into each answer's first N tokens and the rest.
  halves, _ = head_agreement.greedy_agreement(session, params, prompts, None, answer_split=5)
  for k in (1, 2):
    first = sum(j - len(p) < 5 for p, a in zip(prompts, answers)
                for j in range(len(p) + k, len(p) + len(a)))
    early, late = halves[('answer tokens 1-5', k)], halves[('answer tokens past 5', k)]
    assert 0 < early[1] == first and late[1] == sums[('answer', k)][1] - first
    assert early[0] + late[0] == sums[('answer', k)][0]

  # `missed` lists the first head's misses: the trunk's token is not the head's top one.
  missed = []
  head_agreement.greedy_agreement(session, params, prompts, None, missed=missed)
  assert len(missed) == sums[('answer', 1)][1] - sums[('answer', 1)][0] > 0
  for _, i, j, head in missed:
    assert (prompts[i] + answers[i])[j] != head and j > len(prompts[i])

  # A cache the trunk wrote: every row's positions are split at its assistant header.
  builder = feat_lib.Builder(str(tmp_path / 'cache'), {'test': 1}, features=True)
  selfdata.write_chats(session.data_trunk(), builder, tokens=60, temperature=1.0, answer_len=6,
                       topk=4, seed=0, valid_fraction=0.5)
  directory = builder.directory
  builder.finish()
  cache = head_agreement.cache_agreement(session, params, directory, None)
  valid = feat_lib.load(directory)['valid']
  rows = np.split(np.asarray(valid.tokens), np.flatnonzero(valid.row_start)[1:])
  after = selfdata.chat_frame(session.data_trunk())[1]
  answer_starts = [next(j + len(after) for j in range(len(r)) if r[j:j + len(after)].tolist()
                        == after) for r in rows]
  for k in (1, 2):
    assert cache[('prompt', k)][1] == sum(s - 1 - k for s in answer_starts)
    assert cache[('answer', k)][1] == sum(len(r) - s for r, s in zip(rows, answer_starts))
    assert 0 <= cache[('answer', k)][0] <= cache[('answer', k)][1]
  halves = head_agreement.cache_agreement(session, params, directory, None, answer_split=2)
  for k in (1, 2):
    early = sum(min(2, len(r) - s) for r, s in zip(rows, answer_starts))
    assert halves[('answer tokens 1-2', k)][1] == early
    assert halves[('answer tokens past 2', k)][1] == cache[('answer', k)][1] - early
    assert halves[('prompt', k)] == cache[('prompt', k)]


@pytest.mark.parametrize('flags', [('--by_confidence', '--by_head_confidence'),
                                   ('--by_head_confidence', '--answer_split=64')])
def test_two_splits_are_refused(tmp_path, flags):
  proc = run_script('experiments/head_agreement.py', *flags, f'--workdir={tmp_path / "run"}')
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith(
      'error: --by_confidence, --by_head_confidence and --answer_split split the same positions')
  assert not (tmp_path / 'run').exists()


def test_copy_drafts_and_replay_by_hand():
  seq = [5, 6, 7, 8, 5, 6, 7, 8, 9]
  # seq[:6] ends in 8 5 6 (seen nowhere before), then 5 6 (at 0): what followed it, up to j.
  assert head_agreement.copy_drafts(seq, 6, 3) == [7, 8, 5]
  assert head_agreement.copy_drafts(seq, 6, 1) == [7]
  assert head_agreement.copy_drafts(seq, 3, 3) == []  # 6 7 and 5 6 7 occur nowhere earlier
  # A copy of repeated text goes on through its own drafts.
  assert head_agreement.copy_drafts([1, 2, 1, 2, 1, 2], 6, 4) == [1, 2, 1, 2]
  # From j = 6: 7 and 8 are accepted, 5 is not; the trunk's 9 is committed with them.
  copied = lambda j: head_agreement.accepted_run(seq, j, head_agreement.copy_drafts(seq, j, 3))
  assert head_agreement.replay(seq, 6, 3, copied) == (3, 1, [1, 1, 0])
  # Nothing accepted: one token per iteration.
  assert head_agreement.replay(seq, 4, 2, lambda j: 0) == (5, 5, [0, 0])
  # A tree follows the true path (here ranks 1, then 0, then none) as far as it has the nodes.
  lists = [np.array([1, 7, 2]), np.array([8, 3, 0]), np.array([4, 4, 4])]
  path = head_agreement.rank_path(seq, 6, lists)
  assert path == (1, 0)
  full = head_agreement.full_tree
  assert head_agreement.tree_run(path, full((1, 1, 1))) == 0
  assert head_agreement.tree_run(path, full((2, 1, 3))) == 2
  assert head_agreement.tree_run(path, full((2, 1))) == 2
  assert head_agreement.tree_run(path, {(0,), (1,), (0, 0)}) == 1
  assert head_agreement.candidate_tree(2, 3) == {(0,), (0, 0), (1,), (2,)}
  assert head_agreement.candidate_tree(3, 3, 2) == {(0,), (0, 0), (0, 0, 0), (1,), (1, 0), (2,),
                                                    (2, 0)}
  assert head_agreement.tree_run(path, head_agreement.candidate_tree(3, 2, 2)) == 2
  assert head_agreement.tree_run(path, head_agreement.candidate_tree(3, 2)) == 1
  assert head_agreement.candidate_tree(3, 4, 3) == full((4, 1, 1))
  assert len(full((3, 2, 1))) == 3 + 6 + 6 and (2, 1, 0) in full((3, 2, 1))
  # A sparse tree keeps the nodes reached most often, a node before those under it on a tie.
  paths = [(0,), (0, 1), (1,), (0, 1, 2), (0,)]
  assert head_agreement.sparse_tree(paths, 2) == {(0,), (0, 1)}
  assert head_agreement.sparse_tree(paths, 3) == {(0,), (0, 1), (1,)}
  assert head_agreement.sparse_tree(paths, 9) == {(0,), (0, 1), (1,), (0, 1, 2)}


def test_continuation_table_and_its_drafts_by_hand(tmp_path):
  """The table keys every 1 to 3 tokens ending a position within its row (never across a row
  start, never a row's last position, where the trunk kept no distribution) with the trunk's
  commonest next token there, and drafts from the longest context it holds; replayed beside the
  heads, 'either (table)' takes whichever is accepted further at each iteration."""
  # Two rows: 1 2 3 7 | 2 3 4 5 6; the trunk's top next token at each position (0 at row ends).
  split = feat_lib.Split(tokens=np.array([1, 2, 3, 7, 2, 3, 4, 5, 6], np.int32),
                         row_start=np.array([1, 0, 0, 0, 1, 0, 0, 0, 0], bool),
                         top_ids=np.array([[2], [3], [9], [0], [3], [4], [5], [6], [0]], np.int32))
  table = head_agreement.continuation_table([split])
  assert table[(1,)] == 2 and table[(1, 2)] == 3 and table[(1, 2, 3)] == 9
  assert table[(3,)] == 9 and table[(2, 3)] == 9  # a tie (9, then 4): the first seen
  assert table[(2, 3, 4)] == 5 and table[(4, 5)] == 6 and table[(2,)] == 3
  assert not {(7,), (3, 7), (6,), (5, 6), (4, 5, 6)} & set(table)  # rows' last positions
  assert (7, 2) not in table and (3, 7, 2) not in table  # across the row start
  # Drafts: after ..1 2 3 the 3-token context gives 9, then 9 alone is unknown: one draft.
  assert head_agreement.table_drafts(table, [8, 1, 2, 3], 4, 3) == [9]
  # After ..8 2 3 4: 2 3 4 -> 5, then 3 4 5 -> 6.
  assert head_agreement.table_drafts(table, [8, 2, 3, 4], 4, 2) == [5, 6]
  assert head_agreement.table_drafts(table, [8, 7], 2, 2) == []
  # Replayed: the answer 4 5 6 7 after 2 3. Decoding commits 4 at prefill, then drafts from
  # j = 3: the table's 5 (after 2 3 4) is accepted and 6 commits with it; from j = 5 it knows no
  # context. The heads draft 7 at j = 5 (right) and 0 elsewhere.
  prompts, answers = [[2, 3]], [[4, 5, 6, 7]]
  tops = [[np.array([[0], [0], [0], [7], [0], [0]], np.int32)]]
  replayed = head_agreement.simulate(prompts, answers, tops, 1, table=table)
  assert replayed[('table', 1)][:3] == (3, 2, [1])
  assert replayed[('heads', 1)][:3] == (3, 3, [1])  # 5, then 6, then 7 with its draft
  assert replayed[('either (table)', 1)][:3] == (3, 2, [2])  # the table at j = 3, heads at 5
  assert ('table', 1) not in head_agreement.simulate(prompts, answers, tops, 1)
  # The caches a table is built from: finished, and holding the trunk's tokens.
  with pytest.raises(ValueError, match='is not a finished feature cache'):
    head_agreement.table_sources([str(tmp_path / 'none')])
  builder = feat_lib.Builder(str(tmp_path / 'tokens'), {'test': 0}, features=False)
  builder.add(0, [{'tokens': np.arange(4)}, {'tokens': np.arange(3)}], [False, True], 0.0)
  builder.finish()
  with pytest.raises(ValueError, match=r'keeps no trunk tokens \(top_ids\)'):
    head_agreement.table_sources([str(tmp_path / 'tokens')])


def test_drafting_stops_where_the_heads_are_unsure():
  """A chain cut by the heads' confidence makes the draft whose product of probabilities falls
  below theta but verifies only those before it; replayed, a theta of 0 is the fixed chain, and
  the means are over every iteration of every answer, counting the pending token among the
  positions verified."""
  length = head_agreement.confident_length
  assert length([0.9, 0.5, 0.9], 0.0) == (3, 3)
  assert length([0.9, 0.5, 0.9], 0.4) == (3, 3)  # 0.9, 0.45, 0.405
  assert length([0.9, 0.5, 0.9], 0.42) == (3, 2)
  assert length([0.9, 0.5, 0.9], 0.5) == (2, 1)
  assert length([0.3, 0.9], 0.5) == (1, 0)
  # Two prompts with the answer 4 5 .. 10 after 2 3; both heads draft the true tokens. Head k at
  # position j - 2 drafts token j + k - 1, with its probability at index j - 2.
  prompts, answers = [[2, 3], [2, 3]], [[4, 5, 6, 7, 8, 9, 10]] * 2
  seq = prompts[0] + answers[0]
  nxt = lambda k: np.array([[seq[i + k + 1] if i + k + 1 < len(seq) else 0]  # noqa: E731
                            for i in range(len(seq))], np.int32)
  tops = [[nxt(1), nxt(2)]] * 2
  first = [np.array([.5, .9, .5, .3, .9, .5, .5, .5, .5]),
           np.array([.5, .4, .5, .5, .9, .5, .5, .5, .5])]
  sure = [first, [np.full(len(seq), 0.9)] * 2]
  replayed = head_agreement.simulate(prompts, answers, tops, 2, sure=sure, stops=[0.0, 0.5])
  assert replayed[('stop below 0', 2)] == replayed[('heads', 2)][:3] + (3.0, 2.0)
  # theta 0.5, prompt 0: from j = 3, 0.9 x 0.4 < 0.5: two drafts made, one verified and accepted
  # (5; 6 commits with it); from j = 5, 0.3: one made, none verified (7 commits); from j = 6,
  # 0.81: both verified and accepted (8, 9; 10 commits). Prompt 1 (0.81 everywhere): j = 3
  # and j = 6, two drafts each, all accepted. Means: 12 positions and 9 drafts, 5 iterations.
  assert replayed[('stop below 0.5', 2)] == (12, 5, [4, 3], 12 / 5, 9 / 5)
  assert replayed[('stop below 0', 1)][:3] == replayed[('heads', 1)][:3]
  # Priced: tau 12 / 5 at 2 + 1.8 x 0.5 + 1.4 x 0.25 against an ar iteration of 2.
  assert head_agreement.priced_speedup(12 / 5, 9 / 5, 12 / 5, (2.0, 0.5, 0.25)) == (
      pytest.approx(12 / 5 * 2 / (2 + 0.9 + 0.35)))
  assert head_agreement.parse_costs([], False) is None
  assert head_agreement.parse_costs(['5.7', '0.47', '0.69'], True) == (5.7, 0.47, 0.69)
  for bad in (['5.7', '0.47'], ['5.7', 'x', '0.69'], ['5.7', '0', '0.69'], ['inf', '0.47', '0.69']):
    with pytest.raises(ValueError, match='--price must be three times'):
      head_agreement.parse_costs(bad, True)
  with pytest.raises(ValueError, match='--price is replayed by --simulate'):
    head_agreement.parse_costs(['5.7', '0.47', '0.69'], False)


def test_sparse_trees_are_chosen_on_the_other_prompts():
  """A sparse tree is built from the prompts of the other parity: here the trunk's tokens are
  always the first head's second choice in prompt 0 and its first in prompt 1, so a one-node
  tree chosen on the other prompt is never accepted, and no tree holds a node the other prompt's
  tokens never reached."""
  prompts, answers = [[1, 2, 3], [1, 2, 3]], [[4, 5, 6, 7], [4, 5, 6, 7]]
  seq = prompts[0] + answers[0]
  nxt = [seq[i + 2] if i + 2 < len(seq) else 0 for i in range(len(seq))]
  tops = [[np.array([[99, t] for t in nxt])], [np.array([[t, 99] for t in nxt])]]
  replayed = head_agreement.simulate(prompts, answers, tops, 1, sparse=[1, 2])
  assert replayed[('sparse tree 1', 1)][2] == [0]
  assert replayed[('heads', 1)][2] == [2]  # prompt 1's two first drafts
  assert replayed[('sparse tree 1', 1)][3] == 2  # the pending token and one draft
  assert replayed[('sparse tree 2', 1)] == replayed[('sparse tree 1', 1)]
  assert replayed[('candidates 2', 1)][2] == [4]  # both first choices in the tree: all accepted


def test_replay_counts_what_the_decoder_counts(tmp_path):
  """The heads' replay commits as many tokens in as many iterations as the decoder does with the
  same heads, at every S and with first-draft candidates: Medusa heads at their zero
  initialization draft the trunk's token at the position they read, which is accepted wherever
  the text repeats a token."""
  import dataclasses
  from mtp_jax import decode as dec
  config, session, params, prompts = medusa_at_init(
      tmp_path, ['hello there', 'what is a cat', 'the the the the'], 24)
  tops = []
  _, answers = head_agreement.greedy_agreement(session, params, prompts, None, top=3,
                                               tops_out=tops)
  replayed = head_agreement.simulate(prompts, answers, tops, 2, trees=[(1, 1), (3,), (3, 2)],
                                     sparse=[4], branch_depths=(1, 2))
  assert set(replayed) == ({(d, S) for d in head_agreement.DRAFTERS for S in (1, 2)}
                           | {(f'candidates {K}', S) for K in (2, 3) for S in (1, 2)}
                           | {(f'candidates {K}, depth 2', 2) for K in (2, 3)}
                           | {('tree 1,1', 2), ('tree 3', 1), ('tree 3,2', 2),
                              ('sparse tree 4', 2)})
  for S, K, C in [(1, 1, 1), (1, 2, 1), (1, 3, 1), (2, 1, 1), (2, 2, 1), (2, 3, 1), (2, 3, 2)]:
    s = dataclasses.replace(
        inference.settings(config, draft=S, temperature=0.0, stop_ids=session.stop_ids),
        candidates=K, candidate_depth=C)
    state, _ = inference.decode(session, params, prompts, s)
    assert dec.outputs(state) == answers
    got = dec.stats(state, s)
    name = 'heads' if K == 1 else f'candidates {K}' + (f', depth {C}' if C > 1 else '')
    emitted, forwards, accepted, positions = replayed[(name, S)]
    assert (emitted, forwards, positions) == (got['emitted'], got['forwards'],
                                              1 + S + (K - 1) * C)
    # The decoder also counts drafts its last iteration accepted past an answer's end.
    assert all(0 <= g - a <= len(prompts) for g, a in zip(got['accepted'], accepted))
  for S in (1, 2):
    assert replayed[('heads', S)][2][0] > 0
    assert replayed[('candidates 3', S)][:3] != replayed[('heads', S)][:3]  # runners-up won
  # A tree of one token per depth is the chain, and one level of K is K candidates at S = 1
  # (both checked against the decoder above).
  assert replayed[('tree 1,1', 2)] == replayed[('heads', 2)][:3] + (3,)
  assert replayed[('tree 3', 1)] == replayed[('candidates 3', 1)]


def test_bad_replay_flags_are_refused(tmp_path):
  """Each malformed --simulate flag, or one given without --simulate, is a ValueError naming it
  (checked here in-process); from the command line such an error is one line and exit 2 before
  anything is written, as the three runs below check for each kind of check."""
  def refused(words, depth=3, **flags):
    given = dict(simulate=True, top=1, trees=[], sparse=[], candidate_depth=['1'], table=[],
                 stop_below=[])
    given.update(flags)
    with pytest.raises(ValueError, match=words):
      head_agreement.replay_options(depth, **given)

  refused('--tree must be', top=2, trees=['3,1'])
  refused('--tree must be', trees=['1,x'])
  refused('--tree must be', depth=1, trees=['1,1'])
  refused('--tree is replayed by --simulate', simulate=False, trees=['1'])
  refused('--sparse takes positive integers', sparse=['4', '0'])
  refused('--sparse is replayed by --simulate', simulate=False, sparse=['4'])
  refused('decode.bench_prompts=1 has no two halves', sparse=['4'], prompts=1)
  refused('--candidate_depth takes positive integers', candidate_depth=['0'])
  refused('--candidate_depth must be', depth=2, candidate_depth=['3'])
  refused('--candidate_depth takes positive integers, got none', candidate_depth=[])
  refused('--candidate_depth is replayed by --simulate', simulate=False, candidate_depth=['2'])
  refused('--table is replayed by --simulate', simulate=False, table=[str(tmp_path)])
  refused('--stop_below must be', stop_below=['0.2', '2'])
  refused('--stop_below must be', stop_below=['nan'])
  refused('--stop_below is replayed by --simulate', simulate=False, stop_below=['0.2'])
  assert head_agreement.replay_options(
      3, simulate=True, top=3, trees=['3,2'], sparse=['4'], candidate_depth=['1', '2'], table=[],
      stop_below=['0', '0.3']) == ([(3, 2)], [4], [1, 2], [0.0, 0.3])
  for args, words in ((['--simulate', '--tree=1,x'], '--tree must be'),
                      (['--sparse=4'], '--sparse is replayed by --simulate'),
                      (['--simulate', '--table=' + str(tmp_path / 'none')],
                       f'--table: {tmp_path / "none"} is not a finished feature cache')):
    proc = run_script('experiments/head_agreement.py', *args, f'--workdir={tmp_path / "run"}')
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith('error: ' + words)
  assert not (tmp_path / 'run').exists()
