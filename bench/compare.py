"""Regression guard: the queue benchmark of this work tree against another git revision.

Usage::

    python bench/compare.py REV [--only a,b,c,d,e] [--runs N] [--smoke] [--json out.json]
                                [--reuse-venv] [--use-database-url] [--quiet-wait SECONDS]

``REV`` is any git revision (``HEAD~1``, a sha, a branch). It is checked out with ``git
worktree add --detach`` into a temporary directory and gets a venv of its own (``python -m
venv`` + ``pip install -e``); with ``--reuse-venv`` it runs on this interpreter with
``PYTHONPATH`` pointing at its checkout instead (for when the dependencies are the same).

Both sides are measured by the same code, this work tree's ``bench/bench_queue.py`` (copied
once at the start), on the same Postgres server (one ``TemporaryCluster`` with default
durability for the whole comparison, or the server of ``DATABASE_URL`` with
``--use-database-url``), alternating run by run: new, old, new, old ... Each run is a
subprocess ``bench_queue.py --json``; before it starts the benchmark, that subprocess checks
which ``listener`` package it imported and refuses to run one from the wrong tree, so a
comparison can never measure the same code twice.

Printed per figure: the median of the new runs, the median of the old runs, new / old, and
which side is better and by how much (the direction of each figure: ``Figure.better`` for
figures with a target; for informational ones, lower for ``ms``, ``s`` and ``MB``, higher
otherwise). Exit status: 0 when every run completed, 1 when a scenario failed in a run, 2
when the comparison could not be set up (unknown revision, venv, wrong ``listener``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import asyncpg
from bench_queue import DEFAULT_SCENARIOS, SCENARIOS, bench_server

from listener.ops.logs import configure_logging

ROOT = Path(__file__).resolve().parents[1]
BENCH_QUEUE = ROOT / "bench" / "bench_queue.py"

DEFAULT_RUNS = 3
# Informational figures (no target) carry the default ``better="higher"`` whatever their
# unit; for these units lower is better.
LOWER_IS_BETTER_UNITS = frozenset({"ms", "s", "MB", "KiB", "kB"})
# A run that has not finished after this long is stopped (seconds; the default sizes take
# 1 to 2.5 minutes for all five scenarios).
RUN_TIMEOUT_S = 1800.0
# After SIGINT, how long a run may take to drop its databases and exit (seconds).
STOP_GRACE_S = 30.0
EXIT_SETUP = 2
# The exit status of the runner when it imported ``listener`` from the wrong tree.
EXIT_WRONG_LISTENER = 3

# Runs bench_queue.py in the child, after checking which listener it imports. Written next to
# the copy of bench_queue.py, so ``sys.path`` is what it is for ``python bench_queue.py``.
RUNNER = '''"""Written by bench/compare.py: check the listener imported, then run bench_queue."""

import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    import listener

    imported = Path(listener.__file__).resolve().parent
    expected = Path(os.environ["BENCH_COMPARE_TREE"]).resolve()
    Path(os.environ["BENCH_COMPARE_IMPORTED"]).write_text(json.dumps({"listener": str(imported)}))
    if not imported.is_relative_to(expected):
        print(f"listener imported from {imported}, not from {expected}", file=sys.stderr)
        sys.exit(WRONG_LISTENER)
    import bench_queue

    sys.exit(bench_queue.main(sys.argv[1:]))
'''.replace("WRONG_LISTENER", str(EXIT_WRONG_LISTENER))

_URL_PASSWORD = re.compile(r"(\w+://[^:/@\s]*:)[^@\s]*@")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)\S+", re.IGNORECASE)


class SetupError(Exception):
    """The comparison cannot run (bad revision, venv, a side importing the wrong package)."""


def redact(text: str, secrets: list[str]) -> str:
    """``text`` with every string of ``secrets`` and every password in a URL or a
    ``password=`` pair replaced by ``***``; for anything a child process printed."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _URL_PASSWORD.sub(r"\1***@", text)
    return _KV_PASSWORD.sub(r"\1***", text)


