"""Conversions between the wire messages (``fipo.v1``) and the plain records of ``server.types``.

Used by the servicer and by the Python client. Decoding is lenient on purpose: protobuf
refuses a whole message when a string field holds invalid UTF-8, which would turn one bad
item into an opaque failure of the entire batch. We parse such messages again with a mirror
schema whose string fields are ``bytes`` (same wire format), decode with ``surrogateescape``,
and let the guards report the broken item as INVALID with the offset, item by item.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from server.gen.fipo.v1 import reward_pb2 as pb
from server.rewards import make_result
from server.types import AnswerFormat, RewardScheme, ScoreItem, ScoreResult, Status

FORMAT_TO_PB = {
    AnswerFormat.LATEX: pb.ANSWER_FORMAT_LATEX,
    AnswerFormat.EXPR: pb.ANSWER_FORMAT_EXPR,
    AnswerFormat.CHOICE: pb.ANSWER_FORMAT_CHOICE,
}
FORMAT_FROM_PB = {v: k for k, v in FORMAT_TO_PB.items()} | {
    pb.ANSWER_FORMAT_UNSPECIFIED: AnswerFormat.LATEX
}
SCHEME_TO_PB = {
    RewardScheme.BINARY: pb.REWARD_SCHEME_BINARY,
    RewardScheme.SIGNED: pb.REWARD_SCHEME_SIGNED,
}
SCHEME_FROM_PB = {v: k for k, v in SCHEME_TO_PB.items()} | {
    pb.REWARD_SCHEME_UNSPECIFIED: RewardScheme.BINARY
}
STATUS_TO_PB = {s: pb.Status.Value(f"STATUS_{s.value}") for s in Status}
STATUS_FROM_PB = {v: k for k, v in STATUS_TO_PB.items()}

#: What the servicer gets per wire item: a record to score, or a ready INVALID result.
Decoded = ScoreItem | ScoreResult


def item_to_pb(item: ScoreItem) -> pb.ScoreItem:
    """A ``ScoreItem`` as its wire message."""
    msg = pb.ScoreItem(
        id=item.id,
        response=item.response,
        golds=list(item.golds),
        answer_format=FORMAT_TO_PB[item.answer_format],
        reward_scheme=SCHEME_TO_PB[item.reward_scheme],
    )
    for name in ("response_tokens", "max_response_tokens", "overlong_buffer", "deadline_s"):
        value = getattr(item, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def item_from_pb(msg) -> Decoded:
    """A wire item (strict or lenient mirror) as a ``ScoreItem``, or an INVALID result."""
    text = _text
    item_id = text(msg.id)
    fmt = FORMAT_FROM_PB.get(msg.answer_format)
    scheme = SCHEME_FROM_PB.get(msg.reward_scheme)
    problem = None
    if fmt is None:
        problem = f"unknown answer_format {msg.answer_format}"
    elif scheme is None:
        problem = f"unknown reward_scheme {msg.reward_scheme}"
    if problem:
        bare = ScoreItem(id=_wire_safe(item_id), response="", golds=())
        return make_result(bare, Status.INVALID, message=problem)
    item = ScoreItem(
        id=item_id,
        response=text(msg.response),
        golds=tuple(text(g) for g in msg.golds),
        answer_format=fmt,
        reward_scheme=scheme,
        response_tokens=msg.response_tokens if msg.HasField("response_tokens") else None,
        max_response_tokens=(
            msg.max_response_tokens if msg.HasField("max_response_tokens") else None
        ),
        overlong_buffer=msg.overlong_buffer if msg.HasField("overlong_buffer") else None,
        deadline_s=(msg.deadline_s or None) if msg.HasField("deadline_s") else None,
    )
    if _wire_safe(item_id) != item_id:
        # The id itself is not UTF-8: echo a repaired id and report the item.
        bare = ScoreItem(id=_wire_safe(item_id), response="", golds=())
        return make_result(bare, Status.INVALID, message="id is not valid UTF-8")
    return item


def _text(value: str | bytes) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value


def result_to_pb(result: ScoreResult) -> pb.ScoreResult:
    """A ``ScoreResult`` as its wire message."""
    return pb.ScoreResult(
        id=_wire_safe(result.id),
        reward=result.reward,
        correct=result.correct,
        status=STATUS_TO_PB[result.status],
        extracted_prediction=_wire_safe(result.extracted_prediction),
        extracted_gold=_wire_safe(result.extracted_gold),
        overlong_penalty=result.overlong_penalty,
        latency_ms=result.latency_ms,
        message=_wire_safe(result.message),
        flags=list(result.flags),
    )


def _wire_safe(s: str) -> str:
    """Strings echoed from a lenient decode may hold surrogates; protobuf would refuse them."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def result_from_pb(msg: pb.ScoreResult) -> ScoreResult:
    """A wire result as a ``ScoreResult``."""
    return ScoreResult(
        id=msg.id,
        reward=msg.reward,
        correct=msg.correct,
        status=STATUS_FROM_PB.get(msg.status, Status.INTERNAL),
        extracted_prediction=msg.extracted_prediction,
        extracted_gold=msg.extracted_gold,
        overlong_penalty=msg.overlong_penalty,
        latency_ms=msg.latency_ms,
        message=msg.message,
        flags=tuple(msg.flags),
    )


@functools.cache
def _lenient_classes():
    """Mirror messages of ScoreItem / ScoreRequest with ``bytes`` in place of ``string``."""
    fdp = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = "fipo/v1/reward_lenient.proto"
    fdp.package = "fipo.v1.lenient"
    for message in fdp.message_type:
        for f in message.field:
            if f.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
                f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            if f.type_name.startswith(".fipo.v1."):
                f.type_name = ".fipo.v1.lenient." + f.type_name[len(".fipo.v1.") :]
    del fdp.service[:]
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    item_cls = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("fipo.v1.lenient.ScoreItem")
    )
    req_cls = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("fipo.v1.lenient.ScoreRequest")
    )
    return item_cls, req_cls


def decode_item(data: bytes) -> Decoded:
    """Deserialize one streamed ``ScoreItem`` (never raises on bad UTF-8)."""
    try:
        return item_from_pb(pb.ScoreItem.FromString(data))
    except DecodeError:
        item_cls, _ = _lenient_classes()
        return item_from_pb(item_cls.FromString(data))  # still raises on broken protobuf


def decode_request(data: bytes) -> list[Decoded]:
    """Deserialize a ``ScoreRequest`` into decoded items (never raises on bad UTF-8)."""
    try:
        items: Iterable = pb.ScoreRequest.FromString(data).items
    except DecodeError:
        _, req_cls = _lenient_classes()
        items = req_cls.FromString(data).items
    return [item_from_pb(m) for m in items]
