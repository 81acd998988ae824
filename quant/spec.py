"""The `quantize` recipe and its sections: the weight grid (`quant.rtn.WeightQuantSpec`, one
definition for recipes and code) and the FlexRound reconstruction settings."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field, model_validator

from workbench.sections import DataRef, EvalSpec, ModelSpec, Strict, WorldSpec

from .rtn import QuantError, WeightQuantSpec


class FlexRoundSection(Strict):
    """Reconstruction settings: a preset (`reference`: the official Llama-2 W4A16 recipe; `fast`:
    CPU), any field set here replacing the preset's value."""

    preset: Literal["reference", "fast"] = "fast"
    iterations: int | None = Field(None, ge=1, description="Adam steps per block.")
    samples: int | None = Field(None, ge=1, description="Calibration rows.")
    seq_len: int | None = Field(None, ge=8, description="Tokens per calibration row.")
    batch_size: int | None = Field(None, ge=1, description="Rows per step.")
    lr: float | None = Field(None, gt=0, le=1.0)


class QuantizeRecipe(Strict):
    """Quantize a model's block linear layers: round-to-nearest and FlexRound, compared with the
    full-precision model (and NF4 through bitsandbytes where it runs) in one report; the chosen
    `method` is exported as a compressed-tensors pack-quantized folder and/or a dequantized one.

    `layers`: `all-linear` (every linear layer inside the decoder blocks / encoder layers) or names
    matched by suffix (`q_proj`, `mlp.down_proj`). Embeddings and the output head stay in full
    precision. `calibration`: any text source (`world:<split>`, .txt, .jsonl).
    """

    kind: Literal["quantize"] = "quantize"
    name: str = "quantize"
    seed: int = 0
    model: ModelSpec = Field(default_factory=ModelSpec)
    method: Literal["flexround", "rtn"] = "flexround"
    weights: WeightQuantSpec = Field(default_factory=WeightQuantSpec)
    layers: Union[Literal["all-linear"], list[str]] = "all-linear"
    flexround: FlexRoundSection = Field(default_factory=FlexRoundSection)
    calibration: DataRef = "world:general_train"
    world: WorldSpec = Field(default_factory=WorldSpec)
    export: list[Literal["compressed-tensors", "dequantized"]] = Field(
        default_factory=lambda: ["compressed-tensors", "dequantized"])
    max_shard_mb: int = Field(2048, ge=1)
    nf4_baseline: bool = Field(True, description="Add bitsandbytes NF4 (no calibration) to the report.")
    seq_len: int = Field(128, ge=8, description="Evaluation sequence length.")
    eval: EvalSpec | None = Field(default_factory=EvalSpec)

    @model_validator(mode="after")
    def _consistent(self) -> "QuantizeRecipe":
        from .flexround import resolve_config

        if "compressed-tensors" in self.export and self.weights.bits not in (4, 8):
            raise ValueError(f"export: compressed-tensors packs 4 or 8 bits, not weights.bits="
                             f"{self.weights.bits}; export only `dequantized` for other widths")
        if self.method == "flexround":
            try:
                resolve_config(**self.flexround.model_dump())
            except QuantError as err:
                raise ValueError(str(err)) from None
        return self
