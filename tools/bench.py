"""`aigis bench`: aigis against a bare grpc.aio baseline, side by side in one run, as ratios.

Both servers run in their own processes on 127.0.0.1 (port 0, reported through a ready file), with
the same servicers, models, executor, mTLS credentials and transport options; the baseline simply
has no interceptor. The same load generators (Python grpc.aio clients, separate processes, one
mTLS channel each, a real token from aigis's issuer) drive both, in alternating windows: for every
round, every scenario runs baseline then aigis, so drift on a shared machine hits both alike.
Absolute numbers move from run to run; the ratios measured in one run are what to compare.

Scenario families (`--scenarios`):
  add       Calculator.Add at each `--in-flight` level: req/s, p50/p99, server CPU µs per request
  classify  ClassifyImage at 1 in flight (p50, against raw onnxruntime `session.run`) and at the
            highest level (req/s); one pair of servers per `--model-dir`
  batching  the same with the model's `[batching]` table enabled (skipped with a note if the
            server's model loader does not know that table)
  limit     what the RPC stack alone can do: the baseline serving a model that costs nothing, and
            raw onnxruntime at its best batch size; aigis's req/s over the smaller of the two
  flood     valid Add traffic alone, then beside a process sending tokens signed by a wrong key

`--cnn` adds a generated 224x224 RGB CNN (tools/make_cnn.py) to the classifier scenarios.
`--infer` instead measures Open Inference Protocol ModelInfer (raw FP32 tensors) at 1 and the highest
in-flight level: aigis against the bare baseline serving the same protocol, and with `--mlserver`
against MLServer (installed once into its own venv; benchmarks/mlserver.py, mlserver_runtime.py).
`--profile OUT` instead samples an aigis server with py-spy under the highest Add load (raw stacks to OUT) and prints
the functions that cost the most.

The machine may be shared: each window takes a machine-wide lock (so two `aigis bench` runs take
turns), first waits for other work to go quiet, and is measured again if other processes still
used more than a quarter core during it; the CPU others used is reported per window. Every child
process is killed on exit.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aigis.auth.clients import load_registry
from aigis.auth.pki import PkiPaths
from aigis.benchmarks.harness import (
    KINDS,
    MAX_REQUESTS_PER_PROCESS,
    READY_TIMEOUT_SECONDS,
    BenchError,
    Child,
    Load,
    ServerProc,
    WindowTiming,
    kill_all,
    machine_lock,
    run_window,
    start_servers,
    wait_for_quiet,
)
from aigis.benchmarks.report import (
    classifier_notes,
    fmt,
    machine_info,
    median_of,
    profile_summary,
    ratio,
    raw_summary,
    render_profile,
    render_table,
    scenario_result,
)

FAMILIES = ("add", "classify", "batching", "limit", "flood")
VALID_CLIENT = "demo"
FLOOD_CLIENT = "flood"
FORGED_TOKENS = 2_000
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Settings:
    rounds: int = 3
    seconds: float = 5.0  # one measurement window
    warmup: float = 1.0  # load already running, not counted, before each window
    families: tuple[str, ...] = FAMILIES
    in_flight: tuple[int, ...] = (1, 16, 64)
    # At `split_at` calls in flight or more, the load is spread over this many client processes:
    # one Python client costs nearly as much CPU as the server (FACTS.md), so one process alone
    # would measure the client.
    client_procs: int = 2
    split_at: int = 32
    model_dirs: tuple[Path, ...] = ()
    raw_batch_sizes: tuple[int, ...] = (1, 8, 32, 64)
    raw_seconds: float = 2.0
    raw_threads: int = 2  # as many as the server's inference executor
    flood_valid_in_flight: int = 16
    flood_in_flight: int = 64
    batch_size: int = 32
    batch_delay_us: int = 0  # the server's default: batches form only while earlier ones run
    cnn: bool = False  # also generate a 224x224 RGB CNN (tools/make_cnn.py) and measure it
    # Other helpers' test runs share this machine. Before each window, wait up to `quiet_wait`
    # seconds for the rest of the machine to go quiet; a window during which other work used more
    # than `max_other_cpu` of a core is measured again, at most `retries` times.
    quiet_wait: float = 120.0
    max_other_cpu: float = 0.25
    retries: int = 2
    lock_wait: float = 900.0  # for another `aigis bench` on this machine to finish its window
    quick: bool = False

    @property
    def top_in_flight(self) -> int:
        return max(self.in_flight)

    @property
    def timing(self) -> WindowTiming:
        return WindowTiming(self.seconds, self.warmup)


QUICK = Settings(rounds=1, seconds=1.0, warmup=0.3, in_flight=(1, 16), raw_batch_sizes=(1, 8), raw_seconds=0.3,
                 quiet_wait=0.0, retries=0, lock_wait=0.0, quick=True)


def fetch_token(server: ServerProc, pki: PkiPaths) -> str:
    """A real access token from the aigis server's embedded issuer (client credentials over mTLS)."""
    from aigis.client_sdk import AigisError, ClientCredentials

    assert server.token_url is not None
    try:
        return ClientCredentials(
            server.token_url, ca=pki.ca_cert, cert=pki.client_cert(VALID_CLIENT), key=pki.client_key(VALID_CLIENT)
        ).token()
    except AigisError as exc:
        raise BenchError(f"cannot get a token from the aigis issuer: {exc}") from None


# -------------------------------------------------------------------------------- scenarios

