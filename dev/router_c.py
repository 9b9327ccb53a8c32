"""Monte Carlo estimates of the NormRouter calibration constant (SPEC section 3).

router_c = E[1 / ||topK(relu(x / ||x||))||_2] over x ~ N(0, I_E), draws whose top-K
entries are all zero skipped. Run as a script, it prints long-run estimates
(10^7 draws each) against which the C estimator is tested.

Strictly the mean is infinite for every E: a draw with one barely positive entry u
gives 1/u, and u is near-uniform close to 0, so P(sample > X) ~ a / X with
a ~ E 2^-(E-1) sqrt(E / 2 pi) (about 8e-4 at E = 16, 3e-8 at E = 32). The sample
mean therefore drifts up like a ln(n), and one draw in n can move it by about
a / (relative error): at E = 16 roughly one 10^5-draw estimate in 30 is off by more
than 1%, and the standard error printed is not a reliable error bar there. The
median of the 10^5-draw chunk estimates is printed as a robust figure. At E >= 32
the tail is invisible and the standard error means what it says.
"""
import numpy as np

# (E, K) pairs of the long-run table.
LONG_RUN_CASES = [(16, 1), (32, 1), (96, 1), (16, 2), (96, 2)]
LONG_RUN_DRAWS = 10**7
LONG_RUN_SEED = 2605


def inv_topk_norms(x, K):
    """1 / ||topK(relu(x / ||x||))||_2 for each row of x (n, E); rows whose top-K entries are
    all zero are dropped."""
    E = x.shape[1]
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    top = np.maximum(np.partition(u, E - K, axis=1)[:, E - K:], 0.0)
    norms = np.sqrt((top * top).sum(axis=1))
    return 1.0 / norms[norms > 0]


def estimate_router_c(E, K, n_draws, rng, chunk=100_000):
    """Sample mean of inv_topk_norms over n_draws rows of rng.standard_normal, drawn in chunks.
    Returns (mean, standard error, number of draws kept, [mean of each chunk])."""
    total = total_sq = 0.0
    kept = 0
    chunk_means = []
    for start in range(0, n_draws, chunk):
        values = inv_topk_norms(rng.standard_normal((min(chunk, n_draws - start), E)), K)
        total += values.sum()
        total_sq += (values * values).sum()
        kept += values.size
        chunk_means.append(values.mean())
    mean = total / kept
    var = (total_sq / kept - mean * mean) * kept / (kept - 1)
    return mean, np.sqrt(var / kept), kept, chunk_means


def main():
    print(f"router_c, {LONG_RUN_DRAWS} draws each, numpy default_rng({LONG_RUN_SEED} + index);")
    print("median1e5: the median of the 10^5-draw chunk estimates")
    print(f"{'E':>4} {'K':>3} {'router_c':>10} {'std err':>9} {'rel err':>8} {'skipped':>8}"
          f" {'median1e5':>10} {'chunk min':>10} {'chunk max':>10}")
    for index, (E, K) in enumerate(LONG_RUN_CASES):
        rng = np.random.default_rng(LONG_RUN_SEED + index)
        mean, se, kept, chunks = estimate_router_c(E, K, LONG_RUN_DRAWS, rng)
        skipped = LONG_RUN_DRAWS - kept
        print(f"{E:>4} {K:>3} {mean:>10.6f} {se:>9.2e} {se / mean:>8.1e} {skipped:>8}"
              f" {np.median(chunks):>10.6f} {min(chunks):>10.6f} {max(chunks):>10.6f}")


if __name__ == "__main__":
    main()
