"""bench/peer.py: a bench script with ``--peer-python`` runs the peer's script for its stage after ours and puts
the peer's figures and the ratios into its one BENCH_JSON line (a fake peer script here: no TRL in the suite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import peer  # noqa: E402  (bench/ is a folder of scripts, not a package)
import table  # noqa: E402

# A peer script that prints what it was asked (arguments, folder, whether BENCH_OUT reached it) with fixed figures.
# It lives a moment, as a real peer does for minutes: its peak RSS is read while it runs (every 50 ms).
FAKE_PEER = """
import json, os, sys, time
time.sleep(0.2)
print("loading ...")
print("BENCH_JSON " + json.dumps({"bench": "fake", "pairs_per_sec": 4.0, "peak_rss_mb": 800.0,
                                  "argv": sys.argv[1:], "cwd": os.getcwd(), "bench_out": os.environ.get("BENCH_OUT")}))
"""


def fake_peer_folder(root: Path, script: str, fixtures: Path, body: str = FAKE_PEER) -> Path:
    folder = root / "peer-bench"
    folder.mkdir()
    (folder / script).write_text(body)
    (folder / "fixtures").symlink_to(fixtures, target_is_directory=True)
    return folder


def test_run_peer_reads_its_json_line_in_its_folder_without_bench_out(tmp_path, monkeypatch):
    folder = fake_peer_folder(tmp_path, "trl_reward.py", tmp_path)
    monkeypatch.setenv("BENCH_OUT", str(tmp_path / "out.jsonl"))
    res = peer.run_peer(Path(sys.executable), folder, "trl_reward.py", ["--model", "tiny"])
    assert res["argv"] == ["--model", "tiny"] and res["pairs_per_sec"] == 4.0 and res["peak_rss_mb_reported"] == 800.0
    assert Path(res["cwd"]).resolve() == folder.resolve()
    assert res["bench_out"] is None  # our line carries the peer's: the peer must not append its own


def test_the_peers_peak_rss_is_its_own_not_the_one_it_inherits_from_us(tmp_path):
    """Linux carries ru_maxrss over fork and exec: a child of a big process reports the parent's peak. The
    peer's peak is measured on its own address space instead."""
    hog = bytearray(300 * 2**20)  # our peak: at least 300 MB
    hog[:: 4096] = b"x" * len(hog[:: 4096])  # touch every page
    body = FAKE_PEER.replace("import json, os, sys, time", "import json, os, sys, resource, time\nnow = bytearray(60 * 2**20)"
                             "\nnow[::4096] = b'x' * len(now[::4096])\ntime.sleep(0.3)").replace(
        '"peak_rss_mb": 800.0', '"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024')
    folder = fake_peer_folder(tmp_path, "trl_reward.py", tmp_path, body)
    res = peer.run_peer(Path(sys.executable), folder, "trl_reward.py", [])
    del hog
    assert res["peak_rss_mb_reported"] >= 300  # what the peer itself sees: our peak
    assert 60 <= res["peak_rss_mb"] < 200  # its own 60 MB and the interpreter, not ours


def test_a_failing_peer_exits_with_its_output(tmp_path):
    folder = fake_peer_folder(tmp_path, "trl_dpo.py", tmp_path, "import sys\nprint('no trl here')\nsys.exit(3)\n")
    with pytest.raises(SystemExit, match=r"(?s)exit 3.*no trl here"):
        peer.run_peer(Path(sys.executable), folder, "trl_dpo.py", [])


def test_compare_gives_ours_over_peer_for_throughput_and_peak_rss(monkeypatch):
    monkeypatch.setattr(peer, "host", lambda: {"cpu": "a CPU"})
    ours = {"bench": "ours", "pairs_per_sec": 6.0}
    theirs = {"bench": "peer", "pairs_per_sec": 4.0, "peak_rss_mb": 800.0}
    out = peer.compare(ours, theirs, "pairs_per_sec", 720.0)
    assert out["ratio"] == {"pairs_per_sec": 1.5, "peak_rss_mb": 0.9}
    assert out["peer"] == theirs and out["pairs_per_sec"] == 6.0 and out["host"] == {"cpu": "a CPU"}
    assert peer.compare(ours, None, "pairs_per_sec", 720.0) == {**ours, "host": {"cpu": "a CPU"}}
    # a nested key of ours, named differently in the peer's line (serve against model.generate)
    nested = peer.compare({"batched": {"tokens_per_sec": 300.0}}, {"new_tokens_per_sec": 120.0, "peak_rss_mb": 500.0},
                          "batched.tokens_per_sec", 600.0, "new_tokens_per_sec")
    assert nested["ratio"] == {"batched.tokens_per_sec": 2.5, "peak_rss_mb": 1.2}


