"""Smoke test of an installed constrained_optim, run by .ci/release-checks from outside the repository.

Usage: python .ci/smoke.py REPO. Checks that the package imported is the installed one, that every
module of REPO's source tree and the PEP 561 marker ``py.typed`` were installed, that the
distribution's version is the package's, and that a constrained optimizer steps, saves and loads.
"""

from __future__ import annotations

import importlib.metadata
import io
import sys
from pathlib import Path

import torch

import constrained_optim as co

repo = Path(sys.argv[1]).resolve()
pkg = Path(co.__file__).resolve().parent
assert repo not in pkg.parents, f"imported the working tree ({pkg}), not the installed package"
assert "site-packages" in pkg.parts, f"constrained_optim is not from site-packages: {pkg}"

source = repo / "constrained_optim"
missing = [str(p.relative_to(source)) for p in sorted(source.rglob("*"))
           if (p.suffix == ".py" or p.name == "py.typed") and "__pycache__" not in p.parts
           and not (pkg / p.relative_to(source)).is_file()]
assert not missing, f"not installed: {', '.join(missing)}"
assert (pkg / "py.typed").is_file()
version = importlib.metadata.version("constrained-optim")
assert version == co.__version__, (version, co.__version__)


def build(seed: int) -> tuple[torch.nn.Module, co.ConstrainedOptimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 3))
    opt = co.ConstrainedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model)
    opt.attach("0", co.Fixed((..., 1, 1), 0.0)).attach("2", co.MaxNorm(0.5))
    return model, opt


def train(model: torch.nn.Module, opt: co.ConstrainedOptimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(opt.steps_taken)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 2, 5, 5, generator=gen)).square().mean().backward()
        opt.step()


model, opt = build(0)
train(model, opt, 5)
opt.check()
assert float(model[0].weight.detach()[..., 1, 1].abs().max()) == 0.0
buffer = io.BytesIO()
torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
buffer.seek(0)
saved = torch.load(buffer, weights_only=True)

resumed_model, resumed = build(1)
resumed_model.load_state_dict(saved["model"])
resumed.load_state_dict(saved["opt"])
assert resumed.steps_taken == 5 and len(resumed.audit.history) == len(opt.audit.history)
train(model, opt, 3)
train(resumed_model, resumed, 3)
for a, b in zip(model.parameters(), resumed_model.parameters()):
    assert torch.equal(a, b), "the resumed run differs from the uninterrupted one"
resumed.check()
print(f"smoke test passed: constrained_optim {version} from {pkg}")
