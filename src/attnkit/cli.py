"""`attnkit bench | verify | info`: the command line.

Each subcommand is a thin shell over a function of `attnkit.bench` / `attnkit.verify`, so
that everything the command line does is also a Python call.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from rich.markup import escape

__all__ = ["main"]

_DTYPES = ("float32", "bfloat16", "float16")


def _console():
    from rich.console import Console

    # Rich falls back to 80 columns when stdout is not a terminal (CI logs, pipes), which
    # folds the tables; a wider default keeps one row per line there.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=140 if wide else None)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnkit",
        description="Every way of computing multi-head attention, verified and benchmarked.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{bench,verify,info}")

    bench = sub.add_parser(
        "bench", help="time every implementation side by side (default: the notebook preset)",
        description="Time every implementation on one problem. On a CPU the quick sizes are "
        "used unless --full, --batch or --seq is given.",
    )
    bench.add_argument("--preset", choices=("notebook", "bert", "core"), default="notebook",
                       help="notebook: the notebook's b8 s1024 d768 h12 causal comparison of "
                       "module variants; bert: the tutorial's b8 s384 d1024 h16 with biases "
                       "and a padding mask; core: the functional backends over S and D, and "
                       "'auto' (what impl='auto' picks)")
    bench.add_argument("--device", help="cuda, cuda:1, cpu (default: CUDA when present)")
    bench.add_argument("--dtype", choices=_DTYPES,
                       help="default: bfloat16 on CUDA, float32 on the CPU")
    bench.add_argument("--impl", action="append", metavar="NAME",
                       help="run only this implementation (repeatable; 'sdpa' matches the "
                       "backend, module:sdpa and a variant named sdpa; 'reference' runs the "
                       "oracle, left out otherwise)")
    bench.add_argument("--exclude", action="append", metavar="NAME",
                       help="leave this implementation out (repeatable; matched as --impl)")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", default=None,
                      help="small sizes for a slow CPU (the default on a CPU)")
    size.add_argument("--full", dest="quick", action="store_false",
                      help="the preset's own sizes, also on a CPU")
    bench.add_argument("--batch", type=_positive_int, help="override the batch size")
    bench.add_argument("--seq", type=_positive_int,
                       help="override the sequence length (core: one S)")
    bench.add_argument("--head-dim", type=_positive_int,
                       help="core only: run this head dim alone (heads = 2048 // D, or "
                       "256 // D with --quick), e.g. to split the preset over two runs")
    bench.add_argument("--key-lengths", action="store_true",
                       help="core only: every batch element hides its keys past a length "
                       "drawn in [S/2, S] (padded batches, through key_lengths)")
    bench.add_argument("--rounds", type=_positive_int, default=None,
                       help="timing rounds per config, taken in turns over the "
                       "implementations, each a share of the same time (default: 3)")
    bench.add_argument("--cuda-graphs", action="store_true",
                       help="CUDA only: time replays of each implementation's forward and "
                       "forward+backward captured as CUDA graphs (the host's work left out)")
    bench.add_argument("--out", metavar="DIR",
                       help="write results.json, results.csv and chart.png to DIR")
    bench.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bar")

    verify = sub.add_parser(
        "verify", help="check every implementation against the float64 oracle",
        description="Check every available backend, textbook variant and MultiHeadAttention "
        "against the float64 oracle; exit status 1 on any failure, or when every check was "
        "skipped.",
    )
    verify.add_argument("--device", help="cuda, cpu (default: CUDA when present)")
    verify.add_argument("--dtype", choices=_DTYPES, default="float32")
    verify.add_argument("--impl", action="append", metavar="NAME",
                        help="check only this implementation (repeatable)")
    verify.add_argument("--exclude", action="append", metavar="NAME",
                        help="leave this implementation out (repeatable; matched as --impl)")
    verify.add_argument("--quick", action="store_true",
                        help="leave out the length-1000 cases")
    verify.add_argument("--out", metavar="DIR",
                        help="also write DIR/verify.json (kept up to date during the run)")
    verify.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar")

    info = sub.add_parser("info", help="versions, device, and which backends can run here")
    info.add_argument("--device", help="cuda, cpu (default: CUDA when present)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `attnkit ARGS`; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "bench" and args.preset != "core":
        for flag, value in (("--head-dim", args.head_dim), ("--key-lengths", args.key_lengths)):
            if value:
                parser.error(f"{flag} applies to --preset core only, not {args.preset}")
    if args.command in ("bench", "verify"):
        from attnkit.backends import BACKENDS
        from attnkit.verify import unknown_filters

        for flag, names in (("--impl", args.impl), ("--exclude", args.exclude)):
            # A misspelt name used to leave the run empty, and an empty verify passed.
            if unknown := unknown_filters(names):
                parser.error(f"argument {flag}: {unknown[0]!r} names no implementation "
                             f"(backends: auto, {', '.join(BACKENDS)}; module:NAME and "
                             f"variant:NAME are listed by attnkit info)")
    if args.device is not None:
        problem = _device_problem(args.device)
        if problem:
            parser.error(f"argument --device: {problem}")
    if getattr(args, "cuda_graphs", False) and (device := _device(args.device)).type != "cuda":
        parser.error(f"argument --cuda-graphs: CUDA graphs need a CUDA device, got {device}")
    if getattr(args, "out", None) and (problem := _out_problem(args.out)):
        # Said before the run: it used to end in a traceback after the whole benchmark.
        parser.error(f"argument --out: {problem}")
    commands = {"bench": _bench, "verify": _verify, "info": _info}
    return commands[args.command](args, argv)


def _device_problem(name: str) -> str | None:
    """Why torch cannot run on the device called `name` here, or None."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"{name!r} is not a device torch knows (e.g. cpu, cuda, cuda:1)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{name!r}: CUDA is not available here"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"{name!r}: this machine has {torch.cuda.device_count()} GPU(s)"
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as exc:
            return f"{name!r}: {str(exc).splitlines()[0]}"
    return None


