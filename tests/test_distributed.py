"""DDP and FSDP2 (``fully_shard``, DTensor parameters) over two gloo ranks on 127.0.0.1, CPU:
constraints hold on every rank after every step, and the two ranks give the single-process
result on the same global batch (up to float rounding)."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distributed_worker as worker

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = WORKER.parent.parent

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    return next((n for n in names if n.startswith("lo")), None)


def run_ranks(kinds: list[str], out_dir: Path, world: int = 2, timeout: float = 120) -> dict[str, list[dict]]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    lo = loopback_interface()
    if lo:  # gloo talks over the loopback interface only
        env.setdefault("GLOO_SOCKET_IFNAME", lo)
    command = [sys.executable, str(WORKER), ",".join(kinds), str(out_dir)]
    procs = [subprocess.Popen(command, env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-4000:]}"
    return {kind: [torch.load(out_dir / f"{kind}-rank{r}.pt") for r in range(world)] for kind in kinds}


@pytest.fixture(scope="module")
def reference():
    return worker.train_reference()


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    """Both setups in one pair of processes: starting a rank (importing torch) is most of the cost."""
    return run_ranks(["ddp", "fsdp"], tmp_path_factory.mktemp("ranks"))


def close_audits(a, b) -> bool:
    keys = ("drift", "drift_max", "residual", "grad_blocked")
    return len(a) == len(b) and all(
        (x["step"], x["name"], x["constraint"]) == (y["step"], y["name"], y["constraint"])
        and all(math.isclose(x[k], y[k], rel_tol=1e-4, abs_tol=1e-6)
                or (math.isnan(x[k]) and math.isnan(y[k])) for k in keys)
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(kind, distributed_runs, reference):
    ranks = distributed_runs[kind]
    params, history = reference
    for r, result in enumerate(ranks):
        worker.holds(result["params"])
        for name, value in params.items():
            torch.testing.assert_close(result["params"][name], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name, r=r: f"rank {r} {n}: {m}")
        assert close_audits(result["audit"], [rec.to_dict() for rec in history])
    # every rank computed the same projection from the same gathered data
    for name in params:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name])
    assert ranks[0]["audit"] == ranks[1]["audit"] or repr(ranks[0]["audit"]) == repr(ranks[1]["audit"])
    if kind == "fsdp":  # really sharded: fc1's 5 rows as 3 + 2
        assert ranks[0]["local_shapes"]["fc1.weight"] == (3, 6)
        assert ranks[1]["local_shapes"]["fc1.weight"] == (2, 6)