def test_the_peer_must_read_the_same_fixtures(tmp_path):
    ours, other = tmp_path / "ours", tmp_path / "other"
    for folder, text in ((ours, '{"a": 1}'), (other, '{"a": 2}')):
        folder.mkdir()
        (folder / "manifest.json").write_text(text)
    folder = fake_peer_folder(tmp_path, "trl_reward.py", other)
    args = Namespace(peer_python=Path(sys.executable), peer_dir=folder, peer_trl_defaults=False)
    with pytest.raises(SystemExit, match="not the same fixtures"):
        peer.measure(args, ours, "trl_reward.py", [])
    (other / "manifest.json").write_text('{"a": 1}')  # a copy made by the same make_fixtures.py: the same
    assert peer.measure(args, ours, "trl_reward.py", [])["pairs_per_sec"] == 4.0
    assert peer.measure(Namespace(peer_python=None, peer_dir=None), ours, "trl_reward.py", []) is None


def test_peer_trl_defaults_reach_a_peer_script_that_takes_them_and_are_refused_by_one_that_does_not(tmp_path):
    takes = FAKE_PEER + '\n# ap.add_argument("--trl-defaults", action="store_true")\n'
    folder = fake_peer_folder(tmp_path, "trl_reward.py", tmp_path, takes)
    (folder / "trl_ppo_legacy.py").write_text(FAKE_PEER)
    args = Namespace(peer_python=Path(sys.executable), peer_dir=folder, peer_trl_defaults=True)
    assert peer.measure(args, tmp_path, "trl_reward.py", ["--model", "tiny"])["argv"] == ["--model", "tiny",
                                                                                           "--trl-defaults"]
    with pytest.raises(SystemExit, match="trl_ppo_legacy.py has no --trl-defaults"):
        peer.measure(args, tmp_path, "trl_ppo_legacy.py", [])


def test_training_overrides_keep_the_peers_fp32_and_no_checkpointing_unless_asked():
    def overrides(precision, generation=False, checkpointing=False, extra=()):
        return peer.training_overrides(Namespace(precision=precision, gradient_checkpointing=checkpointing,
                                                 set=list(extra)), generation)

    off = "train.gradient_checkpointing=false"
    assert overrides("fp32") == ['train.mixed_precision="no"', off]
    assert overrides("fp32", generation=True) == ['train.mixed_precision="no"', off, "generation.precision=fp32"]
    assert overrides("bf16", generation=True) == ['train.mixed_precision="bf16"', off, "generation.precision=bf16"]
    # auto: alignloop's own choice for both (the sampler then decodes under the trainer's autocast)
    assert overrides("auto", generation=True) == ['train.mixed_precision="auto"', off]
    assert overrides("auto", checkpointing=True) == ['train.mixed_precision="auto"', "train.gradient_checkpointing=true"]
    # --set: passed on after the bench's own, in order
    assert overrides("fp32", extra=["train.micro_batch_tokens=1024"]) == [
        'train.mixed_precision="no"', off, "train.micro_batch_tokens=1024"]


def test_host_names_the_cpu_and_measures_its_matmuls():
    h = peer.host()
    assert h["cores"] >= 1 and h["threads"] >= 1 and isinstance(h["native_bf16"], bool)
    assert h["matmul_gflops"]["fp32"] > 0 and h["matmul_gflops"]["bf16"] > 0


def test_reward_bench_runs_the_peer_on_its_settings_and_prints_one_line(peer_bench_fixtures, tmp_path):
    folder = fake_peer_folder(tmp_path, "trl_reward.py", peer_bench_fixtures)
    out_file = tmp_path / "bench.jsonl"
    out = subprocess.run([sys.executable, str(REPO / "bench" / "reward.py"), "--model", "tiny", "--fixtures",
                          str(peer_bench_fixtures), "--n-pairs", "48", "--max-steps", "5", "--peer-python",
                          sys.executable, "--peer-dir", str(folder)],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, BENCH_OUT=str(out_file)))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
    assert len(lines) == 1 and len(out_file.read_text().splitlines()) == 1
    res = json.loads(lines[0].removeprefix("BENCH_JSON "))
    assert res["bench"] == "alignloop_reward" and res["peer"]["bench"] == "fake"
    assert res["precision"] == "fp32" and res["bf16"] is False  # the peer's fp32 workload by default
    assert res["peer"]["argv"] == ["--model", "tiny", "--n-pairs", "48", "--batch-size", "8", "--warmup-steps", "3",
                                   "--max-steps", "5"]
    assert res["ratio"]["pairs_per_sec"] == pytest.approx(res["pairs_per_sec"] / 4.0, abs=2e-3)
    assert 0 < res["peer"]["peak_rss_mb"] < res["peak_rss_mb"]  # a 20-line script against a training run
    assert res["ratio"]["peak_rss_mb"] == pytest.approx(res["peak_rss_mb"] / res["peer"]["peak_rss_mb"], rel=2e-3)


