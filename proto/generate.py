"""Generate Python gRPC code at install time (never committed).

- refit's public API from proto/refit/v1/*.proto into refit/v1/.
- TorchServe's own API from the .proto files inside the installed torchserve package
  (ts/frontend/model-server.jar) into service/torchserve_api/. They are read from the jar,
  not copied into the repo.
- The Open Inference Protocol (KServe v2, package `inference`, service GRPCInferenceService)
  into refit/inference_api/. No PyPI package ships its .proto; the pinned kserve wheel ships the
  file's serialized descriptor inside grpc_predict_v2_pb2.py, which protoc reads as a descriptor
  set (--descriptor_set_in): the interface comes from the package, not from a hand-kept copy.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import grpc_tools
import ts
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
TS_PACKAGE = "refit/torchserve_api"
OIP_PACKAGE = "refit/inference_api"
KSERVE_WHEEL = "kserve==0.21.0"
KSERVE_PB2 = "kserve/protocol/grpc/grpc_predict_v2_pb2.py"


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


def serialized_descriptor(pb2_source: str) -> bytes:
    """The bytes literal passed to AddSerializedFile in a generated _pb2.py (parsed, not run)."""
    for node in ast.walk(ast.parse(pb2_source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            return ast.literal_eval(node.args[0])
    sys.exit("no serialized descriptor found in the kserve wheel")


def generate_inference_protocol() -> None:
    staging = ROOT / "build" / "inference-proto"
    shutil.rmtree(staging, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", KSERVE_WHEEL, "-d"]
    subprocess.run([*pip, str(staging)], check=True)
    (wheel,) = staging.glob("kserve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read(KSERVE_PB2).decode()
    proto = descriptor_pb2.FileDescriptorProto.FromString(serialized_descriptor(source))
    if proto.package != "inference" or proto.service[0].name != "GRPCInferenceService":
        sys.exit(f"unexpected protocol in {wheel.name}: {proto.package}")
    proto.name = f"{OIP_PACKAGE}/grpc_predict_v2.proto"
    descriptor_set = staging / "inference.pb"
    descriptor_set.write_bytes(descriptor_pb2.FileDescriptorSet(file=[proto]).SerializeToString())
    args = [f"--descriptor_set_in={descriptor_set}", f"--python_out={ROOT}", f"--pyi_out={ROOT}"]
    if protoc.main(["protoc", *args, f"--grpc_python_out={ROOT}", proto.name]) != 0:
        sys.exit("protoc failed for the inference protocol")
    (ROOT / OIP_PACKAGE / "__init__.py").touch()


if __name__ == "__main__":
    generate_refit_api()
    generate_torchserve_api()
    generate_inference_protocol()
