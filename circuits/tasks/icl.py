"""In-context model selection between two ridge regressors (seed 003).

The seed is the interpretability notebook of a project that trains a GPT-2 backbone with a linear
read-in (the Garg et al. 2022 model class) to choose, in context, between two ridge regressors: the
"Transformers as Statisticians" (Bai et al. 2023) model-selection setting. The notebook shows the
model (3 layers, 2 heads, d_model 64, 21 positions, read-in 3 -> 64) and the data's shape
(``X: [batch, 21, 3]``, ``y: [batch]``) but not the generator; this module reconstructs it.

One sequence
------------
* a noise level ``a``, drawn uniformly from ``alphas`` (default ``DATA_ALPHAS`` = (0.1, 0.8));
* a weight vector ``w ~ N(0, I_5)``;
* 21 *training* points and 21 *test* points ``x ~ N(0, I_5)``, with ``y = x.w + eps``,
  ``eps ~ N(0, (0.8 a)^2)``;
* for each ridge strength ``lambda`` in the same list, a ridge regressor fitted on the training
  points (closed form, batched: ``ridge_fit``);
* token ``i`` (one per test point) is ``[yhat_lambda1(x_i), yhat_lambda2(x_i), y_i]``, with the last
  ``y`` zeroed; the target is that last ``y``.

The model never sees an ``x``: it must tell from the first 20 tokens which predictor fits this
sequence better (their squared errors against the visible ``y``'s) and apply that to the last one.

Which ridge? (reconstructed by matching the published numbers)
---------------------------------------------------------------
The seed's project reports, for a checkpoint trained with alphas (0.1, 0.5): transformer MSE 0.1117,
ridge 0.1196 and 0.1262, oracle 0.1095. Simulating 400,000 sequences of this generator:

=====================================================  ==============  =======  ==========
ridge variant (lambda penalises ||w||^2 against ...)   ridge MSEs      oracle   noise floor
=====================================================  ==============  =======  ==========
sum of squares, no intercept                           0.1110, 0.1158  0.1018   0.0833
sum of squares, with intercept (sklearn ``Ridge``)     0.1174, 0.1232  0.1071   0.0833
mean of squares (lambda * N), no intercept             0.1943, 0.8999  0.1792   0.0831
=====================================================  ==============  =======  ==========

Only sklearn's default ``Ridge(alpha=lambda)`` (sum of squares, intercept fitted, unpenalised)
comes within the sampling error of an evaluation set of a few thousand sequences (about 2%), so
that is what ``ridge_fit`` computes (tests/test_icl.py checks it against sklearn). The "oracle" is
the better of the two predictors *on the target itself*, per sequence (``min`` of the two squared
errors): it is the only reading that lands below both ridges by the published amount (choosing the
lambda equal to the sequence's own alpha gives 0.113, worse than ridge 0.1). It knows the answer,
so it is a bound, not a method. A fair in-context baseline is ``selector_sq_errors``: pick the
predictor with the smaller squared error summed over the visible context (0.1154 above).

With the default alphas (0.1, 0.8) the same simulation gives ridge 0.2942 and 0.3042, oracle
0.2650, in-context selector 0.2866 and noise floor mean((0.8 a)^2) = 0.2080.

Analysis tools (used by hypotheses/test_icl.py): ``predict_with_context`` (the model with only the
last c context tokens visible, for MSE-vs-context curves), ``last_position_residuals`` with
``probe_heldout`` / ``probe_r2`` (held-out linear probes), and the seed's attention clustering,
``cluster_rows`` (KMeans, k by silhouette) and ``cluster_probe`` (does a linear classifier on the
inputs predict the clusters, cross-validated).

Determinism: sequences are drawn in whole chunks of ``CHUNK`` from one seeded float64 generator, so
``generate(n, seed)`` is a prefix of ``generate(m, seed)`` for ``n <= m``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from circuits.errors import InputError

__all__ = [
    "D_X", "N_POINTS", "DATA_ALPHAS", "NOISE_SCALE", "PUBLISHED", "DATA_VERSION", "ICLData",
    "ridge_fit", "ridge_predict", "generate", "make_split",
    # analysis tools (seed-specific; the general ones live in circuits.analysis.measures)
    "context_padding_mask", "predict_with_context", "last_position_residuals", "probe_heldout", "r2",
    "probe_r2", "cluster_rows", "cluster_probe",
]

D_X = 5  # dimension of x
N_POINTS = 21  # training points per ridge fit, and test points = tokens per sequence
DATA_ALPHAS = (0.1, 0.8)  # noise levels a, and the ridge strengths lambda (the same list)
NOISE_SCALE = 0.8  # noise standard deviation is NOISE_SCALE * a
CHUNK = 4096  # sequences per generator chunk (part of what a seed means: do not change lightly)
DATA_VERSION = "icl-data-1"  # bump when generate() changes what a seed produces

# The seed project's numbers for its checkpoint trained with alphas (0.1, 0.5) (a long GPU run).
PUBLISHED = {"alphas": (0.1, 0.5), "transformer": 0.1117, "ridge": (0.1196, 0.1262), "oracle": 0.1095}


# --------------------------------------------------------------------------------------------------
# Ridge regression, closed form, batched over sequences and strengths
# --------------------------------------------------------------------------------------------------


def _check_lambdas(lambdas: Sequence[float]) -> tuple[float, ...]:
    lambdas = tuple(float(v) for v in lambdas)
    if not lambdas or any(not (v >= 0) for v in lambdas):  # also rejects NaN
        raise InputError(f"ridge strengths must be a non-empty list of numbers >= 0, got {lambdas}")
    return lambdas


def ridge_fit(x: torch.Tensor, y: torch.Tensor, lambdas: Sequence[float],
              intercept: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regressors fitted per sequence and per strength, as sklearn's ``Ridge(alpha=lambda)``.

    x: [n, N, d], y: [n, N]. Minimises ``||y - x.w - b||^2 + lambda ||w||^2`` (the intercept ``b`` is
    not penalised; with ``intercept=False`` it is 0). Returns ``(coef [n, k, d], intercept [n, k])``
    for the k strengths, in the dtype of ``x`` (use float64 for accuracy).
    """
    if x.ndim != 3 or y.shape != x.shape[:2]:
        raise InputError(f"ridge_fit needs x [n, N, d] and y [n, N], got {tuple(x.shape)} and {tuple(y.shape)}")
    lambdas = _check_lambdas(lambdas)
    d = x.shape[-1]
    if intercept:
        x_mean, y_mean = x.mean(1, keepdim=True), y.mean(1, keepdim=True)  # [n, 1, d], [n, 1]
        x, y = x - x_mean, y - y_mean
    gram = x.transpose(1, 2) @ x  # [n, d, d]
    xty = x.transpose(1, 2) @ y[..., None]  # [n, d, 1]
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    lam = torch.tensor(lambdas, dtype=x.dtype, device=x.device)[:, None, None]  # [k, 1, 1]
    coef = torch.linalg.solve(gram[:, None] + lam * eye, xty[:, None].expand(-1, len(lambdas), -1, -1))[..., 0]  # [n, k, d]
    if intercept:
        b = y_mean - (x_mean * coef).sum(-1)  # [n, k]
    else:
        b = torch.zeros(coef.shape[:2], dtype=x.dtype, device=x.device)
    return coef, b


