"""`aigis bench`: a --quick smoke run over real servers and clients, and the helpers it relies on.

Nothing here asserts a timing: the figures depend on the machine. What is checked is the shape of
the JSON report, that valid traffic only ever got OK, that forged tokens were refused by aigis
(and ignored by the bare baseline), and that no child process outlives the run.
"""

from __future__ import annotations

import contextlib
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aigis.auth.certs import init_pki
from aigis.benchmarks import harness, report
from aigis.benchmarks.harness import BenchError, percentile
from aigis.benchmarks.inference import batching_table, config_refusal, model_variant, strip_table, write_null_model
from aigis.server.config import BUNDLED_MODELS
from aigis.server.model import ModelRegistry
from aigis.tools import bench, cli

DIGITS = BUNDLED_MODELS / "digits"
WINDOW_KEYS = {"seconds", "requests", "errors", "rps", "p50_ms", "p99_ms", "server_cpu_us_per_req",
               "server_cpu_util", "client_cpu_util", "other_cpu_util", "client_procs", "truncated", "attempts",
               "quiet_wait_seconds"}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["--log-level", "WARNING", "bench", "--quick", "--seconds", "0.5", "--json-out", str(out)])
    assert code == 0
    return json.loads(out.read_text()), stdout.getvalue()


def _windows(scenario: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for rnd in scenario["rounds"]:
        for kind in bench.KINDS:
            parts = rnd[kind] if scenario["family"] == "flood" else {"": rnd[kind]}
            found += [(kind, window) for window in parts.values()]
    return found


def test_quick_report_has_machine_settings_and_every_scenario(quick_report: tuple[dict[str, Any], str]) -> None:
    """--quick writes machine info, its settings and one entry per scenario (batching ok or skipped)."""
    report, _ = quick_report
    assert report["schema"] == bench.SCHEMA_VERSION
    assert {"nproc", "python", "grpcio", "onnxruntime", "load_before", "load_after"} <= report["machine"].keys()
    assert report["settings"]["quick"] is True
    assert report["settings"]["rounds"] == 1
    assert report["settings"]["in_flight"] == [1, 16]
    names = {s["name"]: s for s in report["scenarios"]}
    assert set(names) == {"add-1", "add-16", "classify-1[digits]", "classify-16[digits]", "flood-16",
                          "classify-1[digits,batching]", "classify-16[digits,batching]"}
    for name, scenario in names.items():
        if scenario["family"] == "batching" and scenario["status"] == "skipped":
            assert scenario["note"]
            continue
        assert scenario["status"] == "ok", name
        assert len(scenario["rounds"]) == 1
        assert set(scenario["median"]) == set(bench.KINDS)


def test_a_scenario_reports_the_aigis_to_baseline_ratio_of_each_round() -> None:
    """Beside the ratio of the medians, each round's own ratio (its two windows were adjacent), in the
    JSON and in the details."""
    def window(rps: float) -> dict[str, Any]:
        return {key: rps if key == "rps" else 1.0 for key in report.FIGURES}

    scenario = {"name": "add-64", "family": "add", "metric": "rps"}
    rounds = [{"baseline": window(100), "aigis": window(90)}, {"baseline": window(200), "aigis": window(190)},
              {"baseline": window(150), "aigis": window(120)}]
    result = report.scenario_result(scenario, rounds)
    assert result["round_ratios"] == [0.9, 0.95, 0.8]
    assert result["ratio"]["rps"] == 120 / 150
    text = report.render_table({"settings": {"rounds": 3, "seconds": 4}, "machine": {"nproc": 2, "load_before": [0.1]},
                                "scenarios": [result]})
    assert "aigis / baseline by round (baseline first in rounds 1, 3, ...): 0.90 0.95 0.80" in text


def test_denials_report_divides_each_rounds_denial_cpu_by_its_adjacent_add_window() -> None:
    """`--denials`: CPU per denial ÷ CPU per Add per round (adjacent windows), their median, printed."""
    def rnd(add_cpu: float, denial_cpu: float) -> dict[str, Any]:
        return {"valid": {"server_cpu_us_per_req": add_cpu}, "flood": {"flood": {"server_cpu_us_per_call": denial_cpu}}}

    windows = [rnd(400, 300), rnd(300, 330), rnd(500, 450)]
    assert [bench._denial_per_add(w) for w in windows] == [0.75, 1.1, 0.9]
    table = {"fsync": {"valid_rps": 1.0, "valid_cpu_us": 400.0, "denials_per_s": 1.0, "denial_cpu_us": 330.0,
                       "denial_p50_ms": 1.0, "denial_p99_ms": 2.0, "valid_rps_flooded": 1.0,
                       "denial_per_add": 0.9, "denial_per_add_by_round": [0.75, 1.1, 0.9]}}
    text = bench.render_denials({"table": table})
    assert "  fsync: 0.90  (rounds: 0.75 1.10 0.90)" in text


def test_quick_report_windows_carry_every_figure_and_no_failed_valid_call(
    quick_report: tuple[dict[str, Any], str],
) -> None:
    """Every window has all figures, and valid traffic (real token) got only OK from both servers."""
    report, _ = quick_report
    for scenario in report["scenarios"]:
        if scenario["status"] != "ok":
            continue
        for kind, window in _windows(scenario):
            assert WINDOW_KEYS <= window.keys(), (scenario["name"], kind)
            assert window["errors"] == {}, (scenario["name"], kind)
            assert window["requests"] > 0, (scenario["name"], kind)
            assert window["truncated"] is False


def test_flood_is_refused_by_aigis_and_ignored_by_the_baseline(quick_report: tuple[dict[str, Any], str]) -> None:
    """Tokens signed by a wrong key end UNAUTHENTICATED at aigis until the flooder's denial budget is
    empty (during the warm-up), then RESOURCE_EXHAUSTED (too_many_denials) answered only after the
    denial hold, so far fewer of them end in a window; the bare baseline answers them OK at once."""
    report, _ = quick_report
    (flood,) = [s for s in report["scenarios"] if s["family"] == "flood"]
    (rnd,) = flood["rounds"]
    aigis, baseline = rnd["aigis"]["flooded"]["flood"], rnd["baseline"]["flooded"]["flood"]
    assert set(aigis["codes"]) <= {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}, aigis["codes"]
    assert set(baseline["codes"]) == {"OK"}
    assert aigis["rps"] < baseline["rps"] / 4, (aigis, baseline)
    assert "flood" not in rnd["aigis"]["alone"]


def test_quick_report_has_raw_and_limit_entries(quick_report: tuple[dict[str, Any], str]) -> None:
    """Raw onnxruntime is measured per batch size, and the limit compares aigis with the smaller bound."""
    report, _ = quick_report
    (raw,) = report["raw"]
    assert raw["status"] == "ok"
    assert set(raw["images_per_second"]) == {"1", "8"}
    limits = [lim for lim in report["limits"] if lim["status"] == "ok"]
    assert limits
    assert limits[0]["limit_rps"] == min(limits[0]["null_baseline_rps"], limits[0]["raw_best_images_per_second"])


def test_quick_run_prints_the_table_and_leaves_no_child_running(quick_report: tuple[dict[str, Any], str]) -> None:
    """The table names every scenario, and every child process was reaped."""
    report, table = quick_report
    assert "scenario" in table and "ratio" in table
    for scenario in report["scenarios"]:
        if scenario["status"] == "ok":
            assert scenario["name"] in table
    assert harness._LIVE == set()


def test_profile_run_reports_aigis_functions(tmp_path: Path) -> None:
    """--profile samples aigis with py-spy under load and lists its costliest functions."""
    out = tmp_path / "profile.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["--log-level", "WARNING", "bench", "--quick", "--seconds", "0.5", "--in-flight", "8",
                         "--profile", str(tmp_path / "aigis.prof"), "--json-out", str(out)])
    assert code == 0
    profile = json.loads(out.read_text())["profile"]
    assert profile["window"]["errors"] == {}
    assert (tmp_path / "aigis.prof").is_file()
    assert profile["profile"]["ours_by_cumulative"]
    assert all(row["own"] for row in profile["profile"]["ours_by_self"])
    assert 0 < profile["profile"]["security_us_per_req"] < profile["profile"]["us_per_req"]
    assert "Top by cumulative time" in stdout.getvalue()
    assert "security path" in stdout.getvalue()
    # Then timed from inside a fresh server: every admitted call counted, pieces that add up.
    timed = profile["timed"]
    assert timed["window"]["errors"] == {}
    # The server counts from its signals, the clients by completion time: the edges differ a little.
    assert timed["figures"]["calls"] == pytest.approx(timed["window"]["requests"], rel=0.1)
    us = timed["us_per_call"]
    assert 0 < us["decode"] < us["admit"] and us["lookup"] > 0 and us["metrics"] > 0
    assert us["security_path"] == pytest.approx(us["lookup"] + us["admit"] - us["decode"] + us["metrics"])
    assert "timed inside a fresh aigis server" in stdout.getvalue()
    assert harness._LIVE == set()


