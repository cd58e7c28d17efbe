"""The TLEG learngene (Xia et al., AAAI 2024, "Transformer as Linear Expansion of Learngene").

Every block's parameters are a linear function of depth: ``W_l = W_base + (l / L) W_slope``,
``l = 0..L-1`` (the paper's ``theta_A + (l/L) theta_B``), for every parameter of a block (linear layers
and norms); the embedding, final norm and readout are shared. Two tensors per parameter then make a
model of any depth:

- :func:`fit` fits that form to a trained model by least squares, parameter by parameter, with ``r2``
  (how linear in depth the trained weights are);
- :func:`train` trains a learngene-constrained auxiliary model (:class:`LearngeneModel`: only
  ``W_base``, ``W_slope`` and the shared parts are parameters; the forward pass materialises ``W_l``),
  optionally distilled from a teacher's logits;
- :meth:`Learngene.expand` builds a model of ``n_layers`` blocks from it
  (``W_l = W_base + (l / n_layers) W_slope``), which then trains unconstrained;
- :func:`experiment` compares descendants of depth 2..8 initialised from one learngene with random
  initialisation after the same short training.

Definitions: ``docs/definitions.md#learngene``, ``#learngene-r2``, ``#learngene-expansion``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.checks import check_float, check_int, check_model, check_seed
from ..core.data import IGNORE, Dataset
from ..core.models import build, config_for
from ..core.training import Callback, Run, TrainConfig, loss_and_correct, train as train_model

__all__ = ["Learngene", "LearngeneModel", "fit", "train", "experiment", "expansion", "block_parameter_names"]


def block_parameter_names(model: nn.Module) -> list[str]:
    """The parameter names inside one block (``"fc.weight"``, ``"attn.qkv.bias"``, ...)."""
    check_model("model", model)
    if not len(model.blocks):
        return []
    return [n for n, _ in model.blocks[0].named_parameters()]


def _shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("blocks.")}


@dataclass
class Learngene:
    """``W_base`` and ``W_slope`` per block parameter, the shared (non-block) state and the model config.

    ``r2``: per parameter, how well the linear form fits the model it was fitted to (NaN for a trained
    learngene, which is linear by construction). ``n_layers``: the depth it was fitted to or trained at.
    """

    config: object                       # the model config (any n_layers; expand() sets it)
    base: dict[str, torch.Tensor]        # block parameter name -> W_base
    slope: dict[str, torch.Tensor]       # block parameter name -> W_slope
    shared: dict[str, torch.Tensor]      # state dict entries outside the blocks (embedding, final norm, readout)
    n_layers: int
    r2: dict[str, float] = dataclasses.field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """Tidy: ``param, numel, r2`` per block parameter (``docs/definitions.md#learngene-r2``)."""
        return pd.DataFrame([{"param": n, "numel": int(t.numel()), "r2": float(self.r2.get(n, float("nan")))}
                             for n, t in self.base.items()], columns=["param", "numel", "r2"])

    def weights(self, n_layers: int) -> list[dict[str, torch.Tensor]]:
        """The block parameters of a depth-``n_layers`` descendant: ``W_base + (l / n_layers) W_slope``."""
        n_layers = check_int("n_layers", n_layers, 1, 256)
        return [{n: (self.base[n].double() + (l / n_layers) * self.slope[n].double()).to(self.base[n].dtype)
                 for n in self.base} for l in range(n_layers)]

    def expand(self, n_layers: int, device=None) -> nn.Module:
        """A model of ``n_layers`` blocks initialised from the learngene (``docs/definitions.md#learngene-expansion``).

        ``expand(self.n_layers)`` reproduces a model whose blocks are linear in depth (the fitted one,
        to float rounding).
        """
        n_layers = check_int("n_layers", n_layers, 1, 256)
        model = build(dataclasses.replace(self.config, n_layers=n_layers))
        with torch.no_grad():
            state = model.state_dict()
            for k, v in self.shared.items():
                state[k].copy_(v)
            for l, params in enumerate(self.weights(n_layers)):
                for n, v in params.items():
                    state[f"blocks.{l}.{n}"].copy_(v)
        return model.to(device) if device is not None else model


def fit(model: nn.Module) -> Learngene:
    """Least-squares fit of ``W_l = W_base + (l/L) W_slope`` to every block parameter of ``model``.

    Per element, ordinary least squares over ``l = 0..L-1`` against ``t_l = l / L`` (in float64);
    per parameter, ``r2 = 1 - SS_res / SS_tot`` summed over its elements (``SS_tot`` about each
    element's mean over depth; ``r2 = 1`` when all blocks are equal). Needs ``L >= 2`` blocks.
    """
    check_model("model", model)
    L = len(model.blocks)
    if L < 2:
        raise ValueError(f"model must have at least 2 blocks to fit a learngene, got {L}")
    t = torch.arange(L, dtype=torch.float64) / L
    tc = t - t.mean()
    base, slope, r2 = {}, {}, {}
    for name in block_parameter_names(model):
        W = torch.stack([dict(b.named_parameters())[name].detach().double().cpu() for b in model.blocks])
        shape = (L,) + (1,) * (W.dim() - 1)
        mean = W.mean(0)
        s = (tc.view(shape) * (W - mean)).sum(0) / (tc ** 2).sum()
        b = mean - s * t.mean()
        resid = W - (b + s * t.view(shape))
        ss_tot = float(((W - mean) ** 2).sum())
        ss_res = float((resid ** 2).sum())
        dtype = dict(model.blocks[0].named_parameters())[name].dtype
        base[name], slope[name] = b.to(dtype), s.to(dtype)
        r2[name] = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    cfg = dataclasses.replace(model.config)
    return Learngene(cfg, base, slope, _shared_state(model), L, r2)


class LearngeneModel(nn.Module):
    """A learngene-constrained model of ``L`` blocks: parameters ``W_base``, ``W_slope`` (shared by all
    blocks) plus the embedding, final norm and readout; ``forward`` materialises
    ``W_l = W_base + (l/L) W_slope`` and runs the native model with them (``torch.func.functional_call``).

    Initialisation (as TLEG's): ``W_base`` is a freshly initialised block (block 0 of ``build(config)``);
    ``W_slope`` of a weight matrix is another one (block 1, an independent draw at the same scale), of a
    bias or norm parameter 0.

    ``config`` is the native model's, so :func:`workbench.training.train` checks data against it.
    """

    def __init__(self, config, seed: int | None = None):
        super().__init__()
        if seed is not None:
            config = dataclasses.replace(config, seed=check_seed("seed", seed))
        self.template = build(config)
        self.config = self.template.config
        L = self.config.n_layers
        if L < 1:
            raise ValueError(f"n_layers must be an integer in [1, 256] for a learngene model, got {L}")
        self.n_layers = L
        self._names = block_parameter_names(self.template)
        first = dict(self.template.blocks[0].named_parameters())
        # TLEG initialises W_ilayer like W_base for the weight matrices (trunc-normal, same scale) and at 0 for
        # biases and norms: here the matrices start at another freshly initialised block's (independent of
        # block 0), so W_slope starts at the weights' own scale.
        other = dict(self.template.blocks[1].named_parameters()) if L >= 2 else {}
        self.base = nn.ParameterDict({self._key(n): nn.Parameter(first[n].detach().clone()) for n in self._names})
        self.slope = nn.ParameterDict({
            self._key(n): nn.Parameter(other[n].detach().clone() if first[n].dim() >= 2 and n in other
                                       else torch.zeros_like(first[n])) for n in self._names})
        for blk in self.template.blocks:  # replaced at every forward pass; not trained
            for p in blk.parameters():
                p.requires_grad_(False)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    @property
    def device(self) -> torch.device:
        return self.template.device

    def block_weights(self) -> dict[str, torch.Tensor]:
        L = self.n_layers
        return {f"blocks.{l}.{n}": self.base[self._key(n)] + (l / L) * self.slope[self._key(n)]
                for l in range(L) for n in self._names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.template, self.block_weights(), (x,))

    def learngene(self) -> Learngene:
        """The trained learngene (detached copies)."""
        base = {n: self.base[self._key(n)].detach().clone() for n in self._names}
        slope = {n: self.slope[self._key(n)].detach().clone() for n in self._names}
        return Learngene(dataclasses.replace(self.config), base, slope, _shared_state(self.template), self.n_layers,
                         {n: float("nan") for n in self._names})


class _Distill:
    """``(1 - alpha) CE + alpha T^2 KL(teacher_T || student_T)`` over scored positions (soft distillation)."""

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float):
        self.teacher, self.alpha, self.T = teacher, alpha, temperature

    def __call__(self, model, x, y):
        logits = model(x)
        ce = loss_and_correct(logits, y)[0]
        with torch.no_grad():
            t_logits = self.teacher(x)
        K = logits.shape[-1]
        mask = y.reshape(-1) != IGNORE
        s = logits.reshape(-1, K)[mask] / self.T
        t = t_logits.reshape(-1, t_logits.shape[-1])[mask][:, :K] / self.T
        kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
        return (1 - self.alpha) * ce + self.alpha * self.T ** 2 * kl


