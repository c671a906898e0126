"""The closed vocabularies of a job's settings: each an ``Enum`` whose values are what TOML keys,
flags and the agreed spec carry (``shared.config`` holds the settings themselves)."""
from __future__ import annotations

from enum import Enum


class BottomSync(str, Enum):
    """How the data owners' bottom segments relate."""

    INDEPENDENT = "independent"  # each owner keeps its own
    AVERAGE = "average"          # SplitFed: sample-weighted average every sync_every epochs
    HANDOFF = "handoff"          # SplitNN: owners take turns, each starting from the previous one's


class Staleness(str, Enum):
    NONE = "none"
    DC = "dc"
    LR = "lr"


class LabelSource(str, Enum):
    BATCH = "batch"   # labels travel with each batch to the stage with the loss
    TOP = "top"       # the stage with the loss holds the labels and looks them up by sample id


class Combine(str, Enum):
    CONCAT = "concat"
    SUM = "sum"


class Task(str, Enum):
    CLASSIFICATION = "classification"
    BINARY = "binary"
    REGRESSION = "regression"


class Align(str, Enum):
    NONE = "none"   # every vertical party holds the same sample ids
    PSI = "psi"     # private set intersection: train on the ids every party holds, revealing no other


class Schedule(str, Enum):
    COSINE = "cosine"
    CONSTANT = "constant"


class Compression(str, Enum):
    """How a tensor crosses the cut (``shared.codec``); the receiving party's role sees float32 either way."""

    NONE = "none"   # float32
    FP16 = "fp16"   # float16: half the bytes; values beyond +-65504 become Inf and are refused
    BF16 = "bf16"   # bfloat16: half the bytes, float32's range, 8 bits of mantissa
    INT8 = "int8"   # int8 with one float32 scale per row (sample): about a quarter of the bytes
    TOPK = "topk"   # each sample's largest values (topk_fraction of them) and their positions


class Delivery(str, Enum):
    """How the broker holds training batches and their answers (docs/guarantees.md)."""

    DURABLE = "durable"      # quorum queues, persistent messages: a broker restart loses nothing
    TRANSIENT = "transient"  # classic queues, in memory: a restart loses them, the owner sends them again


class Privacy(str, Enum):
    """A preset of the cut's defences (docs/privacy.md: what each stops, measured)."""

    OFF = "off"
    STANDARD = "standard"   # see PRIVACY_PRESETS
