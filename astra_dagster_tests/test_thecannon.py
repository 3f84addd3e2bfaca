"""The Cannon's maths on toy data made with a known polynomial model (astra_dagster.methods.thecannon)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import least_squares

from astra_dagster.methods import thecannon as tc
from astra_dagster.methods.thecannon import FLAGS, CannonError, CannonModel, LabelHull

NAMES = ("teff", "logg", "fe_h", "alpha_m")


def draw_labels(rng: np.random.Generator, n: int, spread: float = 1.0) -> np.ndarray:
    return np.column_stack([rng.normal(4800, 400 * spread, n), rng.normal(2.5, 0.8 * spread, n),
                            rng.normal(-0.3, 0.3 * spread, n), rng.normal(0.1, 0.08 * spread, n)])


@pytest.fixture(scope="module")
def toy() -> dict:
    """A known quadratic model: 500 training stars, 1500 pixels, per-pixel scatter, S/N 50-200."""
    rng = np.random.default_rng(42)
    n, P = 500, 1500
    L = draw_labels(rng, n)
    fid = np.percentile(L, 50, axis=0)
    lo, hi = np.percentile(L, [2.5, 97.5], axis=0)
    terms = tc.polynomial_terms(4, 2)
    theta = np.zeros((P, terms.shape[0]))
    theta[:, 0] = 1 - np.abs(rng.normal(0, 0.1, P))
    theta[:, 1:] = rng.normal(0, 0.03, (P, terms.shape[0] - 1))
    s2 = np.where(rng.random(P) < 0.7, rng.uniform(0.002, 0.02, P) ** 2, 0.0)
    ivar = np.broadcast_to(rng.uniform(50, 200, (n, 1)) ** 2, (n, P)).copy()
    ivar[rng.random((n, P)) < 0.01] = 0.0                      # some masked pixels
    D = tc.label_vector((L - fid) / (hi - lo), terms)
    flux = D @ theta.T + rng.normal(size=(n, P)) * np.sqrt(1 / np.where(ivar > 0, ivar, 1e4) + s2)
    model = CannonModel(NAMES).train(flux, ivar, dict(zip(NAMES, L.T, strict=True)), cv_folds=0)
    return {"theta": theta, "s2": s2, "flux": flux, "ivar": ivar, "labels": L, "model": model, "terms": terms,
            "fid": fid, "scale": hi - lo, "rng": rng}


def make_test(toy: dict, n: int, snr: float, seed: int, spread: float = 0.8) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    L = draw_labels(rng, n, spread)
    D = tc.label_vector((L - toy["fid"]) / toy["scale"], toy["terms"])
    ivar = np.full((n, toy["theta"].shape[0]), snr**2)
    flux = D @ toy["theta"].T + rng.normal(size=ivar.shape) * np.sqrt(1 / ivar + toy["s2"])
    return flux, ivar, L


def test_vectorizer_terms_and_derivative() -> None:
    assert tc.polynomial_terms(4, 2).shape == (15, 4)
    assert tc.polynomial_terms(4, 3).shape == (35, 4)
    assert tc.polynomial_terms(7, 2).shape == (36, 7)
    # the order of annieslasso's PolynomialVectorizer: 1, a, b, a², ab, b²
    assert tc.polynomial_terms(2, 2).tolist() == [[0, 0], [1, 0], [0, 1], [2, 0], [1, 1], [0, 2]]
    x = np.array([[0.3, -0.7, 1.2, 0.1], [-1.0, 0.5, 0.0, 2.0]])
    terms = tc.polynomial_terms(4, 3)
    vec = tc.label_vector(x, terms)
    assert vec[0, 0] == 1.0 and vec[0, 5] == pytest.approx(0.3**2)
    jac = tc.label_vector_derivative(x, terms)
    eps = 1e-6
    for k in range(4):
        dx = np.zeros(4)
        dx[k] = eps
        num = (tc.label_vector(x + dx, terms) - tc.label_vector(x - dx, terms)) / (2 * eps)
        np.testing.assert_allclose(jac[:, :, k], num, atol=1e-8)


def test_training_recovers_theta_and_scatter(toy: dict) -> None:
    m, theta, s2 = toy["model"], toy["theta"], toy["s2"]
    assert m.n_terms == 15 and m.pixel_ok.all()
    # θ: per pixel it is exactly the weighted least-squares solution at the fitted s²
    D = tc.label_vector(m.pieces[0].scale(toy["labels"]), m.terms)
    for p in (0, 17, 901):
        w = toy["ivar"][:, p] / (1 + toy["ivar"][:, p] * m.s2[p])
        ref = np.linalg.lstsq(D * np.sqrt(w)[:, None], toy["flux"][:, p] * np.sqrt(w), rcond=None)[0]
        np.testing.assert_allclose(m.theta[p], ref, rtol=1e-7, atol=1e-10)
    # … and consistent with the truth within its own covariance: (θ̂-θ)ᵀ A (θ̂-θ) ~ χ² with T dof
    W = toy["ivar"] / (1 + toy["ivar"] * toy["s2"])
    A = np.einsum("np,ni,nj->pij", W, D, D)
    err = m.theta - theta
    q = np.einsum("pi,pij,pj->p", err, A, err)
    assert q.mean() == pytest.approx(m.n_terms, rel=0.1)
    # s²: the "dof" rule makes χ² = N - T wherever s² > 0, and recovers the true scatter
    pos = m.s2 > 0
    w = toy["ivar"] / (1 + toy["ivar"] * m.s2)
    chi2 = np.sum(w * (toy["flux"] - D @ m.theta.T) ** 2, axis=0)
    dof = (toy["ivar"] > 0).sum(axis=0) - m.n_terms
    np.testing.assert_allclose(chi2[pos], dof[pos], rtol=1e-6)
    assert np.all(chi2[~pos] <= dof[~pos] * (1 + 1e-9))
    big = toy["s2"] > 0.008**2
    ratio = np.sqrt(m.s2[big]) / np.sqrt(s2[big])
    assert np.median(ratio) == pytest.approx(1.0, abs=0.03)
    assert np.mean(m.s2[toy["s2"] == 0] < 0.004**2) > 0.9


def test_test_step_recovers_labels_with_calibrated_errors(toy: dict) -> None:
    flux, ivar, L = make_test(toy, 200, 60.0, seed=7)
    res = toy["model"].test(flux, ivar)
    assert res.labels.shape == (200, 4) and res.covariance.shape == (200, 4, 4)
    pull = (res.labels - L) / res.uncertainties
    assert np.all(np.abs(np.std(pull, axis=0) - 1.0) < 0.2)
    assert np.all(np.abs(np.mean(pull, axis=0)) < 0.25)
    assert np.median(res.r_chi_sq) == pytest.approx(1.0, abs=0.05)
    assert np.all(res.region == 0)
    ok = res.flags & (FLAGS["NO_DATA"] | FLAGS["NOT_CONVERGED"] | FLAGS["SINGULAR"]) == 0
    assert ok.all()
    # the batched LM lands where scipy's least_squares does (same objective, analytic Jacobian)
    m = toy["model"]
    piece = m.pieces[0]
    w = np.sqrt(ivar / (1 + ivar * m.s2))
    for i in range(3):
        def resid(x: np.ndarray, i: int = i) -> np.ndarray:
            return w[i] * (tc.label_vector(x[None], m.terms)[0] @ m.theta.T - flux[i])

        def jac(x: np.ndarray, i: int = i) -> np.ndarray:
            return w[i][:, None] * (m.theta @ tc.label_vector_derivative(x[None], m.terms)[0])

        ref = least_squares(resid, np.zeros(4), jac=jac, method="lm", xtol=1e-12, ftol=1e-12)
        np.testing.assert_allclose(piece.unscale(ref.x), res.labels[i], rtol=0, atol=1e-5 * piece.scales.max())
        assert res.chi_sq[i] == pytest.approx(2 * ref.cost, rel=1e-7)


def test_prediction_and_initial_labels(toy: dict) -> None:
    m = toy["model"]
    L = toy["labels"][:3]
    f = m.predict(L)
    assert f.shape == (3, 1500)
    np.testing.assert_allclose(m.predict(dict(zip(NAMES, L.T, strict=True))), f)
    np.testing.assert_allclose(m.predict(L[0]), f[0])
    flux, ivar, Lt = make_test(toy, 5, 100.0, seed=9)
    a = m.test(flux, ivar)
    b = m.test(flux, ivar, initial_labels=Lt)                    # (n, K)
    c = m.test(flux, ivar, initial_labels=np.stack([Lt, Lt + 100 * np.array([1, 0.001, 0, 0])], axis=1))
    assert np.all(np.abs(a.labels - b.labels) < 1e-3 * a.uncertainties)   # same minimum
    assert np.all(np.abs(a.labels - c.labels) < 1e-3 * a.uncertainties)
    with pytest.raises(CannonError, match="initial_labels has non-finite"):
        m.test(flux, ivar, initial_labels=np.full(4, np.nan))
    with pytest.raises(CannonError, match=r"initial_labels must be"):
        m.test(flux, ivar, initial_labels=np.zeros((2, 4)))


def test_masked_spectra_are_flagged_not_fatal(toy: dict) -> None:
    flux, ivar, L = make_test(toy, 4, 100.0, seed=11)
    ivar[1, :1000] = 0.0                                         # two thirds masked
    ivar[2, 30:] = 0.0                                           # almost nothing left
    flux[3, :] = np.nan                                          # garbage
    res = toy["model"].test(flux, ivar)
    assert res.flags[0] == 0 or res.flags[0] == FLAGS["OUTSIDE_HULL"]
    assert res.flags[1] & FLAGS["MOSTLY_MASKED"] and not res.flags[1] & FLAGS["NO_DATA"]
    assert np.all(np.abs(res.labels[1] - L[1]) < 5 * res.uncertainties[1])
    for i in (2, 3):
        assert res.flags[i] & FLAGS["NO_DATA"] and np.isnan(res.labels[i]).all() and np.isnan(res.r_chi_sq[i])
    assert res.n_pixels.tolist()[1:] == [500, 30, 0]
    assert tc.describe_flags(res.flags[2]) == ["MOSTLY_MASKED", "NO_DATA"]


def test_outside_the_training_labels_is_flagged(toy: dict) -> None:
    m = toy["model"]
    L = np.array([[4800.0, 2.5, -0.3, 0.1], [6500.0, 2.5, -0.3, 0.1], [4800.0, 2.5, -0.3, 0.1]])
    L[2] = [5450.0, 1.2, -0.95, 0.08]       # each label within range, but an unpopulated corner
    D = tc.label_vector((L - toy["fid"]) / toy["scale"], toy["terms"])
    flux = D @ toy["theta"].T
    res = m.test(flux, np.full(flux.shape, 1e6))
    np.testing.assert_allclose(res.labels[:2, 0], L[:2, 0], atol=20)
    assert res.flags[0] & (FLAGS["OUTSIDE_HULL"] | FLAGS["OUTSIDE_RANGE"]) == 0
    assert res.flags[1] & FLAGS["OUTSIDE_HULL"] and res.flags[1] & FLAGS["OUTSIDE_RANGE"]
    assert res.flags[2] & FLAGS["OUTSIDE_HULL"] and not res.flags[2] & FLAGS["OUTSIDE_RANGE"]


def test_hull_delaunay_and_lp_agree() -> None:
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(300, 4))
    q = rng.normal(size=(400, 4)) * 1.3
    hull = LabelHull(pts)
    assert hull._delaunay is not None
    inside = hull.contains(q)
    assert 0.1 < inside.mean() < 0.9
    lp = np.array([hull._lp_contains(x) for x in q])
    assert np.array_equal(inside, lp)
    assert not hull.contains(np.array([[np.nan, 0, 0, 0]]))[0]


def test_l1_regularisation_solves_the_lasso(toy: dict) -> None:
    lam = 2000.0
    sub = slice(0, 300)
    plain = CannonModel(NAMES, n_iterations=1).train(toy["flux"][:, sub], toy["ivar"][:, sub], toy["labels"],
                                                    cv_folds=0)
    reg = CannonModel(NAMES, regularization=lam, n_iterations=1).train(toy["flux"][:, sub], toy["ivar"][:, sub],
                                                                       toy["labels"], cv_folds=0)
    D = tc.label_vector(reg.pieces[0].scale(toy["labels"]), reg.terms)
    W = toy["ivar"][:, sub]                                      # s² = 0 in the θ step of iteration 1
    A = np.einsum("np,ni,nj->pij", W, D, D)
    b = (W * toy["flux"][:, sub]).T @ D
    grad = 2 * (b - np.einsum("pij,pj->pi", A, reg.theta))      # -∂χ²/∂θ
    th = reg.theta
    # KKT: zero coefficients have |∂χ²/∂θ| ≤ Λ, non-zero ones balance it exactly
    zero = th[:, 1:] == 0
    assert zero.mean() > 0.2                                     # sparse
    assert np.all(np.abs(grad[:, 1:][zero]) <= lam * (1 + 1e-3))
    nz = ~zero
    np.testing.assert_allclose(grad[:, 1:][nz], lam * np.sign(th[:, 1:][nz]), rtol=1e-3, atol=lam * 1e-3)
    assert abs(grad[:, 0]).max() < lam * 1e-3                     # the constant term is not penalised

    def objective(theta: np.ndarray) -> np.ndarray:
        r = toy["flux"][:, sub] - D @ theta.T
        return np.sum(W * r * r, axis=0) + lam * np.abs(theta[:, 1:]).sum(axis=1)

    assert np.all(objective(reg.theta) <= objective(plain.theta) + 1e-6)
    assert np.abs(reg.theta[:, 1:]).sum() < np.abs(plain.theta[:, 1:]).sum()


def test_piecewise_model_follows_a_non_polynomial_spectrum() -> None:
    """A spectrum that is exponential in one label: two quadratic pieces beat one."""
    rng = np.random.default_rng(5)
    n, P = 600, 200
    x = rng.uniform(0.0, 3.0, n)
    y = rng.normal(0.0, 1.0, n)
    depth = rng.uniform(0.1, 0.5, P)
    scale = rng.uniform(0.5, 1.5, P)

    def spectra(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return 1 - depth * np.exp(-scale * x[:, None]) * (1 + 0.1 * y[:, None])

    flux, ivar = spectra(x, y), np.full((n, P), 1e6)
    labels = {"x": x, "y": y}
    one = CannonModel(("x", "y")).train(flux, ivar, labels, cv_folds=0)
    two = CannonModel(("x", "y"), regions=[{"x": (None, 1.5)}, {"x": (1.5, None)}]).train(flux, ivar, labels)
    xt, yt = rng.uniform(0.1, 2.9, 100), rng.normal(0, 1, 100)
    ft = spectra(xt, yt) + rng.normal(size=(100, P)) * 1e-3
    r1 = one.test(ft, np.full(ft.shape, 1e6))
    r2 = two.test(ft, np.full(ft.shape, 1e6))
    e1 = np.median(np.abs(r1.labels[:, 0] - xt))
    e2 = np.median(np.abs(r2.labels[:, 0] - xt))
    assert e2 < 0.5 * e1
    assert np.array_equal(r2.region, (r2.labels[:, 0] >= 1.5).astype(int))   # each star from its own core
    assert np.array_equal(two.assign_piece(np.array([[0.2, 0.0], [3.0, 0.0], [-5.0, 0.0]])), [0, 1, 0])
    # cross-validated systematic floors exist per piece and enter the uncertainties
    assert all(p.label_floor.shape == (2,) and np.all(p.label_floor >= 0) for p in two.pieces)
    assert two.meta["cv"]["folds"] == 2
    # predict uses the piece of the labels' core
    np.testing.assert_allclose(two.predict(np.array([[3.0, 0.0]])),
                               tc.label_vector(two.pieces[1].scale(np.array([[3.0, 0.0]])), two.terms)
                               @ two.pieces[1].theta.T)
    with pytest.raises(CannonError, match="theta"):
        _ = two.theta


def test_bad_training_input_gets_clear_errors(toy: dict) -> None:
    flux, ivar, L = toy["flux"], toy["ivar"], toy["labels"]
    with pytest.raises(CannonError, match=r"training set too small: 12 spectra .* 4 labels with 15 coefficients"):
        CannonModel(NAMES).train(flux[:12], ivar[:12], L[:12])
    with pytest.raises(CannonError, match=r"too small: 15 spectra .* 35 coefficients.*at least 36"):
        CannonModel(NAMES, order=3).train(flux[:15], ivar[:15], L[:15])
    bad = L.copy()
    bad[3, 1] = np.nan
    with pytest.raises(CannonError, match=r"non-finite label values .*'logg': 1"):
        CannonModel(NAMES).train(flux, ivar, bad)
    with pytest.raises(CannonError, match=r"labels lack \['alpha_m'\]"):
        CannonModel(NAMES).train(flux, ivar, {k: L[:, i] for i, k in enumerate(NAMES[:3])})
    const = L.copy()
    const[:, 3] = 0.1
    with pytest.raises(CannonError, match=r"\['alpha_m'\] do not vary"):
        CannonModel(NAMES).train(flux, ivar, const)
    with pytest.raises(CannonError, match="differ in shape"):
        CannonModel(NAMES).train(flux, ivar[:, :10], L)
    with pytest.raises(CannonError, match="negative or NaN"):
        CannonModel(NAMES).train(flux, -ivar, L)
    with pytest.raises(CannonError, match=r"region 1 .* too small: \d+ spectra"):
        CannonModel(NAMES, regions=[{"teff": (None, 5000)}, {"teff": (7000, None)}]).train(flux, ivar, L)
    with pytest.raises(CannonError, match="unknown label 'vsini'"):
        CannonModel(NAMES, regions=[{"vsini": (0, 10)}])
    with pytest.raises(CannonError, match="not trained"):
        CannonModel(NAMES).test(flux[:1], ivar[:1])
    with pytest.raises(CannonError, match="20 pixels, the model has 1500"):
        toy["model"].test(flux[:1, :20], ivar[:1, :20])
    with pytest.raises(CannonError, match=r"order must be 1\.\.4"):
        CannonModel(NAMES, order=7)


def test_write_read_round_trip(toy: dict, tmp_path: Path) -> None:
    m = toy["model"]
    m.meta["continuum"] = "abc"
    path = m.write(tmp_path / "sub" / "cannon.npz")
    assert path.name == "cannon.npz" and path.is_file()
    back = CannonModel.read(path)
    assert back.label_names == NAMES and back.order == 2 and back.meta["continuum"] == "abc"
    np.testing.assert_array_equal(back.theta, m.theta)
    np.testing.assert_array_equal(back.s2, m.s2)
    flux, ivar, _ = make_test(toy, 10, 80.0, seed=13)
    a, b = m.test(flux, ivar), back.test(flux, ivar)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.flags, b.flags)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(CannonError, match=r"junk\.npz: not a readable Cannon model"):
        CannonModel.read(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", theta=np.zeros(3))
    with pytest.raises(CannonError, match=r"other\.npz: not a Cannon model file"):
        CannonModel.read(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError):
        CannonModel.read(tmp_path / "missing.npz")
    with pytest.raises(CannonError, match="not trained"):
        CannonModel(NAMES).write(tmp_path / "x.npz")
