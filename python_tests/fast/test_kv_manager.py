"""The C++ KV-cache manager and its pure-Python twin: identical behaviour, sound bookkeeping.

A hypothesis state machine drives long random sequences of new/fork/append/trim/free on both
managers at once, and after every step checks that they agree exactly, that every block is
owned exactly as often as its refcount says (no leak, no double ownership), and that the
rows each stream reads through its blocks are the rows it wrote (copy-on-write is correct).
"""
import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule)

from calm_fast._C import KVManager
from calm_fast.errors import CacheFullError, UnknownStreamError
from calm_fast.fast.kv_manager_py import PyKVManager

BACKENDS = [KVManager, PyKVManager]


def call_both(managers, name, *args):
    """Run one operation on every manager; results (or error type+message) must agree."""
    outcomes = []
    for m in managers:
        try:
            outcomes.append(("ok", getattr(m, name)(*args)))
        except Exception as e:  # noqa: BLE001 - the exception itself is compared
            outcomes.append(("err", type(e), str(e)))
    first = outcomes[0]
    for other in outcomes[1:]:
        assert first[0] == other[0], (name, args, outcomes)
        if first[0] == "err":
            assert first[1:] == other[1:], (name, args, outcomes)
        elif isinstance(first[1], tuple):
            for a, b in zip(first[1], other[1]):
                np.testing.assert_array_equal(a, b)
        else:
            assert first[1] == other[1], (name, args, outcomes)
    return first


def snapshot(m):
    return (
        m.num_free_blocks,
        [(s, m.blocks(s), m.start(s), m.length(s), m.position(s)) for s in m.streams()],
        [m.refcount(b) for b in range(m.num_blocks)],
    )


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.ms = None

    @precondition(lambda self: self.ms is None)
    @rule(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 3, 4, 8]))
    def init(self, num_blocks, block_size):
        self.bs = block_size
        self.ms = [KVManager(num_blocks, block_size), PyKVManager(num_blocks, block_size)]
        # Simulated K/V storage per manager, and what each stream should read back.
        self.store = [np.full(num_blocks * block_size, -1, np.int64) for _ in self.ms]
        self.expected: dict[int, list[int]] = {}
        self.counter = 0

    def streams(self):
        return sorted(self.expected)

    @precondition(lambda self: self.ms is not None)
    @rule()
    def new_stream(self):
        _, sid = call_both(self.ms, "new_stream")
        self.expected[sid] = []

    @precondition(lambda self: self.ms is not None and self.expected)
    @rule(data=st.data())
    def fork(self, data):
        src = data.draw(st.sampled_from(self.streams()))
        _, sid = call_both(self.ms, "fork", src)
        self.expected[sid] = list(self.expected[src])

    @precondition(lambda self: self.ms is not None and self.expected)
    @rule(data=st.data(), n=st.integers(0, 20))
    def append(self, data, n):
        sid = data.draw(st.sampled_from(self.streams()))
        before = snapshot(self.ms[0])
        res = call_both(self.ms, "append", sid, n)
        if res[0] == "err":
            assert res[1] is CacheFullError and "KV cache full" in res[2]
            assert snapshot(self.ms[0]) == before  # a failed append changes nothing
            return
        values = list(range(self.counter, self.counter + n))
        self.counter += n
        # Apply the (identical) copies and writes to each simulated storage.
        slots, copies = res[1]
        for store in self.store:
            for src, dst, rows in copies.tolist():
                store[dst * self.bs:dst * self.bs + rows] = store[src * self.bs:src * self.bs + rows]
            store[slots] = values
        self.expected[sid] += values

    @precondition(lambda self: self.ms is not None and self.expected)
    @rule(data=st.data(), n=st.integers(0, 6))
    def append_batch(self, data, n):
        sids = data.draw(st.lists(st.sampled_from(self.streams()), min_size=1, unique=True))
        before = snapshot(self.ms[0])
        res = call_both(self.ms, "append_batch", np.asarray(sids, np.int64), n)
        if res[0] == "err":
            assert res[1] is CacheFullError and f"{len(sids)} stream(s) need" in res[2]
            assert snapshot(self.ms[0]) == before  # all or nothing
            return
        slots, copies = res[1]
        assert slots.shape == (len(sids), n)
        for store in self.store:
            for src, dst, rows in copies.tolist():
                store[dst * self.bs:dst * self.bs + rows] = store[src * self.bs:src * self.bs + rows]
        for i, sid in enumerate(sids):
            values = list(range(self.counter, self.counter + n))
            self.counter += n
            for store in self.store:
                store[slots[i]] = values
            self.expected[sid] += values

    @precondition(lambda self: self.ms is not None and self.expected)
    @rule(data=st.data(), keep=st.integers(0, 30))
    def trim(self, data, keep):
        sid = data.draw(st.sampled_from(self.streams()))
        call_both(self.ms, "trim_front", sid, keep)
        if keep < len(self.expected[sid]):
            self.expected[sid] = self.expected[sid][len(self.expected[sid]) - keep:]

    @precondition(lambda self: self.ms is not None and self.expected)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(self.streams()))
        call_both(self.ms, "free", sid)
        del self.expected[sid]

    @precondition(lambda self: self.ms is not None)
    @rule(sid=st.integers(-3, 1000))
    def unknown_stream_is_rejected(self, sid):
        if sid in self.expected:
            return
        before = snapshot(self.ms[0])
        for name, args in (("append", (sid, 1)), ("fork", (sid,)), ("free", (sid,)),
                           ("trim_front", (sid, 0)), ("length", (sid,))):
            res = call_both(self.ms, name, *args)
            assert res[0] == "err" and res[1] is UnknownStreamError, res
        assert snapshot(self.ms[0]) == before

    @invariant()
    def managers_agree_and_account_for_every_block(self):
        if self.ms is None:
            return
        snaps = [snapshot(m) for m in self.ms]
        assert snaps[0] == snaps[1]
        m = self.ms[0]
        owners = np.zeros(m.num_blocks, np.int64)
        for s in m.streams():
            blocks = m.blocks(s)
            assert len(set(blocks)) == len(blocks), "a stream lists a block twice"
            owners[blocks] += 1
            # live rows fit in the blocks, and no stream keeps a fully dead leading block
            assert 0 <= m.start(s) < self.bs or not blocks
            assert m.start(s) + m.length(s) <= len(blocks) * self.bs
        assert [m.refcount(b) for b in range(m.num_blocks)] == owners.tolist()
        assert m.num_free_blocks == int((owners == 0).sum())

    @invariant()
    def every_stream_reads_what_it_wrote(self):
        if self.ms is None:
            return
        for m, store in zip(self.ms, self.store):
            for s in m.streams():
                rows = np.concatenate(
                    [store[b * self.bs:(b + 1) * self.bs] for b in m.blocks(s)] or [[]])
                got = rows[m.start(s):m.start(s) + m.length(s)].tolist()
                assert got == self.expected[s], (s, got, self.expected[s])

    @invariant()
    def page_tables_agree(self):
        if self.ms is None:
            return
        ids = np.asarray(self.streams(), np.int64)
        tables = []
        for m in self.ms:
            n = len(ids)
            cap = sum(len(m.blocks(s)) for s in ids.tolist())
            bufs = [np.full(n + 1, -7, np.int32), np.full(cap, -7, np.int32),
                    np.full(n, -7, np.int32), np.full(n, -7, np.int32)]
            total = m.page_table(ids, *bufs)
            tables.append((total, [b.tolist() for b in bufs]))
            # CSR contents match the per-stream block lists
            indptr, indices, last, start = bufs
            for i, s in enumerate(ids.tolist()):
                assert indices[indptr[i]:indptr[i + 1]].tolist() == m.blocks(s)
                nb = len(m.blocks(s))
                live = (nb - 1) * self.bs + last[i] - start[i] if nb else 0
                assert live == m.length(s)
        assert tables[0] == tables[1]


ManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=80,
                                            deadline=None)
TestManagerMachine = ManagerMachine.TestCase


@pytest.mark.parametrize("Manager", BACKENDS)
def test_fresh_blocks_in_order_and_reuse_last_freed(Manager):
    m = Manager(8, 4)
    a = m.new_stream()
    slots, copies = m.append(a, 6)
    assert slots.tolist() == [0, 1, 2, 3, 4, 5] and copies.shape == (0, 3)
    b = m.new_stream()
    assert m.append(b, 1)[0].tolist() == [8]  # block 2
    m.free(a)
    c = m.new_stream()
    # a's blocks 0 then 1 went back on the free stack: the last released is reused first
    assert m.append(c, 1)[0].tolist() == [4]
    assert m.num_free_blocks == 8 - 2  # b and c hold one block each


@pytest.mark.parametrize("Manager", BACKENDS)
def test_fork_shares_prefix_and_copies_on_write(Manager):
    m = Manager(8, 4)
    a = m.new_stream()
    m.append(a, 6)  # blocks 0 (full) and 1 (2 rows)
    b = m.fork(a)
    assert m.blocks(b) == [0, 1] and m.refcount(0) == 2 and m.refcount(1) == 2
    assert m.num_free_blocks == 6  # the fork allocated nothing
    slots, copies = m.append(b, 1)
    assert copies.tolist() == [[1, 2, 2]]  # partly filled shared block 1 -> private block 2
    assert slots.tolist() == [2 * 4 + 2]
    assert m.blocks(b) == [0, 2] and m.blocks(a) == [0, 1]
    assert m.refcount(1) == 1 and m.refcount(0) == 2
    # the original now owns block 1 alone: appending writes in place, no copy
    slots, copies = m.append(a, 1)
    assert copies.shape == (0, 3) and slots.tolist() == [1 * 4 + 2]


