"""q/k/v and gate/up as one GEMM each: the same outputs, the same memory, and each member's own result."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from loramux.core.model.fused_linears import FUSED, fused_layers
from loramux.core.model.kernel_choice import choose_kernels, start_linear_kernels
from loramux.core.model.linear_kernels import LinearKernel, onednn_works, use_linear_kernel

pytestmark = pytest.mark.skipif(not onednn_works(), reason="this torch build has no working oneDNN linear")


def tiny_llama(*, layers: int = 2, hidden: int = 32, intermediate: int = 48) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def start(model: torch.nn.Module, kernel: LinearKernel = LinearKernel.AUTO) -> LinearKernel:
    return start_linear_kernels(model, kernel, max_batch_rows=4, prefill_rows=16)[0]


@pytest.mark.parametrize("kernel", [LinearKernel.AUTO, LinearKernel.ONEDNN])
def test_a_fused_model_computes_what_the_unfused_one_does(kernel: LinearKernel) -> None:
    model, reference = tiny_llama(), tiny_llama()
    ids = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(1))
    start(model, kernel)
    assert len(fused_layers(model)) == 2 * 2  # q/k/v and gate/up in each of 2 layers
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32 rounding: the GEMM's blocking differs


def test_members_weights_are_views_of_the_group_weight_so_memory_is_unchanged() -> None:
    model = tiny_llama(layers=1)
    attention = model.model.layers[0].self_attn
    before = [p.detach().clone() for p in (attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight)]
    start(model)
    group = attention.q_proj.__dict__[FUSED]
    storage = group.layer.weight.untyped_storage().data_ptr()
    for member, want in zip((attention.q_proj, attention.k_proj, attention.v_proj), before, strict=True):
        assert member.weight.untyped_storage().data_ptr() == storage
        assert torch.equal(member.weight, want)
    assert group.layer.weight.shape == (32 + 16 + 16, 32)  # q (4 heads x 8) + k and v (2 kv heads x 8 each)


def test_each_member_gets_its_own_result_whatever_the_order_or_the_input() -> None:
    model = tiny_llama(layers=1)
    start(model)
    mlp = model.model.layers[0].mlp
    x, other = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        up = mlp.up_proj(x)  # the second member first
        gate_other = mlp.gate_proj(other)  # another input: the group's GEMM again
        gate = mlp.gate_proj(x)  # its pending slice was dropped with x's: computed afresh
        up_again = mlp.up_proj(x)  # a member called twice on one input
    for got, member, inp in ((up, mlp.up_proj, x), (gate_other, mlp.gate_proj, other), (gate, mlp.gate_proj, x)):
        torch.testing.assert_close(got, F.linear(inp, member.weight), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(up_again, up)


def test_an_input_written_in_place_is_a_new_input() -> None:
    model = tiny_llama(layers=1)
    start(model)
    attention = model.model.layers[0].self_attn
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        attention.q_proj(x)
        x.mul_(2)  # the pending k slice was computed from the old values
        k = attention.k_proj(x)
    torch.testing.assert_close(k, F.linear(x, attention.k_proj.weight), rtol=1e-5, atol=1e-5)


def test_slices_pending_on_one_thread_are_not_taken_by_another() -> None:
    model = tiny_llama(layers=1)
    start(model)
    attention = model.model.layers[0].self_attn
    x = torch.randn(1, 3, 32)
    got: list[torch.Tensor] = []
    with torch.no_grad():
        attention.q_proj(x)
        worker = threading.Thread(target=lambda: got.append(attention.v_proj(x)))
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive()
        v = attention.v_proj(x)  # this thread's own pending slice
    assert len(got) == 1
    torch.testing.assert_close(got[0], v)


def test_autograd_and_a_replaced_weight_run_the_members_own_gemm() -> None:
    model = tiny_llama(layers=1)
    start(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 32)
    assert mlp.gate_proj(x).requires_grad  # grad on: not through the group (its layer holds no grad)
    mlp.up_proj.weight = torch.nn.Parameter(torch.randn(48, 32), requires_grad=False)
    with torch.no_grad():
        torch.testing.assert_close(mlp.up_proj(x), F.linear(x, mlp.up_proj.weight), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mlp.gate_proj(x), F.linear(x, mlp.gate_proj.weight), rtol=1e-5, atol=1e-5)


def test_torch_kernel_unfuses_and_a_copy_is_a_plain_unfused_model() -> None:
    model = tiny_llama(layers=1)
    start(model)
    replica = copy.deepcopy(model)
    assert fused_layers(replica) == []
    q = replica.model.layers[0].self_attn.q_proj.weight
    assert q.untyped_storage().nbytes() == q.numel() * q.element_size()  # its own weight, not the whole group's
    assert use_linear_kernel(model, LinearKernel.TORCH) is LinearKernel.TORCH
    assert fused_layers(model) == []
    assert start(model, LinearKernel.TORCH) is LinearKernel.TORCH and fused_layers(model) == []


def test_auto_fuses_at_the_row_counts_where_one_gemm_beat_the_members() -> None:
    model = tiny_llama(layers=1)
    fused_shapes = {32 + 16 + 16, 48 + 48}  # q/k/v and gate/up stacked

    def timer(kernel: LinearKernel, module: torch.nn.Module, rows: int) -> float:
        cost = 1e-3 * module.out_features  # ms per output feature, either kernel
        if module.out_features in fused_shapes:
            return cost * (0.5 if rows == 8 else 1.2)  # one GEMM: half the members' time at 8 rows, worse at 1
        return cost

    choose_kernels(model, rows=(1, 8), timer=timer)
    mlp = model.model.layers[0].mlp
    group = mlp.up_proj.__dict__[FUSED]
    assert group.fused_rows == ((1, False), (8, True))
    torch_gemm = LinearKernel.TORCH  # unfused, a member runs a kernel without a packed copy: torch's at a tie
    assert mlp.gate_proj.kernel_rows == ((1, torch_gemm), (8, torch_gemm))
    x1, x8 = torch.randn(1, 32), torch.randn(8, 32)
    with torch.no_grad():
        assert group.output_of(mlp.gate_proj, x1) is None  # one row: the member's own GEMM
        got = group.output_of(mlp.gate_proj, x8)
    assert got is not None
    torch.testing.assert_close(got, F.linear(x8, mlp.gate_proj.weight), rtol=1e-5, atol=1e-5)
