"""`embedstore serve` under load, on loopback only, bounded in time.

A store of --rows synthetic 768-d vectors (benchmarks/synthetic.py; DICOM-style keys) with an
IVF_FLAT index on cls; `embedstore serve` started as a subprocess on 127.0.0.1. Queries are
`POST /api/search {"key": K, "k": 10}` (slice level, the ANN index) with K drawn from the stored keys.

1. In process: the same queries through the Python API (`embedstore.open(store).search(key=K, k=10)`),
   one after another: p50 / p99.
2. One HTTP client, one request after another: p50 / p99; its p50 minus the in-process p50 is the
   service's own cost per request (target: within 10 ms).
3. --clients concurrent HTTP clients (asyncio, keep-alive) for --seconds: requests/s, p50 / p99, errors.
4. The same in process: --clients threads calling the Python API for --seconds, so the loaded p50 has
   a baseline under the same concurrency (on 2 cores a query waits for the others either way).

    python benchmarks/serve.py [--rows 100000] [--clients 16] [--seconds 30] [--workdir /tmp/embedstore-bench-serve]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # embedstore from this checkout
from synthetic import write_synthetic_store  # noqa: E402  (this folder is on the path: the script's own)

SEQUENTIAL_QUERIES = 300


def build(root: Path, n_rows: int) -> None:
    from embedstore.search.index import build_index
    from embedstore.store import Store

    model_ids, _ = write_synthetic_store(root / "store", n_rows, (2.0,), key=lambda i: f"dicom:1.2.826.0.1.{i}:0")
    report = build_index(Store.open(root / "store"), model_ids[0], "cls", "slice", "ivf_flat")
    print(f"index: {report.parameters.index_type}, recall@10 {report.recall_at_10:.3f}, built in "
          f"{report.build_seconds:.1f} s", flush=True)


def percentiles(seconds: list[float]) -> dict:
    milliseconds = np.array(seconds) * 1000
    return {"n": len(seconds), "p50_ms": round(float(np.percentile(milliseconds, 50)), 2),
            "p99_ms": round(float(np.percentile(milliseconds, 99)), 2)}


def in_process(store_path: Path, keys: list[str]) -> dict:
    import embedstore

    store = embedstore.open(store_path)
    store.search(key=keys[0], k=10)  # warm: tables opened, index loaded
    times = []
    for key in keys:
        started = time.perf_counter()
        store.search(key=key, k=10)
        times.append(time.perf_counter() - started)
    return percentiles(times)


def threads_in_process(store_path: Path, keys: list[str], clients: int, seconds: float) -> dict:
    import embedstore

    store = embedstore.open(store_path)
    store.search(key=keys[0], k=10)
    times: list[float] = []
    deadline = time.perf_counter() + seconds

    def client_loop(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            store.search(key=keys[int(rng.integers(len(keys)))], k=10)
            times.append(time.perf_counter() - started)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    wall = time.perf_counter() - started
    return {"clients": clients, "seconds": round(wall, 1), "requests_per_s": round(len(times) / wall, 1),
            **percentiles(times)}


def sequential_http(url: str, keys: list[str]) -> dict:
    import httpx

    times = []
    with httpx.Client(base_url=url, timeout=30) as client:
        client.post("/api/search", json={"key": keys[0], "k": 10}).raise_for_status()
        for key in keys:
            started = time.perf_counter()
            client.post("/api/search", json={"key": key, "k": 10}).raise_for_status()
            times.append(time.perf_counter() - started)
    return percentiles(times)


async def load(url: str, keys: list[str], clients: int, seconds: float) -> dict:
    import httpx

    times, errors = [], []
    deadline = time.perf_counter() + seconds
    rng = np.random.default_rng(1)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            key = keys[int(rng.integers(len(keys)))]
            started = time.perf_counter()
            try:
                response = await client.post("/api/search", json={"key": key, "k": 10})
                if response.status_code != 200 or len(response.json()["results"]) != 10:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
                    continue
            except httpx.HTTPError as error:
                errors.append(repr(error))
                continue
            times.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - started
    return {"clients": clients, "seconds": round(wall, 1), "requests_per_s": round(len(times) / wall, 1),
            "errors": len(errors), "first_errors": errors[:3], **percentiles(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/embedstore-bench-serve"))
    args = parser.parse_args()
    root = args.workdir / f"rows-{args.rows}"
    if not (root / "ready").exists():
        root.mkdir(parents=True, exist_ok=True)
        build(root, args.rows)
        (root / "ready").touch()
    rng = np.random.default_rng(0)
    keys = [f"dicom:1.2.826.0.1.{i}:0" for i in rng.integers(0, args.rows, SEQUENTIAL_QUERIES)]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "embedstore"), "serve", str(root / "store"),
                               "--port", str(port)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/api/models", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("embedstore serve did not start")
                time.sleep(0.2)
        local = in_process(root / "store", keys)
        one_client = sequential_http(url, keys)
        loaded = asyncio.run(load(url, keys, args.clients, args.seconds))
    finally:
        server.terminate()
        server.wait(timeout=30)
    local_loaded = threads_in_process(root / "store", keys, args.clients, args.seconds)
    overhead = round(one_client["p50_ms"] - local["p50_ms"], 2)
    print(f"{args.rows:,} rows: in process p50 {local['p50_ms']} ms, p99 {local['p99_ms']} ms; one HTTP client p50 "
          f"{one_client['p50_ms']} ms (+{overhead} ms), p99 {one_client['p99_ms']} ms")
    print(f"{args.clients} clients for {loaded['seconds']} s: {loaded['requests_per_s']} requests/s, p50 "
          f"{loaded['p50_ms']} ms, p99 {loaded['p99_ms']} ms, {loaded['errors']} errors; in process, {args.clients} "
          f"threads: {local_loaded['requests_per_s']} queries/s, p50 {local_loaded['p50_ms']} ms, "
          f"p99 {local_loaded['p99_ms']} ms")
    print(json.dumps({"rows": args.rows, "in_process": local, "one_client": one_client,
                      "service_overhead_p50_ms": overhead, "load": loaded, "in_process_threads": local_loaded}))


if __name__ == "__main__":
    main()