@pytest.mark.parametrize("Manager", BACKENDS)
def test_full_shared_block_needs_no_copy(Manager):
    m = Manager(8, 4)
    a = m.new_stream()
    m.append(a, 4)
    b = m.fork(a)
    assert m.blocks_needed(b, 1) == 1
    slots, copies = m.append(b, 1)
    assert copies.shape == (0, 3) and m.blocks(b) == [0, 1]


@pytest.mark.parametrize("Manager", BACKENDS)
def test_trim_front_frees_blocks_and_keeps_positions(Manager):
    m = Manager(8, 4)
    a = m.new_stream()
    m.append(a, 10)  # blocks 0, 1, 2
    m.trim_front(a, 5)  # live rows 5..9: row 5 is in block 1
    assert m.blocks(a) == [1, 2] and m.start(a) == 1 and m.length(a) == 5
    assert m.position(a) == 10 and m.num_free_blocks == 6
    m.trim_front(a, 0)  # 10 rows used of 12: block 2 keeps the write head
    assert m.blocks(a) == [2] and m.length(a) == 0 and m.start(a) == 2
    assert m.append(a, 1)[0].tolist() == [2 * 4 + 2]


@pytest.mark.parametrize("Manager", BACKENDS)
def test_cache_full_says_what_happened_and_changes_nothing(Manager):
    m = Manager(3, 4)
    a = m.new_stream()
    m.append(a, 10)
    before = snapshot(m)
    with pytest.raises(CacheFullError) as e:
        m.append(a, 5)  # 2 rows fit, 3 more need a block that does not exist
    msg = str(e.value)
    assert "stream 0 needs 1 more block" in msg and "only 0 of 3 blocks are free" in msg
    assert "block_size 4" in msg
    assert snapshot(m) == before
    assert isinstance(e.value, RuntimeError)


@pytest.mark.parametrize("Manager", BACKENDS)
def test_bad_sizes_are_rejected(Manager):
    for args in ((0, 4), (-1, 4), (4, 0), (4, -2), (2**31, 4)):
        with pytest.raises(ValueError):
            Manager(*args)
    m = Manager(4, 4)
    a = m.new_stream()
    with pytest.raises(ValueError, match="negative"):
        m.append(a, -1)
    with pytest.raises(ValueError, match="keep_last"):
        m.trim_front(a, -1)
    with pytest.raises(ValueError, match="out of range"):
        m.refcount(4)
    with pytest.raises(UnknownStreamError, match="unknown stream 7"):
        m.free(7)
    m.free(a)
    with pytest.raises(UnknownStreamError):  # double free
        m.free(a)
    with pytest.raises(KeyError):  # also a KeyError for callers that catch that
        m.length(a)


@pytest.mark.parametrize("Manager", BACKENDS)
def test_append_batch_rejects_duplicates_and_bad_ids(Manager):
    m = Manager(8, 4)
    a = m.new_stream()
    with pytest.raises(ValueError, match=f"stream {a} is listed twice"):
        m.append_batch(np.array([a, a], np.int64), 1)
    with pytest.raises(UnknownStreamError):
        m.append_batch(np.array([a, 42], np.int64), 1)
    with pytest.raises(ValueError, match="dtype"):
        m.append_batch(np.array([a], np.int32), 1)
    assert m.length(a) == 0 and m.num_free_blocks == 8


@pytest.mark.parametrize("Manager", BACKENDS)
def test_page_table_buffer_errors_write_nothing(Manager):
    m = Manager(8, 2)
    a, b = m.new_stream(), m.new_stream()
    m.append(a, 5)
    m.append(b, 3)
    ids = np.array([a, b], np.int64)
    indptr, last = np.zeros(3, np.int32), np.zeros(2, np.int32)
    small = np.full(4, -9, np.int32)  # needs 3 + 2 = 5
    with pytest.raises(ValueError, match="needs 5 indices but the buffer holds 4"):
        m.page_table(ids, indptr, small, last)
    assert (small == -9).all() and (indptr == 0).all()
    with pytest.raises(ValueError, match="indptr"):
        m.page_table(ids, np.zeros(2, np.int32), np.zeros(8, np.int32), last)
    with pytest.raises(ValueError, match="dtype"):
        m.page_table(ids, indptr.astype(np.int64), np.zeros(8, np.int32), last)
    with pytest.raises(UnknownStreamError):
        m.page_table(np.array([a, 99], np.int64), indptr, np.zeros(8, np.int32), last)
    indices = np.zeros(8, np.int32)
    assert m.page_table(ids, indptr, indices, last) == 5
    assert indptr.tolist() == [0, 3, 5] and last.tolist() == [1, 1]
    assert indices[:5].tolist() == m.blocks(a) + m.blocks(b)
