"""Is EK-FAC right at the sizes the scale claims use? Notebook 01's language-model part (issue 24).

    result = validate_suite(suite, "validation")       # every size of the suite, cached per stage
    result.tables()                                    # {"lm_validation": [...], ...} for the JSON

For each language model of the suite, in float64 with no float32 piece left on the tracked path
(`influence.gnvp.exact_float64`: Llama's RMSNorm and eager-attention softmax otherwise compute in
float32, which left the Gauss–Newton operator symmetric only to ~1e-7 and CG stalled), with the
tracked layers, damping rule and fit seed of the study's scores stage (`influence_scores`):

* **Exact reference.** The "training set" of the check is a subset S of the corpus: the
  sequences that state the facts of the queries (their `related_ids`, so that the top
  influences the notebooks read are in the comparison) plus random corpus sequences, `n_train`
  in all. G, every estimator and CG are defined on S, and every sequence of S is scored. CG
  solves the queries' side, x_q = (G + Λ)⁻¹ ∇m_q for all queries at once (preconditioned by
  EK-FAC fitted on S with the same damping), to a stated TRUE relative residual; a query whose
  solve does not reach it is excluded from every comparison and counted. EK-FAC, K-FAC, the
  diagonal and the gradient dot product are compared with CG per query (Pearson, Spearman),
  with percentile-bootstrap intervals over queries; LiSSA at the smallest and largest size,
  with its true relative residual per query (how far its recursion got).
* **Damping.** Λ = scale × the study's per-layer λ_ℓ: 0.1 × the mean eigenvalue of the layer's
  block of G on the WHOLE corpus (the scores stage's 'auto'), for each scale of `scales`.
* **What S validates.** EK-FAC's approximation of (G + Λ)⁻¹ on this model and this data
  distribution, at the study's damping: G_S is an unbiased estimate of the corpus G up to the
  over-represented query facts. It does not validate the corpus-wide G itself (the study's
  EK-FAC is fitted on all N sequences; CG over N is out of budget), nor scores of sequences
  outside S; the per-copy values are given both as score / N (N the corpus size, what the
  notebooks report) and as score / |S|.
* **Brute force.** Where the tracked parameters are few (`dense_max_params`), G is built
  explicitly from per-token Jacobians on `dense_n_train` sequences of S and (G + Λ)⁻¹ applied
  by a dense solve: CG must reproduce it.
* **PBRF** on `n_pbrf` sequences of S (`pbrf_sizes`), L-BFGS preconditioned by EK-FAC; a
  training example whose two solves do not both meet the tolerance is excluded and counted.
* **Retraining** (`influence.study.retrain_check`) at `retrain_sizes`.

Every stage is cached under `artifacts/lm_validation/<hash>/` (`cache.building`: atomic,
checksummed), keyed by the model's cache entry, the corpus, the rows of S and of the queries and
the stage's settings, so an interrupted run resumes stage by stage.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.func import functional_call, jacrev
from tqdm.auto import tqdm

import influence as inf
from influence.cg import CG
from influence.gnvp import GaussNewton, exact_float64, mean_fisher_diagonal
from influence.gradients import flatten, per_example_gradients
from influence.lissa import LiSSA
from influence.pbrf import pbrf_scores

from . import cache, stats
from .influence_scores import select_queries, stage_config
from .presets import resolve
from .suite import Suite, query_dataset, train_dataset

VERSION = 1
SECTION = "01_ihvp_accuracy"
KEY = "language_model"
ESTIMATORS = ("identity", "diagonal", "kfac", "ekfac")
SIZE_ALIASES = ("smallest", "largest")


# -- settings -------------------------------------------------------------------------------
def settings(preset: str, **overrides: Any) -> dict:
    """Notebook 01's `language_model` settings at `preset` (single values overridable)."""
    return resolve(SECTION, preset, **({KEY: overrides} if overrides else {}))[KEY]


def resolve_sizes(names: Sequence[str] | None, suite_sizes: Sequence[str], what: str) -> list:
    """Size names (or 'smallest' / 'largest') → names of `suite_sizes`, in suite order."""
    if names is None:
        return list(suite_sizes)
    out = []
    for n in names:
        if n == "smallest":
            n = suite_sizes[0]
        elif n == "largest":
            n = suite_sizes[-1]
        if n not in suite_sizes:
            raise ValueError(
                f"{what}: size {n!r} has no trained model in this suite (trained sizes: "
                f"{', '.join(suite_sizes)}; 'smallest' and 'largest' also work)"
            )
        out.append(n)
    return [s for s in suite_sizes if s in out]


