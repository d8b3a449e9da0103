"""Row sampling and batching: deterministic, bounded, never crossing a matrix of a 3-D tensor."""

from megatron_qat.parity.rows import plan_batches, sampled_rows


def test_sampled_rows_are_evenly_spaced_and_deterministic():
    assert sampled_rows(10, None) is None and sampled_rows(10, 10) is None and sampled_rows(10, 99) is None
    assert sampled_rows(10, 4) == [0, 2, 5, 7]
    assert sampled_rows(1000, 3) == sampled_rows(1000, 3) == [0, 333, 666]


def test_batches_cover_all_rows_within_limits():
    batches = plan_batches(total=30, matrix_rows=10, rows=None, batch_rows=4)
    ranges = [r for b in batches for r in b]
    assert [i for a, b in ranges for i in range(a, b)] == list(range(30))
    assert all(sum(b - a for a, b in batch) <= 4 for batch in batches)
    assert all(a // 10 == (b - 1) // 10 for a, b in ranges)


def test_sampled_batches_merge_consecutive_rows_only_inside_a_matrix():
    batches = plan_batches(total=30, matrix_rows=10, rows=[8, 9, 10, 11, 20], batch_rows=100)
    assert batches == [[(8, 10), (10, 12), (20, 21)]]
