"""LoRA (unfused path) against PEFT's LoRA layer, and adapters in PEFT's format both ways."""
import copy
import json

import pytest
import torch
from torch import nn

import lowrank
from lowrank.nn import Linear4bit, LoraLinear

peft = pytest.importorskip("peft")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(32, 48)
        self.v_proj = nn.Linear(48, 32, bias=False)
        self.lm_head = nn.Linear(32, 10)

    def forward(self, x):
        return self.lm_head(torch.relu(self.v_proj(torch.relu(self.q_proj(x)))))


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


class _SeededDropout(nn.Module):
    """Dropout that draws its mask as lowrank's lean LoRA path does (a seed from the global generator)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        from lowrank.lora_function import draw_seed, dropout_keep_mask
        keep = dropout_keep_mask(draw_seed(), x.shape, self.p, x.device, x.dtype)
        return x * keep / (1 - self.p)


def _peft_twin(base, ours, use_rslora, targets, use_dora=False, lora_dropout=0.0):
    """PEFT's model over a copy of `base`, with our adapter weights copied in."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=lora_dropout,
                          use_rslora=use_rslora, use_dora=use_dora)
    twin = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, layer in lowrank.nn.lora.lora_layers(ours).items():
            t = twin.base_model.model.get_submodule(name)
            t.lora_A["default"].weight.copy_(layer.lora_A.weight)
            t.lora_B["default"].weight.copy_(layer.lora_B.weight)
            if use_dora:
                t.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    return twin


def _assert_same_forward_backward(ours, twin, rtol):
    """Outputs, dX and the gradient of every adapter parameter (A, B, and m for DoRA) agree."""
    x1 = torch.randn(5, 32, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = ours(x1), twin(x2)
    torch.testing.assert_close(y1, y2, rtol=rtol, atol=1e-6)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=rtol, atol=1e-6)
    for name, layer in lowrank.nn.lora.lora_layers(ours).items():
        t = twin.base_model.model.get_submodule(name)
        pairs = [(layer.lora_A.weight, t.lora_A["default"].weight), (layer.lora_B.weight, t.lora_B["default"].weight)]
        if layer.use_dora:
            pairs.append((layer.lora_magnitude_vector, t.lora_magnitude_vector["default"].weight))
        for ours_p, theirs_p in pairs:
            torch.testing.assert_close(ours_p.grad, theirs_p.grad, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_matches_peft_outputs_and_gradients(use_rslora, targets):
    torch.manual_seed(0)
    base = Tiny()
    ours = lowrank.add_lora(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=targets, use_rslora=use_rslora)
    _randomize_lora(ours)
    twin = _peft_twin(base, ours, use_rslora, targets)
    _assert_same_forward_backward(ours, twin, rtol=1e-6)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def _assert_round_trips_with_peft(base, ours, x, path, rtol):
    """save_adapter -> PeftModel.from_pretrained, then PEFT's save_pretrained -> load_adapter."""
    lowrank.save_adapter(ours, str(path / "ours"))
    loaded_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path / "ours"))
    torch.testing.assert_close(loaded_by_peft(x), ours(x), rtol=rtol, atol=1e-6)
    loaded_by_peft.save_pretrained(str(path / "peft"))
    again = lowrank.load_adapter(copy.deepcopy(base), str(path / "peft"))
    torch.testing.assert_close(again(x), ours(x), rtol=rtol, atol=1e-6)


