"""Run every benchmark in bench/, one after the other; each prints its figures and appends them to
bench/RESULTS.md. Not part of the test suite: a full run takes a few minutes.

    python bench/run.py            # all of them
    python bench/run.py --quick    # each on a small run: checks the scripts work
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["bench_files.py", "bench_client.py", "bench_approval.py", "bench_ack.py", "bench_scale.py", "bench_store.py", "bench_quota.py"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every benchmark in bench/; each prints its figures and appends them to bench/RESULTS.md.")
    parser.add_argument("--quick", action="store_true", help="each on a small run: checks the scripts work")
    parser.add_argument("only", nargs="*", metavar="SCRIPT", help=f"only these ({', '.join(BENCHMARKS)})")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only) - set(BENCHMARKS))
    if unknown:
        parser.error(f"no benchmark {', '.join(unknown)}; choose among {', '.join(BENCHMARKS)}")
    failed = []
    for script in args.only or BENCHMARKS:
        print(f"\n=== {script} ===", flush=True)
        if subprocess.run([sys.executable, str(HERE / script), *(["--quick"] if args.quick else [])]).returncode != 0:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
