# ruff: noqa
# mypy: ignore-errors
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EchoRequest(_message.Message):
    __slots__ = ("text", "count", "fail_code", "payload", "delay_ms")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FAIL_CODE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    text: str
    count: int
    fail_code: int
    payload: bytes
    delay_ms: int
    def __init__(
        self,
        text: _Optional[str] = ...,
        count: _Optional[int] = ...,
        fail_code: _Optional[int] = ...,
        payload: _Optional[bytes] = ...,
        delay_ms: _Optional[int] = ...,
    ) -> None: ...

class EchoReply(_message.Message):
    __slots__ = (
        "pod",
        "namespace",
        "node",
        "service",
        "version",
        "method",
        "metadata",
        "text",
        "sequence",
        "count",
        "bytes",
        "served",
        "payload",
    )
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

    POD_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    pod: str
    namespace: str
    node: str
    service: str
    version: str
    method: str
    metadata: _containers.ScalarMap[str, str]
    text: str
    sequence: int
    count: int
    bytes: int
    served: int
    payload: bytes
    def __init__(
        self,
        pod: _Optional[str] = ...,
        namespace: _Optional[str] = ...,
        node: _Optional[str] = ...,
        service: _Optional[str] = ...,
        version: _Optional[str] = ...,
        method: _Optional[str] = ...,
        metadata: _Optional[_Mapping[str, str]] = ...,
        text: _Optional[str] = ...,
        sequence: _Optional[int] = ...,
        count: _Optional[int] = ...,
        bytes: _Optional[int] = ...,
        served: _Optional[int] = ...,
        payload: _Optional[bytes] = ...,
    ) -> None: ...
