"""Round-to-nearest: the grid and codes against hand-computed values and against
compressed-tensors' own quantizer, searched clipping, model-level RTN, and bad inputs."""

from __future__ import annotations

import pytest
import torch

from quant.rtn import (QuantError, WeightQuantSpec, check_model, quant_grid, quantizable_layers,
                       quantize_model_rtn, quantize_rtn)
from workbench.models import build_model_from_config


def test_hand_computed_asymmetric_2bit_codes():
    # lo = -1, hi = 2: s = 3/3 = 1, z = round(1/1) = 1; q = clamp(round(W) + 1, 0, 3)
    w = torch.tensor([[-1.0, -0.4, 0.6, 2.0, 1.4]])
    qw = quantize_rtn(w, WeightQuantSpec(bits=2, granularity="channel", symmetric=False))
    assert qw.scale.tolist() == [[1.0]] and qw.zero_point.tolist() == [[1]]
    assert qw.codes.tolist() == [[0, 1, 2, 3, 2]]
    assert qw.dequantize().tolist() == [[-1.0, 0.0, 1.0, 2.0, 1.0]]


def test_hand_computed_symmetric_3bit_codes():
    # absmax = 3.5: s = 2·3.5/7 = 1, z = 4; codes −4..3 around z, so 3.5 clips to 3
    w = torch.tensor([[3.5, -3.5, 0.4, -1.6]])
    qw = quantize_rtn(w, WeightQuantSpec(bits=3, symmetric=True))
    assert qw.scale.tolist() == [[1.0]] and qw.zero_point.tolist() == [[4]]
    assert qw.codes.tolist() == [[7, 0, 4, 2]]
    assert qw.dequantize().tolist() == [[3.0, -4.0, 0.0, -2.0]]


def test_groups_and_tensor_grid_shapes():
    w = torch.randn(6, 32)
    assert quantize_rtn(w, WeightQuantSpec(granularity="group", group_size=8, symmetric=False)).scale.shape == (6, 4)
    assert quantize_rtn(w, WeightQuantSpec(granularity="channel", symmetric=False)).scale.shape == (6, 1)
    tensor = quantize_rtn(w, WeightQuantSpec(granularity="tensor", symmetric=False))
    assert tensor.scale.shape == (1, 1)
    lo, hi = float(w.min()), float(w.max())
    assert tensor.scale.item() == pytest.approx((hi - lo) / 15, rel=1e-6)
    # each group's grid comes from that group alone
    group = quantize_rtn(w, WeightQuantSpec(granularity="group", group_size=8, symmetric=True))
    assert group.scale[2, 1].item() == pytest.approx(2 * w[2, 8:16].abs().max().item() / 15, rel=1e-6)


@pytest.mark.parametrize("symmetric,strategy,group", [(False, "channel", None), (True, "channel", None),
                                                      (False, "group", 16), (True, "group", 16)])
def test_same_grid_and_codes_as_compressed_tensors(symmetric, strategy, group):
    import compressed_tensors.quantization as ct
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(0)
    w = torch.randn(16, 64)
    args = ct.QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy=strategy, group_size=group)
    view = w.reshape(16, -1, group or 64)
    scale, zp = calculate_qparams(view.amin(-1), view.amax(-1), args)
    theirs = quantize(w, scale, zp, args, dtype=torch.int8)
    ours = quantize_rtn(w, WeightQuantSpec(bits=4, symmetric=symmetric, granularity=strategy,
                                           group_size=group or 128))
    assert torch.allclose(ours.scale, scale.reshape(ours.scale.shape), rtol=1e-6)
    assert torch.equal(ours.zero_point.int() - 8, zp.reshape(ours.zero_point.shape).int())
    assert torch.equal(ours.codes.int() - 8, theirs.int())


def test_searched_clipping_is_never_worse_and_helps_outliers():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[:, 0] *= 12  # one outlier column stretches every min-max range
    spec_mm, spec_search = WeightQuantSpec(bits=3, symmetric=False), WeightQuantSpec(bits=3, clipping="search", symmetric=False)
    err_mm = (quantize_rtn(w, spec_mm).dequantize() - w).pow(2).sum(1)
    err_search = (quantize_rtn(w, spec_search).dequantize() - w).pow(2).sum(1)
    # the search minimises Σ|e|^2.4, not Σe², so compare with that norm row by row
    norm = lambda spec: (quantize_rtn(w, spec).dequantize() - w).abs().pow(2.4).sum(1)  # noqa: E731
    assert bool((norm(spec_search) <= norm(spec_mm) * (1 + 1e-6)).all())
    assert float(err_search.sum()) < float(err_mm.sum())
    assert bool((quant_grid(w, spec_search)[0] <= quant_grid(w, spec_mm)[0] + 1e-9).all())


def test_model_rtn_quantizes_block_linears_only():
    model = build_model_from_config("llama-tiny", vocab_size=64, seed=0)
    embed = model.model.embed_tokens.weight.clone()
    head = model.lm_head.weight.clone()
    original = model.model.layers[1].mlp.down_proj.weight.clone()
    spec = WeightQuantSpec(bits=4, granularity="group", group_size=16, symmetric=False)
    codes = quantize_model_rtn(model, spec)
    assert len(codes) == 2 * 7 and "lm_head" not in codes
    assert torch.equal(model.model.embed_tokens.weight, embed) and torch.equal(model.lm_head.weight, head)
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(model.get_submodule(name).weight, codes[name].dequantize())
    assert torch.equal(codes[name].codes, quantize_rtn(original, spec).codes)
    only = quantizable_layers(build_model_from_config("llama-tiny", vocab_size=64), ["q_proj", "mlp.up_proj"])
    assert sorted(n.split(".", 3)[-1] for n in only) == ["mlp.up_proj", "mlp.up_proj",
                                                         "self_attn.q_proj", "self_attn.q_proj"]


@pytest.mark.parametrize("bits", [1, 9, 4.0])
def test_bits_outside_2_to_8_are_refused(bits):
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        WeightQuantSpec(bits=bits)


def test_bad_weights_and_models_are_named():
    model = build_model_from_config("llama-tiny", vocab_size=64, seed=0)
    with pytest.raises(QuantError, match=r"model.layers.0.self_attn.q_proj.weight: group_size=24 does "
                                         r"not divide the input width 32"):
        check_model(model, WeightQuantSpec(granularity="group", group_size=24, symmetric=False))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, :3] = float("nan")
    with pytest.raises(QuantError, match=r"model.layers.1.mlp.up_proj.weight: 3 NaN or infinite"):
        quantize_model_rtn(model, WeightQuantSpec(symmetric=False))
    with pytest.raises(QuantError, match=r"no supported linear layers .*self_attn.q_proj"):
        quantizable_layers(model, ["query"])
    with pytest.raises(QuantError, match="no transformer blocks found"):
        quantizable_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))
