"""Build hook: generate the gRPC stubs of Caroni's client API.

The .proto files live in the repository's `proto/` directory (two levels up
from this file; `CARONI_PROTO_DIR` overrides it). `grpc_tools.protoc` writes
the modules into the build tree under `caroni_client/_generated/`, with the
imports between them made package-relative, so nothing generated is ever
committed and the stubs always match the protos they were built from.
"""

import os
import re
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
# The client API only: the peer protocol is node-to-node.
PROTOS = [
    "caroni/v1/manager.proto",
    "caroni/v1/agent.proto",
    "caroni/v1/node.proto",
    "caroni/v1/files.proto",
    # Shared messages (Price, Resources, AgentAdvert) the others import.
    "caroni/v1/protocol.proto",
]


def proto_dir() -> Path:
    d = Path(os.environ.get("CARONI_PROTO_DIR", HERE / ".." / ".." / "proto")).resolve()
    missing = [p for p in PROTOS if not (d / p).is_file()]
    if missing:
        raise SystemExit(
            f"caroni-client: cannot find {', '.join(missing)} under {d}; build the "
            "package from a Caroni checkout (pip install ./clients/python) or set "
            "CARONI_PROTO_DIR to the repository's proto/ directory"
        )
    return d


def runtime_requirements() -> list:
    """grpcio and protobuf at least as new as the generator: generated code
    checks the runtime's version when it is imported."""
    from importlib.metadata import version

    tools = version("grpcio-tools")
    proto = version("protobuf")
    return [f"grpcio>={tools}", f"protobuf>={proto}"]


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        from grpc_tools import protoc
        import grpc_tools

        src = proto_dir()
        out = Path(self.build_lib) / "caroni_client" / "_generated"
        out.mkdir(parents=True, exist_ok=True)
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{src}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *PROTOS,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"caroni-client: protoc failed on {src}")
        for d in (out, out / "caroni", out / "caroni" / "v1"):
            (d / "__init__.py").touch()
        # protoc writes absolute imports (`from caroni.v1 import x_pb2`);
        # make them relative so the stubs live inside this package only.
        for f in (out / "caroni" / "v1").glob("*.py*"):
            text = f.read_text()
            fixed = re.sub(r"^from caroni\.v1 import ", "from . import ", text, flags=re.M)
            if fixed != text:
                f.write_text(fixed)


setup(cmdclass={"build_py": BuildWithStubs}, install_requires=runtime_requirements())
