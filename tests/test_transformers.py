"""HuggingFace Trainer: a tiny GPT-2 trained under 2:4 sparsity, both recipes (a ConstrainedOptimizer
passed in, and co.constrain on the Trainer's own optimizer from a callback), the audit in the log
history, and a resumed run equal to the uninterrupted one bitwise. No downloads: the model is built
from a config and the data is random tokens."""

from __future__ import annotations

import math
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import constrained_optim as co  # noqa: E402
from constrained_optim.transformers import AuditCallback, constrain_trainer  # noqa: E402

TARGET = re.compile(r"transformer\.h\.\d+\.(attn|mlp)\.c_\w+\.weight")
TARGETED = [
    f"transformer.h.{i}.{m}.weight"
    for i in range(2)
    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]
STEPS, SAVE_AT, BATCH = 6, 3, 4


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=64,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,  # no RNG in the forward
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):
    """Random token sequences, the labels their inputs (the model shifts them)."""

    def __init__(self, n=4 * BATCH, length=16):
        self.ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def arguments(out) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        save_strategy="steps",
        save_steps=SAVE_AT,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        learning_rate=1e-2,
        weight_decay=0.1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


class Recorder(TrainerCallback):
    """Stands in for a report_to integration: keeps what each on_log hands it."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


class Constrain(TrainerCallback):
    """Recipe (b): constrain the optimizer the Trainer built, when training begins."""

    def __init__(self, audit: AuditCallback):
        self.audit = audit
        self.handle = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.handle = co.constrain(optimizer, model, {TARGET: co.NMSparsity(2, 4)})
        self.audit.sources.append(self.handle)


def recipe_wrapped(out):
    """Recipe (a): a ConstrainedOptimizer passed as the Trainer's optimizer."""
    model = gpt2()
    opt = co.ConstrainedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model, {TARGET: co.NMSparsity(2, 4)}
    )
    recorder = Recorder()
    trainer = Trainer(
        model=model,
        args=arguments(out),
        train_dataset=Tokens(),
        optimizers=(opt, None),
        callbacks=[AuditCallback(), recorder],
    )
    return trainer, model, recorder, lambda: opt


def recipe_hooked(out):
    """Recipe (b): the Trainer's own AdamW, constrained from a callback at on_train_begin."""
    model = gpt2()
    recorder = Recorder()
    audit = AuditCallback()
    constrain = Constrain(audit)
    trainer = Trainer(
        model=model, args=arguments(out), train_dataset=Tokens(), callbacks=[constrain, recorder]
    )
    audit.add_to(trainer)  # ahead of the reporting callbacks
    return trainer, model, recorder, lambda: constrain.handle


def recipe_trainer_built(out):
    """Recipe (c): the Trainer's own AdamW, constrained as the Trainer builds it."""
    model = gpt2()
    recorder = Recorder()
    trainer = Trainer(model=model, args=arguments(out), train_dataset=Tokens(), callbacks=[recorder])
    audit = constrain_trainer(trainer, {TARGET: co.NMSparsity(2, 4)})
    return trainer, model, recorder, lambda: audit.sources[0]


