"""Running recipes: each stage reads its parents from the workspace and writes one new run folder.

`run_recipe` dispatches on the recipe kind; `resume_run` continues an interrupted run from its
last checkpoint with the recipe stored in its folder.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from . import resolver
from .base import run_pretrain  # also makes `default` buildable (models.set_default_base_builder)
from .data import BatchPlan, DataError, pack_source, read_labelled
from .engine import (ClassificationObjective, TokenMasker, make_accelerator, process_state,
                     seed_everything, train_loop)
from .evaluate import (classifier_metrics, classifier_report, embedding_cosine, evaluate_model,
                       format_classifier_report, format_report, gain_forgetting, masked_lm_metrics)
from .io import model_layout, write_atomic, write_json
from .methods import get_method, optional
from .models import (ModelLoadError, ModelSource, is_encoder, load_model,
                     recorded_base, resolve_local_source, resolve_source)
from .recipes import (EvalRecipe, MergekitRecipe, MergeRecipe, ModelSpec, PipelineRecipe,
                      TrainRecipe, load_recipe, recipe_to_yaml)
from .stage_support import broadcast_from_main, check_seq_len, run_parents, say, total_steps
from .workspace import Run, Workspace


# ----------------------------------------------------------------------------------------------
# train


def run_train(recipe: TrainRecipe, ws: Workspace, run: Run | None = None, resume: bool = False) -> Run:
    """Train an adapter on the model, evaluate base vs adapted, save the adapter in the run."""
    run = run or _new_train_run(recipe, ws)
    with ws.running(run) if process_state().is_main_process else nullcontext(run):
        seed_everything(recipe.seed)
        accelerator = make_accelerator(recipe.train.precision)
        task = _task_of(recipe, ws)
        model, tokenizer, source = _load_train_model(recipe, ws, task)
        plan, train_set = _batch_plan(recipe, tokenizer, task)
        steps = total_steps(recipe.train, plan)
        run.log(f"model {source.ref} ({task}); {len(train_set)} training rows of {recipe.data.seq_len} "
                f"tokens; {plan.n_train}+{plan.n_replay} rows per step; {steps} steps")

        method = get_method(recipe.adapter.method)
        masker = TokenMasker(tokenizer, recipe.seed) if task == "masked-lm" else None
        evaluator = RunEvaluator(recipe, tokenizer, task, masker, getattr(method, "disabled", None)) \
            if recipe.eval is not None else None
        if evaluator is not None and accelerator.is_main_process:
            evaluator.evaluate_base(model, run, resume)

        torch.manual_seed(recipe.seed)
        model = method.attach(model, recipe.adapter, task=task,
                              gradient_checkpointing=recipe.train.gradient_checkpointing,
                              locate=lambda ref: adapter_folder_of(ref, ws))
        trainable = method.trainable_parameters(model)
        objective = _objective_of(method, recipe, task, masker, tokenizer)
        prepared = _prepared(method, model, recipe, run, resume, tokenizer, train_set)
        penalty = _penalty(recipe, model, trainable, tokenizer, run, ws, accelerator, objective, task)

        def evaluate_early(step: int) -> dict:
            return evaluator.evaluate_early(accelerator.unwrap_model(model))

        started = time.time()
        progress = train_loop(model, plan, recipe.train, steps, run, accelerator, trainable,
                              resume=resume, evaluate=evaluate_early if evaluator else None,
                              objective=objective, penalty=penalty)
        model = accelerator.unwrap_model(model)
        if accelerator.is_main_process:
            _finish_train(recipe, run, method, model, tokenizer, source, evaluator, progress, prepared,
                          task, started)
        accelerator.wait_for_everyone()
    return run


def _new_train_run(recipe: TrainRecipe, ws: Workspace) -> Run:
    """The run folder of a new training run, made once under torchrun / accelerate launch (by the
    main process; the others get its id)."""
    run_id = None
    if process_state().is_main_process:
        base_source = resolve_source(recipe.model.path, ws)  # builds the default base if needed
        run_id = ws.create_run("train", recipe.name, recipe_to_yaml(recipe), recipe.seed,
                               parents=run_parents(base_source.ref)).id
    return ws.get(broadcast_from_main(run_id))


def _load_train_model(recipe: TrainRecipe, ws: Workspace, task: str):
    """(model, tokenizer, source) to train: a full model (not an adapter), with a pad token id and
    room for the recipe's sequence length."""
    data = recipe.data
    num_labels = len(read_labelled(data.train, data.world_seed, data.world_size)[2]) \
        if task == "sequence-classification" else None
    model, tokenizer, source = load_model(recipe.model, ws, task=task, num_labels=num_labels)
    if source.adapter is not None:
        raise ModelLoadError(f"model.path '{recipe.model.path}' is an adapter; train on a full "
                             "model (merge the adapter into its base first)")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    check_seq_len(data.seq_len, model, str(source.folder))
    return model, tokenizer, source


def _batch_plan(recipe: TrainRecipe, tokenizer, task: str) -> tuple[BatchPlan, object]:
    """(the batch plan of training data and general replay, the packed training set)."""
    data = recipe.data
    train_set = pack_source(data.train, tokenizer, data.seq_len, data.format,
                            data.world_seed, data.world_size)
    replay_set = None
    if data.replay_ratio > 0 and task in ("causal-lm", "masked-lm"):
        replay_set = pack_source(data.replay, tokenizer, data.seq_len, "text",
                                 data.world_seed, data.world_size)
    replay_ratio = data.replay_ratio if replay_set is not None else 0.0
    return BatchPlan(train_set, replay_set, recipe.train.batch_size, replay_ratio, recipe.seed), train_set