def direction(figure: dict[str, Any]) -> Literal["higher", "lower"]:
    """Whether a higher or a lower value of ``figure`` (a bench_queue JSON figure) is better.

    A figure with a target says so itself; an informational one keeps the default
    ``higher`` whatever its unit, so its unit decides (``LOWER_IS_BETTER_UNITS``).
    """
    if figure.get("target") is None and figure.get("unit") in LOWER_IS_BETTER_UNITS:
        return "lower"
    return "lower" if figure.get("better") == "lower" else "higher"


def better_side(ratio: float | None, wanted: str) -> tuple[str, float | None]:
    """``("new" | "old" | "same", difference in %)`` for ``ratio`` = new / old.

    The difference is ``|new / old - 1|`` in percent; "same" below 0.05%. ``("", None)``
    when there is no ratio.
    """
    if ratio is None:
        return "", None
    diff = abs(ratio - 1) * 100
    if diff < 0.05:
        return "same", diff
    new_higher = ratio > 1
    return ("new" if new_higher == (wanted == "higher") else "old"), diff


# -- git and the old tree -----------------------------------------------------------------


def git(*args: str, cwd: Path = ROOT) -> str:
    """``git args`` in ``cwd``; its stdout, stripped.

    Raises:
        SetupError: git failed.
    """
    proc = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=120
    )
    if proc.returncode != 0:
        raise SetupError(f"git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


@contextlib.contextmanager
def checkout(sha: str, directory: Path) -> Iterator[Path]:
    """``sha`` checked out (detached) as a git worktree in ``directory``/old; removed on the
    way out, whatever happens (``git worktree remove --force``, then ``prune``)."""
    tree = directory / "old"
    git("worktree", "add", "--detach", str(tree), sha)
    try:
        yield tree
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(tree)],
            cwd=ROOT,
            capture_output=True,
            check=False,
            timeout=120,
        )
        subprocess.run(
            ["git", "worktree", "prune"], cwd=ROOT, capture_output=True, check=False, timeout=120
        )


def make_venv(tree: Path, directory: Path) -> Path:
    """A venv in ``directory``/venv with ``tree`` installed editable, its dependencies
    included (pip's cache and the local wheels make that quick); returns its interpreter.

    Raises:
        SetupError: venv or pip failed.
    """
    venv = directory / "venv"
    python = venv / "bin" / "python"
    for cmd in (
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", "-e", str(tree)],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1200)
        if proc.returncode != 0:
            raise SetupError(f"{' '.join(cmd[-3:])} failed:\n{redact(proc.stderr[-3000:], [])}")
    return python


# -- one side, one run --------------------------------------------------------------------


@dataclass
class Side:
    """One of the two trees being compared.

    Attributes:
        key: ``new`` (this work tree) or ``old`` (REV).
        tree: its checkout, the directory ``listener`` must be imported from.
        python: the interpreter its runs use.
        describe: what it is, for the header.
        listener: the package directory its interpreter imports (set by ``probe``).
    """

    key: str
    tree: Path
    python: Path
    describe: str
    info: dict[str, Any] = field(default_factory=dict)
    listener: str = ""

    def env(self, base: dict[str, str], admin_dsn: str) -> dict[str, str]:
        """The child's environment: ``base`` without ``LISTENER_*``, ``PYTHONPATH`` led by
        the tree, ``DATABASE_URL`` the shared server."""
        env = {k: v for k, v in base.items() if not k.startswith("LISTENER_")}
        env["PYTHONPATH"] = os.pathsep.join(
            [str(self.tree), *filter(None, [base.get("PYTHONPATH")])]
        )
        env["DATABASE_URL"] = admin_dsn
        env["BENCH_COMPARE_TREE"] = str(self.tree)
        return env


@dataclass
class Run:
    """What one bench_queue.py run of one side produced.

    Attributes:
        figures: the JSON's figures (value None where a scenario failed).
        errors: scenario -> error text (redacted); ``*`` when the run itself failed.
        elapsed_s: wall time of the subprocess, seconds.
    """

    side: str
    index: int
    exit_code: int
    elapsed_s: float
    listener: str = ""
    figures: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)


