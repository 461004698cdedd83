"""adlab.flows.allinone.AllInOneBlock against FrEIA's AllInOneBlock (the block FastFlow and CFlow use)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from adlab.flows.allinone import AllInOneBlock, mixing_matrix
from adlab.flows.coupling import conv_subnet, mlp_subnet

Fm = pytest.importorskip("FrEIA.modules")


def _freia_block(shape, cond_channels, subnet, clamp, soft):
    dims_c = [(cond_channels, *shape[1:])] if cond_channels else []
    return Fm.AllInOneBlock([tuple(shape)], dims_c=dims_c, subnet_constructor=subnet,
                            affine_clamping=clamp, permute_soft=soft)


@pytest.mark.parametrize("shape, cond, soft", [
    ((7, 5, 6), 0, False),      # FastFlow: maps, hard permutation, odd channel count
    ((9,), 4, True),            # CFlow: fibres [N, C] with a positional condition, rotation
    ((6, 4, 4), 3, True),
])
def test_same_z_and_logdet_as_freia(shape, cond, soft):
    torch.manual_seed(0)
    subnet = conv_subnet(hidden_ratio=1.0) if len(shape) == 3 else mlp_subnet()
    ref = _freia_block(shape, cond, subnet, clamp=1.9, soft=soft)
    ours = AllInOneBlock(shape[0], subnet, cond_channels=cond, clamp=1.9, permute_soft=soft)
    ours.subnet.load_state_dict(ref.subnet.state_dict())
    with torch.no_grad():
        # a trained-looking global affine, so that its log-det term is not zero
        ref.global_scale.add_(0.3 * torch.randn_like(ref.global_scale))
        ref.global_offset.add_(torch.randn_like(ref.global_offset))
        ours.global_scale.copy_(ref.global_scale.flatten())
        ours.global_offset.copy_(ref.global_offset.flatten())
        w = ref.w_perm.reshape(shape[0], shape[0])
        ours.w.copy_(w)
        ours.w_inv.copy_(ref.w_perm_inv.reshape(shape[0], shape[0]))
        # larger subnet outputs, so the tanh clamp is exercised beyond its linear range
        for p in ours.subnet.parameters():
            p.mul_(8.0)
        for p in ref.subnet.parameters():
            p.mul_(8.0)
    x = torch.randn(3, *shape)
    c = torch.randn(3, cond, *shape[1:]) if cond else None
    (z_ref,), ld_ref = ref([x], c=[c] if cond else [])
    z, ld = ours(x, c)
    assert torch.allclose(z, z_ref, atol=1e-5)
    assert torch.allclose(ld, ld_ref, atol=1e-4, rtol=1e-5)
    (x_ref,), _ = ref([z_ref], c=[c] if cond else [], rev=True)
    assert torch.allclose(ours.inverse(z, c), x_ref, atol=1e-5)


def test_inverse_and_logdet_equal_autograd_jacobian_float64():
    torch.manual_seed(1)
    block = AllInOneBlock(5, mlp_subnet(), cond_channels=2, clamp=2.0, permute_soft=True).double()
    with torch.no_grad():
        block.global_scale.add_(torch.randn(5, dtype=torch.float64))
        for p in block.subnet.parameters():
            p.mul_(5.0)
    x, c = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    z, ld = block(x, c)
    assert torch.allclose(block.inverse(z, c), x, atol=1e-10)
    for i in range(4):
        jac = jacobian(lambda v: block(v[None], c[i:i + 1])[0][0], x[i])
        assert torch.allclose(ld[i], torch.linalg.slogdet(jac)[1], atol=1e-8)


def test_block_starts_near_identity_up_to_the_mixing():
    # FrEIA initialises the global scale to 1 and the offset to 0: before the mixing the block
    # only changes x2 through the (bounded) coupling.
    block = AllInOneBlock(4, mlp_subnet(), clamp=2.0, seed=3)
    assert torch.allclose(block.scale(), torch.ones(4))
    perm = mixing_matrix(4, soft=False, seed=3)
    assert torch.equal(perm.sum(0), torch.ones(4)) and torch.equal(perm.sum(1), torch.ones(4))
    rot = mixing_matrix(6, soft=True, seed=3)
    assert torch.allclose(rot @ rot.T, torch.eye(6), atol=1e-6)


def test_wrong_channels_and_missing_condition_are_clear():
    block = AllInOneBlock(4, mlp_subnet(), cond_channels=2)
    with pytest.raises(ValueError, match="4 channels"):
        block(torch.randn(2, 3), torch.randn(2, 2))
    with pytest.raises(ValueError, match="needs cond"):
        block(torch.randn(2, 4))
    with pytest.raises(ValueError, match="at least 2"):
        AllInOneBlock(1, mlp_subnet())