def _objective_of(method, recipe: TrainRecipe, task: str, masker, tokenizer):
    """The training signal: the method's own objective, the masked-LM one, the classifier's, or
    None for the engine's next-token loss."""
    own_objective = optional(method, "objective")
    objective = own_objective(recipe.adapter) if own_objective is not None else None
    if task == "masked-lm":
        objective = own_objective(recipe.adapter, masker=masker)
    if task == "sequence-classification":
        if objective is not None:
            raise DataError(f"adapter.method {recipe.adapter.method} with these settings trains on "
                            "unlabelled text; use data.format text or instruct")
        objective = ClassificationObjective(tokenizer.pad_token_id)
    return objective


def _prepared(method, model, recipe: TrainRecipe, run: Run, resume: bool, tokenizer, train_set) -> dict:
    """What a method prepares before training (e.g. the λ search of task prompt vectors), kept in
    prepare.json so that a resumed run reuses it."""
    prepare = optional(method, "prepare")
    if prepare is not None and not resume:
        prepared = prepare(model, recipe.adapter, _validation_set(recipe, tokenizer, train_set))
        if prepared:
            write_json(run.path("prepare.json"), prepared)
        return prepared
    if run.path("prepare.json").is_file():
        return json.loads(run.path("prepare.json").read_text())
    return {}


def _penalty(recipe: TrainRecipe, model, trainable, tokenizer, run: Run, ws: Workspace, accelerator,
             objective, task: str):
    """The forgetting regularizer's penalty (recording Ω first when needed), or None."""
    spec = recipe.train.regularizer
    if spec is None or spec.phi <= 0:
        return None
    from adapters.regularizer import prepare_regularizer

    classifier = task == "sequence-classification"
    return prepare_regularizer(
        spec, recipe.train, model, trainable, tokenizer, recipe.data, run.folder,
        lambda ref: importance_file_of(ref, ws), accelerator,
        say=lambda message: (run.log(message), say(message)),
        objective=objective if classifier else None, fmt="labelled" if classifier else "text")


def _finish_train(recipe: TrainRecipe, run: Run, method, model, tokenizer, source, evaluator,
                  progress, prepared: dict, task: str, started: float) -> None:
    """Save the adapter (or model), evaluate it against its base, write the summary, finish."""
    output = optional(method, "output")
    losses = [m["loss"] for m in run.metrics() if "loss" in m]
    summary: dict = {**prepared, "task": task, "steps": progress.step, "tokens": progress.tokens,
                     "train_seconds": round(progress.elapsed, 2),
                     "final_loss": losses[-1] if losses else None}
    method.save(model, tokenizer, run.path(output), base_ref=str(source.folder))
    if evaluator is not None:
        say("Evaluating the adapted model ...")
        summary.update(evaluator.report(model, run))
    summary["wall_seconds"] = round(time.time() - started, 2)
    write_json(run.path("summary.json"), summary)
    run.finish(summary, outputs={output: output, "base": source.ref})


def _task_of(recipe: TrainRecipe, ws: Workspace) -> str:
    """The recipe's task; text on an encoder is masked-LM continued pretraining (MixDA stage 1)."""
    task = recipe.task
    if task != "causal-lm" or not is_encoder(resolve_source(recipe.model.path, ws).folder):
        return task
    adapter = recipe.adapter
    if adapter.method != "mixda" or adapter.stage != 1:
        raise DataError(f"model.path '{recipe.model.path}' is an encoder: unlabelled text trains it "
                        "with the masked-LM loss, which MixDA stage 1 supports (adapter.method: mixda, "
                        "stage: 1); for other methods use data.format: labelled")
    return "masked-lm"