def probe(side: Side, workdir: Path, env: dict[str, str]) -> str:
    """The ``listener`` package directory ``side``'s interpreter imports, run as the
    benchmark runs (same environment, ``sys.path[0]`` a directory without a ``listener``).

    Raises:
        SetupError: it imports ``listener`` from outside ``side.tree``, or not at all.
    """
    proc = subprocess.run(
        [
            str(side.python),
            "-c",
            "import listener, pathlib; print(pathlib.Path(listener.__file__).resolve().parent)",
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if proc.returncode != 0:
        raise SetupError(f"{side.key}: cannot import listener: {redact(proc.stderr[-2000:], [])}")
    imported = Path(proc.stdout.strip())
    if not imported.is_relative_to(side.tree.resolve()):
        raise SetupError(f"{side.key}: listener imported from {imported}, not from {side.tree}")
    return str(imported)


def run_side(
    side: Side,
    index: int,
    workdir: Path,
    env: dict[str, str],
    args: list[str],
    secrets: list[str],
) -> Run:
    """One ``bench_queue.py`` run of ``side`` (``args`` passed on); its figures from the JSON.

    The child runs in its own session, so Ctrl-C reaches only this script, which then sends
    the child one SIGINT and gives it ``STOP_GRACE_S`` to drop its databases.

    Raises:
        SetupError: the child imported ``listener`` from the wrong tree.
    """
    out = workdir / f"{side.key}-{index}.json"
    imported = workdir / f"{side.key}-{index}.imported.json"
    log_path = workdir / f"{side.key}-{index}.log"
    env = env | {"BENCH_COMPARE_IMPORTED": str(imported)}
    cmd = [str(side.python), str(workdir / "run_bench.py"), *args, "--json", str(out)]
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=RUN_TIMEOUT_S)
        except BaseException:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    run = Run(side.key, index, code, time.monotonic() - started)
    tail = redact(log_path.read_text(errors="replace")[-2000:], secrets)
    if imported.exists():
        run.listener = json.loads(imported.read_text())["listener"]
    if code == EXIT_WRONG_LISTENER:
        raise SetupError(f"{side.key}: the benchmark imported the wrong listener:\n{tail}")
    if run.listener and run.listener != side.listener:
        raise SetupError(f"{side.key}: listener imported from {run.listener}, not {side.listener}")
    if not out.exists():
        run.errors["*"] = f"exit {code}, no JSON written:\n{tail}"
        return run
    doc = json.loads(out.read_text())
    run.figures = doc["figures"]
    run.errors = {k: redact(v, secrets) for k, v in doc["errors"].items()}
    run.load = doc.get("cpu_load_pct", {})
    if code != 0 and not run.errors:
        run.errors["*"] = f"exit {code}:\n{tail}"
    return run


# -- the comparison -----------------------------------------------------------------------


@dataclass
class Row:
    """One figure compared: every run's value per side, the medians and new / old."""

    scenario: str
    name: str
    unit: str
    better: Literal["higher", "lower"]
    new: list[float] = field(default_factory=list)
    old: list[float] = field(default_factory=list)

    @property
    def new_median(self) -> float | None:
        return statistics.median(self.new) if self.new else None

    @property
    def old_median(self) -> float | None:
        return statistics.median(self.old) if self.old else None

    @property
    def ratio(self) -> float | None:
        """Median new / median old; None when a side has no value or old is 0."""
        new, old = self.new_median, self.old_median
        if new is None or old is None or old == 0:
            return None
        return new / old

    def spread_pct(self, side: str) -> float | None:
        """(max - min) / median of ``side``'s values, in percent: the runs' own noise."""
        values: list[float] = getattr(self, side)
        median = statistics.median(values) if values else 0
        if len(values) < 2 or median == 0:
            return None
        return (max(values) - min(values)) / abs(median) * 100

    def as_json(self) -> dict[str, Any]:
        winner, diff = better_side(self.ratio, self.better)
        return {
            "scenario": self.scenario,
            "name": self.name.strip(),
            "unit": self.unit,
            "direction": self.better,
            "new": self.new,
            "old": self.old,
            "new_median": self.new_median,
            "old_median": self.old_median,
            "ratio": self.ratio,
            "better": winner or None,
            "difference_pct": diff,
            "spread_pct": {"new": self.spread_pct("new"), "old": self.spread_pct("old")},
        }


def collect(runs: list[Run]) -> list[Row]:
    """The figures of every run, by (scenario, name), in the order they first appear."""
    rows: dict[tuple[str, str], Row] = {}
    for run in runs:
        for fig in run.figures:
            key = (fig["scenario"], fig["name"])
            if key not in rows:
                if fig["value"] is None and not fig["unit"]:
                    continue  # the placeholder of a failed scenario
                rows[key] = Row(fig["scenario"], fig["name"], fig["unit"], direction(fig))
            if fig["value"] is not None:
                getattr(rows[key], run.side).append(float(fig["value"]))
    return sorted(rows.values(), key=lambda r: r.scenario)


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.{2 if abs(value) < 10 else 1 if abs(value) < 1000 else 0}f}"


