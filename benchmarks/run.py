"""The one benchmark command: what the library costs, as ratios to a fair plain-torch baseline.

Every row times the library (A) and its baseline (B) in one process, interleaved (the order rotates
every round, so drift in machine speed and cache state hits all variants alike), after warm-up
rounds, and reports the ratio of their medians. The baseline is plain torch fed the SAME projected
gradients: the gradient projection is applied to it outside the timed region, so both optimizers
see the same exact zeros (torch's CPU Adam is about 1.6x slower when half its gradient entries are
exact zeros; that is a cost of the masked problem, not of the library). Rows on real models run at
one thread; peak memory is read per variant in its own subprocess.

    python benchmarks/run.py [--quick] [--rows 1,3,9] [--repeats N] [--json PATH]
                             [--device cpu|cuda] [--compile] [--threads N]

Rows (target ratio in brackets):
  1  Mask 50% on 8 x Linear(1024, 1024), Adam(foreach), audit off               [<= 1.10]
  2  the same, audit every step (the default)                                   [<= 1.20]
  3  Symmetric() on the same                                                    [<= 1.30]
  4  Fixed((..., 1, 1), 0.0) on 8 x Conv2d(256, 256, 3)                         [<= 1.05]
  5  NMSparsity(2, 4, fixed=False) on 8 x Linear(1024, 1024)                     [<= 2.0]
  6  ResNet-18-shaped CNN, SGD(momentum), MaxNorm & Fixed centre on 3x3 convs:
     optimizer step [<= 1.30], training step [<= 1.10]
  7  the same CNN, AdamW, MaxNorm on every conv: step                           [<= 1.30]
  8  GPT-2-shaped transformer, AdamW, NMSparsity(2, 4): step [<= 1.30], training step [<= 1.10]
  9  48 x Linear(64, 64) with masks, AdamW: audit off [<= 1.15], default; us per parameter
 10  Orthogonal on one 1024 x 1024 weight vs the Adam step on it                 [<= 40]
 11  torch.compile(opt.step), audit off, vs plain Adam's compiled step (only with --compile)
 12  small-batch MLP training step with masks: library vs torch.nn.utils.prune vs parametrize
 13  peak memory, 8 x Linear(2048, 2048) masked, Adam: library vs plain vs prune [<= 1.05]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import constrained_optim as co  # noqa: E402

#: glibc's threshold above which a malloc is its own mmap, fixed for every memory subprocess so the
#: heap arenas' own growth policy does not add +-100 MiB of noise to VmHWM
MMAP_THRESHOLD = "65536"
FAIR = "plain torch fed the same projected gradients (projection untimed)"


# -- configuration and results ---------------------------------------------------------------------
@dataclass
class Config:
    device: str = "cpu"
    quick: bool = False
    repeats: int = 30
    warmup: int = 3
    threads: int | None = None  # synthetic rows; real-model rows always use one thread
    compile: bool = False


@dataclass
class Row:
    row: str
    name: str
    ratio: float | None
    target: float | None = None  # PASS when ratio <= target
    note: str = ""
    threads: int | None = None
    target_text: str | None = None  # a target that is not "ratio <= x"
    passed: bool | None = None  # set with target_text
    medians: dict = field(default_factory=dict)  # seconds or bytes, for --json

    @property
    def status(self) -> str:
        if self.ratio is None:
            return "skipped"
        if self.passed is not None:
            return "PASS" if self.passed else "MISS"
        if self.target is None:
            return "info"
        return "PASS" if self.ratio <= self.target else "MISS"

    @property
    def target_label(self) -> str:
        if self.target_text is not None:
            return self.target_text
        return "" if self.target is None else f"<= {self.target:.2f}x"


# -- shared timing helpers -------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def num_threads(n: int | None):
    """torch's intra-op threads set to ``n`` (None: leave as is) for the block; yields the count."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


#: a variant is a list of phases run in order each round: (name, fn) is timed under ``name``,
#: (None, fn) is untimed preparation (loading gradients, the baseline's gradient projection)
Phases = list[tuple[str | None, Callable[[], object]]]


