"""SVD-truncated LoRA merges: at rank Σ r the exact update, below it the best rank-k approximation
(checked against an independent SVD of the dense update), the reported error equal to the error
measured by hand, and the adapter loadable by plain PEFT."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import lora_updates, random_lora_adapter, tiny_train_recipe
from merge.svd import svd_truncated_adapter, truncate_factored
from workbench.models import build_model_from_config
from workbench.recipes import MergeInput, MergeRecipe
from workbench.stages import run_merge, run_train

VOCAB = 64



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("svd")
    base = root / "base"
    build_model_from_config("llama-tiny", vocab_size=VOCAB).save_pretrained(base, safe_serialization=True)
    first = random_lora_adapter(root / "first", r=2, alpha=4, use_rslora=False, seed=1)
    second = random_lora_adapter(root / "second", r=4, alpha=8, use_rslora=True, seed=2)
    return root, base, [(first, 0.7), (second, -0.3)]


def _best_rank_k(update: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.mark.parametrize("m, inner, n", [(24, 6, 40), (5, 9, 7)], ids=["factored-qr", "dense"])
def test_full_rank_reproduces_the_update(m, inner, n):
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(m, inner, generator=gen), torch.randn(inner, n, generator=gen)
    b_k, a_k, tail, norm = truncate_factored(b, a, inner)
    assert b_k.shape == (m, inner) and a_k.shape == (inner, n)
    torch.testing.assert_close(b_k @ a_k, b @ a, atol=1e-4, rtol=1e-5)
    assert tail / norm < 1e-10
    assert norm == pytest.approx(float((b.double() @ a.double()).square().sum()), rel=1e-5)


def test_factored_and_dense_paths_agree():
    gen = torch.Generator().manual_seed(1)
    b, a = torch.randn(30, 5, generator=gen), torch.randn(5, 20, generator=gen)
    b_k, a_k, tail, norm = truncate_factored(b, a, 3)  # 5 < 20: QR of the factors
    expected = _best_rank_k(b @ a, 3)
    torch.testing.assert_close((b_k @ a_k).double(), expected, atol=1e-4, rtol=1e-5)
    error = float((b.double() @ a.double() - expected).norm() / (b.double() @ a.double()).norm())
    assert math.sqrt(tail / norm) == pytest.approx(error, rel=1e-4)


def test_lower_rank_is_the_best_rank_k_approximation(setup):
    root, base, adapters = setup
    out = root / "rank3"
    report = svd_truncated_adapter(adapters, out, rank=3)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 3 and not config["use_rslora"]
    assert report.rank == 3 and report.exact_rank == 6
    exact, truncated = lora_updates(adapters, torch.float64), lora_updates([(out, 1.0)], torch.float64)
    assert set(truncated) == set(exact) == set(report.per_tensor) and len(exact) == 14
    tails, norms = 0.0, 0.0
    for name, update in exact.items():
        best = _best_rank_k(update, 3)
        torch.testing.assert_close(truncated[name], best, atol=2e-5, rtol=1e-4)
        error = (update - truncated[name]).norm()
        assert report.per_tensor[name] == pytest.approx(float(error / update.norm()), rel=1e-3)
        assert report.per_tensor[name] > 0.01  # six independent directions cut to three
        tails, norms = tails + float(error) ** 2, norms + float(update.norm()) ** 2
    assert report.overall == pytest.approx(math.sqrt(tails / norms), rel=1e-3)
    assert json.loads((out / "truncation.json").read_text())["relative_error"] == report.overall


@pytest.mark.slow
def test_truncated_adapter_loads_in_plain_peft(setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, base, adapters = setup
    out = root / "rank2-peft"
    svd_truncated_adapter(adapters, out, rank=2)
    ids = torch.tensor([[1, 5, 9, 13, 2, 40, 63, 7]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    reference = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        for name, update in lora_updates([(out, 1.0)], torch.float64).items():
            reference.get_parameter(name).add_(update.float())
        torch.testing.assert_close(peft_model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_rank_must_be_below_the_sum_and_output_must_be_new(setup):
    root, _, adapters = setup
    with pytest.raises(ValueError, match=r"rank 6: an SVD-truncated adapter needs 1 ≤ rank < Σ r_i = 6"):
        svd_truncated_adapter(adapters, root / "rank6", rank=6)
    assert not (root / "rank6").exists() and not (root / ".rank6.partial").exists()
    (root / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken"):
        svd_truncated_adapter(adapters, root / "taken", rank=2)


@pytest.mark.slow
def test_merge_stage_writes_exact_or_truncated_adapters(workspace):
    domain = run_train(tiny_train_recipe(name="domain", train__checkpoint_every=0), workspace)
    general = run_train(tiny_train_recipe(name="general", seed=1, train__checkpoint_every=0,
                                          data__train="world:general_train"), workspace)
    inputs = [MergeInput(path=f"run:{domain.id}", weight=0.6), MergeInput(path=f"run:{general.id}")]
    pairs = [(domain.path("adapter"), 0.6), (general.path("adapter"), 1.0)]
    exact = lora_updates(pairs, torch.float64)

    full = run_merge(MergeRecipe(inputs=inputs, output="adapter", rank=8), workspace)  # 4 + 4
    assert json.loads(full.path("adapter", "adapter_config.json").read_text())["r"] == 8
    assert "truncation" not in full.info["summary"]
    got = lora_updates([(full.path("adapter"), 1.0)], torch.float64)
    for name, update in exact.items():
        torch.testing.assert_close(got[name], update, atol=1e-6, rtol=0)

    cut = run_merge(MergeRecipe(inputs=inputs, output="adapter", rank=3), workspace)
    truncation = cut.info["summary"]["truncation"]
    got = lora_updates([(cut.path("adapter"), 1.0)], torch.float64)
    assert truncation["rank"] == 3 and truncation["exact_rank"] == 8
    assert set(truncation["per_tensor"]) == set(exact)
    for name, update in exact.items():
        torch.testing.assert_close(got[name], _best_rank_k(update, 3), atol=1e-5, rtol=1e-4)
        by_hand = float((update - got[name]).norm() / update.norm())
        assert truncation["per_tensor"][name] == pytest.approx(by_hand, rel=1e-3, abs=1e-6)

    with pytest.raises(ValueError, match=r"rank: 9 is above Σ r_i = 8"):
        run_merge(MergeRecipe(inputs=inputs, output="adapter", rank=9), workspace)
    with pytest.raises(ValueError, match="rank \\(SVD truncation\\) needs output: adapter"):
        MergeRecipe(inputs=inputs, rank=3)
