"""Two processes (torchrun, gloo on CPU) train exactly like one on the same tokens."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from speedrun.atomic import write_json
from speedrun.shards import write_shard
from speedrun.metrics import read_metrics

PROJECT = Path(__file__).resolve().parents[1]


def _shards(root: Path) -> Path:
    rng = np.random.default_rng(0)
    out = root / "shards"
    out.mkdir(parents=True)
    for split, n in (("train", 40_000), ("val", 4_000)):
        # a learnable stream: a few hundred token "words" with document breaks
        toks = rng.integers(0, 300, n).astype(np.uint16)
        toks[::97] = 50256
        write_shard(out / f"{split}_000000.bin", toks)
    write_json(out / "manifest.json", {"train": [{"file": "train_000000.bin"}],
                                       "val": [{"file": "val_000000.bin"}], "source": "synthetic"})
    return out


def _env(nproc: int) -> dict:
    """The machine's cores shared among the processes (CI: 2 cores), no oversubscription."""
    threads = max(1, (os.cpu_count() or 1) // nproc)
    return {**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": str(threads)}


def _train(root: Path, shards: Path, nproc: int, tag: str) -> tuple[list[float], dict]:
    params = root / f"params-{tag}.yaml"
    params.write_text(yaml.safe_dump({"train": {
        "recipe": "classic", "profile": "cpu-tiny", "nproc": nproc, "steps": 8, "val_every": 4, "val_tokens": 1024,
        "ckpt_every": 0}}))
    out = root / tag
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "stages.train_speedrun", "--params", str(params), "--shards", str(shards),
           "--models", str(out / "models"), "--metrics", str(out / "metrics")]
    proc = subprocess.run(cmd, cwd=PROJECT, env=_env(nproc), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out / "metrics/dvclive/plots/metrics/train/loss.tsv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f, delimiter="\t")]
    return losses, read_metrics(out / "metrics/train.json")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    shards = _shards(tmp_path)
    one, m1 = _train(tmp_path, shards, 1, "one")
    two, m2 = _train(tmp_path, shards, 2, "two")
    assert m1["world_size"] == 1 and m2["world_size"] == 2
    assert len(one) == len(two) == 8
    assert one[-1] < one[0] - 0.5, f"the tiny model did not learn: {one}"
    # step 1 runs before any update: equal only if the two ranks together saw exactly the
    # one-process batch (a rank reading the wrong slice shows up here)
    assert abs(two[0] - one[0]) < 1e-5
    # later steps: gradients are summed across ranks instead of across micro-batches; the fp32
    # addition order differs, and Muon/Adam amplify that a little, nothing else
    np.testing.assert_allclose(two, one, rtol=5e-3)
    assert abs(m1["final_val_loss"] - m2["final_val_loss"]) < 5e-3, (m1["final_val_loss"], m2["final_val_loss"])
    print(f"1 process: {one}\n2 processes: {two}")

    # evaluate_val under torchrun: 2 ranks split the validation tokens of the same checkpoint
    evals = {}
    for nproc in (1, 2):
        params = tmp_path / f"eval-{nproc}.yaml"
        params.write_text(yaml.safe_dump({"train": {"profile": "cpu-tiny"},
                                          "evaluate": {"val_tokens": 1024, "micro_batch_tokens": 256}}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "stages.evaluate_val", "--params", str(params), "--shards", str(shards),
               "--models", str(tmp_path / "one/models"), "--metrics", str(tmp_path / f"eval{nproc}")]
        proc = subprocess.run(cmd, cwd=PROJECT, env=_env(nproc), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        evals[nproc] = read_metrics(tmp_path / f"eval{nproc}/eval.json")["val_loss"]
    assert abs(evals[1] - m1["final_val_loss"]) < 1e-4      # the trainer's last validation
    assert abs(evals[2] - evals[1]) < 1e-5, evals            # same tokens, summed across ranks


def test_ranks_split_each_step_disjointly(tmp_path):
    """Per step, the ranks' micro-batches are disjoint and together equal the 1-process batch."""
    import torch

    from speedrun.loader import BatchLoader, TokenStream

    stream = TokenStream([_shards(tmp_path) / "train_000000.bin"])
    cpu = torch.device("cpu")

    def tokens(world: int, step: int) -> list[tuple[int, ...]]:
        out = []
        for rank in range(world):
            loader = BatchLoader(stream, 1024, micro_tokens=128, rank=rank, world=world,
                                 device=cpu)
            out += [tuple(x.tolist()) for x, _ in loader.get(step)]
        return out

    for step in (0, 5):
        single = tokens(1, step)
        for world in (2, 4, 8):
            multi = tokens(world, step)
            assert len(multi) == len(set(multi)) == 8
            assert sorted(multi) == sorted(single)


def test_a_stop_requested_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Rank 0 has its signal before the step-boundary check, rank 1 not yet: both must enter the
    all-reduce and both stop (before, rank 0 returned at once and rank 1 waited in it forever)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import os, signal, torch, torch.distributed as dist\n"
        "from speedrun.resume import StopRequest\n"
        "dist.init_process_group('gloo')\n"
        "stop = StopRequest()\n"
        "if dist.get_rank() == 0:\n"
        "    stop.signum = signal.SIGTERM\n"
        "print('stop', stop.requested(2, torch.device('cpu')), flush=True)\n"
        "dist.destroy_process_group()\n")
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "PYTHONPATH": str(PROJECT)}
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120))
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "stop True" in out, err[-2000:]
