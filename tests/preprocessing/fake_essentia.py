"""Small stand-ins for essentia's discogs-effnet models: real TensorFlow GraphDef files with the real node names and
output sizes, loaded and run by essentia's own TensorflowPredict* algorithms.

The GraphDef is written straight in protobuf wire format (a few dozen lines): the `tensorboard` package, whose
bundled TensorFlow protos could also write it, is not in our pinned environment, and `tensorflow` itself must not
be imported next to essentia.

- `discogs-effnet-bs64-1.pb`: `serving_default_melspectrogram` [N, 128, 96] -> mean over time -> MatMul ->
  `PartitionedCall:1` = [N, 1280] embeddings (an IdentityN gives the node its two outputs, as in the real model).
- heads: embeddings -> MatMul (zero weights) + bias -> Softmax (genre, `PartitionedCall:0`) or Sigmoid (moods,
  instruments, `model/Sigmoid`); the bias fixes the scores, so the labels the pipeline must pick are known.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DT_FLOAT, DT_INT32 = 1, 3
EMBED_DIM = 1280
MEL_BANDS, PATCH = 96, 128

MOODS = [
    "action",
    "adventure",
    "advertising",
    "background",
    "ballad",
    "calm",
    "children",
    "christmas",
    "commercial",
    "cool",
    "corporate",
    "dark",
    "deep",
    "documentary",
    "drama",
    "dramatic",
    "dream",
    "emotional",
    "energetic",
    "epic",
    "fast",
    "film",
    "fun",
    "funny",
    "game",
    "groovy",
    "happy",
    "heavy",
    "holiday",
    "hopeful",
    "inspiring",
    "love",
    "meditative",
    "melancholic",
    "melodic",
    "motivational",
    "movie",
    "nature",
    "party",
    "positive",
    "powerful",
    "relaxing",
    "retro",
    "romantic",
    "sad",
    "sexy",
    "slow",
    "soft",
    "soundscape",
    "space",
    "sport",
    "summer",
    "trailer",
    "travel",
    "upbeat",
    "uplifting",
]
INSTRUMENTS = [
    "accordion",
    "acousticbassguitar",
    "acousticguitar",
    "bass",
    "beat",
    "bell",
    "bongo",
    "brass",
    "cello",
    "clarinet",
    "classicalguitar",
    "computer",
    "doublebass",
    "drummachine",
    "drums",
    "electricguitar",
    "electricpiano",
    "flute",
    "guitar",
    "harmonica",
    "harp",
    "horn",
    "keyboard",
    "oboe",
    "orchestra",
    "organ",
    "pad",
    "percussion",
    "piano",
    "pipeorgan",
    "rhodes",
    "sampler",
    "saxophone",
    "strings",
    "synthesizer",
    "trombone",
    "trumpet",
    "viola",
    "violin",
    "voice",
]
GENRES = ["Jazz---Bossa Nova", "Electronic---House", "Rock---Punk"] + [f"Genre{i}---Style{i}" for i in range(397)]

# Scores the fake heads produce (everything else is far below the thresholds 0.1 / 0.05 / 0.1).
GENRE_SCORES = {"Jazz---Bossa Nova": 0.6, "Electronic---House": 0.25, "Rock---Punk": 0.05}
MOOD_SCORES = {"relaxing": 0.9, "calm": 0.3, "dark": 0.06, "happy": 0.04}
INSTRUMENT_SCORES = {"piano": 0.8, "acousticguitar": 0.5, "voice": 0.09}
EXPECTED_CAPTION_TAGS = "jazz, bossa nova, electronic, house, relaxing, calm, dark, piano, acoustic guitar"


# ------------------------------------------------------------------------------------------- protobuf writer


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _field_bytes(number: int, data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode()
    return _varint((number << 3) | 2) + _varint(len(data)) + data


def _shape(dims) -> bytes:  # TensorShapeProto: repeated Dim dim = 2 { int64 size = 1 }
    return b"".join(_field_bytes(2, _field_varint(1, d)) for d in dims)


def _tensor(array: np.ndarray) -> bytes:  # TensorProto: dtype = 1, tensor_shape = 2, tensor_content = 4
    array = np.ascontiguousarray(array)
    dtype = {np.dtype(np.float32): DT_FLOAT, np.dtype(np.int32): DT_INT32}[array.dtype]
    content = array.astype(array.dtype.newbyteorder("<")).tobytes()
    return _field_varint(1, dtype) + _field_bytes(2, _shape(array.shape)) + _field_bytes(4, content)


def _attr(kind: str, value) -> bytes:  # AttrValue: list = 1, s = 2, b = 5, type = 6, shape = 7, tensor = 8
    if kind == "type":
        return _field_varint(6, value)
    if kind == "types":  # ListValue.type = 6
        return _field_bytes(1, b"".join(_field_varint(6, t) for t in value))
    if kind == "shape":
        return _field_bytes(7, _shape(value))
    if kind == "tensor":
        return _field_bytes(8, _tensor(value))
    if kind == "bool":
        return _field_varint(5, int(value))
    if kind == "s":
        return _field_bytes(2, value)
    raise ValueError(kind)


def node(name: str, op: str, inputs=(), **attrs) -> bytes:
    """NodeDef: name = 1, op = 2, input = 3, attr = 5 (map<string, AttrValue>)."""
    out = _field_bytes(1, name) + _field_bytes(2, op)
    for i in inputs:
        out += _field_bytes(3, i)
    for key, (kind, value) in attrs.items():
        out += _field_bytes(5, _field_bytes(1, key) + _field_bytes(2, _attr(kind, value)))
    return out


def graph(nodes: list[bytes], producer: int = 561) -> bytes:
    """GraphDef: node = 1, versions = 4 (VersionDef.producer = 1)."""
    return b"".join(_field_bytes(1, n) for n in nodes) + _field_bytes(4, _field_varint(1, producer))


F32 = ("type", DT_FLOAT)
NO_T = ("bool", False)


def _const(name: str, array: np.ndarray) -> bytes:
    dtype = DT_INT32 if array.dtype == np.int32 else DT_FLOAT
    return node(name, "Const", dtype=("type", dtype), value=("tensor", array))


def _matmul(name: str, a: str, b: str) -> bytes:
    return node(name, "MatMul", [a, b], T=F32, transpose_a=NO_T, transpose_b=NO_T)


def effnet_graph(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    weights = (0.1 * rng.standard_normal((MEL_BANDS, EMBED_DIM))).astype(np.float32)
    logits = np.zeros((EMBED_DIM, 400), np.float32)
    return graph(
        [
            node("serving_default_melspectrogram", "Placeholder", dtype=F32, shape=("shape", [-1, PATCH, MEL_BANDS])),
            _const("time_axis", np.array([1], np.int32)),
            node(
                "pooled",
                "Mean",
                ["serving_default_melspectrogram", "time_axis"],
                T=F32,
                Tidx=("type", DT_INT32),
                keep_dims=NO_T,
            ),
            _const("embed_w", weights),
            _matmul("embeddings", "pooled", "embed_w"),
            _const("logits_w", logits),
            _matmul("logits", "embeddings", "logits_w"),
            node("PartitionedCall", "IdentityN", ["logits", "embeddings"], T=("types", [DT_FLOAT, DT_FLOAT])),
        ]
    )


def head_graph(input_name: str, output_name: str, bias: np.ndarray, activation: str) -> bytes:
    n = len(bias)
    return graph(
        [
            node(input_name, "Placeholder", dtype=F32, shape=("shape", [-1, EMBED_DIM])),
            _const("head_w", np.zeros((EMBED_DIM, n), np.float32)),
            _const("head_b", bias.astype(np.float32)),
            _matmul("head_mm", input_name, "head_w"),
            node("head_logits", "BiasAdd", ["head_mm", "head_b"], T=F32, data_format=("s", "NHWC")),
            node(output_name, activation, ["head_logits"], T=F32),
        ]
    )


def _sigmoid_bias(classes: list[str], scores: dict[str, float], floor: float = 0.001) -> np.ndarray:
    p = np.array([scores.get(c, floor) for c in classes], np.float64)
    return np.log(p / (1 - p))


def _softmax_bias(classes: list[str], scores: dict[str, float]) -> np.ndarray:
    rest = (1.0 - sum(scores.values())) / (len(classes) - len(scores))
    return np.log(np.array([scores.get(c, rest) for c in classes], np.float64))


def write_models(folder: Path, *, instrument_classes: list[str] | None = None) -> Path:
    """Write the 4 graphs and 3 label files under the real file names. `instrument_classes` overrides the label
    list (e.g. one too short, to check the size check)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "discogs-effnet-bs64-1.pb").write_bytes(effnet_graph())
    heads = [
        ("genre_discogs400-discogs-effnet-1", "serving_default_model_Placeholder", "PartitionedCall", "Softmax",
         GENRES, _softmax_bias(GENRES, GENRE_SCORES)),
        ("mtg_jamendo_moodtheme-discogs-effnet-1", "model/Placeholder", "model/Sigmoid", "Sigmoid",
         MOODS, _sigmoid_bias(MOODS, MOOD_SCORES)),
        ("mtg_jamendo_instrument-discogs-effnet-1", "model/Placeholder", "model/Sigmoid", "Sigmoid",
         INSTRUMENTS, _sigmoid_bias(INSTRUMENTS, INSTRUMENT_SCORES)),
    ]  # fmt: skip
    for name, inp, out, activation, classes, bias in heads:
        (folder / f"{name}.pb").write_bytes(head_graph(inp, out, bias, activation))
        labels = classes
        if instrument_classes is not None and "instrument" in name:
            labels = instrument_classes
        (folder / f"{name}.json").write_text(json.dumps({"name": name, "classes": list(labels)}))
    return folder
