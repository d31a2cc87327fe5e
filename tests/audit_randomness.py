"""Audit: randomness inside ``f`` and in the estimators behaves as a caller expects.

Run: ``PYTHONPATH=src python tests/audit_randomness.py`` (a script, not collected by pytest).
Part 1: ``f`` with a train-mode dropout or ``torch.randn`` inside, every exact operator and
method and chunk size: the result must be the derivative of ONE evaluation (the function
frozen at a plain evaluation seeded the same) and the global RNG left as that evaluation
left it. Part 2: the stochastic estimators on such an ``f`` with a diagonal Jacobian
(Rademacher probes are then exact): one evaluation's trace, reproducible with the same seeds,
and with ``generator=`` the global RNG moved only by ``f``'s own draws. Prints only failures.
"""

# ruff: noqa: B023, SIM108
import os
import warnings

import torch

import torchdiv
import torchdiv.distributed


def main() -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    D = 4
    lin1 = torch.nn.Linear(D, 16).double()
    lin2 = torch.nn.Linear(16, D).double()
    lin3 = torch.nn.Linear(16, 1).double()
    drop = torch.nn.Dropout(0.5).train()

    def f_drop(x):
        return lin2(drop(torch.tanh(lin1(x))))

    def f_randn(x):
        return lin2(torch.tanh(lin1(x)) * torch.randn(16, dtype=x.dtype))

    def s_drop(x):
        return lin3(drop(torch.tanh(lin1(x))))

    def s_randn(x):
        return lin3(torch.tanh(lin1(x)) * torch.randn(16, dtype=x.dtype))

    x = torch.randn(3, D, dtype=torch.float64)

    def ref_jac(f, x, seed):
        torch.manual_seed(seed)
        xx = x.clone().requires_grad_()
        y = f(xx)
        after = torch.get_rng_state()
        rows = [
            torch.autograd.grad(y[:, i].sum(), xx, retain_graph=True)[0] for i in range(y.shape[1])
        ]
        return torch.stack(rows, 1), after

    def ref_lap(f, x, seed):
        torch.manual_seed(seed)
        xx = x.clone().requires_grad_()
        y = f(xx)
        after = torch.get_rng_state()
        g = torch.autograd.grad(y.sum(), xx, create_graph=True)[0]
        lap = sum(
            torch.autograd.grad(g[:, i].sum(), xx, retain_graph=True)[0][:, i] for i in range(D)
        )
        return lap[:, None], after

    for fname, f in (("dropout", f_drop), ("randn", f_randn)):
        for m in ["auto", "structured", "forward", "reverse"]:
            for op in ["divergence", "jacobian_diagonal", "jacobian"]:
                if op == "jacobian" and m == "structured":
                    continue
                for cs in [None, 1, 2]:
                    J, after = ref_jac(f, x, 7)
                    torch.manual_seed(7)
                    try:
                        r = getattr(torchdiv, op)(f, x, method=m, chunk_size=cs)
                    except Exception as e:
                        print(fname, op, m, cs, "ERR", type(e).__name__, str(e)[:100])
                        continue
                    ref = {
                        "jacobian": J,
                        "divergence": J.diagonal(dim1=1, dim2=2).sum(-1),
                        "jacobian_diagonal": J.diagonal(dim1=1, dim2=2),
                    }[op]
                    ok = torch.allclose(r, ref, atol=1e-10)
                    rng = torch.equal(torch.get_rng_state(), after)
                    if not (ok and rng):
                        print(fname, op, m, cs, "value ok", ok, "rng once", rng)
    for fname, f in (("dropout", s_drop), ("randn", s_randn)):
        for m in ["auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"]:
            for op in ["laplacian", "weighted_laplacian", "value_grad_laplacian", "biharmonic"]:
                if op in ("value_grad_laplacian", "biharmonic") and m not in (
                    "auto",
                    "taylor",
                    "forward-over-reverse",
                ):
                    continue
                for cs in [None, 1, 2]:
                    L, after = ref_lap(f, x, 7)
                    torch.manual_seed(7)
                    try:
                        kw = (
                            {"diffusion": torch.eye(D, dtype=torch.float64)}
                            if op == "weighted_laplacian"
                            else {}
                        )
                        r = getattr(torchdiv, op)(f, x, method=m, chunk_size=cs, **kw)
                    except Exception as e:
                        print(fname, op, m, cs, "ERR", type(e).__name__, str(e)[:100])
                        continue
                    if op == "value_grad_laplacian":
                        r = r.laplacian
                    if op == "biharmonic":
                        ok = True
                    else:
                        ok = torch.allclose(r, L, atol=1e-10)
                    rng = torch.equal(torch.get_rng_state(), after)
                    if not (ok and rng):
                        print(fname, op, m, cs, "value ok", ok, "rng once", rng)

    # ---- part 2 ----
    D = 5
    drop = torch.nn.Dropout(0.5).train()

    def f_drop(x):
        return drop(x) * 2.0  # J = diag(mask/(1-p))*2

    def f_randn(x):
        return x * torch.randn(D, dtype=x.dtype)

    def s_drop(x):
        return (drop(x) * x).sum(-1, keepdim=True)  # Hessian diag = 2*mask/(1-p)

    def s_randn(x):
        return (x * x * torch.randn(D, dtype=x.dtype)).sum(-1, keepdim=True)

    x = torch.randn(3, D, dtype=torch.float64)

    def ref(f, scalar, state=None):
        torch.manual_seed(7)
        if state is not None:
            torch.set_rng_state(state)
        xx = x.clone().requires_grad_()
        y = f(xx)
        after = torch.get_rng_state()
        if scalar:
            g = torch.autograd.grad(y.sum(), xx, create_graph=True)[0]
            d = torch.stack(
                [
                    torch.autograd.grad(g[:, i].sum(), xx, retain_graph=True)[0][:, i]
                    for i in range(D)
                ],
                1,
            )
        else:
            d = torch.stack(
                [
                    torch.autograd.grad(y[:, i].sum(), xx, retain_graph=True)[0][:, i]
                    for i in range(D)
                ],
                1,
            )
        return d, after

    cases = {
        "div-hutch": (
            False,
            lambda f, g: torchdiv.divergence(f, x, method="hutchinson", num_probes=6, generator=g),
            lambda d: d.sum(1),
        ),
        "div-hutch-chunk": (
            False,
            lambda f, g: torchdiv.divergence(
                f, x, method="hutchinson", num_probes=6, chunk_size=2, generator=g
            ),
            lambda d: d.sum(1),
        ),
        "div-hutch1": (
            False,
            lambda f, g: torchdiv.divergence(f, x, method="hutchinson", num_probes=1, generator=g),
            lambda d: d.sum(1),
        ),
        "est-rtol": (
            False,
            lambda f, g: (
                torchdiv.estimate_divergence(
                    f, x, num_probes=3, rtol=1e-9, max_probes=12, generator=g
                ).value
            ),
            lambda d: d.sum(1),
        ),
        "est-rtol-chunk": (
            False,
            lambda f, g: (
                torchdiv.estimate_divergence(
                    f, x, num_probes=3, rtol=1e-9, max_probes=12, chunk_size=1, generator=g
                ).value
            ),
            lambda d: d.sum(1),
        ),
        "jdiag-hutch": (
            False,
            lambda f, g: torchdiv.jacobian_diagonal(
                f, x, method="hutchinson", num_probes=4, chunk_size=2, generator=g
            ),
            lambda d: d,
        ),
        "lap-hutch": (
            True,
            lambda f, g: torchdiv.laplacian(
                f, x, method="hutchinson", num_probes=4, chunk_size=2, generator=g
            )[:, 0],
            lambda d: d.sum(1),
        ),
        "wlap-hutch": (
            True,
            lambda f, g: torchdiv.weighted_laplacian(
                f,
                x,
                diffusion=torch.eye(D, dtype=torch.float64),
                method="hutchinson",
                num_probes=4,
                chunk_size=2,
                generator=g,
            )[:, 0],
            lambda d: d.sum(1),
        ),
        "dist-hutch": (
            False,
            lambda f, g: torchdiv.distributed.divergence(
                f, x, method="hutchinson", num_probes=4, chunk_size=2, generator=g
            ),
            lambda d: d.sum(1),
        ),
    }

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29544")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    for name, (scalar, call, red) in cases.items():
        for fn, f in (
            ("drop", s_drop if scalar else f_drop),
            ("randn", s_randn if scalar else f_randn),
        ):
            for use_gen in (True, False):
                d, after = ref(f, scalar)
                g = torch.Generator().manual_seed(3) if use_gen else None
                torch.manual_seed(7)
                first = []

                def fw(z, f=f):
                    if not first:
                        first.append(torch.get_rng_state())
                    return f(z)

                try:
                    r = call(fw, g)
                except Exception as e:
                    print(name, fn, use_gen, "ERR", type(e).__name__, str(e)[:120])
                    continue
                if not use_gen:
                    d, _ = ref(f, scalar, first[0])
                ok = torch.allclose(r, red(d), atol=1e-9)
                rng_ok = torch.equal(torch.get_rng_state(), after) if use_gen else None
                # reproducible with the same seeds
                g2 = torch.Generator().manual_seed(3) if use_gen else None
                torch.manual_seed(7)
                r2 = call(f, g2)
                rep = torch.equal(r, r2)
                if not (ok and rng_ok in (True, None) and rep):
                    print(
                        name,
                        fn,
                        "gen" if use_gen else "nogen",
                        "one-draw value",
                        ok,
                        "global rng = one eval",
                        rng_ok,
                        "reproducible",
                        rep,
                        (r - red(d)).abs().max().item(),
                    )
    print("done")
    print("done")


if __name__ == "__main__":
    main()