def test_security_path_counts_the_wrapper_and_what_it_calls_not_the_servicer(tmp_path: Path) -> None:
    """The profile's security-path figure: samples under the secured wrapper, except those in a
    servicer or decoding the request (the bare server does those too)."""
    repo = harness.REPO_ROOT
    root = "run (asyncio/runners.py:1);_run_once (asyncio/base_events.py:1)"
    wrapper = f"checked ({repo}/server/secured.py:240)"
    stacks = {
        f"{root};{wrapper};_check ({repo}/auth/guard.py:130)": 3,  # the checks
        f"{root};{wrapper};done ({repo}/server/metrics.py:126)": 1,  # metrics
        f"{root};{wrapper}": 2,  # the wrapper itself
        f"{root};{wrapper};Add ({repo}/server/calculator.py:26)": 5,  # the servicer
        f"{root};{wrapper};_decode_body ({repo}/server/secured.py:331)": 4,  # the request decode
        f"{root};select (selectors.py:451)": 7,  # grpc and asyncio, outside the wrapper
    }
    path = tmp_path / "raw.prof"
    path.write_text("".join(f"{stack} {count}\n" for stack, count in stacks.items()))
    summary = report.profile_summary(path, requests=1000, rate=1000)  # 1 sample = 1 µs per call
    assert summary["security_us_per_req"] == pytest.approx(6.0)
    assert summary["us_per_req"] == pytest.approx(22.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param('name = "m"\n[input]\nw = 1\n', 'name = "m"\n[input]\nw = 1\n', id="no-table"),
        pytest.param('name = "m"\n[batching]\nenabled = true\n[output]\nk = 1\n', 'name = "m"\n[output]\nk = 1\n',
                     id="middle"),
        pytest.param('[input]\nw = 1\n[batching]\nenabled = true\n', "[input]\nw = 1\n", id="last"),
        pytest.param('[input]\n[ batching ] # note\nx = 1\n[batching.sub]\ny = 2\n', "[input]\n", id="spaced-and-sub"),
        pytest.param('[batchingx]\nx = 1\n', "[batchingx]\nx = 1\n", id="longer-name-kept"),
    ],
)
def test_strip_table(text: str, expected: str) -> None:
    """strip_table removes exactly the [batching] table (and its sub-tables), nothing else."""
    assert strip_table(text, "batching") == expected


