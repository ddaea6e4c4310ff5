"""SentencePiece wrapper and the incremental (streaming) detokenizer.

The streaming detokenizer relies on how SentencePiece decodes (sentencepiece_processor.cc,
`Decode`): pieces are decoded left to right by a forward-only state machine, except that runs of
byte pieces are collected and decoded together as UTF-8 (one U+FFFD per invalid byte), and the
first visible piece loses its leading "▁" (the dummy-prefix space). So the text of a prefix of the
ids never changes once the prefix does not end inside an unfinished UTF-8 character, and the rest
can be decoded on its own behind an "anchor" piece that has already ended the start-of-text state.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from .layout import TOKENIZER_NAME
from .errors import TokenizerError
from .fsutil import FileTooLargeError, read_regular_file

MAX_TOKENIZER_BYTES = 64 << 20  # Grok-1's is 2.2 MB

_SPACE = "\u2581"  # SentencePiece's "▁" whitespace marker


class Tokenizer:
    """A SentencePiece model with the few operations generation needs (no BOS is ever added)."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path | None = None, sha256: str = ""):
        self._sp = processor
        self.path = path  # the .model file it was read from (None when built from bytes)
        self.sha256 = sha256  # hex digest of the model file's bytes
        self.vocab_size: int = processor.get_piece_size()
        self.eos_id: int = processor.eos_id()
        self.pad_id: int = processor.pad_id()
        self.bos_id: int = processor.bos_id()
        self.unk_id: int = processor.unk_id()
        self._pieces = [processor.id_to_piece(i) for i in range(self.vocab_size)]
        # Byte-fallback pieces ("<0xE2>") map to their byte value; other ids to -1.
        self._byte_of = [int(p[3:5], 16) if processor.is_byte(i) else -1 for i, p in enumerate(self._pieces)]
        # Ids that decode to nothing and leave SentencePiece's start-of-text state as it was.
        self._invisible = frozenset(i for i in range(self.vocab_size)
                                    if processor.is_control(i) or (processor.is_unknown(i) and not processor.decode([i])))
        self._anchor_id, self._anchor_text = self._find_anchor()

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read a SentencePiece .model file (or the tokenizer.model inside a checkpoint directory)."""
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / TOKENIZER_NAME
        try:
            data = read_regular_file(path, MAX_TOKENIZER_BYTES)  # a FIFO never blocks, /dev/zero never fills memory
        except FileNotFoundError:
            raise TokenizerError(f"tokenizer not found: {path}") from None
        except FileTooLargeError:
            raise TokenizerError(f"{path} is larger than {MAX_TOKENIZER_BYTES >> 20} MiB: not a tokenizer") from None
        except OSError as e:
            raise TokenizerError(f"cannot read tokenizer {path}: {e.strerror or e}") from None
        return cls.from_bytes(data, path)

    @classmethod
    def from_bytes(cls, data: bytes, path: Path | None = None) -> "Tokenizer":
        """Build a tokenizer from the bytes of a SentencePiece model."""
        where = str(path) if path is not None else "tokenizer"
        processor = spm.SentencePieceProcessor()
        try:
            processor.load_from_serialized_proto(data)
            if processor.get_piece_size() <= 0:
                raise RuntimeError("no pieces")
        except Exception:  # sentencepiece raises RuntimeError/OSError/ValueError depending on the damage
            raise TokenizerError(f"{where} is not a SentencePiece model ({len(data)} bytes could not be parsed)") from None
        try:
            return cls(processor, path, hashlib.sha256(data).hexdigest())
        except UnicodeDecodeError:  # SentencePiece loaded it, but a piece is not UTF-8 (a damaged file)
            raise TokenizerError(f"{where} is a damaged SentencePiece model (a piece is not valid UTF-8)") from None

    def _find_anchor(self) -> tuple[int, str]:
        # A visible piece without a leading "▁": decoding it first ends the start-of-text state and
        # flushes any byte run, so decode([anchor] + ids) = anchor text + ids decoded mid-text.
        for i, piece in enumerate(self._pieces):
            if (i in self._invisible or self._byte_of[i] >= 0 or self._sp.is_unknown(i)
                    or piece.startswith(_SPACE)):
                continue
            text = self._sp.decode([i])
            if text:
                return i, text
        raise TokenizerError("tokenizer has no plain text piece; cannot stream its output")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS (as the reference encodes prompts)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of token ids (control tokens decode to nothing)."""
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise TokenizerError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._sp.decode(ids)

    def _decode_continuation(self, ids: list[int]) -> str:
        """Text `ids` add when they follow visible text (no dummy-prefix space is stripped)."""
        return self._sp.decode([self._anchor_id, *ids])[len(self._anchor_text):]

    def id_to_piece(self, token_id: int) -> str:
        """The raw SentencePiece piece of an id (e.g. "▁Hello", "<0xE2>", "[EOS]")."""
        self._check_id(token_id)
        return self._pieces[token_id]

    def is_byte(self, token_id: int) -> bool:
        """Whether the id is a byte-fallback piece like <0xE2>."""
        self._check_id(token_id)
        return self._byte_of[token_id] >= 0

    def token_text(self, token_id: int) -> str:
        """One token shown on its own (for --show-probs): "▁" as a space, ASCII byte pieces as
        their character, other byte pieces and control tokens as their piece ("<0xE2>", "[EOS]")."""
        self._check_id(token_id)
        byte = self._byte_of[token_id]
        if byte >= 0:
            return chr(byte) if byte < 0x80 else self._pieces[token_id]
        if token_id in self._invisible:
            return self._pieces[token_id]
        return self._pieces[token_id].replace(_SPACE, " ")

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def check_tokenizer(tokenizer: Tokenizer, cfg) -> None:
    """Raise TokenizerError when the tokenizer's vocabulary does not fit the model config."""
    if tokenizer.vocab_size != cfg.vocab_size:
        raise TokenizerError(
            f"tokenizer has {tokenizer.vocab_size} pieces, model expects {cfg.vocab_size}"
            + (f" ({tokenizer.path})" if tokenizer.path is not None else ""))


