"""Sandpit's extension service (`sandpit.v1`, next to `coreweave.sandbox.v1`) from Python.

    from sandpit_ext import commit
    result = commit(sandbox.sandbox_id, "myenv:v1")   # then Sandbox.run(container_image="myenv:v1")

Only `grpcio` is needed (the `cwsandbox` client depends on it). The two messages of
`proto/sandpit/v1/checkpoint.proto` are small enough to encode here, so no generated
code has to be kept in step with the proto (a test checks this module against it).
The daemon and the key come from CWSANDBOX_BASE_URL and CWSANDBOX_API_KEY, as for
the client.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlparse

import grpc

__all__ = ["CommitResult", "commit"]

_METHOD = "/sandpit.v1.CheckpointService/CommitSandbox"


@dataclass(frozen=True)
class CommitResult:
    """What CommitSandbox answered."""

    image: str
    image_id: str
    layer_digest: str
    layer_size_bytes: int
    files: int
    duration_ms: int


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _encode_request(sandbox_id: str, image: str, request_id: str) -> bytes:
    out = bytearray()
    for field, value in ((1, sandbox_id), (2, image), (3, request_id)):
        data = value.encode()
        if data:
            out += _varint(field << 3 | 2) + _varint(len(data)) + data
    return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _decode_response(buf: bytes) -> CommitResult:
    strings = {1: "", 2: "", 3: ""}
    numbers = {4: 0, 5: 0, 6: 0}
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
            if field in numbers:
                numbers[field] = value
        elif wire == 2:
            n, i = _read_varint(buf, i)
            if field in strings:
                strings[field] = buf[i : i + n].decode()
            i += n
        else:
            raise ValueError(f"unexpected wire type {wire} for field {field}")
    return CommitResult(strings[1], strings[2], strings[3], numbers[4], numbers[5], numbers[6])


def _target(base_url: str) -> tuple[str, bool]:
    u = urlparse(base_url)
    secure = u.scheme == "https"
    port = u.port or (443 if secure else 80)
    return f"{u.hostname}:{port}", secure


def commit(
    sandbox_id: str,
    image: str,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    request_id: str = "",
    timeout: float = 120.0,
) -> CommitResult:
    """Checkpoints running sandbox `sandbox_id` into image `image` (NAME[:TAG]).

    Raises grpc.RpcError with the daemon's status (NOT_FOUND, FAILED_PRECONDITION,
    INVALID_ARGUMENT) when it refuses.
    """
    base_url = base_url or os.environ.get("CWSANDBOX_BASE_URL", "http://127.0.0.1:50051")
    api_key = api_key or os.environ.get("CWSANDBOX_API_KEY", "")
    target, secure = _target(base_url)
    channel = grpc.secure_channel(target, grpc.ssl_channel_credentials()) if secure else grpc.insecure_channel(target)
    with channel:
        call = channel.unary_unary(_METHOD, request_serializer=lambda b: b, response_deserializer=_decode_response)
        return call(
            _encode_request(sandbox_id, image, request_id),
            metadata=[("authorization", f"Bearer {api_key}")],
            timeout=timeout,
        )
