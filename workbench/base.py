"""The embedded default base: a small Llama pretrained on the embedded world's general corpus.

Built once per workspace by a `pretrain` run named `default-base` (the model path `default`
resolves to the latest finished one, building it first when there is none). The same recipe and
seed give the same tokenizer and the same training data order; the run reports the base's
held-out general perplexity beside an add-one unigram baseline on the same tokens.
"""

from __future__ import annotations


from .data import BatchPlan, encode_documents, get_world, pack_source
from .engine import make_accelerator, seed_everything, train_loop
from .evaluate import evaluate_model
from .export import save_model_folder
from .io import write_json
from .methods import get_method
from .models import (DEFAULT_BASE_NAME, build_model_from_config, builtin_config,
                     set_default_base_builder)
from .recipes import PretrainRecipe, recipe_to_yaml
from .stage_support import check_seq_len, say, total_steps
from .workspace import Run, Workspace



def run_pretrain(recipe: PretrainRecipe, ws: Workspace, run: Run | None = None,
                 resume: bool = False) -> Run:
    """Train the tokenizer, pretrain the model with full fine-tuning, save and evaluate it."""
    from .tokenizer import train_tokenizer, unigram_perplexity

    limit = builtin_config(recipe.architecture)["max_position_embeddings"]
    run = run or ws.create_run("pretrain", recipe.name, recipe_to_yaml(recipe), recipe.seed)
    with ws.running(run):
        seed_everything(recipe.seed)
        world = get_world(recipe.world.seed, recipe.world.size)
        say(f"Training a {recipe.vocab_size}-token tokenizer on the embedded world ...")
        tokenizer = train_tokenizer(world.general_train + world.domain_train, recipe.vocab_size)
        tokenizer.model_max_length = limit
        eos = tokenizer.eos_token_id
        model = build_model_from_config(recipe.architecture, vocab_size=len(tokenizer), seed=recipe.seed,
                                        bos_token_id=None, eos_token_id=eos, pad_token_id=eos)
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = eos
        check_seq_len(recipe.seq_len, model, recipe.architecture)
        accelerator = make_accelerator(recipe.train.precision)
        model.to(accelerator.device)
        train_set = pack_source("world:general_train", tokenizer, recipe.seq_len, "text",
                                recipe.world.seed, recipe.world.size)
        plan = BatchPlan(train_set, None, recipe.train.batch_size, 0.0, recipe.seed)
        steps = total_steps(recipe.train, plan)
        params = sum(p.numel() for p in model.parameters())
        say(f"Pretraining {recipe.architecture} ({params / 1e6:.2f}M parameters) for {steps} steps "
            f"on {len(train_set)} rows of {recipe.seq_len} tokens ...")
        method = get_method("full")
        model = method.attach(model)
        progress = train_loop(model, plan, recipe.train, steps, run, accelerator,
                              method.trainable_parameters(model), resume=resume,
                              phase="building the embedded base" if recipe.name == DEFAULT_BASE_NAME
                              else "pretraining")
        model = accelerator.unwrap_model(model)
        save_model_folder(model, tokenizer, run.path("model"), overwrite=True)

        metrics = evaluate_model(model, tokenizer, recipe.eval, recipe.seq_len,
                                 recipe.world.seed, recipe.world.size)
        train_ids, _ = encode_documents(world.general_train, tokenizer)
        eval_ids, _ = encode_documents(world.general_eval, tokenizer)
        unigram = unigram_perplexity([train_ids], [eval_ids[:recipe.eval.max_tokens]], len(tokenizer))
        summary = {"parameters": params, "steps": progress.step, "tokens": progress.tokens,
                   "train_seconds": round(progress.elapsed, 2), **metrics,
                   "unigram_general_ppl": unigram}
        write_json(run.path("summary.json"), summary)
        say(f"Base held-out general perplexity {metrics['general_ppl']:.2f} "
            f"(unigram baseline {unigram:.2f}); domain perplexity {metrics['domain_ppl']:.2f}.")
        run.finish(summary, outputs={"model": "model"})
    return run


def ensure_default_base(ws: Workspace) -> Run:
    """The workspace's finished default base, built now (once) when there is none."""
    found = ws.latest("pretrain", DEFAULT_BASE_NAME)
    if found is not None:
        return found
    say(f"No embedded base in {ws.root} yet: building it once (a few minutes on 2 CPU cores).")
    return run_pretrain(PretrainRecipe(name=DEFAULT_BASE_NAME), ws)


set_default_base_builder(ensure_default_base)
