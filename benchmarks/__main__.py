"""``python -m benchmarks [ITEM...]``: run the benchmarks (docs/benchmarks.md), print tables, JSON.

Items (all by default, in this order): apdu, overhead, events, recovery,
memory, backpressure, scale, codec, config.  Run inside ``.ci/isolated`` (``make
bench``): the
items that need pcscd start a private one.  ``--quick`` makes every item
smaller (a smoke run: numbers are noisier).  JSON goes to
``benchmarks/results/latest.json`` unless ``--json`` says otherwise.

Every figure is a distribution or a ratio measured in the same run; see each
module's docstring for what exactly is measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from benchmarks import apdu, backpressure, codec, config, lifecycle, scale, vscclient
from benchmarks.common import machine

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
#: Seconds any one item may take before it is abandoned (SIGALRM); the
#: slowest, scale, takes about 100 s on a 2-vCPU VM.
ITEM_BUDGET = 600


class ItemTimeout(Exception):
    pass


def _commit() -> str:
    """The commit measured, with ``+changes`` if the work tree differs from it."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "status",
                "--porcelain",
                "--",
                "ccidbridge",
                "benchmarks",
                "lab",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + ("+changes" if dirty else "")  # fmt: skip


def _alarm(signum: int, frame: object) -> None:
    raise ItemTimeout(f"item took longer than {ITEM_BUDGET} s")


TARGETS = {
    "apdu": "per-round median: bridge <= 1.10x the minimal relay (Unix), <= 1.00x vscclient"
    " (TCP); wake-ups per APDU no more than the relay's (goals: reported, not asserted)",
    "overhead": "(no target: the bridge's own cost, card time removed)",
    "events": "<= 50 ms added (median and max)",
    "recovery": "<= 1 s after QEMU listens again (max)",
    "memory": "idle RSS <= 40 MB, growth after 100k APDUs <= 1 MB",
    "backpressure": "a peer that never reads: RSS stays bounded (<= 1 MB over idle), every"
    " APDU answered once it reads again",
    "scale": "16-card p99 / single-card p99 <= 1.5",
    "codec": "(no target: msg/s against a plain struct codec)",
    "config": "linear: load time per KiB at 1 MiB <= 2x that at 16 KiB",
}


def _us(x: float) -> str:
    return f"{x:,.1f}"


def _dist_row(name: str, s: dict[str, float]) -> str:
    return f"  {name:<28}{_us(s['median_us']):>12}{_us(s['p99_us']):>12}{s['n']:>8}"


def _dist_head() -> str:
    return f"  {'':<28}{'median µs':>12}{'p99 µs':>12}{'n':>8}"


#: The goals of item 1 (docs/benchmarks.md#B1; reported against, not asserted): numerator,
#: denominator, socket, the most the per-round median ratio may be.
APDU_GOALS = (("bridge", "relay", "unix", 1.10), ("bridge", "vscclient", "tcp", 1.00))
APDU_ROWS = ("bridge", "relay", "session relay", "vscclient", "direct", "socket floor", "floor")


def _spread(q: dict) -> str:
    return f"{q['median']:.2f} [{q['min']:.2f}-{q['max']:.2f}, IQR {q['q1']:.2f}-{q['q3']:.2f}]"


def apdu_goals(res: dict, sock: str) -> list[tuple[str, bool]]:
    """(what, met) for each APDU goal (docs/benchmarks.md#B1) that applies to one configuration."""
    out = []
    for a, b, on, most in APDU_GOALS:
        q = res["ratios"].get(f"{a}/{b}")
        if on == sock and q is not None:
            out.append((f"{a}/{b} <= {most:.2f}", q["median"] <= most))
    w = res["per_apdu"]
    out.append(("wake-ups <= relay's", w["bridge"]["wakeups"] <= w["relay"]["wakeups"]))
    return out


def report_apdu(r: dict) -> tuple[list[str], bool]:
    lines, ok = [], True
    for label, res in r.items():
        mode, card, sock = label.split()
        lines.append(f" {sock} socket, card {card}, scheduling {mode}")
        lines.append(_dist_head() + f"{'wake-ups/APDU':>16}{'CPU µs':>8}{'pcscd':>7}")
        w, pw = res["per_apdu"], res["pcscd_per_apdu"]
        for name in APDU_ROWS:
            if name not in res["stats"]:
                continue
            row = _dist_row(name, res["stats"][name])
            if name in w:
                v = w[name]
                row += f"{v['voluntary']:>8.2f} +{v['involuntary']:>5.2f}{v['cpu_us']:>9.1f}"
            elif name in pw:
                row += " " * 24
            if name in pw:
                row += f"{pw[name]['wakeups']:>7.2f}"
            lines.append(row)
        for pair, q in res["ratios"].items():
            lines.append(f"  {pair:<26}{_spread(q)}  (pooled {q['pooled']:.2f})")
        goals = apdu_goals(res, sock)
        ok &= all(met for _, met in goals)
        lines.append(
            "  goals: " + ", ".join(f"{what} {'MET' if met else 'MISSED'}" for what, met in goals)
        )
    return lines, ok


