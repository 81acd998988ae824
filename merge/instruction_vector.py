"""Instruction-vector merging (Hirano & Imajo 2024, "The Construction of Instruction-tuned LLMs for
Finance without Instruction Data Using Continual Pretraining and Model Merging").

Continue pretraining the base on domain text (θ_domain), then add the instruction vector of an
instruction-tuned model of the same base:

    θ = θ_domain + α·(θ_inst − θ_base),   α = 1 by default.

Written as task vectors this is θ_base + τ_domain + α·τ_inst, and each side may be a full model
(τ = θ − θ_base) or a LoRA adapter (τ = s·B·A). The merge streams whichever model it can start
from, tensor by tensor, so no full model is ever rebuilt from deltas:

- full domain model: θ_domain + α·τ_inst (τ_inst as LoRA factors, or θ_inst − θ_base read tensor by
  tensor);
- LoRA domain adapter and a full instruct model, α = 1: θ_inst + s·B·A (the base is not read);
- LoRA domain adapter otherwise: θ_base + s·B·A + α·τ_inst (with a LoRA instruct adapter too, the
  merge is exact and factored, and can be written as one adapter);
- a RoAd adapter on either side enters as its dense delta (R − I)·W on the base.

The premise of the method is that the two vectors are nearly orthogonal; the merge stage reports
their cosine.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from workbench.io import model_layout

from .dense import delta_readers
from .methods import Parameter, check_parameters
from .plan import DeltaReader, MergePlan, scaled
from .preflight import input_kind

METHOD = "instruction_vector"
ROLES = ("domain", "instruct")
ALPHA = Parameter("alpha", 1.0, "α, the factor on the instruction vector θ_inst − θ_base")
REFERENCE = "https://arxiv.org/abs/2409.19854"


def check_merge_parameters(method: str, params: dict) -> dict[str, float | str]:
    """Every parameter of `method` (a `merge.methods` method or instruction_vector), given or
    default, checked; unknown ones are refused."""
    if method != METHOD:
        return check_parameters(method, params)
    unknown = sorted(set(params) - {ALPHA.name})
    if unknown:
        raise ValueError(f"{METHOD}: unknown parameter(s) {', '.join(unknown)}; its parameter is alpha")
    return {ALPHA.name: ALPHA.check(METHOD, params.get(ALPHA.name, ALPHA.default))}


def instruction_vector_plan(base_folder: Path, domain, instruct, alpha: float,
                            stack: ExitStack) -> MergePlan:
    """The streaming plan of θ_domain + α(θ_inst − θ_base).

    `domain` and `instruct` have `.folder` (the model folder; for an adapter, its base's) and
    `.adapter` (an adapter folder or None), as `workbench.models.ModelSource`. LoRA adapters stay
    factored; a RoAd adapter enters as its dense delta (R − I)·W. Names and shapes of every full
    model are checked against the base from the safetensors headers; `stack` keeps the
    files open while the plan runs.
    """
    base_folder = Path(base_folder)
    layout = model_layout(base_folder)
    alpha = float(ALPHA.check(METHOD, alpha))
    kinds = {}
    for role, side in (("domain", domain), ("instruct", instruct)):
        kinds[role] = input_kind(Path(side.adapter or side.folder))
        if kinds[role] in ("prompt", "mixda"):
            raise ValueError(f"{METHOD}: the {role} input {side.adapter} is a {kinds[role]} folder; "
                             "instruction vectors live in the model's weights (full models, LoRA, RoAd)")

    def dense(side) -> DeltaReader:
        return delta_readers([Path(side.adapter or side.folder)], layout, stack)[0]

    instruct_lora = [(Path(instruct.adapter), alpha)] if kinds["instruct"] == "lora" else []
    instruct_dense = None if instruct_lora else scaled(dense(instruct), alpha)
    if kinds["domain"] == "full":
        dense(domain)  # same tensors and shapes as the base; the domain model itself is streamed
        return MergePlan(Path(domain.folder), instruct_lora, instruct_dense)
    if kinds["domain"] == "lora":
        domain_lora = [(Path(domain.adapter), 1.0)]
        if kinds["instruct"] == "full" and alpha == 1.0:
            return MergePlan(Path(instruct.folder), domain_lora)  # θ_inst + s·B·A: the base is not read
        return MergePlan(base_folder, domain_lora + instruct_lora, instruct_dense)
    extra = dense(domain) if instruct_dense is None else summed([dense(domain), instruct_dense])
    return MergePlan(base_folder, instruct_lora, extra)


def summed(readers: list[DeltaReader]) -> DeltaReader:
    """name → the sum of the readers' deltas (None where none of them has one)."""

    def read(name: str, *rows):
        parts = [d for d in (reader(name, *rows) for reader in readers) if d is not None]
        return None if not parts else sum(parts[1:], parts[0])

    read.fresh = all(getattr(reader, "fresh", False) for reader in readers)
    read.by_rows = all(getattr(reader, "by_rows", False) for reader in readers)
    return read