def ridge_predict(coef: torch.Tensor, intercept: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Predictions of each fitted ridge at points x [n, N, d]: [n, N, k]."""
    return x @ coef.transpose(1, 2) + intercept[:, None, :]


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------


@dataclass
class ICLData:
    """Sequences with everything the claims and baselines are phrased in, row-aligned.

    ``inputs``/``targets`` are what the model sees and must predict; ``preds`` and ``ys`` are the
    ridge predictions and true values at all 21 test points (the last ``ys`` is the target).
    """

    inputs: torch.Tensor  # [n, N, k + 1] float32 tokens [yhat_1, ..., yhat_k, y], last y zeroed
    targets: torch.Tensor  # [n] float32, the last y
    alphas: torch.Tensor  # [n] float64, each sequence's noise level a
    preds: torch.Tensor  # [n, N, k] float64, ridge predictions at the test points
    ys: torch.Tensor  # [n, N] float64, true y at the test points
    lambdas: tuple = DATA_ALPHAS  # the ridge strengths, in the order of the tokens' first k entries
    noise_scale: float = NOISE_SCALE

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def n_points(self) -> int:
        return self.inputs.shape[1]

    def subset(self, idx) -> "ICLData":
        return dataclasses.replace(self, inputs=self.inputs[idx], targets=self.targets[idx],
                                   alphas=self.alphas[idx], preds=self.preds[idx], ys=self.ys[idx])

    # -- baselines on the target ------------------------------------------------------------------
    def ridge_sq_errors(self) -> torch.Tensor:
        """Squared error of each fixed ridge predictor on the target: [n, k]."""
        return (self.preds[:, -1] - self.ys[:, -1, None]) ** 2

    def oracle_sq_errors(self) -> torch.Tensor:
        """The better predictor per sequence, judged on the target itself (a bound): [n]."""
        return self.ridge_sq_errors().min(1).values

    def noise_floor(self) -> float:
        """Expected squared error of the true regression function x.w: mean((0.8 a)^2)."""
        return float(((self.noise_scale * self.alphas) ** 2).mean())

    # -- what the context reveals -----------------------------------------------------------------
    def context_sq_errors(self, n_context: Optional[int] = None) -> torch.Tensor:
        """Squared errors of each predictor at the visible context points: [n, n_context, k].

        The context is the ``n_context`` test points just before the target (default: all N - 1).
        """
        c = self._n_context(n_context)
        lo = self.n_points - 1 - c
        return (self.preds[:, lo:-1] - self.ys[:, lo:-1, None]) ** 2

    def running_error_difference(self, n_context: Optional[int] = None) -> torch.Tensor:
        """Sum over the context of (error of predictor 1 - error of predictor 2), squared errors: [n].

        Positive: predictor 2 (the larger lambda) has fitted the context better.
        """
        if len(self.lambdas) != 2:
            raise InputError(f"the error difference is defined for two predictors, this data has {len(self.lambdas)}")
        e = self.context_sq_errors(n_context).sum(1)  # [n, 2]
        return e[:, 0] - e[:, 1]

    def selector_choice(self, n_context: Optional[int] = None) -> torch.Tensor:
        """Index of the predictor with the smaller summed squared error over the context: [n]."""
        return self.context_sq_errors(n_context).sum(1).argmin(1)

    def selector_sq_errors(self, n_context: Optional[int] = None) -> torch.Tensor:
        """In-context selector baseline: squared error on the target of the predictor that fitted
        the visible context better (ties and an empty context pick the first): [n]."""
        choice = self.selector_choice(n_context) if self._n_context(n_context) else torch.zeros(len(self), dtype=torch.long)
        return self.ridge_sq_errors().gather(1, choice[:, None])[:, 0]

    def _n_context(self, n_context: Optional[int]) -> int:
        c = self.n_points - 1 if n_context is None else n_context
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= self.n_points - 1:
            raise InputError(f"n_context must be an int in [0, {self.n_points - 1}], got {n_context!r}")
        return c

    def to_split(self):
        from circuits.zoo.train import Split

        return Split(self.inputs, self.targets)

    def with_foreign_context(self, shift: int = 1) -> "ICLData":
        """The same sequences with every context token (all but the last) taken from sequence
        ``(i + shift) % n``. Sequences are i.i.d., so a fixed shift pairs each one with an unrelated
        context without a random draw, and none keeps its own. Only ``inputs`` change: the query token,
        the target, the ridge predictions and ys still describe each sequence's own data, so whatever
        the model infers from the context is about another sequence."""
        n = len(self)
        if isinstance(shift, bool) or not isinstance(shift, int) or n < 2 or shift % n == 0:
            raise InputError(f"a foreign context needs >= 2 sequences and a shift that is not a multiple of "
                             f"their number, got n={n}, shift={shift!r}")
        inputs = self.inputs.clone()
        inputs[:, :-1] = self.inputs.roll(-shift, 0)[:, :-1]
        return dataclasses.replace(self, inputs=inputs)


def _check_generate_args(n, seed, alphas, n_points, d) -> tuple[float, ...]:
    for name, v, low in (("n", n, 0), ("seed", seed, 0), ("n_points", n_points, 2), ("d", d, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise InputError(f"{name} must be an int >= {low}, got {v!r}")
    return _check_lambdas(alphas)


def generate(n: int, seed: int, alphas: Sequence[float] = DATA_ALPHAS, n_points: int = N_POINTS,
             d: int = D_X, noise_scale: float = NOISE_SCALE) -> ICLData:
    """``n`` sequences of the model-selection task (see the module docstring), from ``seed``.

    Vectorised in torch (float64), one whole chunk of ``CHUNK`` sequences at a time (the last one
    cut to size); per chunk the draws are, in order: alpha index, w, training x, training noise,
    test x, test noise.
    """
    alphas = _check_generate_args(n, seed, alphas, n_points, d)
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    table = torch.tensor(alphas, dtype=f64)
    parts = []
    for start in range(0, n, CHUNK):
        m = CHUNK  # whole chunks, cut at the end: then a smaller n gives a prefix of a larger one
        a = table[torch.randint(len(alphas), (m,), generator=gen)]  # [m]
        w = torch.randn(m, d, generator=gen, dtype=f64)  # [m, d]
        sigma = (noise_scale * a)[:, None]  # [m, 1]
        x_train = torch.randn(m, n_points, d, generator=gen, dtype=f64)  # [m, N, d]
        y_train = (x_train @ w[:, :, None])[..., 0] + sigma * torch.randn(m, n_points, generator=gen, dtype=f64)
        x_test = torch.randn(m, n_points, d, generator=gen, dtype=f64)  # [m, N, d]
        y_test = (x_test @ w[:, :, None])[..., 0] + sigma * torch.randn(m, n_points, generator=gen, dtype=f64)
        coef, b = ridge_fit(x_train, y_train, alphas)
        keep = min(CHUNK, n - start)
        parts.append((a[:keep], ridge_predict(coef, b, x_test)[:keep], y_test[:keep]))
    if parts:
        a, preds, ys = (torch.cat(t) for t in zip(*parts))
    else:
        a = torch.zeros(0, dtype=f64)
        preds, ys = torch.zeros(0, n_points, len(alphas), dtype=f64), torch.zeros(0, n_points, dtype=f64)
    shown = ys.clone()
    shown[:, -1] = 0.0  # the model must predict this one
    inputs = torch.cat([preds, shown[..., None]], -1).float()  # [n, N, k + 1]
    return ICLData(inputs, ys[:, -1].float(), a, preds, ys, alphas, float(noise_scale))


# --------------------------------------------------------------------------------------------------
# Analysis tools for this seed: shortened contexts, linear probes, attention clustering
# --------------------------------------------------------------------------------------------------


def context_padding_mask(n: int, n_points: int, n_context: int) -> torch.Tensor:
    """Key padding mask [n, n_points] (True = hidden) that leaves only the last ``n_context`` context
    tokens and the query visible. The query keeps its learned position N - 1, the one it was trained
    at, so "context length" changes what is visible, not where the query sits. Hidden keys get
    exp(-1e5) = 0 attention from every visible position, so the hidden tokens cannot matter."""
    if isinstance(n_context, bool) or not isinstance(n_context, int) or not 0 <= n_context <= n_points - 1:
        raise InputError(f"n_context must be an int in [0, {n_points - 1}], got {n_context!r}")
    mask = torch.zeros(n, n_points, dtype=torch.bool)
    mask[:, : n_points - 1 - n_context] = True
    return mask


@torch.no_grad()
def predict_with_context(model, inputs: torch.Tensor, n_context: int, batch_size: int = 4096) -> torch.Tensor:
    """The model's prediction at the last position when it sees only the last ``n_context`` context
    tokens (see ``context_padding_mask``): [n]."""
    outs = []
    for i in range(0, inputs.shape[0], batch_size):
        x = inputs[i:i + batch_size]
        mask = context_padding_mask(x.shape[0], x.shape[1], n_context).to(x.device)
        outs.append(model(x, key_padding_mask=mask, readout="last")[:, 0])
    return torch.cat(outs) if outs else inputs.new_zeros(0)


def last_position_residuals(model, inputs: torch.Tensor, batch_size: int = 1024,
                            with_outputs: bool = False):
    """Residual stream at the last position entering each block and after the last one:
    [n_layers + 1, n, d_model] (index l = ``blocks.l.hook_resid_pre``, last = final LN's input).
    With ``with_outputs``, also the model's outputs from the same run: ([n_layers + 1, n, d_model], [n, ...])."""
    L = model.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(L)]
    # a last read-out hands back the final residual there itself, so the last block stays on the
    # read-out path (a hook on its hook_resid_post would make it compute every position)
    direct = model.cfg.readout == "last" and (model.cfg.d_input or model.cfg.pad_token is None)
    if not direct:
        names.append(f"blocks.{L - 1}.hook_resid_post")
    parts, outs = [], []
    with torch.no_grad():
        for i in range(0, inputs.shape[0], batch_size):
            if direct:
                (out, final), cache = model.run_with_cache(inputs[i:i + batch_size], names=names, return_resid=True)
            else:
                out, cache = model.run_with_cache(inputs[i:i + batch_size], names=names)
                final = cache[names[-1]][:, -1]
            parts.append(torch.stack([cache[n][:, -1] for n in names[:L]] + [final]))
            outs.append(out)
    resid = torch.cat(parts, 1)
    return (resid, torch.cat(outs)) if with_outputs else resid


def probe_heldout(features, targets, train_fraction: float = 0.5, alpha: float = 1e-2, seed: int = 0):
    """A linear probe (sklearn: standardised features -> Ridge(alpha)) fitted on a random part of
    the rows (``train_fraction``, split by ``seed``) and applied to the rest.

    Returns ``(predictions, targets)`` on the held-out rows, numpy arrays; ``r2`` of them is the
    probe's held-out r^2 (and a bootstrap over these rows gives its interval).
    """
    import numpy as np
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = _as_numpy(features, 2), _as_numpy(targets, 1)
    if X.shape[0] != y.shape[0] or X.shape[0] < 4:
        raise InputError(f"a probe needs matching row counts >= 4, got {X.shape[0]} and {y.shape[0]}")
    if not 0 < train_fraction < 1:
        raise InputError(f"train_fraction must be in (0, 1), got {train_fraction}")
    order = np.random.default_rng(seed).permutation(X.shape[0])
    cut = min(max(int(round(train_fraction * X.shape[0])), 2), X.shape[0] - 2)
    train, test = order[:cut], order[cut:]
    probe = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(X[train], y[train])
    return probe.predict(X[test]), y[test]


def r2(predictions, targets, axis: int = -1):
    """Coefficient of determination 1 - SS_res / SS_tot along ``axis`` (vectorised, for the bootstrap)."""
    import numpy as np

    p, y = np.asarray(predictions, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    ss_res = ((y - p) ** 2).sum(axis)
    ss_tot = ((y - y.mean(axis, keepdims=True)) ** 2).sum(axis)
    with np.errstate(all="ignore"):
        return 1.0 - ss_res / ss_tot


def probe_r2(features, targets, train_fraction: float = 0.5, alpha: float = 1e-2, seed: int = 0) -> float:
    """Held-out r^2 of the linear probe of ``probe_heldout``: below 0 means worse than predicting the
    held-out mean."""
    return float(r2(*probe_heldout(features, targets, train_fraction, alpha, seed)))


def cluster_rows(rows, k_values=range(2, 10), seed: int = 0):
    """The seed's attention clustering: KMeans on the rows for each k, k chosen by the best
    silhouette score. Returns ``(labels [n], k, {k: silhouette})``."""
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    X = _as_numpy(rows, 2)
    k_values = [int(k) for k in k_values]
    if not k_values or min(k_values) < 2 or max(k_values) >= X.shape[0]:
        raise InputError(f"k values must lie in [2, n_rows - 1] = [2, {X.shape[0] - 1}], got {k_values}")
    scores, fits = {}, {}
    with _one_blas_thread():
        for k in k_values:
            km = KMeans(n_clusters=k, n_init=2, random_state=seed).fit(X)
            fits[k] = km.labels_
            scores[k] = float(silhouette_score(X, km.labels_)) if len(set(km.labels_)) > 1 else float("-inf")
    best = max(k_values, key=lambda k: scores[k])
    return np.asarray(fits[best]), best, scores


def cluster_probe(features, labels, folds: int = 5, seed: int = 0):
    """How well a linear classifier on ``features`` explains cluster ``labels``: a logistic regression
    on standardised features, cross-validated (stratified ``folds``). Returns ``(correct, majority)``:
    whether each row's held-out prediction was right ([n] float array of 0/1; its mean is the
    cross-validated accuracy) and the majority-class rate, what ignoring the features reaches."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = _as_numpy(features, 2), _as_numpy(labels, 1).astype(np.int64)
    if X.shape[0] != y.shape[0]:
        raise InputError(f"features and labels have {X.shape[0]} and {y.shape[0]} rows")
    _, counts = np.unique(y, return_counts=True)
    if counts.size < 2 or counts.min() < folds:
        raise InputError(f"need >= 2 classes with >= {folds} rows each, got class sizes {counts.tolist()}")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with _one_blas_thread():
        predicted = cross_val_predict(clf, X, y, cv=cv)
    return (predicted == y).astype(np.float64), float(counts.max() / counts.sum())


def _one_blas_thread():
    """KMeans and the cross-validated logistic regressions work on ~1,000 x 63 arrays, where
    BLAS/OpenMP threads cost more than they give: one thread is 2-5x faster here (same results)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def _as_numpy(x, ndim: int):
    import numpy as np

    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != ndim:
        raise InputError(f"expected a {ndim}-D array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError("array holds NaN or inf values")
    return x


def make_split(n: int, seed: int):
    return generate(n, seed).to_split()


def zoo_entries() -> list:
    from circuits.model.transformer import TransformerConfig
    from circuits.zoo.train import TrainRecipe
    from circuits.zoo.registry import ZooEntry

    return [ZooEntry(
        name="icl",
        description="in-context selection between two ridge regressors, GPT-2 style (seed 003)",
        # the seed's model: GPT-2 backbone (pre-LN, GELU tanh, LN eps 1e-5, attention biases, learned
        # positions) with a linear read-in 3 -> 64 and a scalar read-out at the last position
        config=TransformerConfig(n_layers=3, d_model=64, n_ctx=N_POINTS, n_heads=2, d_mlp=256,
                                 d_input=len(DATA_ALPHAS) + 1, d_vocab=0, d_vocab_out=1,
                                 act_fn="gelu_new", normalization="LN", attention="causal",
                                 positional="learned", readout="last"),
        # a CPU budget (~2 min on one thread): 4,000 steps of 64 fresh sequences, where the seed project
        # trained for a long GPU run; 5,500 steps gained only 0.001 of MSE, batch 128 no more per second
        recipe=TrainRecipe(steps=4000, batch_size=64, lr=1e-3, warmup_steps=200, loss="mse",
                           n_train=256_000, n_eval=8192, eval_every=500, bucket_by_length=False,
                           threads=1),
        make_split=make_split,
        data_recipe={"eval": "circuits.tasks.icl.generate", "version": DATA_VERSION, "alphas": list(DATA_ALPHAS),
                     "n_points": N_POINTS, "d": D_X, "noise_scale": NOISE_SCALE, "ridge": "sklearn Ridge, intercept"},
    )]
