"""The `quantize` stage: quantize a model folder with RTN and FlexRound, compare them with the
full-precision model (and NF4) in one report, and export the recipe's method.

Run folder: `report.json` (see `quant.report`), `summary.json`, `model/` (the dequantized float
export) and `model-compressed/` (compressed-tensors pack-quantized), whichever the recipe's
`export` lists; `model` points at the dequantized folder when there is one (it loads anywhere),
else at the compressed one. While FlexRound learns, `flexround-checkpoint/` keeps the finished
blocks: a resumed run continues after the last one and ends with the same codes.
"""

from __future__ import annotations

import copy
from dataclasses import asdict

from workbench.data import read_texts
from workbench.engine import seed_everything
from workbench.evaluate import embedding_cosine, evaluate_model, general_embeddings
from workbench.io import write_json
from workbench.models import ModelLoadError, is_encoder, load_model, max_sequence_length, resolve_source
from workbench.sections import recipe_to_yaml
from workbench.stage_support import run_parents, say
from workbench.workspace import Run, Workspace

from .export import export_compressed, export_dequantized, weights_size
from .flexround import (calibration_batches, flexround_quantize, load_checkpoint, resolve_config,
                        save_checkpoint)
from .report import (NF4Unavailable, build_report, float_bytes, format_quant_report, quantize_model_nf4,
                     quantized_bytes, timed)
from .rtn import QuantError, check_model, quantize_model_rtn
from .spec import QuantizeRecipe

CHECKPOINT = "flexround-checkpoint"
DEQUANTIZED = "model"
COMPRESSED = "model-compressed"


class Quality:
    """The held-out metrics of one model: text and questions (language models), or the cosine of
    its general-sentence embeddings to the full-precision model's (encoders)."""

    def __init__(self, recipe: QuantizeRecipe, tokenizer, encoder: bool):
        self.recipe, self.tokenizer, self.encoder = recipe, tokenizer, encoder
        self.reference = None

    def __call__(self, model) -> dict:
        recipe = self.recipe
        if recipe.eval is None:
            return {}
        args = (recipe.eval, recipe.seq_len, recipe.world.seed, recipe.world.size)
        if not self.encoder:
            return evaluate_model(model, self.tokenizer, *args)
        vectors = general_embeddings(model, self.tokenizer, *args)
        if self.reference is None:
            self.reference = vectors
        return {"embedding_cosine": embedding_cosine(self.reference, vectors)}


def run_quantize(recipe: QuantizeRecipe, ws: Workspace, run: Run | None = None, resume: bool = False) -> Run:
    """Quantize the recipe's model, write the report and the exports, finish the run."""
    source = resolve_source(recipe.model.path, ws)
    if source.adapter is not None:
        raise ModelLoadError(f"model.path '{recipe.model.path}' is an adapter; quantize a full model "
                             "(merge the adapter into its base first)")
    if recipe.model.load_in != "none":
        raise ModelLoadError(f"model.load_in: '{recipe.model.load_in}' loads the weights already "
                             "quantized; quantize starts from full-precision weights (load_in: none)")
    if run is None:
        run = ws.create_run("quantize", recipe.name, recipe_to_yaml(recipe), recipe.seed,
                            parents=run_parents(source.ref))
    with ws.running(run):
        seed_everything(recipe.seed)
        encoder = is_encoder(source.folder)
        model, tokenizer, _ = load_model(recipe.model, ws, task="feature-extraction" if encoder else "causal-lm")
        spec = recipe.weights
        layers = check_model(model, spec, recipe.layers)  # every weight checked before any work
        config = resolve_config(**recipe.flexround.model_dump()) if recipe.method == "flexround" else None
        for key, seq_len in (("seq_len", recipe.seq_len), ("flexround.seq_len", config and config.seq_len)):
            limit = max_sequence_length(model)
            if seq_len and limit is not None and seq_len > limit:
                raise QuantError(f"{key}={seq_len} is above the model's limit "
                                 f"(max_position_embeddings={limit} in {source.folder})")
        run.log(f"quantizing {len(layers)} linear layers of {source.ref} ({spec})")
        quality = Quality(recipe, tokenizer, encoder)

        say("Evaluating the full-precision model ...")
        rows = {"full_precision": {"metrics": quality(model), "weights_bytes": float_bytes(model), "seconds": 0.0}}
        say("Round-to-nearest ...")
        chosen = copy.deepcopy(model)
        codes, seconds = timed(quantize_model_rtn, chosen, spec, recipe.layers)
        rows["rtn"] = _row(quality(chosen), quantized_bytes(chosen, codes), seconds)
        blocks, calibration = [], None
        if config is not None:
            say(f"FlexRound ({recipe.flexround.preset} preset: {config}) ...")
            batches = calibration_batches(read_texts(recipe.calibration, recipe.world.seed, recipe.world.size),
                                          tokenizer, config.seq_len, config.samples, config.batch_size,
                                          recipe.seed, source=recipe.calibration)
            calibration = {"source": recipe.calibration, "preset": recipe.flexround.preset, **asdict(config),
                           "rows_used": len(batches) * config.batch_size}
            done = load_checkpoint(run.path(CHECKPOINT), spec) if resume else None
            chosen = copy.deepcopy(model)
            result, seconds = timed(flexround_quantize, chosen, batches, spec, config, recipe.layers,
                                    seed=recipe.seed, done=done,
                                    on_block=lambda k, r: save_checkpoint(r, run.path(CHECKPOINT)))
            codes, blocks = result.quantized, result.blocks
            rows["flexround"] = _row(quality(chosen), quantized_bytes(chosen, codes), seconds)
        nf4_note = _nf4_row(recipe, model, quality, rows)
        del model

        outputs = _export(recipe, run, chosen, tokenizer, codes)
        setup = {"model": source.ref, "method": recipe.method, "weights": recipe.weights.model_dump(),
                 "layers": recipe.layers, "quantized_layers": len(codes), "calibration": calibration}
        report = build_report(rows, blocks, setup, nf4_note)
        write_json(run.path("report.json"), report)
        say(format_quant_report(report))
        summary = _summary(recipe, source.ref, rows, report, {
            name: {"folder": folder, "bytes": weights_size(run.path(folder))} for name, folder in outputs.items()})
        write_json(run.path("summary.json"), summary)
        run.finish(summary, outputs=outputs)
    return run