def test_adapter_round_trips_with_peft(tmp_path):
    torch.manual_seed(1)
    base = Tiny()
    ours = lowrank.add_lora(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    _randomize_lora(ours)
    _assert_round_trips_with_peft(base, ours, torch.randn(3, 32), tmp_path, rtol=1e-6)


def test_load_adapter_rejects_mismatch(tmp_path):
    base = Tiny()
    ours = lowrank.add_lora(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=["q_proj"])
    lowrank.save_adapter(ours, str(tmp_path))
    other = lowrank.add_lora(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=["v_proj"])
    with pytest.raises(ValueError, match="missing .*v_proj"):
        lowrank.load_adapter(other, str(tmp_path))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    cfg["peft_type"] = "IA3"
    json.dump(cfg, open(tmp_path / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match="only LoRA adapters"):
        lowrank.load_adapter(copy.deepcopy(base), str(tmp_path))


def test_merge_unmerge_float_base_is_exact():
    torch.manual_seed(2)
    model = lowrank.add_lora(Tiny(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    _randomize_lora(model)
    w0 = model.q_proj.base_layer.weight.detach().clone()
    x = torch.randn(4, 32)
    y = model(x)
    assert lowrank.merge_lora(model) == {"q_proj": None, "v_proj": None}
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    lowrank.unmerge_lora(model)
    assert torch.equal(model.q_proj.base_layer.weight, w0)
    assert torch.equal(model(x), y)


def test_merge_4bit_base_reports_requantization_error():
    torch.manual_seed(3)
    model = lowrank.quantize_model(Tiny(), compute_dtype=None, skip_modules=("lm_head",))
    lowrank.add_lora(model, r=4, lora_alpha=8, target_modules=["q_proj"])
    _randomize_lora(model)
    packed = model.q_proj.base_layer.quant.packed.clone()
    errors = lowrank.merge_lora(model)
    assert 0.0 < errors["q_proj"] < 0.15  # one more NF4 rounding of the merged weight
    lowrank.unmerge_lora(model)
    assert torch.equal(model.q_proj.base_layer.quant.packed, packed)


def test_lora_over_linear4bit_is_base_plus_low_rank():
    torch.manual_seed(4)
    base = Linear4bit.from_linear(nn.Linear(32, 16))
    layer = LoraLinear(base, r=2, lora_alpha=4)
    _randomize_lora(layer)
    x = torch.randn(3, 32)
    expected = base(x) + 2.0 * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(r=0), ValueError, "positive int"), (dict(r=2.5), ValueError, "positive int"),
    (dict(lora_dropout=1.0), ValueError, "lora_dropout")])
def test_lora_rejects_bad_arguments(kwargs, error, match):
    args = dict(r=4, lora_alpha=8) | kwargs
    with pytest.raises(error, match=match):
        LoraLinear(nn.Linear(8, 8), **args)


def test_add_lora_rejects_no_match():
    with pytest.raises(ValueError, match="no Linear / Linear4bit module matches"):
        lowrank.add_lora(Tiny(), r=4, lora_alpha=8, target_modules=["k_proj"])
    with pytest.raises(TypeError, match="nn.Linear or lowrank.nn.Linear4bit"):
        LoraLinear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_dora_matches_peft_outputs_and_gradients(use_rslora):
    torch.manual_seed(5)
    base = Tiny()
    ours = lowrank.add_lora(copy.deepcopy(base), r=4, lora_alpha=8, target_modules="all-linear",
                            use_rslora=use_rslora, use_dora=True)
    # magnitude initialised to ||W0|| per row, as PEFT
    torch.testing.assert_close(ours.q_proj.lora_magnitude_vector, base.q_proj.weight.norm(dim=1))
    _randomize_lora(ours)  # random A, B and m: n = ||W0 + s B A|| no longer equals m
    twin = _peft_twin(base, ours, use_rslora, "all-linear", use_dora=True)
    _assert_same_forward_backward(ours, twin, rtol=1e-5)
    names = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert any("magnitude" in n for n in names)


def test_dora_adapter_round_trips_with_peft_and_merges(tmp_path):
    torch.manual_seed(6)
    base = Tiny()
    ours = lowrank.add_lora(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    _randomize_lora(ours)
    x = torch.randn(3, 32)
    _assert_round_trips_with_peft(base, ours, x, tmp_path, rtol=1e-5)
    y = ours(x)
    lowrank.merge_lora(ours)
    torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)
    lowrank.unmerge_lora(ours)
    assert torch.equal(ours(x), y)


@pytest.mark.parametrize("use_dora", [False, True])
def test_dropout_in_training_matches_peft(use_dora):
    torch.manual_seed(7)
    base = Tiny()
    ours = lowrank.add_lora(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                            lora_dropout=0.25, use_dora=use_dora).train()
    _randomize_lora(ours)
    twin = _peft_twin(base, ours, False, ["q_proj", "v_proj"], use_dora, lora_dropout=0.25).train()
    # our layer draws its mask from a seed (regenerated in backward): give PEFT that dropout (with DoRA
    # PEFT drops x once and uses x' for both the scaled base term and the low-rank term)
    for name in ("q_proj", "v_proj"):
        twin.base_model.model.get_submodule(name).lora_dropout["default"] = _SeededDropout(0.25)
    x = torch.randn(6, 32, requires_grad=True)
    torch.manual_seed(123)
    y1 = ours(x)
    torch.manual_seed(123)
    y2 = twin(x)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(y1)
    pairs = []  # (ours, PEFT's) for every adapter parameter
    for name, layer in lowrank.nn.lora.lora_layers(ours).items():
        t = twin.base_model.model.get_submodule(name)
        pairs += [(layer.lora_A.weight, t.lora_A["default"].weight), (layer.lora_B.weight, t.lora_B["default"].weight)]
        if use_dora:
            pairs.append((layer.lora_magnitude_vector, t.lora_magnitude_vector["default"].weight))
    assert len(pairs) == (6 if use_dora else 4)
    g1 = torch.autograd.grad(y1, [x] + [a for a, _ in pairs], dy)
    g2 = torch.autograd.grad(y2, [x] + [b for _, b in pairs], dy)
    for a, b in zip(g1, g2):  # the backward regenerated the same mask
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ours.eval()
    assert not torch.equal(ours(x), y1)  # dropout was really active in training
