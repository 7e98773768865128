"""The benchmark's FLOP counts agree with the layers' own cost model (one formula)."""
from svdkern import SVDLinear

from . import cost


def test_chain_and_dense_flops_match_layer_flops():
    B, n, m, r = 7, 13, 11, 5
    svd_per_row, dense_per_row = SVDLinear(n, m, rank=r).flops()
    assert cost.linear_chain_flops(B, n, m, r) == 3 * B * svd_per_row
    assert cost.linear_dense_flops(B, n, m) == 3 * B * dense_per_row


def test_work_takes_the_cheaper_path():
    full, low = cost.svd_linear_work(4096, 768, 768, 768), cost.svd_linear_work(4096, 768, 768, 48)
    assert full == cost.linear_materialized_flops(4096, 768, 768, 768)
    assert low == cost.linear_chain_flops(4096, 768, 768, 48)


def test_floor_is_the_binding_ceiling():
    ceilings = {"matmul_tflops": 1.0, "copy_gbps": 1.0}     # 1e9 FLOP/ms, 1e6 B/ms
    assert cost.floor_ms(2e9, 1e6, ceilings) == 2.0
    assert cost.floor_ms(1e9, 3e6, ceilings) == 3.0
