"""DDP, FSDP2 (``fully_shard``, DTensor parameters, uneven shards) and tensor-parallel placements
over 2 and 3 gloo ranks on 127.0.0.1, CPU (`distributed_worker.py` is one rank).

Every family on FSDP2 (``reshard_after_forward`` True and False, bf16 `MixedPrecisionPolicy` for
two): the sets hold on every rank after every step, the ranks agree bitwise, and they match one
process on the same global batch to float rounding. Element-wise and row-wise sets make no
all-gather inside ``opt.step()`` and equal the gather path bitwise; norm sets across shards
communicate one small all-reduce. ``torch.distributed.checkpoint`` carries the constraint state:
a resumed run equals the uninterrupted one bitwise, and a checkpoint of one world size resumes on
the other with every set holding. Both world sizes run at once, each in one process group.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distributed_worker as worker

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = WORKER.parent.parent
WORLDS = (2, 3)
TIMEOUT = 300  # per world size; a hang fails here instead of blocking the suite
BARRIER_TIMEOUT = 3

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    return next((n for n in names if n.startswith("lo")), None)


def start(world: int, out_dir: Path) -> list[subprocess.Popen]:
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
        CONSTRAINED_OPTIM_BARRIER_TIMEOUT=str(BARRIER_TIMEOUT),
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    lo = loopback_interface()
    if lo:  # gloo talks over the loopback interface only
        env.setdefault("GLOO_SOCKET_IFNAME", lo)
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out_dir)],
            env=dict(env, RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    """Every rank of both world sizes, started at once (the two exchange checkpoints)."""
    out = tmp_path_factory.mktemp("ranks")
    procs = {w: start(w, out) for w in WORLDS}
    deadline = time.monotonic() + TIMEOUT
    failures = []
    try:
        for w, ps in procs.items():
            for r, p in enumerate(ps):
                try:
                    text = p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
                except subprocess.TimeoutExpired:
                    failures.append(f"world {w} rank {r}: no result after {TIMEOUT} s (a hang?)")
                    continue
                if p.returncode != 0:
                    failures.append(f"world {w} rank {r} failed:\n{text[-4000:]}")
    finally:
        for ps in procs.values():
            for p in ps:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    assert not failures, "\n".join(failures)
    return out


def load(out_dir: Path, name: str, world: int) -> list[dict]:
    return [torch.load(out_dir / f"{name}-w{world}-rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = worker.reference(family)
        return cache[family]

    return get


def close_audits(a, b, rel=1e-4, abs_=1e-6) -> bool:
    keys = ("drift", "drift_max", "residual", "grad_blocked")
    return len(a) == len(b) and all(
        (x["step"], x["name"], x["constraint"]) == (y["step"], y["name"], y["constraint"])
        and all(
            math.isclose(x[k], y[k], rel_tol=rel, abs_tol=abs_) or (math.isnan(x[k]) and math.isnan(y[k]))
            for k in keys
        )
        for x, y in zip(a, b)
    )


def same_params(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


CASES = [(w, name) for w in WORLDS for name in worker.plan(w)]


@pytest.mark.parametrize("world,case", CASES, ids=[f"w{w}-{c}" for w, c in CASES])
def test_sets_hold_ranks_agree_and_match_one_process(world, case, out_dir, references):
    """The worker checked every set after every step on the global tensors (and ``check()``);
    here: every rank holds the same bits, the same audit, and one process's result."""
    ranks = load(out_dir, case, world)
    for r, result in enumerate(ranks[1:], 1):
        assert same_params(ranks[0]["params"], result["params"]), f"rank {r} differs from rank 0"
        assert repr(result["audit"]) == repr(ranks[0]["audit"]), f"rank {r}'s audit differs"
        assert result["steps_taken"] == ranks[0]["steps_taken"] == worker.STEPS
    spec = worker.plan(world)[case]
    params, history = references(spec["family"])
    worker.holds({**worker.families(spec["family"]), **worker.late(spec["family"])}, ranks[0]["params"])
    if spec.get("bf16"):  # computed in bfloat16: the sets hold, the values are bfloat16's
        tol = {"rtol": 0, "atol": 0.2}
    else:
        tol = {"rtol": 1e-5, "atol": 2e-6}
        assert close_audits(ranks[0]["audit"], history)
    for name, value in params.items():
        torch.testing.assert_close(ranks[0]["params"][name], value, **tol, msg=lambda m, n=name: f"{n}: {m}")