def report_overhead(r: dict) -> tuple[list[str], bool]:
    lines = []
    for sock, res in r.items():
        lines.append(f" {sock} socket")
        lines.append(_dist_head())
        for name, s in res["stats"].items():
            lines.append(_dist_row(name, s))
        q, a = res["ratios"], res["added_us"]
        lines.append(
            f"  instant/floor {q['instant/floor median']:.2f} (p99 {q['instant/floor p99']:.2f})"
            f"   instant/echo {q['instant/echo median']:.2f} (p99 {q['instant/echo p99']:.2f})"
            f"   added: {a['vs floor median']:.1f} µs vs floor, {a['vs echo median']:.1f} µs"
            " vs echo (medians)"
        )
    return lines, True


def report_events(r: dict) -> tuple[list[str], bool]:
    lines = [f"  {'':<42}{'median ms':>11}{'p90 ms':>9}{'max ms':>9}{'n':>5}"]
    ok = True
    for name, s in r.items():
        judged = not name.startswith("quick")
        met = s["max_us"] <= 50_000
        if judged:
            ok &= met
        verdict = ("MET" if met else "MISSED") if judged else "(held on purpose: R10)"
        lines.append(
            f"  {name:<42}{s['median_us'] / 1000:>11.2f}{s['p90_us'] / 1000:>9.2f}"
            f"{s['max_us'] / 1000:>9.2f}{s['n']:>5}  {verdict}"
        )
    return lines, ok


def report_recovery(r: dict) -> tuple[list[str], bool]:
    lines = [f"  {'':<36}{'median ms':>11}{'max ms':>9}{'n':>5}"]
    ok = True
    for sock, res in r.items():
        s = res["QEMU listens -> ATR acked"]
        k = res["kill -> QEMU listens"]
        met = s["max_us"] <= 1_000_000
        ok &= met
        lines.append(
            f"  {sock + ': QEMU listens -> ATR acked':<36}{s['median_us'] / 1000:>11.1f}"
            f"{s['max_us'] / 1000:>9.1f}{s['n']:>5}  {'MET' if met else 'MISSED'}"
        )
        lines.append(
            f"  {sock + ': kill -> QEMU listens':<36}{k['median_us'] / 1000:>11.1f}"
            f"{k['max_us'] / 1000 if 'max_us' in k else float('nan'):>9.1f}{k['n']:>5}"
        )
        lines.append(
            "    per cycle (QEMU down s: listens -> acked ms): "
            + ", ".join(f"{c['down_s']:.1f}: {c['listen_to_acked_ms']:.0f}" for c in res["cycles"])
        )
    return lines, ok


def report_memory(r: dict) -> tuple[list[str], bool]:
    ok = r["idle_mib"] <= 40 and r["growth_mib"] <= 1
    end = next(k for k in r if k.startswith("after_") and k != "after_10k_mib")
    return [
        f"  idle RSS {r['idle_mib']:.1f} MiB   after 10k {r['after_10k_mib']:.1f} MiB   "
        f"{end[6:-4]} APDUs {r[end]:.1f} MiB   growth {r['growth_mib']:+.2f} MiB "
        f"(10k->end {r['growth_10k_to_end_mib']:+.2f})   {r['apdu_per_s']:,.0f} APDU/s   "
        f"{'MET' if ok else 'MISSED'}"
    ], ok


def report_backpressure(r: dict) -> tuple[list[str], bool]:
    s1, s2 = r["stall"], r["second_stall"]
    ok = r["growth_stalled_mib"] <= 1 and r["growth_after_mib"] <= 1
    return [
        f"  idle {r['idle_mib']:.1f} MiB; stalled after {s1['apdus_sent']:,} APDUs unread: "
        f"{s1['stalled_mib']:.1f} MiB, {s1['held_mib']:.1f} MiB {backpressure.HOLD:g} s later "
        f"({s1['hold_wakeups_per_s']:.1f} wake-ups/s, {s1['hold_cpu_ms_per_s']:.2f} ms CPU/s)",
        f"  peer reads again: {r['answers_read']:,} answers (all 90 00) in {r['drain_s']:.1f} s,"
        f" {r['after_read_mib']:.1f} MiB; after 1000 more {r['after_1000_more_mib']:.1f} MiB",
        f"  second stall ({s2['apdus_sent']:,} unread, {s2['held_mib']:.1f} MiB), peer gone, "
        f"reconnected, 1000 more: {r['after_peer_gone_mib']:.1f} MiB   "
        f"{'MET' if ok else 'MISSED'}",
    ], ok