def check_settings(suite: Suite, c: dict) -> dict[str, list[str]]:
    """Fail at once, naming the value, on a size without a trained model, a damping scale
    that is not positive, or a subset larger than the corpus; returns the sizes per part."""
    names = suite.names()
    sizes = resolve_sizes(c["sizes"], names, "sizes")
    parts = {"reference": sizes}
    for part in ("lissa_sizes", "dense_sizes", "pbrf_sizes", "retrain_sizes"):
        parts[part.removesuffix("_sizes")] = [
            s for s in resolve_sizes(c[part], names, part) if s in sizes
        ]
    scales = c["scales"]
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or s <= 0:
            raise ValueError(
                f"damping scale {s!r} in `scales` must be a positive finite number (a multiple "
                "of the study's damping)"
            )
    if 1.0 not in [float(s) for s in scales]:
        raise ValueError(f"`scales` {scales} must contain 1.0, the study's own damping")
    n_corpus = len(suite.corpus.train)
    if not 0 < c["n_train"] <= n_corpus:
        raise ValueError(
            f"n_train={c['n_train']} must be between 1 and the corpus size ({n_corpus} training "
            "sequences)"
        )
    n_set = len(suite.corpus.queries[c["query_set"]])
    if not 0 < c["n_queries"] <= n_set:
        raise ValueError(f"n_queries={c['n_queries']} must be between 1 and {n_set}")
    if not 0 < c["n_pbrf"] <= c["n_train"]:
        raise ValueError(f"n_pbrf={c['n_pbrf']} must be between 1 and n_train={c['n_train']}")
    if not 0 < c["dense_n_train"] <= c["n_train"]:
        raise ValueError(
            f"dense_n_train={c['dense_n_train']} must be between 1 and n_train={c['n_train']}"
        )
    return parts


# -- stages, cached -------------------------------------------------------------------------
COST_UNITS = ("wall_s", "cpu_s")


def _timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """fn(), with its wall and CPU seconds (the machine is shared: CPU time is the cost)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c}


def cached_stage(
    key: dict, build: Callable[[], tuple[dict[str, torch.Tensor], dict]]
) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, record) of the stage `key`: read from its verified cache entry, or built
    (`build()`) and written atomically first. `record["cached"]` says which."""
    path = cache.entry_dir("lm_validation", key)
    cached = cache.verified(path)
    if not cached:
        tensors, record = build()
        with cache.building(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "tensors.safetensors")
            (tmp / "record.json").write_text(json.dumps(record, indent=1, default=float))
    tensors = {k: v.clone() for k, v in load_file(path / "tensors.safetensors").items()}
    return tensors, {**cache.read_json(path / "record.json"), "cached": cached}


# -- the problem of one size ----------------------------------------------------------------
@dataclass
class Problem:
    """One size's validation problem: float64 model, subset S, queries, the study's damping."""

    size: str
    model: nn.Module
    task: inf.Task
    train: Any  # datasets.Dataset, the rows of S
    rows: list[int]  # corpus rows of S, sorted
    queries: Any
    query_rows: list[int]  # rows of the query set
    damping: dict[str, float]  # the scores stage's λ_ℓ (scale 1)
    n_corpus: int
    tracked: int
    key: dict  # what every stage of this size depends on
    costs: dict = field(default_factory=dict)

    def lam(self, scale: float) -> dict[str, float]:
        return {n: float(scale) * v for n, v in self.damping.items()}


def choose_rows(suite: Suite, c: dict, stage: dict, seed: int) -> tuple[list[int], list[int]]:
    """(query rows, corpus rows of S). Queries: `n_queries` of the scores stage's sample of
    `query_set` (`stage`: its `stage_config`); S: their related sequences (if
    `include_related`) and random ones."""
    sampled = select_queries(suite, stage)[c["query_set"]]
    if c["n_queries"] > len(sampled):
        raise ValueError(
            f"n_queries={c['n_queries']} exceeds the {len(sampled)} {c['query_set']} queries "
            "the scores stage samples"
        )
    rng = np.random.default_rng([seed, 24])
    qrows = sorted(int(i) for i in rng.choice(sampled, size=c["n_queries"], replace=False))
    n = len(suite.corpus.train)
    related: list[int] = []
    if c["include_related"]:
        rel = suite.corpus.queries[c["query_set"]].select(qrows)["related_ids"]
        related = sorted({int(i) for r in rel for i in r})
        if len(related) > c["n_train"]:
            related = sorted(int(i) for i in rng.choice(related, c["n_train"], replace=False))
    rest = np.setdiff1d(np.arange(n), related)
    fill = rng.choice(rest, size=c["n_train"] - len(related), replace=False)
    return qrows, sorted(related + [int(i) for i in fill])


