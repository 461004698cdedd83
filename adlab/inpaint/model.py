"""The Inpainting Transformer network and its loss (Pirnay & Chai, "Inpainting Transformer for
Anomaly Detection", ICIAP 2021, arXiv:2104.13897). There is no official code.

The image is cut into ``K x K`` patches (a grid of ``G_h x G_w``). A *window* of ``L x L``
neighbouring patches is taken; one patch of it is hidden, and the network predicts that
patch's pixels from the other ``L^2 - 1`` (Sec. 3):

1. Patch embedding: each patch flattened (``3 K^2`` values) and mapped linearly to ``D``; the
   hidden patch's embedding is *replaced* by a learned inpaint token, so its pixels cannot
   reach the output (:meth:`InTraNet.embed`).
2. Position embedding: learned, one vector per patch position of the *whole image's* grid
   (``G_h G_w`` vectors), so a window knows where in the image it lies ("global").
   ``position="local"`` (our switch for the ablation) learns ``L^2`` vectors by position
   inside the window instead.
3. ``n`` pre-norm transformer blocks (:class:`Block`): ``x + Attn(LN(x))``, then
   ``x + MLP(LN(x))`` with an MLP of ``4 D`` and GELU. The attention is the paper's
   multihead *feature* self-attention (:class:`MFSA`): queries and keys come from small MLPs
   (a non-linear map of the tokens), values from a linear map; ``attention="msa"`` is plain
   multi-head self-attention (linear queries, keys and values), the ablation.
4. Long residual connections between early and late blocks. The paper adds them, U-Net
   style, but (as far as our notes of the paper go) does not say exactly which blocks are
   joined or how. Our choice: with ``n`` blocks, the output of block ``i`` (``i < n // 2``) is
   *added* to the input of block ``n - 1 - i`` (13 blocks: 0->12, 1->11, ..., 5->7; block 6,
   the middle, has none). Addition keeps ``D`` and needs no extra weights.
5. Head: final LayerNorm, then a linear map of the hidden position's token to its ``3 K^2``
   pixels.

Loss (Sec. 3, training): ``L2 + alpha * MS-GMS + beta * SSIM`` on the hidden patch,
``alpha = beta = 0.01`` as we read the paper (the weights are in :class:`InTraLoss`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adlab.inpaint.similarity import msgms_loss, ssim_loss


def patchify(images: Tensor, k: int) -> Tensor:
    """``[B, C, H, W] -> [B, H/K, W/K, C K K]``: the grid of flattened ``K x K`` patches."""
    b, c, h, w = images.shape
    if h % k or w % k:
        raise ValueError(f"The image side ({h} x {w}) must be a multiple of the patch size K = {k}; "
                         "resize the images or change patch_size.")
    x = images.reshape(b, c, h // k, k, w // k, k)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, h // k, w // k, c * k * k)


def unpatchify(patches: Tensor, k: int, channels: int = 3) -> Tensor:
    """The inverse of :func:`patchify`: ``[B, G_h, G_w, C K K] -> [B, C, G_h K, G_w K]``."""
    b, gh, gw, _ = patches.shape
    x = patches.reshape(b, gh, gw, channels, k, k).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, gh * k, gw * k)


def sincos_2d(height: int, width: int, dim: int) -> Tensor:
    """2-D sine-cosine position codes ``[height * width, dim]`` (row-major), as MAE's: the first
    half of the dimensions encodes the row, the second the column, each with ``dim / 4``
    frequencies ``1 / 10000^(i / (dim / 4))``.

    Only the *initial value* of the learned position embedding (the paper learns it and does not
    say how it starts): with these codes the dot product of two positions depends on their
    offset, so a window's tokens can attend to their neighbours from the first step. Our tests
    on the synthetic data: with the usual small random start (std 0.02) the quick model stayed
    at the "predict the mean colour" plateau for its whole budget.
    """
    if dim % 4:
        raise ValueError(f"The embedding size D = {dim} must be divisible by 4 (2-D sine-cosine "
                         "position codes); change dim.")
    freq = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        angle = pos[:, None].double() * freq[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


class MFSA(nn.Module):
    """Multihead (feature) self-attention over the window's tokens ``[B, N, D]``.

    ``feature=True`` (MFSA, the paper's): ``Q = MLP_q(x)``, ``K = MLP_k(x)``,
    ``V = x W_v``, each MLP ``Linear(D, D) - GELU - Linear(D, D)`` (the hidden width is our
    choice: the paper's MLPs are "small" and it does not give their width as far as we read);
    ``feature=False``: plain MSA, ``Q, K, V`` all linear. Then, per head of ``D / h``
    dimensions, ``softmax(Q K^T / sqrt(D / h)) V``, heads concatenated, a linear output map.
    """

    def __init__(self, dim: int, heads: int, feature: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"The embedding size D = {dim} must be divisible by the number of heads "
                             f"({heads}); change dim or heads.")
        self.heads, self.feature = heads, feature

        def query_key_map():
            return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)) if feature \
                else nn.Linear(dim, dim)

        self.q, self.k, self.v = query_key_map(), query_key_map(), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.last_attention: Tensor | None = None   # [B, heads, N, N] when keep_attention

    def forward(self, x: Tensor, keep_attention: bool = False) -> Tensor:
        b, n, d = x.shape
        split = lambda t: t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attn = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        if keep_attention:
            self.last_attention = attn.detach()
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))`` (MLP 4 D, GELU)."""

    def __init__(self, dim: int, heads: int, feature: bool = True, mlp_ratio: int = 4):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), MFSA(dim, heads, feature)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor, keep_attention: bool = False) -> Tensor:
        x = x + self.attn(self.norm1(x), keep_attention)
        return x + self.mlp(self.norm2(x))