def measure(variants: dict[str, Phases], cfg: Config) -> dict[str, dict[str, list[float]]]:
    """Seconds per timed phase per round, variants interleaved with a rotating order, warm-up
    rounds dropped, the garbage collector off while timing."""
    names = list(variants)
    times = {n: {phase: [] for phase, _ in variants[n] if phase} for n in names}
    gc.collect()
    gc.disable()
    try:
        for i in range(cfg.warmup + cfg.repeats):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                for phase, fn in variants[name]:
                    if phase is None:
                        fn()
                        continue
                    sync(cfg.device)
                    start = time.perf_counter()
                    fn()
                    sync(cfg.device)
                    if i >= cfg.warmup:
                        times[name][phase].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


def med(times: dict[str, list[float]], *phases: str) -> float:
    """Median over rounds of the sum of ``phases`` (each round's phases add up: a training step is
    its forward+backward plus its optimizer step)."""
    return statistics.median(sum(parts) for parts in zip(*(times[p] for p in phases)))


def ratio(times, a: str, b: str, *phases: str) -> float:
    return med(times[a], *phases) / med(times[b], *phases)


def medians(times, *phases: str) -> dict[str, float]:
    return {name: med(t, *phases) for name, t in times.items()}


# -- models ----------------------------------------------------------------------------------------
def linears(count: int, size: int, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(size, size, bias=bias) for _ in range(count)])


def mlp(width: int, depth: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(width, width)] + ([nn.ReLU()] if i < depth - 1 else [])
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.down(x))