def study_damping(suite: Suite, name: str, model, task, stage: dict, progress: bool) -> dict:
    """The scores stage's per-layer λ_ℓ for model `name`: 'auto' is 0.1 × the mean eigenvalue
    of the layer's block of G on the whole corpus (the mean squared sampled-label gradient,
    which equals the mean of EK-FAC's fitted eigenvalues), with the stage's fit seed."""
    infos = inf.layers.layer_infos(task.tracked_modules(model))
    if stage["damping"] != "auto":
        return {n: float(stage["damping"]) for n in infos}
    key = {
        "stage": "damping",
        "model": suite.paths[name].name if name in suite.paths else name,
        "corpus": suite.corpus.sha256,
        "modules": stage["modules"],
        "fit_seed": stage["fit_seed"],
        "version": VERSION,
    }

    def build():
        full = train_dataset(suite, suite.corpus)
        with exact_float64():
            mean_eig, cost = _timed(
                lambda: mean_fisher_diagonal(
                    model,
                    task,
                    full,
                    batch_size=stage["batch_size"],
                    progress=progress,
                    seed=stage["fit_seed"],
                )
            )
        return {}, {"damping": {n: 0.1 * v for n, v in mean_eig.items()}, "cost": cost}

    _, record = cached_stage(key, build)
    return {n: float(v) for n, v in record["damping"].items()}


def make_problem(
    suite: Suite, name: str, c: dict, preset: str, seed: int, device: str, progress: bool
) -> Problem:
    stage = stage_config(suite, preset)
    model = copy.deepcopy(suite.models[name]).double().to(device).eval()
    task = inf.LanguageModelingTask(modules=stage["modules"])
    qrows, rows = choose_rows(suite, c, stage, seed)
    full = train_dataset(suite, suite.corpus)
    queries = query_dataset(suite.tokenizer, suite.corpus.queries[c["query_set"]].select(qrows))
    damping = study_damping(suite, name, model, task, stage, progress)
    tracked = sum(i.numel for i in inf.layers.layer_infos(task.tracked_modules(model)).values())
    key = {
        "model": suite.paths[name].name if name in suite.paths else name,
        "corpus": suite.corpus.sha256,
        "modules": stage["modules"],
        "fit_seed": stage["fit_seed"],
        "damping": damping,
        "query_set": c["query_set"],
        "queries": qrows,
        "rows": rows,
        "batch_size": c["batch_size"],
        "version": VERSION,
    }
    return Problem(
        size=name,
        model=model,
        task=task,
        train=full.select(rows),
        rows=rows,
        queries=queries,
        query_rows=qrows,
        damping=damping,
        n_corpus=len(full),
        tracked=tracked,
        key=key,
    )


def _fit(p: Problem, est, c: dict, data=None):
    return est.fit(
        p.model,
        p.task,
        p.train if data is None else data,
        batch_size=c["batch_size"],
        progress=False,
        seed=p.key["fit_seed"],
    )


def _scores(p: Problem, est, c: dict, progress: bool, train=None) -> torch.Tensor:
    return inf.pairwise_scores(
        p.model,
        p.task,
        est,
        p.queries,
        p.train if train is None else train,
        batch_size=c["batch_size"],
        progress=progress,
    ).double()


def _solve_record(solve: dict) -> dict:
    """What the validation keeps of one CG solve record (`CG.meta_["solves"]`)."""
    keep = ("iterations", "restarts", "relative_residuals", "converged", "iterations_per_rhs")
    keep += ("resumed_at",)
    return {**{k: solve[k] for k in keep}, "history": solve["history"]}


# -- exact reference and estimators at every damping scale ----------------------------------
def _query_gradients(p: Problem, c: dict, infos) -> torch.Tensor:
    """The queries' measurement gradients, flat [Q, P] float64."""
    gq = per_example_gradients(
        p.model, p.task, p.queries, measurement=True, batch_size=c["batch_size"]
    )
    return flatten(gq, infos).double()


def _train_products(p: Problem, x: torch.Tensor, infos, c: dict) -> torch.Tensor:
    """x [..., Q, P] against every training gradient of S: [..., Q, |S|], the gradients formed
    `batch_size` sequences at a time."""
    parts = []
    for start in range(0, len(p.rows), c["batch_size"]):
        chunk = p.train.select(range(start, min(start + c["batch_size"], len(p.rows))))
        g = flatten(
            per_example_gradients(p.model, p.task, chunk, batch_size=c["batch_size"]), infos
        )
        parts.append(x @ g.double().T)
    return torch.cat(parts, dim=-1)


def cg_scores(
    p: Problem, cg: CG, scales: Sequence[float], c: dict, checkpoint: Path | None = None
) -> dict[float, torch.Tensor]:
    """CG's scores [Q, |S|] at every scale: x_q = (G + sΛ)⁻¹ ∇m_q for all queries and scales
    in one multi-shift solve (`CG.solve_scaled`, resumable from `checkpoint`), then
    x_q · ∇L(z_m) for every m of S."""
    infos = cg.layers_
    xs = cg.solve_scaled(_query_gradients(p, c, infos), scales, checkpoint=checkpoint)
    x = torch.stack([xs[float(s)] for s in scales])  # [S, Q, P]
    scores = _train_products(p, x, infos, c)
    return {float(s): scores[j] for j, s in enumerate(scales)}


