"""What the Open Inference Protocol costs beside refit's own Predict, side by side on one stack.

One stack (bench/running_stack.py) serves ``imagenet`` v1 (ONNX fp32, as ``make up`` publishes
it). The same photos (bench/serving.py: scikit-image's, 300x451 to 2048x2048 JPEG) go, one image
per call, through two paths on the same port and token, in interleaved rounds:
- ``refit.v1.Refit/Predict``;
- ``inference.GRPCInferenceService/ModelInfer``: one BYTES element in ``raw_input_contents``, as
  tritonclient sends it (a stub of the generated protocol in this process, so both paths pay the
  same client cost and the difference is the server's).
Printed: req/s, p50, p99 per path at concurrency 1 and 8, and ModelInfer's ratio to Predict.

    PYTHONPATH=. .venv/bin/python bench/inference_protocol.py [--requests 400] [--rounds 4]
"""

from __future__ import annotations

import argparse
import struct
from collections.abc import Callable

import grpc
from predict_latency import interleaved, load
from running_stack import RunningStack, running_stack
from serving import photos, via_refit, wait_servable

from refit.inference_api import grpc_predict_v2_pb2 as oip
from refit.inference_api import grpc_predict_v2_pb2_grpc as oip_grpc

Call = Callable[[bytes], None]


def via_model_infer(stack: RunningStack, version: str) -> Callable[[], Call]:
    metadata = [("authorization", f"Bearer {stack.predict_token}")]
    tensor = oip.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[1])
    top_k = oip.InferParameter(int64_param=5)

    def make() -> Call:
        stub = oip_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(stack.address))

        def call(image: bytes) -> None:
            request = oip.ModelInferRequest(
                model_name="imagenet",
                model_version=version,
                inputs=[tensor],
                parameters={"top_k": top_k},
                raw_input_contents=[struct.pack("<I", len(image)) + image],
            )
            stub.ModelInfer(request, metadata=metadata, timeout=120)

        return call

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="per path and concurrency")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per level")
    args = parser.parse_args()
    images = photos()
    with running_stack() as stack:
        wait_servable(stack, images, versions=("1",))
        paths = {"Predict": via_refit(stack, "1"), "ModelInfer": via_model_infer(stack, "1")}
        for make in paths.values():
            load(make, images, 32, 4)  # warm: the worker, every image size, both paths
        results = {c: interleaved(paths, images, args.requests, c, args.rounds) for c in (1, 8)}
    print("| path | concurrency | req/s | p50 ms | p99 ms | req/s vs Predict |")
    print("|---|---|---|---|---|---|")
    for c, by_path in results.items():
        base = by_path["Predict"]["rps"]
        for name, r in by_path.items():
            print(f"| {name} | {c} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                  f"{r['rps'] / base:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
