"""Requests per second of `mlflow models serve` on a registered bundle, one image per request,
against the same bundle's `predict` in this process on the same images (the ceiling a server
approaches once HTTP, JSON, base64 and MLflow's schema checks are paid for).

    python scripts/bench_serve.py                       # a random ResNet-18 at 224 px, ONNX
    python scripts/bench_serve.py --ckpt eval/qs/model.ckpt --requests 400

The model is exported (format=onnx) and registered in a SQLite store under a temporary
directory; `mlflow models serve --env-manager local -w WORKERS` serves it on 127.0.0.1. Each
client sends its share of the requests back to back; requests/s is requests / wall time, after
10 warm-up requests. `served_over_inprocess` is the server's rate over in-process predict's
(below 1: what serving costs).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_export import stand_in_checkpoint


def jpeg(seed: int, size: int) -> bytes:
    """A smooth random RGB image, JPEG-encoded at quality 90 (a camera frame's kind of bytes)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def post(url: str, image: bytes) -> dict:
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]}}
    request = urllib.request.Request(
        f"{url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.load(answer)["predictions"][0]


def serve(uri: str, model: str, workers: int, log_path: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
    cmd = [mlflow, "models", "serve", "-m", model, "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            cmd,
            env={**os.environ, "MLFLOW_TRACKING_URI": uri},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=2)
            return server, url
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mlflow models serve did not start; see {log_path}") from None
            time.sleep(0.5)


def rate(send, images: list[bytes], clients: int) -> float:
    """Requests per second with `clients` senders sharing `images`, after 10 warm-up requests."""
    for image in images[:10]:
        send(image)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, images))
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a checkpoint to serve (default: a random ResNet-18 stand-in)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", default="1,4", help="concurrent senders, one figure each")
    p.add_argument("--workers", type=int, default=1, help="mlflow models serve -w")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()

    from train import load_model
    from train.cli import compose
    from train.export import export

    root = tempfile.mkdtemp(prefix="bench_serve-")
    uri = f"sqlite:///{root}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    ckpt = args.ckpt or stand_in_checkpoint(root, args.backbone, args.image_size)
    export(compose("export", f"ckpt={ckpt}", f"out={root}/bundle", "parity.samples=8", "register=bench"))
    model = load_model(f"{root}/bundle")
    side = max(args.image_size, int(model.spec.image_size / model.spec.crop_pct))
    images = [jpeg(i, side) for i in range(args.requests)]
    figures: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": {"backbone": model.spec.backbone, "image_size": model.spec.image_size, "format": "onnx"},
        "requests": args.requests,
        "workers": args.workers,
        "inprocess_images_per_s": rate(lambda b: model.predict([b]), images, 1),
        "served": {},
    }
    server, url = serve(uri, "models:/bench/1", args.workers, f"{root}/serve.log")
    try:
        assert post(url, images[0])["label"] == model.predict([images[0]])[0]["label"]
        for clients in map(int, args.clients.split(",")):
            served = rate(lambda b: post(url, b), images, clients)
            figures["served"][f"clients{clients}"] = {
                "requests_per_s": served,
                "served_over_inprocess": served / figures["inprocess_images_per_s"],
            }
            print(
                f"{clients} client(s): {served:.1f} requests/s, "
                f"{served / figures['inprocess_images_per_s']:.2f} of in-process predict"
            )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    print(f"in-process predict, one image per call: {figures['inprocess_images_per_s']:.1f} images/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
