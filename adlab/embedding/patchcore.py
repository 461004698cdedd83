"""PatchCore: "Towards Total Recall in Industrial Anomaly Detection" (Roth et al., CVPR 2022).

A memory bank of locally aware patch features of the training images, reduced
by greedy coreset subsampling; a test patch is scored by its distance to the
nearest memory entry. Where the paper leaves a detail open, this file does what
the official code does (amazon-science/patchcore-inspection, commit fcaa92f,
``src/patchcore/``; cited below as file:line):

1. Locally aware patch features (Sec. 3.1): layer2 and layer3 of the backbone;
   every cell's 3 x 3 neighbourhood is unfolded with zero padding
   (``patchcore.py:282-308``, ``PatchMaker.patchify``), layer3's unfolded map is
   upsampled bilinearly to layer2's grid (``patchcore.py:112-135``), each layer's
   flattened C*3*3 patch is adaptive-average-pooled to 1024 values
   (``common.py:145-170``, ``Preprocessing`` / ``MeanMapper``), and the stacked
   layers are pooled again to the target dimension (``common.py:173-183``,
   ``Aggregator``).
2. Coreset-reduced memory bank (Sec. 3.2, Alg. 1): greedy k-center selection on a
   random projection of the features to 128 dims, started from the point farthest
   on average from 10 random anchors (``sampler.py:118-171``,
   ``ApproximateGreedyCoresetSampler``). Only one "distance to the coreset" vector
   is kept, never the N x N distance matrix.
3. Scoring (Sec. 3.3): patch score = squared L2 distance to the nearest memory
   entry (the official search is faiss ``IndexFlatL2``, which returns squared
   distances, ``common.py:43-48``); image score = the largest patch score
   (``patchcore.py:218`` and ``313-319``, ``PatchMaker.score``); the map is the patch
   scores upsampled bilinearly and blurred with a Gaussian, sigma = 4
   (``common.py:186-207``, ``RescaleSegmentor``). Paper profile: the central 224 of
   256 px, as the official run (``--resize 256 --imagesize 224``).

Where this file differs from the official code, and why:

* Layers: chosen by the input size (:func:`patch_layers`) so that the patch grid stays
  near the paper's 28 x 28 (layer2 + layer3 at 224-256 px, as official; layer1 + layer2
  at the quick profile's 128 px). A fixed pair would give 64 x 64 patches at 256 px
  with layer1, 3.1 M patches for 762 images.
* Memory bound (quick profile only): at most ``max_patches`` training patches, drawn
  evenly from every image while the features are extracted, enter the coreset
  selection; the official code keeps all of them (``max_patches=None``, paper profile).
* Each layer is pooled to ``pretrain_dim`` before, not after, the upsampling: the same
  result (linear maps on different axes), less to upsample. Quick profile: 256 / 256
  dimensions instead of 1024 / 1024.
* Eq. (7)'s reweighting of the image score is available (``b > 1``) but off by default,
  as in the official code.
* With ``crop < 1``, ``predict`` returns maps of the whole input (the crop's map, its
  edge values repeated over the border) where the official code evaluates the crop only.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adlab.config import by_profile
from adlab.detector import Prediction, get_state, set_state
from adlab.features import (FeatureDetector, FeatureExtractor, batches, images_of, layer_names,
                            smooth_map)
from adlab.progress import progress as progress_bar


@dataclass
class PatchCoreConfig:
    """PatchCore hyperparameters; defaults follow the active profile."""

    # Sec. 4 (implementation details): WideResNet-50 (ImageNet); ResNet-18 for the quick profile.
    backbone: str = field(default_factory=lambda: by_profile(quick="resnet18",
                                                             paper="wide_resnet50_2"))
    # Sec. 4: hierarchies j = 2 and 3, a 28 x 28 patch grid at 224 px. None: the two consecutive
    # stages whose first grid is nearest 28 x 28 for the input size (patch_layers): layer2 + 3
    # at 224-256 px, layer1 + 2 at 128 px. A tuple fixes the layers.
    layers: tuple | None = None
    # Sec. 3.1 / Sec. 4: neighbourhood size p = 3 (official --patchsize 3).
    patch_size: int = 3
    # Official code: each layer pooled to --pretrain_embed_dimension 1024, then the stacked
    # layers to --target_embed_dimension 1024 (sample_training.sh, IM224 baseline). Quick:
    # 256 / 256, 4x less memory and search time on a CPU (and, with random features, higher
    # image AUROC on the synthetic categories than 1024 / 1024).
    pretrain_dim: int = field(default_factory=lambda: by_profile(quick=256, paper=1024))
    target_dim: int = field(default_factory=lambda: by_profile(quick=256, paper=1024))
    # Sec. 4 / Table 1: coreset percentages 25 %, 10 % and 1 % (official IM224 baseline: -p 0.1);
    # quick: PatchCore-1 %, about 10x less CPU time in the coreset and the search.
    coreset_ratio: float = field(default_factory=lambda: by_profile(quick=0.01, paper=0.1))
    # Sec. 3.2: random projection dimension for the coreset (official: 128, sampler.py:44).
    projection_dim: int = 128
    # Official ApproximateGreedyCoresetSampler: 10 random starting points (sampler.py:123).
    anchors: int = 10
    # Our bound (not in the paper): at most this many training patches enter the coreset,
    # drawn evenly from every image while features are extracted. None keeps all (official).
    max_patches: int | None = field(default_factory=lambda: by_profile(quick=100_000, paper=None))
    # Official run: images resized to 256, centre crop 224 (--resize 256 --imagesize 224;
    # datasets/mvtec.py:75-76): the central 224/256 of each side. 1.0: no crop.
    crop: float = field(default_factory=lambda: by_profile(quick=1.0, paper=224 / 256))
    # Eq. (7): size b of N_b(m*). The official code does not reweight (image score = the
    # largest patch score), which b = 1 reproduces; anomalib uses b = 9.
    b: int = 1
    # Sec. 3.3: the map is smoothed by a Gaussian of kernel width sigma = 4.
    sigma: float = 4.0
    # None: the profile's choice (pretrained in the paper profile, random init in quick).
    pretrained: bool | None = None
    seed: int = 0               # projection, anchors, patch subsample, random-init backbone
    batch_size: int = 16        # feature extraction batch (memory only)


# ----------------------------------------------------------------------------- Sec. 3.1

def patch_layers(backbone: str, size: int, grid: int = 28) -> tuple[str, str]:
    """The two consecutive feature stages whose first grid side is nearest ``grid``.

    The paper's layer2 + layer3 of a ResNet give 28 x 28 at 224 px (stride 8). Choosing by
    stride keeps that grid for other image sizes: at 128 px layer1 + layer2 (32 x 32), at
    256 px layer2 + layer3 (32 x 32), at 512 px layer3 + layer4. The stem (index 0) is skipped.
    """
    from adlab.features import _timm

    names = layer_names(backbone)
    with torch.device("meta"):
        model = _timm().create_model(backbone.split(".")[0], features_only=True)
    strides = model.feature_info.reduction()
    i = min(range(1, len(names) - 1), key=lambda j: abs(math.log(size / strides[j] / grid)))
    return names[i], names[i + 1]


def unfold_neighbourhoods(feature: torch.Tensor, p: int = 3) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, C * p * p, h, w]``: each cell's p x p neighbourhood, zero padded.

    Channel-major order (c, dy, dx), as ``torch.nn.Unfold`` and the official ``PatchMaker``.
    """
    b, c, h, w = feature.shape
    return F.unfold(feature, p, padding=p // 2).view(b, c * p * p, h, w)


def adaptive_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Adaptive average pooling of the last axis of ``[N, D]`` to ``dim`` values (MeanMapper)."""
    return F.adaptive_avg_pool1d(x.unsqueeze(1), dim).squeeze(1)


def locally_aware_features(features: list[torch.Tensor], p: int = 3, pretrain_dim: int = 1024,
                           target_dim: int = 1024) -> torch.Tensor:
    """Sec. 3.1: neighbourhood-aggregated, multi-layer patch features ``[B, target_dim, h, w]``.

    As the official code: each map's p x p neighbourhoods are unfolded (zero padding), each
    layer's C*p*p vector is pooled to ``pretrain_dim`` (so every layer weighs the same),
    deeper layers are upsampled bilinearly to the first map's grid, and the layers, side by
    side, are pooled to ``target_dim``. The official code upsamples before pooling; pooling
    (over channels) and upsampling (over positions) are linear maps on different axes, so
    the order does not change the result, and pooling first upsamples C*p*p / pretrain_dim
    times fewer values (4.5x for ResNet-18's layer2 at 256 dims).
    """
    size = features[0].shape[-2:]
    per_layer = []
    for f in features:
        u = unfold_neighbourhoods(f, p)                                  # [B, C p p, h_l, w_l]
        b, _, h, w = u.shape
        v = adaptive_mean(u.permute(0, 2, 3, 1).flatten(0, 2), pretrain_dim)     # MeanMapper
        v = v.view(b, h, w, pretrain_dim).permute(0, 3, 1, 2)            # [B, pretrain_dim, h_l, w_l]
        if v.shape[-2:] != size:
            v = F.interpolate(v, size=size, mode="bilinear", align_corners=False)
        per_layer.append(v)
    phi = torch.cat(per_layer, dim=1).permute(0, 2, 3, 1)                # [B, h, w, L pretrain_dim]
    phi = adaptive_mean(phi.flatten(0, 2), target_dim)                   # Aggregator
    return phi.view(b, *size, target_dim).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- Sec. 3.2

def random_projection(x: torch.Tensor, k: int = 128, seed: int = 0) -> torch.Tensor:
    """Sec. 3.2: random linear projection ``psi`` of ``[N, D]`` features to ``k`` dims.

    As the official sampler (``sampler.py:52-60``: a bias-free ``torch.nn.Linear(D, k)`` with
    PyTorch's default init): entries uniform in ``[-1/sqrt(D), 1/sqrt(D)]``, seeded here.
    Distances shrink by one common factor, which does not change the greedy choices.
    """
    if x.shape[1] == k:
        return x
    bound = 1 / x.shape[1] ** 0.5
    g = torch.Generator().manual_seed(seed)
    psi = torch.rand(x.shape[1], k, generator=g) * (2 * bound) - bound
    return x @ psi.to(device=x.device, dtype=x.dtype)


def distances_to(z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[N, R]`` from every row of ``z`` to ``rows [R, k]``."""
    sq = (z * z).sum(1, keepdim=True) - 2 * z @ rows.t() + (rows * rows).sum(1)
    return sq.clamp_min_(0).sqrt_()


def greedy_coreset(z: torch.Tensor, n: int, min_dist: torch.Tensor) -> torch.Tensor:
    """Alg. 1 (greedy k-center): indices of ``n`` rows of ``z [N, k]``.

    ``min_dist [N]`` is each row's distance to the coreset before the first choice. Each
    step adds ``argmax min_dist`` and lowers ``min_dist`` to the distance to the new
    centre: O(N) memory, O(N k) time per step.
    """
    if not 0 < n <= len(z):
        raise ValueError(f"coreset size must be in 1..{len(z)}; got {n}.")
    min_dist = min_dist.clone()
    sq_norm = (z * z).sum(1)
    z_t = z.t().contiguous()                        # [k, N]: row-vector @ matrix is the fast BLAS path
    indices = torch.empty(n, dtype=torch.long)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # each step is a few length-N vector operations: waking more
    try:                            # threads costs more than it saves (10x on a busy 2-core CPU)
        for t in range(n):
            i = int(torch.argmax(min_dist))
            indices[t] = i
            dist_i = (sq_norm - 2 * (z[i] @ z_t) + sq_norm[i]).clamp_min_(0).sqrt_()   # ||z_m - z_i||
            torch.minimum(min_dist, dist_i, out=min_dist)
    finally:
        torch.set_num_threads(threads)
    return indices


def coreset_indices(features: torch.Tensor, ratio: float, projection_dim: int = 128,
                    anchors: int = 10, seed: int = 0) -> torch.Tensor:
    """Sec. 3.2: ``max(1, int(ratio * N))`` memory entries by greedy coreset on psi(features).

    The start is the official ``ApproximateGreedyCoresetSampler``'s (``sampler.py:140-153``):
    ``anchors`` distinct random rows, and ``min_dist`` starts as each row's *mean* distance
    to them, so the first choice is the row farthest on average from the anchors (the
    anchors themselves do not join the coreset). ``ratio >= 1`` keeps every feature.
    """
    N = len(features)
    if ratio <= 0:
        raise ValueError(f"coreset_ratio must be > 0 (e.g. 0.1 for 10 %); got {ratio}.")
    if ratio >= 1:
        return torch.arange(N)
    z = random_projection(features, projection_dim, seed)
    g = torch.Generator().manual_seed(seed)
    start = torch.randperm(N, generator=g)[:min(anchors, N)].to(z.device)
    return greedy_coreset(z, max(1, int(ratio * N)), distances_to(z, z[start]).mean(1))


# ----------------------------------------------------------------------------- Sec. 3.3

def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int = 1,
                       max_elements: int = 2 ** 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared-L2 ``k``-NN of each query row in ``bank``: (distances, indices), each ``[Q, k]``.

    Squared distances as faiss ``IndexFlatL2`` returns them (the official scorer). Chunks
    of queries so that no more than ``max_elements`` distances (64 MB) exist at once.
    """
    k = min(k, len(bank))
    rows = max(1, max_elements // max(len(bank), 1))
    dist, idx = [], []
    for s in range(0, len(queries), rows):
        d = torch.cdist(queries[s:s + rows], bank).square_()
        top = d.topk(k, dim=1, largest=False)
        dist.append(top.values)
        idx.append(top.indices)
    return torch.cat(dist), torch.cat(idx)


def coverage_radius(features: torch.Tensor, memory: torch.Tensor) -> float:
    """The k-center objective of Sec. 3.2: ``max_m min_{c in memory} ||m - c||`` (Euclidean)."""
    return float(nearest_neighbours(features, memory)[0].max().sqrt())


def reweighted_score(patches: torch.Tensor, patch_scores: torch.Tensor, nn_index: torch.Tensor,
                     memory: torch.Tensor, b: int = 9) -> torch.Tensor:
    """Eq. (6) and (7): the image score s of each image.

    ``patches [B, P, D]`` test patch features, ``patch_scores [B, P]`` their scores,
    ``nn_index [B, P]`` their nearest memory entry. Eq. (6): m_test,* is the patch with the
    largest score, m* its nearest memory entry, s* its score. Eq. (7):
    ``s = (1 - exp||m_test,* - m*|| / sum_{m in N_b(m*)} exp||m_test,* - m||) s*`` with
    N_b(m*) the b nearest neighbours of m* in the memory bank (m* among them, as in
    anomalib); the weight uses Euclidean distances as the paper writes them, computed
    stably as ``1 - exp(d* - logsumexp(...))``. ``b <= 1``: s = s* (the official code).
    """
    rows = torch.arange(len(patches), device=patches.device)
    star = patch_scores.argmax(1)
    s_star = patch_scores[rows, star]                             # s*         [B]
    if b <= 1:
        return s_star
    m_test = patches[rows, star]                                  # m_test,*   [B, D]
    m_star = memory[nn_index[rows, star]]                         # m*         [B, D]
    _, support = nearest_neighbours(m_star, memory, k=b)          # N_b(m*)    [B, b]
    d_support = (m_test[:, None, :] - memory[support]).norm(dim=-1)   # [B, b]
    d_star = (m_test - m_star).norm(dim=-1)
    weight = 1 - torch.exp(d_star - torch.logsumexp(d_support, dim=1))
    return weight * s_star


# ----------------------------------------------------------------------------- detector

def center_crop(images: torch.Tensor, fraction: float) -> tuple[torch.Tensor, tuple[int, int]]:
    """The central ``fraction`` of each side (e.g. 224 of 256 px) and its top-left corner."""
    H, W = images.shape[-2:]
    h, w = round(H * fraction), round(W * fraction)
    top, left = (H - h) // 2, (W - w) // 2
    return images[..., top:top + h, left:left + w], (top, left)


class PatchCore(FeatureDetector):
    """PatchCore detector: ``fit(train)`` then ``predict(images) -> Prediction``.

    After fitting: ``memory [M, D]`` (the coreset), ``n_patches`` (training patches),
    ``n_bank`` (those that entered the coreset selection, at most ``max_patches``),
    ``coreset_s`` (seconds spent in the coreset selection).
    """

    Config = PatchCoreConfig

    def __init__(self, config: PatchCoreConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self.memory = None

    def _extractor(self, size: int | None = None) -> FeatureExtractor:
        if self.extractor is None:
            c = self.config
            layers = c.layers or patch_layers(c.backbone, size)
            self.extractor = FeatureExtractor(c.backbone, layers, c.pretrained,
                                              seed=c.seed).to(self.device)
        return self.extractor

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> locally aware patch features ``[B, D, h, w]`` (Sec. 3.1)."""
        c = self.config
        feats = self._extractor(min(images.shape[-2:]))(images)
        return locally_aware_features(feats, c.patch_size, c.pretrain_dim, c.target_dim)

    def fit(self, train, progress: bool = True) -> "PatchCore":
        """Collect the training patch features (at most ``max_patches``), keep a greedy coreset.

        With N images of P patches each and ``N P > max_patches``, each image contributes
        ``max_patches // N`` patches drawn at random (seeded) as its features are computed,
        so memory and coreset time stay bounded whatever the image size and count.
        """
        c = self.config
        images, _ = center_crop(images_of(train), c.crop)
        g = torch.Generator().manual_seed(c.seed)
        bank, self.n_patches = [], 0
        for batch in progress_bar(list(batches(images, c.batch_size)), desc="PatchCore: features",
                                  disable=not progress):
            phi = self.patch_features(batch).flatten(2).transpose(1, 2)      # [B, P, D]
            self.n_patches += phi.shape[0] * phi.shape[1]
            if c.max_patches is not None and len(images) * phi.shape[1] > c.max_patches:
                keep = max(1, c.max_patches // len(images))
                pick = torch.stack([torch.randperm(phi.shape[1], generator=g)[:keep]
                                    for _ in range(len(phi))]).to(phi.device)
                phi = phi.gather(1, pick[..., None].expand(-1, -1, phi.shape[2]))
            bank.append(phi.flatten(0, 1))
        bank = torch.cat(bank)                                               # [N_bank, D]
        self.n_bank = len(bank)
        t0 = time.perf_counter()
        idx = coreset_indices(bank, c.coreset_ratio, c.projection_dim, c.anchors, c.seed)
        self.coreset_s = time.perf_counter() - t0
        self.memory = bank[idx.to(bank.device)].contiguous()
        return self

    def state_dict(self) -> dict:
        """Backbone weights and layers, the memory bank (see ``adlab.detector.save_detector``)."""
        state = get_state(self, ("extractor", "memory", "n_patches", "n_bank", "coreset_s"))
        return {**state, "layers": tuple(self.extractor.layers)}

    def load_state_dict(self, state: dict) -> None:
        c = self.config
        self.extractor = FeatureExtractor(c.backbone, tuple(state["layers"]), c.pretrained,
                                          seed=c.seed).to(self.device)
        set_state(self, {k: v for k, v in state.items() if k != "layers"})

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Nearest-neighbour patch scores -> smoothed map; image score = the largest patch score.

        With ``crop < 1`` the map is computed on the centre crop, as the official code, and
        its edge values are repeated over the border so that ``maps`` cover the input.
        """
        if self.memory is None:
            raise RuntimeError("Call fit(train) before predict(images).")
        crop, (top, left) = center_crop(images, self.config.crop)
        phi = self.patch_features(crop)                                # [B, D, h, w]
        b, d, h, w = phi.shape
        patches = phi.flatten(2).transpose(1, 2)                       # [B, h w, D]
        dist, idx = nearest_neighbours(patches.reshape(-1, d), self.memory)
        patch_scores, nn_index = dist.view(b, h * w), idx.view(b, h * w)
        scores = reweighted_score(patches, patch_scores, nn_index, self.memory, self.config.b)
        maps = smooth_map(patch_scores.view(b, h, w), crop.shape[-2:], self.config.sigma)
        H, W = images.shape[-2:]
        maps = F.pad(maps[:, None], (left, W - left - crop.shape[-1], top, H - top - crop.shape[-2]),
                     mode="replicate")[:, 0]
        return Prediction(scores, maps)


__all__ = ["PatchCore", "PatchCoreConfig", "patch_layers", "unfold_neighbourhoods",
           "adaptive_mean", "locally_aware_features", "random_projection", "distances_to",
           "greedy_coreset", "coreset_indices", "nearest_neighbours", "coverage_radius",
           "reweighted_score", "center_crop"]
