"""Caffe's ``Datum``, ``BlobProto`` and ``BlobShape`` messages, without Caffe or protoc.

The messages are declared here with protobuf's descriptor API and built at
import time in a private descriptor pool, so no generated ``_pb2`` file and no
``caffe_pb2`` are needed. Names, types and field numbers follow Caffe's
``caffe.proto`` (proto2, package ``caffe``), so the wire format is Caffe's::

    message BlobShape { repeated int64 dim = 1 [packed = true]; }
    message BlobProto {
      optional BlobShape shape = 7;
      repeated float data = 5 [packed = true];   repeated float diff = 6 [packed = true];
      repeated double double_data = 8 [packed = true];  repeated double double_diff = 9 [packed = true];
      optional int32 num = 1 [default = 0];  optional int32 channels = 2 [default = 0];
      optional int32 height = 3 [default = 0];  optional int32 width = 4 [default = 0];
    }
    message Datum {
      optional int32 channels = 1;  optional int32 height = 2;  optional int32 width = 3;
      optional bytes data = 4;      // C x H x W uint8, BGR, or an encoded image if `encoded`
      optional int32 label = 5;
      repeated float float_data = 6;
      optional bool encoded = 7 [default = false];
    }
"""

from __future__ import annotations

from typing import Dict, Optional, Type

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

Field = descriptor_pb2.FieldDescriptorProto
OPTIONAL, REPEATED = Field.LABEL_OPTIONAL, Field.LABEL_REPEATED


def _add_field(
    owner: descriptor_pb2.DescriptorProto,
    name: str,
    number: int,
    field_type: int,
    label: int = OPTIONAL,
    *,
    packed: bool = False,
    default: Optional[str] = None,
    type_name: Optional[str] = None,
) -> None:
    field = owner.field.add(name=name, number=number, type=field_type, label=label)
    if packed:
        field.options.packed = True
    if default is not None:
        field.default_value = default
    if type_name is not None:
        field.type_name = type_name


def caffe_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The subset of ``caffe.proto`` this recipe reads, as a descriptor."""
    proto = descriptor_pb2.FileDescriptorProto(name="xnornet_caffe_subset.proto", package="caffe", syntax="proto2")

    shape = proto.message_type.add(name="BlobShape")
    _add_field(shape, "dim", 1, Field.TYPE_INT64, REPEATED, packed=True)

    blob = proto.message_type.add(name="BlobProto")
    _add_field(blob, "shape", 7, Field.TYPE_MESSAGE, type_name=".caffe.BlobShape")
    _add_field(blob, "data", 5, Field.TYPE_FLOAT, REPEATED, packed=True)
    _add_field(blob, "diff", 6, Field.TYPE_FLOAT, REPEATED, packed=True)
    _add_field(blob, "double_data", 8, Field.TYPE_DOUBLE, REPEATED, packed=True)
    _add_field(blob, "double_diff", 9, Field.TYPE_DOUBLE, REPEATED, packed=True)
    for name, number in (("num", 1), ("channels", 2), ("height", 3), ("width", 4)):
        _add_field(blob, name, number, Field.TYPE_INT32, default="0")

    datum = proto.message_type.add(name="Datum")
    for name, number in (("channels", 1), ("height", 2), ("width", 3)):
        _add_field(datum, name, number, Field.TYPE_INT32)
    _add_field(datum, "data", 4, Field.TYPE_BYTES)
    _add_field(datum, "label", 5, Field.TYPE_INT32)
    _add_field(datum, "float_data", 6, Field.TYPE_FLOAT, REPEATED)
    _add_field(datum, "encoded", 7, Field.TYPE_BOOL, default="false")
    return proto


def build_message_classes() -> Dict[str, Type[message.Message]]:
    """Message classes by short name, from a private pool (no clash with a real caffe_pb2)."""
    pool = descriptor_pool.DescriptorPool()
    pool.Add(caffe_file_descriptor())
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{name}"))
        for name in ("BlobShape", "BlobProto", "Datum")
    }


_CLASSES = build_message_classes()
BlobShape: Type[message.Message] = _CLASSES["BlobShape"]
BlobProto: Type[message.Message] = _CLASSES["BlobProto"]
Datum: Type[message.Message] = _CLASSES["Datum"]
DecodeError = message.DecodeError
