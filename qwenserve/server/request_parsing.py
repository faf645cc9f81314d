"""Parsing of the Generation service's request messages from their raw bytes, in our handlers.

Owns the service's registration (`add_generation_service`, in place of the generated
`add_GenerationServicer_to_server`): every method is registered with a pass-through request
deserializer, and the handler parses the message itself. gRPC's own deserializer answers a
malformed message (a string that is not UTF-8, a message cut short) with UNKNOWN and an internal
class name; here it is INVALID_ARGUMENT naming the field, found by walking the message's wire
format with its descriptor (`describe_malformed`, run only after protobuf refused the bytes).
Reflection, the committed stubs and clients are unaffected: only the server-side deserializer
changes.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from . import qwenserve_pb2 as pb
from .servicer import end_call

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"]
# The walk stops after this many fields (then the message names no field): it runs on the event
# loop; 10,000 fields take about 50 ms on a slow, busy core.
MAX_FIELDS_WALKED = 10_000
_VARINT_MAX_BYTES = 10
_MAX_GROUP_DEPTH = 100  # protobuf's own nesting limit
_FIXED_SIZES = {1: 8, 5: 4}  # wire type -> bytes
_PACKABLE = {FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_INT32,
             FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_ENUM,
             FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64}


class MalformedRequest(ValueError):
    """The request bytes are not a valid message; the text names the field when it can."""


class _Problem(Exception):
    def __init__(self, where: str, what: str):
        super().__init__(f"{where}: {what}")


class _GaveUp(Exception):
    """The walk's budget ran out before it found the problem."""


class _Budget:
    def __init__(self, fields: int):
        self.fields = fields

    def spend(self) -> None:
        self.fields -= 1
        if self.fields < 0:
            raise _GaveUp


def parse_request(message_class: Any, data: bytes) -> Any:
    """`message_class.FromString(data)`, or MalformedRequest naming the bad field."""
    try:
        return message_class.FromString(data)
    except DecodeError:
        raise MalformedRequest(describe_malformed(message_class.DESCRIPTOR, data)) from None


def describe_malformed(descriptor: Descriptor, data: bytes) -> str:
    """What is wrong with `data` as a `descriptor` message, as "field.path: problem"."""
    try:
        _walk(descriptor, memoryview(data), 0, len(data), "", "request", _Budget(MAX_FIELDS_WALKED))
    except _Problem as problem:
        return str(problem)
    except _GaveUp:
        pass
    return f"request: not a valid {descriptor.full_name} message"


def _varint(data: memoryview, pos: int, end: int, where: Callable[[], str]) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(end, pos + _VARINT_MAX_BYTES)):
        value |= (data[i] & 0x7F) << shift
        if data[i] < 0x80:
            return value, i + 1
        shift += 7
    raise _Problem(where(), "truncated" if end - pos < _VARINT_MAX_BYTES else "malformed varint")


def _walk(descriptor: Descriptor, data: memoryview, pos: int, end: int, prefix: str, owner: str,
          budget: _Budget) -> None:
    """Raises _Problem at the first malformed field of the message in data[pos:end]. `prefix`
    is the path of fields inside it ("chat.messages[1]."), `owner` its own name."""
    counts: dict[int, int] = {}
    while pos < end:
        budget.spend()
        key, pos = _varint(data, pos, end, lambda: owner)
        number, wire_type = key >> 3, key & 7
        field: Optional[FieldDescriptor] = descriptor.fields_by_number.get(number)
        where = owner + f" (field {number})"
        if field is not None:
            index = counts.get(number, 0)
            counts[number] = index + 1
            where = prefix + field.name + (f"[{index}]" if field.is_repeated and not _packed(field, wire_type) else "")
        if number == 0:
            raise _Problem(owner, "field number 0")
        if wire_type == 0:
            _, pos = _varint(data, pos, end, lambda: where)
        elif wire_type in _FIXED_SIZES:
            pos += _FIXED_SIZES[wire_type]
            if pos > end:
                raise _Problem(where, "truncated")
        elif wire_type == 2:
            length, pos = _varint(data, pos, end, lambda: where)
            if pos + length > end:
                raise _Problem(where, "truncated")
            if field is not None:
                _check_payload(field, wire_type, data, pos, pos + length, where, budget)
            pos += length
        elif wire_type == 3:
            pos = _skip_group(data, pos, end, number, where, budget)
        else:  # 4 (an end-group with no start) or 6, 7 (no such wire type)
            raise _Problem(where, f"invalid wire type {wire_type}")


def _packed(field: FieldDescriptor, wire_type: int) -> bool:
    return field.is_repeated and wire_type == 2 and field.type in _PACKABLE


def _check_payload(field: FieldDescriptor, wire_type: int, data: memoryview, start: int, end: int,
                   where: str, budget: _Budget) -> None:
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            bytes(data[start:end]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Problem(where, "not valid UTF-8") from None
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        _walk(field.message_type, data, start, end, where + ".", where, budget)
    elif _packed(field, wire_type) and start < end and data[end - 1] >= 0x80:
        raise _Problem(where, "truncated")  # the last varint of a packed run never ends


def _skip_group(data: memoryview, pos: int, end: int, number: int, where: str, budget: _Budget) -> int:
    """Past the end-group tag of group `number` (groups are proto2; an unknown one is skipped,
    as protobuf skips it), nested groups included."""
    open_groups = [number]
    while pos < end:
        budget.spend()
        key, pos = _varint(data, pos, end, lambda: where)
        inner, wire_type = key >> 3, key & 7
        if wire_type == 4:
            if inner != open_groups.pop():
                raise _Problem(where, "mismatched end of group")
            if not open_groups:
                return pos
        elif wire_type == 3:
            if len(open_groups) >= _MAX_GROUP_DEPTH:
                raise _Problem(where, "groups nested too deeply")
            open_groups.append(inner)
        elif wire_type == 0:
            _, pos = _varint(data, pos, end, lambda: where)
        elif wire_type in _FIXED_SIZES:
            pos += _FIXED_SIZES[wire_type]
        elif wire_type == 2:
            length, pos = _varint(data, pos, end, lambda: where)
            pos += length
        else:
            raise _Problem(where, f"invalid wire type {wire_type}")
    raise _Problem(where, "truncated")


def _unary_handler(method: Callable, message_class: Any) -> Callable:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext):
        try:
            request = parse_request(message_class, raw)
        except MalformedRequest as e:
            del raw  # not held by the cycle a unary abort makes (see servicer.end_call)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        del raw
        return await method(request, context)
    return handle


def _stream_handler(method: Callable, message_class: Any) -> Callable:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext):
        try:
            request = parse_request(message_class, raw)
        except MalformedRequest as e:
            end_call(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return
        del raw
        async for response in method(request, context):
            yield response
    return handle


def add_generation_service(servicer: Any, server: grpc.aio.Server) -> None:
    """Registers `servicer`'s methods for every method of the Generation service."""
    handlers = {}
    for method in SERVICE.methods:
        request_class = getattr(pb, method.input_type.name)
        serialize = getattr(pb, method.output_type.name).SerializeToString
        implementation = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _stream_handler(implementation, request_class), response_serializer=serialize)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary_handler(implementation, request_class), response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