def reference(p: Problem, c: dict, progress: bool) -> tuple[dict, dict]:
    """Scores [Q, |S|] of CG and of every estimator at each damping scale × the study's
    (tensors "<estimator>@<scale>"), with CG's per-query true residuals and convergence per
    scale, and each part's cost."""
    scales = [float(v) for v in c["scales"]]
    key = {
        **p.key,
        "stage": "reference",
        "scales": scales,
        "cg_tol": c["cg_tol"],
        "cg_max_iter": c["cg_max_iter"],
    }

    def build():
        costs, out = {}, {}
        with exact_float64():
            ek, costs["ekfac_fit"] = _timed(lambda: _fit(p, inf.EKFAC(), c))
            diag, costs["diagonal_fit"] = _timed(lambda: _fit(p, inf.Diagonal(damping=1.0), c))
            ident = _fit(p, inf.Identity(), c)
            for scale in scales:
                lam = p.lam(scale)
                ek_s = ek.with_damping(lam)
                estimators = {
                    "identity": ident,
                    "diagonal": diag.with_damping(lam),
                    "kfac": inf.KFAC.from_ekfac(ek_s, damping=lam),
                    "ekfac": ek_s,
                }
                for name, est in estimators.items():
                    out[f"{name}@{scale:g}"], costs[f"{name}_scores@{scale:g}"] = _timed(
                        lambda est=est: _scores(p, est, c, False)
                    )
            cg = _fit(
                p,
                CG(damping=p.lam(1.0), tol=c["cg_tol"], max_iter=c["cg_max_iter"], strict=False),
                c,
            )
            cg.progress_ = progress
            # hours at the larger sizes: a killed run resumes the solve where it stopped
            ckpt = cache.artifacts_root() / "checkpoints" / "lm_validation"
            ckpt = ckpt / f"{cache.config_hash(key)}-cg.pt"
            solved, costs["cg"] = _timed(lambda: cg_scores(p, cg, scales, c, ckpt))
            # a resumed solve: add the seconds its killed runs spent (saved in the checkpoint)
            before = cg.meta_["solves"][-1]["seconds_before_resume"]
            costs["cg"] = {u: costs["cg"][u] + before[u] for u in COST_UNITS}
        for scale, sc in solved.items():
            out[f"cg@{scale:g}"] = sc
        solves = {f"{r['scale']:g}": _solve_record(r) for r in cg.meta_["solves"]}
        return out, {"scales": scales, "cg": solves, "costs": costs}

    return cached_stage(key, build)


LISSA_RETRIES = 4  # a diverged LiSSA is run again with twice its scale, at most this often


def lissa(p: Problem, c: dict, progress: bool) -> tuple[dict, dict]:
    """LiSSA's scores at the study's damping (scale 1), with its settings, cost and, per query,
    how far its recursion got: the true relative residual ‖(G + Λ)x − ∇m_q‖ / ‖∇m_q‖ with the
    full G on S (one more Gauss–Newton pass).

    LiSSA's 'auto' scale (2 × λ_max of the damped G on S) can be below the largest eigenvalue
    of a minibatch's G, and then the recursion diverges; as a user would, the run is repeated
    with twice the scale (at most `LISSA_RETRIES` times), every attempt recorded. A larger
    scale converges more slowly at the same depth: the residual says how far it got."""
    key = {
        **p.key,
        "stage": "lissa",
        "lissa": c["lissa"],
        "residuals": True,
        "retries": LISSA_RETRIES,
    }

    def build():
        attempts: list[dict] = []
        settings = dict(c["lissa"])
        for _ in range(LISSA_RETRIES + 1):
            est = LiSSA(damping=p.lam(1.0), **settings)
            with exact_float64():
                est, fit = _timed(lambda est=est: _fit(p, est, c))
                est.progress_ = progress

                def solve_and_score(est=est):
                    g = _query_gradients(p, c, est.layers_)
                    x = est.solve(g)
                    return g, x, _train_products(p, x, est.layers_, c)

                try:
                    (g, x, scores), cost = _timed(solve_and_score)
                except FloatingPointError as err:
                    attempts.append({"scale": est.scale_, "diverged": str(err)})
                    settings["scale"] = 2.0 * est.scale_
                    continue
                residual = (est.operator_.matvec(x) - g).norm(dim=1) / g.norm(dim=1)
            attempts.append({"scale": est.scale_, "diverged": None})
            record = {
                "scale": est.scale_,
                "attempts": attempts,
                "relative_residuals": residual.tolist(),
                "costs": {"lissa_fit": fit, "lissa_scores": cost},
            }
            return {"lissa": scores}, record
        tried = ", ".join(f"{a['scale']:.3g}" for a in attempts)
        raise FloatingPointError(
            f"LiSSA diverged at every scale tried ({tried}): raise "
            "`language_model.lissa.batch_size` or set a larger `language_model.lissa.scale`"
        )

    return cached_stage(key, build)


