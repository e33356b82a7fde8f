"""Figures for `aigis bench`: medians and ratios, the text tables, machine info, profile summaries.

Pure functions over the JSON-ready dicts the suite collects; only `tools/bench.py` prints them.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from aigis.benchmarks.harness import KINDS, REPO_ROOT

FIGURES = ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_req", "server_cpu_util", "client_cpu_util",
           "other_cpu_util")


def median_of(windows: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [w[key] for w in windows if w.get(key) is not None]
    return statistics.median(values) if values else None


def medians(windows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    return {key: median_of(windows, key) for key in FIGURES}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def scenario_result(scenario: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds per kind, and aigis/baseline ratios of each figure."""
    result: dict[str, Any] = {**scenario, "status": "ok", "rounds": rounds}
    if scenario["family"] == "flood":
        med: dict[str, Any] = {
            k: {part: medians([r[k][part] for r in rounds]) for part in ("alone", "flooded")} for k in KINDS
        }
        kept = {k: ratio(med[k]["flooded"]["rps"], med[k]["alone"]["rps"]) for k in KINDS}
        flooded = {k: [r[k]["flooded"].get("flood", {}) for r in rounds] for k in KINDS}
        flood_rps = {k: median_of(flooded[k], "rps") for k in KINDS}
        flood_cpu = {k: median_of(flooded[k], "server_cpu_us_per_call") for k in KINDS}
        result.update(median=med, kept=kept, flood_rps=flood_rps, flood_cpu_us_per_call=flood_cpu,
                      ratio={"kept": ratio(kept["aigis"], kept["baseline"]),
                             "rps_flooded": ratio(med["aigis"]["flooded"]["rps"], med["baseline"]["flooded"]["rps"])})
        return result
    by_kind = {k: medians([r[k] for r in rounds]) for k in KINDS}
    ratios = {key: ratio(by_kind["aigis"][key], by_kind["baseline"][key]) for key in FIGURES[:4]}
    metric = scenario["metric"]
    result.update(median=by_kind, ratio=ratios,
                  spread={k: spread([r[k][metric] for r in rounds]) for k in KINDS},
                  round_ratios=[ratio(r["aigis"].get(metric), r["baseline"].get(metric)) for r in rounds])
    return result


