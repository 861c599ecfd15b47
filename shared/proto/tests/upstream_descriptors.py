"""Writes the descriptors of the installed upstream `flyteidl` package to stdout.

The output is a serialized `google.protobuf.FileDescriptorSet` holding
`flyteidl/service/agent.proto` and every file it imports, transitively. The
Rust test `descriptors.rs` compares it with the descriptors of our own
`.proto` files; nothing here knows what ours look like.
"""

import sys

from google.protobuf import descriptor_pb2

import flyteidl
from flyteidl.service import agent_pb2


def main() -> None:
    wanted_version = sys.argv[1] if len(sys.argv) > 1 else None
    installed = getattr(flyteidl, "__version__", None)
    if installed is None:
        from importlib.metadata import version

        installed = version("flyteidl")
    if wanted_version and installed != wanted_version:
        sys.exit(f"flyteidl {installed} is installed, the test wants {wanted_version}")

    out = descriptor_pb2.FileDescriptorSet()
    seen = set()

    def visit(file_descriptor) -> None:
        if file_descriptor.name in seen:
            return
        seen.add(file_descriptor.name)
        for dep in file_descriptor.dependencies:
            visit(dep)
        file_descriptor.CopyToProto(out.file.add())

    visit(agent_pb2.DESCRIPTOR)
    sys.stdout.buffer.write(out.SerializeToString())


if __name__ == "__main__":
    main()