def test_the_table_runs_ppo_against_the_trl_1_12_venv_and_every_other_stage_against_the_main_one(tmp_path):
    a = Namespace(model="tiny", fixtures=tmp_path / "fixtures", precision="auto", peer_venvs=tmp_path / "venv",
                  peer_dir=None, peer_trl_defaults=True, gradient_checkpointing=True)
    ppo, rloo, gen = (table.stage_command(s, a) for s in ("ppo", "rloo", "generate"))
    assert ppo[ppo.index("--peer-python") + 1] == str(tmp_path / "venv-ppo" / "bin" / "python")
    assert "--peer-trl-defaults" not in ppo  # trl_ppo_legacy.py has no --trl-defaults
    assert rloo[rloo.index("--peer-python") + 1] == str(tmp_path / "venv" / "bin" / "python")
    assert rloo[rloo.index("--algorithm") + 1] == "rloo" and "--peer-trl-defaults" in rloo
    assert "--peer-python" not in gen and gen[gen.index("--precision") + 1] == "auto"
    assert "--gradient-checkpointing" in ppo and "--gradient-checkpointing" in rloo  # ours, training stages only
    assert "--gradient-checkpointing" not in gen


def test_the_table_shows_each_lines_ratio_and_peak_rss():
    reward = {"bench": "alignloop_reward", "model": "tiny", "pairs_per_sec": 46.7, "peak_rss_mb": 947.0, "bf16": True,
              "peer": {"bench": "trl_reward", "pairs_per_sec": 18.4, "peak_rss_mb": 950.0, "bf16": False},
              "ratio": {"pairs_per_sec": 2.538, "peak_rss_mb": 0.997}}
    gen = {"bench": "generate", "model": "tiny", "precision": "auto", "sampler_dtype": "bfloat16", "batch_size": 32,
           "new_tokens_per_seq": 64, "model_generate_precision": "fp32",
           "alignloop": {"new_tokens_per_sec": 3665.0}, "model_generate": {"new_tokens_per_sec": 2300.0},
           "speedup": 1.59, "peak_rss_mb": 700.0}
    head, rule, reward_row, gen_row = table.render([reward, gen]).splitlines()
    assert "tiny" in head and rule.count("---") == 6
    assert reward_row == ("| reward model (RewardTrainer) | 46.7 pairs/s | 18.4 pairs/s | **2.54x** | 947 / 950 (1.00) | "
                          "bf16 / fp32 |")
    # the machine under the table, once however many lines ran on it; checkpointing beside the precision
    host = {"cpu": "AMD EPYC", "cores": 2, "threads": 2, "native_bf16": True, "amx": False,
            "matmul_gflops": {"fp32": 144, "bf16": 394}}
    reward = {**reward, "gradient_checkpointing": True, "host": host,
              "peer": {**reward["peer"], "bf16": True, "gradient_checkpointing": True}}
    lines = table.render([reward, {**gen, "host": host}]).splitlines()
    assert lines[2].endswith("| bf16 + ckpt / bf16 + ckpt |")
    assert lines[-1] == "Host: AMD EPYC, 2 of 2 cores, native bf16 yes; 2048 x 2048 matmul 144 GFLOP/s fp32, 394 bf16"
    assert sum(line.startswith("Host:") for line in lines) == 1
    # the same machine measured a little differently by another line: one host, the range of its figures
    other = {**host, "matmul_gflops": {"fp32": 150, "bf16": 380}}
    lines = table.render([reward, {**gen, "host": other}]).splitlines()
    assert lines[-1].endswith("matmul 144-150 GFLOP/s fp32, 380-394 bf16")
    assert sum(line.startswith("Host:") for line in lines) == 1
    assert gen_row == ("| rollout generation, batch 32, 64 new tokens (`model.generate`) | 3,665 new tok/s | 2,300 new tok/s | "
                       "**1.59x** | 700 (one process) | bf16 / fp32 |")


def test_the_table_names_a_missing_peer_venv_and_how_to_build_it(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "table.py"), "--fixtures", str(tmp_path),
                          "--peer-venvs", str(tmp_path / "nowhere"), "--stages", "reward,ppo"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "nowhere" in out.stderr and "make peer-venvs PEER_VENVS=" in out.stderr


def test_reward_bench_counts_a_cut_batch_as_one_step(peer_bench_fixtures):
    # --set reaches our config; a batch cut by train.micro_batch_tokens is still one step of 8 pairs (the
    # timing once counted every collated piece as a step and so doubled the pairs per second)
    out = subprocess.run([sys.executable, str(REPO / "bench" / "reward.py"), "--model", "tiny", "--fixtures",
                          str(peer_bench_fixtures), "--n-pairs", "48", "--max-steps", "6",
                          "--set", "train.micro_batch_tokens=64"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")).removeprefix("BENCH_JSON "))
    assert res["set"] == ["train.micro_batch_tokens=64"]
    assert res["steps"] == 6 and res["timed_steps"] == 2
    assert res["pairs"] == 8 * res["timed_steps"]
