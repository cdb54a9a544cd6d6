"""PyTorch Lightning: a LightningModule whose configure_optimizers returns a ConstrainedOptimizer
(or constrains its own optimizer with co.constrain) trains with its constraints holding, the
audit lines in its log, and AuditCallback's metrics in the trainer's logger."""

from __future__ import annotations

import csv
import logging

import pytest
import torch
from torch import nn

import constrained_optim as co

pl = pytest.importorskip("lightning.pytorch")
from constrained_optim.lightning import AuditCallback  # noqa: E402

pytestmark = [  # Lightning's own notices, about its internals
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),
]

FREE = torch.tensor([[True, False, True, True], [False, True, True, False]])
STEPS = 6


class Module(pl.LightningModule):
    def __init__(self, how="wrapper"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        self.how = how
        self.checked = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # after every optimizer step: the constraints hold exactly
        assert torch.equal(self.net[0].weight, self.net[0].weight.T)
        assert bool((self.net[2].weight[~FREE] == 0).all())
        self.checked += 1

    def configure_optimizers(self):
        inner = torch.optim.Adam(self.parameters(), lr=0.05)
        constraints = {"net.0.weight": co.Symmetric(), "net.2.weight": co.Mask(FREE)}
        if self.how == "hooks":
            self.handle = co.constrain(inner, self, constraints)
            return inner
        return co.ConstrainedOptimizer(inner, self, constraints, log_every=2)


def loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4 * STEPS, 4, generator=g), torch.randn(4 * STEPS, 2, generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(data, batch_size=4)


def fit(module, tmp_path, callbacks=(), logger=False):
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    trainer.fit(module, loader())
    return trainer


def test_lightning_trains_with_constraints_audit_lines_and_logged_metrics(tmp_path, caplog):
    torch.manual_seed(0)
    module = Module()
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    with caplog.at_level(logging.INFO, logger="constrained_optim"):
        trainer = fit(module, tmp_path, [AuditCallback()], logger)
    opt = trainer.optimizers[0]
    assert isinstance(opt, co.ConstrainedOptimizer)
    assert module.checked == STEPS and opt.steps_taken == STEPS
    assert len({r.step for r in opt.audit.history}) == STEPS
    opt.check()

    lines = [r.getMessage() for r in caplog.records if r.name == "constrained_optim"]
    assert any(line.startswith("step 2 net.0.weight Symmetric") for line in lines)
    assert any(line.startswith("step 6 net.2.weight Mask") for line in lines)

    with open(logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    for name in ("net.0.weight", "net.2.weight"):
        assert f"constraints/{name}/drift" in columns and f"constraints/{name}/residual" in columns
    logged = [float(r["constraints/net.2.weight/drift"]) for r in rows if r["constraints/net.2.weight/drift"]]
    expected = [r.drift for r in opt.audit.history if r.name == "net.2.weight"]
    assert logged == pytest.approx(expected, rel=1e-6) and len(logged) == STEPS
    assert all(float(r["constraints/residual_max"]) == 0.0 for r in rows if r["constraints/residual_max"])


def test_lightning_with_constrain_hooks_matches_the_wrapper(tmp_path):
    torch.manual_seed(0)
    wrapped = Module("wrapper")
    torch.manual_seed(0)
    hooked = Module("hooks")
    fit(wrapped, tmp_path / "a")
    fit(hooked, tmp_path / "b")
    assert hooked.checked == STEPS and hooked.handle.steps_taken == STEPS
    for p, q in zip(wrapped.parameters(), hooked.parameters()):
        assert torch.equal(p, q)


def test_lightning_checkpoint_resumes_bitwise(tmp_path):
    """Lightning saves the wrapper's state_dict (constraints and audit included) and loads it
    back into the optimizer that configure_optimizers builds again."""

    def trainer(epochs, root):
        return pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            callbacks=[pl.callbacks.ModelCheckpoint(dirpath=root, save_last=True)],
        )

    torch.manual_seed(0)
    full = Module()
    trainer(2, tmp_path / "full").fit(full, loader())
    torch.manual_seed(0)
    trainer(1, tmp_path / "half").fit(Module(), loader())
    torch.manual_seed(5)  # another init: the checkpoint replaces it
    resumed = Module()
    t = trainer(2, tmp_path / "resumed")
    t.fit(resumed, loader(), ckpt_path=tmp_path / "half" / "last.ckpt")
    assert t.optimizers[0].steps_taken == 2 * STEPS
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