def assert_two_of_four_along_the_input_dim(model):
    params = dict(model.named_parameters())
    for name in TARGETED:
        w = params[name].detach()
        fan_in, fan_out = w.shape  # transformers' Conv1D stores (in, out)
        assert fan_in == model.config.n_embd or fan_in == 4 * model.config.n_embd
        groups = w.reshape(fan_in // 4, 4, fan_out)  # runs of 4 along dim 0, the input dim
        nonzero = (groups != 0).sum(dim=1)
        assert bool((nonzero == 2).all()), (name, nonzero.unique(return_counts=True))


def assert_audit_in_log_history(trainer, recorder, first_step=1):
    """Every training log of the run has the audit figures: those in ``log_history`` (a resumed
    Trainer's holds the checkpoint's, from its trainer_state.json) and those a report_to
    integration was handed from ``first_step`` on."""
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in train_logs] == list(range(1, STEPS + 1))
    for entry in train_logs:
        for name in TARGETED:
            for metric in ("drift", "residual", "grad_blocked"):
                assert f"constraints/{name}/{metric}" in entry, (entry["step"], name, metric)
            assert entry[f"constraints/{name}/drift"] == 0.0  # a mask: AdamW's step stays on the set
            assert entry[f"constraints/{name}/residual"] == 0.0
            assert 0.0 < entry[f"constraints/{name}/grad_blocked"] < 1.0
        assert entry["constraints/residual_max"] == 0.0 and entry["constraints/drift_max"] == 0.0
    seen = [e for e in recorder.logs if "loss" in e]  # what a report_to integration receives
    assert [e.get("step") for e in seen] == [None] * len(seen)
    assert len(seen) == STEPS - first_step + 1
    for entry, logged in zip(seen, train_logs[first_step - 1 :]):
        assert {k: v for k, v in logged.items() if k != "step"} == entry


@pytest.mark.parametrize(
    "recipe",
    [recipe_wrapped, recipe_hooked, recipe_trainer_built],
    ids=["wrapped", "constrain", "constrain_trainer"],
)
def test_trainer_keeps_2_4_sparsity_logs_the_audit_and_resumes_exactly(tmp_path, recipe):
    trainer, model, recorder, engine = recipe(tmp_path / "full")
    trainer.train()
    assert trainer.state.global_step == STEPS
    assert_two_of_four_along_the_input_dim(model)
    assert_audit_in_log_history(trainer, recorder)
    assert engine().steps_taken == STEPS
    before = gpt2()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))

    resumed, model2, recorder2, engine2 = recipe(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{SAVE_AT}"))
    assert resumed.state.global_step == STEPS
    full, again = dict(model.named_parameters()), dict(model2.named_parameters())
    assert list(full) == list(again)
    different = [n for n in full if not torch.equal(full[n], again[n])]
    assert different == [], f"resumed run differs from the uninterrupted one in {different}"
    assert_two_of_four_along_the_input_dim(model2)
    assert_audit_in_log_history(resumed, recorder2, first_step=SAVE_AT + 1)
    if recipe is not recipe_hooked:  # the optimizer's state_dict carried the step count and audit
        assert engine2().steps_taken == STEPS
        assert sorted({r.step for r in engine2().audit.history}) == list(range(1, STEPS + 1))


# -- the callback alone ------------------------------------------------------------------------------
class State:
    def __init__(self, step, history):
        self.global_step, self.log_history = step, history


def test_audit_callback_reports_each_audited_step_once_and_into_log_history():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    opt = co.ConstrainedOptimizer(
        torch.optim.SGD(lin.parameters(), lr=0.1), lin, {"weight": co.MaxNorm(0.5), "bias": co.NonNegative()}
    )
    lin(torch.randn(8, 4)).square().sum().backward()
    opt.step()
    callback = AuditCallback(opt, metrics=("drift", "residual"))
    logs = {"loss": 1.0}
    state = State(1, [{**logs, "step": 1}])
    callback.on_log(None, state, None, logs=logs)
    expected = {
        "constraints/weight/drift",
        "constraints/weight/residual",
        "constraints/bias/drift",
        "constraints/bias/residual",
        "constraints/drift_max",
        "constraints/residual_max",
    }
    assert set(logs) == {"loss"} | expected and set(state.log_history[-1]) == {"loss", "step"} | expected
    assert all(math.isfinite(v) for v in logs.values())
    evaluation = {"eval_loss": 2.0}  # an evaluation log at the same step: nothing new to report
    state.log_history.append({**evaluation, "step": 1})
    callback.on_log(None, state, None, logs=evaluation)
    assert evaluation == {"eval_loss": 2.0}
    with pytest.raises(co.ConstraintError, match="sources"):
        AuditCallback(torch.optim.SGD(lin.parameters(), lr=0.1))
    with pytest.raises(co.ConstraintError, match="unknown metrics"):
        AuditCallback(opt, metrics=("drift", "speed"))