def spread(values: Sequence[float | None]) -> float | None:
    """(max - min) / median of the rounds: how far to trust a median (0.1 = rounds within 10 %)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    middle = statistics.median(present)
    return (max(present) - min(present)) / middle if middle else None


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def render_table(results: dict[str, Any]) -> str:
    """The human summary: one headline row per scenario, then details and notes."""
    settings = results["settings"]
    machine = results["machine"]
    lines = [
        f"aigis bench: {settings['rounds']} round(s) x {settings['seconds']:g} s, medians; "
        f"ratio = aigis / baseline; nproc {machine['nproc']}, load average before {machine['load_before'][0]:.2f}",
        "",
        f"{'scenario':<28} {'metric':<22} {'baseline':>11} {'aigis':>11} {'ratio':>7}",
    ]

    def row(name: str, metric: str, base: float | None, subj: float | None, digits: int = 1,
            r: float | None = None) -> None:
        r = ratio(subj, base) if r is None else r
        lines.append(f"{name:<28} {metric:<22} {fmt(base, digits):>11} {fmt(subj, digits):>11} {fmt(r, 2):>7}")

    details: list[str] = []
    for sc in results["scenarios"]:
        name = sc["name"]
        if sc["status"] != "ok":
            lines.append(f"{name:<28} skipped (see notes)")
            continue
        if sc["family"] == "flood":
            med = sc["median"]
            row(name, "valid req/s alone", med["baseline"]["alone"]["rps"], med["aigis"]["alone"]["rps"])
            row(name, "valid req/s flooded", med["baseline"]["flooded"]["rps"], med["aigis"]["flooded"]["rps"])
            row(name, "flooded / alone", sc["kept"]["baseline"], sc["kept"]["aigis"], 2)
            row(name, "flood calls/s", sc["flood_rps"]["baseline"], sc["flood_rps"]["aigis"])
            row(name, "server CPU us/call", sc["flood_cpu_us_per_call"]["baseline"],
                sc["flood_cpu_us_per_call"]["aigis"])
            for kind in KINDS:
                for part in ("alone", "flooded"):
                    details.append(_detail(f"{name} {part}", kind, med[kind][part]))
            continue
        med = sc["median"]
        if sc["metric"] == "p50_ms":
            row(name, "p50 ms", med["baseline"]["p50_ms"], med["aigis"]["p50_ms"], 3)
        else:
            row(name, "req/s", med["baseline"]["rps"], med["aigis"]["rps"])
        row("", "server CPU us/req", med["baseline"]["server_cpu_us_per_req"],
            med["aigis"]["server_cpu_us_per_req"])
        for kind in KINDS:
            details.append(_detail(name, kind, med[kind], sc["spread"][kind]))
        if sc.get("round_ratios"):
            details.append(f"{name:<34} aigis / baseline by round (baseline first in rounds 1, 3, ...): "
                           + " ".join(fmt(r, 2) for r in sc["round_ratios"]))
    for lim in results.get("limits", []):
        if lim.get("status") != "ok":
            continue
        tag = ",batching" if lim["variant"] == "on" else ""
        row(f"limit[{lim['model']}{tag}]", "aigis req/s / min(*)", lim["limit_rps"], lim["aigis_rps"], 1,
            lim["ratio"])
    lines += ["", "Details (medians)",
              f"{'scenario':<34} {'kind':<9} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>10} "
              f"{'srv CPU':>8} {'cli CPU':>8} {'other':>6} {'spread':>7}", *details,
              "(CPU = share of one core over the window; other = CPU used by processes not ours; spread = "
              "(max - min) / median of the headline figure over rounds)"]
    notes = list(results.get("notes", []))
    for raw in results.get("raw", []):
        if raw.get("status") == "ok":
            notes.append(raw["summary"])
    for lim in results.get("limits", []):
        notes.append(lim["summary"])
    if notes:
        lines += ["", "Notes", *(f"- {n}" for n in notes)]
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def _detail(name: str, kind: str, m: dict[str, Any], spread: float | None = None) -> str:
    return (f"{name:<34} {kind:<9} {fmt(m['rps']):>10} {fmt(m['p50_ms'], 3):>8} {fmt(m['p99_ms'], 3):>8} "
            f"{fmt(m['server_cpu_us_per_req']):>10} {_pct(m['server_cpu_util']):>8} "
            f"{_pct(m['client_cpu_util']):>8} {_pct(m['other_cpu_util']):>6} {_pct(spread):>7}")


def machine_info() -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "onnxruntime": version("onnxruntime"),
        "numpy": version("numpy"),
        "pyjwt": version("PyJWT"),
        "load_before": list(os.getloadavg()),
    }


def raw_summary(model: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    p50 = statistics.median(r["batch1_latency_us"]["p50"] for r in rounds) / 1000
    best: dict[str, float] = {}
    for size in rounds[0]["throughput"]:
        values = [r["throughput"][size]["images_per_second"] for r in rounds if "images_per_second"
                  in r["throughput"].get(size, {})]
        if values:
            best[size] = statistics.median(values)
    best_size = max(best, key=lambda s: best[s]) if best else None
    text = (f"raw onnxruntime [{model}]: session.run batch 1 p50 {p50:.4f} ms; images/s by batch size "
            + ", ".join(f"{s}: {v:,.0f}" for s, v in best.items())
            + f" ({rounds[0]['threads']} threads)")
    return {"model": model, "status": "ok", "rounds": rounds, "p50_ms": p50, "images_per_second": best,
            "best_batch": best_size, "best_images_per_second": best[best_size] if best_size else None,
            "summary": text}


def classifier_notes(scenarios: list[dict[str, Any]], raw: list[dict[str, Any]]) -> list[str]:
    """aigis's ClassifyImage p50 at 1 in flight against raw session.run (target: at most +0.5 ms)."""
    notes = []
    raw_p50 = {r["model"]: r["p50_ms"] for r in raw if r.get("status") == "ok"}
    for sc in scenarios:
        if sc["status"] != "ok" or sc["rpc"] != "classify" or sc["in_flight"] != 1 or sc["model"] not in raw_p50:
            continue
        aigis_p50 = sc["median"]["aigis"]["p50_ms"]
        base_p50 = sc["median"]["baseline"]["p50_ms"]
        diff = aigis_p50 - raw_p50[sc["model"]]
        notes.append(f"{sc['name']}: aigis p50 {aigis_p50:.3f} ms = raw session.run + {diff:.3f} ms "
                     f"(target <= +0.5 ms: {'met' if diff <= 0.5 else 'NOT met'}); "
                     f"bare baseline = raw + {base_p50 - raw_p50[sc['model']]:.3f} ms")
    return notes


