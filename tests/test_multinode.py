"""Two "nodes" on this machine: two torchrun launchers with --nnodes 2 (one process each) meet through
torchrun's rendezvous on loopback and train what one node with two processes trains (the SFT workload of
test_resume_and_ddp's two-process test)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from alignloop.runs import read_metrics
from test_resume_and_ddp import alignloop, sft_args, weights

COMMON = ("train.max_steps=6", "train.group_by_length=false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(rank: int, port: int, args: list[str]) -> subprocess.Popen:
    """One node's launcher, as a user starts it on each host (the address is node 0's)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                             "-m", "alignloop", "-q", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow(seconds=50)
def test_two_nodes_on_loopback_match_one_node_with_two_processes(tiny_model, sft_data, tmp_path):
    one_node = alignloop(*sft_args(tiny_model, sft_data, tmp_path / "one-node", *COMMON), "--nproc", "2")
    out, _ = one_node.communicate(timeout=300)
    assert one_node.returncode == 0, out[-3000:]

    port = free_port()
    args = sft_args(tiny_model, sft_data, tmp_path / "two-nodes", *COMMON)  # a shared folder, as on a cluster
    nodes = [node(rank, port, args) for rank in (0, 1)]
    for proc in nodes:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]

    assert (tmp_path / "two-nodes" / "FINISHED").exists()
    a, b = weights(tmp_path / "one-node"), weights(tmp_path / "two-nodes")
    # the same two ranks and the same gloo all-reduce: the same numbers, bit for bit
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("one-node", "two-nodes"))
    assert [r.get("loss") for r in la] == [r.get("loss") for r in lb]
    assert len([r for r in lb if "loss" in r]) == 3  # logged every 2 of the 6 steps