def resnet18_shaped(width: int = 64, classes: int = 10) -> nn.Sequential:
    """ResNet-18's layout (7x7 stem, BasicBlocks [2, 2, 2, 2], widths width..8*width), random init."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 7, 2, 3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = width
    for stage, cout in enumerate(width * 2**i for i in range(4)):
        for block in range(2):
            layers.append(BasicBlock(cin, cout, 2 if stage > 0 and block == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """GPT-2's layout (token and position embeddings, pre-LN blocks, tied-free LM head)."""

    def __init__(self, vocab: int = 256, seq: int = 64, d: int = 128, heads: int = 4, blocks: int = 4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(GPTBlock(d, heads) for _ in range(blocks))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def random_masks(model: nn.Module, device: str) -> dict[str, torch.Tensor]:
    """A random half-free uint8 mask per weight, seeded, keyed by parameter name."""
    g = torch.Generator().manual_seed(1)
    return {
        n: (torch.rand(p.shape, generator=g) > 0.5).to(device=device, dtype=torch.uint8)
        for n, p in model.named_parameters()
        if n.endswith("weight")
    }


# -- building A and B from one start ---------------------------------------------------------------
def pair(model: nn.Module, make_inner, attach: Callable, audits: dict[str, int]) -> dict[str, tuple]:
    """``{"plain": (model, optimizer), name: (model, ConstrainedOptimizer), ...}``: each library
    variant on its own copy of ``model`` with ``attach(opt, model)`` applied (which projects the
    parameters), the plain one on a copy of the first projected model, so all start equal."""
    out = {}
    for name, audit_every in audits.items():
        m = copy.deepcopy(model)
        opt = co.ConstrainedOptimizer(make_inner(m.parameters()), m, audit_every=audit_every)
        attach(opt, m)
        out[name] = (m, opt)
    plain = copy.deepcopy(next(iter(out.values()))[0])
    return {"plain": (plain, make_inner(plain.parameters())), **out}


def attach_each(constraint_for: Callable[[str, nn.Module], co.Constraint | None]) -> Callable:
    """``attach(opt, model)`` attaching ``constraint_for(name, module)`` to every module's weight
    where it returns a constraint."""

    def attach(opt, model):
        for name, module in model.named_modules():
            c = constraint_for(name, module)
            if c is not None:
                opt.attach(name, c)

    return attach


def attach_masks(masks: dict[str, torch.Tensor]) -> Callable:
    def attach(opt, model):
        for name, keep in masks.items():
            opt.attach(name, co.Mask(keep.bool()))

    return attach


# the baseline's gradient projections, done by hand on the plain model (untimed)
def mask_grads(masks: dict[str, torch.Tensor]) -> Callable:
    """The same ``_foreach_mul_`` by the same uint8 masks as the library's `Mask`."""
    keeps = list(masks.values())

    def project(model):
        torch._foreach_mul_([model.get_parameter(n).grad for n in masks], keeps)

    return project


def symmetrize_grads(model) -> None:
    for p in model.parameters():
        p.grad.add_(p.grad.T.clone()).mul_(0.5)


def zero_centre_grads(model) -> None:
    for m in model.modules():
        if is_3x3_conv(m):
            m.weight.grad[..., 1, 1] = 0


def no_projection(model) -> None:
    pass


def synthetic_variants(variants: dict[str, tuple], project_plain: Callable, device: str) -> dict[str, Phases]:
    """Each variant's round: load one fixed set of random gradients (untimed; the baseline's
    projected untimed too), then the timed ``step``."""
    g = torch.Generator().manual_seed(2)
    first = next(iter(variants.values()))[0]
    grads = [torch.randn(p.shape, generator=g).to(device) for p in first.parameters()]
    out = {}
    for name, (model, opt) in variants.items():
        params = list(model.parameters())
        for p in params:
            p.grad = torch.empty_like(p)

        def load(model=model, params=params, plain=name == "plain"):
            torch._foreach_copy_([p.grad for p in params], grads)
            if plain:
                project_plain(model)

        out[name] = [(None, load), ("step", opt.step)]
    return out


def training_variants(
    variants: dict[str, tuple], batch: tuple, loss_fn: Callable, project_plain: Callable
) -> dict[str, Phases]:
    """Each variant's round: a timed zero_grad + forward + backward (``fb``), the baseline's gradient
    projection (untimed), then the timed ``step``."""
    x, y = batch
    out = {}
    for name, (model, opt) in variants.items():

        def fb(model=model, opt=opt):
            opt.zero_grad()
            loss_fn(model(x), y).backward()

        phases: Phases = [("fb", fb)]
        if name == "plain":
            phases.append((None, lambda model=model: project_plain(model)))
        phases.append(("step", opt.step))
        out[name] = phases
    return out


def ce(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# -- rows 1-5, 9, 10: synthetic gradients ----------------------------------------------------------
def adam(params):
    return torch.optim.Adam(params, lr=1e-3, foreach=True)


def run_synthetic(model, make_inner, attach, audits, project_plain, cfg) -> tuple[dict, int]:
    with num_threads(cfg.threads) as threads:
        torch.manual_seed(0)
        variants = pair(model.to(cfg.device), make_inner, attach, audits)
        times = measure(synthetic_variants(variants, project_plain, cfg.device), cfg)
    return times, threads


def rows_masked_linear(cfg: Config) -> list[Row]:
    size = 256 if cfg.quick else 1024
    torch.manual_seed(0)
    model = linears(8, size)
    masks = random_masks(model, cfg.device)
    times, threads = run_synthetic(
        model, adam, attach_masks(masks), {"off": 0, "every": 1}, mask_grads(masks), cfg
    )
    what = f"8 x Linear({size}, {size}), Adam(foreach)"
    note = f"{what}; B: {FAIR}: the same _foreach_mul_ by the same uint8 masks"
    return [
        Row(
            "1",
            "Mask 50%, audit off",
            ratio(times, "off", "plain", "step"),
            1.10,
            note,
            threads,
            medians=medians(times, "step"),
        ),
        Row(
            "2",
            "Mask 50%, audit every step",
            ratio(times, "every", "plain", "step"),
            1.20,
            f"{what}, default audit; B as row 1",
            threads,
            medians=medians(times, "step"),
        ),
    ]


def row_symmetric(cfg: Config) -> list[Row]:
    size = 256 if cfg.quick else 1024
    torch.manual_seed(0)
    attach = attach_each(lambda n, m: co.Symmetric() if isinstance(m, nn.Linear) else None)
    times, threads = run_synthetic(linears(8, size), adam, attach, {"lib": 1}, symmetrize_grads, cfg)
    return [
        Row(
            "3",
            "Symmetric()",
            ratio(times, "lib", "plain", "step"),
            1.30,
            f"8 x Linear({size}, {size}), Adam(foreach), default audit; B: {FAIR}: (G + G^T) / 2",
            threads,
            medians=medians(times, "step"),
        )
    ]


def row_fixed_conv(cfg: Config) -> list[Row]:
    ch = 64 if cfg.quick else 256
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Conv2d(ch, ch, 3, bias=False) for _ in range(8)])
    attach = attach_each(lambda n, m: co.Fixed((..., 1, 1), 0.0) if isinstance(m, nn.Conv2d) else None)
    times, threads = run_synthetic(model, adam, attach, {"lib": 1}, zero_centre_grads, cfg)
    return [
        Row(
            "4",
            "Fixed centre, 3x3 convs",
            ratio(times, "lib", "plain", "step"),
            1.05,
            f"8 x Conv2d({ch}, {ch}, 3), Adam(foreach), default audit; B: {FAIR}: G[..., 1, 1] = 0",
            threads,
            medians=medians(times, "step"),
        )
    ]


