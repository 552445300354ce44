"""Markdown tables from the result sets under benchmarks/results/.

Each result set is a folder written by `attnkit bench --out DIR` (results.json, chart.png)
or `attnkit verify --out DIR` (verify.json), or a decode.json of `benchmarks/decode.py`;
loose *.json files of these kinds directly in the results folder count too. This script
writes benchmarks/results/README.md and rewrites the block between
`<!-- results:start -->` and `<!-- results:end -->` in the top-level README.md, so that
the tables there are always generated from committed data:

    python benchmarks/make_tables.py            # rewrite both
    python benchmarks/make_tables.py --check    # exit 1 if either is out of date (CI)

benchmarks/results/README.md has every set; the top-level README the latest set of each
series (`series`: one device, preset, dtype and set of options, run again), so that it
reads as where things stand rather than as the history of every run.

Only the standard library: the tables can be rebuilt without installing anything.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- results:start -->", "<!-- results:end -->"
_PRESET_ORDER = {"verify": 0, "notebook": 1, "bert": 2, "core": 3, "decode": 4}


def load_sets(results_dir: Path) -> list[dict]:
    """Every result set under `results_dir`: {"kind", "path", "meta", "results", ...}."""
    sets = []
    files = sorted(results_dir.glob("*/*.json")) + sorted(results_dir.glob("*.json"))
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"skipping {path}: {exc}", file=sys.stderr)
            continue
        if not isinstance(data, dict) or "meta" not in data or "results" not in data:
            continue
        meta = data["meta"]
        if meta.get("kind") == "decode":
            kind = "decode"
        elif path.name == "verify.json":
            kind = "verify"
        elif "preset" in meta:
            kind = "bench"
        else:  # a sweep's record (kernel_variants.py, decode.py --splits): no table
            continue
        sets.append({"kind": kind, "path": path, **data})

    def order(s: dict) -> tuple:
        meta = s["meta"]
        preset = s["kind"] if s["kind"] != "bench" else meta.get("preset", "")
        return (meta.get("device") != "cuda", meta.get("device_name", ""),
                _PRESET_ORDER.get(preset, 9), meta.get("dtype", ""), str(s["path"]))

    return sorted(sets, key=order)


# Options of a set's command that say how a run went, not what it measured: `series`
# leaves them out (the value is how many words each takes after it). A bench set's
# implementations are left out too, as each run asks for the ones it compares; a verify
# set's are kept, as one limited to a few implementations does not stand for a whole one.
_RUN_OPTIONS = {"--out": 1, "--rounds": 1, "--no-progress": 0}
_BENCH_RUN_OPTIONS = {**_RUN_OPTIONS, "--impl": 1}


def series(s: dict) -> tuple:
    """What a result set measured: its device, kind, preset, dtype and command options
    but those of _RUN_OPTIONS. Sets of one series are runs of the same measurement."""
    meta = s["meta"]
    skip = _BENCH_RUN_OPTIONS if s["kind"] == "bench" else _RUN_OPTIONS
    words = shlex.split(meta.get("command") or "")
    kept, i = [], 1  # words[0] is the program
    while i < len(words):
        name, has_value, _ = words[i].partition("=")
        if name in skip:
            i += 1 if has_value else 1 + skip[name]
        else:
            kept.append(words[i])
            i += 1
    return (meta.get("device_name"), s["kind"], meta.get("preset"), meta.get("dtype"),
            tuple(kept))


def latest_of_each_series(sets: list[dict]) -> list[dict]:
    """The newest set (by its date, then its path) of each series, in the order given."""
    newest: dict[tuple, dict] = {}
    for s in sets:
        key = series(s)
        if key not in newest or _age(s) > _age(newest[key]):
            newest[key] = s
    kept = {id(s) for s in newest.values()}
    return [s for s in sets if id(s) in kept]


def _age(s: dict) -> tuple[str, str]:
    return str(s["meta"].get("date", "")), str(s["path"])


# --------------------------------------------------------------------------- formatting


def _ms(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def _num(x: float | str | None, fmt: str) -> str:
    if x is None or isinstance(x, str):
        return "–" if x is None else str(x)
    return "–" if math.isnan(x) else format(x, fmt)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list[str]], align: str = "r") -> list[str]:
    aligns = ["---"] + [("---:" if align == "r" else "---")] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(aligns) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _provenance(meta: dict) -> str:
    parts = [f"`{meta.get('command') or 'attnkit'}`", f"torch {meta.get('torch', '?')}"]
    if meta.get("triton"):
        parts.append(f"triton {meta['triton']}")
    parts.append(f"python {meta.get('python', '?')}")
    if meta.get("device") == "cpu":
        parts.append(f"{meta.get('cpu_threads', '?')} threads")
    parts.append(str(meta.get("date", "?"))[:10])
    return "_" + " · ".join(parts) + "_"


def bench_section(s: dict, link_base: str, heading: str = "####") -> list[str]:
    """Markdown for one bench result set: one table per config, or a pivot for sweeps."""
    meta, rows = s["meta"], s["results"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    title = (f"{heading} bench `{meta.get('preset')}` · {meta.get('dtype')} · "
             f"{meta.get('device_name')}{' · CUDA graphs' if meta.get('cuda_graphs') else ''}")
    out = [title, "", _provenance(meta), ""]
    if meta.get("complete") is False:
        planned = meta.get("sizes") or []
        out += [f"**Cut off: the run hit its time limit with {len(configs)} of "
                f"{len(planned)} configs measured**; what is missing was not run.", ""]
    for note in meta.get("notes", []):
        out.append(f"- {note}")
    if meta.get("notes"):
        out.append("")
    if len(configs) > 1:  # a sweep reads best as one table per quantity
        out += _pivot(rows, configs)
    else:
        for config in configs:
            out += _config_table(meta, [r for r in rows if r["config"] == config], config)
    if s["path"].name == "results.json":
        folder = s["path"].parent
        for png in ("chart.png", "scaling.png"):
            if (folder / png).exists():
                out += [f"![{meta.get('preset')} {png[:-4]}]({link_base}/{folder.name}/{png})",
                        ""]
    return out


def _config_table(meta: dict, rows: list[dict], config: str) -> list[str]:
    gpu = meta.get("device") == "cuda"
    ok = sorted((r for r in rows if r.get("fwd_ms") is not None), key=lambda r: r["fwd_ms"])
    headers = ["implementation", "first call ms", "fwd ms", "fwd+bwd ms", "TFLOP/s fwd",
               "TFLOP/s fwd+bwd", "% matmul peak", "× slowest", "× sdpa", "rel err"]
    if gpu:
        headers.insert(7, "MiB fwd / fwd+bwd")
    table = []
    for r in ok:
        frac = r.get("peak_frac_fwd")
        cells = [r["impl"], _ms(r.get("first_call_ms")), _ms(r["fwd_ms"]),
                 _ms(r.get("fwd_bwd_ms")), _num(r.get("tflops_fwd"), ".3g"),
                 _num(r.get("tflops_fwd_bwd"), ".3g"),
                 _num(None if frac is None else 100 * frac, ".0f"),
                 _num(r.get("speedup_vs_slowest"), ".1f"), _num(r.get("speedup_vs_sdpa"), ".2f"),
                 _num(r.get("rel_err"), ".1e")]
        if gpu:
            cells.insert(7, f"{_num(r.get('peak_fwd_mib'), '.0f')} / "
                            f"{_num(r.get('peak_fwd_bwd_mib'), '.0f')}")
        table.append(cells)
    out = [f"`{config}`", ""] + _table(headers, table) + [""]
    for r in rows:
        if r.get("reason"):
            out.append(f"- {_status_label(r)} `{r['impl']}`: {r['reason']}")
    notes = {r["rel_err_note"] for r in ok if r.get("rel_err_note")}
    out += [f"- rel err {note} (the float64 oracle would not fit)" for note in sorted(notes)]
    return out + _picks(rows) + _spread(rows) + [""]


def _rate(r: dict | None) -> str:
    if r is None or r.get("tflops_fwd") is None:
        return ""
    return f"{_num(r['tflops_fwd'], '.3g')} / {_num(r.get('tflops_fwd_bwd'), '.3g')}"


def _pivot(rows: list[dict], configs: list[str]) -> list[str]:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    by_key = {(r["config"], r["impl"]): r for r in rows}
    table = []
    for config in configs:
        cells = [config]
        for impl in impls:
            r = by_key.get((config, impl))
            if r is None:
                cells.append("")
            elif r.get("fwd_ms") is None:
                cells.append("skip" if r["status"] == "unsupported" else "error")
            else:
                cells.append(f"{_ms(r['fwd_ms'])} / {_ms(r.get('fwd_bwd_ms'))}")
        table.append(cells)
    out = ["forward / forward+backward ms (median):", ""]
    out += _table(["config", *impls], table) + [""]
    rates = [[config] + [_rate(by_key.get((config, impl))) for impl in impls]
             for config in configs]
    out += ["forward / forward+backward TFLOP/s:", ""]
    out += _table(["config", *impls], rates) + [""]
    where: dict[tuple[str, str, str], list[str]] = {}
    for r in rows:
        if r.get("reason"):
            where.setdefault((r["impl"], _status_label(r), r["reason"]), []).append(r["config"])
    out += [f"- {label} `{impl}` ({', '.join(configs)}): {reason}"
            for (impl, label, reason), configs in sorted(where.items())]
    return out + _picks(rows) + _spread(rows) + [""]


def _picks(rows: list[dict]) -> list[str]:
    """Which backend each `auto` row ran (sets from before it was recorded have none)."""
    picked: dict[str, list[str]] = {}
    for r in rows:
        if r.get("picked"):
            picked.setdefault(r["picked"], []).append(r["config"])
    if len(picked) == 1:
        return [f"- `auto` ran `{next(iter(picked))}` on every config"]
    return [f"- `auto` ran `{name}` on {', '.join(configs)}" for name, configs in picked.items()]


def _spread(rows: list[dict]) -> list[str]:
    """How far the timing rounds behind the medians disagreed (sets that recorded it)."""
    spreads = sorted((r[key], r["impl"], r["config"], what) for r in rows
                     for key, what in (("fwd_spread", "forward"),
                                       ("fwd_bwd_spread", "fwd+bwd"))
                     if r.get(key) is not None)
    if not spreads:
        return []
    worst, impl, config, what = spreads[-1]
    middle = spreads[len(spreads) // 2][0]
    return [f"- rounds behind each median disagreed by (slowest - fastest) / median: "
            f"{100 * middle:.1f}% in the middle, at worst {100 * worst:.1f}% (`{impl}`, "
            f"{what}, {config})"]


def _status_label(r: dict) -> str:
    """"error"/"unsupported", or "note" for a run that measured its forward but not all."""
    return r["status"] if r["status"] != "ok" else "note"


def verify_section(s: dict, heading: str = "####") -> list[str]:
    """Markdown for one verify result set: per implementation, checks and the worst error."""
    meta, rows = s["meta"], s["results"]
    summary: dict[str, dict] = {}
    for r in rows:
        entry = summary.setdefault(r["impl"], {"n": 0, "pass": 0, "fail": 0, "skip": 0,
                                               "worst": None, "tol": None, "reasons": set()})
        entry["n"] += 1
        if r.get("skipped") is not None:
            entry["skip"] += 1
            entry["reasons"].add(r["skipped"])
            continue
        entry["pass" if r["passed"] else "fail"] += 1
        errs = [e for e in (r.get("out_err"), r.get("grad_err")) if e is not None]
        errs = [math.inf if e == "inf" else e for e in errs]
        if errs:
            entry["worst"] = max(errs + ([entry["worst"]] if entry["worst"] is not None else []))
        entry["tol"] = r.get("tol")
    table = []
    unavailable = []
    for impl, e in summary.items():
        if e["skip"] == e["n"]:
            unavailable.append(f"- `{impl}`: {'; '.join(sorted(e['reasons']))}")
            continue
        status = "✅" if e["fail"] == 0 else "❌"
        table.append([impl, status, str(e["pass"]), str(e["fail"]), str(e["skip"]),
                      _num(e["worst"], ".1e"), _num(e["tol"], ".0e")])
    failed = sum(e["fail"] for e in summary.values())
    out = [f"{heading} verify · {meta.get('dtype')} · {meta.get('device_name')}", "",
           _provenance(meta), "",
           f"{len(rows)} checks, {failed} failed; worst = max(output, gradient) relative "
           "error against the float64 oracle over every case.", ""]
    done, total = meta.get("checks_done"), meta.get("checks_total")
    if done is not None and total is not None and done < total:
        out[-1:] = [f"**Cut off: {done} of {total} checks finished** (the run hit its time "
                    "limit; the rest did not run).", ""]
    out += _table(["implementation", "ok", "passed", "failed", "skipped", "worst error",
                   "tolerance"], table) + [""]
    if unavailable:
        out += ["Not available on this device:", "", *unavailable, ""]
    return out


_DECODE_FORCED = {"triton kernels": "its own choices",
                  "triton, one range": "the keys in one range",
                  "triton, heads apart": "a program per query head"}


def decode_section(s: dict, heading: str = "####") -> list[str]:
    """Markdown for one decode set (benchmarks/decode.py): time per step and the K/V bytes
    read per second as a share of a device copy's, per implementation."""
    meta, rows = s["meta"], s["results"]
    impls = list(dict.fromkeys(name for r in rows for name in r["ms"]))
    graphed = any(r.get("graph_ms") for r in rows)
    forced = [f"`{name}` ({what})" for name, what in _DECODE_FORCED.items() if name in impls]
    out = [f"{heading} decode · bfloat16 · {meta.get('device_name')}", "",
           _provenance(meta), "",
           "One causal decoding step: µs per step and, in brackets, K and V bytes read per "
           "second as a share of a device-to-device copy "
           f"({meta['copy_bytes_per_s'] / 1e9:.0f} GB/s). "
           + ("GPU time alone: each step replayed from a CUDA graph (do_bench's times, host "
              "included, are in the JSON: a step this short is host-bound). "
              if graphed else "Times by do_bench, host time included. ")
           + ("These call the forward directly: " + ", ".join(forced) + "."
              if forced else ""), ""]
    if meta.get("note"):
        out += [f"- {meta['note']}", ""]
    timings = [("graph_ms" if graphed else "ms", None)]
    if any(r.get("cold_graph_ms") for r in rows):
        timings.append(("cold_graph_ms",
                        "L2-cold: each step reads its K and V from memory, the graph stepping "
                        "through copies of the cache (four L2s' worth) in turn, as a model's "
                        "layers do; the table above replays one cache, which L2 can hold."))
    for key, caption in timings:
        if caption:
            out += [caption, ""]
        table = []
        for r in rows:
            b, hq, hkv, sq, skv, d = r["shape"]
            cells = []
            for name in impls:
                ms = r.get(key, {}).get(name)
                if ms is None:
                    cells.append("–")
                    continue
                share = r["kv_bytes"] / (ms * 1e-3) / meta["copy_bytes_per_s"]
                cells.append(f"{ms * 1e3:.0f} ({share:.0%})")
            layout = f"{r['splits']}" + (", packed" if r.get("packed") else "")
            table.append([f"b{b} h{hq}/{hkv} q{sq} kv{skv} d{d}", layout, *cells])
        out += _table(["step", "key ranges", *(f"`{name}`" for name in impls)], table) + [""]
    return out