def test_model_variant_sets_or_removes_the_batching_table(tmp_path: Path) -> None:
    """A variant copies the model and ends its model.toml with the table asked for, or none."""
    on = model_variant(DIGITS, tmp_path / "on", batching_table(True, 8, 250))
    off = model_variant(DIGITS, tmp_path / "off", None)
    table = "[batching]\nenabled = true\nmax_batch_size = 8\nmax_queue_delay_us = 250\n"
    assert table in (on / "model.toml").read_text()
    assert "[batching]" not in (off / "model.toml").read_text()
    assert config_refusal(off) is None
    assert (off / "model.onnx").read_bytes() == (DIGITS / "model.onnx").read_bytes()


def test_null_model_loads_like_the_real_one(tmp_path: Path) -> None:
    """The cost-nothing model passes the server's own load checks and answers (N, labels)."""
    write_null_model(DIGITS, tmp_path)
    registry = ModelRegistry.load(tmp_path)
    model = registry.get("digits")
    out = model.predict(np.ones(model.config.input_shape(3), dtype=np.float32))
    assert out.shape == (3, 10)


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        pytest.param([5.0], 50, 5.0, id="single"),
        pytest.param([1.0, 2.0, 3.0, 4.0], 50, 2.0, id="median-nearest-rank"),
        pytest.param(list(range(1, 101)), 99, 99, id="p99-of-100"),
        pytest.param([3.0, 1.0, 2.0], 100, 3.0, id="max-unsorted"),
    ],
)
def test_percentile(values: list[float], q: float, expected: float) -> None:
    """Nearest-rank percentiles of unsorted samples."""
    assert percentile(values, q) == expected