def row_nm_dynamic(cfg: Config) -> list[Row]:
    size = 256 if cfg.quick else 1024
    torch.manual_seed(0)
    attach = attach_each(lambda n, m: co.NMSparsity(2, 4, fixed=False) if isinstance(m, nn.Linear) else None)
    times, threads = run_synthetic(linears(8, size), adam, attach, {"lib": 1}, no_projection, cfg)
    return [
        Row(
            "5",
            "NMSparsity(2, 4, fixed=False)",
            ratio(times, "lib", "plain", "step"),
            2.0,
            f"8 x Linear({size}, {size}), Adam(foreach), default audit; B: a plain Adam step (the "
            "dynamic pattern projects no gradient; the top-2-of-4 after the step is the library's work)",
            threads,
            medians=medians(times, "step"),
        )
    ]


def row_many_small(cfg: Config) -> list[Row]:
    count, size = 48, 64
    torch.manual_seed(0)
    model = linears(count, size)
    masks = random_masks(model, cfg.device)
    times, threads = run_synthetic(
        model, torch.optim.AdamW, attach_masks(masks), {"off": 0, "every": 1}, mask_grads(masks), cfg
    )
    m = medians(times, "step")
    per_param = {k: (m[k] - m["plain"]) / count * 1e6 for k in ("off", "every")}
    note = (
        f"{count} x Linear({size}, {size}) masked, AdamW (torch defaults); B: {FAIR}; library "
        f"overhead per constrained parameter per step: {per_param['off']:.1f} us audit off, "
        f"{per_param['every']:.1f} us default"
    )
    return [
        Row("9", "48 small masked, audit off", m["off"] / m["plain"], 1.15, note, threads, medians=m),
        Row(
            "9",
            "48 small masked, default audit",
            m["every"] / m["plain"],
            None,
            "no target; the audit's fixed cost per step shows at this size",
            threads,
            medians=m,
        ),
    ]


def row_orthogonal(cfg: Config) -> list[Row]:
    size = 256 if cfg.quick else 1024
    torch.manual_seed(0)
    attach = attach_each(lambda n, m: co.Orthogonal() if isinstance(m, nn.Linear) else None)
    times, threads = run_synthetic(linears(1, size), adam, attach, {"lib": 1}, no_projection, cfg)
    return [
        Row(
            "10",
            "Orthogonal()",
            ratio(times, "lib", "plain", "step"),
            40.0,
            f"one {size} x {size} weight, Adam(foreach), default audit; B: the plain Adam step on the "
            "same raw gradient (the tangent projection and the SVD are the library's work)",
            threads,
            medians=medians(times, "step"),
        )
    ]


# -- rows 6-8, 12: real models at one thread -------------------------------------------------------
def run_training(model, make_inner, attach, audits, project_plain, batch, loss_fn, cfg, plain_from=None):
    with num_threads(1) as threads:
        variants = pair(model.to(cfg.device), make_inner, attach, audits)
        if plain_from is not None:  # a baseline projection that needs the attached library model
            project_plain = plain_from(variants)
        times = measure(training_variants(variants, batch, loss_fn, project_plain), cfg)
    return times, threads


def cnn_batch(cfg: Config):
    n, side = (2, 32) if cfg.quick else (8, 64)
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, side, side, generator=g).to(cfg.device), torch.randint(
        0, 10, (n,), generator=g
    ).to(cfg.device)


def is_3x3_conv(m) -> bool:
    return isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)


