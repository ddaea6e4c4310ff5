"""Model configuration: the reference's field names, the Grok-1 preset, config.json reading."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from .layout import CONFIG_NAME
from .errors import ConfigError
from .fsutil import FileTooLargeError, read_regular_file

# config.json is a few hundred bytes; anything past this is not a config.
MAX_CONFIG_BYTES = 1 << 20

# Upper bounds on the integer fields: far above any model of this architecture (Grok-1 in
# brackets), low enough that nothing built per layer, head or expert can exhaust memory or time
# before the files are looked at.
LIMITS = {
    "vocab_size": 1 << 22,  # [131072]
    "sequence_len": 1 << 20,  # [8192]
    "emb_size": 1 << 16,  # [6144]
    "key_size": 1 << 12,  # [128]
    "num_q_heads": 1 << 12,  # [48]
    "num_kv_heads": 1 << 12,  # [8]
    "num_layers": 1 << 12,  # [64]
    "num_experts": 1 << 10,  # [8]
    "num_selected_experts": 1 << 10,  # [2]
}
MAX_WIDENING_FACTOR = 64.0  # [8]
MAX_PARAMETERS = 10 ** 13  # [3.2e11]
MAX_MULTIPLIER = 1e6  # |embedding/output/attention multipliers|


def ffn_size(emb_size: int, widening_factor: float) -> int:
    """The reference's `ffn_size`: int(w * emb) * 2 // 3, rounded up to a multiple of 8."""
    size = int(widening_factor * emb_size) * 2 // 3
    return size + (8 - size) % 8


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Grok-1-architecture model, named as in xAI's `run.py`."""

    vocab_size: int  # tokenizer vocabulary, also the embedding table's rows
    pad_token: int  # id masked out as an attention key
    eos_token: int  # id that ends generation
    sequence_len: int  # context length the model was trained for
    embedding_multiplier_scale: float  # input embeddings are multiplied by this
    output_multiplier_scale: float  # logits are multiplied by this
    emb_size: int  # width of the residual stream
    key_size: int  # width of one attention head
    num_q_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when fewer than query heads)
    num_layers: int  # decoder layers
    widening_factor: float  # expert ffn width relative to emb_size (see ffn_size)
    attn_output_multiplier: float  # attention scores are multiplied by this before the tanh cap
    num_experts: int  # experts per MoE layer
    num_selected_experts: int  # experts active per token (top-k)

    @property
    def ffn_size(self) -> int:
        """Width of each expert's hidden layer, exactly as the reference computes it."""
        return ffn_size(self.emb_size, self.widening_factor)

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one key/value head."""
        return self.num_q_heads // self.num_kv_heads

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"config field {f.name!r} must be an integer, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"config field {f.name!r} must be a number, got {value!r}")
        for name, limit in LIMITS.items():
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field {name!r} must be positive, got {getattr(self, name)}")
            if getattr(self, name) > limit:
                raise ConfigError(f"config field {name!r} is {getattr(self, name):,}, above the {limit:,} "
                                  "grokcli accepts")
        if not 0 < self.widening_factor <= MAX_WIDENING_FACTOR or self.ffn_size <= 0:
            raise ConfigError(f"config field 'widening_factor' must be in (0, {MAX_WIDENING_FACTOR:g}] and give "
                              f"a positive ffn_size, got {self.widening_factor}")
        for name in ("embedding_multiplier_scale", "output_multiplier_scale", "attn_output_multiplier"):
            if abs(getattr(self, name)) > MAX_MULTIPLIER:
                raise ConfigError(f"config field {name!r} is {getattr(self, name):g}, beyond +-{MAX_MULTIPLIER:g}")
        if (n := self.parameter_count) > MAX_PARAMETERS:
            raise ConfigError(f"the config describes {n:.3g} parameters, more than the {MAX_PARAMETERS:.0e} "
                              "grokcli accepts")
        if self.num_q_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.num_selected_experts > self.num_experts:
            raise ConfigError(
                f"num_selected_experts ({self.num_selected_experts}) exceeds num_experts ({self.num_experts})")
        if self.key_size % 2:
            raise ConfigError(f"key_size must be even for rotary embeddings, got {self.key_size}")
        for name in ("pad_token", "eos_token"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name} {getattr(self, name)} is outside the vocabulary (0..{self.vocab_size - 1})")

    @property
    def parameter_count(self) -> int:
        """Parameters (dequantised) the config describes, by arithmetic: nothing is built per layer."""
        attn = self.emb_size * self.key_size * (2 * self.num_q_heads + 2 * self.num_kv_heads)
        moe = self.num_experts * 3 * self.emb_size * self.ffn_size + self.emb_size * self.num_experts
        norms = 4 * self.emb_size
        return self.num_layers * (attn + moe + norms) + self.vocab_size * self.emb_size + self.emb_size

    def to_json(self) -> dict:
        """The config as a JSON-ready dict (reference field names, plus the derived ffn_size)."""
        out = dataclasses.asdict(self)
        out["ffn_size"] = self.ffn_size
        return out

    @classmethod
    def from_dict(cls, data: object, source: str = "config") -> "ModelConfig":
        """Build a config from a mapping holding the reference's field names; extra keys are ignored."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                raise ConfigError(f"{source}: missing field {f.name!r}")
            value = data[f.name]
            if f.type in ("int", int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"{source}: field {f.name!r} must be an integer, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{source}: field {f.name!r} must be a number, got {value!r}")
            values[f.name] = value
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


GROK_1 = ModelConfig(
    vocab_size=131072,
    pad_token=0,
    eos_token=2,
    sequence_len=8192,
    embedding_multiplier_scale=78.38367176906169,
    output_multiplier_scale=0.5773502691896257,
    emb_size=6144,
    key_size=128,
    num_q_heads=48,
    num_kv_heads=8,
    num_layers=64,
    widening_factor=8,
    attn_output_multiplier=0.08838834764831845,
    num_experts=8,
    num_selected_experts=2,
)


def load_config(checkpoint_dir: str | Path) -> ModelConfig:
    """The config of a checkpoint directory: its config.json, or Grok-1 when there is none.

    Reads only a regular file of at most MAX_CONFIG_BYTES (a FIFO never blocks it) and bounds
    every value (LIMITS) before anything is built from it.
    """
    path = Path(checkpoint_dir) / CONFIG_NAME
    if not os.path.lexists(path):
        return GROK_1
    try:
        raw = read_regular_file(path, MAX_CONFIG_BYTES)
    except FileTooLargeError:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, not a model config") from None
    except OSError as e:  # NotRegularFileError (a FIFO, a folder) included
        raise ConfigError(f"{path}: {e.strerror or 'not a regular file'}") from None
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and integers of too many digits
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return ModelConfig.from_dict(data, source=str(path))