def profile_summary(path: Path, requests: int, rate: int, top: int = 25) -> dict[str, Any]:
    """The costliest functions by inclusive and by self time, overall and in aigis's own code, from
    py-spy's raw collapsed stacks (`frame;frame;... count`, idle threads not sampled): samples / rate
    is CPU time, divided by the `requests` served in the sampled window."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = security = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        if _in_security_path(frames):
            security += count
    per_call = 1e6 / rate / max(requests, 1)
    rows: list[dict[str, Any]] = [{"function": frame, "self_us_per_req": own.get(frame, 0) * per_call,
             "cum_us_per_req": samples * per_call, "own": _is_ours_frame(frame)}
            for frame, samples in inclusive.items()]

    def best(key: str, ours: bool) -> list[dict[str, Any]]:
        return sorted((r for r in rows if r["own"] or not ours), key=lambda r: -r[key])[:top]

    return {"requests": requests, "sampler": f"py-spy {rate} Hz", "samples": total,
            "total_seconds": total / rate, "us_per_req": total * per_call,
            "security_us_per_req": security * per_call,
            "by_cumulative": best("cum_us_per_req", False), "by_self": best("self_us_per_req", False),
            "ours_by_cumulative": best("cum_us_per_req", True), "ours_by_self": best("self_us_per_req", True)}


# What runs around every servicer: the secured wrapper (server/secured.py) and everything it calls
# (enforcer, guard, token and identity caches, metrics, grpc's context accessors), but not the
# servicer itself nor the request decode, which the bare server does too.
_WRAPPER_FILE = "server/secured.py:"
_NOT_SECURITY = ("(_decode_body)", "(_decode_request_stream.<locals>.decoded)")


def _in_security_path(frames: list[str]) -> bool:
    """A sample spent in the security path: under the secured wrapper, not in a servicer's code
    (any other server/ module below the wrapper) and not decoding the request."""
    below = None
    for i, frame in enumerate(frames):
        if frame.startswith(_WRAPPER_FILE):
            below = i
            break
    if below is None:
        return False
    for frame in frames[below + 1:]:
        if frame.endswith(_NOT_SECURITY):
            return False
        if frame.startswith("server/") and not frame.startswith((_WRAPPER_FILE, "server/metrics.py:")):
            return False
    return True


def _frame(frame: str) -> str:
    """`func (/path/file.py:12)` as `file path relative to the repo or site-packages:line(func)`."""
    func, _, where = frame.partition(" (")
    filename, _, line = where.rstrip(")").rpartition(":")
    return f"{_short(filename or where.rstrip(')'))}:{line}({func})"


def _is_ours_frame(frame: str) -> bool:
    return frame.startswith(("auth/", "server/"))


def _short(filename: str) -> str:
    for marker in (str(REPO_ROOT) + os.sep, "site-packages" + os.sep):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def render_profile(result: dict[str, Any]) -> str:
    p = result["profile"]
    w = result["window"]
    lines = [f"{result['kind']} under {result['load']} load, profiled: {p['requests']} calls, "
             f"{fmt(w['rps'])} valid req/s, sampled by {p['sampler']}: server CPU {p['us_per_req']:.1f} us/call "
             f"(all threads); raw stacks in {result['profile_file']}",
             f"security path (the secured wrapper and all it calls, servicer and request decode excluded): "
             f"{p.get('security_us_per_req', 0.0):.1f} us/call"]
    timed = result.get("timed")
    if timed is not None:
        us = timed["us_per_call"]
        lines.append(f"security path timed inside a fresh aigis server, no sampler ({timed['figures']['calls']} calls, "
                     f"{fmt(timed['window']['rps'])} valid req/s): {us['security_path']:.1f} us/call = method lookup "
                     f"{us['lookup']:.1f} + admission {us['admit']:.1f} - request decode {us['decode']:.1f} "
                     f"+ metrics {us['metrics']:.1f}")
    for title, key in (("by cumulative time, aigis code (auth/, server/)", "ours_by_cumulative"),
                       ("by self time, aigis code", "ours_by_self"),
                       ("by cumulative time, everything", "by_cumulative"),
                       ("by self time, everything", "by_self")):
        lines += ["", f"Top {title}: us per call (inclusive | self)"]
        for r in p[key][:20]:
            lines.append(f"  {r['cum_us_per_req']:8.1f} | {r['self_us_per_req']:7.1f}  {r['function']}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- CLI

