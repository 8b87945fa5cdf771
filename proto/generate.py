"""Generate Python gRPC code at install time (never committed).

- refit's public API from proto/refit/v1/*.proto into refit/v1/.
- TorchServe's own API from the .proto files inside the installed torchserve package
  (ts/frontend/model-server.jar) into service/torchserve_api/. They are read from the jar,
  not copied into the repo.
"""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

import grpc_tools
import ts
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
TS_PACKAGE = "refit/torchserve_api"


def run_protoc(include: list[Path], out: Path, files: list[Path]) -> None:
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{well_known}", *(f"-I{i}" for i in include)]
    args += [f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    if protoc.main([*args, *map(str, files)]) != 0:
        sys.exit(f"protoc failed for {files}")


def generate_refit_api() -> None:
    files = sorted((ROOT / "proto").rglob("*.proto"))
    run_protoc([ROOT / "proto"], ROOT, files)
    for package in {f.parent.relative_to(ROOT / "proto") for f in files}:
        (ROOT / package / "__init__.py").touch()


def generate_torchserve_api() -> None:
    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    staging = ROOT / "build" / "torchserve-proto"
    shutil.rmtree(staging, ignore_errors=True)
    target = staging / TS_PACKAGE
    target.mkdir(parents=True)
    with zipfile.ZipFile(jar) as archive:
        for name in ("inference.proto", "management.proto"):
            (target / name).write_bytes(archive.read(f"proto/{name}"))
        archive.extract("google/rpc/status.proto", staging / "deps")
    run_protoc([staging, staging / "deps"], ROOT, sorted(target.glob("*.proto")))
    (ROOT / TS_PACKAGE / "__init__.py").touch()


if __name__ == "__main__":
    generate_refit_api()
    generate_torchserve_api()