def step_and_training_rows(number: str, label: str, times, note: str, threads) -> list[Row]:
    """A real model's two rows: the optimizer step (target 1.30x) and the whole training step,
    forward + backward + step (target 1.10x)."""
    return [
        Row(
            number,
            f"{label}: optimizer step",
            ratio(times, "lib", "plain", "step"),
            1.30,
            note,
            threads,
            medians=medians(times, "step"),
        ),
        Row(
            number,
            f"{label}: training step",
            ratio(times, "lib", "plain", "fb", "step"),
            1.10,
            "forward + backward + step; B as above",
            threads,
            medians=medians(times, "fb", "step"),
        ),
    ]


def rows_resnet_sgd(cfg: Config) -> list[Row]:
    torch.manual_seed(0)
    model = resnet18_shaped(32 if cfg.quick else 64)
    attach = attach_each(
        lambda n, m: co.MaxNorm(3.0) & co.Fixed((..., 1, 1), 0.0) if is_3x3_conv(m) else None
    )
    times, threads = run_training(
        model,
        lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
        attach,
        {"lib": 1},
        zero_centre_grads,
        cnn_batch(cfg),
        F.cross_entropy,
        cfg,
    )
    what = "ResNet-18-shaped CNN, batch " + ("2 x 3x32x32, widths 32..256" if cfg.quick else "8 x 3x64x64")
    note = (
        f"{what}, SGD(momentum=0.9), MaxNorm(3) & Fixed centre on every 3x3 conv, default audit; "
        f"B: {FAIR}: G[..., 1, 1] = 0"
    )
    return step_and_training_rows("6", "ResNet-18 SGD", times, note, threads)


def row_resnet_adamw(cfg: Config) -> list[Row]:
    torch.manual_seed(0)
    model = resnet18_shaped(32 if cfg.quick else 64)
    attach = attach_each(lambda n, m: co.MaxNorm(3.0) if isinstance(m, nn.Conv2d) else None)
    times, threads = run_training(
        model, torch.optim.AdamW, attach, {"lib": 1}, no_projection, cnn_batch(cfg), F.cross_entropy, cfg
    )
    return [
        Row(
            "7",
            "ResNet-18 AdamW MaxNorm: step",
            ratio(times, "lib", "plain", "step"),
            1.30,
            "the row-6 CNN, AdamW (torch defaults), MaxNorm(3) on every conv, default audit; B: a plain "
            "AdamW step (MaxNorm projects no gradient)",
            threads,
            medians=medians(times, "step"),
        )
    ]


def gpt_weight(name: str, m) -> bool:
    return isinstance(m, nn.Linear) and name.startswith("blocks.")


def rows_gpt(cfg: Config) -> list[Row]:
    torch.manual_seed(0)
    batch, seq, vocab = (2, 32, 256) if cfg.quick else (8, 64, 256)
    model = GPT(vocab=vocab, seq=seq)
    g = torch.Generator().manual_seed(4)
    data = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(cfg.device)
    attach = attach_each(lambda n, m: co.NMSparsity(2, 4) if gpt_weight(n, m) else None)

    def keep_of_attached(variants):  # the 2:4 pattern the library chose at attach, as uint8 masks
        lib = variants["lib"][0]
        return mask_grads(
            {
                f"{n}.weight": (m.weight != 0).to(torch.uint8)
                for n, m in lib.named_modules()
                if gpt_weight(n, m)
            }
        )

    times, threads = run_training(
        model,
        torch.optim.AdamW,
        attach,
        {"lib": 1},
        None,
        (data[:, :-1], data[:, 1:]),
        ce,
        cfg,
        plain_from=keep_of_attached,
    )
    note = (
        f"GPT-2-shaped: 4 blocks, d=128, 4 heads, vocab {vocab}, seq {seq}, batch {batch}; AdamW, "
        f"NMSparsity(2, 4) on every attention/MLP weight, default audit; B: {FAIR}: the same 2:4 masks"
    )
    return step_and_training_rows("8", "GPT-2 AdamW 2:4", times, note, threads)


class MaskParametrization(nn.Module):
    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.register_buffer("keep", keep.float())

    def forward(self, w):
        return w * self.keep


def prune_model(model: nn.Module, masks: dict[str, torch.Tensor], inplace: bool = False) -> nn.Module:
    from torch.nn.utils import prune

    m = model if inplace else copy.deepcopy(model)
    for name, keep in masks.items():
        prune.custom_from_mask(m.get_submodule(name.rsplit(".", 1)[0]), "weight", keep.bool())
    return m


