"""A bounded load test of ``probekit serve``: throughput, latency and memory per concurrency.

The script starts ``python -m probekit serve RUN`` itself on 127.0.0.1 (a free port), waits for
``/healthz``, then for each concurrency N (default 1, 8, 32, 128) sends a fixed number of
``POST /v1/classify`` requests from N concurrent clients (asyncio, one keep-alive connection per
client framed by h11, opened before the clock starts) and reports per N: throughput (requests/s,
texts/s), p50/p99 latency of the answered requests, how many were answered 200, 503 (queue
full), another status, failed (connection errors) or timed out, and the server's resident memory
(RSS) before and after. Then it stops the server with SIGTERM and prints its exit code. Every
request has a timeout and every level a fixed count, so the script ends by itself. Nothing is
trained or downloaded: give a run or an export folder.

    python benchmarks/serve_load.py --run runs/my-probe
    python benchmarks/serve_load.py --run export/ --requests 200 --concurrency 1,8 --json out.json
    python benchmarks/serve_load.py --run runs/my-probe --server-arg=--max-batch=32 --server-arg=--queue=64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORDS = [
    *("the", "cat", "sat", "on", "the", "mat", "the", "dog", "ran", "in", "the", "park", "the", "sun"),
    *("is", "warm", "we", "like", "green", "tea", "a", "bird", "sings", "today", "the", "river", "flows"),
    *("slowly", "under", "a", "blue", "sky", "she", "reads", "a", "book", "in", "a", "quiet", "room"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float | None:
    """The resident memory of process ``pid`` in MiB (psutil when installed, else /proc)."""
    try:
        import psutil

        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except ImportError:
        pass
    except Exception:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def texts_for(index: int, per_request: int) -> list[str]:
    """Deterministic texts of 3 to 24 words."""
    out = []
    for j in range(per_request):
        start, length = (index * 7 + j * 3) % len(WORDS), 3 + (index * 5 + j) % 22
        out.append(" ".join(WORDS[(start + k) % len(WORDS)] for k in range(length)))
    return out


class Client:
    """One keep-alive HTTP/1.1 connection on asyncio streams, framed by h11 (uvicorn's own HTTP
    parser, installed with it): much lighter per request than httpx's connection pool, so that
    at 128 clients the numbers measure the server, not the load generator."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.state: Any = None

    async def request(self, method: str, path: str, body: bytes = b"") -> int:
        """Send one request; its status code once the whole response is read."""
        import h11

        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
            self.state = h11.Connection(h11.CLIENT)
        reader, writer = self.streams
        headers = [("Host", self.host), ("Content-Length", str(len(body)))]
        if body:
            headers.append(("Content-Type", "application/json"))
        writer.write(
            self.state.send(h11.Request(method=method, target=path, headers=headers))
            + self.state.send(h11.Data(data=body))
            + self.state.send(h11.EndOfMessage())
        )
        await writer.drain()
        status = 0
        while True:
            event = self.state.next_event()
            if event is h11.NEED_DATA:
                self.state.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection")
        if self.state.our_state is h11.DONE and self.state.their_state is h11.DONE:
            self.state.start_next_cycle()
        else:
            self.close()
        return status

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
        self.streams, self.state = None, None


async def level(port: int, clients: int, requests: int, per_request: int, timeout: float) -> dict[str, Any]:
    """``requests`` requests from ``clients`` concurrent clients; counts and latencies."""
    counts = {"200": 0, "503": 0, "other": 0, "errors": 0, "timeouts": 0}
    latencies: list[float] = []
    next_index = iter(range(requests))
    pool = [Client("127.0.0.1", port) for _ in range(clients)]

    async def worker(client: Client) -> None:
        for index in next_index:
            body = json.dumps({"texts": texts_for(index, per_request)}).encode()
            started = time.perf_counter()
            try:
                status = await asyncio.wait_for(client.request("POST", "/v1/classify", body), timeout)
            except asyncio.TimeoutError:
                counts["timeouts"] += 1
                client.close()
                continue
            except Exception:  # a refused or broken connection, a protocol error
                counts["errors"] += 1
                client.close()
                continue
            counts[str(status) if status in (200, 503) else "other"] += 1
            if status == 200:
                latencies.append(time.perf_counter() - started)

    # open every client's connection first: the timed part measures serving, not TCP set-up
    await asyncio.gather(*(c.request("GET", "/healthz") for c in pool), return_exceptions=True)
    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in pool))
    seconds = time.perf_counter() - started
    for client in pool:
        client.close()
    latencies.sort()

    def percentile(q: float) -> float | None:
        if not latencies:
            return None
        return latencies[min(len(latencies) - 1, max(0, round(q * len(latencies)) - 1))] * 1000

    return {
        "clients": clients,
        "requests": requests,
        "seconds": seconds,
        "requests_per_s": counts["200"] / seconds,
        "texts_per_s": counts["200"] * per_request / seconds,
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
        **counts,
    }


def start_server(run: str, port: int, extra: list[str], wait_s: float) -> subprocess.Popen[bytes]:
    import httpx

    command = [sys.executable, "-m", "probekit", "serve", run, "--port", str(port), *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise SystemExit(f"serve_load: the server exited with {process.returncode}:\n{err}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"serve_load: the server did not answer /healthz within {wait_s:.0f} s")


def table(rows: list[dict[str, Any]]) -> list[str]:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    def mib(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    lines = [
        "| clients | requests | req/s | texts/s | p50 ms | p99 ms | 200 | 503 | other | errors | timeouts "
        "| RSS before MiB | RSS after MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['requests_per_s']:.1f} | {r['texts_per_s']:.1f} "
            f"| {ms(r['p50_ms'])} | {ms(r['p99_ms'])} | {r['200']} | {r['503']} | {r['other']} "
            f"| {r['errors']} | {r['timeouts']} | {mib(r['rss_before_mib'])} | {mib(r['rss_after_mib'])} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="A run folder or an ONNX export folder to serve.")
    parser.add_argument("--requests", type=int, default=400, help="Requests per concurrency level.")
    parser.add_argument("--concurrency", default="1,8,32,128", help="Comma-separated client counts.")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=30.0, help="Seconds per request.")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument(
        "--server-arg", action="append", default=[], help="An option for probekit serve (repeatable)."
    )
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args(argv)
    levels = [int(n) for n in args.concurrency.split(",") if n.strip()]
    if not Path(args.run).is_dir() or args.requests < 1 or not levels or min(levels) < 1:
        parser.error("--run must be a folder; --requests and every --concurrency at least 1")
    port = free_port()
    server = start_server(args.run, port, args.server_arg, args.startup_timeout)
    rows: list[dict[str, Any]] = []
    try:
        for clients in levels:
            before = rss_mib(server.pid)
            result = asyncio.run(level(port, clients, args.requests, args.texts_per_request, args.timeout))
            rows.append({**result, "rss_before_mib": before, "rss_after_mib": rss_mib(server.pid)})
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait(10)
    print(
        f"probekit serve {args.run} ({os.cpu_count()} CPUs; {args.requests} requests per level, "
        f"{args.texts_per_request} text(s) each; server options: {' '.join(args.server_arg) or 'defaults'})"
    )
    print()
    for line in table(rows):
        print(line)
    print()
    print(f"server exit code after SIGTERM: {code}")
    if args.json is not None:
        args.json.write_text(json.dumps({"levels": rows, "exit_code": code}, indent=2) + "\n")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
