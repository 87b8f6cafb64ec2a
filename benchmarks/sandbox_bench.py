"""Sandbox benchmark: latency and throughput of the warm pool vs cold nsjail vs plain python.

Runs, in one process on one machine, three ways of executing the same snippets:
  api      POST /run_code on the real service (warm nsjail workers, fork per snippet)
  cold     one fresh `nsjail ... python -c CODE` per snippet, same jail config
  plain    one fresh `python -c CODE` per snippet, no isolation (the floor)
for three snippets (trivial print, sympy factor+solve, numpy), then sustained
throughput of trivial snippets through the API with concurrent clients, and the
memory of each warm worker. Prints a Markdown table and saves JSON.

    make bench-sandbox            # or: .venv/bin/python benchmarks/sandbox_bench.py --n 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.sandbox_service import JAIL_PYTHON_HOME, ROOT, nsjail_binary, run_sandbox

SNIPPETS = {
    "trivial": "print(1+1)",
    "sympy": ("import sympy as sp\nx = sp.symbols('x')\nprint(sp.factor(x**4 - 1), sp.solve(x**2 - 5*x + 6, x))"),
    "numpy": "import numpy as np\na = np.arange(1, 10001)\nprint(int((a**2).sum()), np.linalg.det(np.eye(3) * 2))",
}
EXPECTED = {
    "trivial": "2\n",
    "sympy": "(x - 1)*(x + 1)*(x**2 + 1) [2, 3]\n",
    "numpy": "333383335000 7.999999999999998\n",
}


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summary(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {
        "n": len(ms),
        "p50_ms": pct(ms, 50),
        "p95_ms": pct(ms, 95),
        "p99_ms": pct(ms, 99),
        "mean_ms": statistics.fmean(ms),
        "per_s_sequential": 1000 / statistics.fmean(ms),
    }


def bench_api(url: str, code: str, expected: str, n: int) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(n + 5):
            t0 = time.perf_counter()
            r = http.post("/run_code", json={"code": code})
            dt = time.perf_counter() - t0
            body = r.json()
            assert body["run_result"]["stdout"] == expected, body
            if i >= 5:  # warm-up
                out.append(dt)
    return out


def bench_subprocess(argv_prefix: list[str], code: str, expected: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        p = subprocess.run([*argv_prefix, code], capture_output=True, text=True)
        out.append(time.perf_counter() - t0)
        assert p.stdout == expected, (p.stdout, p.stderr[-500:])
    return out


async def throughput(url: str, seconds: float, concurrency: int) -> dict[str, float]:
    done = 0
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await http.post("/run_code", json={"code": SNIPPETS["trivial"]})
            lat.append(time.perf_counter() - t0)
            assert r.status_code == 200 and r.json()["status"] == "Success", r.text
            done += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "snippets": done,
        "seconds": elapsed,
        "per_s": done / elapsed,
        "p50_ms": pct([x * 1000 for x in lat], 50),
        "p99_ms": pct([x * 1000 for x in lat], 99),
    }


def worker_memory(service_pid: int) -> list[dict[str, float]]:
    """RSS/PSS of each jailed worker (the python under each nsjail child of the service)."""
    out = []
    for nsjail_pid in subprocess.run(["pgrep", "-P", str(service_pid)], capture_output=True, text=True).stdout.split():
        for pid in subprocess.run(["pgrep", "-P", nsjail_pid], capture_output=True, text=True).stdout.split():
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            fields = {ln.split(":")[0]: int(ln.split()[1]) for ln in rollup.splitlines()[1:] if ln.split()[-1] == "kB"}
            out.append({"pid": int(pid), "rss_mb": fields["Rss"] / 1024, "pss_mb": fields["Pss"] / 1024})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="samples per (mode, snippet) for api")
    ap.add_argument("--n-cold", type=int, default=30, help="samples per snippet for cold/plain")
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each throughput run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sandbox.json")
    args = ap.parse_args()

    py = str(JAIL_PYTHON_HOME / "bin" / "python3")
    results: dict[str, object] = {
        "machine": {
            "cpus": __import__("os").cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "latency": {},
        "throughput": [],
    }
    with run_sandbox({"THOR_SANDBOX_POOL_SIZE": "2", "THOR_SANDBOX_MAX_QUEUE": "256"}) as svc:
        cfg = svc.state_dir / "worker.cfg"
        cold_prefix = [str(nsjail_binary()), "--config", str(cfg), "--", "/opt/python/bin/python3", "-I", "-c"]
        plain_prefix = [py, "-I", "-c"]
        for name, code in SNIPPETS.items():
            lat = results["latency"].setdefault(name, {})  # type: ignore[union-attr]
            print(f"[{name}] api x{args.n} ...", flush=True)
            lat["api"] = summary(bench_api(svc.url, code, EXPECTED[name], args.n))
            print(f"[{name}] cold nsjail x{args.n_cold} ...", flush=True)
            lat["cold_nsjail"] = summary(bench_subprocess(cold_prefix, code, EXPECTED[name], args.n_cold))
            print(f"[{name}] plain python -c x{args.n_cold} ...", flush=True)
            lat["plain_python"] = summary(bench_subprocess(plain_prefix, code, EXPECTED[name], args.n_cold))
        for conc in (1, 4, 16):
            print(f"[throughput] trivial, concurrency {conc}, {args.seconds:.0f}s ...", flush=True)
            results["throughput"].append(asyncio.run(throughput(svc.url, args.seconds, conc)))  # type: ignore[union-attr]
        results["worker_memory"] = worker_memory(svc.process.pid)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print("| snippet | mode | p50 ms | p95 ms | p99 ms | sequential /s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, modes in results["latency"].items():  # type: ignore[union-attr]
        for mode, s in modes.items():
            print(
                f"| {name} | {mode} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} | {s['p99_ms']:.1f} | {s['per_s_sequential']:.0f} |"
            )
    print()
    print("| throughput (trivial, API) | snippets/s | p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: |")
    for t in results["throughput"]:  # type: ignore[union-attr]
        print(f"| concurrency {t['concurrency']} | {t['per_s']:.0f} | {t['p50_ms']:.1f} | {t['p99_ms']:.1f} |")
    print()
    for w in results["worker_memory"]:  # type: ignore[union-attr]
        print(f"worker pid {w['pid']}: RSS {w['rss_mb']:.0f} MB, PSS {w['pss_mb']:.0f} MB")
    print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
