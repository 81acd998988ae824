"""The demo: LoRA continued pretraining on the embedded domain corpus, with general replay.

`examples/demo-lora-cpt.yaml` is this recipe written out; `workbench demo` runs it (building the
embedded base first when the workspace has none) and `--quick` runs a shorter version.
"""

from __future__ import annotations

from adapters.lora import LoraSpec

from .recipes import DataSpec, EvalSpec, ModelSpec, TrainRecipe, TrainSpec


def demo_recipe(quick: bool = False) -> TrainRecipe:
    """The demo's train recipe; `quick` trains and evaluates less (about a minute on 2 cores)."""
    return TrainRecipe(
        name="demo-lora-cpt-quick" if quick else "demo-lora-cpt",
        seed=0,
        model=ModelSpec(path="default"),
        data=DataSpec(train="world:domain_train", replay="world:general_train", replay_ratio=0.25,
                      seq_len=128),
        adapter=LoraSpec(r=16, alpha=32, target_modules="all-linear"),
        train=TrainSpec(lr=2e-3, schedule="cosine", warmup_ratio=0.05, min_lr_ratio=0.1,
                        batch_size=16, max_steps=80 if quick else 300,
                        checkpoint_every=40 if quick else 100,
                        eval_at=[5, 20] if quick else [5, 20, 100]),
        eval=EvalSpec(max_tokens=8192 if quick else 16384, max_questions=50 if quick else 100),
    )
