"""The opcode scan of the no-execution pickle reader: one regex (C speed) walks every opcode of a
pickle before anything is built, refusing what torch.save never writes (INST, OBJ, EXT1/2/4,
out-of-band buffers, protocol-0 persistent ids), memo indices beyond the stream's own size and
lengths beyond its end, and finds where the pickle stops; plus a bound on how deep its tuples nest."""

from __future__ import annotations

import pickle
import re
from functools import lru_cache


class TruncatedPickle(pickle.UnpicklingError):
    """The pickle runs past the end of the bytes given; ``at`` is where the cut-off opcode starts
    (a reader with more bytes may resume the scan there)."""

    def __init__(self, message: str, at: int):
        super().__init__(message)
        self.at = at


# ---------------------------------------------------------------------------------------------
# the scan: every opcode of the stream, at C speed (one regex), before anything is built
# ---------------------------------------------------------------------------------------------

_STOP, _FRAME = 0x2E, 0x95
# opcode byte -> (bytes of its length field, signed): counted opcodes longer than the regex inlines
_COUNTED = {ord("X"): (4, False), 0x8C: (1, False), ord("U"): (1, False), ord("T"): (4, True),
            ord("B"): (4, False), ord("C"): (1, False), 0x8A: (1, False), 0x8B: (4, True),
            0x8D: (8, False), 0x8E: (8, False), 0x96: (8, False)}
_REFUSED = {
    ord("i"): "instantiates classes with protocol-0 INST, which torch.save never writes",
    ord("o"): "instantiates classes with protocol-0 OBJ, which torch.save never writes",
    0x82: "uses a copyreg extension code (EXT1), which torch.save never writes",
    0x83: "uses a copyreg extension code (EXT2), which torch.save never writes",
    0x84: "uses a copyreg extension code (EXT4), which torch.save never writes",
    0x97: "refers to out-of-band buffers (NEXT_BUFFER), which torch.save never writes",
    0x98: "refers to out-of-band buffers (READONLY_BUFFER), which torch.save never writes",
    ord("P"): "uses a protocol-0 persistent id, which torch.save never writes",
    ord("2"): "duplicates a stack item (DUP), which no pickler writes and torch.load refuses",
    ord("0"): "discards a stack item (POP), which torch.load refuses (picklers write it only for "
              "self-referencing tuples)",
    ord("1"): "discards stack items to a mark (POP_MARK), which torch.load refuses (picklers write it only "
              "for self-referencing tuples)",
}
_NO_ARG = b"(NQRabde}lstu)]\x81\x85\x86\x87\x88\x89\x8f\x90\x91\x92\x93\x94"  # everything but STOP
# opcode byte -> the pickle protocol that introduced it (pickletools' ``proto``; absent: 0 or 1). A pickle
# declares its protocol in its first opcode (PROTO, protocol 2 on); a later protocol's opcode is refused.
_SINCE = {0x80: 2, 0x81: 2, 0x82: 2, 0x83: 2, 0x84: 2, 0x85: 2, 0x86: 2, 0x87: 2, 0x88: 2, 0x89: 2, 0x8A: 2,
          0x8B: 2, ord("B"): 3, ord("C"): 3, 0x8C: 4, 0x8D: 4, 0x8E: 4, 0x8F: 4, 0x90: 4, 0x91: 4, 0x92: 4,
          0x93: 4, 0x94: 4, 0x95: 4, 0x96: 5, 0x97: 5, 0x98: 5}
_REGEX_PROTOCOLS = (1, 2, 3, 4)  # the distinct opcode sets of the scan's regex (5 adds only counted ones)


def _hex(data: bytes) -> bytes:
    return b"".join(b"\\x%02x" % c for c in data)


def _le_below(bound: int, width: int) -> bytes:
    """A regex for ``width``-byte little-endian unsigned values below ``bound``."""
    if bound >= 256**width:
        return b"(?s:.{%d})" % width
    digits = [(bound >> (8 * i)) & 255 for i in range(width)]
    alts = [(b"(?s:.{%d})" % k if k else b"") + b"[\\x00-\\x%02x]" % (digits[k] - 1) + _hex(bytes(digits[k + 1:]))
            for k in range(width - 1, -1, -1) if digits[k]]
    return b"(?:" + b"|".join(alts) + b")" if alts else b"(?!)"


def _short_counted(op: int, width: int, below: int) -> bytes:
    """A regex for opcode ``op`` with a ``width``-byte length below ``below`` and its data."""
    alts = [_hex(n.to_bytes(width, "little")) + (b"(?s:.{%d})" % n if n else b"") for n in range(below)]
    return _hex(bytes([op])) + b"(?:" + b"|".join(alts) + b")"


@lru_cache(maxsize=32)
def _pattern(bits: int, proto: int) -> re.Pattern:
    """Runs of opcodes the C unpickler may execute in a pickle of protocol ``proto``, with memo indices
    below ``2**bits``; stops at STOP, at long counted data and FRAME (checked in Python) and at
    anything refused (PROTO too: it is read at the start only)."""
    bound = 1 << bits
    parts = [  # the most common opcodes of torch.save pickles first
        b"[hqK](?s:.)",  # BINGET, BINPUT, BININT1
        b"r" + _le_below(bound, 4),  # LONG_BINPUT, bounded
        b"[" + _hex(bytes(op for op in _NO_ARG if _SINCE.get(op, 0) <= proto)) + b"]",
        _short_counted(ord("X"), 4, 128),
        b"[Jj](?s:.{4})",  # BININT, LONG_BINGET
        b"M(?s:..)",
        b"G(?s:.{8})",
        *([_short_counted(0x8C, 1, 128)] if proto >= 4 else []),
        *([_short_counted(ord("C"), 1, 64)] if proto >= 3 else []),
        _short_counted(ord("U"), 1, 64),
        *([_short_counted(0x8A, 1, 16)] if proto >= 2 else []),
        b"c[^\\n]*\\n[^\\n]*\\n",  # GLOBAL
        b"[ILFSVg][^\\n]*\\n",  # INT, LONG, FLOAT, STRING, UNICODE, GET
        b"p[0-9]{1,%d}\\n" % max(1, len(str(bound)) - 1),  # PUT, bounded
    ]
    return re.compile(b"(?:" + b"|".join(parts) + b"){0,4096}")  # bounded: no backtracking state piles up


