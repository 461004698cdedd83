"""Channel mixing between couplings: a fixed random permutation and Glow's invertible 1x1 convolution.

A coupling leaves half of the channels unchanged, so consecutive couplings must see
the channels in a different order. RealNVP alternates the halves (Sec. 3.5); Glow
(Kingma & Dhariwal 2018, Sec. 3.2) compares a fixed random permutation with a
learned invertible 1x1 convolution, i.e. a learned ``C x C`` matrix applied at every
position, and parametrises it by its LU decomposition so its log-determinant costs
``O(C)``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from adlab.flows.core import FlowLayer, check_features, spatial_size


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


class RandomPermutation(FlowLayer):
    """Permute dimension 1 by a fixed random permutation (Glow's "shuffle" baseline; DifferNet, CS-Flow).

    A permutation matrix has ``|det| = 1``, so ``log|det J| = 0``. ``seed`` fixes the
    permutation (CS-Flow seeds block ``k`` with ``k``); ``perm`` gives it explicitly
    (e.g. ``torch.arange(C).flip(0)`` for RealNVP's alternation).
    """

    def __init__(self, channels: int, seed: int | None = None, perm: Tensor | None = None):
        super().__init__()
        if perm is None:
            perm = torch.randperm(channels, generator=_generator(seed))
        perm = torch.as_tensor(perm, dtype=torch.long)
        if sorted(perm.tolist()) != list(range(channels)):
            raise ValueError(f"perm must be a permutation of 0..{channels - 1}, got {perm.tolist()}.")
        self.channels = channels
        self.register_buffer("perm", perm)
        self.register_buffer("perm_inv", torch.argsort(perm))

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(x, self.channels, type(self).__name__)
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        check_features(z, self.channels, type(self).__name__)
        return z[:, self.perm_inv]


class InvertibleConv1x1(FlowLayer):
    """Glow's invertible 1x1 convolution with the LU parametrisation (Sec. 3.2, Table 1).

    ``z = W x`` at every position, with

        W = P L (U + diag(sign(s) * exp(log|s|)))

    ``P`` a fixed permutation, ``L`` unit lower-triangular, ``U`` strictly upper-triangular
    (both learned), ``s`` the learned diagonal. Then ``log|det W| = sum log|s|`` and,
    applied at ``h * w`` positions, ``log|det J| = h * w * sum log|s|`` (Table 1).
    Initialised, as in Glow, from a random rotation matrix (QR of a Gaussian matrix).
    For vectors ``[B, D]`` it is the invertible linear map ``z = W x`` (``h * w = 1``).
    """

    def __init__(self, channels: int, seed: int | None = None):
        super().__init__()
        self.channels = channels
        g = _generator(seed)
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=g, dtype=torch.float64))
        p, l, u = torch.linalg.lu(q)  # q = P L U
        s = torch.diagonal(u)
        self.register_buffer("P", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.L = nn.Parameter(torch.tril(l, diagonal=-1).float())
        self.U = nn.Parameter(torch.triu(u, diagonal=1).float())
        self.log_s = nn.Parameter(torch.log(torch.abs(s)).float())

    def lower(self) -> Tensor:
        """Unit lower-triangular ``L`` (the diagonal is fixed to 1)."""
        eye = torch.eye(self.channels, dtype=self.L.dtype, device=self.L.device)
        return torch.tril(self.L, diagonal=-1) + eye

    def upper(self) -> Tensor:
        """Upper-triangular ``U + diag(s)``."""
        return torch.triu(self.U, diagonal=1) + torch.diag(self.sign_s * torch.exp(self.log_s))

    def weight(self) -> Tensor:
        """``W = P L (U + diag(s))`` (Glow Sec. 3.2)."""
        return self.P @ self.lower() @ self.upper()

    def weight_inverse(self) -> Tensor:
        """``W^-1 = (U + diag(s))^-1 L^-1 P^T`` by two triangular solves."""
        eye = torch.eye(self.channels, dtype=self.L.dtype, device=self.L.device)
        l_inv = torch.linalg.solve_triangular(self.lower(), eye, upper=False, unitriangular=True)
        u_inv = torch.linalg.solve_triangular(self.upper(), eye, upper=True)
        return u_inv @ l_inv @ self.P.T

    @staticmethod
    def _mix(w: Tensor, x: Tensor) -> Tensor:
        """``W`` applied to dimension 1 at every position (a 1x1 convolution for maps)."""
        return torch.einsum("ij,bj...->bi...", w, x)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(x, self.channels, type(self).__name__)
        logdet = spatial_size(x) * self.log_s.sum()
        return self._mix(self.weight(), x), logdet.expand(x.shape[0]).clone()

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        check_features(z, self.channels, type(self).__name__)
        return self._mix(self.weight_inverse(), z)
