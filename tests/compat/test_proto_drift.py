"""Protocol drift test: our proto/ against the descriptors shipped in the real client.

The `cwsandbox` package (version pinned in tests/requirements.txt) carries the
compiled `coreweave.sandbox.v1` descriptors in `cwsandbox/_proto/*_pb2.py`. This
test compiles our own `proto/` tree into a FileDescriptorSet and compares every
file, message (nested ones and map entries included), enum and service the
client defines with ours, field by field: names, numbers, types, type names,
labels, proto3 `optional`, oneof membership, json names, reserved ranges, enum
values, method input/output types and streaming flags. Anything we define in the
client's package that the client does not is reported too.

Not compared, on purpose: option annotations that do not change the wire format
or the gRPC surface (`google.api.field_behavior`, `google.api.http`, `go_package`)
and the list of imports (ours imports only what it uses). See proto/README.md.

Every difference is collected first and the test fails once with the full list.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import pkgutil
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pb2 import FieldDescriptorProto as FDP

CLIENT_VERSION = "1.22.0"
REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "proto"
# Top-level directories of proto/ holding Sandpit's own extensions: left out
# of the comparison (the client does not know them).
EXTENSION_DIRS = ("sandpit",)

_TYPE_NAMES = {v: k for k, v in FDP.Type.items()}
_LABEL_NAMES = {v: k for k, v in FDP.Label.items()}


# --------------------------------------------------------------------------- loading


def client_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """The client's FileDescriptorProtos, keyed by file name."""
    import cwsandbox._proto as client_proto

    files = {}
    for info in pkgutil.iter_modules(client_proto.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"{client_proto.__name__}.{info.name}")
        fd = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        files[fd.name] = fd
    return files