def _out_problem(name: str) -> str | None:
    """Why the results cannot be written into the folder `name` (made here if missing),
    or None."""
    folder = Path(name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot make {name!r}: {exc.strerror or exc}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write into {name!r}"
    return None


def _device(name: str | None) -> torch.device:
    from attnkit.bench import default_device

    return torch.device(name) if name else default_device()


def _bench(args: argparse.Namespace, argv: list[str] | None) -> int:
    from attnkit.bench import command_line, print_results, run_bench, write_outputs

    console = _console()
    try:
        run = run_bench(
            args.preset, device=args.device, dtype=args.dtype, impls=args.impl,
            exclude=args.exclude, quick=args.quick,
            batch=args.batch, seq=args.seq, head_dim=args.head_dim,
            key_lengths=args.key_lengths, rounds=args.rounds,
            cuda_graphs=args.cuda_graphs, progress=args.progress,
            console=console,
            command=command_line(argv),
            checkpoint=(lambda partial: write_outputs(partial, args.out)) if args.out else None,
        )
    except ValueError as exc:
        # A size the preset cannot take (say --head-dim past the core width), refused
        # before anything is measured: run_bench keeps each implementation's own errors.
        print(f"attnkit bench: error: {exc}", file=sys.stderr)
        return 2
    print_results(run, console)
    if args.out:
        paths = write_outputs(run, args.out)
        console.print("wrote " + ", ".join(str(p) for p in paths), highlight=False)
    # Exit 1 only when nothing could be measured: one failing implementation is a result.
    return 0 if any(m.fwd_ms is not None for m in run.results) else 1


def _verify(args: argparse.Namespace, argv: list[str] | None) -> int:
    from attnkit.bench import command_line, environment
    from attnkit.verify import print_report, run_verify, write_json

    console = _console()
    device = _device(args.device)
    dtype = getattr(torch, args.dtype)
    console.print(f"[bold]attnkit verify[/] · {device} · {args.dtype}"
                  f"{' · quick' if args.quick else ''}", highlight=False)
    meta = environment(device)
    meta.update(dtype=args.dtype, quick=args.quick, command=command_line(argv),
                impl_filter=args.impl, exclude=args.exclude)
    path = Path(args.out) / "verify.json" if args.out else None
    last_write = time.monotonic()

    def save(results: list, total: int) -> None:
        nonlocal last_write
        write_json(results, path, {**meta, "checks_done": len(results), "checks_total": total})
        last_write = time.monotonic()

    def save_now_and_then(results: list, total: int) -> None:
        # A run cut off by a time limit keeps what it finished: verify.json is rewritten
        # every few seconds during the run, saying how many of the checks it holds; the
        # whole set is written once at the end.
        if path is not None and time.monotonic() - last_write > 5:
            save(results, total)

    results = run_verify(device, dtype, impls=args.impl, large=not args.quick,
                         progress=args.progress, exclude=args.exclude,
                         on_result=save_now_and_then)
    ok = print_report(results, console)
    if path is not None:
        save(results, len(results))
        console.print(f"wrote {path}", highlight=False)
    if all(r.skipped is not None for r in results):
        # A verify of an implementation this machine cannot run passed with nothing checked.
        console.print("[bold red]nothing was checked[/]: every check was skipped (the "
                      "reasons are above)", highlight=False)
        return 1
    return 0 if ok else 1


def _info(args: argparse.Namespace, argv: list[str] | None) -> int:
    from rich.table import Table

    import attnkit
    from attnkit.backends import BACKENDS
    from attnkit.backends.sdpa import chosen_kernel
    from attnkit.bench import device_name, environment
    from attnkit.functional import AUTO_ORDER_PADDED, device_auto_order

    console = _console()
    device = _device(args.device)
    env = environment(device)
    console.print(f"[bold]attnkit[/] {attnkit.__version__} · torch {env['torch']} · "
                  f"triton {env['triton'] or 'not installed'} · python {env['python']} · "
                  f"{platform.system()} {platform.machine()}", highlight=False)
    console.print(f"device: {device} ({device_name(device)}); CUDA "
                  f"{'available: ' + str(torch.cuda.device_count()) + ' GPU(s)' if torch.cuda.is_available() else 'not available'}"  # noqa: E501
                  f"; {torch.get_num_threads()} CPU threads", highlight=False)
    console.print(f"float32 matmuls: precision={torch.get_float32_matmul_precision()!r}, "
                  f"TF32 cuBLAS={torch.backends.cuda.matmul.allow_tf32}, "
                  f"TF32 cuDNN={torch.backends.cudnn.allow_tf32}", highlight=False)

    table = Table(title=f"backends on {device.type}", title_justify="left",
                  header_style="bold")
    table.add_column("name", no_wrap=True)
    table.add_column("status")
    table.add_column("what it is")
    details = []  # what available backends say of this device beyond their summaries
    for name, backend in BACKENDS.items():
        reason = backend.available(device)
        status = "[green]available[/]" if reason is None else f"[yellow]{escape(reason)}[/]"
        table.add_row(name, status, backend.summary)
        if reason is None and (line := backend.details(device)):
            details.append(f"{name} here: {line}")
    console.print(table)
    for line in details:
        console.print(line, highlight=False)

    def marked(order: tuple[str, ...]) -> str:
        return " > ".join(name if name in BACKENDS else f"[dim]{name} (not registered)[/]"
                          for name in order)

    console.print(f"impl='auto' on {device.type} tries, in order: "
                  + marked(device_auto_order(device.type)))
    if device.type in AUTO_ORDER_PADDED:
        console.print("  calls with key_lengths or a key-padding mask: "
                      + marked(device_auto_order(device.type, padded=True)))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kernel = chosen_kernel(device, dtype)
    if kernel is not None:
        console.print(f"  sdpa there is PyTorch's own pick: {kernel} for an unmasked "
                      f"{str(dtype).removeprefix('torch.')} call", highlight=False)

    try:
        from attnkit.variants import REGISTRY
    except ImportError as exc:
        console.print(f"variants: not importable ({exc})", highlight=False)
    else:
        console.print("variants: " + ", ".join(REGISTRY), highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
