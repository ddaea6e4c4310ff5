"""ModelConfig: the Grok-1 preset, ffn_size, config.json reading and validation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from grokcli.config import GROK_1, ModelConfig, ffn_size, load_config
from grokcli.errors import ConfigError

from conftest import TINY_CONFIG


def reference_ffn_size(emb_size, widening_factor):
    # As written in xai-org/grok-1 model.py.
    _ffn_size = int(widening_factor * emb_size) * 2 // 3
    _ffn_size = _ffn_size + (8 - _ffn_size) % 8
    return _ffn_size


def test_grok1_preset_matches_run_py():
    assert GROK_1.vocab_size == 131072 and GROK_1.pad_token == 0 and GROK_1.eos_token == 2
    assert GROK_1.sequence_len == 8192 and GROK_1.emb_size == 6144 and GROK_1.key_size == 128
    assert (GROK_1.num_q_heads, GROK_1.num_kv_heads, GROK_1.num_layers) == (48, 8, 64)
    assert (GROK_1.num_experts, GROK_1.num_selected_experts, GROK_1.widening_factor) == (8, 2, 8)
    assert GROK_1.embedding_multiplier_scale == 78.38367176906169
    assert GROK_1.output_multiplier_scale == 0.5773502691896257
    assert GROK_1.attn_output_multiplier == 0.08838834764831845
    assert GROK_1.ffn_size == 32768


@pytest.mark.parametrize("emb,w", [(6144, 8), (64, 8), (96, 4), (32, 2), (100, 3), (50, 1.5), (7, 1)])
def test_ffn_size_follows_the_reference(emb, w):
    assert ffn_size(emb, w) == reference_ffn_size(emb, w)
    assert ffn_size(emb, w) % 8 == 0


def test_fixture_configs_agree_with_their_ffn_size(fixtures_dir):
    for name in ("tiny-a", "tiny-b"):
        data = json.loads((fixtures_dir / name / "config.json").read_text())
        assert load_config(fixtures_dir / name).ffn_size == data["ffn_size"]


def test_directory_without_config_is_grok1(tmp_path):
    assert load_config(tmp_path) == GROK_1


def test_extra_keys_are_ignored(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONFIG, "fprop_dtype": "bfloat16", "notes": [1]}))
    assert load_config(tmp_path) == ModelConfig(**TINY_CONFIG)


@pytest.mark.parametrize("field", ["vocab_size", "num_experts", "attn_output_multiplier"])
def test_missing_field_is_named(tmp_path, field):
    data = dict(TINY_CONFIG)
    del data[field]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f"missing field '{field}'"):
        load_config(tmp_path)


@pytest.mark.parametrize("field,value", [("num_layers", "2"), ("emb_size", 32.5), ("num_experts", True),
                                         ("output_multiplier_scale", "big"), ("key_size", None)])
def test_ill_typed_field_is_named(tmp_path, field, value):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONFIG, field: value}))
    with pytest.raises(ConfigError, match=field):
        load_config(tmp_path)


@pytest.mark.parametrize("changes,needle", [
    (dict(num_q_heads=3, num_kv_heads=2), "multiple of num_kv_heads"),
    (dict(num_selected_experts=9), "exceeds num_experts"),
    (dict(eos_token=256), "outside the vocabulary"),
    (dict(num_layers=0), "must be positive"),
])
def test_inconsistent_values_are_rejected(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig(**{**TINY_CONFIG, **changes})


def test_invalid_json_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(tmp_path)


def test_to_json_round_trips():
    cfg = ModelConfig(**TINY_CONFIG)
    assert ModelConfig.from_dict(cfg.to_json()) == cfg
    assert dataclasses.asdict(cfg).items() <= cfg.to_json().items()


@pytest.mark.parametrize("changes,needle", [
    (dict(num_layers=10 ** 5), "'num_layers' is 100,000, above"),
    (dict(num_layers=10 ** 9), "'num_layers' is 1,000,000,000, above"),
    (dict(vocab_size=1 << 23), "'vocab_size'"),
    (dict(emb_size=1 << 17), "'emb_size'"),
    (dict(num_experts=10 ** 6), "'num_experts'"),
    (dict(sequence_len=10 ** 12), "'sequence_len'"),
    (dict(widening_factor=1e9), "'widening_factor'"),
    (dict(widening_factor=-2), "'widening_factor'"),
    (dict(embedding_multiplier_scale=1e300), "'embedding_multiplier_scale'"),
    (dict(num_layers=4096, emb_size=65536, vocab_size=1 << 22), "parameters, more than"),
])
def test_values_are_bounded_before_anything_is_built(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig(**{**TINY_CONFIG, **changes})


def test_grok1_parameter_count_is_its_size():
    assert 3.1e11 < GROK_1.parameter_count < 3.2e11  # "314B parameters"


def test_config_json_that_is_not_a_regular_file_never_blocks(tmp_path):
    import os
    import time

    os.mkfifo(tmp_path / "config.json")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path)
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize("text,needle", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"num_layers": ' + "9" * 5000 + "}", "not valid JSON"),
    (" " * (2 << 20), "larger than 1 MiB"),
    (json.dumps({**TINY_CONFIG, "num_layers": float("nan")}), "'num_layers' must be an integer"),
])
def test_hostile_config_json_is_one_config_error(tmp_path, text, needle):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(tmp_path)


def test_nonfinite_float_field_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONFIG, "attn_output_multiplier": float("inf")}))
    with pytest.raises(ConfigError, match="attn_output_multiplier"):
        load_config(tmp_path)
