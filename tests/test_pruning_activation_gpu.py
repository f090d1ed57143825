"""CUDA: the same masks as on CPU (device-independent tie-breaking); sparse linear on GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dgc.activation import SparseInputLinear, TopKActivation
from dgc.pruning import NM, BankBalanced, Block, Channel, Unstructured

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("granularity", [Unstructured(), Unstructured(scope="global"),
                                         Block(block_shape=(2, 4)), BankBalanced(bank_size=8),
                                         NM(), Channel()], ids=type)
def test_masks_identical_on_cpu_and_cuda(granularity):
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(64, 32, generator=g), "b": torch.randn(16, 8, 3, 3, generator=g)}
    weights["a"][:, :8] = 0.5  # many exact ties
    s = 0.5 if isinstance(granularity, NM) else 0.7
    cpu = granularity.compute_masks(weights, s)
    gpu = granularity.compute_masks({k: v.cuda() for k, v in weights.items()}, s)
    for k in weights:
        assert gpu[k].is_cuda and torch.equal(gpu[k].cpu(), cpu[k])


@pytest.mark.parametrize("input_grad", ["full", "active"])
def test_sparse_input_linear_cuda_matches_dense(input_grad):
    torch.manual_seed(0)
    dense = nn.Linear(256, 128).cuda()
    sparse = SparseInputLinear.from_linear(dense, min_sparsity=0.0, input_grad=input_grad)
    z = torch.randn(64, 256, device="cuda")
    z[:, ::2] = -1.0
    outs = []
    for layer in (dense, sparse):
        zz = z.clone().requires_grad_()
        layer.zero_grad()
        y = layer(torch.relu(zz))
        y.square().sum().backward()
        outs.append((y.detach(), zz.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    assert sparse.last_sparse
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    y = TopKActivation(5)(torch.randn(8, 40, device="cuda"))
    assert ((y != 0).sum(1) == 5).all()
