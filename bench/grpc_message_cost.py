"""The floor under the gRPC edge: server CPU per streamed message of a bare grpc.aio server, no engine.

    python -m bench.grpc_message_cost    # not in `make bench`: a reference figure for BENCHMARKS.md

8 streams; a feeder thread wakes the event loop every PERIOD_S with one message for each stream (as the
engine's ``deliver`` does once a step). ``asyncio``: 8 consumer tasks build the same GenerateResponse and
drop it (what the in-process case of bench.grpc_edge does per message). ``grpc.aio``: 8 Generate streams
of a bare servicer yield it to a client process. Each server process on the first core, the client on the
second; CPU time of every thread of the server process (/proc schedstat) per message.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

from bench.common import cpu_model
from bench.grpc_edge import cpu_seconds

STREAMS, MESSAGES, PERIOD_S, RUNS = 8, 800, 0.01, 3


def feed(loop: asyncio.AbstractEventLoop, queues: list[asyncio.Queue[int | None]]) -> None:
    for i in range(MESSAGES):
        time.sleep(PERIOD_S)
        loop.call_soon_threadsafe(lambda i=i: [q.put_nowait(i) for q in queues])
    loop.call_soon_threadsafe(lambda: [q.put_nowait(None) for q in queues])


async def serve(mode: str) -> None:
    import grpc

    from loramux.v1 import generation_service_pb2 as gpb
    from loramux.v1 import generation_service_pb2_grpc as gsg

    loop = asyncio.get_running_loop()
    queues: list[asyncio.Queue[int | None]] = [asyncio.Queue() for _ in range(STREAMS)]
    joined: asyncio.Queue[asyncio.Queue[int | None]] = asyncio.Queue()
    for q in queues:
        joined.put_nowait(q)
    all_joined = asyncio.Event()

    def take_queue() -> asyncio.Queue[int | None]:
        q = joined.get_nowait()
        if joined.empty():
            all_joined.set()
        return q

    async def messages(q: asyncio.Queue[int | None]):  # type: ignore[no-untyped-def]
        while (item := await q.get()) is not None:
            yield gpb.GenerateResponse(chunk=gpb.TokenChunk(text="hello", token_ids=[item]))

    class Bare(gsg.GenerationServiceServicer):
        async def Generate(self, request, context):  # type: ignore[no-untyped-def]
            async for response in messages(take_queue()):
                yield response

    async def drop_all(q: asyncio.Queue[int | None]) -> None:
        async for _ in messages(q):
            pass

    server = None
    if mode == "grpc.aio":
        server = grpc.aio.server()
        gsg.add_GenerationServiceServicer_to_server(Bare(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        done = asyncio.gather(server.wait_for_termination())
        await asyncio.wait_for(all_joined.wait(), timeout=60)  # every stream has arrived
    else:
        done = asyncio.gather(*(drop_all(take_queue()) for _ in range(STREAMS)))
    start = cpu_seconds(os.getpid())
    feeder = threading.Thread(target=feed, args=(loop, queues), name="feeder")
    feeder.start()
    await asyncio.to_thread(feeder.join)
    if server is not None:
        await asyncio.to_thread(sys.stdin.readline)  # the client got every message
        await server.stop(None)
    await done
    print(f"{(cpu_seconds(os.getpid()) - start) / (STREAMS * MESSAGES) * 1e6:.1f}", flush=True)


async def client(port: int) -> None:
    import grpc

    from loramux.v1 import generation_service_pb2 as gpb
    from loramux.v1 import generation_service_pb2_grpc as gsg

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gsg.GenerationServiceStub(channel)

        async def one() -> int:
            return len([r async for r in stub.Generate(gpb.GenerateRequest())])

        counts = await asyncio.gather(*(one() for _ in range(STREAMS)))
    assert counts == [MESSAGES] * STREAMS, counts


def run(mode: str, cores: list[int]) -> float:
    here = [sys.executable, "-m", "bench.grpc_message_cost"]
    server = subprocess.Popen(
        ["taskset", "-c", str(cores[0]), *here, "--serve", mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        if mode == "grpc.aio":
            port = server.stdout.readline().strip()
            subprocess.run(["taskset", "-c", str(cores[1]), *here, "--client", port], check=True, timeout=120)
            server.stdin.write("\n")
            server.stdin.flush()
        return float(server.stdout.readline())
    finally:
        server.wait(60)


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        asyncio.run(serve(sys.argv[2]))
        return
    if sys.argv[1:2] == ["--client"]:
        asyncio.run(client(int(sys.argv[2])))
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        sys.exit("bench.grpc_message_cost needs two cores (the server's and the client's)")
    print(f"== bench.grpc_message_cost on {cpu_model()}: {STREAMS} streams, a message each every {PERIOD_S * 1e3:g} ms")
    for mode in ("asyncio", "grpc.aio"):
        costs = [run(mode, cores) for _ in range(RUNS)]
        print(f"{mode:10} server CPU per message, µs: {', '.join(f'{c:.1f}' for c in costs)}")


if __name__ == "__main__":
    main()
