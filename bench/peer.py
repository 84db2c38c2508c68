"""The peer (TRL) on the same workload in the same invocation: every bench script takes ``--peer-python``.

    python bench/reward.py --model tiny --fixtures /tmp/peer-bench/fixtures --peer-python ../peer-venv/bin/python

With ``--peer-python`` a bench script runs ours first, then the peer benchmark's script for the same stage
(``trl_reward.py`` here) with that interpreter on the same fixtures and settings, and prints one
``BENCH_JSON`` line: our figures, the peer's whole line under ``"peer"``, and ``"ratio"``: ours / peer for
the stage's throughput key and for peak RSS (each process's own high-water mark). The peer runs after ours
has finished, in a child process, so neither run shares the CPU with the other.

The peer's workload is fp32, and so is ours by default (``--precision fp32``); ``--precision auto`` runs
alignloop's default (bf16 autocast where models/precision.py says it pays on this CPU, as a user gets it)
and ``--peer-trl-defaults`` the peer's with TRL's defaults (bf16 autocast and gradient checkpointing), so
one invocation can set either side's defaults against the other's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PEER_BENCH = Path(os.environ.get("ALIGNLOOP_PEER_BENCH", Path(__file__).resolve().parents[2] / "shared" / "peer-bench"))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--peer-python", type=Path, default=None,
                    help="python of a venv with TRL (`make peer-venvs`; PPO needs the trl 1.12 one): also run the "
                         "peer's script for this stage and print its figures and the ratio beside ours")
    ap.add_argument("--peer-dir", type=Path, default=None,
                    help="peer benchmark folder whose scripts run, on its fixtures/ (default: the folder holding "
                         "--fixtures when it has the peer's scripts, else ../shared/peer-bench)")
    ap.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                    help="our train.mixed_precision (PPO / RLOO / GRPO: also generation.precision): fp32 as the "
                         "peer's workload; auto: alignloop's default on this machine")
    ap.add_argument("--peer-trl-defaults", action="store_true",
                    help="run the peer's script with --trl-defaults (TRL's bf16=True and gradient checkpointing)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="our train.gradient_checkpointing (what --peer-trl-defaults turns on for the peer)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="one more override of our stage's config (repeatable; recorded as \"set\"), e.g. "
                         "--set train.micro_batch_tokens=2048")


MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "auto": "auto"}


def training_overrides(a: argparse.Namespace, generation: bool = False) -> list[str]:
    """Our config overrides for ``--precision`` and ``--gradient-checkpointing``; ``generation``: also the
    sampler's precision (the RL stages): a forced precision decodes in it, auto leaves generation.precision at
    its own auto (sampling under the trainer's autocast)."""
    out = [f'train.mixed_precision="{MIXED_PRECISION[a.precision]}"',
           f"train.gradient_checkpointing={str(a.gradient_checkpointing).lower()}"]
    if generation and a.precision != "auto":
        out.append(f"generation.precision={a.precision}")
    return out + a.set


def ran_mixed_precision() -> str | None:
    """The mixed precision our stage's accelerator ran with in this process ("no" or "bf16"; auto resolved)."""
    # imported here, not at the top: bench scripts import peer before common has set up torch's threads
    from accelerate.state import AcceleratorState

    return AcceleratorState().mixed_precision if AcceleratorState._shared_state else None


def peer_folder(fixtures: Path) -> Path:
    """The peer benchmark folder that wrote ``fixtures`` (a working copy holding synth.py), else the shared one:
    where synth.py and common.py are imported from and the peer's scripts run."""
    parent = fixtures.resolve().parent
    return parent if (parent / "synth.py").exists() else PEER_BENCH


def same_fixtures(folder: Path, fixtures: Path) -> bool:
    """Whether the peer scripts in ``folder`` (which read ``folder/fixtures``) see our ``fixtures``: the same
    folder, or one whose manifest (parameter counts and SHA-256 of every file) is identical."""
    theirs = folder / "fixtures"
    if theirs.resolve() == fixtures.resolve():
        return True
    manifests = [f / "manifest.json" for f in (theirs, fixtures)]
    return all(m.is_file() for m in manifests) and manifests[0].read_bytes() == manifests[1].read_bytes()


def high_water_rss_mb(pid: int) -> float:
    """VmHWM of a running process (0 once it has exited): the peak RSS of its own address space."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0.0)


def run_peer(python: Path, folder: Path, script: str, args: list[str]) -> dict:
    """The object of the last ``BENCH_JSON`` line that ``python folder/script args`` prints (run in ``folder``,
    with BENCH_OUT unset: our line carries the peer's). Exits with the end of its output when it fails.

    Its ``peak_rss_mb`` is replaced by the peak we watch it reach: the peer reports its ``ru_maxrss``, which
    Linux carries over fork and exec, so a child of ours starts from our own peak and would report it. The
    high-water mark of the peer's address space (VmHWM, fresh at exec) is read every 50 ms until it exits."""
    cmd = [str(python), str(folder / script), *args]
    env = {k: v for k, v in os.environ.items() if k != "BENCH_OUT"}
    peak = 0.0
    with subprocess.Popen(cmd, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as proc:
        while True:
            peak = max(peak, high_water_rss_mb(proc.pid))
            try:
                stdout, stderr = proc.communicate(timeout=0.05)  # output is kept across timeouts
                break
            except subprocess.TimeoutExpired:
                continue
    lines = [ln for ln in stdout.splitlines() if ln.startswith("BENCH_JSON ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"the peer run failed (exit {proc.returncode}): {' '.join(cmd)}\n{(stdout + stderr)[-3000:]}")
    result = json.loads(lines[-1].removeprefix("BENCH_JSON "))
    result["peak_rss_mb_reported"] = result.get("peak_rss_mb")
    # None where the peer exited before a first reading (only a script far shorter than a benchmark can).
    result["peak_rss_mb"] = round(peak, 1) if peak > 0 else None
    return result


def measure(a: argparse.Namespace, fixtures: Path, script: str, args: list[str]) -> dict | None:
    """The peer's figures for this stage when ``--peer-python`` was given (None otherwise)."""
    if a.peer_python is None:
        return None
    folder = (a.peer_dir or peer_folder(fixtures)).resolve()
    if not (folder / script).is_file():
        sys.exit(f"--peer-dir {folder} has no {script}: pass the peer benchmark folder (a copy of ../shared/peer-bench)")
    if not same_fixtures(folder, fixtures):
        sys.exit(f"the peer scripts read {folder / 'fixtures'}, not the same fixtures as --fixtures {fixtures}: run "
                 f"make_fixtures.py there, or pass --fixtures {folder / 'fixtures'}")
    if a.peer_trl_defaults and "--trl-defaults" not in (folder / script).read_text():
        sys.exit(f"--peer-trl-defaults: the peer's {script} has no --trl-defaults option")
    return run_peer(a.peer_python, folder, script, [*args, *(["--trl-defaults"] if a.peer_trl_defaults else [])])


def lookup(result: dict, key: str) -> float:
    """``result[key]``, where a dotted key reaches into nested objects ("batched.tokens_per_sec")."""
    for part in key.split("."):
        result = result[part]
    return result


# Run in a child process, so that its matrices do not raise this process's peak RSS.
MATMUL_GFLOPS = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
out = {}
for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b  # warm-up: oneDNN builds its bf16 kernel at the first call
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    out[name] = round(2 * 2048 ** 3 / best / 1e9)
print(json.dumps(out))
"""


def host() -> dict:
    """What machine a line was measured on: the CPU's name, its cores, whether it has native bf16 (AVX-512 BF16,
    AMX) and what a 2048 x 2048 matmul reaches on this process's threads, fp32 and bf16 (GFLOP/s, best of 5):
    machines that report the same CPU name can differ by 2x and more (bench/README.md)."""
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in info.splitlines() if ":" in line)}
    flags = set(fields.get("flags", "").split())
    threads = torch.get_num_threads()
    out = subprocess.run([sys.executable, "-c", MATMUL_GFLOPS, str(threads)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    gflops = json.loads(out.stdout) if out.returncode == 0 else None
    return {"cpu": fields.get("model name"), "cores": os.cpu_count(), "threads": threads,
            "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}), "amx": "amx_tile" in flags,
            "matmul_gflops": gflops}


def compare(ours: dict, peer: dict | None, key: str, peak_rss_mb: float, peer_key: str | None = None) -> dict:
    """``ours`` with the ``"host"`` it ran on, ``"peer"`` (the peer's line) and ``"ratio"`` (ours / peer: the
    throughput ``key``, read as ``peer_key`` in the peer's line when it is named differently there, and peak
    RSS, ours being ``peak_rss_mb``); without a peer, ours and the host only."""
    ours = {**ours, "host": host()}
    if peer is None:
        return ours
    ratio = {key: round(lookup(ours, key) / lookup(peer, peer_key or key), 3),
             "peak_rss_mb": round(peak_rss_mb / peer["peak_rss_mb"], 3) if peer["peak_rss_mb"] else None}
    return {**ours, "peer": peer, "ratio": ratio}


def window_args(a: argparse.Namespace) -> list[str]:
    """Our ``--warmup-steps`` and ``--max-steps`` as the peer's training scripts take them (their default
    without ``--max-steps``, like ours, is one epoch)."""
    return ["--warmup-steps", str(a.warmup_steps), *(["--max-steps", str(a.max_steps)] if a.max_steps else [])]