def _cut_off(buf, pos: int, stop: int) -> bool:
    """Whether the opcode at ``pos`` is a valid one whose argument runs past ``stop``."""
    op = buf[pos]
    if op in b"cILFSVgp":
        lines = 2 if op == ord("c") else 1
        at = pos
        for _ in range(lines):
            at = buf.find(b"\n", at + 1, stop)
            if at < 0:
                return True
        return False
    return pos + _FIXED.get(op, 0) > stop


_FIXED = {ord("h"): 2, ord("q"): 2, ord("K"): 2, 0x80: 2, ord("J"): 5, ord("j"): 5, ord("r"): 5, ord("M"): 3,
          ord("G"): 9}


def _declared(buf, start: int, stop: int) -> int:
    """The protocol the pickle at ``buf[start:stop]`` declares in its first opcode (1: protocol 0 or 1)."""
    if start >= stop or buf[start] != 0x80:
        return 1
    if start + 2 > stop:
        raise TruncatedPickle("the pickle is cut off in its first opcode", start)
    proto = buf[start + 1]
    if not 2 <= proto <= pickle.HIGHEST_PROTOCOL:
        raise pickle.UnpicklingError(f"the pickle declares protocol {proto}; protocols 2 to "
                                     f"{pickle.HIGHEST_PROTOCOL} are what PROTO may declare")
    return proto


def _name(op: int) -> str:
    import pickletools

    return next((o.name for o in pickletools.opcodes if ord(o.code) == op), f"{op:#04x}")


def scan(buf, start: int = 0, stop: int | None = None, limit: int | None = None, resume: int | None = None) -> int:
    """Check every opcode of the pickle at ``buf[start:stop]`` (bytes or an mmap), from ``resume``
    (an opcode boundary, default ``start``); return the offset just past its STOP. Raises
    :class:`TruncatedPickle` if it runs past ``stop``, and ``UnpicklingError`` for what ckptviz
    refuses. Memo indices must stay below ``limit`` (default: the bytes from ``start`` to ``stop``; a
    pickle of n bytes memoizes fewer than n objects)."""
    stop = len(buf) if stop is None else stop
    proto = _declared(buf, start, stop)
    match = _pattern(max(8, (limit if limit is not None else stop - start).bit_length()),
                     min(proto, _REGEX_PROTOCOLS[-1])).match
    pos = start + (2 if proto >= 2 else 0) if resume is None or resume <= start else resume
    while True:
        while (end := match(buf, pos, stop).end()) > pos:
            pos = end
        if pos >= stop:
            raise TruncatedPickle(f"the pickle is cut off after {stop - start} bytes", pos)
        op = buf[pos]
        if op == _STOP:
            return pos + 1
        if op in _REFUSED:
            raise pickle.UnpicklingError(f"the pickle {_REFUSED[op]} (byte {pos - start})")
        if op == 0x80:
            raise pickle.UnpicklingError(f"the pickle declares its protocol again at byte {pos - start} (PROTO), "
                                         "which no pickler writes")
        if _SINCE.get(op, 0) > proto:
            raise pickle.UnpicklingError(
                f"opcode {_name(op)} at byte {pos - start} belongs to pickle protocol {_SINCE[op]}, but the "
                f"pickle declares protocol {proto}{'' if proto >= 2 else ' or lower'}")
        counted = _COUNTED.get(op)
        if counted is not None or op == _FRAME:  # FRAME: 8-byte length, then opcodes
            width, signed = counted or (8, False)
            if pos + 1 + width > stop:
                raise TruncatedPickle(f"the pickle is cut off at byte {pos - start}", pos)
            size = int.from_bytes(buf[pos + 1 : pos + 1 + width], "little", signed=signed)
            if size < 0:
                raise pickle.UnpicklingError(f"opcode {op:#04x} at byte {pos - start} has a negative length")
            if pos + 1 + width + size > stop:
                raise TruncatedPickle(f"opcode {op:#04x} at byte {pos - start} claims {size} bytes; "
                                      f"only {stop - pos} remain", pos)
            pos += 1 + width + (0 if op == _FRAME else size)
            continue
        if _cut_off(buf, pos, stop):
            raise TruncatedPickle(f"the pickle is cut off at byte {pos - start}", pos)
        if op in b"rp":
            raise pickle.UnpicklingError(f"the pickle stores a memo index at byte {pos - start} beyond what a "
                                         f"pickle of {stop - start} bytes can hold")
        raise pickle.UnpicklingError(f"invalid pickle opcode {bytes([op])!r} at byte {pos - start}")


def nesting_bound(data: bytes) -> int:
    """An upper bound on how deep the stream can nest hashable containers (tuples, frozensets):
    every level needs one tuple-building opcode byte."""
    return sum(data.count(op) for op in (b"t", b"\x85", b"\x86", b"\x87", b"\x91")) + 1
