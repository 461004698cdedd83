"""Normalizing flows from scratch: coupling layers, permutations, ActNorm, exact log-det."""
from adlab.flows.actnorm import ActNorm
from adlab.flows.core import FlowLayer, SequentialFlow, sum_except_batch
from adlab.flows.coupling import (CLAMP_ACTIVATIONS, AffineCoupling, GlowCoupling, conv_subnet,
                                  mlp_subnet, soft_clamp)
from adlab.flows.likelihood import bits_per_dim, log_likelihood, nll_nats, standard_normal_log_prob
from adlab.flows.permute import InvertibleConv1x1, RandomPermutation

__all__ = ["ActNorm", "FlowLayer", "SequentialFlow", "sum_except_batch", "CLAMP_ACTIVATIONS",
           "AffineCoupling", "GlowCoupling", "conv_subnet", "mlp_subnet", "soft_clamp",
           "bits_per_dim", "log_likelihood", "nll_nats", "standard_normal_log_prob",
           "InvertibleConv1x1", "RandomPermutation"]
