"""A FileDescriptorProto written back as .proto source that protoc compiles to the same descriptor.

protovalidate's wheel carries buf/validate/validate.proto only as a compiled
descriptor, and clients built offline with protoc (C++, Go, Ruby...) need the
source. The descriptor has no comments to keep; everything else is printed:
messages and enums (nested), fields with their labels, oneofs, maps,
extension and reserved ranges, extensions, and options, custom ones included
(read back through a pool that knows the file's own extensions).
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import Message

FDP = descriptor_pb2.FieldDescriptorProto
_SCALARS = {number: name.removeprefix("TYPE_").lower() for name, number in FDP.Type.items()
            if name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")}
_LABELS = {FDP.LABEL_OPTIONAL: "optional", FDP.LABEL_REQUIRED: "required", FDP.LABEL_REPEATED: "repeated"}
_MAX_FIELD = 536870912  # exclusive end of "to max"


class _Printer:
    def __init__(self, file: descriptor_pb2.FileDescriptorProto, dependencies: list[Message]) -> None:
        self.file = file
        self.proto3 = file.syntax == "proto3"
        self.pool = descriptor_pool.DescriptorPool()
        for module in dependencies:
            proto = descriptor_pb2.FileDescriptorProto()
            module.DESCRIPTOR.CopyToProto(proto)
            self.pool.Add(proto)
        self.pool.Add(file)
        message_factory.GetMessageClassesForFiles([file.name], self.pool)  # registers the file's extensions
        self.lines: list[str] = []

    def _options(self, options: Message) -> list[tuple[str, str]]:
        """(name, value) of each option set, custom ones as `(full.name)`, messages in text format."""
        known = message_factory.GetMessageClass(self.pool.FindMessageTypeByName(options.DESCRIPTOR.full_name))
        out = []
        for field, value in known.FromString(options.SerializeToString()).ListFields():
            name = f"({field.full_name})" if field.is_extension else field.name
            values = value if field.is_repeated else [value]
            out += [(name, self._value(field, v)) for v in values]
        return out

    @staticmethod
    def _value(field: object, value: object) -> str:
        if isinstance(value, Message):
            return "{ " + text_format.MessageToString(value, as_one_line=True) + " }"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str) and getattr(field, "enum_type", None) is None:
            return text_format.MessageToString(descriptor_pb2.FileOptions(go_package=value), as_one_line=True) \
                .removeprefix("go_package: ")
        if getattr(field, "enum_type", None) is not None:
            return field.enum_type.values_by_number[value].name  # type: ignore[attr-defined]
        return str(value)

    def emit(self, indent: int, text: str) -> None:
        self.lines.append("  " * indent + text)

    def _field_type(self, f: descriptor_pb2.FieldDescriptorProto, nested: dict[str, descriptor_pb2.DescriptorProto]
                    ) -> str:
        entry = nested.get(f.type_name)
        if entry is not None and entry.options.map_entry:
            key, value = entry.field
            return f"map<{self._field_type(key, {})}, {self._field_type(value, {})}>"
        return f.type_name if f.type_name else _SCALARS[f.type]

    def field(self, indent: int, f: descriptor_pb2.FieldDescriptorProto, nested: dict[str, object],
              in_oneof: bool = False) -> None:
        kind = self._field_type(f, nested)  # type: ignore[arg-type]
        label = ""
        if not in_oneof and not kind.startswith("map<"):
            if f.label == FDP.LABEL_REPEATED:
                label = "repeated "
            elif not self.proto3 or f.proto3_optional:
                label = _LABELS[f.label] + " "
        options = self._options(f.options)
        if f.HasField("default_value"):
            default = f'"{f.default_value}"' if f.type in (FDP.TYPE_STRING, FDP.TYPE_BYTES) else f.default_value
            options.insert(0, ("default", default))
        if f.HasField("json_name") and f.json_name != _camel(f.name):
            options.insert(0, ("json_name", f'"{f.json_name}"'))
        suffix = " [" + ", ".join(f"{k} = {v}" for k, v in options) + "]" if options else ""
        self.emit(indent, f"{label}{kind} {f.name} = {f.number}{suffix};")

    def enum(self, indent: int, e: descriptor_pb2.EnumDescriptorProto) -> None:
        self.emit(indent, f"enum {e.name} {{")
        for name, value in self._options(e.options):
            self.emit(indent + 1, f"option {name} = {value};")
        for v in e.value:
            options = self._options(v.options)
            suffix = " [" + ", ".join(f"{k} = {x}" for k, x in options) + "]" if options else ""
            self.emit(indent + 1, f"{v.name} = {v.number}{suffix};")
        self._reserved(indent + 1, e.reserved_range, e.reserved_name, inclusive=True)
        self.emit(indent, "}")

    def _reserved(self, indent: int, ranges: object, names: object, inclusive: bool = False) -> None:
        spans = []
        for r in ranges:  # type: ignore[attr-defined]
            end = r.end if inclusive else r.end - 1
            spans.append(str(r.start) if end == r.start else f"{r.start} to {'max' if end + 1 >= _MAX_FIELD else end}")
        if spans:
            self.emit(indent, f"reserved {', '.join(spans)};")
        if names:
            self.emit(indent, "reserved " + ", ".join(f'"{n}"' for n in names) + ";")  # type: ignore[attr-defined]

    def extensions(self, indent: int, fields: list[descriptor_pb2.FieldDescriptorProto]) -> None:
        by_extendee: dict[str, list[descriptor_pb2.FieldDescriptorProto]] = {}
        for f in fields:
            by_extendee.setdefault(f.extendee, []).append(f)
        for extendee, group in by_extendee.items():
            self.emit(indent, f"extend {extendee} {{")
            for f in group:
                self.field(indent + 1, f, {})
            self.emit(indent, "}")

    def message(self, indent: int, m: descriptor_pb2.DescriptorProto, scope: str) -> None:
        full = f"{scope}.{m.name}"
        nested = {f"{full}.{n.name}": n for n in m.nested_type}
        self.emit(indent, f"message {m.name} {{")
        for name, value in self._options(m.options):
            self.emit(indent + 1, f"option {name} = {value};")
        real_oneofs = [i for i, _ in enumerate(m.oneof_decl)
                       if not any(f.proto3_optional and f.oneof_index == i for f in m.field)]
        printed: set[int] = set()
        for f in m.field:
            if f.HasField("oneof_index") and f.oneof_index in real_oneofs:
                if f.oneof_index in printed:
                    continue
                printed.add(f.oneof_index)
                decl = m.oneof_decl[f.oneof_index]
                self.emit(indent + 1, f"oneof {decl.name} {{")
                for name, value in self._options(decl.options):
                    self.emit(indent + 2, f"option {name} = {value};")
                for member in m.field:
                    if member.HasField("oneof_index") and member.oneof_index == f.oneof_index:
                        self.field(indent + 2, member, nested, in_oneof=True)
                self.emit(indent + 1, "}")
            else:
                self.field(indent + 1, f, nested)
        for n in m.nested_type:
            if not n.options.map_entry:
                self.message(indent + 1, n, full)
        for e in m.enum_type:
            self.enum(indent + 1, e)
        if m.extension:
            self.extensions(indent + 1, list(m.extension))
        for r in m.extension_range:
            end = "max" if r.end >= _MAX_FIELD else str(r.end - 1)
            self.emit(indent + 1, f"extensions {r.start} to {end};")
        self._reserved(indent + 1, m.reserved_range, m.reserved_name)
        self.emit(indent, "}")

    def print(self) -> str:
        f = self.file
        self.emit(0, "// Written from the compiled descriptor by proto/descriptor_source.py: no comments survive.")
        self.emit(0, f'syntax = "{f.syntax or "proto2"}";')
        self.emit(0, f"package {f.package};")
        for dep in f.dependency:
            self.emit(0, f'import "{dep}";')
        for name, value in self._options(f.options):
            self.emit(0, f"option {name} = {value};")
        self.extensions(0, list(f.extension))
        for e in f.enum_type:
            self.enum(0, e)
        for m in f.message_type:
            self.message(0, m, "." + f.package)
        return "\n".join(self.lines) + "\n"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def proto_source(file: descriptor_pb2.FileDescriptorProto, dependencies: list[Message]) -> str:
    """The file's .proto text; `dependencies` are the generated modules of the files it imports."""
    return _Printer(file, dependencies).print()