def _row(metrics: dict, weights_bytes: int, seconds: float) -> dict:
    return {"metrics": metrics, "weights_bytes": weights_bytes, "seconds": round(seconds, 2)}


def _nf4_row(recipe: QuantizeRecipe, model, quality: Quality, rows: dict) -> str | None:
    """Add the NF4 row when asked for and bitsandbytes runs; else say why it is missing."""
    if not recipe.nf4_baseline:
        return "not asked for (nf4_baseline: false)"
    nf4_model = copy.deepcopy(model)
    try:
        size, seconds = timed(quantize_model_nf4, nf4_model, recipe.layers)
    except NF4Unavailable as err:
        return str(err)
    rows["nf4"] = _row(quality(nf4_model), size, seconds)
    return None


def _summary(recipe: QuantizeRecipe, model_ref: str, rows: dict, report: dict, exports: dict) -> dict:
    """run.json's summary: the exported method's general perplexity (the `workbench runs`
    headline), every model's perplexities (or embedding cosine), the gap closed, the exports."""
    summary: dict = {"method": recipe.method, "model": model_ref}
    exported = rows[recipe.method]["metrics"]
    if "general_ppl" in exported:
        summary["general_ppl"] = exported["general_ppl"]
    for kind, row in rows.items():
        summary.update({f"{kind}_{key}": value for key, value in row["metrics"].items()
                        if key.endswith("_ppl") or key == "embedding_cosine"})
    summary["gap_closed_pct"] = report.get("gap_closed_pct")
    summary["exports"] = exports
    return summary


def _export(recipe: QuantizeRecipe, run: Run, model, tokenizer, codes) -> dict[str, str]:
    """Write the exports the recipe lists (a resumed run keeps those already finished)."""
    outputs = {}
    if "compressed-tensors" in recipe.export:
        if not run.path(COMPRESSED).exists():
            export_compressed(model, tokenizer, codes, run.path(COMPRESSED),
                              max_shard_bytes=recipe.max_shard_mb * 2**20)
        outputs["compressed"] = COMPRESSED
    if "dequantized" in recipe.export:
        if not run.path(DEQUANTIZED).exists():
            export_dequantized(model, tokenizer, run.path(DEQUANTIZED), max_shard_size=f"{recipe.max_shard_mb}MB")
        outputs["dequantized"] = DEQUANTIZED
    if outputs:
        outputs["model"] = outputs.get("dequantized") or outputs["compressed"]
    if recipe.weights.symmetric is False and recipe.weights.granularity != "tensor" and "compressed" in outputs:
        say("Note: asymmetric per-channel/group pack-quantized folders are written as compressed-tensors "
            "writes them, but this transformers + compressed-tensors cannot load them back; use "
            "weights.symmetric: true (or the dequantized export) for stock transformers.")
    return outputs
