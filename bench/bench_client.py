"""What one call costs through our ``IotClient`` against the official SDK's ``AcsClient``.

The same two calls go to the same local emulator, run in another process (``python -m bot emulator
--port 0 --no-quotas``) so that ``time.process_time`` here counts the client's CPU alone:

* QueryBatchRegisterDeviceStatus, a small query;
* BatchCheckDeviceNames with 100 names, a form body of 100 ``DeviceName.N`` fields.

Each call's wall time and CPU time is taken on its own. The two clients run in alternating blocks
(who goes first alternates too), so machine noise hits both alike; the figures are medians and p90s
and the ratios ours/official are of figures measured in the same run. Both clients keep their
connection alive (each holds a session); ours has ``RateLimiter({})``, no quotas, so this is the cost
of a call and not of a wait. The official side includes building its request object and
``json.loads`` of the answer, which our client does inside the call (and more: it builds dataclasses).

Target: ours no slower, ratio <= 1.0.

A third, diagnostic client is ours handed a plain ``requests.Session()``, as a caller who brings
their own session would: requests then reads the environment's proxy settings (a scan of all of
``os.environ``) in every ``Session.send``. The client's own session has requests work that out
once, when it is built.

Where our client's cost went, as profiled (``--profile``): it once went through
``Session.request``, which merges cookies, headers and hooks, reads the environment, and parses the
whole URL again (urllib3 checks it byte by byte in Python); it now prepares the request itself, from
a base URL checked once, and calls ``Session.send``, as the SDK does. Parameters are
percent-encoded once, for the signature and the wire, with a regex fast path for the common case of
nothing to encode, and the string to sign encodes the already-encoded query with three substitutions
where the SDK runs ``quote`` over it byte by byte.

    python bench/bench_client.py            # about 10 s
    python bench/bench_client.py --quick    # a few seconds: checks the script works
    python bench/bench_client.py --profile  # also cProfile both clients, the top functions
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import requests
from aliyunsdkcore.client import AcsClient
from aliyunsdkiot.request.v20180120.BatchCheckDeviceNamesRequest import BatchCheckDeviceNamesRequest
from aliyunsdkiot.request.v20180120.QueryBatchRegisterDeviceStatusRequest import QueryBatchRegisterDeviceStatusRequest
from common import median, percentile, report, table

from bot.aliyun.client import Credentials, IotClient
from bot.aliyun.ratelimit import RateLimiter
from bot.standins.emulator import DEMO_ACCESS_KEY_ID, DEMO_ACCESS_KEY_SECRET, DEMO_PRODUCT_KEY

ROOT = Path(__file__).resolve().parent.parent
BARE = "ours with a plain requests.Session (diagnostic)"
NAMES = [f"bench-{i:04d}" for i in range(100)]

Call = Callable[[], object]


class EmulatorProcess:
    """``python -m bot emulator`` on a free port, stopped on exit."""

    def __enter__(self) -> EmulatorProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-m", "bot", "emulator", "--port", "0", "--no-quotas", "--seed", "1"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        found = re.search(r"listening on (http://\S+)", line)
        if not found:
            self.process.kill()
            raise SystemExit(f"the emulator did not start: {line!r} {self.process.stderr.read() if self.process.stderr else ''}")
        self.endpoint = found.group(1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def our_calls(endpoint: str, *, plain_session: bool = False) -> tuple[IotClient, dict[str, Call]]:
    session = requests.Session() if plain_session else None  # None: the client's own, as in production
    credentials = Credentials(DEMO_ACCESS_KEY_ID, DEMO_ACCESS_KEY_SECRET)
    client = IotClient(endpoint, credentials, session=session, limiter=RateLimiter({}))
    apply_id = client.batch_check_device_names(DEMO_PRODUCT_KEY, NAMES).apply_id
    return client, {
        "QueryBatchRegisterDeviceStatus": lambda: client.query_batch_register_device_status(DEMO_PRODUCT_KEY, apply_id),
        "BatchCheckDeviceNames (100 names)": lambda: client.batch_check_device_names(DEMO_PRODUCT_KEY, NAMES),
    }


def official_calls(endpoint: str) -> dict[str, Call]:
    url = urlsplit(endpoint)
    host = url.hostname
    # As tests/test_official_sdk.py points it at the emulator: plain HTTP to its host and port.
    client = AcsClient(DEMO_ACCESS_KEY_ID, DEMO_ACCESS_KEY_SECRET, "cn-shanghai", auto_retry=False, port=url.port)

    def send(request: object) -> dict:
        request.set_endpoint(host)  # type: ignore[attr-defined]
        request.set_protocol_type("http")  # type: ignore[attr-defined]
        return json.loads(client.do_action_with_exception(request))

    def check() -> dict:
        request = BatchCheckDeviceNamesRequest()
        request.set_ProductKey(DEMO_PRODUCT_KEY)
        request.set_DeviceNames(NAMES)
        return send(request)

    apply_id = check()["Data"]["ApplyId"]

    def status() -> dict:
        request = QueryBatchRegisterDeviceStatusRequest()
        request.set_ProductKey(DEMO_PRODUCT_KEY)
        request.set_ApplyId(apply_id)
        return send(request)

    return {"QueryBatchRegisterDeviceStatus": status, "BatchCheckDeviceNames (100 names)": check}


def timed(call: Call, n: int, walls: list[float], cpus: list[float]) -> None:
    for _ in range(n):
        c0, w0 = time.process_time(), time.perf_counter()
        call()
        w1, c1 = time.perf_counter(), time.process_time()
        walls.append(w1 - w0)
        cpus.append(c1 - c0)


def profile(call: Call, n: int, top: int = 12) -> str:
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [call() for _ in range(n)])
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a much smaller run, to check the script works")
    parser.add_argument("--calls", type=int, default=None, help="calls per client and operation [default: 300, with --quick 20]")
    parser.add_argument("--block", type=int, default=10, help="calls in a row before switching client [default: 10]")
    parser.add_argument("--profile", action="store_true", help="also cProfile each client (printed, not reported)")
    args = parser.parse_args(argv)
    calls = args.calls or (20 if args.quick else 300)
    warmup = 5 if args.quick else 30

    rows, verdicts, gaps = [], [], []
    with EmulatorProcess() as emulator:
        ours_client, ours = our_calls(emulator.endpoint)
        bare_client, bare = our_calls(emulator.endpoint, plain_session=True)
        official = official_calls(emulator.endpoint)
        for operation in ours:
            clients = {"ours": ours[operation], "official": official[operation], BARE: bare[operation]}
            for call in clients.values():  # connections open, caches warm
                for _ in range(warmup):
                    call()
            walls: dict[str, list[float]] = {name: [] for name in clients}
            cpus: dict[str, list[float]] = {name: [] for name in clients}
            for block in range(-(-calls // args.block)):
                names = list(clients)  # who goes first rotates
                order = names[block % len(names):] + names[: block % len(names)]
                for name in order:
                    timed(clients[name], min(args.block, calls - block * args.block), walls[name], cpus[name])
            for name in clients:
                rows.append([
                    operation, name, len(walls[name]),
                    f"{median(walls[name]) * 1e3:.2f}", f"{percentile(walls[name], 90) * 1e3:.2f}",
                    f"{median(cpus[name]) * 1e3:.2f}", f"{sum(cpus[name]) / len(cpus[name]) * 1e3:.2f}",
                ])
            for what, series in (("wall median", walls), ("wall p90", walls), ("client CPU median", cpus)):
                pick = (lambda v: percentile(v, 90)) if what == "wall p90" else median
                ratio = pick(series["ours"]) / pick(series["official"])
                diagnostic = pick(series[BARE]) / pick(series["official"])
                verdicts.append([
                    operation, what, f"{ratio:.2f}", "—" if args.quick else ("PASS" if ratio <= 1.0 else "MISS"), f"{diagnostic:.2f}",
                ])
            gap = median(cpus["ours"]) - median(cpus["official"])
            proxies = median(cpus[BARE]) - median(cpus["ours"])
            gaps.append([operation, f"{gap * 1e3:+.2f}", f"{proxies * 1e3:+.2f}"])
            if args.profile:
                for name, call in clients.items():
                    print(f"\n### cProfile: {operation}, {name}, {calls} calls\n{profile(call, calls)}", file=sys.stderr)
        ours_client.close()
        bare_client.close()

    body = (
        f"{calls} calls per client and operation, in alternating blocks of {args.block} after {warmup} warm-up calls each; "
        "the emulator runs in its own process (`python -m bot emulator --port 0 --no-quotas`). "
        "Wall = `perf_counter` around one call; CPU = `process_time` around one call, the client's own "
        "(request building, signing, HTTP, JSON, and for ours the dataclasses).\n\n"
        + ("**--quick: too few calls to judge; the target is not judged.**\n\n" if args.quick else "")
        + table(["operation", "client", "calls", "wall median ms", "wall p90 ms", "CPU median ms", "CPU mean ms"], rows)
        + "\n\nRatio ours / official (target <= 1.0); the last column is the diagnostic client's ratio:\n\n"
        + table(["operation", "figure", "ours / official", "result", "diagnostic / official"], verdicts)
        + "\n\nClient CPU a call, ours minus official, and what a plain session's per-call environment "
        "lookup (proxies) would cost (the diagnostic minus ours; it grows with the size of the environment, "
        f"{len(os.environ)} variables here):\n\n"
        + table(["operation", "ours − official, ms", "diagnostic − ours, ms"], gaps)
    )
    report("IotClient vs the official SDK: cost of a call", body)


if __name__ == "__main__":
    main()
