"""Every stage against the peer (TRL) in one command: runs each bench script with ``--peer-python`` one after
another and prints the markdown table of ours, the peer's, their ratio and both peak RSS figures.

    python bench/table.py --model tiny --fixtures /tmp/peer-bench/fixtures --peer-venvs ../peer-venv
    python bench/table.py --model 25m --fixtures /tmp/peer-bench/fixtures --peer-venvs ../peer-venv \\
        --precision auto --peer-trl-defaults --out bench/results-25m.jsonl
    python bench/table.py --render bench/results-25m.jsonl       # the table of lines collected before

``--peer-venvs DIR`` is what ``make peer-venvs PEER_VENVS=DIR`` builds: DIR (TRL 1.16, every stage but PPO)
and DIR-ppo (TRL 1.12, whose PPOTrainer the PPO row runs against). Generation is compared with
``model.generate`` in the same process (bench/generate.py), at the peer's fp32. Each stage's line is
appended to ``--out`` as it finishes, so an interrupted run keeps the stages it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# stage -> (script, its arguments, the peer venv's suffix, or None where the comparison runs in-process)
STAGES: dict[str, tuple[str, list[str], str | None]] = {
    "sft": ("sft.py", [], ""),
    "reward": ("reward.py", [], ""),
    "dpo": ("dpo.py", [], ""),
    "rloo": ("ppo.py", ["--algorithm", "rloo"], ""),
    "grpo": ("ppo.py", ["--algorithm", "grpo"], ""),
    "ppo": ("ppo.py", ["--algorithm", "ppo"], "-ppo"),
    "generate": ("generate.py", [], None),
}

LABELS = {
    "alignloop_sft": "SFT (TRL padding-free)",
    "alignloop_reward": "reward model (RewardTrainer)",
    "alignloop_dpo": "DPO, reference forward every step (DPOTrainer)",
    "alignloop_rloo": "RLOO, rule reward (RLOOTrainer)",
    "alignloop_grpo": "GRPO, rule reward (GRPOTrainer)",
    "alignloop_ppo": "PPO with reward model and critic (TRL 1.12 PPOTrainer)",
    "generate": "rollout generation (`model.generate`)",
}


def peer_python(venvs: Path, suffix: str) -> Path:
    """The interpreter of one of ``make peer-venvs PEER_VENVS=venvs``'s venvs (``venvs`` + ``suffix``)."""
    return Path(f"{venvs}{suffix}") / "bin" / "python"


def stage_command(stage: str, a: argparse.Namespace) -> list[str]:
    script, extra, venv_suffix = STAGES[stage]
    cmd = [sys.executable, str(BENCH / script), "--model", a.model, "--fixtures", str(a.fixtures), *extra,
           "--precision", a.precision]
    if venv_suffix is None:  # generation: ours against model.generate (fp32, as the peer's hf_generate.py)
        return cmd
    cmd += ["--peer-python", str(peer_python(a.peer_venvs, venv_suffix))]
    if a.peer_dir:
        cmd += ["--peer-dir", str(a.peer_dir)]
    if a.peer_trl_defaults and stage != "ppo":  # trl_ppo_legacy.py has no --trl-defaults
        cmd.append("--peer-trl-defaults")
    if a.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    return cmd


def precision_of(line: dict) -> str:
    """What a bench line ran in: bf16 or fp32 (the resolved mixed precision where it is recorded), "+ ckpt"
    with gradient checkpointing."""
    if "bf16" in line and line["bf16"] is not None:
        precision = "bf16" if line["bf16"] else "fp32"
    else:
        precision = line.get("precision") or "fp32"
    return f"{precision} + ckpt" if line.get("gradient_checkpointing") else precision


def row(line: dict) -> str:
    """One markdown row for a bench line (ours with its peer's, or generation with model.generate's)."""
    label = LABELS.get(line["bench"], line["bench"])
    if line["bench"] == "generate":
        ours, theirs = line["alignloop"]["new_tokens_per_sec"], line["model_generate"]["new_tokens_per_sec"]
        sampler = {"bfloat16": "bf16", "float32": "fp32"}.get(line.get("sampler_dtype"), line["precision"])
        prec = f"{sampler} / {line.get('model_generate_precision', 'fp32')}"
        label = label.replace(" (", f", batch {line['batch_size']}, {line['new_tokens_per_seq']} new tokens (")
        return (f"| {label} | {ours:,.0f} new tok/s | {theirs:,.0f} new tok/s | **{line['speedup']:.2f}x** | "
                f"{line['peak_rss_mb']:,.0f} (one process) | {prec} |")
    ratio = line.get("ratio")
    if not ratio:
        return f"| {label} | (no peer in this line) | | | | {precision_of(line)} |"
    key = next(k for k in ratio if k != "peak_rss_mb")
    peer = line["peer"]
    rss = ratio.get("peak_rss_mb")
    rss_cell = f"{line['peak_rss_mb']:,.0f} / {peer['peak_rss_mb']:,.0f} ({rss:.2f})" if rss else "-"
    unit = key.removesuffix("_per_sec").replace("tokens", "tok").replace("_", " ") + "/s"
    return (f"| {label} | {line[key]:,.1f} {unit} | {peer[key]:,.1f} {unit} | **{ratio[key]:.2f}x** | {rss_cell} | "
            f"{precision_of(line)} / {precision_of(peer)} |")


