"""stackctl.kv_events without vLLM: a real vLLM 0.32.0 batch (the golden fixture) decodes and
re-encodes byte for byte, sequence frames parse, block keys chain, bad payloads are refused.

The fixture is written by tests/e2e/test_vllm_kv_events.py with STACKCTL_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from stackctl.kv_events import (
    END_SEQ,
    MEDIUM_GPU,
    ROOT_KEY,
    BlockStored,
    block_keys,
    decode_batch,
    encode_batch,
    event_summary,
    parse_seq,
    seq_bytes,
)

GOLDEN = Path(__file__).parents[1] / "golden" / "kv_events" / "vllm-0.32.0-batch.msgpack"


@pytest.fixture(scope="module")
def golden() -> bytes:
    if not GOLDEN.exists():
        pytest.fail(
            f"{GOLDEN} is missing: run tests/e2e/test_vllm_kv_events.py with "
            "STACKCTL_UPDATE_GOLDEN=1 to record it from real vLLM",
            pytrace=False,
        )
    return GOLDEN.read_bytes()


def test_golden_batch_decodes(golden):
    batch = decode_batch(golden)
    assert event_summary(batch) == {"BlockStored": 1}
    (event,) = batch.events
    assert isinstance(event, BlockStored)
    assert event.medium == MEDIUM_GPU
    assert event.parent_block_hash is None  # the fixture is a prompt's first blocks
    assert len(event.token_ids) == event.block_size * len(event.block_hashes)


def test_golden_batch_reencodes_byte_identically(golden):
    """The simulator publishes with these structs: what it sends must be what vLLM sends."""
    original = msgspec.msgpack.decode(golden)
    again = encode_batch(decode_batch(golden))
    reencoded = msgspec.msgpack.decode(again)
    # event by event first, so a failure names the fields that differ
    for ours, theirs in zip(reencoded[1], original[1], strict=True):
        assert ours == theirs, "stackctl's re-encoding (left) vs vLLM's event (right)"
    assert reencoded == original
    assert again == golden


@pytest.mark.parametrize("seq", [0, 1, 255, 2**40, 2**63 - 1])
def test_parse_seq_round_trip(seq):
    frame = seq_bytes(seq)
    assert len(frame) == 8
    assert frame == seq.to_bytes(8, "big")  # what vLLM sends: unsigned big-endian
    assert parse_seq(frame) == seq


def test_parse_seq_end_marker():
    assert parse_seq(END_SEQ) == -1
    assert END_SEQ == b"\xff" * 8


@pytest.mark.parametrize("frame", [b"", b"\x00" * 7, b"\x00" * 9, b"kv"])
def test_parse_seq_refuses_other_lengths(frame):
    with pytest.raises(ValueError, match=f"8 bytes, not {len(frame)}"):
        parse_seq(frame)


TOKENS = list(range(1000, 1000 + 4 * 16 + 5))  # 4 full 16-token blocks and 5 left over


def test_block_keys_only_full_blocks():
    assert len(block_keys(TOKENS, 16)) == 4
    assert block_keys(TOKENS[:15], 16) == []
    assert block_keys(TOKENS[:64], 16) == block_keys(TOKENS, 16)


def test_block_keys_of_a_prefix_are_a_prefix():
    keys = block_keys(TOKENS, 16)
    assert len(set(keys)) == 4
    for n in range(5):
        assert block_keys(TOKENS[: n * 16 + 3], 16) == keys[:n]


def test_block_keys_continue_a_chain_from_start_and_parent():
    keys = block_keys(TOKENS, 16)
    for k in range(1, 4):
        assert block_keys(TOKENS, 16, parent=keys[k - 1], start=k * 16) == keys[k:]
    assert block_keys(TOKENS, 16, parent=ROOT_KEY, start=0) == keys


def test_block_keys_name_the_whole_prefix():
    """Equal blocks after different prefixes get different keys (the key chains)."""
    other = [7, *TOKENS[1:]]  # differs in block 0 only
    keys, other_keys = block_keys(TOKENS, 16), block_keys(other, 16)
    assert all(a != b for a, b in zip(keys, other_keys, strict=True))
    assert block_keys(TOKENS[16:32], 16, parent=keys[0]) == [keys[1]]
    assert block_keys(TOKENS[16:32], 16) != [keys[1]]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        b"not msgpack at all",
        msgspec.msgpack.encode({"ts": 1.0, "events": []}),  # a map, not an array
        msgspec.msgpack.encode([1.0, [{"type": "BlockEvicted", "block_hashes": [1]}], 0]),
        msgspec.msgpack.encode([1.0, [{"type": "BlockRemoved"}], 0]),  # no block_hashes
        msgspec.msgpack.encode([1.0, [{"type": "BlockStored", "block_hashes": "x"}], 0]),
    ],
    ids=["empty", "reserved-byte", "not-msgpack", "map", "unknown-type", "no-hashes", "bad-type"],
)
def test_malformed_payload_raises_decode_error(payload):
    assert issubclass(msgspec.DecodeError, ValueError)  # callers catch ValueError
    with pytest.raises(msgspec.DecodeError):
        decode_batch(payload)


def test_truncated_golden_payload_raises_decode_error(golden):
    with pytest.raises(msgspec.DecodeError):
        decode_batch(golden[: len(golden) // 2])
