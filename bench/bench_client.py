"""What one call costs through our ``IotClient`` against the official SDKs, with each signature.

Clients, each against the one official SDK that signs the same way:

* ``ours v1`` (signature version 1.0, HMAC-SHA1, iotreg's default) against ``older SDK v1``
  (``aliyun-python-sdk-core``'s ``AcsClient``, which signs only that way);
* ``ours v3`` (``IOT_SIGNATURE=v3``, ACS3-HMAC-SHA256) against ``current SDK v3``
  (``alibabacloud-iot20180120``'s ``Client``, its default signature);
* ``current SDK v1``: the current SDK with ``signature_algorithm='v2'`` (version 1.0), for the
  cost of the signature alone inside one SDK.

The same two calls go to the same local emulator, run in another process (``python -m bot emulator
--port 0 --no-quotas``) so that ``time.process_time`` here counts the client's CPU alone:

* QueryBatchRegisterDeviceStatus, a small query;
* BatchCheckDeviceNames with 100 names, a form body of 100 ``DeviceName.N`` fields.

Each call's wall time and CPU time is taken on its own. The two clients run in alternating blocks
(who goes first alternates too), so machine noise hits both alike; the figures are medians and p90s
and the ratios ours/official are of figures measured in the same run. Every client keeps its
connection alive (each holds a session); ours has ``RateLimiter({})``, no quotas, so this is the cost
of a call and not of a wait. The older SDK's side includes building its request object and
``json.loads`` of the answer, which our client does inside the call (and more: it builds dataclasses);
the current SDK builds its request model and parses the answer into its response model.

Target: ours no slower than the official SDK of the same signature, ratio <= 1.0.

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
from alibabacloud_iot20180120 import models as current_models
from alibabacloud_iot20180120.client import Client as CurrentClient
from alibabacloud_tea_openapi import models as open_api_models
from common import median, percentile, report, table

from bot.aliyun.client import Credentials, IotClient
from bot.aliyun.ratelimit import RateLimiter
from bot.standins.emulator import DEMO_ACCESS_KEY_ID, DEMO_ACCESS_KEY_SECRET, DEMO_PRODUCT_KEY

ROOT = Path(__file__).resolve().parent.parent
BARE = "ours v1 with a plain requests.Session (diagnostic)"
#: (ours, the official SDK that signs the same way): the pairs the target is judged on.
PAIRS = [("ours v1", "older SDK v1"), ("ours v3", "current SDK v3")]
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


def our_calls(endpoint: str, *, signature: str = "v1", plain_session: bool = False) -> tuple[IotClient, dict[str, Call]]:
    session = requests.Session() if plain_session else None  # None: the client's own, as in production
    credentials = Credentials(DEMO_ACCESS_KEY_ID, DEMO_ACCESS_KEY_SECRET)
    client = IotClient(endpoint, credentials, signature=signature, session=session, limiter=RateLimiter({}))
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


def current_sdk_calls(endpoint: str, signature: str) -> dict[str, Call]:
    """The current SDK as tests/test_official_sdk_v3.py points it at the emulator."""
    config = open_api_models.Config(
        access_key_id=DEMO_ACCESS_KEY_ID, access_key_secret=DEMO_ACCESS_KEY_SECRET,
        endpoint=urlsplit(endpoint).netloc, protocol="http", region_id="cn-shanghai",
    )
    if signature == "v1":
        config.signature_algorithm = "v2"  # the SDK's name for signature version 1.0
    client = CurrentClient(config)

    def check() -> object:
        return client.batch_check_device_names(
            current_models.BatchCheckDeviceNamesRequest(product_key=DEMO_PRODUCT_KEY, device_name=NAMES)
        ).body

    apply_id = check().data.apply_id  # type: ignore[attr-defined]

    def status() -> object:
        request = current_models.QueryBatchRegisterDeviceStatusRequest(product_key=DEMO_PRODUCT_KEY, apply_id=apply_id)
        return client.query_batch_register_device_status(request).body

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
        ours_v1_client, ours_v1 = our_calls(emulator.endpoint)
        ours_v3_client, ours_v3 = our_calls(emulator.endpoint, signature="v3")
        bare_client, bare = our_calls(emulator.endpoint, plain_session=True)
        each = {
            "ours v1": ours_v1,
            "older SDK v1": official_calls(emulator.endpoint),
            "ours v3": ours_v3,
            "current SDK v3": current_sdk_calls(emulator.endpoint, "v3"),
            "current SDK v1": current_sdk_calls(emulator.endpoint, "v1"),
            BARE: bare,
        }
        for operation in ours_v1:
            clients = {name: calls_of[operation] for name, calls_of in each.items()}
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
            for ours, official in PAIRS:
                for what, series in (("wall median", walls), ("wall p90", walls), ("client CPU median", cpus)):
                    pick = (lambda v: percentile(v, 90)) if what == "wall p90" else median
                    ratio = pick(series[ours]) / pick(series[official])
                    verdicts.append([
                        operation, f"{ours} / {official}", what, f"{ratio:.2f}", "—" if args.quick else ("PASS" if ratio <= 1.0 else "MISS"),
                    ])
            gaps.append([
                operation,
                f"{(median(cpus['ours v1']) - median(cpus['older SDK v1'])) * 1e3:+.2f}",
                f"{(median(cpus['ours v3']) - median(cpus['current SDK v3'])) * 1e3:+.2f}",
                f"{(median(cpus['ours v3']) - median(cpus['ours v1'])) * 1e3:+.2f}",
                f"{(median(cpus['current SDK v3']) - median(cpus['current SDK v1'])) * 1e3:+.2f}",
                f"{(median(cpus[BARE]) - median(cpus['ours v1'])) * 1e3:+.2f}",
            ])
            if args.profile:
                for name, call in clients.items():
                    print(f"\n### cProfile: {operation}, {name}, {calls} calls\n{profile(call, calls)}", file=sys.stderr)
        for client in (ours_v1_client, ours_v3_client, bare_client):
            client.close()

    body = (
        f"{calls} calls per client and operation, in alternating blocks of {args.block} after {warmup} warm-up calls each; "
        "the emulator runs in its own process (`python -m bot emulator --port 0 --no-quotas`). "
        "Wall = `perf_counter` around one call; CPU = `process_time` around one call, the client's own "
        "(request building, signing, HTTP, JSON, and for ours the dataclasses).\n\n"
        + ("**--quick: too few calls to judge; the target is not judged.**\n\n" if args.quick else "")
        + table(["operation", "client", "calls", "wall median ms", "wall p90 ms", "CPU median ms", "CPU mean ms"], rows)
        + "\n\nRatio ours / the official SDK of the same signature (target <= 1.0):\n\n"
        + table(["operation", "pair", "figure", "ratio", "result"], verdicts)
        + "\n\nClient CPU a call (medians): ours minus the official SDK, per signature; what V3 costs over "
        "version 1.0, in our client and in the current SDK; and what a plain session's per-call environment "
        f"lookup (proxies) would cost (it grows with the size of the environment, {len(os.environ)} variables here):\n\n"
        + table(
            ["operation", "ours v1 − older SDK, ms", "ours v3 − current SDK, ms", "ours: v3 − v1, ms", "current SDK: v3 − v1, ms", "diagnostic − ours v1, ms"],
            gaps,
        )
    )
    report("IotClient vs the official SDKs, both signatures: cost of a call", body)


if __name__ == "__main__":
    main()
