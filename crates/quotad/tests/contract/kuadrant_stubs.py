"""Generates Python stubs for Kuadrant's rate limit service from Limitador's own
kuadrant/kuadrantrls.proto (vendored verbatim), with its imports resolved
against Envoy's real definitions: the file descriptors that the xds-protos
package was generated from, not quotad's copies.

    python kuadrant_stubs.py OUT_DIR

writes OUT_DIR/kuadrantrls_pb2.py and OUT_DIR/kuadrantrls_pb2_grpc.py (and
OUT_DIR/envoy.binpb, the FileDescriptorSet given to protoc). The generated
modules import Envoy's messages from xds-protos (envoy.service.ratelimit.v3).
"""

import os
import subprocess
import sys

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import descriptor_pb2, duration_pb2

HERE = os.path.dirname(os.path.abspath(__file__))
KUADRANT_DIR = os.path.join(HERE, "kuadrant")
KUADRANT_PROTO = "kuadrantrls.proto"

# The modules whose files kuadrantrls.proto imports.
IMPORTED = [rls_pb2, ratelimit_pb2, duration_pb2]


def envoy_descriptor_set():
    """The FileDescriptorSet of every file kuadrantrls.proto imports and their
    dependencies, each file after the files it depends on."""
    files = descriptor_pb2.FileDescriptorSet()
    seen = set()

    def add(file_descriptor):
        if file_descriptor.name in seen:
            return
        seen.add(file_descriptor.name)
        for dependency in file_descriptor.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file_descriptor.CopyToProto(proto)
        files.file.append(proto)

    for module in IMPORTED:
        add(module.DESCRIPTOR)
    return files


def generate(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    descriptor_set = os.path.join(out_dir, "envoy.binpb")
    with open(descriptor_set, "wb") as out:
        out.write(envoy_descriptor_set().SerializeToString())
    # Only the vendored file is on the proto path, so every import resolves
    # from the descriptor set (grpc_tools adds its well-known types' path too,
    # which holds no envoy/ files).
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--descriptor_set_in={descriptor_set}",
        f"--proto_path={KUADRANT_DIR}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        KUADRANT_PROTO,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"protoc failed ({result.returncode}): {' '.join(command)}\n{result.stdout}{result.stderr}")
    for name in ("kuadrantrls_pb2.py", "kuadrantrls_pb2_grpc.py"):
        if not os.path.isfile(os.path.join(out_dir, name)):
            sys.exit(f"protoc did not write {name} in {out_dir}")


def import_stubs(out_dir):
    """Kuadrant's generated modules (kuadrantrls_pb2, kuadrantrls_pb2_grpc) from out_dir."""
    if out_dir not in sys.path:
        sys.path.insert(0, out_dir)
    import kuadrantrls_pb2  # noqa: PLC0415 (generated at test time)
    import kuadrantrls_pb2_grpc  # noqa: PLC0415

    return kuadrantrls_pb2, kuadrantrls_pb2_grpc


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    generate(sys.argv[1])
    print(f"kuadrant stubs in {sys.argv[1]}")
