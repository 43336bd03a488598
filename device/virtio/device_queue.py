"""The device (VMM) side of one split virtqueue: DeviceQueue and the chains it hands out.

The device treats every ring byte as hostile: each malformed structure raises
RingError with a stable short reason code (counted per queue in `errors`), every
walk is bounded (no loop can hang the device), and indirect tables are copied before
they are walked so the guest cannot change them under the device's feet. Buffer
addresses are translated with the guest's one region table (GuestLayout.translate,
GuestLayout.translate_many).

One deliberate deviation from the letter of the spec, shared with Linux and QEMU: a
chain that goes through an indirect table may be longer than the queue size (up to
the device's max_chain, default 4096, which also caps direct chains on larger rings).
Pass max_chain=size to a DeviceQueue for the strict reading. See docs/VIRTQUEUE.md.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device.virtio.layout import BadAddress
from device.virtio.ram import GuestRAM
from device.virtio.split_ring import (DEFAULT_MAX_CHAIN, DESC_DTYPE, DESC_SIZE, DESC_STRUCT, LE16, MAX_BUFFER_LEN,
                                      MAX_CHAIN_BYTES, USED_ELEM, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT,
                                      VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY, RingError,
                                      RingOffsets, memory_barrier, vring_need_event)


@dataclass(slots=True)
class DescChain:
    """One available chain as the device validated it. elements are (gpa, len,
    writable) in chain order, device-readable ones first; offsets are the matching
    memfd offsets (the translation the device already paid for)."""

    head: int
    elements: list[tuple[int, int, bool]]
    offsets: list[int]
    n_readable: int
    readable_bytes: int
    writable_bytes: int
    indirect: bool
    _mem: memoryview = field(repr=False)
    _gpas: np.ndarray | None = field(default=None, repr=False)
    _lens: np.ndarray | None = field(default=None, repr=False)

    def gpas(self) -> np.ndarray:
        """Buffer addresses as a uint64 array (for vectorized decoding of chunks)."""
        if self._gpas is None:
            self._gpas = np.fromiter((e[0] for e in self.elements), dtype=np.uint64, count=len(self.elements))
        return self._gpas

    def lens(self) -> np.ndarray:
        """Buffer lengths as a uint64 array."""
        if self._lens is None:
            self._lens = np.fromiter((e[1] for e in self.elements), dtype=np.uint64, count=len(self.elements))
        return self._lens

    def readable(self) -> list[memoryview]:
        """Zero-copy views of the device-readable buffers (live guest memory: copy
        before validating anything the guest could change meanwhile)."""
        mem, el, off = self._mem, self.elements, self.offsets
        if self.readable_bytes == 0:
            return []
        # zero-length buffers carry nothing: skipped, with numpy when the chain is long
        # (a hostile chain may be 32768 empty descriptors)
        if self._lens is not None and self.n_readable > 64:
            ks = np.flatnonzero(self._lens[: self.n_readable]).tolist()
        else:
            ks = [k for k in range(self.n_readable) if el[k][1]]
        return [mem[off[k] : off[k] + el[k][1]] for k in ks]

    def single_readable(self) -> bytes | None:
        """A copy of the chain's one device-readable buffer (the guest cannot change it
        afterwards), or None unless the chain is one readable buffer of 1 byte or more:
        the usual request, copied in one slice."""
        if self.n_readable != 1 or not self.readable_bytes:
            return None
        off = self.offsets[0]
        return bytes(self._mem[off:off + self.readable_bytes])

    def writable(self) -> list[memoryview]:
        mem, el, off = self._mem, self.elements, self.offsets
        return [mem[off[k] : off[k] + el[k][1]] for k in range(self.n_readable, len(el))]

    def gather(self, limit: int, *, truncate: bool = False) -> bytes:
        return gather(self, limit, truncate=truncate)


def gather(chain: DescChain, limit: int, *, truncate: bool = False) -> bytes:
    """Copy the chain's device-readable bytes, at most `limit` of them: more raises
    RingError('gather-limit') (or, with truncate=True, returns the first `limit`), so a
    hostile guest cannot make the device copy more than it chose to."""
    if chain.readable_bytes > limit and not truncate:
        raise RingError("gather-limit", f"chain {chain.head} has {chain.readable_bytes} readable bytes, "
                                        f"more than the {limit} this request may carry", chain.head)
    views = chain.readable()
    if len(views) == 1:
        return bytes(views[0][:limit])
    out = bytearray()
    left = limit
    for v in views:
        if left <= 0:
            break
        out += v[:left]
        left -= len(v)
    return bytes(out)


class DeviceQueue:
    """Device (VMM) side of one split virtqueue; every ring byte is hostile input."""

    def __init__(
        self,
        ram: GuestRAM,
        index: int,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        event_idx: bool,
        indirect: bool,
        max_chain: int | None = None,
    ) -> None:
        self.ram = ram
        self.layout = ram.layout
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self._off = RingOffsets(ram, size, desc_gpa, avail_gpa, used_gpa)
        self.mask = size - 1
        self.max_chain = DEFAULT_MAX_CHAIN if max_chain is None else int(max_chain)
        if not 1 <= self.max_chain <= 1 << 16:  # le16 next: no chain can be longer
            raise ValueError(f"max_chain must be in 1..65536, got {max_chain}")
        self._mem = ram.mem
        self.last_avail_idx = 0
        self.used_idx = 0
        self._signalled_used = 0
        self._used_flags = 0
        # counters
        self.chains = 0
        self.descriptors = 0
        self.walked = 0            # descriptors read, refused chains included: the walk's cost
        self.indirect_chains = 0
        self.calls = 0
        self.calls_suppressed = 0
        self.errors: Counter[str] = Counter()

    def _fail(self, reason: str, message: str, head: int | None = None) -> RingError:
        self.errors[reason] += 1
        return RingError(reason, f"queue {self.index}: {message}", head)

    # --- available ring --------------------------------------------------------------------
    def avail_idx(self) -> int:
        return LE16.unpack_from(self._off.words, self._off.avail + 2)[0]

    def has_avail(self) -> bool:
        return self.avail_idx() != self.last_avail_idx

    def pop_avail(self) -> DescChain | None:
        """Next available chain, validated, or None. Raises RingError (only) on a
        malformed ring. A bad avail.idx consumes nothing; a bad chain is consumed and
        its head is in the error, so the device can return it or reset the queue."""
        avail_idx = LE16.unpack_from(self._off.words, self._off.avail + 2)[0]
        last = self.last_avail_idx
        pending = (avail_idx - last) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise self._fail("avail-idx", f"avail idx {avail_idx} is {pending} ahead of {last}, more than the queue size {self.size}")
        head = LE16.unpack_from(self._off.words, self._off.avail_ring + 2 * (last & self.mask))[0]
        self.last_avail_idx = (last + 1) & 0xFFFF
        if head >= self.size:
            raise self._fail("desc-index", f"avail ring entry {last} names head {head} >= queue size {self.size}")
        try:
            chain = self._walk(head)
        except RingError as e:
            e.head = head
            raise
        except Exception as e:  # belt and braces: nothing but RingError may escape
            raise self._fail("internal", f"unexpected {type(e).__name__} walking chain {head}: {e}", head) from e
        self.chains += 1
        return chain

    def _walk(self, head: int) -> DescChain:
        mem, base, size, unpack = self._mem, self._off.desc, self.size, DESC_STRUCT.unpack_from
        addr, ln, fl, _ = unpack(mem, base + DESC_SIZE * head)
        if not fl & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT):
            # One descriptor (every PFN request): what the loop below and _finish would
            # make of it, without their lists (the ring round trip is per request).
            self.descriptors += 1
            self.walked += 1
            w = bool(fl & VIRTQ_DESC_F_WRITE)
            try:
                offset = self.layout.translate(addr, ln)
            except BadAddress as e:
                raise self._not_ram(head, addr, ln, e) from None
            return DescChain(head, [(addr, ln, w)], [offset], 0 if w else 1, 0 if w else ln, ln if w else 0, False,
                             mem)
        max_chain = self.max_chain
        addrs: list[int] = []
        lens: list[int] = []
        writ: list[bool] = []
        seen: list[int] = []
        i = head
        ind = None
        while True:
            if len(seen) >= size or len(seen) >= max_chain:
                # exact diagnosis: a repeated index is a loop, otherwise just too long
                if len(set(seen)) < len(seen) or len(seen) >= size:
                    raise self._fail("desc-loop", f"descriptor chain from head {head} revisits a descriptor")
                raise self._fail("chain-too-long", f"chain from head {head} is longer than max_chain {max_chain}")
            seen.append(i)
            addr, ln, fl, nx = unpack(mem, base + DESC_SIZE * i)
            self.descriptors += 1
            self.walked += 1
            if fl & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise self._fail("indirect-not-negotiated", f"descriptor {i} has INDIRECT but VIRTIO_F_INDIRECT_DESC was not negotiated")
                if fl & VIRTQ_DESC_F_NEXT:
                    raise self._fail("indirect-next", f"descriptor {i} has both INDIRECT and NEXT")
                ind = self._walk_indirect(head, addr, ln, len(addrs))
                break
            addrs.append(addr)
            lens.append(ln)
            writ.append(bool(fl & VIRTQ_DESC_F_WRITE))
            if not fl & VIRTQ_DESC_F_NEXT:
                break
            if nx >= size:
                raise self._fail("desc-index", f"descriptor {i} of chain {head} has next {nx} >= queue size {size}")
            i = nx
        return self._finish(head, addrs, lens, writ, ind)

    def _walk_indirect(self, head: int, addr: int, ln: int, n_direct: int) -> np.ndarray:
        """Validate and follow one indirect table; returns its chain (DESC_DTYPE records)."""
        if ln == 0 or ln % DESC_SIZE:
            raise self._fail("indirect-len", f"indirect table of chain {head} has len {ln}, not a positive multiple of {DESC_SIZE}")
        n = ln // DESC_SIZE
        budget = self.max_chain - n_direct
        if n > self.max_chain:
            raise self._fail("indirect-len", f"indirect table of chain {head} has {n} descriptors, more than max_chain {self.max_chain}")
        self.walked += n           # the table is copied and checked whole: that is the cost
        try:
            off = self.layout.translate(addr, ln)
        except BadAddress as e:
            raise self._fail("indirect-not-ram", f"indirect table {addr:#x}+{ln:#x} of chain {head} is not inside one RAM region ({e})") from None
        # snapshot: the guest cannot change the table while the device walks it
        tbl = np.frombuffer(bytes(self._mem[off : off + ln]), dtype=DESC_DTYPE)
        flags = tbl["flags"]
        nexts = tbl["next"]
        if (flags[: n - 1] & VIRTQ_DESC_F_NEXT).all() and not flags[n - 1] & VIRTQ_DESC_F_NEXT and \
                (nexts[: n - 1] == np.arange(1, n, dtype=np.uint16)).all():
            order = None  # the usual in-order table: the chain is the whole table
            m = n
            if (flags & VIRTQ_DESC_F_INDIRECT).any():
                raise self._fail("indirect-nested", f"indirect table of chain {head} contains an INDIRECT descriptor")
        else:
            fl_l, nx_l = flags.tolist(), nexts.tolist()
            order = []
            i = 0
            while True:
                if len(order) >= n or len(order) >= budget:
                    if len(set(order)) < len(order) or len(order) >= n:
                        raise self._fail("desc-loop", f"indirect table of chain {head} loops")
                    raise self._fail("chain-too-long", f"chain from head {head} is longer than max_chain {self.max_chain}")
                order.append(i)
                f = fl_l[i]
                if f & VIRTQ_DESC_F_INDIRECT:
                    raise self._fail("indirect-nested", f"indirect table of chain {head} contains an INDIRECT descriptor ({i})")
                if not f & VIRTQ_DESC_F_NEXT:
                    break
                i = nx_l[i]
                if i >= n:
                    raise self._fail("desc-index", f"indirect descriptor of chain {head} has next {i} >= table size {n}")
            m = len(order)
        self.descriptors += m
        if m > budget:
            raise self._fail("chain-too-long", f"chain from head {head} has {n_direct + m} elements, more than max_chain {self.max_chain}")
        return tbl if order is None else tbl[order]

    def _finish(self, head: int, addrs: list[int], lens: list[int], writ: list[bool], ind: np.ndarray | None) -> DescChain:
        a: np.ndarray | None = None
        ln: np.ndarray | None = None
        if ind is not None:
            a = np.concatenate([np.array(addrs, dtype=np.uint64), ind["addr"]])
            ln = np.concatenate([np.array(lens, dtype=np.uint64), ind["len"].astype(np.uint64)])
            w = np.concatenate([np.array(writ, dtype=bool), (ind["flags"] & VIRTQ_DESC_F_WRITE) != 0])
            addrs, lens, writ = a.tolist(), ln.tolist(), w.tolist()
        n = len(addrs)
        # device-readable before device-writable (spec 2.7.4)
        try:
            n_read = writ.index(True)
        except ValueError:
            n_read = n
        else:
            if not all(writ[n_read:]):
                raise self._fail("desc-order", f"chain {head} has a device-readable buffer after a device-writable one")
        if n <= 8:
            offsets = self._translate_few(head, addrs, lens)
            rbytes = sum(lens[:n_read])
            wbytes = sum(lens) - rbytes
        else:
            if a is None or ln is None:
                a, ln = np.array(addrs, dtype=np.uint64), np.array(lens, dtype=np.uint64)
            offsets = self._translate_many(head, a, ln)
            rbytes = int(ln[:n_read].sum())
            wbytes = int(ln.sum()) - rbytes
        if rbytes + wbytes > MAX_CHAIN_BYTES:
            raise self._fail("chain-bytes", f"chain {head} covers {rbytes + wbytes} bytes, more than the spec's 2^32")
        if ind is not None:
            self.indirect_chains += 1
        return DescChain(head, list(zip(addrs, lens, writ)), offsets, n_read, rbytes, wbytes, ind is not None,
                         self._mem, a, ln)

    def _translate_few(self, head: int, addrs: list[int], lens: list[int]) -> list[int]:
        """memfd offsets of a short chain's buffers; each must lie inside one RAM region."""
        tr = self.layout.translate
        out = []
        for a, ln in zip(addrs, lens):
            try:
                out.append(tr(a, ln))
            except BadAddress as e:
                raise self._not_ram(head, a, ln, e) from None
        return out

    def _not_ram(self, head: int, addr: int, ln: int, e: BadAddress) -> RingError:
        return self._fail("buffer-not-ram", f"chain {head}: buffer {addr:#x}+{ln:#x} is not inside one RAM region ({e})")

    def _translate_many(self, head: int, a: np.ndarray, ln: np.ndarray) -> list[int]:
        """Vectorized _translate_few for long (chunk) chains: the layout's translate_many."""
        offsets, ok = self.layout.translate_many(a, ln)
        if not ok.all():
            k = int(np.argmin(ok))
            raise self._fail("buffer-not-ram", f"chain {head}: buffer {k} {int(a[k]):#x}+{int(ln[k]):#x} is not inside one RAM region")
        return offsets.tolist()

    # --- used ring -----------------------------------------------------------------------------
    def push_used(self, head: int, written_len: int = 0) -> None:
        """Return a chain: write the used element, then bump used.idx (spec order)."""
        if not 0 <= head < self.size:
            raise ValueError(f"queue {self.index}: head {head} out of range")
        if not 0 <= written_len <= MAX_BUFFER_LEN:
            raise ValueError(f"written_len {written_len} does not fit le32")
        USED_ELEM.pack_into(self._mem, self._off.used_ring + 8 * (self.used_idx & self.mask), head, written_len)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        LE16.pack_into(self._off.words, self._off.used + 2, self.used_idx)

    def need_call(self) -> bool:
        """Should the device call (interrupt) the driver for what it pushed since the
        last decision? EVENT_IDX: vring_need_event(used_event, new, old); otherwise
        honour avail.flags NO_INTERRUPT. Counts calls / calls_suppressed; the caller
        writes the call eventfd."""
        new, old = self.used_idx, self._signalled_used
        if new == old:
            return False
        self._signalled_used = new
        memory_barrier()                 # used idx out before used_event / avail.flags are read
        if self.event_idx:
            need = vring_need_event(LE16.unpack_from(self._off.words, self._off.used_event)[0], new, old)
        else:
            need = not (LE16.unpack_from(self._off.words, self._off.avail)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT)
        if need:
            self.calls += 1
        else:
            self.calls_suppressed += 1
        return need

    # --- available-buffer notification suppression ------------------------------------------
    def set_avail_event(self, idx: int) -> None:
        """EVENT_IDX: ask for a kick once avail.idx passes idx (reaches idx + 1)."""
        LE16.pack_into(self._off.words, self._off.avail_event, idx & 0xFFFF)

    def enable_notifications(self) -> bool:
        """Re-arm kicks before sleeping: avail_event = last_avail_idx with EVENT_IDX,
        else clear used.flags NO_NOTIFY. Returns True if chains arrived meanwhile (the
        caller should pop again rather than wait for a kick that will not come)."""
        if self.event_idx:
            self.set_avail_event(self.last_avail_idx)
        else:
            self._used_flags &= ~VIRTQ_USED_F_NO_NOTIFY
            LE16.pack_into(self._off.words, self._off.used, self._used_flags)
        memory_barrier()                 # the request for a kick out before avail idx is read
        return self.has_avail()

    def disable_notifications(self) -> None:
        """Ask for no kicks while busy. Without EVENT_IDX sets used.flags NO_NOTIFY;
        with it (flags must stay 0) simply leaves avail_event behind, as vhost does."""
        if not self.event_idx and not self._used_flags & VIRTQ_USED_F_NO_NOTIFY:
            self._used_flags |= VIRTQ_USED_F_NO_NOTIFY
            LE16.pack_into(self._off.words, self._off.used, self._used_flags)

    # --- queue state (vhost-user GET/SET_VRING_BASE, migration) ------------------------------
    def state(self) -> dict[str, int]:
        return {"last_avail_idx": self.last_avail_idx, "used_idx": self.used_idx}

    def restore(self, last_avail_idx: int, used_idx: int | None = None) -> None:
        """Resume a queue another device instance served (e.g. after migration):
        last_avail_idx comes from that device; used_idx defaults to the used ring's
        idx, which lives in (migrated) guest RAM."""
        if used_idx is None:
            used_idx = LE16.unpack_from(self._off.words, self._off.used + 2)[0]
        if not (0 <= last_avail_idx <= 0xFFFF and 0 <= used_idx <= 0xFFFF):
            raise ValueError(f"ring indices must be 16-bit, got {last_avail_idx}, {used_idx}")
        if (last_avail_idx - used_idx) & 0xFFFF > self.size:
            raise RingError("avail-idx", f"queue {self.index}: last_avail_idx {last_avail_idx} is more than "
                                         f"{self.size} ahead of used idx {used_idx}")
        self.last_avail_idx = last_avail_idx
        self.used_idx = self._signalled_used = used_idx

    def counters(self) -> dict[str, Any]:
        return {"chains": self.chains, "descriptors": self.descriptors, "indirect_chains": self.indirect_chains,
                "calls": self.calls, "calls_suppressed": self.calls_suppressed, "errors": dict(self.errors)}
