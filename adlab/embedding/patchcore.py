"""PatchCore: "Towards Total Recall in Industrial Anomaly Detection" (Roth et al., CVPR 2022).

A memory bank of locally aware patch features of the training images, reduced
by greedy coreset subsampling; a test patch is scored by its distance to the
nearest memory entry.

1. Locally aware patch features (Sec. 3.1): mid-level maps (layer2, layer3), each
   averaged over a p x p neighbourhood (p = 3) so a patch carries its local
   context, layer3 upsampled to layer2's grid, concatenated, and averaged down
   to a target dimension (adaptive average pooling over channels).
2. Coreset-reduced memory bank (Sec. 3.2, Alg. 1): greedy k-center selection
   (repeatedly add the feature farthest from the current coreset) on a random
   Johnson-Lindenstrauss projection of the features to 128 dims. It keeps one
   "distance to the coreset" vector and never forms the N x N distance matrix.
3. Scoring (Sec. 3.3): patch score = distance to the nearest memory feature; the
   map is upsampled and smoothed (Gaussian, sigma 4). Image score (Eq. 6 and 7):
   the largest patch score s* = ||m_test,* - m*||, reweighted by how
   m_test,* relates to the b nearest neighbours of m* in the memory bank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from adlab.config import by_profile
from adlab.detector import Prediction
from adlab.features import FeatureDetector, batches, images_of, smooth_map


@dataclass
class PatchCoreConfig:
    """PatchCore hyperparameters; defaults follow the active profile."""

    # Sec. 4 (implementation details): WideResNet-50 (ImageNet); ResNet-18 for the quick profile.
    backbone: str = field(default_factory=lambda: by_profile(quick="resnet18",
                                                             paper="wide_resnet50_2"))
    # Sec. 3.1 / Sec. 4: the mid-level hierarchies j = 2 and 3. Quick profile: layers 1-2,
    # whose 32 x 32 grid at 128 px matches the paper's layer-2 grid (28 x 28 at 224 px);
    # a random-init network's deeper layers carry no learned semantics.
    layers: tuple = field(default_factory=lambda: by_profile(
        quick=("layer1", "layer2"), paper=("layer2", "layer3")))
    # Sec. 3.1 / Sec. 4: neighbourhood size p = 3.
    patch_size: int = 3
    # Official code's target embedding dimension 1024 (WRN-50: 512 + 1024 -> 1024);
    # None keeps the concatenated channels (ResNet-18 layers 1-2: 64 + 128 = 192).
    target_dim: int | None = field(default_factory=lambda: by_profile(quick=None, paper=1024))
    # Sec. 4 / Table 1: coreset percentages 25 %, 10 % and 1 % (10 % in the official run
    # scripts); quick: PatchCore-1 %, about 10x less CPU time in the coreset and the search.
    coreset_ratio: float = field(default_factory=lambda: by_profile(quick=0.01, paper=0.1))
    # Sec. 3.2: Johnson-Lindenstrauss projection dimension for the coreset (official code: 128).
    projection_dim: int = 128
    # Eq. (7): size b of the neighbourhood N_b(m*); the paper leaves b open, anomalib uses 9
    # (b = 1 switches the reweighting off: s = s*, as in the official code).
    b: int = 9
    # Sec. 3.3: the map is smoothed by a Gaussian of kernel width sigma = 4.
    sigma: float = 4.0
    # None: the profile's choice (pretrained in the paper profile, random init in quick).
    pretrained: bool | None = None
    seed: int = 0               # projection, coreset start, random-init backbone
    batch_size: int = 16        # feature extraction batch (memory only)


# ----------------------------------------------------------------------------- Sec. 3.1

def locally_aware_features(features: list[torch.Tensor], p: int = 3,
                           target_dim: int | None = None) -> torch.Tensor:
    """Sec. 3.1: neighbourhood-aggregated, multi-layer patch features ``[B, D, h, w]``.

    Each map is averaged over its p x p neighbourhood (stride 1, borders average the
    cells that exist), deeper maps are upsampled bilinearly to the first map's grid,
    all are concatenated, and if ``target_dim`` is smaller than the channel count the
    channels are reduced by adaptive average pooling. (The official code first pools
    each layer to 1024 dims, so both layers weigh equally; here the concatenation is
    pooled, as the paper's text describes.)
    """
    size = features[0].shape[-2:]
    pooled = [F.avg_pool2d(f, p, stride=1, padding=p // 2, count_include_pad=False)
              for f in features]
    pooled = [pooled[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                            for f in pooled[1:]]
    phi = torch.cat(pooled, dim=1)
    b, d, h, w = phi.shape
    if target_dim is not None and target_dim < d:
        flat = phi.permute(0, 2, 3, 1).reshape(-1, 1, d)
        phi = F.adaptive_avg_pool1d(flat, target_dim).view(b, h, w, target_dim).permute(0, 3, 1, 2)
    return phi


# ----------------------------------------------------------------------------- Sec. 3.2

def random_projection(x: torch.Tensor, k: int = 128, seed: int = 0) -> torch.Tensor:
    """Sec. 3.2: Johnson-Lindenstrauss projection ``psi`` of ``[N, D]`` features to ``k`` dims.

    A Gaussian matrix with entries N(0, 1/k), so squared distances are preserved in
    expectation. Returns ``x`` itself when ``D <= k``.
    """
    if x.shape[1] <= k:
        return x
    g = torch.Generator().manual_seed(seed)
    psi = torch.randn(x.shape[1], k, generator=g, dtype=torch.float32) / k ** 0.5
    return x @ psi.to(device=x.device, dtype=x.dtype)


def greedy_coreset(z: torch.Tensor, n: int, start: int = 0, progress: bool = False) -> torch.Tensor:
    """Alg. 1 (greedy k-center): indices of ``n`` rows of ``z [N, k]``.

    Starting from row ``start``, repeatedly add ``argmax_m min_{c in coreset} ||m - c||``.
    Only the vector ``min_dist[N]`` (each row's squared distance to the coreset) is kept
    and updated with the one new centre per step: O(N) memory, O(N k) time per step.
    """
    N = len(z)
    if not 0 < n <= N:
        raise ValueError(f"coreset size must be in 1..{N}; got {n}.")
    sq_norm = (z * z).sum(1)
    z_t = z.t().contiguous()                        # [k, N]: row-vector @ matrix is the fast BLAS path

    def sq_dist_to(i: int) -> torch.Tensor:        # ||z_m - z_i||^2 for every m
        return (sq_norm - 2 * (z[i] @ z_t) + sq_norm[i]).clamp_min_(0)

    indices = torch.empty(n, dtype=torch.long)
    indices[0] = start
    min_dist = sq_dist_to(start)
    for t in tqdm(range(1, n), desc="PatchCore: coreset", disable=not progress,
                  mininterval=1.0, leave=False):
        i = int(torch.argmax(min_dist))
        indices[t] = i
        torch.minimum(min_dist, sq_dist_to(i), out=min_dist)
    return indices


def coreset_indices(features: torch.Tensor, ratio: float, projection_dim: int = 128,
                    seed: int = 0, progress: bool = False) -> torch.Tensor:
    """Sec. 3.2: select ``max(1, int(ratio * N))`` memory entries by greedy coreset on psi(features).

    The start row is drawn at random (seeded), as in the official code; ``ratio >= 1``
    keeps every feature.
    """
    N = len(features)
    if ratio <= 0:
        raise ValueError(f"coreset_ratio must be > 0 (e.g. 0.1 for 10 %); got {ratio}.")
    if ratio >= 1:
        return torch.arange(N)
    z = random_projection(features, projection_dim, seed)
    start = int(torch.randint(N, (1,), generator=torch.Generator().manual_seed(seed)))
    return greedy_coreset(z, max(1, int(ratio * N)), start, progress)


# ----------------------------------------------------------------------------- Sec. 3.3

def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int = 1,
                       max_elements: int = 2 ** 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean ``k``-NN of each query row in ``bank``: (distances, indices), each ``[Q, k]``.

    ``torch.cdist`` on chunks of queries so that no more than ``max_elements`` distances
    (64 MB in float32) exist at once.
    """
    k = min(k, len(bank))
    rows = max(1, max_elements // max(len(bank), 1))
    dist, idx = [], []
    for s in range(0, len(queries), rows):
        d = torch.cdist(queries[s:s + rows], bank)
        top = d.topk(k, dim=1, largest=False)
        dist.append(top.values)
        idx.append(top.indices)
    return torch.cat(dist), torch.cat(idx)


def coverage_radius(features: torch.Tensor, memory: torch.Tensor) -> float:
    """The k-center objective of Sec. 3.2: ``max_m min_{c in memory} ||m - c||``."""
    return float(nearest_neighbours(features, memory)[0].max())


def reweighted_score(patches: torch.Tensor, patch_scores: torch.Tensor, nn_index: torch.Tensor,
                     memory: torch.Tensor, b: int = 9) -> torch.Tensor:
    """Eq. (6) and (7): the image score s of each image.

    ``patches [B, P, D]`` test patch features, ``patch_scores [B, P]`` their distances to
    the nearest memory entry, ``nn_index [B, P]`` which entry. Eq. (6): m_test,* is the
    patch with the largest score, m* its nearest memory entry, s* = ||m_test,* - m*||.
    Eq. (7): ``s = (1 - exp||m_test,* - m*|| / sum_{m in N_b(m*)} exp||m_test,* - m||) s*``
    with N_b(m*) the b nearest neighbours of m* in the memory bank (m* itself among
    them, as in anomalib). Computed stably as ``1 - exp(s* - logsumexp(...))``.
    ``b <= 1`` switches the reweighting off (s = s*, the official code's image score).
    """
    rows = torch.arange(len(patches), device=patches.device)
    star = patch_scores.argmax(1)
    m_test = patches[rows, star]                                  # m_test,*   [B, D]
    s_star = patch_scores[rows, star]                             # s*         [B]
    if b <= 1:
        return s_star
    m_star = memory[nn_index[rows, star]]                         # m*         [B, D]
    _, support = nearest_neighbours(m_star, memory, k=b)          # N_b(m*)    [B, b]
    d_support = (m_test[:, None, :] - memory[support]).norm(dim=-1)   # [B, b]
    weight = 1 - torch.exp(s_star - torch.logsumexp(d_support, dim=1))
    return weight * s_star


# ----------------------------------------------------------------------------- detector

class PatchCore(FeatureDetector):
    """PatchCore detector: ``fit(train)`` then ``predict(images) -> Prediction``.

    After fitting: ``memory [M, D]`` (the coreset), ``n_patches`` (training patches
    before subsampling), ``coreset_s`` (seconds spent in the coreset selection).
    """

    Config = PatchCoreConfig

    def __init__(self, config: PatchCoreConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self.memory = None

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> locally aware patch features ``[B, D, h, w]`` (Sec. 3.1)."""
        c = self.config
        return locally_aware_features(self._extractor()(images), c.patch_size, c.target_dim)

    def fit(self, train, progress: bool = True) -> "PatchCore":
        """Collect every training patch feature, then keep a greedy coreset of them."""
        import time

        c = self.config
        images = images_of(train)
        feats = [self.patch_features(b).permute(0, 2, 3, 1).flatten(0, 2)
                 for b in tqdm(list(batches(images, c.batch_size)), desc="PatchCore: features",
                               disable=not progress)]
        bank = torch.cat(feats)                                        # [N h w, D]
        self.n_patches = len(bank)
        t0 = time.perf_counter()
        idx = coreset_indices(bank, c.coreset_ratio, c.projection_dim, c.seed, progress)
        self.coreset_s = time.perf_counter() - t0
        self.memory = bank[idx.to(bank.device)].contiguous()
        return self

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Nearest-neighbour patch scores -> smoothed map; image score by Eq. (7)."""
        if self.memory is None:
            raise RuntimeError("Call fit(train) before predict(images).")
        phi = self.patch_features(images)                              # [B, D, h, w]
        b, d, h, w = phi.shape
        patches = phi.flatten(2).transpose(1, 2)                       # [B, h w, D]
        dist, idx = nearest_neighbours(patches.reshape(-1, d), self.memory)
        patch_scores, nn_index = dist.view(b, h * w), idx.view(b, h * w)
        scores = reweighted_score(patches, patch_scores, nn_index, self.memory, self.config.b)
        maps = smooth_map(patch_scores.view(b, h, w), tuple(images.shape[-2:]), self.config.sigma)
        return Prediction(scores, maps)


__all__ = ["PatchCore", "PatchCoreConfig", "locally_aware_features", "random_projection",
           "greedy_coreset", "coreset_indices", "nearest_neighbours", "coverage_radius",
           "reweighted_score"]