def test_unwritable_pki_directory_is_a_clear_error(tmp_path: Path) -> None:
    """If the throwaway PKI cannot be written, the error names the directory."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(BenchError, match=r"cannot generate the throwaway PKI in .*a-file"):
        bench.make_pki(blocker / "certs")


def test_server_that_cannot_start_reports_why(tmp_path: Path) -> None:
    """A server whose model directory is empty fails with its own message, and is reaped."""
    pki = bench.PkiPaths(tmp_path / "certs")
    init_pki(pki, now=datetime.now(UTC))
    empty = tmp_path / "no-models"
    empty.mkdir()
    with pytest.raises(BenchError, match=r"cannot start.*no model directories"):
        harness.start_servers(("baseline",), empty, pki, tmp_path, "broken")
    assert harness._LIVE == set()


def test_infer_quick_run_compares_aigis_with_the_bare_protocol_server(tmp_path: Path) -> None:
    """`aigis bench --infer --quick`: ModelInfer windows for both kinds, only OK answers, ratios present."""
    out = tmp_path / "infer.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["--log-level", "WARNING", "bench", "--infer", "--quick", "--seconds", "0.5",
                         "--json-out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [row["scenario"] for row in report["rows"]] == ["infer-1[digits]", "infer-16[digits]"]
    for row in report["rows"]:
        assert set(row["windows"]) == {"baseline", "aigis"}
        for windows in row["windows"].values():
            assert all(w["requests"] > 0 and w["errors"] == {} for w in windows)
        assert row["aigis_vs_baseline"] is not None
    assert "| infer-16[digits] | req/s |" in stdout.getvalue()


def test_mlserver_repository_listens_on_loopback_only(tmp_path: Path) -> None:
    """The MLServer peer is configured for 127.0.0.1, in-process inference, and our runtime."""
    from aigis.benchmarks.mlserver import write_repository

    repo, port = write_repository(tmp_path / "repo", "digits", DIGITS / "model.onnx")
    settings = json.loads((repo / "settings.json").read_text())
    assert settings["host"] == "127.0.0.1" and settings["grpc_port"] == port and settings["parallel_workers"] == 0
    model = json.loads((repo / "digits" / "model-settings.json").read_text())
    assert model["implementation"] == "aigis_onnx_runtime.OnnxRuntime"
    assert (repo / "digits" / "aigis_onnx_runtime.py").is_file() and (repo / "digits" / "model.onnx").is_file()
