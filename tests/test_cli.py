"""The command line: `attnkit info | verify | bench`, and benchmarks/make_tables.py."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit import attention, backends
from attnkit.backends import Backend
from attnkit.bench import Config, attention_flops, config_flops, preset_configs
from attnkit.call import make_call
from attnkit.cli import main

ROOT = Path(__file__).resolve().parent.parent
# Compiled FlexAttention spends tens of seconds per shape compiling on a CPU; its own tests
# cover it, and these keep the suite inside its time budget.
SLOW_ON_CPU = ["flex"] if not torch.cuda.is_available() else []


def _broken_backend(name: str, *, crash: bool = False) -> Backend:
    """A backend that is 1% off the oracle (or raises), to see verify and bench catch it."""
    reference = backends.get("reference")

    def run(call):
        if crash:
            raise RuntimeError("kernel exploded")
        out, lse = reference.run(call)
        return out * 1.01, lse

    return Backend(name=name, summary="deliberately wrong", available=lambda device: None,
                   supports=lambda call: None, run=run)


def _another_backend() -> str:
    """A fast backend besides the oracle: plain SDPA when registered, else the first one."""
    usable = [name for name, reason in attnkit.available("cpu").items()
              if reason is None and name != "reference" and name not in ("flex", "triton")]
    if not usable:
        pytest.skip("no backend besides the oracle is registered")
    return "sdpa" if "sdpa" in usable else usable[0]


def test_info_lists_backends_and_auto_order(capsys):
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "TF32" in out
    for name in backends.BACKENDS:
        assert name in out
    assert "impl='auto' on cpu" in out
    assert "key-padding mask" not in out  # the CPU has no separate order for padded calls
    # This torch's SDPA chooser answers on the CPU: the line says which kernel it picks.
    assert "sdpa there is PyTorch's own pick: FLASH_ATTENTION" in out


def test_info_prints_what_available_backends_say_of_the_device(capsys, monkeypatch):
    def run(call):
        raise AssertionError("info runs nothing")

    def backend(name, available):
        return Backend(name=name, summary="a test backend", available=lambda d: available,
                       supports=lambda call: None, run=run,
                       details=lambda d: f"{name} on {d.type}: kernel X off")

    monkeypatch.setitem(backends.BACKENDS, "here", backend("here", None))
    monkeypatch.setitem(backends.BACKENDS, "elsewhere", backend("elsewhere", "not here"))
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "here here: here on cpu: kernel X off" in out
    assert "elsewhere on cpu" not in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().out


def test_verify_quick_passes_on_cpu(capsys, tmp_path):
    code = main(["verify", "--quick", "--device", "cpu", "--no-progress", "--out", str(tmp_path),
                 *(f"--exclude={name}" for name in SLOW_ON_CPU)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "relative error vs float64 oracle" in out
    assert "s1000" not in out  # --quick leaves the length-1000 cases out
    data = json.loads((tmp_path / "verify.json").read_text())
    assert data["meta"]["dtype"] == "float32"
    assert data["results"] and all(r["passed"] for r in data["results"])


def test_verify_cut_off_keeps_the_checks_it_finished(monkeypatch, capsys, tmp_path):
    # A time limit that kills verify mid-run must leave the finished checks in verify.json.
    from attnkit import verify

    clock = iter(range(0, 10_000, 10))  # every check looks 10 s after the last
    monkeypatch.setattr("attnkit.cli.time.monotonic", lambda: next(clock))
    finished = []
    real_check = verify._check_backend

    def check_then_stop(name, case, device):
        if len(finished) == 3:
            raise KeyboardInterrupt  # what a timeout's signal does to the run
        finished.append(name)
        return real_check(name, case, device)

    monkeypatch.setattr(verify, "_check_backend", check_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(["verify", "--quick", "--device", "cpu", "--no-progress", "--impl", "naive",
              "--out", str(tmp_path)])
    data = json.loads((tmp_path / "verify.json").read_text())
    assert len(data["results"]) == data["meta"]["checks_done"] == 3
    assert data["meta"]["checks_total"] > 3
    assert not list(tmp_path.glob("*.partial"))
    section = "\n".join(_make_tables().verify_section(data))
    assert f"Cut off: 3 of {data['meta']['checks_total']} checks" in section


def test_make_tables_renders_decode_sets(tmp_path):
    """benchmarks/decode.py's JSON: found among the sets (kernel_variants.py's is not), one
    row per step, GPU (graph) times where recorded and do_bench's otherwise, shares of
    the copy bandwidth; an L2-cold table after them where the set has cold times."""
    row = {"shape": [1, 32, 8, 1, 16384, 128], "kv_bytes": 2 * 8 * 16384 * 128 * 2,
           "packed": True, "splits": 16, "ms": {"triton": 0.133, "flex": 0.303},
           "graph_ms": {"triton": 0.029, "flex": 0.034}}
    meta = {"kind": "decode", "device": "cuda", "device_name": "GPU",
            "copy_bytes_per_s": 3.0e12}
    (tmp_path / "decode.json").write_text(json.dumps({"meta": meta, "results": [row]}))
    # benchmarks/kernel_variants.py's records sit beside them and have no table
    variants = {"meta": {"kind": "kernel-variants", "device": "cuda"}, "results": []}
    (tmp_path / "kernel_variants.json").write_text(json.dumps(variants))
    tables = _make_tables()
    [found] = tables.load_sets(tmp_path)
    assert found["kind"] == "decode"
    text = tables.render([found], ".")
    assert "| b1 h32/8 q1 kv16384 d128 | 16, packed | 29 (77%) | 34 (66%) |" in text
    assert "GPU time alone" in text and "call the forward directly" not in text
    assert "L2-cold" not in text
    cold = {**row, "cold_graph_ms": {"triton": 0.041}}
    text = tables.render([{**found, "results": [cold]}], ".")
    warm_at, cold_at = (text.index("| 29 (77%) | 34 (66%) |"), text.index("| 41 (55%) | – |"))
    assert text.index("L2-cold") < cold_at and warm_at < cold_at
    del row["graph_ms"]
    text = tables.render([{**found, "results": [row]}], ".")
    assert "| 133 (17%) | 303 (7%) |" in text and "host time included" in text


def test_make_tables_says_what_auto_ran_and_how_far_rounds_disagreed(tmp_path):
    def row(impl, config, fwd, spread=None, picked=None):
        return {"impl": impl, "config": config, "status": "ok", "fwd_ms": fwd,
                "fwd_bwd_ms": None, "fwd_spread": spread, "picked": picked}

    one = [row("sdpa", "c1", 1.0, 0.02), row("auto", "c1", 1.1, 0.30, "sdpa"),
           row("naive", "c1", 5.0, 0.05)]
    meta = {"preset": "notebook", "device": "cpu", "dtype": "float32"}
    text = "\n".join(_make_tables().bench_section(
        {"meta": meta, "results": one, "path": tmp_path / "results.json"}, "."))
    assert "`auto` ran `sdpa` on every config" in text
    assert "5.0% in the middle, at worst 30.0% (`auto`, forward, c1)" in text
    two = one + [row("auto", "c2", 1.0, None, "naive"), row("sdpa", "c2", 2.0)]
    text = "\n".join(_make_tables().bench_section(
        {"meta": meta, "results": two, "path": tmp_path / "results.json"}, "."))
    assert "`auto` ran `sdpa` on c1" in text and "`auto` ran `naive` on c2" in text
    old = [{k: v for k, v in r.items() if k not in ("fwd_spread", "picked")} for r in two]
    text = "\n".join(_make_tables().bench_section(
        {"meta": meta, "results": old, "path": tmp_path / "results.json"}, "."))
    assert "auto` ran" not in text and "disagreed" not in text  # sets from before


def test_make_tables_readme_shows_the_latest_set_of_each_series(tmp_path):
    """The top-level README's block: the newest set per series (where it wrote, its rounds
    and a bench's implementations do not make a new series; a verify's do); the results
    folder's README keeps every set."""
    def result_set(folder, command, date, kind="bench"):
        path = tmp_path / "results" / folder
        path.mkdir(parents=True)
        meta = {"device": "cpu", "device_name": "CPU", "dtype": "float32", "date": date,
                "command": command}
        if kind == "bench":
            meta["preset"] = "core"
            row = {"impl": "naive", "config": folder, "status": "ok", "fwd_ms": 1.0}
            (path / "results.json").write_text(json.dumps({"meta": meta, "results": [row]}))
        else:
            (path / "verify.json").write_text(json.dumps({"meta": meta, "results": []}))

    result_set("old-d64", "attnkit bench --preset core --head-dim 64 --out a --impl naive",
               "2026-11-01T00:00:00")
    result_set("new-d64", "attnkit bench --preset core --head-dim 64 --rounds 5 --out=b",
               "2026-11-02T00:00:00")
    result_set("d128", "attnkit bench --preset core --head-dim 128 --out c", "2026-10-01")
    result_set("verify-all", "attnkit verify --out d", "2026-11-01", kind="verify")
    result_set("verify-one", "attnkit verify --impl naive --out e", "2026-11-02",
               kind="verify")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    tables = _make_tables()
    assert tables.main(["--results", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    top, everything = readme.read_text(), (tmp_path / "results" / "README.md").read_text()
    # bench sets show up by their config, verify sets by their command
    for shown in ("new-d64", "d128", "verify --out d", "verify --impl naive --out e"):
        assert shown in top and shown in everything, shown
    assert "old-d64" not in top and "old-d64" in everything
    assert "4 of 5" in top


def _make_tables():
    spec = importlib.util.spec_from_file_location("make_tables",
                                                  ROOT / "benchmarks" / "make_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_verify_fails_on_a_wrong_backend(monkeypatch, capsys):
    monkeypatch.setitem(backends.BACKENDS, "broken", _broken_backend("broken"))
    monkeypatch.setitem(backends.BACKENDS, "crashing", _broken_backend("crashing", crash=True))
    code = main(["verify", "--quick", "--device", "cpu", "--no-progress",
                 "--impl", "broken", "--impl", "crashing"])
    out = capsys.readouterr().out
    assert code == 1
    assert "failed" in out and "broken" in out
    assert "kernel exploded" in out  # a crash is reported as a failure, not raised


def test_attention_flops_halves_for_causal_only_when_square():
    full = attention_flops(2, 4, 128, 128, 64, causal=False)
    assert full == 4 * 2 * 4 * 128 * 128 * 64
    assert attention_flops(2, 4, 128, 128, 64, causal=True) == full / 2
    # One query against a cache of 128 keys: causal hides nothing.
    assert attention_flops(2, 4, 1, 128, 64, causal=True) == 4 * 2 * 4 * 1 * 128 * 64


def test_config_flops_count_backward_and_projections():
    core = Config("core", 2, 128, 4, 64, causal=True)
    fwd, fwd_bwd = config_flops(core)
    assert fwd == attention_flops(2, 4, 128, 128, 64, True)
    assert fwd_bwd == 3.5 * fwd
    module = Config("notebook", 2, 128, 4, 16, True, d_model=64)
    attn = attention_flops(2, 4, 128, 128, 16, True)
    proj = 2 * 2 * 128 * 64 * (3 * 64) + 2 * 2 * 128 * 64 * 64
    assert config_flops(module) == (attn + proj, 3.5 * attn + 3 * proj)


def test_presets_have_the_documented_sizes():
    (notebook,) = preset_configs("notebook")
    assert (notebook.batch, notebook.seq, notebook.d_model, notebook.heads) == (8, 1024, 768, 12)
    assert notebook.causal and not notebook.qkv_bias and notebook.mask is None
    (bert,) = preset_configs("bert")
    assert (bert.batch, bert.seq, bert.d_model, bert.heads, bert.head_dim) == (8, 384, 1024, 16,
                                                                               64)
    assert bert.qkv_bias and bert.mask == "padding" and not bert.causal
    core = preset_configs("core")
    assert {c.seq for c in core} == {512, 1024, 2048, 4096, 8192, 16384}
    assert {c.head_dim for c in core} == {64, 128} and {c.causal for c in core} == {True, False}
    (small,) = preset_configs("notebook", quick=True)
    assert small.batch * small.seq < notebook.batch * notebook.seq


def test_core_head_dim_runs_one_head_dim_at_the_same_width():
    core = preset_configs("core", head_dim=128)
    assert {c.head_dim for c in core} == {128} and {c.heads for c in core} == {16}
    assert len(core) == len(preset_configs("core")) // 2
    (one,) = preset_configs("core", quick=True, seq=128, head_dim=80, batch=1)[:1]
    assert (one.heads, one.head_dim) == (3, 80)  # 256 // 80 heads at the quick width
    with pytest.raises(ValueError, match="core preset only"):
        preset_configs("bert", head_dim=64)
    with pytest.raises(ValueError, match="must lie in"):
        preset_configs("core", quick=True, head_dim=512)


def test_core_times_what_auto_picks_unless_filtered_out():
    from attnkit.bench import _core_problem
    from attnkit.functional import select

    (config,) = preset_configs("core", quick=True, seq=64, head_dim=64)[:1]
    cpu = torch.device("cpu")
    problem = _core_problem(config, cpu, torch.float32, None, None)
    work = problem.entries["auto"]()
    assert problem.oracle(work.run_forward())[0] < 1e-5
    q, k, v = work.inputs
    picked = select(make_call(q, k, v, causal=config.causal), "auto").name
    assert picked in problem.entries  # auto is one of the rows beside it
    assert work.picked == picked and problem.entries[picked]().picked is None
    assert "auto" not in _core_problem(config, cpu, torch.float32, ["naive"], None).entries
    assert "auto" not in _core_problem(config, cpu, torch.float32, None, ["auto"]).entries


def test_core_names_both_picks_when_auto_runs_the_forward_elsewhere(monkeypatch):
    from dataclasses import replace

    from attnkit.bench import _core_problem
    from attnkit.functional import select

    (config,) = preset_configs("core", quick=True, seq=64, head_dim=64)[:1]
    forward_only = replace(backends.BACKENDS["einsum"], leads=lambda call: not call.needs_grad)
    monkeypatch.setitem(backends.BACKENDS, "einsum", forward_only)
    problem = _core_problem(config, torch.device("cpu"), torch.float32, None, None)
    work = problem.entries["auto"]()
    q, k, v = work.inputs
    both = select(make_call(q, k, v, causal=config.causal), "auto").name
    assert both != "einsum"
    assert work.picked == f"einsum (forward), {both} (forward+backward)"


def test_core_key_lengths_reach_the_implementations_and_the_oracle():
    from attnkit.bench import _core_problem
    from attnkit.verify import rel_err

    configs = preset_configs("core", quick=True, seq=64, key_lengths=True)
    assert {c.mask for c in configs} == {"lengths"} and "key-lengths" in configs[0].label
    with pytest.raises(ValueError, match="core preset only"):
        preset_configs("notebook", key_lengths=True)
    problem = _core_problem(configs[0], torch.device("cpu"), torch.float32, ["naive"], None)
    work = problem.entries["naive"]()
    out = work.run_forward()
    assert problem.oracle(out)[0] < 1e-5
    q, k, v = work.inputs  # the same inputs without the lengths give another answer
    assert rel_err(out, attention(q, k, v, causal=configs[0].causal, impl="naive")) > 1e-2


@pytest.mark.parametrize("argv, message", [
    (["--preset", "notebook", "--head-dim", "64"], "--head-dim applies to --preset core only"),
    (["--preset", "bert", "--key-lengths"], "--key-lengths applies to --preset core only"),
    (["--preset", "core", "--head-dim", "0"], "expected a positive integer, got 0"),
    (["--seq", "many"], "expected a positive integer, got 'many'"),
    (["--device", "cpu", "--cuda-graphs"], "CUDA graphs need a CUDA device, got cpu"),
])
def test_bench_refuses_bad_sizes(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["bench", "verify"])
@pytest.mark.parametrize("argv, message", [
    (["--impl", "sdpa_flashh"], "argument --impl: 'sdpa_flashh' names no implementation"),
    (["--exclude", "module:nope"], "argument --exclude: 'module:nope' names no"),
    (["--device", "tpu"], "argument --device: 'tpu' is not a device torch knows"),
])
def test_bench_and_verify_refuse_what_names_nothing(command, argv, message, capsys):
    """A misspelt --impl used to leave the run empty: verify then checked nothing and
    passed (exit 0). A device torch does not know raised a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main([command, *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["bench", "verify"])
def test_an_out_folder_that_cannot_be_made_is_refused_before_running(command, tmp_path,
                                                                     capsys, monkeypatch):
    """--out under a file: bench used to run the whole benchmark and then raise from
    mkdir (run 51)."""
    import attnkit.bench

    monkeypatch.setattr(attnkit.bench, "run_bench", lambda *a, **k: pytest.fail("ran"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--device", "cpu", "--out", str(tmp_path / "a_file" / "results")])
    assert exit_info.value.code == 2
    assert "argument --out: cannot make" in capsys.readouterr().err


def test_verify_fails_when_every_check_was_skipped(capsys, monkeypatch):
    """verify --impl of an implementation this machine cannot run checked nothing and
    exited 0 (run 51): a CI step would pass on it."""
    from dataclasses import replace

    from attnkit import backends

    off = replace(backends.BACKENDS["naive"], available=lambda device: "switched off here")
    monkeypatch.setitem(backends.BACKENDS, "naive", off)
    assert main(["verify", "--quick", "--device", "cpu", "--no-progress",
                 "--impl", "naive"]) == 1
    assert "nothing was checked" in capsys.readouterr().out


def test_filters_know_every_label_form():
    from attnkit.verify import unknown_filters

    assert unknown_filters(["sdpa", "auto", "reference", "module:triton", "variant:einsum",
                            "einsum", "torch_mha"]) == []
    assert unknown_filters(["module:auto_", "variant:", "triton "]) == [
        "module:auto_", "variant:", "triton "]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_without_cuda_is_refused_before_running(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "'cuda': CUDA is not available here" in capsys.readouterr().err


def test_bench_reports_a_head_dim_wider_than_core_as_an_error(capsys):
    assert main(["bench", "--preset", "core", "--head-dim", "4096", "--device", "cpu",
                 "--no-progress"]) == 2
    assert "head_dim must lie in [1, 256]" in capsys.readouterr().err


def test_bench_core_quick_writes_results(tmp_path, capsys, monkeypatch):
    other = _another_backend()
    monkeypatch.setitem(backends.BACKENDS, "crashing", _broken_backend("crashing", crash=True))
    out_dir = tmp_path / "out"
    code = main(["bench", "--preset", "core", "--quick", "--seq", "128", "--device", "cpu",
                 "--impl", "reference", "--impl", other, "--impl", "crashing",
                 "--impl", "auto", "--no-progress", "--out", str(out_dir)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "kernel exploded" in printed  # listed with its reason, the run goes on
    assert "auto ran " in printed

    data = json.loads((out_dir / "results.json").read_text())
    meta = data["meta"]
    for key in ("device", "device_name", "torch", "triton", "python", "date", "command",
                "preset", "sizes", "dtype", "matmul_peak_tflops"):
        assert key in meta, key
    assert meta["preset"] == "core" and meta["dtype"] == "float32"
    assert "--impl reference" in meta["command"]
    rows = data["results"]
    assert {r["impl"] for r in rows} == {"reference", other, "crashing", "auto"}
    auto_picks = {r["picked"] for r in rows if r["impl"] == "auto"}
    assert auto_picks <= set(backends.BACKENDS) and len(auto_picks) == 1
    assert all(r["picked"] is None for r in rows if r["impl"] != "auto")
    assert {r["causal"] for r in rows} == {True, False}
    for r in rows:
        if r["impl"] == "crashing":
            assert r["status"] == "error" and "kernel exploded" in r["reason"]
            continue
        assert r["status"] == "ok"
        for key in ("first_call_ms", "fwd_ms", "fwd_bwd_ms", "tflops_fwd", "tflops_fwd_bwd",
                    "speedup_vs_slowest", "rel_err", "fwd_spread", "fwd_bwd_spread"):
            assert r[key] is not None and r[key] >= 0, (r["impl"], key)
        assert r["peak_fwd_mib"] is None  # not measurable on the CPU, so not reported
        assert r["rel_err"] < 1e-5
        causal_flops = r["flops_fwd"] * (2 if r["causal"] else 1)
        assert causal_flops == 4 * r["batch"] * r["heads"] * r["seq"] ** 2 * r["head_dim"]
    assert next(r for r in rows if r["impl"] == "reference")["rel_err"] == 0.0

    with (out_dir / "results.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and "fwd_bwd_ms" in csv_rows[0]
    assert (out_dir / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # make_tables turns the result set into Markdown inside a README's results block.
    verify_dir = tmp_path / "results" / "cpu-verify"
    assert main(["verify", "--quick", "--impl", "reference", "--no-progress",
                 "--out", str(verify_dir)]) == 0
    (out_dir).rename(tmp_path / "results" / "cpu-core")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:start -->\nstale block\n<!-- results:end -->\ntail\n")
    make_tables = _make_tables()
    args = ["--results", str(tmp_path / "results"), "--readme", str(readme)]
    assert make_tables.main(args) == 0
    text = readme.read_text()
    assert "stale block" not in text and text.endswith("<!-- results:end -->\ntail\n")
    assert "bench `core`" in text and "verify · float32" in text and f"| {other}" in text
    assert "results/cpu-core/chart.png" in text
    assert f"`auto` ran `{auto_picks.pop()}` on every config" in text
    assert "rounds behind each median disagreed" in text
    assert (tmp_path / "results" / "README.md").exists()
    assert make_tables.main([*args, "--check"]) == 0


def test_bench_times_a_configs_implementations_in_turns():
    # Warm times go round the implementations ROUNDS times, each reported time being the
    # median of its rounds; a backward that fails in a later round drops fwd+bwd alone.
    from attnkit.bench import Measurement, Workload, _time_rounds, _Timed

    calls: list[str] = []
    x = torch.ones(2, requires_grad=True)

    def work(name: str, fail_on_call: int | None = None) -> Workload:
        def forward():
            calls.append(name)
            if fail_on_call is not None and calls.count(name) == fail_on_call:
                raise RuntimeError("backward gave up")
            return x * 2
        return Workload(forward, [x], torch.ones(2))

    class ScriptedClock:
        def median(self, fn, mode="median", share=1.0, warmed=False):
            assert share == 1 / 3 and warmed
            fn()
            return next(times)  # one value per timing that got past fn()

    config = Config("core", 1, 8, 1, 2, causal=False)
    a, b, c = (Measurement(name, config, flops_fwd=1e9, flops_fwd_bwd=3e9)
               for name in "abc")
    works = work("a"), work("b"), work("c", fail_on_call=4)
    timed = [_Timed(a, works[0], works[0].run_forward, works[0].run_forward_backward),
             _Timed(b, works[1], works[1].run_forward, None),
             _Timed(c, works[2], works[2].run_forward, works[2].run_forward_backward)]
    times = iter([5.0, 10.0, 7.0, 2.0, 2.0, 1.0, 30.0, 7.0, 2.0, 3.0, 20.0, 9.0, 2.0])
    _time_rounds(timed, ScriptedClock(), rounds=3)
    assert calls == ["a", "a", "b", "c", "c", "a", "a", "b", "c", "c", "a", "a", "b", "c"]
    assert (a.fwd_ms, a.fwd_bwd_ms, b.fwd_ms, b.fwd_bwd_ms) == (3.0, 20.0, 7.0, None)
    assert a.tflops_fwd == pytest.approx(1e9 / 3e-3 / 1e12)
    assert c.fwd_ms == 2.0 and c.fwd_bwd_ms is None and c.status == "ok"
    # how far each median's rounds disagreed: (max - min) / median
    assert (a.fwd_spread, a.fwd_bwd_spread) == (pytest.approx(4 / 3), 1.0)
    assert (b.fwd_spread, c.fwd_spread) == (pytest.approx(2 / 7), 0.0)
    assert b.fwd_bwd_spread is None and c.fwd_bwd_spread is None
    assert c.reason == "fwd+bwd: RuntimeError: backward gave up"


def test_bench_checkpoints_after_each_config_and_prints_reasons_verbatim(capsys, monkeypatch):
    """A sweep cut off mid-way keeps what it measured; reasons keep their brackets."""
    from attnkit.bench import run_bench

    refused = Backend(name="refusing", summary="always refuses", available=lambda d: None,
                      supports=lambda call: "needs pip install attnkit[extra]",
                      run=lambda call: None)
    monkeypatch.setitem(backends.BACKENDS, "refusing", refused)
    snapshots = []
    run = run_bench("core", device="cpu", quick=True, impls=["reference", "refusing"],
                    rounds=1, progress=False,
                    checkpoint=lambda partial: snapshots.append(
                        (len(partial.results), partial.meta["complete"])))
    configs = len(run.configs)
    assert [n for n, _ in snapshots] == [2 * (i + 1) for i in range(configs)]
    assert all(done is False for _, done in snapshots) and run.meta["complete"] is True
    # one round: nothing to disagree with
    assert run.meta["timing_rounds"] == 1
    assert all(m.fwd_ms and m.fwd_spread is None for m in run.results if m.status == "ok")
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        run_bench("core", device="cpu", quick=True, impls=["reference"], rounds=0)

    from attnkit.bench import print_results

    print_results(run)
    assert "attnkit[extra]" in capsys.readouterr().out


@pytest.mark.gpu
def test_bench_times_on_the_gpu_it_was_given_on_gpu(monkeypatch):
    """`bench --device cuda:1` under cuda:0: every timing runs with that GPU current, since
    do_bench's events and synchronizes (and Triton's launches) go to the current device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from attnkit import bench

    current_while_timed = []
    median = bench.Clock.median

    def watched(self, fn, *args, **kwargs):
        current_while_timed.append(torch.cuda.current_device())
        return median(self, fn, *args, **kwargs)

    monkeypatch.setattr(bench.Clock, "median", watched)
    last = torch.cuda.device_count() - 1
    with torch.cuda.device(0):
        run = bench.run_bench("core", device=f"cuda:{last}", quick=True,
                              impls=["sdpa", "triton"], rounds=1, progress=False)
    assert current_while_timed and set(current_while_timed) == {last}
    assert all(m.status == "ok" and m.fwd_ms > 0 for m in run.results), run.results


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["notebook", "bert"])
def test_bench_under_cuda_graphs_on_gpu(preset):
    """--cuda-graphs: the rounds time replays of captured graphs; the oracle judges the
    replayed forward, and an implementation that cannot be captured says why. The
    preset's own sizes, several implementations: before run 52's fix a graph outlived the
    module whose weights it read, and once the next implementation's preparation emptied
    the allocator's cache its replay faulted (an illegal memory access)."""
    from attnkit import bench

    run = bench.run_bench(preset, device="cuda", rounds=1, progress=False, cuda_graphs=True,
                          impls=["wrapper", "separate_qkv", "triton", "sdpa", "naive"])
    assert run.meta["cuda_graphs"] and "CUDA graphs" in run.meta["notes"][-1]
    timed = [m for m in run.results if m.fwd_ms is not None]
    assert {m.impl for m in timed} >= {"module:triton", "module:sdpa"}, run.results
    for m in timed:
        assert m.fwd_bwd_ms is not None and m.rel_err < 1e-2, m
    for m in run.results:
        assert m.fwd_ms is not None or m.reason, m


def test_prepare_under_cuda_graphs_times_the_replays(monkeypatch):
    """How _prepare wires --cuda-graphs (the capture itself is the GPU test's): the rounds
    get the replays, the oracle the replayed output, the workload stays held (its weights
    are what the graphs read), and a call that cannot be captured says so."""
    from attnkit import bench

    cpu = torch.device("cpu")
    config = bench.preset_configs("core", quick=True)[0]
    problem = bench._core_problem(config, cpu, torch.float32, ["naive"], None)
    captured = []

    def capture(fn, device):
        captured.append(fn.__name__)
        if fn.__name__ == "run_forward_backward":
            raise RuntimeError("called a synchronizing CUDA operation")
        return (lambda: None), fn()

    monkeypatch.setattr(bench, "capture", capture)
    m, t = bench._prepare("naive", problem.entries["naive"], problem, bench.Clock(cpu),
                          cuda_graphs=True)
    assert captured == ["run_forward", "run_forward_backward"]
    assert m.status == "ok" and m.rel_err < 1e-5 and t.forward() is None
    assert isinstance(t.work, bench.Workload) and t.forward_backward is None
    assert m.reason == ("fwd+bwd: CUDA graph capture: RuntimeError: called a synchronizing "
                        "CUDA operation")

    def refuse(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(bench, "capture", refuse)
    m, t = bench._prepare("naive", problem.entries["naive"], problem, bench.Clock(cpu),
                          cuda_graphs=True)
    assert t is None and m.status == "error"
    assert m.reason == ("CUDA graph capture: RuntimeError: operation not permitted when "
                        "stream is capturing")