class InTraNet(nn.Module):
    """Inpaint the hidden patch of windows of an image's patch grid.

    ``forward(grid, top, left, hidden) -> [B, 3 K^2]``: ``grid`` is :func:`patchify` of the
    images ``[B, G_h, G_w, 3 K^2]``; the window of image ``b`` is the ``L x L`` patches from
    row ``top[b]``, column ``left[b]``; ``hidden[b]`` (0 .. L^2 - 1, row-major) is the patch
    to inpaint. ``image[b]`` (optional) picks the grid row of window ``b``, so many windows
    of one image need not copy its grid (default: window ``b`` of image ``b``).
    """

    def __init__(self, grid_size: tuple[int, int], patch_size: int = 16, window: int = 7,
                 dim: int = 512, depth: int = 13, heads: int = 8, attention: str = "mfsa",
                 long_residual: bool = True, position: str = "global", channels: int = 3):
        super().__init__()
        if attention not in ("mfsa", "msa"):
            raise ValueError(f"attention must be 'mfsa' or 'msa'; got {attention!r}.")
        if position not in ("global", "local"):
            raise ValueError(f"position must be 'global' or 'local'; got {position!r}.")
        gh, gw = grid_size
        if window > min(gh, gw):
            raise ValueError(f"The window ({window} x {window} patches) does not fit the image's grid "
                             f"of {gh} x {gw} patches; lower window or patch_size.")
        self.grid_size, self.patch_size, self.window = (gh, gw), patch_size, window
        self.position, self.long_residual = position, long_residual
        pixels = channels * patch_size ** 2
        self.embed_patch = nn.Linear(pixels, dim)
        self.inpaint_token = nn.Parameter(torch.zeros(dim))
        side = (gh, gw) if position == "global" else (window, window)
        self.pos_embed = nn.Parameter(sincos_2d(*side, dim))
        nn.init.trunc_normal_(self.inpaint_token, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, attention == "mfsa") for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, pixels)

    def window_indices(self, top: Tensor, left: Tensor) -> tuple[Tensor, Tensor]:
        """Grid rows and columns ``[B, L^2]`` (row-major) of each window."""
        offsets = torch.arange(self.window, device=top.device)
        rows = (top[:, None] + offsets)[:, :, None].expand(-1, -1, self.window)
        cols = (left[:, None] + offsets)[:, None, :].expand(-1, self.window, -1)
        return rows.reshape(len(top), -1), cols.reshape(len(top), -1)

    def embed(self, grid: Tensor, top: Tensor, left: Tensor, hidden: Tensor,
              image: Tensor | None = None) -> Tensor:
        """Tokens ``[B, L^2, D]``: patch embeddings, the hidden one replaced by the inpaint token,
        plus the position embedding (global grid position, or position in the window)."""
        rows, cols = self.window_indices(top, left)
        image = torch.arange(len(top), device=grid.device) if image is None else image
        patches = grid[image[:, None], rows, cols]                                   # [B, L^2, P]
        is_hidden = torch.arange(self.window ** 2, device=grid.device)[None] == hidden[:, None]
        tokens = torch.where(is_hidden[..., None], self.inpaint_token, self.embed_patch(patches))
        if self.position == "global":
            return tokens + self.pos_embed[rows * self.grid_size[1] + cols]
        return tokens + self.pos_embed[None]

    def forward(self, grid: Tensor, top: Tensor, left: Tensor, hidden: Tensor,
                image: Tensor | None = None, keep_attention: bool = False) -> Tensor:
        x = self.embed(grid, top, left, hidden, image)
        n = len(self.blocks)
        skips = []
        for i, block in enumerate(self.blocks):
            if self.long_residual and i >= n - n // 2:      # late block: add its early partner
                x = x + skips[n - 1 - i]
            x = block(x, keep_attention)
            if self.long_residual and i < n // 2:           # early block: keep its output
                skips.append(x)
        x = self.norm(x[torch.arange(len(x), device=x.device), hidden])
        return self.head(x)


class InTraLoss(nn.Module):
    """``L2 + alpha * L_MSGMS + beta * L_SSIM`` between true and inpainted patches ``[B, 3, K, K]``.

    ``L2`` is the mean squared error, ``L_MSGMS`` the mean of ``1 - GMS`` over 4 scales
    (:func:`~adlab.inpaint.similarity.msgms_loss`), ``L_SSIM = 1 - mean SSIM``
    (:func:`~adlab.inpaint.similarity.ssim_loss`). ``alpha = beta = 0.01``: the paper's
    weights as we read its training section.
    """

    def __init__(self, alpha: float = 0.01, beta: float = 0.01, scales: int = 4):
        super().__init__()
        self.alpha, self.beta, self.scales = alpha, beta, scales

    def forward(self, target: Tensor, inpainted: Tensor) -> Tensor:
        return (F.mse_loss(inpainted, target) + self.alpha * msgms_loss(target, inpainted, self.scales)
                + self.beta * ssim_loss(target, inpainted))


__all__ = ["sincos_2d", "patchify", "unpatchify", "MFSA", "Block", "InTraNet", "InTraLoss"]