# -- brute force: the explicit damped Gauss–Newton matrix -----------------------------------
def explicit_gauss_newton(model: nn.Module, task: inf.Task, data) -> torch.Tensor:
    """(1/n) Σ_i J_iᵀ H_i J_i [P, P] over the tracked parameters (internal layout), from
    explicit Jacobians: a causal LM's logits are W h (W the untracked output embedding, h the
    final hidden states), so J_i = W ∂h_i/∂θ and J_iᵀ H_i J_i = Σ_t (∂h_t/∂θ)ᵀ Wᵀ H_t W ∂h_t/∂θ
    with H_t = diag(p_t) − p_t p_tᵀ at every counted position. ∂h/∂θ by `jacrev`, one sequence
    at a time; no Gauss–Newton–vector product is used."""
    from influence.gnvp import current_layout, layout_to_params
    from influence.gradients import unflatten

    infos = inf.layers.layer_infos(task.tracked_modules(model))
    theta = flatten({k: v[None] for k, v in current_layout(model, infos).items()}, infos)[0]
    head = model.get_output_embeddings()
    body = copy.deepcopy(model)
    body.set_output_embeddings(nn.Identity())  # the same network up to h
    body.requires_grad_(False)  # only jacrev's own derivatives: no graph to the weights
    w = head.weight.detach()
    g = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    n = 0
    for _, batch, _ in inf.gradients.ordered_batches(data, 1):
        batch = task.to_device(batch, theta.device)
        inputs = inf.tasks.model_inputs(model, batch)

        def hidden(flat, inputs=inputs):
            params = layout_to_params(unflatten(flat[None], infos), infos)
            return functional_call(body, {k: v[0] for k, v in params.items()}, (), inputs).logits[0]

        h = hidden(theta).detach()
        logits = head(h).detach()
        if not torch.allclose(logits, model(**inputs).logits[0], rtol=1e-10, atol=1e-10):
            raise RuntimeError("the model's logits are not W h: the explicit check cannot apply")
        jac = jacrev(hidden)(theta).detach()  # [T, d, P]
        counted = task.targets(batch)[0, task.shift :] != -100
        t = int(counted.shape[0])
        p = torch.softmax(logits[:t], -1)[counted]  # [K, V]
        hw = p[:, :, None] * w[None] - p[:, :, None] * (p @ w)[:, None, :]  # H_t W, [K, V, d]
        m = torch.einsum("vd,kve->kde", w, hw)  # Wᵀ H_t W
        r = torch.einsum("kde,kep->kdp", m, jac[:t][counted])
        g += torch.einsum("kdp,kdq->pq", jac[:t][counted], r)
        n += 1
    return g / n


def dense_check(p: Problem, c: dict, progress: bool) -> tuple[dict, dict]:
    """CG (`CG.solve_scaled`, as the reference) against the explicit (G + sΛ)⁻¹ at every
    scale on `dense_n_train` sequences of S, and the operator's products and symmetry
    against the explicit G."""
    scales = [float(v) for v in c["scales"]]
    key = {**p.key, "stage": "dense", "n": c["dense_n_train"], "cg_tol": c["cg_tol"]}
    key["scales"] = scales

    def build():
        rng = np.random.default_rng([p.key["fit_seed"], 7])
        sub = sorted(int(i) for i in rng.choice(len(p.rows), c["dense_n_train"], replace=False))
        data = p.train.select(sub)
        with exact_float64():
            g, cost_g = _timed(lambda: explicit_gauss_newton(p.model, p.task, data))
            infos = inf.layers.layer_infos(p.task.tracked_modules(p.model))
            lam_vec = inf.gnvp.damping_vector(p.lam(1.0), infos)
            gq = flatten(
                per_example_gradients(p.model, p.task, p.queries, measurement=True), infos
            ).double()
            exact, cost_solve = _timed(
                lambda: {s: torch.linalg.solve(g + s * torch.diag(lam_vec), gq.T).T for s in scales}
            )
            cg = CG(damping=p.lam(1.0), tol=c["cg_tol"], max_iter=c["cg_max_iter"], strict=False)
            cg = _fit(p, cg, c, data)
            cg.progress_ = progress
            x, cost_cg = _timed(lambda: cg.solve_scaled(gq, scales))
            v = torch.randn(
                2, g.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0)
            )
            products = cg.operator_.gnvp(v)
        explicit = v @ g.T
        op = GaussNewton(p.model, p.task, data, batch_size=c["batch_size"], exact_float64=False)
        asym = {"exact_float64": _asymmetry(cg.operator_, v), "model_as_is": _asymmetry(op, v)}
        errors = {
            f"{s:g}": ((x[s] - exact[s]).norm(dim=1) / exact[s].norm(dim=1)).tolist()
            for s in scales
        }
        record = {
            "n_train": len(sub),
            "tracked": int(g.shape[0]),
            "cg_relative_error": errors,
            "cg": {f"{r['scale']:g}": _solve_record(r) for r in cg.meta_["solves"]},
            "gnvp_relative_error": float((products - explicit).norm() / explicit.norm()),
            "asymmetry": asym,
            "costs": {"explicit_G": cost_g, "dense_solve": cost_solve, "cg": cost_cg},
        }
        tensors = {f"exact@{s:g}": exact[s] for s in scales}
        return tensors | {f"cg@{s:g}": x[s] for s in scales}, record

    return cached_stage(key, build)