class RunEvaluator:
    """Base-vs-adapted evaluation of a training run: held-out perplexity, bits per byte and exact
    match for language models; task accuracy and general-text embedding drift for classifiers."""

    def __init__(self, recipe: TrainRecipe, tokenizer, task: str, masker=None, disabled=None):
        self.recipe, self.tokenizer, self.masker, self.disabled = recipe, tokenizer, masker, disabled
        data = recipe.data
        self.args = (recipe.eval, data.seq_len, data.world_seed, data.world_size)
        self.classifier = task == "sequence-classification"
        self.base = None
        self.base_embeddings = None

    def evaluate_base(self, model, run: Run, resume: bool) -> None:
        if self.masker is not None:  # measured after training: the adapters switched off
            say("The base is measured after training, with the adapters switched off (a masked-LM "
                "head the checkpoint lacks trains with them).")
            return
        if self.classifier:  # the base's embeddings are not logged: recompute on resume
            say("Evaluating the base model ...")
            self.base, self.base_embeddings = classifier_metrics(model, self.tokenizer, *self.args)
            run.append_metrics({"step": 0, **{f"eval/{k}": v for k, v in self.base.items()}})
            return
        self.base = _recorded_base_metrics(run) if resume else None
        if self.base is None:
            say("Evaluating the base model ...")
            self.base = evaluate_model(model, self.tokenizer, *self.args)
            run.append_metrics({"step": 0, **{f"eval/{k}": v for k, v in self.base.items()}})

    def evaluate_early(self, model) -> dict:
        if self.masker is not None:
            spec, seq_len, seed, size = self.args
            return masked_lm_metrics(model, self.tokenizer, spec, seq_len, self.masker, seed, size,
                                     embeddings=False)[0]
        if self.classifier:
            return classifier_metrics(model, self.tokenizer, *self.args)[0]
        return evaluate_model(model, self.tokenizer, *self.args, text_only=True)

    def report(self, model, run: Run) -> dict:
        """Write report.json, print the table, return what goes into the run summary."""
        if self.masker is not None:
            spec, seq_len, seed, size = self.args
            with self.disabled(model):
                self.base, base_vectors = masked_lm_metrics(model, self.tokenizer, spec, seq_len,
                                                            self.masker, seed, size)
            adapted, vectors = masked_lm_metrics(model, self.tokenizer, spec, seq_len, self.masker,
                                                 seed, size)
            report = gain_forgetting(self.base, adapted)
            report["general_embedding_cosine"] = embedding_cosine(base_vectors, vectors)
            text = format_report(report, labels=("adapters off", "adapted")) + (
                f"\nMasked-LM perplexities. General-text embedding cosine, adapters off vs on: "
                f"{report['general_embedding_cosine']:.4f}.")
            headline = {"domain_gain_pct": report["domain_gain_pct"]}
        elif self.classifier:
            adapted, embeddings = classifier_metrics(model, self.tokenizer, *self.args)
            report = classifier_report(self.base, adapted, self.base_embeddings, embeddings)
            text = format_classifier_report(report)
            headline = {"task_gain_pts": report["task_gain_pts"]}
        else:
            adapted = evaluate_model(model, self.tokenizer, *self.args)
            report = gain_forgetting(self.base, adapted)
            text = format_report(report)
            headline = {"domain_gain_pct": report["domain_gain_pct"]}
        write_json(run.path("report.json"), report)
        say(text)
        return {**headline, "general_forgetting_pct": report["general_forgetting_pct"],
                "base": self.base, "adapted": adapted}


def _validation_set(recipe: TrainRecipe, tokenizer, train_set):
    """Rows a method scores before training: the adapter's `lambda_validation` or the train set."""
    source = getattr(recipe.adapter, "lambda_validation", None)
    if source is None:
        return train_set
    data = recipe.data
    return pack_source(source, tokenizer, data.seq_len, data.format, data.world_seed, data.world_size)


def importance_file_of(ref: str, ws: Workspace) -> Path:
    """`run:<id>` → the importance.safetensors that run recorded; anything else is a file path."""
    from adapters.regularizer import IMPORTANCE_FILE

    if ref.startswith("run:"):
        return ws.get(ref.removeprefix("run:")).path(IMPORTANCE_FILE)
    return resolver.current().path(ref, "train.regularizer.importance")


def adapter_folder_of(ref: str, ws: Workspace) -> Path:
    """The adapter folder behind `run:<id>` or a folder path (for methods that build on one)."""
    source = resolve_source(ref, ws)
    if source.adapter is None:
        raise ModelLoadError(f"'{ref}' is a model, not an adapter")
    return source.adapter


