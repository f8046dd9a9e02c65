"""``python -m benchmarks.markdown [JSON]``: the result tables of docs/benchmarks.md.

Renders a run's JSON (default ``benchmarks/results/latest.json``) as the
Markdown tables docs/benchmarks.md shows, so the document's numbers come
from one run, unedited.  ``--splice FILE`` replaces the text between the
``<!-- results:begin -->`` and ``<!-- results:end -->`` markers in FILE.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.__main__ import RESULTS

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _f(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def _mp(s: dict) -> str:
    return f"{_f(s['median_us'])} / {_f(s['p99_us'])}"


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}–{hi:.2f}"


def summary(r: dict) -> list[str]:
    out = ["| # | what | target | result | |", "|---|---|---|---|---|"]
    if "apdu" in r:
        out += apdu_summary(r["apdu"])
    if "overhead" in r:

        def added(mode: str) -> str:
            vals = [
                v["added_us"]["vs floor median"]
                for k, v in r["overhead"].items()
                if k.startswith("free") == (mode == "free")
            ]
            if not vals:
                return "–"
            return f"{min(vals):+.1f} to {max(vals):+.1f} µs"

        out.append(
            "| 2 | bridge-only cost, instant card (median over the card-less floor) | (report) | "
            f"{added('pinned')} pinned, {added('free')} free | |"
        )
    if "events" in r:
        e = [v for k, v in r["events"].items() if not k.startswith("quick")]
        med = max(x["median_us"] for x in e) / 1000
        mx = max(x["max_us"] for x in e) / 1000
        ok = "met" if mx <= 50 else "**missed**"
        out.append(
            "| 3 | card inserted → ATR frame, removed → CardRemove (after pcscd reports it) "
            f"| ≤ 50 ms | median ≤ {med:.1f} ms, max {mx:.1f} ms | {ok} |"
        )
    if "recovery" in r:
        rec = [v["QEMU listens -> ATR acked"] for v in r["recovery"].values()]
        mx = max(x["max_us"] for x in rec) / 1000
        meds = [x["median_us"] / 1000 for x in rec]
        ok = "met" if mx <= 1000 else "**missed**"
        out.append(
            "| 4 | QEMU killed and restarted → reconnected and ATR acked, after QEMU listens "
            f"| ≤ 1 s | median {min(meds):.0f}–{max(meds):.0f} ms, max {mx:.0f} ms | {ok} |"
        )
    if "memory" in r:
        m = r["memory"]
        ok = "met" if m["idle_mib"] <= 40 and m["growth_mib"] <= 1 else "**missed**"
        out.append(
            "| 5 | RSS idle / growth after 100k APDUs | ≤ 40 MB / ≤ 1 MB | "
            f"{m['idle_mib']:.1f} MiB / {m['growth_mib']:+.2f} MiB | {ok} |"
        )
    if "backpressure" in r and "error" not in r["backpressure"]:
        bp = r["backpressure"]
        ok = bp["growth_stalled_mib"] <= 1 and bp["growth_after_mib"] <= 1
        out.append(
            "| 5b | a peer that never reads: RSS over idle while stalled / after it reads or goes "
            f"away | bounded | {bp['growth_stalled_mib']:+.2f} / {bp['growth_after_mib']:+.2f} "
            f"MiB ({bp['stall']['apdus_sent']:,} APDUs unread; at fb07541: +84 MB, never "
            f"returned) | {'met' if ok else '**missed**'} |"
        )
    if "scale" in r:
        parts = [
            f"{v['p99 ratio']:.2f} ({v['cards']} "
            f"{'instant' if k.endswith('instant') else 'PC/SC'} cards, "
            f"{'free' if k.startswith('free') else 'pinned'})"
            for k, v in r["scale"].items()
        ]
        ok = all(v["p99 ratio"] <= 1.5 for v in r["scale"].values())
        out.append(
            "| 6 | p99 with N cards in one process / single-card p99 | ≤ 1.5 | "
            f"{', '.join(parts)} | {'met' if ok else '**missed**'} |"
        )
    if "codec" in r:
        c, f = r["codec"]["ccidbridge"], r["codec"]["struct (floor)"]
        out.append(
            f"| 7 | codec parse / build | (report) | {c['parse'] / 1e6:.2f} M / "
            f"{c['build'] / 1e6:.1f} M msg/s; {c['parse'] / f['parse']:.2f} / "
            f"{c['build'] / f['build']:.2f} of a bare `struct` codec | |"
        )
    return out


def _ratio(q: dict | None) -> str:
    if q is None:
        return "–"
    return f"{q['median']:.2f} [{q['q1']:.2f}–{q['q3']:.2f}] ({q['min']:.2f}–{q['max']:.2f})"


def _where(label: str) -> str:
    mode, card, sock = label.split()
    sched = "free" if mode == "free" else "pinned"
    return f"{sock}, {'vpcd card' if card == 'vpcd' else card}, {sched}"


def apdu_summary(a: dict) -> list[str]:
    """The APDU goals (docs/benchmarks.md#B1), judged on the per-round median ratios."""
    out = []
    pin = {k: v for k, v in a.items() if not k.startswith("free")}
    free = {k: v for k, v in a.items() if k.startswith("free")}

    def span(rows: dict, pair: str, sock: str) -> list[float]:
        return [v["ratios"][pair]["median"] for k, v in rows.items()
                if k.endswith(sock) and pair in v["ratios"]]  # fmt: skip

    for pair, sock, most in (("bridge/relay", "unix", 1.10), ("bridge/vscclient", "tcp", 1.00)):
        p, f = span(pin, pair, sock), span(free, pair, sock)
        if not p + f:
            continue
        met = "met" if all(x <= most for x in p + f) else "**missed**"
        what = pair.replace("/", " / ").replace("relay", "minimal blocking relay")
        out.append(
            f"| 1 | {what}, {'TCP' if sock == 'tcp' else 'Unix'} "
            f"socket (median of per-round ratios) | ≤ {most:.2f} | **{_span(p)}** pinned, "
            f"{_span(f)} free | {met} |"
        )

    def rng(who: str, key: str) -> str:
        return _span([v["per_apdu"][who][key] for v in a.values()])

    met = all(v["per_apdu"]["bridge"]["wakeups"] <= v["per_apdu"]["relay"]["wakeups"]
              for v in a.values())  # fmt: skip
    out.append(
        "| 1 | wake-ups per APDU (voluntary + involuntary context switches), bridge vs relay "
        f"| ≤ the relay's | voluntary {rng('bridge', 'voluntary')} vs "
        f"{rng('relay', 'voluntary')}, involuntary {rng('bridge', 'involuntary')} vs "
        f"{rng('relay', 'involuntary')} | {'met' if met else '**missed**'} |"
    )
    return out


APDU_COLUMNS = ("bridge", "relay", "session relay", "vscclient", "direct", "floor")
APDU_RATIOS = ("bridge/relay", "bridge/vscclient", "relay/vscclient", "bridge/session relay",
               "session relay/relay", "bridge/direct")  # fmt: skip


def apdu(r: dict) -> list[str]:
    head = (
        "| socket, card, scheduling | "
        + " | ".join(f"{n} median / p99" if n == "bridge" else n for n in APDU_COLUMNS)
        + " | "
        + " | ".join(
            f"**{q}**" if q in ("bridge/relay", "bridge/vscclient") else q for q in APDU_RATIOS
        )  # fmt: skip
        + " |"
    )
    out = [
        "Ratios: the median of the per-round ratios of block medians, [quartiles] and "
        "(min–max) over the rounds.",
        "",
        head,
        "|" + "---|" * (1 + len(APDU_COLUMNS) + len(APDU_RATIOS)),
    ]
    for label, res in r.items():
        st, q = res["stats"], res["ratios"]
        cells = [_mp(st[n]) if n in st else "–" for n in APDU_COLUMNS]
        cells += [_ratio(q.get(n)) for n in APDU_RATIOS]
        out.append(f"| {_where(label)} | " + " | ".join(cells) + " |")
    return out


def wakeups(r: dict) -> list[str]:
    names = ("bridge", "relay", "session relay", "vscclient", "socket floor")
    out = [
        "Per APDU, of the process serving the variant (all its threads): voluntary + "
        "involuntary context switches, then CPU µs; pcscd's wake-ups during the same blocks "
        "last (the same pcscd serves every variant).",
        "",
        "| socket, card, scheduling | "
        + " | ".join(names)
        + " | pcscd (bridge / relay / vscclient) |",
        "|" + "---|" * (2 + len(names)),
    ]
    for label, res in r.items():
        w, pw = res["per_apdu"], res["pcscd_per_apdu"]
        cells = [
            f"{w[n]['voluntary']:.2f} + {w[n]['involuntary']:.2f}, {w[n]['cpu_us']:.0f} µs"
            if n in w else "–"
            for n in names
        ]  # fmt: skip
        pc = " / ".join(f"{pw[n]['wakeups']:.1f}" if n in pw else "–"
                        for n in ("bridge", "relay", "vscclient"))  # fmt: skip
        out.append(f"| {_where(label)} | " + " | ".join(cells) + f" | {pc} |")
    return out


def overhead(r: dict) -> list[str]:
    out = [
        "| socket, scheduling | instant bridge median / p99 µs | floor | echo | instant/floor "
        "| instant/echo | added vs floor (medians) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, res in r.items():
        mode, sock = label.split()
        st, q, a = res["stats"], res["ratios"], res["added_us"]
        out.append(
            f"| {sock}, {'pinned' if mode != 'free' else 'free'} | {_mp(st['instant bridge'])} "
            f"| {_mp(st['floor'])} | {_mp(st['echo'])} "
            f"| {q['instant/floor median']:.2f} (p99 {q['instant/floor p99']:.2f}) "
            f"| {q['instant/echo median']:.2f} | +{a['vs floor median']:.1f} µs |"
        )
    return out


def events(r: dict) -> list[str]:
    out = ["| | median | p90 | max | target |", "|---|---|---|---|---|"]
    for name, s in r.items():
        if name.startswith("quick"):
            verdict = f"not judged: R10 holds the ATR {s.get('pause_s', 0.5):g} s after a removal"
        else:
            verdict = "≤ 50 ms: " + ("met" if s["max_us"] <= 50_000 else "**missed**")
        what = (
            name.replace("quick re-insert ->", "re-inserted at once →")
            .replace(" (R10 hold)", "")
            .replace("insert ->", "inserted →")
            .replace("remove ->", "removed →")
        )
        out.append(
            f"| {what} on the socket | {s['median_us'] / 1000:.2f} ms "
            f"| {s['p90_us'] / 1000:.2f} ms | {s['max_us'] / 1000:.2f} ms | {verdict} |"
        )
    return out


def recovery(r: dict) -> list[str]:
    out = ["| socket | median | max | per cycle (down s: ms) |", "|---|---|---|---|"]
    for sock, res in r.items():
        s = res["QEMU listens -> ATR acked"]
        cycles = ", ".join(
            f"{c['down_s']:.1f}: {c['listen_to_acked_ms']:.0f}" for c in res.get("cycles", [])
        )
        out.append(
            f"| {sock} | {s['median_us'] / 1000:.0f} ms | {s['max_us'] / 1000:.0f} ms | {cycles} |"
        )
    return out


def memory(r: dict) -> list[str]:
    end = next(k for k in r if k.startswith("after_") and k != "after_10k_mib")
    return [
        f"| idle, after the handshake | after 10k APDUs | after {end[6:-4]} APDUs | growth "
        "| growth 10k → end | APDU/s |",
        "|---|---|---|---|---|---|",
        f"| {r['idle_mib']:.1f} MiB | {r['after_10k_mib']:.1f} MiB | {r[end]:.1f} MiB "
        f"| {r['growth_mib']:+.2f} MiB | {r['growth_10k_to_end_mib']:+.2f} MiB "
        f"| {r['apdu_per_s']:,.0f} |",
    ]


def backpressure(r: dict) -> list[str]:
    s1, s2 = r["stall"], r["second_stall"]
    return [
        "| | VmRSS | APDUs | bridge while stalled |",
        "|---|---|---|---|",
        f"| idle, after the handshake | {r['idle_mib']:.1f} MiB | | |",
        f"| peer stops reading: sends stall | {s1['stalled_mib']:.1f} MiB | "
        f"{s1['apdus_sent']:,} sent unread | |",
        f"| 2 s later, still stalled | {s1['held_mib']:.1f} MiB | | "
        f"{s1['hold_wakeups_per_s']:.1f} wake-ups/s, {s1['hold_cpu_ms_per_s']:.2f} ms CPU/s |",
        f"| peer reads again | {r['after_read_mib']:.1f} MiB | {r['answers_read']:,} answers, "
        f"all 90 00, in {r['drain_s']:.1f} s | |",
        f"| then 1000 round trips | {r['after_1000_more_mib']:.1f} MiB | | |",
        f"| stalled again | {s2['held_mib']:.1f} MiB | {s2['apdus_sent']:,} sent unread | "
        f"{s2['hold_wakeups_per_s']:.1f} wake-ups/s, {s2['hold_cpu_ms_per_s']:.2f} ms CPU/s |",
        f"| peer goes away unread, listens again; reconnected, 1000 round trips "
        f"| {r['after_peer_gone_mib']:.1f} MiB | | |",
    ]


def scale(r: dict) -> list[str]:
    out = [
        "| cards | 1 card median / p99 µs | N cards round robin | p99 N/1 "
        "| p99 N/1 per round, median | median N/1 "
        "| all N busy at once: total APDU/s vs one card |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, res in r.items():
        b = res["busy"]
        mode, card = kind.split() if " " in kind else ("free", kind)
        what = (
            f"{res['cards']} {'instant cards' if card == 'instant' else 'PC/SC cards (vpcd)'}, "
            f"{'free' if mode == 'free' else 'pinned'}"
        )
        out.append(
            f"| {what} | {_mp(res['1 card'])} | {_mp(res['n cards'])} "
            f"| **{res['p99 ratio']:.2f}** "
            f"| {res.get('p99 ratio, median of rounds', float('nan')):.2f} "
            f"| {res['median ratio']:.2f} "
            f"| {b['all at once APDU/s']:,.0f} vs {b['single APDU/s']:,.0f} "
            f"({b['throughput ratio']:.1f}x; per-APDU p99 {_f(b['per-APDU']['p99_us'], 0)} µs) |"
        )
    return out


def codec(r: dict) -> list[str]:
    f = r["struct (floor)"]
    out = [
        "| codec | parse msg/s | build msg/s | parse / struct | build / struct |",
        "|---|---|---|---|---|",
    ]
    for name, c in r.items():
        out.append(
            f"| {name} | {c['parse']:,.0f} | {c['build']:,.0f} "
            f"| {c['parse'] / f['parse']:.2f} | {c['build'] / f['build']:.2f} |"
        )
    return out


def config(r: dict) -> list[str]:
    out = ["| shape | bytes | load ms | µs per KiB |", "|---|---|---|---|"]
    for shape, by_size in r.items():
        for size, seconds in by_size.items():
            out.append(
                f"| {shape} | {int(size):,} | {seconds * 1e3:.2f} "
                f"| {seconds * 1e6 / (int(size) / 1024):.1f} |"
            )
    return out


SECTIONS = {
    "apdu": ("1. APDU round trip (µs; floor = direct + socket floor, per sample)", apdu),
    "wakeups": ("1b. Wake-ups and CPU per APDU (item 1's blocks)", wakeups),
    "overhead": ("2. Bridge-only overhead (instant card behind the card-side interface)", overhead),
    "events": ("3. Card events (after pcscd reports the change)", events),
    "recovery": ("4. Recovery: QEMU listens again → ATR acked", recovery),
    "memory": ("5. Memory (VmRSS of the bridge process)", memory),
    "backpressure": ("5b. Memory under backpressure: a peer that never reads", backpressure),
    "scale": ("6. Scale (N cards in one bridge process)", scale),
    "codec": ("7. Codec", codec),
    "config": ("8. Config loading against config size", config),
}


def _vscclient_line(run: dict) -> list[str]:
    v = run.get("vscclient") or {}
    if not v:
        return []
    return [
        "",
        f"vscclient: libcacard {v['libcacard']} from Debian 12's source package, "
        f"`-Dpcsc={v['pcsc']}`, built by `make bench-deps` in {v['seconds']:g} s "
        "(download and build; cached after that).",
    ]


def _load_line(run: dict) -> list[str]:
    load = run.get("load") or {}
    if not load:
        return []
    parts = ", ".join(f"{k} {v[0]:.2f}" for k, v in load.items())
    return ["", f"Load average (1 min) at the end of each item: {parts}."]


def render(run: dict) -> str:
    r = run["results"]
    m = run["machine"]
    lines = [
        f"Run of {run['started']} on {m['cpu']} x{m['cpus']}, {m['mem_gib']} GiB, {m['os']}, "
        f"kernel {m['kernel']}, Python {m['python']}, pyscard {m['pyscard']}, pcscd {m['pcscd']}, "
        f"vpcd {m['vsmartcard-vpcd']}, QEMU {m['qemu']}; load average "
        f"{m['loadavg'][0]:.2f} at the start, {m.get('loadavg_end', [float('nan')])[0]:.2f} at "
        "the end.",
        *_vscclient_line(run),
        *_load_line(run),
        "",
        "#### Summary",
        "",
        *summary(r),
    ]
    for key, (title, fn) in SECTIONS.items():
        data = r.get("apdu" if key == "wakeups" else key)
        if data is not None and "error" not in data:
            lines += ["", f"#### {title}", "", *fn(data)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.markdown")
    p.add_argument("json", nargs="?", type=Path, default=RESULTS)
    p.add_argument("--splice", type=Path, help="replace the results block in this file")
    args = p.parse_args(argv)
    text = render(json.loads(args.json.read_text()))
    if args.splice is None:
        sys.stdout.write(text)
        return 0
    doc = args.splice.read_text()
    a, b = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    args.splice.write_text(doc[:a] + "\n" + text + doc[b:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