def _asymmetry(op: GaussNewton, v: torch.Tensor) -> float:
    """|uᵀGw − wᵀGu| / |uᵀGw| for the two rows u, w of v: zero for an exact symmetric G."""
    gv = op.gnvp(v)
    a, b = float(v[1] @ gv[0]), float(v[0] @ gv[1])
    return abs(a - b) / abs(a)


# -- PBRF -----------------------------------------------------------------------------------
def pbrf_key(p: Problem, c: dict) -> dict:
    """What every PBRF solve of this problem depends on (each example's entry adds its index)."""
    return {
        **p.key,
        "stage": "pbrf",
        "tol": c["pbrf_tol"],
        "steps": c["pbrf_steps"],
        "preconditioner": c["pbrf_preconditioner"],
    }


def pbrf(p: Problem, c: dict, progress: bool) -> tuple[dict, dict]:
    """PBRF scores [Q, M] of `n_pbrf` random sequences of S at the study's damping, with each
    example's convergence (both ±ε solves within `pbrf_tol`). `pbrf_preconditioner`: None,
    "damping" (Λ⁻¹ per layer) or "ekfac" (fitted on S). Each example's two solves are cached
    on their own, so an interrupted run resumes at the first example not yet solved."""
    key = pbrf_key(p, c)
    rng = np.random.default_rng([p.key["fit_seed"], 11])
    idx = sorted(int(i) for i in rng.choice(len(p.rows), c["n_pbrf"], replace=False))
    lam = p.lam(1.0)
    fitted: list = []

    def preconditioner():
        if c["pbrf_preconditioner"] != "ekfac":
            return c["pbrf_preconditioner"]
        if not fitted:  # measured slower than "damping" on the study's Llamas
            fitted.append(_fit(p, inf.EKFAC(), c).with_damping(lam))
        return fitted[0]

    def solve(i: int) -> tuple[dict, dict]:
        with exact_float64():
            (scores, info), cost = _timed(
                lambda: pbrf_scores(
                    p.model,
                    p.task,
                    p.queries,
                    p.train,
                    [i],
                    damping=lam,
                    tol=c["pbrf_tol"],
                    max_steps=c["pbrf_steps"],
                    batch_size=c["batch_size"],
                    preconditioner=preconditioner(),
                    progress=False,
                    return_info=True,
                )
            )
        record = {k: info[k] for k in ("converged", "steps", "relative_gradient", "epsilon")}
        return {"pbrf": scores}, {**record, "costs": {"pbrf": cost}}

    done = [
        cached_stage({**key, "example": i}, lambda i=i: solve(i))
        for i in tqdm(idx, desc=f"PBRF {p.size}", disable=not progress, leave=False)
    ]
    records = [r for _, r in done]
    record = {
        "indices": idx,
        "epsilon": records[0]["epsilon"],
        "cached": all(r["cached"] for r in records),
        # as for every cached part: the seconds measured when each example was solved
        "costs": {"pbrf": {u: sum(r["costs"]["pbrf"][u] for r in records) for u in COST_UNITS}},
    }
    for name in ("converged", "steps", "relative_gradient"):
        record[name] = [v for r in records for v in r[name]]
    return {"pbrf": torch.cat([t["pbrf"] for t, _ in done], dim=1)}, record


# -- comparisons ----------------------------------------------------------------------------
MIN_POINTS = 5