LOCAL = [
    (w, c)
    for w in WORLDS
    for c in (
        "elementwise",
        "elementwise-keep",
        "rowwise",
        "rowwise-keep",
        "rowwise-bf16",
        "norms",
        "norms-keep",
        "tp",
    )
    if c in worker.plan(w)
]


@pytest.mark.parametrize("world,case", LOCAL, ids=[f"w{w}-{c}" for w, c in LOCAL])
def test_local_and_norm_sets_gather_nothing_in_the_step(world, case, out_dir):
    """No all-gather (nor gather) inside ``opt.step()``: element-wise and row-wise sets project each
    shard; norm sets and the audit add one small all-reduce each."""
    for r, result in enumerate(load(out_dir, case, world)):
        for step, (calls, sizes) in enumerate(result["counts"]):
            assert worker.gathers(calls) == 0, f"rank {r} step {step}: {calls}"
            assert sum(sizes.values()) <= 64 * 1024, f"rank {r} step {step}: {sizes}"
            # the audit's one; norm sets add the units' sums, and their residuals' on audited steps
            assert calls.get("all_reduce", 0) == (3 if case.startswith(("norms", "tp")) else 1), calls


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("family", ["elementwise", "rowwise"])
def test_local_projection_equals_the_gather_path_bitwise(world, family, out_dir):
    local = load(out_dir, family, world)[0]
    gathered = load(out_dir, f"{family}-gather", world)[0]
    assert worker.gathers(gathered["counts"][0][0]) > 0  # the comparison did gather
    assert same_params(local["params"], gathered["params"])


def test_shards_are_uneven_and_one_is_empty(out_dir):
    two = load(out_dir, "elementwise", 2)
    three = load(out_dir, "elementwise", 3)
    assert [r["local_shapes"]["fc1.weight"] for r in two] == [(3, 8), (2, 8)]
    assert [r["local_shapes"]["fc1.weight"] for r in three] == [(2, 8), (2, 8), (1, 8)]
    assert [r["local_shapes"]["fc4.weight"] for r in three] == [(1, 8), (1, 8), (0, 8)]
    tp = load(out_dir, "tp", 2)
    assert [r["local_shapes"]["fc2.weight"] for r in tp] == [(5, 3), (5, 2)]  # Shard(1)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("holder", ["wrapper", "handle"])
def test_dcp_resume_equals_the_uninterrupted_run_bitwise(world, holder, out_dir):
    for r, result in enumerate(load(out_dir, "checkpoints", world)):
        whole, resumed = result[f"{holder}-whole"], result[f"{holder}-resumed"]
        assert same_params(whole["params"], resumed["params"]), f"rank {r}"
        assert repr(whole["audit"]) == repr(resumed["audit"]), f"rank {r}"
        assert whole["steps_taken"] == resumed["steps_taken"] == worker.STEPS
        if whole["state"] is not None:
            for pid, entry in whole["state"].items():
                for key, value in entry.items():
                    assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed["state"][pid][key])), (
                        key
                    )
        keys = set(result[f"{holder}-first"]["keys"])
        assert {
            "constraint.spec",
            "constraint.steps_taken",
            "constraint.audit",
            "constraint.data.keep",
            "exp_avg",
        } <= keys


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("holder", ["wrapper", "handle"])
def test_dcp_resume_on_another_world_size(world, holder, out_dir):
    """Saved by one world size, loaded by the other: resharded, every set holds (checked by the
    worker after every step) and training continues as it would have."""
    other = 3 if world == 2 else 2
    for _r, result in enumerate(load(out_dir, "checkpoints", world)):
        moved = result[f"{holder}-from-w{other}"]
        whole = load(out_dir, "checkpoints", other)[0][f"{holder}-whole"]
        assert moved["steps_taken"] == worker.STEPS
        for name, value in whole["params"].items():
            torch.testing.assert_close(moved["params"][name], value, rtol=1e-5, atol=2e-6)


def test_a_collective_called_on_one_rank_fails_instead_of_hanging(out_dir):
    result = load(out_dir, "lonely", 2)[0]
    assert result["error"] and "collective" in result["error"] and "every rank" in result["error"]
    assert result["seconds"] < BARRIER_TIMEOUT + 10
