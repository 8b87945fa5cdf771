"""Run with .venv-oip/bin/python: stock tritonclient calls to refit's port, printed as JSON.

Usage: triton_infer.py ADDRESS TOKEN MODEL IMAGE... (an empty TOKEN sends no header).
"""

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def main(address: str, token: str, model: str, paths: list[str]) -> dict:
    client = triton.InferenceServerClient(address)
    headers = {"authorization": f"Bearer {token}"} if token else None
    try:
        images = np.array([[Path(p).read_bytes()] for p in paths], dtype=np.object_)
        tensor = triton.InferInput("images", list(images.shape), "BYTES")
        tensor.set_data_from_numpy(images)
        live = client.is_server_live(headers=headers)
        metadata = client.get_model_metadata(model, headers=headers, as_json=True)
        result = client.infer(model, [tensor], headers=headers, parameters={"top_k": 3})
    except InferenceServerException as exc:
        return {"error": exc.status(), "message": exc.message()}
    labels = [[b.decode() for b in row] for row in result.as_numpy("labels")]
    scores = result.as_numpy("scores").tolist()
    return {"live": live, "metadata": metadata, "labels": labels, "scores": scores}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])))