def per_query(pred: torch.Tensor, truth: torch.Tensor, keep: Sequence[bool]) -> pd.DataFrame:
    """Pearson and Spearman per kept query (rows of the [Q, M] matrices)."""
    rows = []
    for q in np.flatnonzero(np.asarray(keep, dtype=bool)):
        a, b = pred[q].numpy(), truth[q].numpy()
        ok = len(a) >= MIN_POINTS and np.ptp(a) > 0 and np.ptp(b) > 0
        rows.append(
            {
                "query": int(q),
                "pearson": float(pearsonr(a, b).statistic) if ok else float("nan"),
                "spearman": float(spearmanr(a, b).statistic) if ok else float("nan"),
            }
        )
    return pd.DataFrame(rows, columns=["query", "pearson", "spearman"])


def summarise(df: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """Mean Pearson and Spearman over queries with percentile-bootstrap intervals."""
    out: dict[str, Any] = {}
    for col in ("pearson", "spearman"):
        v = df[col].dropna().to_numpy()
        if len(v) == 0:
            out[col], out[f"{col}_ci"] = float("nan"), [float("nan")] * 2
            continue
        mean, lo, hi = stats.bootstrap(v, n_boot=n_boot, seed=seed)
        out[col], out[f"{col}_ci"] = float(mean), [float(lo), float(hi)]
    return out


# -- the whole validation -------------------------------------------------------------------
@dataclass
class Validation:
    """The validation's tables (tidy pandas frames; `tables()` gives JSON-ready records)."""

    lm_validation: pd.DataFrame
    lm_damping_sweep: pd.DataFrame
    lm_pbrf: pd.DataFrame
    retrain_check: pd.DataFrame
    per_query: pd.DataFrame
    dense_check: pd.DataFrame
    retrain_pairs: pd.DataFrame
    costs: pd.DataFrame
    settings: dict

    def tables(self) -> dict[str, list[dict]]:
        names = (
            "lm_validation",
            "lm_damping_sweep",
            "lm_pbrf",
            "retrain_check",
            "dense_check",
            "costs",
        )
        return {n: json.loads(getattr(self, n).to_json(orient="records")) for n in names}


def _cost_rows(size: str, part: str, record: dict) -> list[dict]:
    return [
        {"size": size, "part": part, "step": step, **cost, "cached": record["cached"]}
        for step, cost in record["costs"].items()
    ]


def validate_size(
    suite: Suite, name: str, parts: dict, c: dict, preset: str, seed: int, device, progress
) -> dict[str, list]:
    """Every part of the validation for one size; rows for each table."""
    from .retrain_check import retrain_check

    p = make_problem(suite, name, c, preset, seed, device, progress)
    out: dict[str, list] = {k: [] for k in ("val", "sweep", "pq", "pbrf", "dense", "rt", "rp")}
    out["costs"] = []
    common = {"size": name, "model": p.key["model"], "tracked": p.tracked, "n_train": len(p.rows)}
    scores, record = reference(p, c, progress)
    out["costs"] += _cost_rows(name, "reference", record)
    cg_at = {}
    for scale in record["scales"]:
        cg = record["cg"][f"{scale:g}"]
        keep = cg["converged"]
        used = [r for r, k in zip(cg["relative_residuals"], keep, strict=True) if k]
        cg_at[scale] = {
            "cg_residual": max(used) if used else float("nan"),
            "cg_converged_share": float(np.mean(keep)),
            "cg_excluded": int(len(keep) - sum(keep)),
            "cg_iterations": cg["iterations"],
        }
        truth = scores[f"cg@{scale:g}"]
        for est in (*ESTIMATORS, "cg"):
            pred = scores[f"{est}@{scale:g}"]
            kept = pred[np.asarray(keep, dtype=bool)]
            per_copy = float(kept.max()) / p.n_corpus if len(kept) else float("nan")
            df = per_query(pred, truth, keep)
            summ = summarise(df, c["n_boot"], seed)
            out["sweep"].append(
                {
                    **common,
                    "scale": scale,
                    "estimator": est,
                    "pearson_vs_cg": summ["pearson"],
                    "spearman_vs_cg": summ["spearman"],
                    "max_per_copy": per_copy,
                    "max_per_copy_subset": per_copy * p.n_corpus / len(p.rows),
                    **cg_at[scale],
                }
            )
            if scale == 1.0 and est != "cg":
                df["size"], df["estimator"] = name, est
                out["pq"].append(df)
                out["val"].append(_val_row(common, est, p, summ, cg_at[scale], len(keep)))
    keep1 = record["cg"]["1"]["converged"]
    if name in parts["lissa"]:
        lis, lrec = lissa(p, c, progress)
        out["costs"] += _cost_rows(name, "lissa", lrec)
        df = per_query(lis["lissa"], scores["cg@1"], keep1)
        summ = summarise(df, c["n_boot"], seed)
        res = np.asarray(lrec["relative_residuals"])
        row = _val_row(common, "lissa", p, summ, cg_at[1.0], len(keep1))
        row["lissa_median_residual"] = float(np.median(res))
        row["lissa_worst_residual"] = float(res.max())
        row["lissa_scale"] = float(lrec["scale"])
        row["lissa_diverged_attempts"] = sum(a["diverged"] is not None for a in lrec["attempts"])
        out["val"].append(row)
        df["size"], df["estimator"] = name, "lissa"
        out["pq"].append(df)
    if name in parts["dense"] and p.tracked <= c["dense_max_params"]:
        _, record = dense_check(p, c, progress)
        out["costs"] += _cost_rows(name, "dense", record)
        for scale, errors in record["cg_relative_error"].items():
            solve = record["cg"][scale]
            out["dense"].append(
                {
                    "size": name,
                    "scale": float(scale),
                    "tracked": record["tracked"],
                    "n_train": record["n_train"],
                    "cg_max_relative_error": max(errors),
                    "cg_residual": max(solve["relative_residuals"]),
                    "cg_iterations": solve["iterations"],
                    "gnvp_relative_error": record["gnvp_relative_error"],
                    "asymmetry_exact_float64": record["asymmetry"]["exact_float64"],
                    "asymmetry_model_as_is": record["asymmetry"]["model_as_is"],
                }
            )
    if name in parts["pbrf"]:
        pb, record = pbrf(p, c, progress)
        out["costs"] += _cost_rows(name, "pbrf", record)
        out["pbrf"].append(_pbrf_row(common, p, pb["pbrf"], record, scores, keep1, c, seed))
    if name in parts["retrain"]:
        # bit-for-bit reproduction of the suite's model: checked once, at the smallest size
        first = name == parts["retrain"][0]
        rows, pairs, costs = retrain_check(suite, name, c, preset, seed, progress, first=first)
        out["rt"].append(rows)
        out["rp"].append(pairs)
        out["costs"] += costs
    return out


def _val_row(common, est, p: Problem, summ: dict, cg_cols: dict, n_queries: int) -> dict:
    return {
        **common,
        "estimator": est,
        "n_queries": n_queries - cg_cols["cg_excluded"],
        "damping": 1.0,
        "lambda_mean": float(np.mean(list(p.damping.values()))),
        "pearson_vs_cg": summ["pearson"],
        "spearman_vs_cg": summ["spearman"],
        "pearson_ci": summ["pearson_ci"],
        "spearman_ci": summ["spearman_ci"],
        **cg_cols,
    }


def _pbrf_row(common, p: Problem, pbrf, record, ref: dict, keep, c, seed) -> dict:
    """The PBRF row: examples whose solves did not converge are excluded and counted; EK-FAC
    and CG (scale 1, converged queries) against the PBRF over the rest."""
    conv = np.asarray(record["converged"], dtype=bool)
    cols = np.asarray(record["indices"])[conv]
    truth = pbrf[:, conv]
    out = {
        **common,
        "n_train": len(conv),
        "n_fit": len(p.rows),
        "converged_share": float(conv.mean()),
        "n_converged": int(conv.sum()),
        "epsilon_times_n": record["epsilon"] * len(p.rows),
    }
    for est in ("ekfac", "cg"):
        summ = summarise(per_query(ref[f"{est}@1"][:, cols], truth, keep), c["n_boot"], seed)
        out[f"pearson_{est}_vs_pbrf"] = summ["pearson"]
        out[f"pearson_{est}_vs_pbrf_ci"] = summ["pearson_ci"]
    return out


def validate_suite(
    suite: Suite,
    preset: str = "validation",
    *,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    config: dict | None = None,
    **overrides: Any,
) -> Validation:
    """The four tables of issue 24 (and the per-query, dense-check, retrain-pair and cost
    tables) for every size of the suite (`sizes`), each stage cached. `config`: the resolved
    `language_model` settings (a notebook's), else the preset's with `overrides`."""
    c = config if config is not None else settings(preset, **overrides)
    parts = check_settings(suite, c)
    acc: dict[str, list] = {}
    for name in parts["reference"]:
        for k, v in validate_size(suite, name, parts, c, preset, seed, device, progress).items():
            acc.setdefault(k, []).extend(v)

    def frame(rows, **kw):
        return pd.DataFrame(rows, **kw) if rows else pd.DataFrame()

    return Validation(
        lm_validation=frame(acc["val"]),
        lm_damping_sweep=frame(acc["sweep"]),
        lm_pbrf=frame(acc["pbrf"]),
        retrain_check=frame(acc["rt"]),
        per_query=pd.concat(acc["pq"], ignore_index=True) if acc["pq"] else pd.DataFrame(),
        dense_check=frame(acc["dense"]),
        retrain_pairs=pd.concat(acc["rp"], ignore_index=True) if acc["rp"] else pd.DataFrame(),
        costs=frame(acc["costs"]),
        settings={**c, "parts": parts},
    )
