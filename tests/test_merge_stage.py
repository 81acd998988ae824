"""The merge stage: LoRA runs merged exactly (model folder or one adapter), full models merged by
task arithmetic and TIES, each checked against the update computed by hand."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_train_recipe
from workbench.methods import get_method
from workbench.models import load_model
from workbench.recipes import MergeInput, MergeRecipe, ModelSpec
from workbench.stages import run_merge, run_train


@pytest.fixture
def two_adapters(workspace):
    domain = run_train(tiny_train_recipe(name="domain", train__checkpoint_every=0), workspace)
    general = run_train(tiny_train_recipe(name="general", seed=1, train__checkpoint_every=0,
                                          data__train="world:general_train"), workspace)
    return domain, general


@pytest.mark.slow
def test_merged_model_is_base_plus_weighted_lora_updates(workspace, two_adapters):
    domain, general = two_adapters
    recipe = MergeRecipe(inputs=[MergeInput(path=f"run:{domain.id}", weight=0.7),
                                   MergeInput(path=f"run:{general.id}", weight=-0.3)],
                         eval={"max_tokens": 512, "max_questions": 2}, world={"size": "tiny"},
                         seq_len=64)
    run = run_merge(recipe, workspace)
    assert run.info["status"] == "done" and set(run.info["parents"]) >= {domain.id, general.id}
    merged = load_file(run.path("model", "model.safetensors"))
    base_folder = load_model(ModelSpec(path="default"), workspace)[2].folder
    base = load_file(base_folder / "model.safetensors")
    lora = get_method("lora")
    d = lora.task_vector(domain.path("adapter")).dense()
    g = lora.task_vector(general.path("adapter")).dense()
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(merged[name], base[name] + 0.7 * d[name] - 0.3 * g[name], atol=1e-6)
    assert "domain_gain_pct" in json.loads(run.path("summary.json").read_text())


@pytest.mark.slow
def test_merged_adapter_has_the_summed_rank_and_the_same_update(workspace, two_adapters):
    domain, general = two_adapters
    recipe = MergeRecipe(output="adapter", inputs=[MergeInput(path=f"run:{domain.id}"),
                                                     MergeInput(path=f"run:{general.id}")])
    run = run_merge(recipe, workspace)
    config = json.loads(run.path("adapter", "adapter_config.json").read_text())
    assert config["r"] == 8  # 4 + 4
    concat, tokenizer, _ = load_model(ModelSpec(path=f"run:{run.id}"), workspace)
    model_run = run_merge(MergeRecipe(inputs=recipe.inputs), workspace)
    full, _, _ = load_model(ModelSpec(path=f"run:{model_run.id}"), workspace)
    ids = tokenizer(["Every crystal on the planet"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(concat(input_ids=ids).logits, full(input_ids=ids).logits, atol=1e-5)


def test_a_model_without_a_known_base_needs_one(workspace):
    with pytest.raises(ValueError, match="inputs.0.path 'default' is a model whose base is unknown"):
        run_merge(MergeRecipe(inputs=[MergeInput(path="default")]), workspace)
    with pytest.raises(ValueError, match="dare: p .* must be in"):
        MergeRecipe(inputs=[MergeInput(path="x")], method="dare", parameters={"p": 1.5})


@pytest.fixture
def two_full_models(workspace):
    runs = [run_train(tiny_train_recipe(name=f"full-{i}", seed=i, adapter={"method": "full"},
                                        train__lr=1e-3, train__checkpoint_every=0), workspace)
            for i in (0, 1)]
    base_folder = load_model(ModelSpec(path="default"), workspace)[2].folder
    base = load_file(base_folder / "model.safetensors")
    taus = [{k: v.float() - base[k].float()
             for k, v in load_file(r.path("model", "model.safetensors")).items()} for r in runs]
    return runs, base, taus


@pytest.mark.slow
def test_full_models_task_arithmetic_by_hand(workspace, two_full_models):
    runs, base, taus = two_full_models
    run = run_merge(MergeRecipe(inputs=[MergeInput(path=f"run:{runs[0].id}", weight=0.5),
                                        MergeInput(path=f"run:{runs[1].id}", weight=0.5)],
                                parameters={"scale": 2.0}), workspace)
    merged = load_file(run.path("model", "model.safetensors"))
    for name in ("model.embed_tokens.weight", "model.layers.2.self_attn.o_proj.weight"):
        by_hand = base[name] + 2.0 * (0.5 * taus[0][name] + 0.5 * taus[1][name])
        assert torch.allclose(merged[name], by_hand, atol=1e-6), name


@pytest.mark.slow
def test_full_models_ties_equals_the_method_on_each_tensor(workspace, two_full_models):
    from merge.methods import merge_tensors

    runs, base, taus = two_full_models
    params = {"density": 0.3, "ties_divisor": "weight_sum"}
    run = run_merge(MergeRecipe(inputs=[MergeInput(path=f"run:{r.id}") for r in runs],
                                method="ties", parameters=params, seed=5), workspace)
    merged = load_file(run.path("model", "model.safetensors"))
    name = "model.layers.0.mlp.gate_proj.weight"
    delta = merge_tensors("ties", [taus[0][name], taus[1][name]], [1.0, 1.0], name, 5, **params)
    assert torch.allclose(merged[name], base[name] + delta, atol=1e-6)
    kept = (delta != 0).float().mean()
    assert 0.25 < kept < 0.7, "trimmed to 30% per model, union of the two kept sets"


@pytest.mark.slow
def test_merge_reports_the_cosine_between_task_vectors(workspace, two_adapters):
    domain, general = two_adapters
    run = run_merge(MergeRecipe(inputs=[MergeInput(path=f"run:{domain.id}"),
                                        MergeInput(path=f"run:{general.id}")]), workspace)
    lora = get_method("lora")
    d = lora.task_vector(domain.path("adapter")).dense()
    g = lora.task_vector(general.path("adapter")).dense()
    names = sorted(d)
    flat_d = torch.cat([d[n].flatten() for n in names]).double()
    flat_g = torch.cat([g[n].flatten() for n in names]).double()
    by_hand = float(flat_d @ flat_g / (flat_d.norm() * flat_g.norm()))
    cosines = run.info["summary"]["task_vector_cosine"]
    assert cosines[0][1] == pytest.approx(by_hand, abs=1e-9)
    assert cosines[0][0] == pytest.approx(1.0) and cosines[1][0] == pytest.approx(by_hand, abs=1e-9)


def test_inputs_with_another_tokenizer_or_vocab_are_refused(workspace, tmp_path):
    import shutil

    base_folder = load_model(ModelSpec(path="default"), workspace)[2].folder
    other = tmp_path / "other"
    shutil.copytree(base_folder, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    recipe = MergeRecipe(base=ModelSpec(path=str(base_folder)),
                         inputs=[MergeInput(path=str(other))])
    with pytest.raises(ValueError, match=r"other/tokenizer.json: a different tokenizer"):
        run_merge(recipe, workspace)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] += 1
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"other/config.json: vocab_size \d+, but the base"):
        run_merge(recipe, workspace)
    assert not [r for r in workspace.runs() if r.info["kind"] == "merge"], "nothing was started"
