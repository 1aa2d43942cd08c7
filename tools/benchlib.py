"""What the benchmark scripts in tools/ share: one measured step per fresh process, the machine line.

A step runs as its own process under a small parent (also fresh), which
reports the wall time and the peak resident memory of its child from
``getrusage(RUSAGE_CHILDREN)`` (``ru_maxrss``: anonymous memory and the pages
of memory-mapped files it touched). So each figure is that step alone, never
the bench script's own memory. Imported by the scripts as ``benchlib`` (they
run with tools/ first on ``sys.path``, as Python puts a script's folder there).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

_MEASURE = textwrap.dedent(
    """
    import resource, subprocess, sys, time
    start = time.perf_counter()
    done = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    sys.stdout.write(done.stdout)
    print(f"@@measured {done.returncode} {seconds:.4f} {peak_kb}")
    sys.stderr.write(done.stderr[-4000:] if done.returncode else "")
    """
)


@dataclass(frozen=True)
class Run:
    """One measured step: wall seconds, peak resident MB (2**20 bytes), and what it printed."""

    seconds: float
    peak_mb: float
    stdout: str = ""

    def payload(self) -> dict:
        """The last JSON object the step printed on a line of its own (``{}`` when none)."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        return {}


def measure(cmd: list[str], repeat: int = 1, ok: tuple[int, ...] = (0,), env: dict | None = None) -> Run:
    """``cmd`` in a fresh process ``repeat`` times; the fastest run (its own peak memory with it)."""
    best: Run | None = None
    for _ in range(repeat):
        done = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True,
                              env=env)
        head, _, tail = done.stdout.rpartition("@@measured ")
        code, seconds, peak_kb = tail.split()
        if int(code) not in ok:
            raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n{done.stderr}")
        run = Run(float(seconds), int(peak_kb) / 1024, head)
        best = run if best is None or run.seconds < best.seconds else best
    assert best is not None
    return best


def machine() -> str:
    """CPU, cores, memory and the versions the figures depend on."""
    cpu = platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")) / 2**20
    except (OSError, StopIteration):
        mem = float("nan")
    versions = []
    for name in ("onnx", "onnx_ir", "onnxruntime", "numpy"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GB RAM, Python {platform.python_version()}, " + ", ".join(versions)


def load_average() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def write_marked(path: Path, begin: str, end: str, text: str, heading: str) -> None:
    """Replace what lies between ``begin`` and ``end`` in the Markdown file ``path`` by ``text``
    (which holds both markers); a file without them gets ``heading`` and ``text`` appended."""
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        new = old.split(begin)[0] + text + old.split(end, 1)[1]
    else:
        new = f"{old.rstrip()}\n\n## {heading}\n\n{text}\n"
    path.write_text(new)


def publish(tool: str, argv: list[str] | None, args: Any, measure: Callable[[Any, Path], Any],
            render: Callable[[dict[str, Any]], str], markers: tuple[str, str], heading: str,
            **fields: Any) -> None:
    """What the bench tools share after parsing: ``measure(args, work)`` in ``--work`` (or a
    temporary folder), the report (command, machine, load, ``fields``, ``result``) written to
    ``--json``, rendered, printed, and put between ``markers`` of ``--out``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = measure(args, work)
    report = {"command": f"python tools/{tool} " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "load": load_average(), **fields, "result": result}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    text = render(report)
    print(text)
    if args.out:
        write_marked(args.out, *markers, text, heading)
