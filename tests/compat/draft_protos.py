"""Prints the installed cwsandbox client's descriptors as draft .proto files.

For upgrades (see proto/README.md): the output is a faithful, comment-free
rendering of what the client ships. Render the old and the new client version
and diff the two renderings to see exactly what changed upstream, then port
that into proto/ by hand. It is not the source of proto/ and the test suite
does not run it.

    .venv/bin/python tests/compat/draft_protos.py /tmp/draft-old

Field behaviours (google.api.field_behavior) become trailing comments such as
`// Required.`; google.api.http annotations and go_package are dropped, as in
proto/.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

from google.api import field_behavior_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pb2 import FieldDescriptorProto as FDP

SCALARS = {
    FDP.TYPE_DOUBLE: "double",
    FDP.TYPE_FLOAT: "float",
    FDP.TYPE_INT64: "int64",
    FDP.TYPE_UINT64: "uint64",
    FDP.TYPE_INT32: "int32",
    FDP.TYPE_FIXED64: "fixed64",
    FDP.TYPE_FIXED32: "fixed32",
    FDP.TYPE_BOOL: "bool",
    FDP.TYPE_STRING: "string",
    FDP.TYPE_BYTES: "bytes",
    FDP.TYPE_UINT32: "uint32",
    FDP.TYPE_SFIXED32: "sfixed32",
    FDP.TYPE_SFIXED64: "sfixed64",
    FDP.TYPE_SINT32: "sint32",
    FDP.TYPE_SINT64: "sint64",
}
BEHAVIOURS = {
    field_behavior_pb2.REQUIRED: "Required.",
    field_behavior_pb2.OUTPUT_ONLY: "Output only.",
    field_behavior_pb2.INPUT_ONLY: "Input only.",
    field_behavior_pb2.IMMUTABLE: "Immutable.",
    field_behavior_pb2.IDENTIFIER: "Identifier.",
}


def type_ref(type_name: str, package: str, scope: list[str]) -> str:
    """A type reference relative to the package and the enclosing messages."""
    prefix = f".{package}."
    if not type_name.startswith(prefix):
        return type_name.lstrip(".")
    name = type_name[len(prefix) :]
    for depth in range(len(scope), 0, -1):
        outer = ".".join(scope[:depth]) + "."
        if name.startswith(outer):
            return name[len(outer) :]
    return name


def field_type(field, package, scope, nested) -> str:
    if field.type in SCALARS:
        return SCALARS[field.type]
    entry = nested.get(field.type_name.rsplit(".", 1)[-1])
    if field.label == FDP.LABEL_REPEATED and entry is not None and entry.options.map_entry:
        key, value = entry.field
        return f"map<{field_type(key, package, scope, {})}, {field_type(value, package, scope, {})}>"
    return type_ref(field.type_name, package, scope)


def trailing_comment(field) -> str:
    notes = [BEHAVIOURS[b] for b in field.options.Extensions[field_behavior_pb2.field_behavior] if b in BEHAVIOURS]
    return f" // {' '.join(notes)}" if notes else ""


def render_enum(enum, indent, out):
    out.append(f"{indent}enum {enum.name} {{")
    for value in enum.value:
        out.append(f"{indent}  {value.name} = {value.number};")
    out.append(f"{indent}}}")


def render_message(msg, package, scope, indent, out):
    scope = scope + [msg.name]
    nested = {n.name: n for n in msg.nested_type}
    inner = indent + "  "
    out.append(f"{indent}message {msg.name} {{")
    body: list[str] = []
    for enum in msg.enum_type:
        render_enum(enum, inner, body)
        body.append("")
    for sub in msg.nested_type:
        if not sub.options.map_entry:
            render_message(sub, package, scope, inner, body)
            body.append("")
    if msg.reserved_range:
        ranges = [str(r.start) if r.end == r.start + 1 else f"{r.start} to {r.end - 1}" for r in msg.reserved_range]
        body.append(f"{inner}reserved {', '.join(ranges)};")
    if msg.reserved_name:
        body.append(f"{inner}reserved {', '.join(repr(n).replace(chr(39), chr(34)) for n in msg.reserved_name)};")
    if msg.reserved_range or msg.reserved_name:
        body.append("")

    def line(field, pad):
        label = ""
        typ = field_type(field, package, scope, nested)
        if field.label == FDP.LABEL_REPEATED and not typ.startswith("map<"):
            label = "repeated "
        elif field.proto3_optional:
            label = "optional "
        return f"{pad}{label}{typ} {field.name} = {field.number};{trailing_comment(field)}"

    oneofs_done = set()
    for field in msg.field:
        if field.HasField("oneof_index") and not field.proto3_optional:
            index = field.oneof_index
            if index in oneofs_done:
                continue
            oneofs_done.add(index)
            body.append(f"{inner}oneof {msg.oneof_decl[index].name} {{")
            body += [line(f, inner + "  ") for f in msg.field if f.HasField("oneof_index") and f.oneof_index == index]
            body.append(f"{inner}}}")
        else:
            body.append(line(field, inner))
    while body and body[-1] == "":
        body.pop()
    out += body
    out.append(f"{indent}}}")


def render_service(svc, package, out):
    out.append(f"service {svc.name} {{")
    for m in svc.method:
        request = ("stream " if m.client_streaming else "") + type_ref(m.input_type, package, [])
        response = ("stream " if m.server_streaming else "") + type_ref(m.output_type, package, [])
        out.append(f"  rpc {m.name}({request}) returns ({response});")
    out.append("}")


def render_file(fd) -> str:
    out = [f'syntax = "{fd.syntax}";', "", f"package {fd.package};", ""]
    out += [f'import "{d}";' for d in fd.dependency if not d.startswith("google/api/")]
    out.append("")
    for svc in fd.service:
        render_service(svc, fd.package, out)
        out.append("")
    for enum in fd.enum_type:
        render_enum(enum, "", out)
        out.append("")
    for msg in fd.message_type:
        render_message(msg, fd.package, [], "", out)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(out_dir: Path) -> None:
    import cwsandbox._proto as client_proto

    for info in pkgutil.iter_modules(client_proto.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"{client_proto.__name__}.{info.name}")
        fd = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        path = out_dir / fd.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_file(fd))
        print(path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    main(Path(sys.argv[1]))