def train(dataset: Dataset, config=None, train_config: TrainConfig | None = None, teacher=None,
          alpha: float = 1.0, temperature: float = 1.0, callbacks=(), **overrides) -> tuple[Learngene, Run]:
    """Train a learngene in a constrained auxiliary model; returns ``(learngene, run)``.

    ``config``: the auxiliary model's config (its ``n_layers`` is the auxiliary depth); default
    :func:`workbench.models.config_for` of ``dataset`` with ``overrides``. ``teacher``: a model or a
    :class:`~workbench.training.Run` whose logits the auxiliary model is distilled from, with weight
    ``alpha`` and temperature ``temperature`` (``docs/definitions.md#learngene``; TLEG's runs use soft
    distillation with ``alpha = 1``, the default here, and ``T = 1``).
    """
    if config is None:
        config = config_for(dataset, **overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    if train_config is not None and not isinstance(train_config, TrainConfig):
        raise ValueError(f"train_config must be a TrainConfig or None, got {type(train_config).__name__}")
    train_config = train_config or TrainConfig(steps=500, eval_every=500)
    alpha = check_float("alpha", alpha, 0, 1)
    temperature = check_float("temperature", temperature, 0, 100, lo_open=True)
    aux = LearngeneModel(config)
    loss_fn = None
    if teacher is not None:
        teacher = teacher.model if isinstance(teacher, Run) else teacher
        if not isinstance(teacher, nn.Module):
            raise ValueError(f"teacher must be a model, a Run or None, got {type(teacher).__name__}")
        teacher.eval()
        loss_fn = _Distill(teacher, alpha, temperature)
    run = train_model(aux, dataset, train_config, callbacks=callbacks, loss_fn=loss_fn,
                      name=f"learngene-{dataset.name}")
    run.meta["learngene"] = {"aux_layers": aux.n_layers, "distilled": teacher is not None, "alpha": alpha}
    return aux.learngene(), run


def _check_budgets(budgets, steps: int) -> list[int]:
    out = sorted({check_int("budget", b, 1, steps) for b in budgets})
    return out


class _ValAt(Callback):
    """Callback: the validation loss and accuracy after each of ``steps`` optimizer steps."""

    def __init__(self, dataset: Dataset, steps, eval_max: int):
        self.dataset, self.steps, self.eval_max, self.values = dataset, set(steps), eval_max, {}

    def on_step(self, state):
        if state.step in self.steps:
            from ..core.training import evaluate

            self.values[state.step] = evaluate(state.model, self.dataset, "val", self.eval_max)
            state.model.train()


def expansion(dataset: Dataset, gene: Learngene, depths=range(2, 9), train_config: TrainConfig | None = None,
              seeds=(0,), callbacks=(), budgets=()) -> pd.DataFrame:
    """Descendants of each depth from ``gene`` against random initialisation, after the same training.

    Tidy DataFrame ``depth, init, seed, split, metric, value`` (``init`` in ``"learngene"``,
    ``"random"``; validation ``loss`` and ``acc`` after training, and ``loss_at_init``). A random
    descendant is ``build(config with n_layers=depth, seed=seed)``; ``seed`` is also the data order; both
    arms get the same ``train_config`` (steps, learning rate, schedule, minibatches).

    ``budgets``: step counts below ``train_config.steps`` at which the same run is also evaluated, as
    metrics ``"loss@<steps>"`` and ``"acc@<steps>"`` (the budget curve; with the default constant
    schedule a run read at step ``s`` is exactly a run of ``s`` steps).
    """
    if not isinstance(gene, Learngene):
        raise ValueError(f"gene must be a Learngene, got {type(gene).__name__}")
    depths = [check_int("depth", d, 1, 64) for d in depths]
    seeds = [check_seed("seed", s) for s in seeds]
    if not depths or not seeds:
        raise ValueError("depths and seeds must each list at least one value")
    if train_config is not None and not isinstance(train_config, TrainConfig):
        raise ValueError(f"train_config must be a TrainConfig or None, got {type(train_config).__name__}")
    train_config = train_config or TrainConfig(steps=100, eval_every=100)
    budgets = _check_budgets(budgets, train_config.steps)
    from ..core.training import evaluate

    rows = []
    for seed in seeds:
        for depth in depths:
            for init in ("learngene", "random"):
                model = gene.expand(depth) if init == "learngene" else \
                    build(dataclasses.replace(gene.config, n_layers=depth, seed=seed))
                start = evaluate(model, dataset, "val", train_config.eval_max)
                at = _ValAt(dataset, budgets, train_config.eval_max)
                run = train_model(model, dataset, dataclasses.replace(train_config, seed=seed),
                                  callbacks=[*callbacks, at] if budgets else callbacks)
                base = {"depth": depth, "init": init, "seed": seed, "split": "val"}
                rows.append({**base, "metric": "loss_at_init", "value": start["loss"]})
                rows += [{**base, "metric": m, "value": run.final(m)} for m in ("loss", "acc")]
                for b in budgets:
                    got = at.values.get(b, {})
                    rows += [{**base, "metric": f"{m}@{b}", "value": float(got.get(m, float("nan")))}
                             for m in ("loss", "acc")]
    return pd.DataFrame(rows, columns=["depth", "init", "seed", "split", "metric", "value"])


def experiment(dataset: Dataset, depths=range(2, 9), aux_layers: int | None = None,
               learngene_train: TrainConfig | None = None, train_config: TrainConfig | None = None, seeds=(0,),
               teacher=None, alpha: float = 1.0, temperature: float = 1.0, callbacks=(), budgets=(),
               **overrides) -> tuple[Learngene, pd.DataFrame]:
    """TLEG's protocol: per seed, train a learngene, then :func:`expansion` of it with that seed.

    ``aux_layers``: the auxiliary model's depth; default the deepest descendant, ``max(depths)`` (TLEG's
    auxiliary models have the 12 blocks of the deepest descendant, which then inherits ``W_l`` exactly).
    ``teacher``: ``None`` (plain cross-entropy), a model or :class:`~workbench.training.Run` to distil
    from, or ``"train"``: per seed, an unconstrained model of the auxiliary depth trained with
    ``learngene_train`` first (TLEG distils its auxiliary model from a trained teacher; ``alpha`` and
    ``temperature`` as in :func:`train`). Each seed has its own learngene (initialisation and data order),
    so the spread over seeds includes the learngene's. ``overrides``: model config fields (``d_model``,
    ...). Returns ``(learngene of the first seed, table)``; the table is :func:`expansion`'s.
    """
    depths = [check_int("depth", d, 1, 64) for d in depths]
    if not depths:
        raise ValueError("depths must list at least one value")
    aux_layers = max(depths) if aux_layers is None else check_int("aux_layers", aux_layers, 1, 64)
    seeds = [check_seed("seed", s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must list at least one seed")
    if isinstance(teacher, str) and teacher != "train":
        raise ValueError(f"teacher must be None, a model, a Run or 'train', got {teacher!r}")
    learngene_train = learngene_train or TrainConfig(steps=500, eval_every=500)
    if not isinstance(learngene_train, TrainConfig):
        raise ValueError(f"learngene_train must be a TrainConfig or None, got {type(learngene_train).__name__}")
    first, tables = None, []
    for seed in seeds:
        cfg = config_for(dataset, **{**overrides, "n_layers": aux_layers, "seed": seed})
        tcfg = dataclasses.replace(learngene_train, seed=seed)
        t = teacher
        if teacher == "train":
            t = build(cfg)
            train_model(t, dataset, tcfg, callbacks=callbacks, name=f"teacher-{dataset.name}")
        gene, _ = train(dataset, cfg, tcfg, teacher=t, alpha=alpha, temperature=temperature, callbacks=callbacks)
        first = gene if first is None else first
        tables.append(expansion(dataset, gene, depths, train_config, [seed], callbacks, budgets))
    return first, pd.concat(tables, ignore_index=True)
