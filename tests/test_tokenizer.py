"""Tokenizer wrapper and streaming detokenizer, against the real Grok-1 SentencePiece model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grokcli.config import GROK_1
from grokcli.errors import TokenizerError
from grokcli.tokenizer import IncrementalDetokenizer, Tokenizer, check_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER_PATH = SHARED / "grok1" / "tokenizer.model"
GREEDY_TINY_A = SHARED / "fixtures" / "tiny-a" / "greedy.json"

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    if not TOKENIZER_PATH.exists():
        pytest.skip(f"real Grok-1 tokenizer not found at {TOKENIZER_PATH} (shared data absent)")
    return Tokenizer.load(TOKENIZER_PATH)


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    """Deltas of pushing `ids` one by one, then the flush."""
    detok = IncrementalDetokenizer(tok)
    return [detok.push(i) for i in ids] + [detok.flush()]


def byte_id(tok: Tokenizer, byte: int) -> int:
    return tok._sp.piece_to_id(f"<0x{byte:02X}>")


# --- the wrapper -------------------------------------------------------------------------------


def test_grok1_special_ids_and_size(tok):
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (131072, 0, 2)
    assert tok.id_to_piece(2) == "[EOS]"


def test_sha256_is_the_files_digest(tok):
    assert tok.sha256 == hashlib.sha256(TOKENIZER_PATH.read_bytes()).hexdigest()


def test_load_from_checkpoint_directory(tok):
    assert Tokenizer.load(TOKENIZER_PATH.parent).sha256 == tok.sha256


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer not found: .*nope\.model"):
        Tokenizer.load(tmp_path / "nope.model")


@pytest.mark.parametrize("content", [b"", b"not a sentencepiece model\n" * 10, bytes(range(256))])
def test_garbage_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match="is not a SentencePiece model"):
        Tokenizer.load(path)


def test_check_tokenizer_vocab(tok):
    check_tokenizer(tok, GROK_1)  # fits: no error
    with pytest.raises(TokenizerError, match="tokenizer has 131072 pieces, model expects 32000"):
        check_tokenizer(tok, dataclasses.replace(GROK_1, vocab_size=32000))


def test_encode_adds_no_bos(tok):
    ids = tok.encode("Hello world")
    assert ids and tok.bos_id not in ids
    assert [tok.id_to_piece(i) for i in ids] == ["▁Hello", "▁world"]
    assert tok.encode("") == []


def test_fixture_prompt_and_text(tok):
    if not GREEDY_TINY_A.exists():
        pytest.skip(f"fixture {GREEDY_TINY_A} not found (shared data absent)")
    greedy = json.loads(GREEDY_TINY_A.read_text())
    assert tok.encode(greedy["prompt_text"]) == greedy["prompt_ids"]
    assert tok.decode(greedy["generated_ids"]) == greedy["text"]
    assert "".join(stream(tok, greedy["generated_ids"])) == greedy["text"]


def test_out_of_range_ids_are_rejected(tok):
    with pytest.raises(TokenizerError, match="token id 131072 is outside the vocabulary"):
        tok.decode([5, 131072])
    with pytest.raises(TokenizerError, match="token id -1 is outside"):
        IncrementalDetokenizer(tok).push(-1)
    with pytest.raises(TokenizerError):
        tok.token_text(10**6)


def test_token_text_display_forms(tok):
    hello = tok._sp.piece_to_id("▁Hello")
    assert tok.token_text(hello) == " Hello"  # unlike decode([hello]), the space is kept
    assert tok.token_text(byte_id(tok, 0x41)) == "A"
    assert tok.token_text(byte_id(tok, 0xE2)) == "<0xE2>"
    assert tok.token_text(tok.eos_id) == "[EOS]"
    assert tok.token_text(tok.pad_id) == "[PAD]"


# --- streaming: hand-picked SentencePiece quirks -------------------------------------------------


def test_leading_space_marker(tok):
    hello = tok._sp.piece_to_id("▁Hello")
    lone_space = tok._sp.piece_to_id("▁")
    cases = {
        (hello, hello): ["Hello", " Hello"],  # the first piece loses its dummy-prefix space only
        (tok.pad_id, hello): ["", "Hello"],  # control ids before it do not count as text
        (lone_space, hello): ["", " Hello"],  # a lone "▁" is the consumed dummy prefix
        (lone_space, tok.pad_id, hello): ["", "", " Hello"],
        (byte_id(tok, 0x20), hello): [" ", " Hello"],
        (4, hello): ["\n", " Hello"],  # any visible text ends the start-of-text state
        (tok.unk_id, hello): ["[UNK]", " Hello"],
    }
    for ids, deltas in cases.items():
        got = stream(tok, list(ids))
        assert got == deltas + [""], ids
        assert "".join(got) == tok.decode(list(ids))


def test_split_multibyte_character_is_held_until_complete(tok):
    hello = tok._sp.piece_to_id("▁Hello")
    ids = [hello] + [byte_id(tok, b) for b in "😀".encode()] + [hello]
    assert stream(tok, ids) == ["Hello", "", "", "", "😀", " Hello", ""]


def test_invalid_utf8_matches_sentencepiece(tok):
    f0, x9f, a = byte_id(tok, 0xF0), byte_id(tok, 0x9F), tok._sp.piece_to_id("a")
    for ids in ([f0, x9f], [f0, x9f, a], [f0, tok.eos_id, x9f], [x9f, x9f, f0]):
        deltas = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids)
    assert stream(tok, [f0, x9f]) == ["", "", "\ufffd\ufffd"]  # held, then flushed as decode does


def test_streaming_decodes_each_id_a_bounded_number_of_times(tok):
    """O(1) amortised: the ids handed to SentencePiece grow linearly with the stream."""

    class CountingProcessor:
        def __init__(self, sp):
            self.sp, self.ids_decoded = sp, 0

        def decode(self, ids):
            self.ids_decoded += len(ids)
            return self.sp.decode(ids)

    counting = Tokenizer.__new__(Tokenizer)
    counting.__dict__.update(tok.__dict__)
    counting._sp = CountingProcessor(tok._sp)
    ids = tok.encode("Streaming text with émojis 😀🎉 and 日本語 " * 200)
    assert "".join(stream(counting, ids)) == tok.decode(ids)
    assert counting._sp.ids_decoded <= 2 * len(ids) + 1


# --- streaming: properties -----------------------------------------------------------------------

# Text that exercises the tokenizer: ASCII words and spacing, accents, CJK, emoji (many of which
# only exist as byte-fallback pieces), and rare scripts.
ALPHABET = st.one_of(
    st.sampled_from(list("abc XYZ  \n\t.,!?'")),
    st.sampled_from(list("éèüñçøßÆ")),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # CJK
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # emoji
    st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF, categories=["Lo", "So", "Nd", "Lu"]),
    st.characters(codec="utf-8"),
)
TEXT = st.text(ALPHABET, max_size=40)


@st.composite
def token_ids(draw, tok: Tokenizer):
    """Random id sequences weighted towards the tricky ones: control/unk ids, byte pieces, a lone
    "▁", pieces with a leading "▁", and raw byte spellings of valid multi-byte characters."""
    byte_ids = [byte_id(tok, b) for b in range(256)]
    specials = [0, 1, 2, 3, tok._sp.piece_to_id("▁"), tok._sp.piece_to_id("▁Hello"), 4]
    one = st.one_of(
        st.sampled_from(specials),
        st.sampled_from(byte_ids),
        st.integers(0, tok.vocab_size - 1),
        st.text(ALPHABET, min_size=1, max_size=2).map(lambda s: [byte_id(tok, b) for b in s.encode()]),
    )
    # The start of the sequence decides the dummy-prefix handling, so open with specials often.
    ids: list[int] = draw(st.lists(st.sampled_from(specials), max_size=3))
    for item in draw(st.lists(one, max_size=24)):
        ids.extend(item if isinstance(item, list) else [item])
    return ids


@PROPERTY
@given(data=st.data())
def test_stream_equals_decode_for_random_ids(tok, data):
    ids = data.draw(token_ids(tok))
    assert "".join(stream(tok, ids)) == tok.decode(ids)


@PROPERTY
@given(text=TEXT)
def test_stream_of_encoded_text_equals_decode_without_replacement_chars(tok, text):
    ids = tok.encode(text)
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == ""  # nothing is left over at the end of valid text


@PROPERTY
@given(prefix=TEXT, chars=st.text(ALPHABET, min_size=1, max_size=12))
def test_byte_spelled_characters_stream_one_character_per_last_byte(tok, prefix, chars):
    """Each character spelled in byte pieces appears exactly when its last byte arrives."""
    head = tok.encode(prefix + "x")  # visible text before, so no dummy-prefix stripping applies
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push(i) for i in head) == tok.decode(head)
    for ch in chars:
        encoded = ch.encode()
        deltas = [detok.push(byte_id(tok, b)) for b in encoded]
        assert deltas == [""] * (len(encoded) - 1) + [ch]
    assert detok.flush() == ""


@PROPERTY
@given(prompt=st.text(min_size=1, max_size=30), text=st.text(max_size=40))
def test_continuation_deltas_follow_the_prompt(tok, prompt, text):
    prompt_ids = tok.encode(prompt)
    ids = tok.encode(text)
    if not prompt_ids or prompt_ids[-1] in (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id):
        return
    detok = IncrementalDetokenizer(tok, continuation=True)
    streamed = "".join(detok.push(i) for i in ids) + detok.flush()
    assert streamed == tok.decode(prompt_ids + ids)[len(tok.decode(prompt_ids)):]