def parametrize_model(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    from torch.nn.utils import parametrize

    m = copy.deepcopy(model)
    for name, keep in masks.items():
        parametrize.register_parametrization(
            m.get_submodule(name.rsplit(".", 1)[0]), "weight", MaskParametrization(keep)
        )
    return m


def row_mlp_alternatives(cfg: Config) -> list[Row]:
    width, batch = 512, 16
    torch.manual_seed(0)
    model = mlp(width).to(cfg.device)
    masks = random_masks(model, cfg.device)
    with num_threads(1) as threads:
        variants = pair(model, adam, attach_masks(masks), {"library": 1, "library_off": 0})
        start = variants["plain"][0]
        for name, build in (("prune", prune_model), ("parametrize", parametrize_model)):
            m = build(start, masks)
            variants[name] = (m, adam(m.parameters()))
        g = torch.Generator().manual_seed(5)
        data = (
            torch.randn(batch, width, generator=g).to(cfg.device),
            torch.randint(0, width, (batch,), generator=g).to(cfg.device),
        )
        times = measure(training_variants(variants, data, F.cross_entropy, mask_grads(masks)), cfg)
    m = medians(times, "fb", "step")
    r = {k: v / m["plain"] for k, v in m.items()}
    rivals = min(r["prune"], r["parametrize"])
    what = f"3 x Linear({width}, {width}) MLP, batch {batch}, 50% masks, Adam(foreach); training step"
    return [
        Row(
            "12",
            "MLP masks: library",
            r["library"],
            None,
            f"{what}; default audit; B: {FAIR}",
            threads,
            "< prune, param.",
            r["library"] < rivals,
            m,
        ),
        Row(
            "12",
            "MLP masks: library, audit off",
            r["library_off"],
            None,
            "as above, audit_every=0",
            threads,
            "< prune, param.",
            r["library_off"] < rivals,
            m,
        ),
        Row(
            "12",
            "MLP masks: torch prune",
            r["prune"],
            None,
            "prune.custom_from_mask (weight = weight_orig * mask in a forward pre-hook)",
            threads,
            medians=m,
        ),
        Row(
            "12",
            "MLP masks: parametrize",
            r["parametrize"],
            None,
            "parametrize.register_parametrization(w * mask), recomputed on every access",
            threads,
            medians=m,
        ),
    ]


# -- row 13: peak memory, each variant in its own subprocess ---------------------------------------
MEMORY_VARIANTS = ("plain", "library_off", "library", "prune")


def vm_hwm() -> int:
    """Peak resident set size of this process, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_child(variant: str, size: int, device: str) -> dict:
    """Run in a fresh process: build 8 x Linear(size, size) with 50% masks and Adam, train 3 steps;
    return the peak memory above what the process held before building anything."""
    before = vm_hwm() if device == "cpu" else 0
    torch.manual_seed(0)
    model = linears(8, size).to(device)
    masks = random_masks(model, device)
    project = None
    if variant == "prune":
        model = prune_model(model, masks, inplace=True)
        masks = {}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    if variant.startswith("library"):
        opt = co.ConstrainedOptimizer(opt, model, audit_every=0 if variant == "library_off" else 1)
        attach_masks(masks)(opt, model)
        masks = {}  # the user's masks now live in the constraints
    elif variant == "plain":
        project = mask_grads(masks)
    x = torch.randn(8, size, device=device)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        if project is not None:
            project(model)
        opt.step()
    sync(device)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else vm_hwm() - before
    return {"variant": variant, "peak_bytes": peak}


def row_memory(cfg: Config) -> list[Row]:
    size = 512 if cfg.quick else 2048
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, PYTHONPATH=str(ROOT))
    # concurrent: each reads its own process's peak, so they need not wait for one another
    children = {
        v: subprocess.Popen(
            [sys.executable, __file__, "--child", f"memory:{v}:{size}", "--device", cfg.device],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for v in MEMORY_VARIANTS
    }
    peaks = {}
    for variant, child in children.items():
        out, _ = child.communicate(timeout=600)
        if child.returncode:
            raise RuntimeError(f"memory subprocess {variant} exited {child.returncode}")
        peaks[variant] = json.loads(out.strip().splitlines()[-1])["peak_bytes"]
    where = (
        "torch.cuda.max_memory_allocated"
        if cfg.device.startswith("cuda")
        else f"VmHWM above the process's import-time peak, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"
    )
    base = f"8 x Linear({size}, {size}) 50% masks, Adam(foreach), 3 training steps, own subprocess each"
    mib = {k: f"{v / 2**20:.0f}" for k, v in peaks.items()}
    r = {k: v / peaks["plain"] for k, v in peaks.items()}
    return [
        Row(
            "13",
            "peak memory: library, audit off",
            r["library_off"],
            1.05,
            f"{base}; {where}; B: plain Adam masking its gradients with uint8 masks "
            f"(MiB: plain {mib['plain']}, library off {mib['library_off']}, default {mib['library']}, "
            f"prune {mib['prune']})",
            None,
            medians=peaks,
        ),
        Row("13", "peak memory: library, default", r["library"], 1.05, "B as above", None, medians=peaks),
        Row(
            "13",
            "peak memory: torch prune",
            r["prune"],
            None,
            "weight_orig + float mask + computed weight",
            None,
            medians=peaks,
        ),
    ]


# -- row 11: torch.compile, in a subprocess so a slow compile is bounded ---------------------------
def compile_child(backend: str, size: int, device: str, repeats: int) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    cfg = Config(device=device, repeats=repeats, warmup=2)
    torch.manual_seed(0)
    model = linears(8, size)
    masks = random_masks(model, device)
    variants = pair(model.to(device), adam, attach_masks(masks), {"lib": 0})
    phases = synthetic_variants(variants, mask_grads(masks), device)
    result = {"backend": backend}
    for name, ph in phases.items():
        counters.clear()
        step = torch.compile(variants[name][1].step, backend=backend)
        ph[0][1]()
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        result[f"compile_s_{name}"] = time.perf_counter() - start
        result[f"graph_breaks_{name}"] = sum(counters["graph_break"].values())
        result[f"break_reasons_{name}"] = sorted(
            {r.strip().splitlines()[0][:90] for r in counters["graph_break"]}
        )
        result[f"graphs_{name}"] = counters["stats"].get("unique_graphs", 0)
        ph[-1] = ("step", step)
    times = measure(phases, cfg)
    result["ratio"] = ratio(times, "lib", "plain", "step")
    result["medians"] = medians(times, "step")
    return result


def row_compile(cfg: Config) -> list[Row]:
    if not cfg.compile:
        return [
            Row("11", "torch.compile(opt.step), audit off", None, None, "pass --compile (tens of seconds)")
        ]
    size = 256 if cfg.quick else 1024
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    failures = []
    for backend, limit in (("inductor", 300), ("aot_eager", 200)):
        try:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    f"compile:{backend}:{size}",
                    "--device",
                    cfg.device,
                    "--repeats",
                    str(cfg.repeats),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=limit,
            )
        except subprocess.TimeoutExpired:
            failures.append(f"{backend}: no result within {limit} s")
            continue
        if out.returncode != 0:
            failures.append(f"{backend} failed: {(out.stderr.strip().splitlines() or ['?'])[-1][:120]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        reasons = "; ".join(r["break_reasons_lib"][:3]) or "none"
        note = (
            f"8 x Linear({size}, {size}) masked, Adam(foreach), backend {backend}"
            + (f" ({'; '.join(failures)})" if failures else "")
            + f"; B: plain Adam's compiled step, {FAIR}. Compile time (not in the ratio): library "
            f"{r['compile_s_lib']:.1f} s, plain {r['compile_s_plain']:.1f} s. Graph breaks: library "
            f"{r['graph_breaks_lib']} ({reasons}), plain {r['graph_breaks_plain']}"
        )
        return [
            Row(
                "11",
                "torch.compile(opt.step), audit off",
                r["ratio"],
                None,
                note,
                torch.get_num_threads(),
                medians=r,
            )
        ]
    return [Row("11", "torch.compile(opt.step), audit off", None, None, "; ".join(failures))]


# -- the table -------------------------------------------------------------------------------------
FAMILIES: dict[str, Callable[[Config], list[Row]]] = {
    "1": rows_masked_linear,
    "2": rows_masked_linear,
    "3": row_symmetric,
    "4": row_fixed_conv,
    "5": row_nm_dynamic,
    "6": rows_resnet_sgd,
    "7": row_resnet_adamw,
    "8": rows_gpt,
    "9": row_many_small,
    "10": row_orthogonal,
    "11": row_compile,
    "12": row_mlp_alternatives,
    "13": row_memory,
}


def machine(cfg: Config) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": cfg.threads or torch.get_num_threads(),
        "model_row_threads": 1,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": cfg.device,
    }
    if cfg.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(rows: list[Row], info: dict, cfg: Config) -> None:
    from rich.console import Console
    from rich.table import Table

    where = f"{info['cpu']}, {info['cores']} cores" + (f", {info['gpu']}" if "gpu" in info else "")
    title = (
        f"constrained_optim benchmarks: library / fair baseline\n{where}, torch {info['torch']}, "
        f"{info['threads']} threads (model rows: 1), device {cfg.device}, {info['date']}"
    )
    caption = (
        f"Ratios of medians over {cfg.repeats} interleaved rounds after {cfg.warmup} warm-up rounds "
        "(time, or peak memory for row 13). Fair baseline B: plain torch fed the SAME projected "
        "gradients, projected outside the timed region: torch's CPU Adam is about 1.6x slower when "
        "half its gradient entries are exact zeros, a cost of the masked problem, not of the "
        "library. On a shared machine single ratios are noisy."
    )
    table = Table(title=title, caption=caption, caption_justify="left")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("benchmark", no_wrap=True)
    table.add_column("ratio", justify="right", no_wrap=True)
    table.add_column("target", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("thr", justify="right", no_wrap=True)
    table.add_column("baseline B and notes", ratio=1)
    for r in rows:
        value = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        style = {"PASS": "green", "MISS": "red"}.get(r.status, "dim")
        table.add_row(
            r.row,
            r.name,
            value,
            r.target_label,
            f"[{style}]{r.status}[/{style}]",
            "" if r.threads is None else str(r.threads),
            r.note,
        )
    Console(width=None if sys.stdout.isatty() else 170).print(table)


def wanted_rows(spec: str | None) -> list[str]:
    if not spec:
        return list(FAMILIES)
    rows = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [r for r in rows if r not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; rows are {', '.join(FAMILIES)}")
    return rows


def run_rows(wanted: list[str], cfg: Config) -> list[Row]:
    rows, done = [], set()
    for key in wanted:
        family = FAMILIES[key]
        if family in done:
            continue
        done.add(family)
        if sys.stderr.isatty():
            print(f"row {key} ...", file=sys.stderr, flush=True)
        rows += [r for r in family(cfg) if r.row in wanted]
    return sorted(rows, key=lambda r: int(r.row))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, small sizes (under a minute)")
    parser.add_argument("--rows", help="comma-separated row numbers, e.g. 1,3,9 (default: all)")
    parser.add_argument("--repeats", type=int, help="timed rounds per row (default 30, --quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 3, --quick 1)")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="torch threads for the synthetic rows (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="run row 11 (torch.compile; tens of seconds)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")

    if args.child:  # one measurement in a fresh process (rows 11 and 13)
        kind, variant, size = args.child.split(":")
        if kind == "memory":
            print(json.dumps(memory_child(variant, int(size), args.device)))
        else:
            print(json.dumps(compile_child(variant, int(size), args.device, args.repeats or 30)))
        return

    cfg = Config(
        device=args.device,
        quick=args.quick,
        threads=args.threads,
        repeats=args.repeats or (3 if args.quick else 30),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 3),
        compile=args.compile or False,
    )
    info = machine(cfg)
    rows = run_rows(wanted_rows(args.rows), cfg)
    print_table(rows, info, cfg)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": info,
                    "repeats": cfg.repeats,
                    "warmup": cfg.warmup,
                    "quick": cfg.quick,
                    "rows": [
                        {
                            "row": r.row,
                            "name": r.name,
                            "ratio": r.ratio,
                            "target": r.target_label,
                            "status": r.status,
                            "threads": r.threads,
                            "note": r.note,
                            "medians": r.medians,
                        }
                        for r in rows
                    ],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
