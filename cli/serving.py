"""``refit predict`` and ``refit models``: talk to the refit service over gRPC."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from cli.client import ClientSettings, connect
from refit.shared_settings import SERVICE_ADDRESS
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc


def register(subparsers: argparse._SubParsersAction) -> None:
    predict = subparsers.add_parser("predict", help="classify images")
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    predict.add_argument("--model", default="imagenet")
    predict.add_argument("--version", default="", help="default: the model's default version")
    predict.add_argument("--top-k", type=int, default=5)
    add_common(predict)
    predict.set_defaults(run=run_predict)

    models = subparsers.add_parser("models", help="list models, or show one")
    models.add_argument("name", nargs="?", help="show this model's versions")
    add_common(models)
    models.set_defaults(run=run_models)


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=SERVICE_ADDRESS.value(os.environ),
        help="refit service (env REFIT_ADDRESS)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def stub_for(args: argparse.Namespace) -> refit_pb2_grpc.RefitStub:
    """REFIT_TOKEN (else the local stack's tokens file) and REFIT_TLS_* apply: cli.client."""
    return refit_pb2_grpc.RefitStub(connect(ClientSettings.from_env(args.address)))


def run_predict(args: argparse.Namespace) -> int:
    stub = stub_for(args)
    failed = 0
    for path in args.images:
        request = pb.PredictRequest(
            image=path.read_bytes(), model=args.model, version=args.version, top_k=args.top_k
        )
        try:
            answer = stub.Predict(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            failed += 1
            report_error(args, str(path), exc)
            continue
        if args.json:
            print(json.dumps({"image": str(path), **MessageToDict(answer)}))
            continue
        print(f"{path}  ({answer.model} v{answer.version})")
        for p in answer.predictions:
            print(f"  {p.score:6.1%}  {p.label}")
    return 1 if failed else 0


def run_models(args: argparse.Namespace) -> int:
    stub = stub_for(args)
    try:
        if args.name:
            models = [stub.GetModel(pb.GetModelRequest(name=args.name), timeout=args.timeout)]
        else:
            models = list(stub.ListModels(pb.ListModelsRequest(), timeout=args.timeout).models)
    except grpc.RpcError as exc:
        report_error(args, args.name or "models", exc)
        return 1
    if args.json:
        print(json.dumps([MessageToDict(m) for m in models], indent=1))
        return 0
    for model in models:
        print(f"{model.name}  default v{model.default_version or '-'}")
        if model.problem:
            print(f"  ! {model.problem}")
        for v in model.versions:
            accuracy = v.metrics.get("val_accuracy")
            shown = f"val_acc {accuracy:.1%}" if accuracy is not None else ""
            if v.registration == pb.ModelVersion.REGISTRATION_FAILED:
                shown += f"  ! not loaded ({v.registration_attempts} tries): {v.registration_error}"
            print(
                f"  v{v.version:<4} {v.state:9} {len(v.class_names):4} classes  "
                f"{v.lineage.backbone:18} {shown}"
            )
    return 0


def report_error(args: argparse.Namespace, subject: str, exc: grpc.RpcError) -> None:
    if args.json:
        print(json.dumps({"subject": subject, "code": exc.code().name, "error": exc.details()}))
    else:
        print(f"{subject}: {exc.code().name}: {exc.details()}", file=sys.stderr)
