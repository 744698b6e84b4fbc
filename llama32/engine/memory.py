"""The KV memory (`KVMemory`): the running rows' cache (`Rows`) and, beside it, the prompt-prefix index
(`PrefixIndex`).

A prompt's keys and values, in whole blocks of `BLOCK` tokens, stay after its request ends, so that a later
request whose prompt starts with the same tokens (the same system prompt, tool list or chat history) copies
them instead of computing them again. A block is keyed by its own tokens, a digest of the blocks before it (so
a key names the whole prefix up to the block's end) and the LoRA adapter (an adapter changes the keys and
values). Keys and values are stored after RoPE, at the positions they were computed at; a prefix always
starts at position 0, so a copied block is exactly what computing it would write (the same arithmetic: the
model's prefill of those tokens). Where a decode step writes a position's keys and values as a prompt span
does (`answers`, model.py's `decode_is_span`), what a request drew stays too when it ends (`finished`): a
chat's next turn sends the answer back, and copies it. Elsewhere a paused row's drawn blocks are its own
(`KVMemory.pause`): its resume alone copies them back.

The index lives within the handle's one budget, `kv_cache_bytes`: it may use what the running rows have not
taken, and when they need more (or the index outgrows that) the least recently used blocks go first. A
lookup refreshes a prefix's blocks deepest first, so a prefix's first blocks (shared by the most prompts)
are the last to go and no block outlives the block before it by much. The shape of nano-vllm's hashed block
manager and mlx-lm's LRUPromptCache, in copy form: the rows keep one contiguous cache each (what the decode
step attends over), and the index keeps blocks.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

BLOCK = 32  # tokens per reusable block


def adapter_key(adapter: Any) -> tuple | None:
    """What identifies an adapter's keys and values: its files and this loaded copy of them (its load
    number, `Adapter.serial`: an id() would be reused by CPython once the LRU frees the adapter, issue 34)."""
    return None if adapter is None else (str(adapter.path), adapter.serial)


def _chain(parent: bytes, block: tuple[int, ...]) -> bytes:
    """The digest naming a prefix: blake2b over the digest of the prefix before it and this block's ids.
    Not Python's hash() (64 bits, no guarantee against collisions, which would serve another prefix's
    keys and values: issue 34); a 256-bit cryptographic digest makes a collision practically impossible."""
    return hashlib.blake2b(parent + array("q", block).tobytes(), digest_size=32).digest()


class PrefixIndex:
    """Blocks of prompt keys and values, least recently used first (see the module docstring)."""

    def __init__(self, position_bytes: int):
        self.position_bytes = position_bytes
        self.block_bytes = BLOCK * position_bytes
        # key -> (k, v): per layer, (K, BLOCK, hd) tensors
        self.blocks: OrderedDict[tuple, tuple[list[Tensor], list[Tensor]]] = OrderedDict()

    @property
    def bytes(self) -> int:
        return len(self.blocks) * self.block_bytes

    @staticmethod
    def _keys(adapter: Any, ids: list[int], n_blocks: int, owner: Any = None, shared: int = 0) -> list[tuple]:
        """Block i's key: (adapter, digest of blocks [0, i), block i's tokens) (`_chain`). With an `owner`,
        blocks from `shared` on are that owner's alone: their adapter part is (adapter, owner), which no other
        lookup makes (`KVMemory.pause`)."""
        keys, parent, which = [], b"", adapter_key(adapter)
        for i in range(n_blocks):
            block = tuple(ids[i * BLOCK:(i + 1) * BLOCK])
            keys.append((which if owner is None or i < shared else (which, owner), parent, block))
            parent = _chain(parent, block)
        return keys

    def lookup(self, adapter: Any, ids: list[int], owner: Any = None,
               shared: int = 0) -> list[tuple[list[Tensor], list[Tensor]]]:
        """The stored blocks that begin `ids`, in order (at most all but its last token: the prompt's last
        position is always computed, for its logits); refreshed, deepest first. With an `owner` (see `_keys`),
        its own blocks are taken out: they serve one lookup."""
        found = []
        for key in self._keys(adapter, ids, (len(ids) - 1) // BLOCK, owner, shared):
            block = self.blocks.get(key)
            if block is None:
                break
            found.append((key, block))
        for i, (key, _) in reversed(list(enumerate(found))):
            if owner is not None and i >= shared:
                del self.blocks[key]
            else:
                self.blocks.move_to_end(key)
        return [block for _, block in found]

    def store(self, adapter: Any, ids: list[int], k: list[Tensor], v: list[Tensor], limit: int,
              owner: Any = None, shared: int = 0) -> None:
        """Keep the whole blocks of `ids` from one row's cache (`k`, `v`: per layer, (K, S, hd), positions
        from 0), within `limit` bytes; blocks already stored are refreshed, not copied again. `owner` and
        `shared`: see `_keys`."""
        keys = self._keys(adapter, ids, len(ids) // BLOCK, owner, shared)
        if limit < len(keys) * self.block_bytes:  # keep what fits of the prefix, from its start
            keys = keys[:max(limit // self.block_bytes, 0)]
        for i, key in enumerate(keys):
            if key not in self.blocks:
                span = slice(i * BLOCK, (i + 1) * BLOCK)
                self.blocks[key] = ([t[:, span].clone() for t in k], [t[:, span].clone() for t in v])
        for key in reversed(keys):
            self.blocks.move_to_end(key)
        self.fit(limit)

    def fit(self, limit: int) -> None:
        """Drop the least recently used blocks until the index holds at most `limit` bytes."""
        while self.blocks and self.bytes > limit:
            self.blocks.popitem(last=False)

    @staticmethod
    def copy_into(blocks: list[tuple[list[Tensor], list[Tensor]]], k: list[Tensor], v: list[Tensor]) -> int:
        """Write `blocks` at positions [0, len(blocks) * BLOCK) of one row's per-layer (K, S, hd) `k`, `v`;
        returns how many positions that is."""
        n = len(blocks) * BLOCK
        if n:
            for layer, (kt, vt) in enumerate(zip(k, v)):
                kt[:, :n] = torch.cat([b[0][layer] for b in blocks], dim=1)
                vt[:, :n] = torch.cat([b[1][layer] for b in blocks], dim=1)
        return n


class Rows:
    """The running rows' KV memory: one cache of `batch` rows of `length` positions, and the job in each row
    ("slot", `capacity` of them). (The sampler's per-row state is the loop's: `GenerationLoop.knobs`.)

    The cache is sized to what the rows hold now, not to what they may come to hold: it grows (longer
    rows, more rows) as prompts arrive and tokens are produced, and shrinks when rows leave, always a power
    of two of rows (the compiled step runs power-of-two batches of the first rows) and of positions (from
    256; 512 on the CPU unless every attention is written out, model.py's `attention_floor`; at the budget's
    edge, as many as fit). `resize` moves the live rows into a new
    cache (between steps, by the loop), packing them into the lowest slots so a smaller batch can hold them.
    """

    def __init__(self, llm: Any, capacity: int, length: int, batch: int | None = None):
        from ..model import KVCache, attention_floor, keep_address

        self.cache = KVCache(llm.config, batch or capacity, length, device=llm.device, dtype=llm.dtype)
        self.jobs: list[Any] = [None] * capacity
        # the fewest positions a forward attends over (runner.attended_for)
        self.floor = attention_floor(llm.device, llm.model)
        keep_address(self.cache.k + self.cache.v)

    def live(self) -> list[int]:
        return [i for i, j in enumerate(self.jobs) if j is not None]

    def free_slot(self) -> int | None:
        return next((i for i, j in enumerate(self.jobs) if j is None), None)

    @property
    def batch(self) -> int:
        return self.cache.batch

    @property
    def length(self) -> int:
        return self.cache.length

    def resize(self, batch: int, length: int) -> list[tuple[int, int]]:
        """A cache of `batch` x `length`, the live rows' keys and values moved into its lowest slots in slot
        order. Returns the moves, (new slot, old slot), for the state kept per slot elsewhere (the sampler's).

        One layer's tensor at a time: each new tensor is made, filled, and takes the old one's place, which
        is freed before the next is made. So the two caches never exist whole at once: the most held is the
        larger of them plus one tensor of the other (`transient_bytes`, which the scheduler keeps room for),
        not both (issue 34). If making a tensor fails part way, the cache is left with layers of two shapes:
        `intact` is then False and the rows' keys and values are lost (the loop fails their requests)."""
        from ..model import keep_address

        live = self.live()
        assert len(live) <= batch, (live, batch)
        keep = min(self.cache.length, length)
        moved = [(dst, src) for dst, src in enumerate(live)]
        for layers in (self.cache.k, self.cache.v):  # the lists the cache (and its whole_k/whole_v) hold
            for i in range(len(layers)):
                old = layers[i]
                new = old.new_zeros((batch, old.shape[1], length, old.shape[3]))
                for dst, src in moved:
                    new[dst, :, :keep] = old[src, :, :keep]
                layers[i] = new
                del old, new  # the old tensor goes now, before the next layer's is made
        jobs = [self.jobs[s] for s in live]
        self.jobs = jobs + [None] * (len(self.jobs) - len(jobs))
        for slot, job in enumerate(jobs):
            job.progress.slot = slot
        keep_address(self.cache.k + self.cache.v)
        return [(dst, src) for dst, src in moved if dst != src]

    @property
    def intact(self) -> bool:
        """Every layer's keys and values have one shape (False only after a resize failed part way)."""
        return len({tuple(t.shape) for t in self.cache.k + self.cache.v}) == 1

    def transient_bytes(self, batch: int, length: int, position_bytes: int) -> int:
        """The most KV memory `resize(batch, length)` holds at once: the larger cache whole plus one layer
        tensor of the other (see `resize`)."""
        old, new = self.bytes(position_bytes), batch * length * position_bytes
        tensors = len(self.cache.k) + len(self.cache.v)
        return max(old + new // tensors, new + old // tensors)

    def bytes(self, position_bytes: int) -> int:
        return self.cache.batch * self.cache.length * position_bytes

    def row(self, slot: int) -> tuple[list[Tensor], list[Tensor]]:
        """Row `slot`'s keys and values: per layer, (K, S, hd) views."""
        return [t[slot] for t in self.cache.k], [t[slot] for t in self.cache.v]


class KVMemory:
    """All of one loop's KV memory, within its budget of `budget` bytes: the running rows' cache (`rows`,
    made on demand) and the prefix index (`prefixes`). The scheduler (scheduler.py) applies its plans to it;
    the loop thread alone changes it (`bytes` may be read from any thread)."""

    def __init__(self, llm: Any, *, capacity: int, budget: int, position_bytes: int, rows_budget: int):
        import weakref

        self._llm = weakref.ref(llm)  # the handle owns the loop, which owns this
        self.capacity, self.budget, self.position_bytes = capacity, budget, position_bytes
        self.rows_budget = rows_budget  # the most the rows' cache may take (scheduler.py's `rows_budget`)
        self.rows: Rows | None = None
        self.prefixes = PrefixIndex(position_bytes)
        # On by default: a reused prefix changes only usage.cached_tokens (tokens exact, log-probabilities to
        # float32 rounding). False computes every prompt in full and stores nothing (a no-reuse reference).
        self.reuse_prefixes = True
        # Whether positions a request drew (decode steps) may be stored for other prompts, beside its prompt's:
        # where a decode step gives a position a prompt span's keys and values (model.py's `decode_is_span`)
        self.answers = False

    def rows_bytes(self) -> int:
        rows = self.rows
        return rows.bytes(self.position_bytes) if rows is not None else 0

    @property
    def bytes(self) -> int:
        """KV memory in use: the rows' cache and the prefix index."""
        return self.rows_bytes() + self.prefixes.bytes

    def fit(self, shape: tuple[int, int], admitting: int) -> list[tuple[int, int]]:
        """The rows' cache made at least `shape` = (batch, length) with `admitting` free slots below batch
        (the scheduler's shape already counts the live rows and those admitted); returns the rows moved (as
        `Rows.resize`). Before it is allocated, the prefix index gives up what the allocation holds at its
        peak (a resize: the larger cache and one tensor of the other), so KV memory stays within the budget
        throughout."""
        batch, length = shape
        rows, per = self.rows, self.position_bytes
        if rows is not None:
            free_below = sum(1 for s in range(rows.batch) if rows.jobs[s] is None)
            if (rows.batch >= batch and rows.length >= length and free_below >= admitting
                    and rows.bytes(per) <= self.rows_budget):
                return []
        peak = batch * length * per if rows is None else rows.transient_bytes(batch, length, per)
        self.prefixes.fit(self.budget - peak)
        if rows is None:
            self.rows = Rows(self._llm(), self.capacity, length, batch)
            return []
        return rows.resize(batch, length)

    def place(self, job: Any) -> None:
        """`job` takes the lowest free row (`fit` made room for it)."""
        slot = self.rows.free_slot()
        self.rows.jobs[slot] = job
        job.progress.slot = slot

    def pause(self, job: Any) -> None:
        """Release `job`'s row (memory ran short): it will recompute its context and carry on unchanged.
        With prefix reuse on, its context's whole blocks are kept in the index first, if they fit: its resume
        copies them back. Where a decode step does not write a prompt span's bits (not `answers`), the blocks
        past its prompt's are its own (`paused_owner`): its resume needs the bits its decode steps wrote, and
        another prompt that repeats the text must not copy them."""
        p = job.progress
        if job.req is not None and p.decoding:
            context = self.drawn(job)
            self.keep(job, context, *self.paused_owner(job))
            p.context, p.resuming = context, True
        self.leave(job)
        p.prefilled, p.decoding = 0, False
        if job.scoring is not None:
            job.scoring.logits = []

    def finished(self, job: Any) -> None:
        """A generation done with its row (finished or cancelled, not failed): with reuse on and `answers`, its
        prompt and what it drew in the index, so that a follow-up prompt repeating them (a chat's next turn
        sends the answer back) copies the answer's blocks too, as vLLM's prefix cache keeps generated blocks."""
        if self.answers and job.req is not None and job.progress.decoding and job.progress.slot is not None:
            try:
                self.keep(job, self.drawn(job))
            except (MemoryError, torch.OutOfMemoryError):  # a copy that found no memory: the answer stands
                pass

    @staticmethod
    def drawn(job: Any) -> list[int]:
        """The tokens whose keys and values a decoding row's cache holds, positions [0, pos): its prompt and
        what it drew but the last (drawn, not yet fed)."""
        return job.req.prompt_ids + job.progress.generated[:-1]

    def paused_owner(self, job: Any) -> tuple[Any, int]:
        """(owner, shared) for a paused row's blocks (`PrefixIndex._keys`): none where `answers` (a decode step's
        bits are a span's, so its blocks may serve anyone), else the job, past its prompt's whole blocks."""
        return (None, 0) if self.answers else (("paused", job.arrival), len(job.req.prompt_ids) // BLOCK)

    def keep(self, job: Any, ids: list[int], owner: Any = None, shared: int = 0) -> None:
        """Store the whole blocks of `ids`, the start of `job`'s row, in the prefix index (with reuse on), in
        what the rows leave of the budget (`owner`, `shared`: see `PrefixIndex._keys`)."""
        if self.reuse_prefixes:
            k, v = self.rows.row(job.progress.slot)
            self.prefixes.store(job.adapter, ids, k, v, self.budget - self.rows_bytes(), owner, shared)

    def begin(self, job: Any) -> None:
        """A generation new to its row: the keys and values of its context's longest stored prefix copied
        in (`job.progress.prefilled` says how many positions; the prefill computes the rest). A resumed row
        takes back its own blocks (`pause`)."""
        owner = self.paused_owner(job) if job.progress.resuming else (None, 0)
        blocks = self.prefixes.lookup(job.adapter, job.progress.context, *owner) if self.reuse_prefixes else []
        job.progress.prefilled = self.prefixes.copy_into(blocks, *self.rows.row(job.progress.slot))

    def leave(self, job: Any) -> None:
        """`job` gives up its row, if it holds one."""
        rows = self.rows
        slot = job.progress.slot
        if rows is not None and slot is not None and rows.jobs[slot] is job:
            rows.jobs[slot] = None
        job.progress.slot = None

    def outgrown(self, need) -> list[Any]:
        """The running jobs whose `need(job)` the cache as it is cannot hold."""
        rows = self.rows
        return [] if rows is None else [j for j in rows.jobs if j is not None and need(j) > rows.length]