_SECTIONS = {"verify": lambda s, link_base, sub: verify_section(s, sub),
             "decode": lambda s, link_base, sub: decode_section(s, sub),
             "bench": bench_section}


def render(sets: list[dict], link_base: str, heading: str = "###") -> str:
    """All result sets as Markdown, grouped by device."""
    if not sets:
        return "_No result sets under benchmarks/results/ yet._\n"
    out: list[str] = []
    device = None
    for s in sets:
        name = f"{s['meta'].get('device_name', '?')} ({s['meta'].get('device', '?')})"
        if name != device:
            device = name
            out += [f"{heading} {name}", ""]
        sub = heading + "#"
        out += _SECTIONS[s["kind"]](s, link_base, sub)
    return "\n".join(out).rstrip() + "\n"


def replace_block(text: str, block: str) -> str:
    """`text` with the part between the results markers replaced by `block`."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README has no '{START}' ... '{END}' block")
    return text[: start + len(START)] + "\n" + block + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                        help="folder of result sets (default: benchmarks/results)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md",
                        help="README whose results block is rewritten (default: README.md)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a file would change")
    args = parser.parse_args(argv)

    sets = load_sets(args.results)
    header = ("# Results\n\nGenerated by `python benchmarks/make_tables.py` from the result "
              "sets in this folder; do not edit by hand.\n\n")
    targets = {args.results / "README.md": header + render(sets, ".", heading="##")}
    if args.readme.exists():
        rel = Path("benchmarks/results")
        try:
            rel = args.results.resolve().relative_to(args.readme.resolve().parent)
        except ValueError:
            pass
        latest = latest_of_each_series(sets)
        block = (f"_The latest result set of each series: {len(latest)} of {len(sets)}; "
                 f"every set, older runs included, is in "
                 f"[{rel.as_posix()}/README.md]({rel.as_posix()}/README.md)._\n\n"
                 + render(latest, rel.as_posix()))
        targets[args.readme] = replace_block(args.readme.read_text(), block)
    else:
        print(f"{args.readme} not found: only {args.results / 'README.md'} is written",
              file=sys.stderr)

    stale = [p for p, text in targets.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"out of date: {p}", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.write_text(targets[p])
        print(f"wrote {p}")
    print(f"{len(sets)} result sets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