def compile_ours(out: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Compiles proto/ with the protoc bundled in grpcio-tools; returns its files by name."""
    from grpc_tools import protoc

    wkt_include = importlib.resources.files("grpc_tools") / "_proto"
    # Sandpit's own extension services (proto/sandpit/) are not the client's.
    sources = sorted(
        str(p.relative_to(PROTO_DIR))
        for p in PROTO_DIR.rglob("*.proto")
        if not p.relative_to(PROTO_DIR).parts[0] in EXTENSION_DIRS
    )
    assert sources, f"no .proto files under {PROTO_DIR}"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{wkt_include}",
        "--include_imports",
        f"--descriptor_set_out={out}",
        *sources,
    ]
    rc = protoc.main(args)
    assert rc == 0, f"protoc failed (rc={rc}) on {PROTO_DIR}; see stderr above"
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return {fd.name: fd for fd in fds.file}


# --------------------------------------------------------------------------- indexing


def index(files):
    """Flattens files into {full name: (kind, descriptor, file name)}.

    kind is "message", "enum" or "service"; nested messages and enums get their
    dotted full names, e.g. `.coreweave.sandbox.v1.ExecStreamOutput.Stream`.
    """
    out = {}

    def add_message(prefix, msg, fname):
        name = f"{prefix}.{msg.name}"
        out[name] = ("message", msg, fname)
        for nested in msg.nested_type:
            add_message(name, nested, fname)
        for enum in msg.enum_type:
            out[f"{name}.{enum.name}"] = ("enum", enum, fname)

    for fd in files.values():
        prefix = f".{fd.package}" if fd.package else ""
        for msg in fd.message_type:
            add_message(prefix, msg, fd.name)
        for enum in fd.enum_type:
            out[f"{prefix}.{enum.name}"] = ("enum", enum, fd.name)
        for svc in fd.service:
            out[f"{prefix}.{svc.name}"] = ("service", svc, fd.name)
    return out


# --------------------------------------------------------------------------- comparing


def _field_summary(msg, field):
    oneof = None
    if field.HasField("oneof_index"):
        oneof = msg.oneof_decl[field.oneof_index].name
    return {
        "name": field.name,
        "type": _TYPE_NAMES.get(field.type, field.type),
        "type_name": field.type_name,
        "label": _LABEL_NAMES.get(field.label, field.label),
        "proto3_optional": field.proto3_optional,
        "oneof": oneof,
        "json_name": field.json_name,
        "default_value": field.default_value,
        "extendee": field.extendee,
        "packed": field.options.packed if field.options.HasField("packed") else None,
        "deprecated": field.options.deprecated,
    }


def compare_message(name, theirs, ours, diffs):
    if theirs.options.map_entry != ours.options.map_entry:
        diffs.append(f"{name}: map_entry {theirs.options.map_entry} (client) != {ours.options.map_entry} (ours)")
    if theirs.options.deprecated != ours.options.deprecated:
        diffs.append(f"{name}: deprecated {theirs.options.deprecated} (client) != {ours.options.deprecated} (ours)")

    their_oneofs = [o.name for o in theirs.oneof_decl]
    our_oneofs = [o.name for o in ours.oneof_decl]
    if their_oneofs != our_oneofs:
        diffs.append(f"{name}: oneofs {their_oneofs} (client) != {our_oneofs} (ours)")

    their_fields = {f.number: f for f in theirs.field}
    our_fields = {f.number: f for f in ours.field}
    for number in sorted(their_fields.keys() | our_fields.keys()):
        tf, of = their_fields.get(number), our_fields.get(number)
        if of is None:
            diffs.append(f"{name}: field {tf.name} = {number} missing in ours")
            continue
        if tf is None:
            diffs.append(f"{name}: field {of.name} = {number} not in the client")
            continue
        ts, os_ = _field_summary(theirs, tf), _field_summary(ours, of)
        for key in ts:
            if ts[key] != os_[key]:
                diffs.append(f"{name}.{tf.name} (#{number}): {key} {ts[key]!r} (client) != {os_[key]!r} (ours)")

    def ranges(m):
        return sorted((r.start, r.end) for r in m.reserved_range)

    if ranges(theirs) != ranges(ours):
        diffs.append(f"{name}: reserved ranges {ranges(theirs)} (client) != {ranges(ours)} (ours)")
    if sorted(theirs.reserved_name) != sorted(ours.reserved_name):
        diffs.append(
            f"{name}: reserved names {sorted(theirs.reserved_name)} (client) != {sorted(ours.reserved_name)} (ours)"
        )
    if len(theirs.extension_range) != len(ours.extension_range):
        diffs.append(f"{name}: extension ranges differ")


def compare_enum(name, theirs, ours, diffs):
    their_values = [(v.name, v.number) for v in theirs.value]
    our_values = [(v.name, v.number) for v in ours.value]
    for value in their_values:
        if value not in our_values:
            diffs.append(f"{name}: value {value[0]} = {value[1]} missing in ours")
    for value in our_values:
        if value not in their_values:
            diffs.append(f"{name}: value {value[0]} = {value[1]} not in the client")
    if their_values and our_values and their_values[0] != our_values[0]:
        diffs.append(f"{name}: first (default) value {their_values[0]} (client) != {our_values[0]} (ours)")
    if theirs.options.allow_alias != ours.options.allow_alias:
        diffs.append(f"{name}: allow_alias differs")


def compare_service(name, theirs, ours, diffs):
    their_methods = {m.name: m for m in theirs.method}
    our_methods = {m.name: m for m in ours.method}
    for method in sorted(their_methods.keys() | our_methods.keys()):
        tm, om = their_methods.get(method), our_methods.get(method)
        if om is None:
            diffs.append(f"{name}/{method}: rpc missing in ours")
            continue
        if tm is None:
            diffs.append(f"{name}/{method}: rpc not in the client")
            continue
        for attr in ("input_type", "output_type", "client_streaming", "server_streaming"):
            if getattr(tm, attr) != getattr(om, attr):
                diffs.append(f"{name}/{method}: {attr} {getattr(tm, attr)!r} (client) != {getattr(om, attr)!r} (ours)")


def diff_descriptors(theirs_files, ours_files) -> list[str]:
    """Every difference between the client's files and ours, as readable lines."""
    diffs = []
    for fname, tfd in sorted(theirs_files.items()):
        ofd = ours_files.get(fname)
        if ofd is None:
            diffs.append(f"file {fname}: missing in ours")
            continue
        if tfd.package != ofd.package:
            diffs.append(f"file {fname}: package {tfd.package!r} (client) != {ofd.package!r} (ours)")
        if (tfd.syntax or "proto2") != (ofd.syntax or "proto2"):
            diffs.append(f"file {fname}: syntax {tfd.syntax!r} (client) != {ofd.syntax!r} (ours)")

    their_index = index(theirs_files)
    their_packages = {fd.package for fd in theirs_files.values()}
    # Ours, restricted to the client's packages (our set also holds the well-known types).
    our_index = index({n: fd for n, fd in ours_files.items() if fd.package in their_packages})

    for name in sorted(their_index.keys() | our_index.keys()):
        t, o = their_index.get(name), our_index.get(name)
        if o is None:
            diffs.append(f"{t[0]} {name}: missing in ours (client defines it in {t[2]})")
            continue
        if t is None:
            diffs.append(f"{o[0]} {name}: defined in ours ({o[2]}) but not in the client")
            continue
        if t[0] != o[0]:
            diffs.append(f"{name}: is a {t[0]} in the client but a {o[0]} in ours")
            continue
        if t[2] != o[2]:
            diffs.append(f"{t[0]} {name}: defined in {t[2]} (client) but in {o[2]} (ours)")
        {"message": compare_message, "enum": compare_enum, "service": compare_service}[t[0]](name, t[1], o[1], diffs)
    return diffs


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def theirs():
    files = client_files()
    assert files, "found no *_pb2 modules in cwsandbox._proto"
    return files


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    return compile_ours(tmp_path_factory.mktemp("proto") / "sandpit.pb")


def test_client_version_is_the_pinned_one():
    installed = importlib.metadata.version("cwsandbox")
    assert installed == CLIENT_VERSION, (
        f"cwsandbox {installed} installed, proto/ mirrors {CLIENT_VERSION}: "
        "update tests/requirements.txt and proto/ together (proto/README.md)"
    )


def test_no_drift(theirs, ours):
    diffs = diff_descriptors(theirs, ours)
    if diffs:
        listing = "\n  ".join(diffs)
        pytest.fail(
            f"{len(diffs)} difference(s) between proto/ and cwsandbox {CLIENT_VERSION}:\n  {listing}",
            pytrace=False,
        )


def test_comparison_sees_every_client_service(theirs, ours):
    """Guards the comparator itself: it really walks the client's services and RPCs."""
    services = {n: d for n, (k, d, _) in index(theirs).items() if k == "service"}
    assert ".coreweave.sandbox.v1.SandboxService" in services
    assert ".coreweave.sandbox.v1.DiscoveryService" in services
    stream_exec = {m.name: m for m in services[".coreweave.sandbox.v1.SandboxService"].method}["StreamExec"]
    assert stream_exec.client_streaming and stream_exec.server_streaming


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda fds: _setattr(_field(fds, "ExecStreamInit", "sandbox_id"), "number", 99), "ExecStreamInit: field sandbox_id = 1 missing"),
        (lambda fds: _setattr(_field(fds, "SandboxStatus", "exit_code"), "proto3_optional", False), "exit_code (#9): proto3_optional"),
        (lambda fds: _field(fds, "Gpu", "type").ClearField("oneof_index"), "Gpu.type (#2): oneof"),
        (lambda fds: _setattr(_field(fds, "Container", "args"), "label", FDP.LABEL_OPTIONAL), "args (#4): label"),
        (lambda fds: _setattr(_field(fds, "ExecStreamOutput", "data"), "type", FDP.TYPE_STRING), "data (#2): type 'TYPE_BYTES'"),
        (lambda fds: _setattr(_field(fds, "Sandbox", "status"), "type_name", ".coreweave.sandbox.v1.Sandbox"), "status (#3): type_name"),
        (lambda fds: _setattr(_method(fds, "SandboxService", "StreamLogs"), "server_streaming", False), "StreamLogs: server_streaming"),
        (lambda fds: _setattr(_value(fds, "State", "STATE_RUNNING"), "number", 42), "STATE_RUNNING = 2 missing"),
        (lambda fds: _find(fds, "message_type", "ReadFileResponse").field.add(name="x", number=2, type=FDP.TYPE_BOOL),
         "field x = 2 not in the client"),
    ],
)
def test_comparator_catches_mutations(theirs, ours, mutate, expected):
    """A drift detector that never fails is worthless: mutate a copy of ours and expect a diff."""
    mutated = {n: descriptor_pb2.FileDescriptorProto.FromString(fd.SerializeToString()) for n, fd in ours.items()}
    mutate(mutated)
    diffs = diff_descriptors(theirs, mutated)
    assert any(expected in d for d in diffs), diffs


def _find(fds, kind, name):
    for fd in fds.values():
        if fd.package != "coreweave.sandbox.v1":
            continue
        for item in getattr(fd, kind):
            if item.name == name:
                return item
    raise KeyError(name)


def _setattr(obj, attr, value):
    setattr(obj, attr, value)


def _field(fds, message, field):
    return next(f for f in _find(fds, "message_type", message).field if f.name == field)


def _method(fds, service, method):
    return next(m for m in _find(fds, "service", service).method if m.name == method)


def _value(fds, enum, value):
    return next(v for v in _find(fds, "enum_type", enum).value if v.name == value)
