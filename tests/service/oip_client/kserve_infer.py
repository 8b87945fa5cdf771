"""Run with .venv-oip/bin/python: KServe's stock InferenceGRPCClient to refit's port, as JSON.

Usage: kserve_infer.py ADDRESS TOKEN MODEL IMAGE...
"""

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest


async def main(address: str, token: str, model: str, paths: list[str]) -> dict:
    client = InferenceGRPCClient(address)
    images = np.array([Path(p).read_bytes() for p in paths], dtype=np.object_)
    tensor = InferInput("images", list(images.shape), "BYTES")
    tensor.set_data_from_numpy(images, binary_data=True)
    request = InferRequest(model_name=model, infer_inputs=[tensor], parameters={"top_k": 3})
    try:
        response = await client.infer(request, headers=(("authorization", f"Bearer {token}"),))
    finally:
        await client.close()
    outputs = {o.name: o.as_numpy().tolist() for o in response.outputs}
    outputs["labels"] = [[label.decode() for label in row] for row in outputs["labels"]]
    return outputs


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))))