def report_scale(r: dict) -> tuple[list[str], bool]:
    lines, ok = [], True
    for kind, res in r.items():
        met = res["p99 ratio"] <= 1.5
        ok &= met
        mode, card = kind.split()
        lines.append(f" cards: {card}, {res['cards']} in one bridge process, scheduling {mode}")
        lines.append(_dist_head())
        lines.append(_dist_row("1 card", res["1 card"]))
        lines.append(_dist_row(f"{res['cards']} cards, round robin", res["n cards"]))
        b = res["busy"]
        lines.append(_dist_row(f"{res['cards']} cards, all busy", b["per-APDU"]))
        lines.append(
            f"  p99 n/1 {res['p99 ratio']:.2f} {'MET' if met else 'MISSED'} (per round, median:"
            f" {res.get('p99 ratio, median of rounds', float('nan')):.2f})   median n/1 "
            f"{res['median ratio']:.2f}   all busy: {b['all at once APDU/s']:,.0f} APDU/s total"
            f" vs {b['single APDU/s']:,.0f} for one card ({b['throughput ratio']:.2f}x)"
        )
    return lines, ok


def report_codec(r: dict) -> tuple[list[str], bool]:
    return ["  " + line for line in codec.report(r)], True


def report_config(r: dict) -> tuple[list[str], bool]:
    ok = True
    for by_size in r.values():
        sizes = sorted(by_size, key=int)
        per_kib = {s: by_size[s] / int(s) for s in sizes}
        ok &= per_kib[sizes[-1]] <= 2 * per_kib[next(s for s in sizes if int(s) >= 16 << 10)]
    return ["  " + line for line in config.report(r)] + [f"  {'MET' if ok else 'MISSED'}"], ok


def _codec() -> dict:
    return codec.measure()


ITEMS: dict[str, tuple[Callable[[bool], dict], Callable[[dict], tuple[list[str], bool]]]] = {
    "apdu": (lambda q: apdu.run_apdu(*((4, 150) if q else (10, 300))), report_apdu),
    "overhead": (lambda q: apdu.run_overhead(*((4, 150) if q else (10, 300))), report_overhead),
    "events": (lambda q: lifecycle.run_events(4 if q else 10), report_events),
    "recovery": (
        lambda q: lifecycle.run_recovery(lifecycle.DOWN_TIMES_QUICK if q else lifecycle.DOWN_TIMES),
        report_recovery,
    ),
    "memory": (lambda q: lifecycle.run_memory(20_000 if q else 100_000), report_memory),
    "backpressure": (lambda q: backpressure.run_backpressure(), report_backpressure),
    "scale": (
        lambda q: scale.run_scale(*((2, 400, 640) if q else (6, 1000, 1600))),
        report_scale,
    ),
    "codec": (lambda q: _codec(), report_codec),
    "config": (lambda q: config.measure(2 if q else config.RUNS), report_config),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument(
        "items", nargs="*", metavar="ITEM", help=f"any of: {', '.join(ITEMS)} (default: all)"
    )
    p.add_argument("--quick", action="store_true", help="smaller runs (smoke test)")
    p.add_argument("--json", type=Path, default=RESULTS, help=f"default: {RESULTS}")
    args = p.parse_args(argv)
    signal.signal(signal.SIGALRM, _alarm)
    items = args.items or list(ITEMS)
    unknown = [i for i in items if i not in ITEMS]
    if unknown:
        p.error(f"unknown item(s) {', '.join(unknown)}; choose from {', '.join(ITEMS)}")
    started = datetime.datetime.now(datetime.UTC)
    out: dict[str, object] = {
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "vscclient": vscclient.info(),
        "commit": _commit(),
        "quick": args.quick,
        "targets": {k: TARGETS[k] for k in items},
        "results": {},
        "met": {},
        "seconds": {},
        "load": {},
    }
    m = out["machine"]
    print(
        f"ccidbridge benchmarks, {out['started']}: {m['cpu']} x{m['cpus']}, {m['mem_gib']} GiB, "
        f"{m['os']}, kernel {m['kernel']}, Python {m['python']}, pyscard {m['pyscard']}, "
        f"pcscd {m['pcscd']}, vpcd {m['vsmartcard-vpcd']}, QEMU {m['qemu']}, "
        f"load {', '.join(f'{x:.2f}' for x in m['loadavg'])}"
    )
    failed = False
    for name in items:
        run, report = ITEMS[name]
        t0 = time.monotonic()
        print(f"\n== {name}: target {TARGETS[name]}", flush=True)
        signal.alarm(ITEM_BUDGET)  # a hung bridge or card cannot hold the run forever
        try:
            res = run(args.quick)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other items
            traceback.print_exc()
            out["results"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  FAILED to run: {exc}", flush=True)
            failed = True
            continue
        finally:
            signal.alarm(0)
        out["seconds"][name] = round(time.monotonic() - t0, 1)
        out["load"][name] = os.getloadavg()  # the machine is shared: how busy it was
        out["results"][name] = res
        lines, ok = report(res)
        out["met"][name] = ok
        print("\n".join(lines), flush=True)
        print(f"  ({out['seconds'][name]} s)", flush=True)
    out["machine"]["loadavg_end"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"\nJSON: {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
