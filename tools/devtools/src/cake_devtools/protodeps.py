"""Gather the .proto files Cake's contracts import into one include directory.

Three sources, none of them the network at generation time except Maven's first download:

- ``buf/validate/validate.proto``: no Python wheel ships it, so Maven unpacks it from the
  ``build.buf:protovalidate`` jar on Maven Central (``tools/protodeps/pom.xml``);
- ``google/api/*`` and ``google/rpc/*``: copied from the installed ``googleapis-common-protos``
  wheel, whose ``_pb2`` modules the generated code imports at run time (so the two agree);
- ``google/protobuf/*`` (well-known types): used in place from ``grpc_tools/_proto``, the copy
  bundled with the protoc that generates the code; buf knows them natively.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# The googleapis files the contracts (and Envoy's error rendering) need, with their imports.
GOOGLEAPIS_PROTOS: tuple[str, ...] = (
    "google/api/annotations.proto",
    "google/api/http.proto",
    "google/api/httpbody.proto",
    "google/rpc/code.proto",
    "google/rpc/error_details.proto",
    "google/rpc/status.proto",
)
PROTOVALIDATE_PROTO = "buf/validate/validate.proto"
# Records which pom the Maven-fetched files came from, so Maven only runs when it changed.
_STAMP_NAME = ".protodeps-pom.sha256"


class ProtoDepsError(RuntimeError):
    """A proto dependency could not be fetched or found."""


@dataclass(frozen=True)
class ProtoDeps:
    """Include directories for protoc: the gathered deps and the well-known types."""

    deps_dir: Path
    well_known_dir: Path


def well_known_types_dir() -> Path:
    """Directory holding ``google/protobuf/*.proto`` as bundled with grpcio-tools' protoc."""
    path = Path(str(importlib.resources.files("grpc_tools") / "_proto"))
    if not (path / "google/protobuf/descriptor.proto").is_file():
        raise ProtoDepsError(f"grpcio-tools has no well-known .proto files under {path}")
    return path


def _googleapis_file(relative: str) -> Path:
    try:
        dist = importlib.metadata.distribution("googleapis-common-protos")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ProtoDepsError("googleapis-common-protos is not installed (run `uv sync`)") from exc
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise ProtoDepsError(f"googleapis-common-protos {dist.version} has no {relative}")
    return path


def _copy_if_changed(source: Path, target: Path) -> None:
    data = source.read_bytes()
    if target.is_file() and target.read_bytes() == data:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def _run_maven(pom: Path, deps_dir: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ProtoDepsError(
            "Maven (`mvn`) is required to fetch buf/validate/validate.proto from Maven Central "
            "(Debian/Ubuntu: `apt-get install maven`); it also needs a JDK."
        )
    command = [
        mvn,
        "-q",
        "-B",
        "-Dstyle.color=never",
        "-f",
        str(pom),
        f"-Dprotodeps.outputDirectory={deps_dir}",
        "dependency:unpack",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ProtoDepsError(
            f"`{' '.join(command)}` failed (exit {result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )


def gather(pom: Path, deps_dir: Path, *, refresh: bool = False, log: bool = True) -> ProtoDeps:
    """Make ``deps_dir`` hold every imported non-well-known .proto file; return include dirs.

    Maven only runs when ``validate.proto`` is missing, the pom changed or ``refresh`` is set.
    """
    pom_digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    stamp = deps_dir / _STAMP_NAME
    validate_proto = deps_dir / PROTOVALIDATE_PROTO
    up_to_date = (
        validate_proto.is_file() and stamp.is_file() and stamp.read_text().strip() == pom_digest
    )
    if refresh or not up_to_date:
        if log:
            print(f"cake-codegen: fetching {PROTOVALIDATE_PROTO} with Maven ({pom})", flush=True)
        if (deps_dir / "buf").exists():
            shutil.rmtree(deps_dir / "buf")
        deps_dir.mkdir(parents=True, exist_ok=True)
        _run_maven(pom, deps_dir)
        if not validate_proto.is_file():
            raise ProtoDepsError(f"Maven ran but {validate_proto} is missing; check {pom}")
        stamp.write_text(pom_digest + "\n")
    if log:
        print(f"cake-codegen: copying googleapis protos into {deps_dir}", flush=True)
    for relative in GOOGLEAPIS_PROTOS:
        _copy_if_changed(_googleapis_file(relative), deps_dir / relative)
    return ProtoDeps(deps_dir=deps_dir, well_known_dir=well_known_types_dir())
