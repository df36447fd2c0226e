"""Expert grouping (MoEfication, LTE.md step 1): balanced k-means on FFN neurons.

Each intermediate neuron i is the L2-normalised row x_i of W_gate (gated FFNs) or W_up. The
n = d_ff neurons are split into E = ceil(n / s) clusters of exactly s slots (s = expert_size);
when s does not divide n, the F − n = E·s − n free slots become zero-padded neurons.

Algorithm (Euclidean k-means on the unit rows, every cluster capped at s members):

    init:    k-means++ (D² sampling, seeded)                           # E sequential matvecs
    repeat:  assign  — balanced greedy assignment, below
             update  — c_e = mean of its members' rows
    until the assignment stops changing (or max_iter)

Balanced assignment. Minimising ‖x_i − c_e‖² = 1 + ‖c_e‖² − 2·x_i·c_e means maximising the
score S[i, e] = 2·x_i·c_e − ‖c_e‖². Each neuron keeps only its top-k clusters (k = 8), computed
chunk by chunk, so memory is O(n·k + chunk·E + (n + E)·d) — never the n×E score matrix, let
alone O(d_ff²). Neurons are then placed in order of regret (best minus second-best score:
those with most to lose go first) into their best cluster that still has room. Neurons whose
k candidates all filled up go round again, scored against the clusters that still have room
only; every round places at least the first neuron of its order, and in practice one or two
rounds suffice.

Why greedy-with-regret: it meets the capacities exactly by construction (no repair step),
costs one top-k, one sort and one pass per iteration, and keeps memory linear in d_ff. The
exact alternatives (min-cost flow, as in the k-means-constrained package) and price-based
balancing (auction, Sinkhorn) work on the full n×E cost matrix, which grows as d_ff²/s, and
Sinkhorn's fractional plan still has to be rounded to exact capacities. The following k-means
iterations partly correct the greedy's suboptimality.

Timings (results/grouping.md): `python -m converter.grouping smollm2|7b` on 2 CPU cores.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TOP_K = 8           # candidate clusters kept per neuron and round
CHUNK = 4096        # neurons scored per matmul


def _scores(x, c, c_sq):
    """S [rows, E'] = 2·x·cᵀ − ‖c‖²  (higher is closer)."""
    return 2.0 * (x @ c.t()) - c_sq


def _kmeans_pp(x, n_clusters, gen):
    """k-means++ seeding on unit rows: ‖x − c‖² = 2 − 2·x·c when c is itself a row."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    idx = [first]
    dist = (2.0 - 2.0 * (x @ x[first])).clamp_min_(0)          # [n]
    for _ in range(1, n_clusters):
        total = float(dist.sum())
        if total <= 0:            # all remaining rows coincide with a centre: take any unused
            used = set(idx)
            nxt = next(i for i in range(n) if i not in used)
        else:
            nxt = int(torch.multinomial(dist / total, 1, generator=gen))
        idx.append(nxt)
        dist = torch.minimum(dist, (2.0 - 2.0 * (x @ x[nxt])).clamp_min_(0))
    return x[idx].clone()


def _balanced_assign(x, centroids, capacity):
    """Cluster index [n] for each row, no cluster over `capacity` (n ≤ E·capacity)."""
    n, E = x.shape[0], centroids.shape[0]
    c_sq = (centroids * centroids).sum(1)
    room = [capacity] * E
    assign = [-1] * n
    pending = torch.arange(n)
    open_ = torch.arange(E)
    while pending.numel():
        k = min(TOP_K, open_.numel())
        best, cand = [], []
        for start in range(0, pending.numel(), CHUNK):
            rows = pending[start:start + CHUNK]
            s = _scores(x[rows], centroids[open_], c_sq[open_])
            v, i = s.topk(k, dim=1)                              # [chunk, k]
            best.append(v)
            cand.append(open_[i])
        best, cand = torch.cat(best), torch.cat(cand)
        regret = best[:, 0] - best[:, 1] if k > 1 else best[:, 0]
        order = torch.argsort(regret, descending=True, stable=True)
        cand_l, pend_l, left = cand.tolist(), pending.tolist(), []
        for p in order.tolist():
            for e in cand_l[p]:
                if room[e]:
                    room[e] -= 1
                    assign[pend_l[p]] = e
                    break
            else:
                left.append(pend_l[p])
        pending = torch.tensor(sorted(left), dtype=torch.long)
        open_ = torch.tensor([e for e in range(E) if room[e]], dtype=torch.long)
    return torch.tensor(assign, dtype=torch.long)


def balanced_kmeans(x, n_clusters: int, capacity: int, seed: int = 0, max_iter: int = 30):
    """CPU rows x [n, d] (unit norm) -> (assign [n], centroids [E, d]); every cluster gets at
    most `capacity` rows, exactly `capacity` when n == n_clusters·capacity."""
    n = x.shape[0]
    assert n <= n_clusters * capacity, (n, n_clusters, capacity)
    gen = torch.Generator().manual_seed(seed)
    centroids = _kmeans_pp(x, n_clusters, gen)
    assign = None
    for _ in range(max_iter):
        new = _balanced_assign(x, centroids, capacity)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=n_clusters).clamp_min(1).to(x.dtype)
        centroids = torch.zeros_like(centroids).index_add_(0, assign, x)
        centroids /= counts[:, None]
    return assign, centroids


def expert_permutation(weight, expert_size: int, seed: int = 0):
    """Neuron order [F] that makes each balanced k-means cluster a contiguous expert.

    weight: W_gate or W_up rows [n, d] (any dtype/device; grouped in fp32 on the CPU).
    F = ceil(n / expert_size)·expert_size.
    perm[j] = the original neuron placed at position j; values ≥ n are zero-padding neurons,
    which fill each cluster's free slots. Clusters are ordered by their smallest neuron index,
    and neurons ascending within a cluster, so the result depends only on the weights and seed.
    """
    n = weight.shape[0]
    E = math.ceil(n / expert_size)
    x = F.normalize(weight.detach().float().cpu(), dim=1)     # CPU: same grouping everywhere
    assign, _ = balanced_kmeans(x, E, expert_size, seed)
    members = [[] for _ in range(E)]
    for i, e in enumerate(assign.tolist()):
        members[e].append(i)
    members.sort(key=lambda m: m[0])
    pad = iter(range(n, E * expert_size))
    perm = []
    for m in members:
        perm += m + [next(pad) for _ in range(expert_size - len(m))]
    return torch.tensor(perm, dtype=torch.long)


def mean_sq_distance(weight, perm, expert_size: int) -> float:
    """Mean ‖x_i − c_e‖² over real neurons for a grouping (lower is tighter; for reports)."""
    n = weight.shape[0]
    x = F.normalize(weight.detach().float(), dim=1)
    x = torch.cat([x, x.new_zeros(len(perm) - n, x.shape[1])])[perm]
    real = (perm < n).to(x.dtype).view(-1, expert_size, 1)
    xs = x.view(-1, expert_size, x.shape[1])
    c = (xs * real).sum(1, keepdim=True) / real.sum(1, keepdim=True)
    return float((((xs - c) ** 2).sum(-1, keepdim=True) * real).sum() / real.sum())


def _smollm2_gates():
    from safetensors import safe_open

    from lte_convert.default import default_model_dir
    with safe_open(str(default_model_dir() / "model.safetensors"), "pt") as f:
        return [f.get_tensor(f"model.layers.{i}.mlp.gate_proj.weight") for i in range(30)]


BENCH_CASES = {
    "smollm2": ("SmolLM2-135M W_gate, 30 layers (1536x576)", _smollm2_gates),
    "7b": ("LLaMA-7B-shaped random layer (11008x4096)",
           lambda: [torch.randn(11008, 4096, generator=torch.Generator().manual_seed(0))]),
}


def _bench(case: str):
    """Time expert_permutation (expert_size 32) for one case; print seconds, peak RSS of the
    process, and cluster tightness (mean squared distance to the centroid, unit rows) of the
    k-means grouping against a random balanced grouping. One case per process, so the peak
    RSS is that case's. Threads: torch's default (set OMP_NUM_THREADS to choose)."""
    import resource
    import time

    name, load = BENCH_CASES[case]
    weights = load()
    t0 = time.perf_counter()
    perms = [expert_permutation(w, 32, seed=i) for i, w in enumerate(weights)]
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gen = torch.Generator().manual_seed(0)
    km = sum(mean_sq_distance(w, p, 32) for w, p in zip(weights, perms)) / len(weights)
    rnd = sum(mean_sq_distance(w, torch.randperm(w.shape[0], generator=gen), 32)
              for w in weights) / len(weights)
    print(f"threads: {torch.get_num_threads()}")
    print(f"{'case':44} {'seconds':>8} {'peak RSS MiB':>12} {'msd k-means':>11} {'msd random':>10}")
    print(f"{name:44} {dt:8.1f} {peak:12.0f} {km:11.4f} {rnd:10.4f}")


if __name__ == "__main__":
    import sys
    for arg in sys.argv[1:] or list(BENCH_CASES):
        _bench(arg)