@dataclass(frozen=True)
class Scenario:
    """One row of the result table."""

    name: str
    family: str
    metric: str  # the headline figure: "rps" or "p50_ms"
    rpc: str = "add"  # "add" or "classify"
    in_flight: int = 1
    variant: str = "off"  # which model directory variant the servers load: "off" / "on" (batching)
    model: str = ""  # model directory name, for classify scenarios


@dataclass
class Pair:
    """The servers of one model variant and the token their load generators send."""

    servers: dict[str, ServerProc]
    token: str
    issuer_url: str


@dataclass
class ModelSetup:
    """One `--model-dir`: its variants on disk, what a request looks like, whether batching works."""

    name: str
    source: Path
    dirs: dict[str, Path]  # variant ("off", "on", "null") -> a models directory holding only it
    image: dict[str, Any]
    batching_note: str | None = None  # why the batching variant is skipped, if it is


def request_image(model_dir: Path) -> dict[str, Any]:
    """A request at the model's own input size: raw grayscale bytes for L models, a PNG for RGB."""
    import numpy as np

    from aigis.server.model import CONFIG_FILE, ColorMode, ModelConfig

    config = ModelConfig.from_toml(model_dir / CONFIG_FILE)
    rng = np.random.default_rng(7)
    if config.color_mode is ColorMode.L:
        data = rng.integers(0, 256, config.width * config.height, dtype=np.uint8).tobytes()
        return {"data_b64": base64.b64encode(data).decode(), "width": config.width, "height": config.height,
                "model": config.name, "encoding": "raw-gray"}
    from PIL import Image

    pixels = rng.integers(0, 256, (config.height, config.width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return {"data_b64": base64.b64encode(buffer.getvalue()).decode(), "width": 0, "height": 0,
            "model": config.name, "encoding": "png"}


def prepare_model(source: Path, root: Path, settings: Settings) -> ModelSetup:
    """Copy `source` into off/on/null variants under `root` (each its own models directory)."""
    from aigis.benchmarks.inference import batching_table, config_refusal, model_variant, write_null_model

    if not (source / "model.toml").is_file():
        raise BenchError(f"{source}: not a model directory (no model.toml)")
    dirs = {v: root / f"{source.name}-{v}" for v in ("off", "on", "null")}
    for path in dirs.values():
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            raise BenchError(f"{source}: two --model-dir directories are named {source.name!r}") from None
    on = model_variant(source, dirs["on"], batching_table(True, settings.batch_size, settings.batch_delay_us))
    refusal = config_refusal(on)
    note = None
    if refusal is None:
        model_variant(source, dirs["off"], batching_table(False, settings.batch_size, settings.batch_delay_us))
    else:
        note = f"batching skipped: the model loader refuses a [batching] table ({refusal})"
        model_variant(source, dirs["off"], None)
    null_note = None
    try:
        write_null_model(source, dirs["null"])
    except (ValueError, ImportError) as exc:
        null_note = str(exc)
    setup = ModelSetup(source.name, source, dirs, request_image(dirs["off"] / source.name), note)
    if null_note is not None:
        del setup.dirs["null"]
    return setup


def scenarios_for(settings: Settings, models: Sequence[ModelSetup]) -> list[Scenario]:
    out: list[Scenario] = []
    top = settings.top_in_flight
    if "add" in settings.families:
        out += [Scenario(f"add-{n}", "add", "p50_ms" if n == 1 else "rps", "add", n) for n in settings.in_flight]
    # The limit compares aigis's classify throughput with its bounds, so it brings classify along.
    wanted = set(settings.families) | ({"classify"} if "limit" in settings.families else set())
    for variant, family in (("off", "classify"), ("on", "batching")):
        if family not in wanted:
            continue
        for model in models:
            tag = f"{model.name}" + (",batching" if variant == "on" else "")
            out.append(Scenario(f"classify-1[{tag}]", family, "p50_ms", "classify", 1, variant, model.name))
            if top > 1:
                out.append(Scenario(f"classify-{top}[{tag}]", family, "rps", "classify", top, variant, model.name))
    if "flood" in settings.families:
        out.append(Scenario(f"flood-{settings.flood_valid_in_flight}", "flood", "rps", "add",
                            settings.flood_valid_in_flight))
    return out


class Suite:
    """Owns the temporary directory, the PKI, the servers; runs scenarios and keeps every figure."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.pki = make_pki(workdir / "certs")
        self.kid = json.loads(self.pki.jwks.read_text(encoding="utf-8"))["keys"][0]["kid"]
        flood_client = load_registry(self.pki.clients_registry).by_name(FLOOD_CLIENT)
        assert flood_client is not None
        self.flood_subject = flood_client.spiffe_id
        self.models: list[ModelSetup] = []
        self._pairs: dict[str, Pair] = {}
        self._null: dict[str, ServerProc] = {}
        self.notes: list[str] = []

    def close(self) -> None:
        for pair in self._pairs.values():
            for server in pair.servers.values():
                server.child.stop()
        for server in self._null.values():
            server.child.stop()

    # -- servers ------------------------------------------------------------------------

    def pair(self, model: ModelSetup, variant: str) -> Pair:
        key = f"{model.name}-{variant}"
        if key not in self._pairs:
            started = start_servers(KINDS, model.dirs[variant], self.pki, self.workdir, key)
            servers = {s.kind: s for s in started}
            aigis = servers["aigis"]
            try:
                token = fetch_token(aigis, self.pki)
            except BaseException:
                for server in started:
                    server.child.stop()
                raise
            assert aigis.issuer_url is not None
            self._pairs[key] = Pair(servers, token, aigis.issuer_url)
        return self._pairs[key]

    def null_baseline(self, model: ModelSetup) -> ServerProc:
        if model.name not in self._null:
            (server,) = start_servers(("baseline",), model.dirs["null"], self.pki, self.workdir, f"{model.name}-null")
            self._null[model.name] = server
        return self._null[model.name]

    # -- loads --------------------------------------------------------------------------

    def _client(self, name: str) -> dict[str, str]:
        return {"ca": str(self.pki.ca_cert), "cert": str(self.pki.client_cert(name)),
                "key": str(self.pki.client_key(name))}

    def valid_loads(self, rpc: str, in_flight: int, token: str, image: dict[str, Any] | None) -> list[Load]:
        procs = self.settings.client_procs if in_flight >= self.settings.split_at else 1
        procs = max(1, min(procs, in_flight))
        shares = [in_flight // procs + (1 if i < in_flight % procs else 0) for i in range(procs)]
        return [Load("valid", {"mode": rpc, **self._client(VALID_CLIENT), "token": token, "in_flight": share,
                               "image": image}) for share in shares]

    def flood_load(self, issuer_url: str) -> Load:
        count = FORGED_TOKENS // 10 if self.settings.quick else FORGED_TOKENS
        forge = {"issuer": issuer_url, "audience": "aigis", "kid": self.kid, "count": count,
                 "subject": self.flood_subject}
        return Load("flood", {"mode": "flood", **self._client(FLOOD_CLIENT), "token": None,
                              "in_flight": self.settings.flood_in_flight, "forge": forge})

    # -- scenarios ----------------------------------------------------------------------

    def measure(self, server: ServerProc, loads: Sequence[Load]) -> dict[str, Any]:
        """One window, on a quiet machine if we can have one; again if other work got in the way."""
        s = self.settings
        window: dict[str, Any] = {}
        for attempt in range(1, s.retries + 2):
            with machine_lock(s.lock_wait) as locked:
                waited = wait_for_quiet(s.quiet_wait)[0] if s.quiet_wait > 0 else 0.0
                window = run_window(server, loads, s.timing, self.workdir)
            window.update(attempts=attempt, quiet_wait_seconds=waited, machine_lock=locked)
            other = window["other_cpu_util"]
            if other is None or other <= s.max_other_cpu:
                break
        return window

    def model(self, name: str) -> ModelSetup:
        return next(m for m in self.models if m.name == name)

    def run_round(self, scenario: Scenario, index: int = 0) -> dict[str, Any]:
        """One round of one scenario: the baseline's window(s) and aigis's, the baseline first in even
        rounds and aigis first in odd ones (A B B A …), so a machine that drifts during a run, or a
        window that leaves work behind for the next, favours neither."""
        model = self.model(scenario.model) if scenario.model else self.models[0]
        pair = self.pair(model, scenario.variant)
        image = model.image if scenario.rpc == "classify" else None
        out: dict[str, Any] = {}
        for kind in KINDS if index % 2 == 0 else KINDS[::-1]:
            server = pair.servers[kind]
            loads = self.valid_loads(scenario.rpc, scenario.in_flight, pair.token, image)
            if scenario.family == "flood":
                alone = self.measure(server, loads)
                flooded = self.measure(server, [*loads, self.flood_load(pair.issuer_url)])
                out[kind] = {"alone": alone, "flooded": flooded}
            else:
                out[kind] = self.measure(server, loads)
        return out

    def run_raw(self, model: ModelSetup) -> dict[str, Any]:
        """Raw onnxruntime on the model (no RPC), in its own process."""
        s = self.settings
        with machine_lock(s.lock_wait):
            if s.quiet_wait > 0:
                wait_for_quiet(s.quiet_wait)
            child = Child(f"raw-{model.name}", "aigis.benchmarks.inference", [], self.workdir)
            try:
                child.send({"model_dir": str(model.dirs["off"] / model.name),
                            "batch_sizes": list(s.raw_batch_sizes), "seconds": s.raw_seconds,
                            "threads": s.raw_threads, "max_runs": MAX_REQUESTS_PER_PROCESS})
                result = child.read(READY_TIMEOUT_SECONDS + s.raw_seconds * (len(s.raw_batch_sizes) + 1))
            finally:
                child.stop()
        return result

    def run_null(self, model: ModelSetup) -> dict[str, Any]:
        """The bare baseline serving the cost-nothing model at the highest load."""
        server = self.null_baseline(model)
        token = self.pair(model, "off").token
        loads = self.valid_loads("classify", self.settings.top_in_flight, token, model.image)
        return self.measure(server, loads)


def generate_cnn(root: Path) -> Path:
    """A random-weight 224x224 RGB CNN (milliseconds per image), where batching can matter."""
    try:
        from aigis.tools.make_cnn import write_cnn
    except ImportError as exc:
        raise BenchError(f"--cnn needs tools/make_cnn.py: {exc}") from None
    return write_cnn(root)


def make_pki(root: Path) -> PkiPaths:
    """A throwaway PKI: CA, server, `demo` (both scopes) and `flood` (a valid certificate whose
    tokens will be forged)."""
    from aigis.auth.certs import init_pki, issue_client

    pki = PkiPaths(root)
    now = datetime.now(UTC)
    try:
        init_pki(pki, now=now)
        issue_client(pki, FLOOD_CLIENT, scopes=["calculator:compute"], now=now)
    except Exception as exc:
        raise BenchError(f"cannot generate the throwaway PKI in {root}: {type(exc).__name__}: {exc}") from None
    return pki


def run_suite(settings: Settings, progress: Callable[[str], None]) -> dict[str, Any]:
    """Everything `aigis bench` measures, as one JSON-ready dict (tables are rendered from it)."""
    started = datetime.now(UTC)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="aigis-bench-") as tmp:
        workdir = Path(tmp)
        suite = Suite(settings, workdir)
        try:
            sources = list(settings.model_dirs)
            if settings.cnn:
                sources.append(generate_cnn(workdir / "generated"))
            for source in sources:
                model = prepare_model(source, workdir / "models", settings)
                suite.models.append(model)
                if model.batching_note and "batching" in settings.families:
                    suite.notes.append(f"[{model.name}] {model.batching_note}")
            scenarios = scenarios_for(settings, suite.models)
            skipped = {sc.name for sc in scenarios if sc.variant == "on" and suite.model(sc.model).batching_note}
            rounds: dict[str, list[dict[str, Any]]] = {sc.name: [] for sc in scenarios}
            errors: dict[str, str] = {}
            raw_rounds: dict[str, list[dict[str, Any]]] = {m.name: [] for m in suite.models}
            null_rounds: dict[str, list[dict[str, Any]]] = {m.name: [] for m in suite.models}
            want_raw = bool({"classify", "batching", "limit"} & set(settings.families))
            # The bounds of a model (raw onnxruntime, the null-model baseline) are measured right after
            # that model's classify windows at the highest load, inside the same round, so they
            # alternate with the windows they bound instead of all running at a round's end.
            bounded_by = {m.name: next((sc.name for sc in scenarios if sc.family == "classify"
                                        and sc.rpc == "classify" and sc.model == m.name
                                        and sc.in_flight == settings.top_in_flight), None)
                          for m in suite.models}

            def run_bounds(model: ModelSetup, r: int) -> None:
                if want_raw:
                    progress(f"round {r + 1}/{settings.rounds}: raw onnxruntime [{model.name}]")
                    raw_rounds[model.name].append(suite.run_raw(model))
                if "limit" in settings.families and "null" in model.dirs:
                    progress(f"round {r + 1}/{settings.rounds}: null-model baseline [{model.name}]")
                    null_rounds[model.name].append(suite.run_null(model))

            for r in range(settings.rounds):
                for sc in scenarios:
                    if sc.name in skipped or sc.name in errors:
                        continue
                    progress(f"round {r + 1}/{settings.rounds}: {sc.name}")
                    try:
                        rounds[sc.name].append(suite.run_round(sc, r))
                    except BenchError as exc:
                        if sc.variant != "on":
                            raise
                        errors[sc.name] = str(exc).splitlines()[0]  # a batching server that will not start
                    for model in suite.models:
                        if bounded_by[model.name] == sc.name:
                            run_bounds(model, r)
                for model in suite.models:
                    if bounded_by[model.name] is None:
                        run_bounds(model, r)
        finally:
            suite.close()
    results_list = []
    for sc in scenarios:
        if sc.name in skipped or sc.name in errors:
            note = errors.get(sc.name) or suite.model(sc.model).batching_note
            results_list.append({**asdict(sc), "status": "skipped", "note": note})
        else:
            results_list.append(scenario_result(asdict(sc), rounds[sc.name]))
    raw = []
    for name, rr in raw_rounds.items():
        if not rr:
            continue
        failed = [x["error"] for x in rr if "error" in x]
        raw.append({"model": name, "status": "skipped", "note": failed[0], "summary": f"raw [{name}]: {failed[0]}"}
                   if failed else raw_summary(name, rr))
    limits = limit_results(settings, suite, results_list, raw, null_rounds)
    machine["load_after"] = list(os.getloadavg())
    return {
        "schema": SCHEMA_VERSION,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "machine": machine,
        "settings": {**asdict(settings), "model_dirs": [str(p) for p in settings.model_dirs],
                     "families": list(settings.families), "kinds": list(KINDS),
                     "images": {m.name: m.image["encoding"] for m in suite.models},
                     "client_note": f"calls in flight >= {settings.split_at} are spread over "
                                    f"{settings.client_procs} client processes; fewer use one"},
        "scenarios": results_list,
        "raw": raw,
        "limits": limits,
        "notes": suite.notes + classifier_notes(results_list, raw),
    }


def limit_results(settings: Settings, suite: Suite, scenarios: list[dict[str, Any]], raw: list[dict[str, Any]],
                  null_rounds: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """aigis@top / min(bare baseline with a cost-nothing model, raw onnxruntime at its best batch)."""
    if "limit" not in settings.families:
        return []
    out = []
    top = settings.top_in_flight
    for model in suite.models:
        base: dict[str, Any] = {"model": model.name}
        null = null_rounds.get(model.name) or []
        raw_entry = next((r for r in raw if r["model"] == model.name and r.get("status") == "ok"), None)
        measured = [s for s in scenarios if s["status"] == "ok" and s["model"] == model.name
                    and s["in_flight"] == top and s["rpc"] == "classify"]
        if not null or raw_entry is None or not measured:
            out.append({**base, "status": "skipped", "summary": f"limit[{model.name}]: skipped (it needs the null "
                        "model, the raw measurement and the classify scenarios)"})
            continue
        null_rps = median_of(null, "rps")
        raw_best = raw_entry["best_images_per_second"]
        limit = min(v for v in (null_rps, raw_best) if v is not None)
        for variant, tag in (("off", ""), ("on", ",batching")):
            sc = next((s for s in scenarios if s["name"] == f"classify-{top}[{model.name}{tag}]"), None)
            if sc is None or sc["status"] != "ok":
                continue
            aigis_rps = sc["median"]["aigis"]["rps"]
            out.append({
                **base, "variant": variant, "status": "ok", "null_baseline_rps": null_rps,
                "null_rounds": null, "raw_best_images_per_second": raw_best, "raw_best_batch": raw_entry["best_batch"],
                "limit_rps": limit, "aigis_rps": aigis_rps, "ratio": ratio(aigis_rps, limit),
                "summary": f"limit[{model.name}{tag}]: bare baseline with a cost-nothing model @{top} "
                           f"{fmt(null_rps)} req/s, raw onnxruntime best {fmt(raw_best)} images/s (batch "
                           f"{raw_entry['best_batch']}); aigis@{top} {fmt(aigis_rps)} req/s = "
                           f"{fmt(ratio(aigis_rps, limit), 2)} x the smaller",
            })
    return out


# ---------------------------------------------------------------------------------- profile

def run_profile(settings: Settings, out: Path, progress: Callable[[str], None], load: str = "add",
                kind: str = "aigis") -> dict[str, Any]:
    """py-spy (a sampling profiler, outside the server: it does not slow small functions the way
    cProfile's per-call hooks do) on one server (aigis, or the baseline to compare) during one window
    of Add at the highest load, or with `load="flood"` of valid Add beside the forged-token flood.
    `out` receives py-spy's raw collapsed stacks."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).is_file():
        raise BenchError("--profile needs py-spy (pip install py-spy; it is in the dev extra)")
    out = out.resolve()
    with tempfile.TemporaryDirectory(prefix="aigis-bench-profile-") as tmp:
        workdir = Path(tmp)
        suite = Suite(settings, workdir)
        model = prepare_model(settings.model_dirs[0], workdir / "models", settings)
        out.unlink(missing_ok=True)
        (server,) = start_servers((kind,), model.dirs["off"], suite.pki, workdir, "profile")
        sampler: list[subprocess.Popen[bytes]] = []
        try:
            # The baseline ignores metadata, so it needs no real token (and has no issuer).
            token = fetch_token(server, suite.pki) if kind == "aigis" else "unused"
            if load == "flood":
                loads = [*suite.valid_loads("add", settings.flood_valid_in_flight, token, None),
                         suite.flood_load(server.issuer_url or "https://localhost:0")]
                what = f"Add @{settings.flood_valid_in_flight} beside a forged-token flood"
            else:
                loads = suite.valid_loads("add", settings.top_in_flight, token, None)
                what = f"Add @{settings.top_in_flight}"
            progress(f"profiling {kind} under {what} for {settings.seconds:g} s (py-spy, {PROFILE_RATE} Hz)")
            window = run_window(server, loads, settings.timing, workdir,
                                at_start=lambda: sampler.append(subprocess.Popen(
                                    [spy, "record", "--pid", str(server.child.pid), "--rate", str(PROFILE_RATE),
                                     "--duration", str(math.ceil(settings.seconds)), "--format", "raw",
                                     "--function", "--nonblocking", "--output", str(out)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            for proc in sampler:
                proc.wait(60)
        finally:
            for proc in sampler:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            server.child.stop()
        # Then the same load on a fresh aigis server, timed from inside with no sampler attached.
        timed = time_security_path(suite, model, workdir, progress) if kind == "aigis" and load == "add" else None
    if not out.exists():
        raise BenchError(f"py-spy wrote no profile to {out} (is ptrace allowed here?)")
    calls = window["requests"] + sum(window.get("flood", {}).get("codes", {}).values())
    # py-spy samples for whole seconds from the window's start; afterwards the server is idle and
    # idle threads are not sampled, so the samples are the window's CPU, spread over its calls.
    result = {"kind": kind, "load": load, "window": window, "profile": profile_summary(out, calls, PROFILE_RATE),
              "profile_file": str(out)}
    if timed is not None:
        result["timed"] = timed
    return result


def time_security_path(suite: Suite, model: ModelSetup, workdir: Path,
                       progress: Callable[[str], None]) -> dict[str, Any]:
    """The security path timed from inside a fresh aigis server (aigis.benchmarks.spans) during one
    window of Add at the highest load, no sampler attached."""
    from aigis.benchmarks import spans  # the server's modules: only with the server extra installed

    settings = suite.settings
    figures_file = workdir / "security-path.json"
    (server,) = start_servers(("aigis",), model.dirs["off"], suite.pki, workdir, "timing", timing_out=figures_file)
    try:
        token = fetch_token(server, suite.pki)
        loads = suite.valid_loads("add", settings.top_in_flight, token, None)
        progress(f"timing the security path inside aigis under Add @{settings.top_in_flight} "
                 f"for {settings.seconds:g} s")
        window = run_window(server, loads, settings.timing, workdir,
                            at_start=lambda: server.child.signal(signal.SIGUSR1),
                            at_end=lambda: server.child.signal(signal.SIGUSR2))
        deadline = time.monotonic() + 10
        while not figures_file.exists():
            if time.monotonic() > deadline:
                raise BenchError("the aigis server wrote no security-path figures")
            time.sleep(0.05)
        figures = json.loads(figures_file.read_text(encoding="utf-8"))
    finally:
        server.child.stop()
    return {"window": window, "figures": figures, "us_per_call": spans.per_call(figures)}


PROFILE_RATE = 1000  # py-spy samples per second


# (`--denials` mode, [audit] durability, [limits] denial_hold_seconds): each durability answering at
# once, then aigis's defaults (fsync, refusals of a flooder held 1 s).
DENIAL_MODES = (("background", "background", 0.0), ("write", "write", 0.0), ("fsync", "fsync", 0.0),
                ("fsync+hold", "fsync", None))


def run_denials(settings: Settings, progress: Callable[[str], None]) -> dict[str, Any]:
    """What answering a denial only after its audit record is on disk costs (`--denials`).

    For each `[audit] durability` (background = answered at once, the old behaviour) with the
    denial hold off, then with aigis's defaults (fsync, a flooder's `too_many_denials` refusals held
    `denial_hold_seconds`), a fresh aigis server, measured in four windows: valid Add alone; a
    forged-token flood alone (denials/s and server CPU per denial); one denial at a time (latency);
    valid Add beside the flood. Modes alternate within each round, so drift on a shared machine
    hits all alike.
    """
    rows: dict[str, list[dict[str, Any]]] = {mode: [] for mode, _, _ in DENIAL_MODES}
    with tempfile.TemporaryDirectory(prefix="aigis-bench-") as tmp:
        workdir = Path(tmp)
        suite = Suite(settings, workdir)
        model = prepare_model(settings.model_dirs[0], workdir / "models", settings)
        for r in range(settings.rounds):
            for mode, durability, hold in DENIAL_MODES:
                progress(f"round {r + 1}/{settings.rounds}: {mode}")
                extra = ["--audit-durability", durability] + ([] if hold is None else ["--denial-hold", str(hold)])
                (server,) = start_servers(("aigis",), model.dirs["off"], suite.pki, workdir,
                                          f"denials-{mode.replace('+', '-')}-{r}", extra_args=extra)
                try:
                    token = fetch_token(server, suite.pki)
                    issuer = server.issuer_url or "https://localhost:0"
                    valid = suite.valid_loads("add", settings.flood_valid_in_flight, token, None)
                    flood = suite.flood_load(issuer)
                    one_at_a_time = Load("valid", {**flood.spec, "in_flight": 1})  # its latencies are kept
                    rows[mode].append({
                        "valid": suite.measure(server, valid),
                        "flood": suite.measure(server, [flood]),
                        "single": suite.measure(server, [one_at_a_time]),
                        "flooded": suite.measure(server, [*valid, flood]),
                    })
                finally:
                    server.child.stop()
    table = {}
    for mode, windows in rows.items():
        def med(path: Callable[[dict[str, Any]], Any], windows: list[dict[str, Any]] = windows) -> float | None:
            values = sorted(v for v in (path(w) for w in windows) if v is not None)
            return values[len(values) // 2] if values else None

        table[mode] = {
            "valid_rps": med(lambda w: w["valid"]["rps"]),
            "valid_cpu_us": med(lambda w: w["valid"]["server_cpu_us_per_req"]),
            "denials_per_s": med(lambda w: w["flood"]["flood"]["rps"]),
            "denial_cpu_us": med(lambda w: w["flood"]["flood"]["server_cpu_us_per_call"]),
            "denial_p50_ms": med(lambda w: w["single"]["p50_ms"]),
            "denial_p99_ms": med(lambda w: w["single"]["p99_ms"]),
            "valid_rps_flooded": med(lambda w: w["flooded"]["rps"]),
            "denials_per_s_beside_valid": med(lambda w: w["flooded"]["flood"]["rps"]),
            # Each round's denial window beside its own Add window (adjacent, same server): the machine's
            # drift between rounds and modes cancels out of these, not out of the medians above.
            "denial_per_add": med(_denial_per_add),
            "denial_per_add_by_round": [_denial_per_add(w) for w in windows],
        }
    return {"schema": SCHEMA_VERSION, "machine": machine_info(), "kind": "denials",
            "settings": {"rounds": settings.rounds, "seconds": settings.seconds,
                         "valid_in_flight": settings.flood_valid_in_flight,
                         "flood_in_flight": settings.flood_in_flight},
            "table": table, "windows": rows}


def _denial_per_add(window: dict[str, Any]) -> float | None:
    """Server CPU per denial ÷ per valid Add, in one round's two adjacent windows."""
    return ratio(window["flood"]["flood"].get("server_cpu_us_per_call"), window["valid"].get("server_cpu_us_per_req"))


def infer_tensor(model_dir: Path) -> dict[str, Any]:
    """A ModelInfer request body for the model: each input at batch 1 (variable dims 1), random FP32."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    inputs = []
    for arg in session.get_inputs():
        if arg.type != "tensor(float)":
            raise BenchError(f"{model_dir}: --infer sends FP32 inputs; {arg.name!r} is {arg.type}")
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
        data = rng.random(shape, dtype=np.float32).tobytes()
        inputs.append({"name": arg.name, "datatype": "FP32", "shape": shape,
                       "data_b64": base64.b64encode(data).decode()})
    return {"model": model_dir.name, "inputs": inputs}


def run_infer(settings: Settings, progress: Callable[[str], None], with_mlserver: bool) -> dict[str, Any]:
    """ModelInfer (Open Inference Protocol) at 1 and at the highest in-flight level (`--infer`).

    Per model: the bare grpc.aio baseline serving the same protocol and model (no security), aigis's
    full stack, and with `--mlserver` MLServer (its own venv, benchmarks/mlserver_runtime.py, no TLS,
    no authentication), in alternating windows within every round.
    """
    from aigis.benchmarks.mlserver import MLSERVER_SPEC, ensure_venv, start_mlserver

    started = datetime.now(UTC)
    machine = machine_info()
    kinds = (*KINDS, "mlserver") if with_mlserver else KINDS
    mlserver = ensure_venv(progress) if with_mlserver else None
    levels = sorted({1, settings.top_in_flight})
    windows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="aigis-bench-infer-") as tmp:
        workdir = Path(tmp)
        suite = Suite(settings, workdir)
        peers: list[ServerProc] = []
        try:
            sources = list(settings.model_dirs)
            if settings.cnn:
                sources.append(generate_cnn(workdir / "generated"))
            setups = []
            for source in sources:
                model = prepare_model(source, workdir / "models", settings)
                pair = suite.pair(model, "off")
                servers = dict(pair.servers)
                model_dir = model.dirs["off"] / model.name
                if mlserver is not None:
                    progress(f"starting MLServer [{model.name}]")
                    servers["mlserver"] = start_mlserver(mlserver, model.name, model_dir / "model.onnx", workdir,
                                                         model.name)
                    peers.append(servers["mlserver"])
                setups.append((model.name, servers, pair.token, infer_tensor(model_dir)))
            for r in range(settings.rounds):
                for name, servers, token, tensor in setups:
                    for n in levels:
                        key = f"infer-{n}[{name}]"
                        progress(f"round {r + 1}/{settings.rounds}: {key}")
                        for kind in kinds:
                            loads = infer_loads(suite, n, None if kind == "mlserver" else token, tensor,
                                                plaintext=kind == "mlserver")
                            windows.setdefault(key, {}).setdefault(kind, []).append(
                                suite.measure(servers[kind], loads))
        finally:
            suite.close()
            for peer in peers:
                peer.child.stop()
    rows = []
    for key, by_kind in windows.items():
        med = {kind: {f: median_of(w, f) for f in ("rps", "p50_ms", "p99_ms", "server_cpu_us_per_req",
                                                   "other_cpu_util")} for kind, w in by_kind.items()}
        metric = "p50_ms" if key.startswith("infer-1[") else "rps"
        row = {"scenario": key, "metric": metric, "median": med, "windows": by_kind,
               "aigis_vs_baseline": ratio(med["aigis"][metric], med["baseline"][metric])}
        if "mlserver" in med:
            row["aigis_vs_mlserver"] = ratio(med["aigis"][metric], med["mlserver"][metric])
        rows.append(row)
    return {"schema": SCHEMA_VERSION, "kind": "infer", "started_at": started.isoformat(),
            "finished_at": datetime.now(UTC).isoformat(), "machine": {**machine, "load_after": list(os.getloadavg())},
            "settings": {"rounds": settings.rounds, "seconds": settings.seconds, "in_flight": levels,
                         "client_procs": settings.client_procs, "kinds": list(kinds),
                         "mlserver": MLSERVER_SPEC if with_mlserver else None},
            "rows": rows}


def infer_loads(suite: Suite, in_flight: int, token: str | None, tensor: dict[str, Any], *,
                plaintext: bool) -> list[Load]:
    """The same split over client processes as the other scenarios, in mode `infer`."""
    s = suite.settings
    procs = max(1, min(s.client_procs if in_flight >= s.split_at else 1, in_flight))
    shares = [in_flight // procs + (1 if i < in_flight % procs else 0) for i in range(procs)]
    client = {"ca": str(suite.pki.ca_cert), "cert": str(suite.pki.client_cert(VALID_CLIENT)),
              "key": str(suite.pki.client_key(VALID_CLIENT))}
    return [Load("valid", {"mode": "infer", **client, "token": token, "in_flight": share, "tensor": tensor,
                           "plaintext": plaintext}) for share in shares]


def render_infer(result: dict[str, Any]) -> str:
    kinds = result["settings"]["kinds"]
    lines = [f"aigis bench --infer: {result['settings']['rounds']} round(s) x {result['settings']['seconds']:g} s, "
             f"medians; nproc {result['machine']['nproc']}",
             "",
             "| scenario | metric | " + " | ".join(kinds) + " | aigis / baseline |"
             + (" aigis / mlserver |" if "mlserver" in kinds else ""),
             "|---|---|" + "---|" * len(kinds) + "---|" + ("---|" if "mlserver" in kinds else "")]
    for row in result["rows"]:
        metric = row["metric"]
        digits = 3 if metric == "p50_ms" else 0
        cells = " | ".join(fmt(row["median"][k][metric], digits) for k in kinds)
        line = f"| {row['scenario']} | {'p50 ms' if metric == 'p50_ms' else 'req/s'} | {cells} | " \
               f"{fmt(row['aigis_vs_baseline'], 2)} |"
        if "mlserver" in kinds:
            line += f" {fmt(row.get('aigis_vs_mlserver'), 2)} |"
        lines.append(line)
    lines += ["", "server CPU µs/req (medians): " + "; ".join(
        f"{row['scenario']} " + ", ".join(f"{k} {fmt(row['median'][k]['server_cpu_us_per_req'], 0)}" for k in kinds)
        for row in result["rows"]),
        "(MLServer runs with parallel_workers = 0: its one process is all its CPU; for a p50 row lower is better, "
        "so a ratio below 1 favours aigis)"]
    return "\n".join(lines)


def render_denials(result: dict[str, Any]) -> str:
    columns = [("valid_rps", "Add req/s", 0), ("valid_cpu_us", "CPU µs/Add", 0), ("denials_per_s", "denials/s", 0),
               ("denial_cpu_us", "CPU µs/denial", 0), ("denial_p50_ms", "denial p50 ms", 2),
               ("denial_p99_ms", "denial p99 ms", 2), ("valid_rps_flooded", "Add req/s in flood", 0)]
    lines = ["| durability (+ hold) | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for mode, row in result["table"].items():
        lines.append(f"| {mode} | " + " | ".join(fmt(row[key], digits) for key, _, digits in columns) + " |")
    lines.append("")
    lines.append("CPU per denial ÷ CPU per Add, each round's adjacent windows (median first):")
    for mode, row in result["table"].items():
        lines.append(f"  {mode}: {fmt(row['denial_per_add'], 2)}  (rounds: "
                     + " ".join(fmt(r, 2) for r in row["denial_per_add_by_round"]) + ")")
    return "\n".join(lines)


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _families(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in values if v not in FAMILIES]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"scenarios are a comma-separated subset of {','.join(FAMILIES)}")
    return values


def settings_from_args(args: argparse.Namespace) -> Settings:
    from aigis.server.config import BUNDLED_MODELS

    base = QUICK if args.quick else Settings()
    changes: dict[str, Any] = {"model_dirs": tuple(p.resolve() for p in args.model_dir or [BUNDLED_MODELS / "digits"])}
    for name in ("rounds", "seconds", "warmup", "client_procs", "batch_size", "batch_delay_us", "quiet_wait",
                 "retries"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.in_flight is not None:
        changes["in_flight"] = args.in_flight
    if args.cnn:
        changes["cnn"] = True
    if args.scenarios is not None:
        changes["families"] = args.scenarios
    settings = replace(base, **changes)
    if (settings.rounds < 1 or settings.client_procs < 1 or settings.seconds <= 0 or settings.warmup < 0
            or settings.quiet_wait < 0 or settings.retries < 0):
        raise BenchError("--rounds and --client-procs must be >= 1, --seconds > 0, and --warmup, --quiet-wait "
                         "and --retries >= 0")
    return settings


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so `finally` blocks stop every child."""
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _main(args: argparse.Namespace) -> int:
    def progress(message: str) -> None:
        print(f"  .. {message}", file=sys.stderr, flush=True)

    try:
        settings = settings_from_args(args)
        with _terminate_as_exit():
            if args.infer:
                result = run_infer(settings, progress, args.mlserver)
                _write_json(args.json_out, result)
                print(render_infer(result))
                return 0
            if args.denials:
                result = run_denials(settings, progress)
                _write_json(args.json_out, result)
                print(render_denials(result))
                return 0
            if args.profile is not None:
                result = run_profile(settings, args.profile, progress, args.profile_load, args.profile_kind)
                print(render_profile(result))
                _write_json(args.json_out, {"schema": SCHEMA_VERSION, "machine": machine_info(),
                                            "settings": {**asdict(settings), "model_dirs": [str(p) for p in
                                                                                            settings.model_dirs]},
                                            "profile": result})
                return 0
            results = run_suite(settings, progress)
            _write_json(args.json_out, results)
            print(render_table(results))
            print(f"\nraw figures: {args.json_out}")
    except BenchError as exc:
        print(f"aigis bench: {exc}", file=sys.stderr)
        return 2
    finally:
        kill_all()
    return 0


def register(subparsers: Any) -> None:
    """Add `aigis bench` to the CLI."""
    p = subparsers.add_parser("bench", help="measure aigis against a bare grpc.aio baseline (ratios)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run for CI: 1 round of ~1 s, 1 and 16 in flight")
    p.add_argument("--rounds", type=int, help="alternating baseline/aigis rounds (default 3)")
    p.add_argument("--seconds", type=float, help="length of one measurement window (default 5)")
    p.add_argument("--warmup", type=float, help="uncounted load before each window (default 1)")
    p.add_argument("--scenarios", type=_families, help=f"comma-separated subset of {','.join(FAMILIES)} (default all)")
    p.add_argument("--in-flight", type=_csv_ints,
                   help="calls in flight for Add (default 1,16,64); the highest also for ClassifyImage throughput")
    p.add_argument("--client-procs", type=int,
                   help="client processes sharing the load at 32+ calls in flight (default 2)")
    p.add_argument("--model-dir", type=Path, action="append",
                   help="a model directory for the classifier scenarios (repeatable; default the bundled digits)")
    p.add_argument("--cnn", action="store_true",
                   help="also measure a generated 224x224 RGB CNN with random weights (tools/make_cnn.py)")
    p.add_argument("--batch-size", type=int, help="[batching] max_batch_size for the batching variant (default 32)")
    p.add_argument("--batch-delay-us", type=int, help="[batching] max_queue_delay_us (default 0)")
    p.add_argument("--quiet-wait", type=float,
                   help="seconds to wait before each window for other work on the machine to stop (default 120; "
                        "0 = do not wait)")
    p.add_argument("--retries", type=int,
                   help="measure a window again when other work used over a quarter core during it (default 2)")
    p.add_argument("--json-out", type=Path, default=Path("bench-results.json"), help="where the raw figures go")
    p.add_argument("--infer", action="store_true",
                   help="instead of the suite: Open Inference Protocol ModelInfer, aigis vs a bare grpc.aio server "
                        "serving the same protocol (and MLServer with --mlserver), at 1 and the highest in flight")
    p.add_argument("--mlserver", action="store_true",
                   help="with --infer: also MLServer, installed once into its own venv under ~/.cache/aigis-bench")
    p.add_argument("--denials", action="store_true",
                   help="instead of the suite: what each [audit] durability, and the denial hold, cost "
                        "denials and valid calls")
    p.add_argument("--profile", type=Path, metavar="OUT.prof",
                   help="instead of the suite: sample an aigis server with py-spy under Add at the highest load")
    p.add_argument("--profile-load", choices=("add", "flood"), default="add",
                   help="what load --profile measures (default add at the highest --in-flight)")
    p.add_argument("--profile-kind", choices=KINDS, default="aigis",
                   help="which server --profile measures (the baseline, to compare; default aigis)")
    p.set_defaults(func=_main)


__all__ = ["BenchError", "Settings", "register", "run_profile", "run_suite"]
