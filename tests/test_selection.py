"""Targets to parameters (`constrained_optim.selection`): names, modules, globs, regexes, module
classes and parameters; tied weights, wrapped models, owners and the close-match error. Real
modules throughout; nothing here steps an optimizer."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from constrained_optim import ConstraintError
from constrained_optim.selection import Match, ParamIndex, select, unwrap


class TinyGPT(nn.Module):
    """GPT-2's shape in miniature: the LM head shares the token embedding's weight."""

    def __init__(self, vocab=16, dim=8, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {"ln": nn.LayerNorm(dim), "attn": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim)}
            )
            for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as GPT-2's LM head

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = h + b["proj"](b["attn"](b["ln"](h))[..., : h.shape[-1]])
        return self.head(self.ln_f(h))


# the first torch.compile imports dynamo, which touches torch.jit's deprecated script_method
quiet_compile = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)


def index_of(model, wrapped=None):
    """The index of ``wrapped`` (default: ``model``) with an optimizer over ``model``."""
    return ParamIndex(model if wrapped is None else wrapped, torch.optim.SGD(model.parameters(), lr=0.1))


def names(matches):
    return [m.name for m in matches]


# -- the existing targets ------------------------------------------------------------------------
def test_names_modules_globs_regexes_and_parameters():
    model = TinyGPT()
    index = index_of(model)
    assert names(select("blocks.0.attn.weight", index)) == ["blocks.0.attn.weight"]
    assert names(select("blocks.1.proj", index)) == ["blocks.1.proj.weight"]  # a module: its weight
    assert names(select("blocks.*.attn.*", index)) == [
        "blocks.0.attn.weight",
        "blocks.0.attn.bias",
        "blocks.1.attn.weight",
        "blocks.1.attn.bias",
    ]
    assert names(select(re.compile(r"blocks\.\d\.ln\.bias"), index)) == [
        "blocks.0.ln.bias",
        "blocks.1.ln.bias",
    ]
    with pytest.raises(ConstraintError):  # fullmatch, not search
        select(re.compile(r"blocks\.0"), index)
    (m,) = select(model.blocks[0].proj.bias, index)
    assert isinstance(m, Match) and m.name == "blocks.0.proj.bias" and m.param is model.blocks[0].proj.bias
    assert m.owner is model.blocks[0].proj
    assert select("blocks.0.proj.bias", index) == [m] != select("blocks.1.proj.bias", index)  # by identity


def test_matches_are_in_model_order_and_each_parameter_once():
    model = TinyGPT()
    index = index_of(model)
    canonical = [n for n, _ in model.named_parameters()]
    found = names(select("*", index))
    assert found == canonical  # every parameter once, the tied one under its first name
    assert names(select(re.compile(r".*(proj|attn)\.weight"), index)) == [
        "blocks.0.attn.weight",
        "blocks.0.proj.weight",
        "blocks.1.attn.weight",
        "blocks.1.proj.weight",
    ]


def test_a_target_matching_nothing_names_the_closest_parameters():
    index = index_of(TinyGPT())
    with pytest.raises(
        ConstraintError,
        match=r"'blocks\.0\.atn\.weight' matches no parameter; "
        r"closest: blocks\.0\.attn\.weight",
    ):
        select("blocks.0.atn.weight", index)
    with pytest.raises(ConstraintError, match=r"glob 'blocks\.\*\.mlp\.weight'.*closest: .*blocks"):
        select("blocks.*.mlp.weight", index)
    with pytest.raises(ConstraintError, match="regex"):
        select(re.compile(r"nothing\.here"), index)
    with pytest.raises(ConstraintError, match="not a parameter of the model"):
        select(nn.Parameter(torch.zeros(3)), index)
    with pytest.raises(ConstraintError, match="target must be"):
        select(3, index)


def test_without_a_model_names_are_optimizer_positions():
    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [a, b]}, {"params": [c], "lr": 0.5}], lr=0.1)
    index = ParamIndex(None, opt)
    assert list(index.names) == [
        "param_groups[0].params[0]",
        "param_groups[0].params[1]",
        "param_groups[1].params[0]",
    ]
    assert index.name_of(c) == "param_groups[1].params[0]" and index.owner_of(c) is None
    assert [(m.name, m.owner) for m in select(b, index)] == [("param_groups[0].params[1]", None)]
    assert select("param_groups[1].params[0]", index)[0].param is c
    with pytest.raises(ConstraintError, match="needs the model"):
        select(nn.Linear, index)


# -- tied weights ------------------------------------------------------------------------------------
def test_a_tied_weight_is_reachable_by_every_name_and_bound_once():
    model = TinyGPT()
    index = index_of(model)
    tied = model.embed.weight
    assert model.head.weight is tied
    assert index.names["head.weight"] is tied and index.names["embed.weight"] is tied
    assert index.name_of(tied) == "embed.weight" == next(iter(dict(model.named_parameters())))
    for target in ("head", "head.weight", "embed", "embed.weight", tied):
        (m,) = select(target, index)
        assert m.param is tied and m.name == "embed.weight", target
    assert index.owner_of(tied) is model.embed  # the module holding it under the canonical name
    (m,) = select("*ead.weight", index)  # matches only the duplicate name: still found, once
    assert m.name == "embed.weight"
    found = select(re.compile(r"(embed|head)\.weight"), index)
    assert len(found) == 1 and found[0].param is tied


def test_names_include_every_alias_and_lookup_takes_any():
    model = TinyGPT()
    index = index_of(model)
    all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert list(index.names) == all_names and "head.weight" in index.names
    assert index.lookup("head.weight") is model.embed.weight
    assert index.lookup("head") is None  # lookup is for parameter names; select adds the .weight


def test_shared_submodule_is_one_parameter_with_two_names():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    index = index_of(model)
    assert {"0.weight", "2.weight"} <= set(index.names)
    assert names(select("2", index)) == ["0.weight"]
    assert names(select(nn.Linear, index)) == ["0.weight"]


# -- wrapped models ------------------------------------------------------------------------------------
def test_data_parallel_names_work_with_and_without_the_prefix():
    model = TinyGPT()
    wrapped = nn.DataParallel(model)  # no GPU needed to build it
    assert unwrap(wrapped) is model
    index = index_of(model, wrapped)
    assert list(index.names) == [n for n, _ in model.named_parameters(remove_duplicate=False)]
    w = model.blocks[1].attn.weight
    for target in (
        "blocks.1.attn.weight",
        "module.blocks.1.attn.weight",
        "blocks.1.attn",
        "module.blocks.1.attn",
        re.compile(r"module\.blocks\.1\.attn\.weight"),
        w,
    ):
        (m,) = select(target, index)
        assert m.param is w and m.name == "blocks.1.attn.weight", target  # canonical: inner names
    assert names(select("module.blocks.*.proj.weight", index)) == names(select("blocks.*.proj.weight", index))
    (m,) = select("module.head", index)
    assert m.name == "embed.weight"
    with pytest.raises(ConstraintError, match="closest: blocks.1.attn.weight"):
        select("module.blocks.1.atn.weight", index)


@quiet_compile
def test_torch_compile_names_work_with_and_without_the_prefix():
    model = TinyGPT()
    compiled = torch.compile(model)  # never run: only its naming matters here
    assert unwrap(compiled) is model
    index = index_of(model, compiled)
    w = model.blocks[0].proj.weight
    for target in ("blocks.0.proj.weight", "_orig_mod.blocks.0.proj.weight", "_orig_mod.blocks.0.proj"):
        (m,) = select(target, index)
        assert m.param is w and m.name == "blocks.0.proj.weight"
    assert index.owner_of(w) is model.blocks[0].proj


@quiet_compile
def test_stacked_wrappers_are_all_looked_through():
    model = TinyGPT()
    wrapped = nn.DataParallel(torch.compile(model))
    assert unwrap(wrapped) is model
    index = index_of(model, wrapped)
    w = model.ln_f.weight
    for target in ("ln_f.weight", "module._orig_mod.ln_f.weight", "_orig_mod.ln_f.weight"):
        assert select(target, index)[0].param is w, target
    assert index.lookup("_orig_mod.module.ln_f.weight") is None  # not a real nesting
    assert unwrap(model) is model and unwrap(None) is None


# -- module classes ------------------------------------------------------------------------------------
def test_a_module_class_selects_the_weight_of_every_such_module():
    model = TinyGPT()
    index = index_of(model)
    linear = names(select(nn.Linear, index))
    # every Linear's weight, and the tied head once (as the embedding's weight); no LayerNorm
    assert linear == [
        "embed.weight",
        "blocks.0.attn.weight",
        "blocks.0.proj.weight",
        "blocks.1.attn.weight",
        "blocks.1.proj.weight",
    ]
    assert names(select(nn.LayerNorm, index)) == ["blocks.0.ln.weight", "blocks.1.ln.weight", "ln_f.weight"]
    assert all(isinstance(m.owner, nn.LayerNorm) for m in select(nn.LayerNorm, index))
    assert names(select(nn.Module, index)) == [n for n, _ in model.named_parameters() if n.endswith("weight")]


def test_a_module_class_selects_subclasses_too():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(2, 3), MyLinear(3, 2))
    index = index_of(model)
    assert names(select(nn.Linear, index)) == ["0.weight", "1.weight"]
    assert names(select(MyLinear, index)) == ["1.weight"]


def test_a_module_class_the_model_lacks_names_the_classes_it_has():
    model = TinyGPT()
    with pytest.raises(
        ConstraintError,
        match=r"Conv2d is not among the model's modules; the model "
        r"has: TinyGPT, Embedding, ModuleList, ModuleDict, "
        r"LayerNorm, Linear",
    ):
        select(nn.Conv2d, index_of(model))
    with pytest.raises(ConstraintError, match="ReLU has no weight parameter"):
        select(nn.ReLU, index_of(nn.Sequential(nn.Linear(2, 2), nn.ReLU())))
    with pytest.raises(ConstraintError, match="target must be"):
        select(int, index_of(model))


def test_module_class_through_a_wrapper():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4))
    index = index_of(model, nn.DataParallel(model))
    assert names(select(nn.Conv2d, index)) == ["0.weight"]
    assert names(select(nn.Linear, index)) == ["2.weight"]


# -- owners --------------------------------------------------------------------------------------------
@quiet_compile
def test_owners_are_the_modules_holding_each_parameter():
    model = nn.Sequential(nn.Linear(4, 6), nn.Conv2d(6, 4, 3), nn.ConvTranspose2d(4, 2, 3), nn.BatchNorm2d(2))
    index = index_of(model, torch.compile(model))
    for m in select("*", index):
        module = model[int(m.name.split(".")[0])]
        assert m.owner is module and index.owner_of(m.param) is module, m.name
        assert getattr(module, m.name.split(".")[1]) is m.param
    kinds = {m.name: type(m.owner) for m in select("*.weight", index)}
    assert kinds == {
        "0.weight": nn.Linear,
        "1.weight": nn.Conv2d,
        "2.weight": nn.ConvTranspose2d,
        "3.weight": nn.BatchNorm2d,
    }
    with pytest.raises(KeyError):
        index.owner_of(nn.Parameter(torch.zeros(1)))


def test_a_real_gpt2_ties_its_head_and_its_conv1d_owners_are_known():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    index = index_of(model)
    (head,) = select("lm_head", index)
    assert head.param is model.transformer.wte.weight and head.name == "transformer.wte.weight"
    matched = select(re.compile(r"transformer\.h\.\d+\.(attn|mlp)\.c_\w+\.weight"), index)
    assert len(matched) == 8 and all(isinstance(m.owner, Conv1D) for m in matched)
    assert names(select(Conv1D, index)) == names(matched)