def _recorded_base_metrics(run: Run) -> dict | None:
    """The base's metrics logged at step 0 by an earlier attempt of this run, if any."""
    for row in run.metrics():
        if row.get("step") == 0 and any(k.startswith("eval/") for k in row):
            return {k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/")}
    return None


# ----------------------------------------------------------------------------------------------
# eval


def run_eval(recipe: EvalRecipe, ws: Workspace, run: Run | None = None, resume: bool = False) -> Run:
    """Evaluate a model (or base + adapter); compare with its base when there is one."""
    if run is None:
        refs = [recipe.model.path] + ([recipe.base.path] if recipe.base else [])
        run = ws.create_run("eval", recipe.name, recipe_to_yaml(recipe), recipe.seed,
                            parents=run_parents(*refs))
    with ws.running(run):
        seed_everything(recipe.seed)
        model, tokenizer, source = load_model(recipe.model, ws)
        check_seq_len(recipe.seq_len, model, str(source.folder))
        args = (recipe.seq_len, recipe.world.seed, recipe.world.size)
        metrics = evaluate_model(model, tokenizer, recipe.eval, *args)
        base_metrics = None
        if recipe.base is not None:
            del model
            base_model, base_tok, _ = load_model(recipe.base, ws)
            base_metrics = evaluate_model(base_model, base_tok, recipe.eval, *args)
        elif source.adapter is not None:
            with model.disable_adapter():
                base_metrics = evaluate_model(model, tokenizer, recipe.eval, *args)
        summary: dict = {"model": metrics}
        if base_metrics is not None:
            report = gain_forgetting(base_metrics, metrics)
            write_json(run.path("report.json"), report)
            summary.update(base=base_metrics, domain_gain_pct=report["domain_gain_pct"],
                           general_forgetting_pct=report["general_forgetting_pct"])
            say(format_report(report, labels=("base", "model")))
        else:
            for key, value in metrics.items():
                say(f"{key:28s} {value:.4f}")
        write_json(run.path("summary.json"), summary)
        run.finish(summary)
    return run


# ----------------------------------------------------------------------------------------------
# merge


def run_merge(recipe: MergeRecipe, ws: Workspace, run: Run | None = None, resume: bool = False) -> Run:
    """Merge adapters and models into a base, streamed into a model folder (or one adapter)."""
    from merge.instruction_vector import METHOD as INSTRUCTION_VECTOR
    from merge.instruction_vector import check_merge_parameters
    from merge.preflight import check_same_tokenizer, input_kind, plan_of

    explicit_base = resolve_source(recipe.base.path, ws) if recipe.base is not None else None
    # with `base:` the adapters go onto it: their own recorded bases are not resolved (nor fetched)
    sources = [resolve_source(item.path, ws, adapter_base=explicit_base) for item in recipe.inputs]
    base, bases = _merge_base(recipe, sources, ws, explicit_base)
    folders = [s.adapter or s.folder for s in sources]
    check_same_tokenizer(base.folder, folders)
    kinds = [input_kind(f) for f in folders]
    if recipe.output == "adapter":
        lora_only = set(kinds) == {"lora"}
        plan = plan_of(folders, recipe.method, "adapter")  # refuses RoAd merges that do not compose
        if plan == "dense" and not (lora_only and recipe.method == INSTRUCTION_VECTOR):
            raise ValueError(
                f"output: adapter needs one adapter kind merged into one adapter: LoRA adapters by "
                f"task_arithmetic or instruction_vector, road_1 RoAd adapters by task_arithmetic, or "
                f"task prompt vectors / MixDA folders by any method; got method {recipe.method} over "
                f"{', '.join(sorted(set(kinds)))} inputs (use output: model)")
    if recipe.rank is not None and set(kinds) != {"lora"}:
        raise ValueError(f"rank (SVD truncation) applies to LoRA adapters only; the inputs are "
                         f"{', '.join(sorted(set(kinds)))}")
    if recipe.rank is not None and recipe.rank > _lora_rank_sum(sources):
        raise ValueError(f"rank: {recipe.rank} is above Σ r_i = {_lora_rank_sum(sources)} of the inputs; "
                         "leave rank unset for the exact adapter")
    if recipe.search is not None:
        _check_searchable(recipe, sources)
    if run is None:
        refs = [item.path for item in recipe.inputs] + [base.ref]
        run = ws.create_run("merge", recipe.name, recipe_to_yaml(recipe), recipe.seed,
                            parents=run_parents(*refs))
    with ws.running(run):
        for line in bases.log_lines():
            run.log(line)
            say(line)
        output = run.path(recipe.output)
        weights = [item.weight for item in recipe.inputs]
        params = check_merge_parameters(recipe.method, recipe.parameters)
        search = _merge_search(recipe, sources, base, ws, run) if recipe.search is not None else None
        if search is not None:
            chosen = search.points[search.chosen]
            weights, params = chosen.weights, chosen.parameters
        if not output.exists():  # a resumed merge keeps an output it already finished
            _write_merge(recipe, sources, base, output, weights, params)
        from merge.mergekit_bridge import write_mergekit_yaml  # mergekit.yaml where mergekit has an equivalent
        write_mergekit_yaml(recipe, sources, base, run, weights, params)
        outputs = {"model": "model"} if recipe.output == "model" else {"adapter": "adapter",
                                                                       "base": base.ref}
        summary: dict = {"inputs": [[s.ref, w] for w, s in zip(weights, sources)],
                         "base": base.ref, "method": recipe.method,
                         "parameters": check_merge_parameters(recipe.method, params)}
        if search is not None:
            summary["search"] = {"chosen": chosen.label, "rule": search.rule, "reason": search.reason,
                                 "front": [search.points[i].label for i in search.front],
                                 "points": len(search.points), "domain_gain_pct": chosen.domain_gain_pct,
                                 "general_forgetting_pct": chosen.general_forgetting_pct,
                                 "files": ["search.json", "search.md", "pareto.png"]}
        if bases.differences:
            summary["different_bases"] = bases.differences
        summary.update(_truncation_summary(recipe, output))
        if len(sources) > 1:
            summary["task_vector_cosine"] = _task_vector_cosines(sources, base)
            say("Cosine between the inputs' task vectors: " + "; ".join(
                f"{i}·{j} = {row[j]:+.4f}" for i, row in enumerate(summary["task_vector_cosine"])
                for j in range(i + 1, len(row))))
            if recipe.method == INSTRUCTION_VECTOR:
                d, i = (_role_index(recipe, role) for role in ("domain", "instruct"))
                summary["instruction_vector_cosine"] = summary["task_vector_cosine"][d][i]
                say(f"Cosine between the domain vector and the instruction vector: "
                    f"{summary['instruction_vector_cosine']:+.4f} (the method assumes they are "
                    "nearly orthogonal)")
        if recipe.eval is not None:
            summary.update(_evaluate_merge(recipe, sources, base, output, ws, run, params))
        write_json(run.path("summary.json"), summary)
        run.finish(summary, outputs=outputs)
    return run


def _evaluate_merge(recipe: MergeRecipe, sources, base, output: Path, ws: Workspace, run: Run,
                    params: dict) -> dict:
    """Base vs merged on the held-out sets (report.json, terminal table); for an instruction-vector
    merge also base, instruct, domain and merged side by side. Returns the summary's additions."""
    from merge.instruction_vector import METHOD as INSTRUCTION_VECTOR

    from .evaluate import comparison_report, format_comparison

    args = (recipe.seq_len, recipe.world.seed, recipe.world.size)

    def metrics_of(ref: str) -> dict:
        model, tokenizer, _ = load_model(ModelSpec(path=ref), ws)
        return evaluate_model(model, tokenizer, recipe.eval, *args)

    merged_metrics = metrics_of(str(output))
    base_metrics = metrics_of(base.ref)
    report = gain_forgetting(base_metrics, merged_metrics)
    added = dict(domain_gain_pct=report["domain_gain_pct"],
                 general_forgetting_pct=report["general_forgetting_pct"], merged=merged_metrics)
    if recipe.method != INSTRUCTION_VECTOR:
        write_json(run.path("report.json"), report)
        say(format_report(report, labels=("base", "merged")))
        return added
    domain, instruct = (sources[_role_index(recipe, role)] for role in ("domain", "instruct"))
    columns = {"base": base_metrics, "instruct": metrics_of(instruct.ref),
               "domain": metrics_of(domain.ref), "merged": merged_metrics}
    side_by_side = comparison_report(columns, reference="base")
    write_json(run.path("report.json"), {**report, "side_by_side": side_by_side})
    say(format_comparison(side_by_side))
    gains = side_by_side["domain_gain_pct"]
    verdict = (f"Instruction vector (alpha {float(params.get('alpha', 1.0)):g}): domain gain "
               f"{gains['merged']:+.1f}% merged vs {gains['domain']:+.1f}% domain model")
    if all("acc_general_qa_eval" in m for m in columns.values()):
        qa = {k: 100 * m["acc_general_qa_eval"] for k, m in columns.items()}
        verdict += (f"; instruction-format QA (general_qa_eval) {qa['merged']:.1f}% merged vs "
                    f"{qa['instruct']:.1f}% instruct and {qa['base']:.1f}% base")
    say(verdict + ".")
    added["side_by_side"] = side_by_side
    return added


def _merge_base(recipe: MergeRecipe, sources, ws: Workspace, explicit: ModelSource | None):
    """The model to merge onto and what was found about the inputs' own bases (`BaseCheck`).

    `base:` if given (`explicit`), else the base all inputs share. The inputs are checked against
    it before any run starts (`merge.preflight.check_merge_inputs`: kinds that can be combined,
    architectures of the inputs and of the bases they were trained on, tensor names and shapes,
    from configs and safetensors headers); then the inputs' own bases that differ from it are
    measured and refused unless the recipe allows different bases (`_refuse_different_bases`)."""
    from merge.preflight import check_merge_inputs

    own, unchecked = _own_bases(recipe, sources, ws, explicit)
    base = explicit if explicit is not None else own[0]
    if base.folder is not None:
        trained_on = [s.folder if s.adapter is None else (o.folder if o is not None else None)
                      for s, o in zip(sources, own)]
        kinds, _ = check_merge_inputs(base.folder, [s.adapter or s.folder for s in sources],
                                      trained_on, recipe.method, recipe.output)
        if getattr(recipe, "search", None) is not None and {"prompt", "mixda"} & set(kinds):
            raise ValueError("search: sweeps merges of model weights; task prompt vectors and "
                             "MixDA folders merge outside the model's weights")
    check = BaseCheck(differences=_different_bases(base, own), unchecked=unchecked)
    _refuse_different_bases(recipe, base, check.differences, explicit)
    return base, check


@dataclass
class BaseCheck:
    """The inputs' own bases against the base merged onto: those whose weights differ from it
    (`differences`: base, trained_on, inputs, relative_difference = ‖θ_trained_on − θ_base‖ /
    ‖θ_base‖) and the recorded bases that could not be resolved on this machine (`unchecked`)."""

    differences: list[dict]
    unchecked: list[str]

    def log_lines(self) -> list[str]:
        """One line per base that differs or was not checked, for the run log and the terminal."""
        return [f"merging onto a different base than inputs {', '.join(map(str, d['inputs']))} were "
                f"trained on (allow_different_bases): {_difference_text(d)}" for d in self.differences] + \
            self.unchecked


def _own_bases(recipe: MergeRecipe, sources, ws: Workspace, explicit: ModelSource | None):
    """(each input's own base or None where unknown, lines on recorded bases not checked).

    Without `base:` an adapter's own base is the one it was resolved onto and a model's the base
    its run recorded; a model without one is refused. With `base:` the bases the inputs record
    are resolved only where that needs no download (`resolve_local_source`); the others are
    reported as not checked."""
    own, unchecked = [], []
    for i, (item, source) in enumerate(zip(recipe.inputs, sources)):
        recorded = _recorded_base_of(item.path, source, ws)
        # a run's record is the workspace's own; a folder's config is read under the resolver
        trust = resolver.workspace_record() if item.path.startswith("run:") else nullcontext()
        if explicit is None:
            if source.adapter is None and recorded is None:
                raise ValueError(f"inputs.{i}.path '{item.path}' is a model whose base is unknown; "
                                 "set `base:` to the model it was fine-tuned from")
            if source.adapter is not None:  # resolved with the adapter already
                own.append(ModelSource(ref=str(source.folder), folder=source.folder,
                                       config_name=source.config_name))
            else:
                with trust:
                    own.append(resolve_source(recorded, ws))
            continue
        with trust:
            found = resolve_local_source(recorded, ws) if recorded is not None else None
        if recorded is not None and found is None:
            unchecked.append(f"inputs.{i} ({item.path}): base not checked: its recorded base "
                             f"'{recorded}' is not available on this machine (nothing is "
                             f"downloaded for it); merging onto base: {explicit.ref}")
        own.append(found)
    return own, unchecked


def _recorded_base_of(path: str, source: ModelSource, ws: Workspace) -> str | None:
    """The base an input records: a run's `outputs.base`, an adapter folder's config's
    `base_model_name_or_path`; None for a model that records none."""
    if path.startswith("run:"):
        return ws.get(path).info.get("outputs", {}).get("base")
    return recorded_base(source.adapter) if source.adapter is not None else None


def _different_bases(base: ModelSource, own: list) -> list[dict]:
    """The inputs' own bases whose weights differ from the base's, each once with the inputs
    trained on it and ‖θ_own − θ_base‖ / ‖θ_base‖ (`merge.dense.relative_difference`, streamed
    tensor by tensor in float32). A copy of the base in another folder (difference 0) is the base."""
    from merge.dense import relative_difference

    if base.folder is None:
        return []
    target = Path(base.folder).resolve()
    others: dict[Path, tuple[ModelSource, list[int]]] = {}
    for i, source in enumerate(own):
        if source is None or source.folder is None or Path(source.folder).resolve() == target:
            continue
        others.setdefault(Path(source.folder).resolve(), (source, []))[1].append(i)
    differences = []
    for folder, (source, inputs) in others.items():
        value = relative_difference(folder, target)
        if value > 0:
            differences.append({"base": base.ref, "trained_on": source.ref, "inputs": inputs,
                                "relative_difference": value})
    return differences


def _difference_text(difference: dict) -> str:
    return (f"‖θ_a − θ_b‖ / ‖θ_b‖ = {difference['relative_difference']:.4g} for a = "
            f"{difference['trained_on']}, b = {difference['base']}")


def _refuse_different_bases(recipe: MergeRecipe, base: ModelSource, differences: list[dict],
                            explicit: ModelSource | None) -> None:
    """Refuse inputs trained on other bases than the one merged onto unless
    `allow_different_bases`; without `base:`, always (which base to merge onto is the user's
    choice). The message says how far apart the bases are."""
    if not differences:
        return
    measured = "; ".join(map(_difference_text, differences))
    if explicit is None:
        names = sorted({base.ref} | {d["trained_on"] for d in differences})
        hint = ("set `base:` to the one to merge onto" if recipe.allow_different_bases else
                "set `base:` to merge onto one of them, and `allow_different_bases: true` to merge "
                "task vectors learnt on another base")
        raise ModelLoadError(f"the inputs come from different bases ({', '.join(names)}): "
                             f"{measured}; {hint}")
    if not recipe.allow_different_bases:
        inputs = sorted({i for d in differences for i in d["inputs"]})
        raise ModelLoadError(
            f"inputs {', '.join(map(str, inputs))} were trained on other bases than base: {base.ref} "
            f"({measured}); their task vectors were learnt on those weights, not on the base's. "
            "Set `allow_different_bases: true` to merge them onto it anyway")


def _task_vector_cosines(sources, base) -> list[list[float]]:
    """Pairwise cosine similarity of the inputs' task vectors (Hirano & Imajo's premise check:
    a domain vector and an instruction vector should be nearly orthogonal)."""
    from contextlib import ExitStack

    from merge.dense import pairwise_cosines

    layout = model_layout(base.folder)
    with ExitStack() as stack:
        return pairwise_cosines(_delta_readers(sources, layout, stack), list(layout))


def _delta_readers(sources, layout: dict, stack) -> list:
    """One task-vector reader per input, by its kind (`merge.dense.delta_readers`): s·B·A for LoRA,
    (R − I)·W for RoAd, θ − θ_base for models; task prompt vectors and MixDA folders as themselves."""
    from merge.dense import delta_readers

    return delta_readers([s.adapter or s.folder for s in sources], layout, stack)


def _write_merge(recipe: MergeRecipe, sources, base, output: Path, weights: list[float],
                 params: dict) -> None:
    """Stream the merge into a model folder, or write the exact (or SVD-truncated) LoRA adapter."""
    from contextlib import ExitStack

    from merge.dense import merge_folders
    from merge.methods import METHODS
    from merge.preflight import plan_of
    from merge.streaming import lora_concat_adapter
    from merge.svd import svd_truncated_adapter

    folders = [s.adapter or s.folder for s in sources]
    if recipe.method in METHODS and plan_of(folders, recipe.method, recipe.output) in ("road", "prompt", "mixda"):
        # composed RoAd rotations, task prompt vectors, MixDA module weights: their own spaces
        merge_folders(base.folder, list(zip(folders, weights)), output, method=recipe.method,
                      parameters=params, seed=recipe.seed, output=recipe.output,
                      max_shard_bytes=recipe.max_shard_mb * 2**20,
                      trained_on=[s.folder for s in sources], base_ref=str(base.folder))
        return
    with ExitStack() as stack:
        plan = _merge_plan(recipe, sources, base, weights, params, stack)
        if recipe.output == "model":
            plan.write(output, max_shard_bytes=recipe.max_shard_mb * 2**20)
            return
        if plan.extra is not None or Path(plan.anchor) != Path(base.folder):
            raise ValueError("output: adapter needs LoRA adapters only")
        if recipe.rank is not None and recipe.rank < _lora_rank_sum(sources):
            svd_truncated_adapter(plan.adapters, output, recipe.rank, base_model=str(base.folder))
        else:
            lora_concat_adapter(plan.adapters, output, base_model=str(base.folder))


def _merge_plan(recipe: MergeRecipe, sources, base, weights: list[float], params: dict, stack):
    """The merge as a `merge.plan.MergePlan` for these weights and parameters: the exact factored
    LoRA sum for task arithmetic over adapters, the instruction-vector plan, or dense task vectors
    merged tensor by tensor by the method."""
    from merge.dense import merged_deltas
    from merge.instruction_vector import METHOD as INSTRUCTION_VECTOR
    from merge.instruction_vector import check_merge_parameters, instruction_vector_plan
    from merge.plan import MergePlan
    from merge.preflight import plan_of

    params = check_merge_parameters(recipe.method, params)
    if recipe.method == INSTRUCTION_VECTOR:
        domain, instruct = (sources[_role_index(recipe, role)] for role in ("domain", "instruct"))
        return instruction_vector_plan(base.folder, domain, instruct, params["alpha"], stack)
    if plan_of([s.adapter or s.folder for s in sources], recipe.method, recipe.output) == "lora":
        return MergePlan(base.folder, [(s.adapter, w * params["scale"]) for s, w in zip(sources, weights)])
    readers = _delta_readers(sources, model_layout(base.folder), stack)
    return MergePlan(base.folder, [], merged_deltas(readers, weights, recipe.method, recipe.seed, params))


def _role_index(recipe: MergeRecipe, role: str) -> int:
    return next(i for i, item in enumerate(recipe.inputs) if item.role == role)


def _lora_rank_sum(sources) -> int:
    """Σ r_i of the inputs' LoRA adapters (the rank of the exact concatenated adapter)."""
    return sum(int(json.loads((s.adapter / "adapter_config.json").read_text())["r"])
               for s in sources if s.adapter is not None)


def _truncation_summary(recipe: MergeRecipe, output: Path) -> dict:
    """The SVD truncation errors of an adapter output (printed, and returned for the summary)."""
    from merge.svd import format_truncation, read_truncation

    if recipe.output != "adapter" or recipe.rank is None:
        return {}
    report = read_truncation(output)
    if report is None:
        say(f"rank {recipe.rank} is the exact rank Σ r_i: the adapter holds the exact merged update")
        return {}
    say(format_truncation(report))
    return {"truncation": report.as_dict()}


def _merge_search(recipe: MergeRecipe, sources, base, ws: Workspace, run: Run):
    """Sweep recipe.search in memory, write search.json / search.md / pareto.png, return the result
    (read back from search.json when a resumed run already searched)."""
    from contextlib import ExitStack

    from merge.search import read_search, run_search, write_search_files

    done = read_search(run.folder)
    if done is not None:
        return done
    spec = recipe.search
    score, reference = _validation_scorer(recipe, base, ws)

    def merged(candidate):
        with ExitStack() as stack:
            plan = _merge_plan(recipe, sources, base, candidate.weights, candidate.parameters, stack)
            yield from plan.tensors()

    result = run_search(_search_candidates(recipe), merged, score, reference, spec.choose,
                        spec.max_forgetting_pct, log=say)
    write_search_files(run.folder, result, title=f"{recipe.name}: {recipe.method} search")
    chosen = result.points[result.chosen]
    say(f"Search: {len(result.front)} of {len(result.points)} points on the Pareto front; chose "
        f"{chosen.label} ({result.reason}); see search.md and pareto.png in {run.folder}")
    return result


def _check_searchable(recipe: MergeRecipe, sources) -> None:
    """The search evaluates `_merge_plan` in memory; merges written another way are refused."""
    from merge.methods import METHODS
    from merge.preflight import plan_of

    folders = [s.adapter or s.folder for s in sources]
    if recipe.method in METHODS and plan_of(folders, recipe.method, recipe.output) == "road":
        raise ValueError("search: task arithmetic over road_1 RoAd adapters composes their rotations, "
                         "which the in-memory search does not evaluate; search another method "
                         "(e.g. ties, whose RoAd inputs merge as dense deltas) or drop search")


def _search_candidates(recipe: MergeRecipe) -> list:
    from merge.search import Candidate

    spec, weights = recipe.search, [item.weight for item in recipe.inputs]
    if spec.weights is not None:
        return [Candidate("w=[" + ", ".join(f"{w:g}" for w in row) + "]", list(row), dict(recipe.parameters))
                for row in spec.weights]
    return [Candidate(f"{spec.parameter}={value:g}", weights, {**recipe.parameters, spec.parameter: value})
            for value in spec.values]


def _validation_scorer(recipe: MergeRecipe, base, ws: Workspace):
    """(score, the base's metrics): score(tensors) copies a merge's tensors into one loaded copy of
    the base and evaluates it on recipe.search.validation, so no point is written to disk."""
    model, tokenizer, _ = load_model(ModelSpec(path=base.ref), ws, with_adapter=False)
    spec, args = recipe.search.validation, (recipe.seq_len, recipe.world.seed, recipe.world.size)
    reference = evaluate_model(model, tokenizer, spec, *args)
    state = model.state_dict()

    def score(tensors) -> dict:
        with torch.no_grad():
            for name, tensor in tensors:
                if name not in state:
                    raise ValueError(f"tensor {name}: in the merge but not in the model loaded from "
                                     f"{base.folder}")
                state[name].copy_(tensor)
        return evaluate_model(model, tokenizer, spec, *args)

    return score, reference


# ----------------------------------------------------------------------------------------------
# mergekit


def run_mergekit(recipe: MergekitRecipe, ws: Workspace, run: Run | None = None,
                 resume: bool = False) -> Run:
    """Run a mergekit YAML into a model folder (mergekit.yaml as run beside it); evaluate it
    against its base_model when `eval` is set."""
    from merge.mergekit_bridge import resolve_references, run_mergekit_config

    resolved = resolve_references(recipe.config, ws, source="config")
    if recipe.eval is not None and resolved.reference is None:
        raise ValueError("eval: the base_model (or the first model) is a model+lora; give a model "
                         "to evaluate the merge against")
    if run is None:
        run = ws.create_run("mergekit", recipe.name, recipe_to_yaml(recipe), recipe.seed,
                            parents=resolved.parents)
    with ws.running(run):
        write_atomic(run.path("mergekit.yaml"), resolved.yaml)
        output = run.path("model")
        if not output.exists():  # a resumed merge keeps an output it already finished
            run_mergekit_config(resolved.config, output, ws, seed=recipe.seed, source="config")
        outputs = {"model": "model"}
        if resolved.base is not None and resolved.reference is not None:
            outputs["base"] = resolved.reference  # what the model was merged onto
        summary: dict = {"merge_method": recipe.config["merge_method"], "inputs": resolved.inputs,
                         "base": resolved.base, "config": "mergekit.yaml"}
        if recipe.eval is not None:
            args = (recipe.seq_len, recipe.world.seed, recipe.world.size)
            merged, tokenizer, _ = load_model(ModelSpec(path=str(output)), ws)
            merged_metrics = evaluate_model(merged, tokenizer, recipe.eval, *args)
            del merged
            base_model, base_tok, _ = load_model(ModelSpec(path=resolved.reference), ws)
            report = gain_forgetting(evaluate_model(base_model, base_tok, recipe.eval, *args),
                                     merged_metrics)
            write_json(run.path("report.json"), report)
            summary.update(domain_gain_pct=report["domain_gain_pct"],
                           general_forgetting_pct=report["general_forgetting_pct"],
                           merged=merged_metrics)
            say(format_report(report, labels=("base", "merged")))
        write_json(run.path("summary.json"), summary)
        run.finish(summary, outputs=outputs)
    return run


# ----------------------------------------------------------------------------------------------
# pipeline and dispatch


def _bind_stage_refs(stage, done: dict[str, str]):
    """Replace every `stage:<name>` value (model.path, inputs.N.path, adapter.init_from.N.path,
    adapter.domain_adapters.N, train.regularizer.importance, ...) with `run:<id>` of that stage."""

    def bind(node, key: str):
        if isinstance(node, dict):
            return {k: bind(v, f"{key}.{k}" if key else k) for k, v in node.items()}
        if isinstance(node, list):
            return [bind(v, f"{key}.{i}") for i, v in enumerate(node)]
        if isinstance(node, str) and node.startswith("stage:"):
            name = node.split(":", 1)[1]
            if name not in done:
                raise ValueError(f"stage '{stage.name}': {key} refers to stage '{name}', "
                                 "which does not run before it")
            return f"run:{done[name]}"
        return node

    return type(stage).model_validate(bind(stage.model_dump(), ""))


def run_pipeline(recipe: PipelineRecipe, ws: Workspace, run: Run | None = None,
                 resume: bool = False) -> Run:
    run = run or ws.create_run("pipeline", recipe.name, recipe_to_yaml(recipe), 0)
    with ws.running(run):
        done: dict[str, str] = dict(run.info.get("outputs", {}).get("stages", {}))
        for stage in recipe.stages:
            if stage.name in done:
                continue
            say(f"== stage {stage.name} ({stage.kind}) ==")
            child = run_recipe(_bind_stage_refs(stage, done), ws)
            done[stage.name] = child.id
            run.update(outputs={"stages": done})
        run.finish({"stages": done}, outputs={"stages": done})
    return run


def run_quantize(recipe, ws: Workspace, run: Run | None = None, resume: bool = False) -> Run:
    """The quantize stage (`quant.stage.run_quantize`, imported when first used)."""
    from quant.stage import run_quantize as quantize

    return quantize(recipe, ws, run=run, resume=resume)


RUNNERS = {"pretrain": run_pretrain, "train": run_train, "eval": run_eval, "merge": run_merge,
           "mergekit": run_mergekit, "quantize": run_quantize, "pipeline": run_pipeline}


def run_recipe(recipe, ws: Workspace) -> Run:
    """Run any recipe in the workspace and return its (finished) run."""
    return RUNNERS[recipe.kind](recipe, ws)


def resume_run(ref: str, ws: Workspace) -> Run:
    """Continue an interrupted, failed or stopped run from its last checkpoint."""
    run = ws.get(ref)
    if run.info.get("status") == "done":
        raise ValueError(f"run {run.id} is already done")
    if run.status == "running":
        raise ValueError(f"run {run.id} is still running (pid {run.info.get('pid')})")
    if run.info.get("kind") == "export":
        raise ValueError(f"run {run.id} is an export; an export is not resumed: export the run again "
                         "(a failed export leaves nothing at its target)")
    recipe = load_recipe(run.path("recipe.yaml"))
    return RUNNERS[recipe.kind](recipe, ws, run=run, resume=True)