def _utf8_incomplete(run: list[int]) -> bool:
    """Whether a byte run ends with a lead byte still waiting for continuation bytes.

    Deliberately loose (any lead byte counts, overlong or not): a false "incomplete" only delays
    text, while a false "complete" could let a character straddle the point where we cut."""
    for back in range(1, min(3, len(run)) + 1):
        byte = run[-back]
        if 0x80 <= byte < 0xC0:  # continuation byte: look further back for the lead
            continue
        needed = 2 if 0xC0 <= byte < 0xE0 else 3 if 0xE0 <= byte < 0xF0 else 4 if 0xF0 <= byte < 0xF8 else 1
        return needed > back
    return False


class IncrementalDetokenizer:
    """Turns token ids, one at a time, into text deltas whose concatenation (with `flush()`)
    equals `tokenizer.decode(all ids)` exactly.

    Text is held back only while the ids end inside a UTF-8 character spelled by byte-fallback
    pieces, so a character split across tokens never streams as U+FFFD. Each id is decoded once
    (plus a one-piece anchor), so the cost per token is O(1) amortised.
    """

    def __init__(self, tokenizer: Tokenizer, continuation: bool = False):
        """`continuation=True`: the ids continue a text (a prompt), so the first piece keeps the
        leading space that `decode` drops at the start of a text ("▁there" -> " there"); the deltas
        then equal `decode(prompt + ids)[len(decode(prompt)):]` for a prompt ending in a visible id."""
        self._tok = tokenizer
        self._pending: list[int] = []  # ids since the last point where the text was final
        self._started = continuation  # whether the start-of-text state is over
        self.token_ids: list[int] = []  # every id pushed so far

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it makes final (may be "")."""
        token_id = int(token_id)
        self._tok._check_id(token_id)
        self.token_ids.append(token_id)
        self._pending.append(token_id)
        if self._tok._byte_of[token_id] >= 0:
            run = [self._tok._byte_of[i] for i in self._pending[-3:] if self._tok._byte_of[i] >= 0]
            if _utf8_incomplete(run):
                return ""  # a multi-byte character is still being spelled out
        return self._emit()

    def flush(self) -> str:
        """The text still held back (an unfinished UTF-8 character, decoded as SentencePiece does)."""
        return self._emit()

    def _emit(self) -> str:
        ids, self._pending = self._pending, []
        if not ids:
            return ""
        if self._started:
            return self._tok._decode_continuation(ids)
        # Until a visible id appears the state is SentencePiece's initial one (only control ids
        # so far, which decode to nothing), so these ids decode exactly as at the start of text.
        if any(i not in self._tok._invisible for i in ids):
            self._started = True
        return self._tok._sp.decode(ids)
