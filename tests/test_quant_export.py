"""Quantized exports: the packed format round-trips, matches compressed-tensors' own compressor
tensor for tensor, loads in stock transformers with the logits of our dequantized model; a killed
export leaves nothing half-written; the quantize stage writes its report and both exports."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import workbench.io as wio
from quant.export import (compressed_state, export_compressed, pack_weight, quantization_config,
                          read_compressed, unpack_weight, weight_args)
from quant.report import quantized_bytes
from quant.rtn import QuantError, WeightQuantSpec, quantize_model_rtn, quantize_rtn
from workbench.models import build_model_from_config, load_model
from workbench.recipes import EvalSpec, ModelSpec, QuantizeRecipe, RecipeError, load_recipe, parse_recipe
from workbench.stages import run_recipe

ROOT = Path(__file__).resolve().parents[1]
SPECS = [WeightQuantSpec(bits=4, symmetric=False), WeightQuantSpec(bits=4, symmetric=True),
         WeightQuantSpec(bits=4, granularity="group", group_size=16, symmetric=False),
         WeightQuantSpec(bits=4, symmetric=True, granularity="group", group_size=8),
         WeightQuantSpec(bits=8, symmetric=False), WeightQuantSpec(bits=8, symmetric=True, granularity="tensor"),
         WeightQuantSpec(bits=4, granularity="tensor", symmetric=False)]
LOADABLE = [WeightQuantSpec(bits=4, symmetric=True), WeightQuantSpec(bits=4, symmetric=True, granularity="group",
                                                                     group_size=16),
            WeightQuantSpec(bits=8, granularity="tensor", symmetric=False)]


def tiny_quantized(spec: WeightQuantSpec):
    model = build_model_from_config("llama-tiny", vocab_size=96, seed=0).eval()
    return model, quantize_model_rtn(model, spec)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_packing_round_trips_and_unpacks_with_compressed_tensors(spec):
    torch.manual_seed(0)
    qw = quantize_rtn(torch.randn(40, 48), spec)
    tensors = pack_weight(qw, torch.float32)
    assert tensors["weight_packed"].dtype == torch.int32
    assert tensors["weight_packed"].shape == (40, 48 * spec.bits // 32)
    back = unpack_weight(tensors, spec)
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.scale, qw.scale) and torch.equal(back.zero_point, qw.zero_point)
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    signed = unpack_from_int32(tensors["weight_packed"], spec.bits, torch.Size([40, 48]))
    assert torch.equal(signed.int() + 2 ** (spec.bits - 1), qw.codes.int())


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_same_tensors_and_config_as_compressed_tensors_compressor(spec):
    import compressed_tensors.quantization as ct
    from compressed_tensors.compressors import ModelCompressor

    model, codes = tiny_quantized(spec)
    ours = compressed_state(model, codes)
    assert quantized_bytes(model, codes) == sum(t.numel() * t.element_size() for t in ours.values())
    ref = copy.deepcopy(model)
    args = ct.QuantizationArgs(**weight_args(spec))
    ct.apply_quantization_config(ref, ct.QuantizationConfig(
        config_groups={"group_0": ct.QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]))
    for name, qw in codes.items():
        module = ref.get_submodule(name)
        module.weight_scale.data.copy_(ours[f"{name}.weight_scale"].reshape(module.weight_scale.shape))
        if not spec.symmetric:
            module.weight_zero_point.data.copy_((qw.zero_point.int() - 2 ** (spec.bits - 1))
                                                .reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(ref, quantization_format="pack-quantized")
    compressor.compress_model(ref)
    theirs = ref.state_dict()
    assert set(ours) == set(theirs)
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key]), key
    config = ct.QuantizationConfig.model_validate(quantization_config(spec, ["lm_head"]))
    written = compressor.quantization_config
    assert config.format == written.format == "pack-quantized" and config.ignore == written.ignore
    assert config.config_groups["group_0"].weights == written.config_groups["group_0"].weights


@pytest.mark.parametrize("spec", LOADABLE, ids=str)
def test_stock_transformers_loads_the_export_with_our_logits(tmp_path, spec):
    import compressed_tensors  # noqa: F401  (transformers reads the export with it)
    from transformers import AutoModelForCausalLM

    model, codes = tiny_quantized(spec)
    folder = export_compressed(model, None, codes, tmp_path / "w4")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    back = read_compressed(folder)
    assert all(torch.equal(back[n].codes, qw.codes) for n, qw in codes.items())
    stock = AutoModelForCausalLM.from_pretrained(folder)  # unpacks to float on the first forward (CPU)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(stock(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_widths_that_do_not_pack_are_refused(tmp_path):
    model, codes = tiny_quantized(WeightQuantSpec(bits=3, symmetric=False))
    with pytest.raises(QuantError, match="bits=3 cannot be packed"):
        export_compressed(model, None, codes, tmp_path / "w3")
    assert not (tmp_path / "w3").exists()


def test_a_killed_export_leaves_no_half_written_folder(tmp_path, monkeypatch):
    model, codes = tiny_quantized(WeightQuantSpec(bits=4, symmetric=True))
    real_save, calls = wio.write_shard, []

    def killed_on_second_shard(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(wio, "write_shard", killed_on_second_shard)
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export_compressed(model, None, codes, target, max_shard_bytes=4096)
    assert len(calls) == 2 and not target.exists() and list(tmp_path.iterdir()) == []
    # an existing export is replaced only by a complete one
    monkeypatch.setattr(wio, "write_shard", real_save)
    export_compressed(model, None, codes, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    calls.clear()
    monkeypatch.setattr(wio, "write_shard", killed_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        export_compressed(model, None, codes, target, max_shard_bytes=4096, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    # a process killed outright leaves its hidden partial folder; the next export clears it
    (tmp_path / ".out2.partial").mkdir()
    (tmp_path / ".out2.partial" / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(wio, "write_shard", real_save)
    export_compressed(model, None, codes, tmp_path / "out2", max_shard_bytes=4096)
    assert not (tmp_path / ".out2.partial").exists()
    assert (tmp_path / "out2" / "model.safetensors.index.json").is_file()
    assert all(torch.equal(read_compressed(tmp_path / "out2")[n].codes, qw.codes) for n, qw in codes.items())


# ----------------------------------------------------------------------------------------------
# Recipes and the stage


def test_example_recipe_and_bad_recipes():
    recipe = load_recipe(ROOT / "examples" / "flexround.yaml")
    assert recipe.kind == "quantize" and recipe.method == "flexround" and recipe.model.path == "default"
    assert recipe.weights.bits == 4 and "compressed-tensors" in recipe.export
    with pytest.raises(RecipeError, match=r"weights.bits: .*bits must be an integer from 2 to 8"):
        parse_recipe({"kind": "quantize", "weights": {"bits": 9}})
    with pytest.raises(RecipeError, match=r"compressed-tensors packs 4 or 8 bits, not weights.bits=3"):
        parse_recipe({"kind": "quantize", "weights": {"bits": 3}})
    assert parse_recipe({"kind": "quantize", "weights": {"bits": 3}, "export": ["dequantized"]}).weights.bits == 3
    with pytest.raises(RecipeError, match=r"flexround.samples \(6\) must be a multiple of "
                                          r"flexround.batch_size \(4\)"):
        parse_recipe({"kind": "quantize", "flexround": {"samples": 6}})


def tiny_quantize_recipe(**changes) -> QuantizeRecipe:
    data = dict(name="tiny-flexround", model={"path": "default"}, world={"size": "tiny"}, seq_len=64,
                flexround={"iterations": 25, "samples": 8, "seq_len": 32, "batch_size": 4, "lr": 5e-3},
                eval=EvalSpec(max_tokens=256, max_questions=2,
                              questions=["world:general_cloze_eval"]).model_dump())
    data.update(changes)
    return QuantizeRecipe.model_validate(data)


@pytest.mark.slow
def test_quantize_stage_writes_report_and_exports(workspace):
    import compressed_tensors  # noqa: F401  (transformers reads the export with it)
    from transformers import AutoModelForCausalLM

    run = run_recipe(tiny_quantize_recipe(), workspace)
    info = run.info
    assert info["status"] == "done" and info["parents"]
    report = json.loads(run.path("report.json").read_text())
    assert set(report["rows"]) == {"full_precision", "rtn", "flexround", "nf4"}
    assert len(report["blocks"]) == 3 and all(b["flexround_mse"] < b["rtn_mse"] for b in report["blocks"])
    fp, rtn, flex = (report["rows"][k] for k in ("full_precision", "rtn", "flexround"))
    assert {"general_ppl", "domain_ppl", "acc_general_cloze_eval"} <= set(flex["metrics"])
    assert rtn["weights_bytes"] == flex["weights_bytes"] < fp["weights_bytes"]
    assert set(report["gap_closed_pct"]) == {"general", "domain"}
    summary = json.loads(run.path("summary.json").read_text())
    assert summary["exports"]["compressed"]["bytes"] < summary["exports"]["dequantized"]["bytes"]
    assert info["outputs"] == {"compressed": "model-compressed", "dequantized": "model", "model": "model"}
    # the run's model is the dequantized export; the packed one holds the same codes and loads stock
    model, tokenizer, _ = load_model(ModelSpec(path=f"run:{run.id}"), workspace)
    codes = read_compressed(run.path("model-compressed"))
    assert len(codes) == 3 * 7
    for name, qw in codes.items():
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize()), name
    stock = AutoModelForCausalLM.from_pretrained(run.path("model-compressed"))
    ids = tokenizer(["Every crystal on the planet"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(stock(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
    # the recorded metrics are those of the exported model
    from workbench.evaluate import evaluate_model

    recipe = tiny_quantize_recipe()
    again = evaluate_model(model, tokenizer, recipe.eval, recipe.seq_len, 0, "tiny", text_only=True)
    assert again["general_ppl"] == pytest.approx(flex["metrics"]["general_ppl"], rel=1e-5)


def test_quantize_stage_refuses_bad_input_without_output(workspace, tmp_path):
    recipe = tiny_quantize_recipe(weights={"granularity": "group", "group_size": 48}, eval=None)
    with pytest.raises(QuantError, match=r"model.layers.0.self_attn.q_proj.weight: group_size=48 does not "
                                         r"divide the input width 64"):
        run_recipe(recipe, workspace)
    failed = [r for r in workspace.runs() if r.info["kind"] == "quantize"]
    assert len(failed) == 1 and failed[0].info["status"] == "failed"
    assert sorted(p.name for p in failed[0].folder.iterdir()) == ["recipe.yaml", "run.json", "run.log"]
    with pytest.raises(QuantError, match=r"flexround.seq_len=1024 is above the model's limit "
                                         r"\(max_position_embeddings=512"):
        run_recipe(tiny_quantize_recipe(flexround={"preset": "reference"}, eval=None), workspace)
    notes = tmp_path / "notes.txt"
    notes.write_text("A short note about crystals.\n")
    with pytest.raises(QuantError, match=r"notes.txt: calibration data has \d+ tokens, shorter than one "
                                         r"sequence of seq_len=32"):
        run_recipe(tiny_quantize_recipe(calibration=str(notes), eval=None), workspace)


@pytest.mark.slow
def test_an_interrupted_quantize_run_resumes_to_the_same_codes(workspace, monkeypatch):
    import quant.stage as stage
    from workbench.stages import resume_run

    recipe = tiny_quantize_recipe(eval=None, nf4_baseline=False, export=["compressed-tensors"])
    whole = read_compressed(run_recipe(recipe, workspace).path("model-compressed"))
    real_save = stage.save_checkpoint

    def stopped_after_first_block(result, folder):
        real_save(result, folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "save_checkpoint", stopped_after_first_block)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, workspace)
    stopped = [r for r in workspace.runs() if r.info["kind"] == "quantize" and r.info["status"] == "stopped"]
    assert len(stopped) == 1 and not stopped[0].path("model-compressed").exists()
    saved = json.loads(stopped[0].path("flexround-checkpoint", "blocks.json").read_text())["blocks"]
    assert len(saved) == 1
    monkeypatch.setattr(stage, "save_checkpoint", real_save)
    resumed = resume_run(stopped[0].id, workspace)
    assert resumed.info["status"] == "done"
    assert json.loads(resumed.path("report.json").read_text())["blocks"][0] == saved[0]  # not learned again
    codes = read_compressed(resumed.path("model-compressed"))
    assert all(torch.equal(codes[n].codes, qw.codes) and torch.equal(codes[n].scale, qw.scale)
               for n, qw in whole.items())