def render(lines: list[dict]) -> str:
    models = sorted({line.get("model", "?") for line in lines})
    head = (f"| stage ({', '.join(models)}) | alignloop | peer | ratio | peak RSS MB, ours / peer | precision, ours / "
            f"peer |\n| --- | --- | --- | --- | --- | --- |")
    return "\n".join([head, *(row(line) for line in lines), *host_lines(lines)])


def span(values: list[int]) -> str:
    """"lo-hi" of the values, or the one value they all have."""
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


def host_lines(lines: list[dict]) -> list[str]:
    """One line per machine the lines ran on, with the range of its matmul figures over the lines."""
    machines: dict[tuple, list[dict]] = {}
    for line in lines:
        h = line.get("host")
        if not h:
            continue
        figures = machines.setdefault((h["cpu"], h["cores"], h["threads"], h["native_bf16"], h["amx"]), [])
        if h.get("matmul_gflops"):
            figures.append(h["matmul_gflops"])
    out = []
    for (cpu, cores, threads, bf16, amx), gflops in machines.items():
        matmul = (f"{span([g['fp32'] for g in gflops])} GFLOP/s fp32, {span([g['bf16'] for g in gflops])} bf16"
                  if gflops else "not measured")
        out.append(f"\nHost: {cpu}, {threads} of {cores} cores, native bf16 {'yes' if bf16 else 'no'}"
                   f"{', AMX' if amx else ''}; 2048 x 2048 matmul {matmul}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "25m"), default="tiny")
    ap.add_argument("--fixtures", type=Path, help="the peer's make_fixtures.py output (in a copy of the peer folder)")
    ap.add_argument("--peer-venvs", type=Path, help="DIR of `make peer-venvs PEER_VENVS=DIR` (DIR and DIR-ppo)")
    ap.add_argument("--peer-dir", type=Path, help="the peer folder whose scripts run (bench/peer.py's default if unset)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    ap.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                    help="ours (fp32: the peer's workload; auto: alignloop's default on this machine)")
    ap.add_argument("--peer-trl-defaults", action="store_true",
                    help="the peer with TRL's defaults (bf16 autocast, gradient checkpointing; not for PPO)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="ours with train.gradient_checkpointing (the training stages; as TRL's defaults)")
    ap.add_argument("--out", type=Path, help="append every stage's BENCH_JSON line to this file")
    ap.add_argument("--render", type=Path, metavar="JSONL", help="only print the table of these collected lines")
    a = ap.parse_args()

    if a.render:
        lines = [json.loads(t) for t in a.render.read_text().splitlines() if t.strip()]
        print(render(lines))
        return
    if a.fixtures is None or a.peer_venvs is None:
        ap.error("--fixtures and --peer-venvs are needed to measure (or --render a collected file)")
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        ap.error(f"unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
    for suffix in {STAGES[s][2] for s in stages} - {None}:
        python = peer_python(a.peer_venvs, suffix)
        if not python.exists():
            ap.error(f"{python} does not exist: build the peer venvs with `make peer-venvs PEER_VENVS={a.peer_venvs}`")

    env = {k: v for k, v in os.environ.items() if k != "BENCH_OUT"}  # each line is written once, below
    lines = []
    for stage in stages:
        cmd = stage_command(stage, a)
        print(f"# {stage}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        found = [t for t in proc.stdout.splitlines() if t.startswith("BENCH_JSON ")]
        if proc.returncode != 0 or not found:
            sys.exit(f"{stage} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
        line = json.loads(found[-1].removeprefix("BENCH_JSON "))
        lines.append(line)
        print("BENCH_JSON " + json.dumps(line), flush=True)
        if a.out:
            with a.out.open("a") as fh:
                fh.write(json.dumps(line) + "\n")
    print(render(lines))


if __name__ == "__main__":
    main()
