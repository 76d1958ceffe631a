"""Run a reference grid as parallel jobs, one process per (experiment, method, seed), and join them.

``benchmarks/reference.py`` runs its grid one run after another in one process. On a machine
with many cores, or a GPU that one small model leaves mostly idle, the runs can go side by
side: this script starts ``--jobs`` processes at a time, each one ``reference.py`` call for one
experiment, method and seed with its own ``--out`` folder (``OUT/parts/EXP__METHOD__seedS``,
log beside it), and when they are done joins every part under ``OUT/parts`` with
``reference.py --merge`` into ``OUT/reference.json`` and ``.md``, the files one ``reference.py``
process would have written (the merge refuses parts made at different commits or with
different settings, and says why). Runs already in a part are skipped (``--resume``), so a grid
cut short is completed by running the same command again, and a later call with other methods
or experiments into the same ``OUT`` adds to its tables.

``--stop-after S`` starts no new job once S seconds have passed and ``--kill-after K`` ends the
jobs still running at K seconds, so that a grid fits a time slot; the tables then hold the
runs that finished. Every process gets ``--threads`` torch threads: on the 2-core CPU of this
project keep ``--jobs`` x ``--threads`` <= 2 (two 2-thread torch processes on 2 cores thrash).

Run::

    python benchmarks/parallel_grid.py --experiments immune novel_immune \\
        --strategies canal naive joint --jobs 8 --threads 1 --device cuda --out OUT
    python benchmarks/parallel_grid.py --experiments novel_pancreas --strategies naive joint \\
        --jobs 2 --threads 1 --out OUT        # this CPU

Arguments after ``--`` go to every ``reference.py`` call (e.g. ``-- --epochs 3``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "reference.py"
SLOWEST_FIRST = ("joint", "canal", "replay", "distill", "naive", "celltypist")
"""Methods by their measured run time, slowest first (reference.py's cost paragraph)."""


def jobs(experiments: list[str], strategies: list[str], seeds: list[int]
         ) -> list[tuple[str, str, int]]:
    """Every (experiment, method, seed), experiment by experiment so that whole tables finish
    first, and the slowest method first within a seed."""
    slow_first = sorted(strategies, key=lambda m: SLOWEST_FIRST.index(m)
                        if m in SLOWEST_FIRST else len(SLOWEST_FIRST))
    return [(e, m, s) for e in experiments for s in seeds for m in slow_first]


def part_dir(out: Path, job: tuple[str, str, int]) -> Path:
    exp, method, seed = job
    return out / "parts" / f"{exp}__{method}__seed{seed}"


def command(job: tuple[str, str, int], *, out: Path, threads: int, device: str,
            extra: list[str]) -> list[str]:
    exp, method, seed = job
    return [sys.executable, str(REFERENCE), "--experiments", exp, "--strategies", method,
            "--seeds", str(seed), "--threads", str(threads), "--device", device,
            "--out", str(part_dir(out, job)), "--resume", *extra]


def run(todo: list[tuple[str, str, int]], *, out: Path, n_jobs: int, threads: int, device: str,
        extra: list[str], stop_after: float | None, kill_after: float | None,
        poll: float = 1.0) -> dict[tuple[str, str, int], int | None]:
    """Run the jobs, at most ``n_jobs`` at a time; return each job's exit code (``None``: not
    started or killed)."""
    t0 = time.monotonic()
    queue = list(todo)
    running: dict[tuple[str, str, int], tuple[subprocess.Popen, object]] = {}
    codes: dict[tuple[str, str, int], int | None] = dict.fromkeys(todo)
    while queue or running:
        elapsed = time.monotonic() - t0
        for job, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                codes[job] = proc.returncode
                log.close()
                del running[job]
                print(f"[{elapsed / 60:5.1f} min] done {' '.join(map(str, job))}: exit "
                      f"{proc.returncode}", flush=True)
            elif kill_after is not None and elapsed > kill_after:
                proc.terminate()
                proc.wait()
                log.close()
                del running[job]
                print(f"[{elapsed / 60:5.1f} min] killed {' '.join(map(str, job))} "
                      "(--kill-after)", flush=True)
        if stop_after is not None and elapsed > stop_after and queue:
            print(f"[{elapsed / 60:5.1f} min] --stop-after: {len(queue)} job(s) not started",
                  flush=True)
            queue = []
        while queue and len(running) < n_jobs:
            job = queue.pop(0)
            part = part_dir(out, job)
            part.mkdir(parents=True, exist_ok=True)
            log = open(part / "log.txt", "a")  # noqa: SIM115 (closed when the job ends)
            proc = subprocess.Popen(command(job, out=out, threads=threads, device=device,
                                            extra=extra),
                                    stdout=log, stderr=subprocess.STDOUT, cwd=HERE.parent)
            running[job] = (proc, log)
            print(f"[{elapsed / 60:5.1f} min] start {' '.join(map(str, job))}", flush=True)
        if queue or running:
            time.sleep(poll)
    return codes


def merge(out: Path) -> bool:
    """Join every finished part under ``OUT/parts`` (also those of earlier calls into the same
    ``OUT``) into ``OUT/reference.json`` and ``.md``, one section per experiment, as one
    ``reference.py`` process would write them. False when there is none or the merge refuses."""
    parts = sorted(p for p in (out / "parts").glob("*__*__seed*")
                   if (p / "reference.json").exists())
    if not parts:
        print("no finished part to merge", flush=True)
        return False
    if len(parts) == 1:  # --merge takes two or more: the one part is the table
        for name in ("reference.json", "reference.md"):
            (out / name).write_bytes((parts[0] / name).read_bytes())
        return True
    done = subprocess.run([sys.executable, str(REFERENCE), "--merge", *map(str, parts),
                           "--out", str(out)], cwd=HERE.parent)
    return done.returncode == 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiments", nargs="+", required=True)
    p.add_argument("--strategies", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="processes at a time (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu", help="canal's device (CellTypist: always CPU)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--stop-after", type=float, default=None, metavar="S",
                   help="start no new job after S seconds")
    p.add_argument("--kill-after", type=float, default=None, metavar="K",
                   help="end the jobs still running at K seconds")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be at least 1")
    todo = jobs(args.experiments, args.strategies, args.seeds)
    print(f"{len(todo)} jobs, {args.jobs} at a time, {args.threads} thread(s) each, device "
          f"{args.device}", flush=True)
    codes = run(todo, out=args.out, n_jobs=args.jobs, threads=args.threads, device=args.device,
                extra=extra, stop_after=args.stop_after, kill_after=args.kill_after)
    merged = merge(args.out)
    failed = [j for j, c in codes.items() if c not in (0, None)]
    missing = [j for j, c in codes.items() if c is None]
    for label, group in (("failed", failed), ("not run or killed", missing)):
        if group:
            print(f"{label}: " + "; ".join(" ".join(map(str, j)) for j in group)
                  + f" (logs under {args.out / 'parts'})", flush=True)
    if merged:
        print(f"merged: {args.out / 'reference.json'}, {args.out / 'reference.md'}", flush=True)
    return 1 if failed or missing or not merged else 0


if __name__ == "__main__":
    sys.exit(main())