def print_rows(rows: list[Row]) -> None:
    """The comparison table: medians, new / old, and which side is better by how much."""
    width = max([len(r.name) for r in rows] + [6])
    header = (
        f"{'':2} {'figure':{width}} {'unit':7} {'direction':>9} {'new':>10} {'old':>10} "
        f"{'new/old':>8}  {'better':10}  spread new/old"
    )
    print(
        "medians over the runs; direction: which way the figure is better; better: the side "
        "whose median is better, by |new/old - 1|; spread: (max - min) / median of each "
        "side's runs"
    )
    print(header)
    print("-" * (len(header) + 12))
    for r in rows:
        winner, diff = better_side(r.ratio, r.better)
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
        verdict = "-" if diff is None else winner if winner == "same" else f"{winner} {diff:.1f}%"
        print(
            f"{r.scenario:2} {r.name:{width}} {r.unit:7} {r.better:>9} "
            f"{fmt(r.new_median):>10} {fmt(r.old_median):>10} {ratio:>8}  {verdict:10}  "
            f"{_pct(r.spread_pct('new'))}/{_pct(r.spread_pct('old'))}"
        )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


async def server_version(dsn: str) -> str:
    """``SHOW server_version`` of the server at ``dsn``."""
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the git revision to compare with (HEAD~1, a sha, a branch)")
    parser.add_argument(
        "--only",
        default=DEFAULT_SCENARIOS,
        help=f"comma-separated scenarios of {','.join(SCENARIOS)} (default {DEFAULT_SCENARIOS}; "
        "f and g take minutes per run)",
    )
    parser.add_argument(
        "--runs", type=int, default=DEFAULT_RUNS, help=f"runs per side (default {DEFAULT_RUNS})"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="bench_queue's tiny sizes, one run per side"
    )
    parser.add_argument("--json", type=Path, help="also write the comparison to this file")
    parser.add_argument(
        "--reuse-venv",
        action="store_true",
        help="run REV on this interpreter with PYTHONPATH at its checkout instead of a venv of "
        "its own (only when its dependencies are the same)",
    )
    parser.add_argument(
        "--use-database-url",
        action="store_true",
        help="both sides on the server of DATABASE_URL (a role that may CREATE DATABASE) "
        "instead of one temporary cluster",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="passed to bench_queue.py",
    )
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    if args.smoke:
        args.runs = 1
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def compare(args: argparse.Namespace, workdir: Path) -> int:
    """Set up both sides and the server, run them alternately, print (and write) the table."""
    try:
        sha = git("rev-parse", "--verify", "--quiet", f"{args.rev}^{{commit}}")
    except SetupError:
        raise SetupError(f"{args.rev!r} is not a commit of this repository") from None
    head = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain"))
    short = git("rev-parse", "--short", sha)
    head_short = git("rev-parse", "--short", head)
    print(f"new: work tree {ROOT}, HEAD {head_short}{' (dirty)' if dirty else ''}")
    print(f"old: {args.rev} = {short}" + (" (same commit as HEAD)" if sha == head else ""))
    bench_dir = workdir / "bench"
    bench_dir.mkdir()
    shutil.copy2(BENCH_QUEUE, bench_dir / "bench_queue.py")
    (bench_dir / "run_bench.py").write_text(RUNNER)
    with checkout(sha, workdir) as old_tree:
        if args.reuse_venv:
            old_python = Path(sys.executable)
            how = "this interpreter, PYTHONPATH at its checkout"
        else:
            print("old: creating its venv (pip install -e) ...", flush=True)
            began = time.monotonic()
            old_python = make_venv(old_tree, workdir)
            how = f"own venv, installed in {time.monotonic() - began:.0f} s"
        new = Side("new", ROOT, Path(sys.executable), "work tree")
        old = Side("old", old_tree, old_python, how)
        new.info = {"tree": str(ROOT), "head": head, "dirty": dirty}
        old.info = {"rev": args.rev, "sha": sha, "venv": "reused" if args.reuse_venv else "own"}
        with bench_server(args.use_database_url) as (admin_dsn, cluster):
            secrets = [admin_dsn]
            version = asyncio.run(server_version(admin_dsn))
            where = "temporary cluster, default durability" if cluster else "DATABASE_URL"
            print(f"server: PostgreSQL {version} ({where}), shared by both sides")
            envs = {s.key: s.env(dict(os.environ), admin_dsn) for s in (new, old)}
            for side in (new, old):
                side.listener = probe(side, bench_dir, envs[side.key])
                print(f"{side.key}: imports {side.listener} ({side.describe})")
            if new.listener == old.listener:
                raise SetupError(f"both sides import {new.listener}")
            bench_args = ["--only", ",".join(args.only), "--use-database-url"]
            if args.smoke:
                bench_args.append("--smoke")
            if args.quiet_wait is not None:
                bench_args += ["--quiet-wait", str(args.quiet_wait)]
            smoke = "; smoke sizes (figures mean nothing)" if args.smoke else ""
            print(
                f"runs: {args.runs} per side, alternating new/old; "
                f"scenarios {','.join(args.only)}{smoke}"
            )
            print(flush=True)
            runs: list[Run] = []
            for index in range(1, args.runs + 1):
                for side in (new, old):
                    print(f"run {index}/{args.runs} {side.key} ...", end=" ", flush=True)
                    run = run_side(side, index, bench_dir, envs[side.key], bench_args, secrets)
                    runs.append(run)
                    failed = ", ".join(sorted(run.errors)) or "none"
                    print(f"{run.elapsed_s:.0f} s, exit {run.exit_code}, errors: {failed}")
    rows = collect(runs)
    print()
    print_rows(rows)
    errors = [(run.side, run.index, key, text) for run in runs for key, text in run.errors.items()]
    if errors:
        print()
        for side_key, index, key, text in errors:
            print(f"({key}) ERROR in {side_key} run {index}: {text}")
    if args.json:
        doc = {
            "new": new.info | {"listener": new.listener},
            "old": old.info | {"listener": old.listener},
            "server_version": version,
            "runs": args.runs,
            "smoke": args.smoke,
            "only": args.only,
            "figures": [r.as_json() for r in rows],
            "errors": [{"side": s, "run": i, "scenario": k, "error": t} for s, i, k, t in errors],
            "run_log": [
                {
                    "side": r.side,
                    "run": r.index,
                    "exit_code": r.exit_code,
                    "elapsed_s": round(r.elapsed_s, 1),
                    "listener": r.listener,
                    "cpu_load_pct": r.load,
                }
                for r in runs
            ],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("WARNING")
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="listener-compare-"))
    try:
        return compare(args, workdir)
    except SetupError as error:
        print(f"\ncompare: {error}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        print("\ncompare: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
