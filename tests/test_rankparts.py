"""The one "each rank writes its part, rank 0 waits with a deadline" helper (mining, curation and index building)."""

from __future__ import annotations

import pytest
import torch

from mmembed.rankparts import gather_parts, part_path, wait_for, write_part


def test_rank_zero_merges_the_parts_of_this_run_only(tmp_path):
    write_part(tmp_path, 1, 3, "run-a", {1: torch.ones(2, 4)})
    write_part(tmp_path, 2, 3, "run-a", {2: torch.full((1, 4), 2.0)})
    merged = gather_parts(tmp_path, 3, "run-a", {0: torch.zeros(3, 4)}, timeout_s=1, poll_s=0.01)
    assert sorted(merged) == [0, 1, 2] and float(merged[2].sum()) == 8.0
    assert not list(part_path(tmp_path, 1, 3).parent.glob("*.tmp"))  # written atomically, no leftovers
    write_part(tmp_path, 2, 3, "run-b", {2: torch.ones(1, 4)})  # a stale part of another run
    with pytest.raises(ValueError, match="other shards, model"):
        gather_parts(tmp_path, 3, "run-a", {}, timeout_s=1, poll_s=0.01)


def test_a_missing_rank_ends_at_the_deadline_with_one_line(tmp_path):
    write_part(tmp_path, 1, 3, "run-a", {1: torch.ones(1)})
    with pytest.raises(TimeoutError, match=r"rank 2's part .* did not appear within 0s; run that rank"):
        gather_parts(tmp_path, 3, "run-a", {}, timeout_s=0.05, poll_s=0.01)
    with pytest.raises(TimeoutError, match="chunk x"):
        wait_for([tmp_path / "never"], 0.02, lambda p: "chunk x", poll_s=0.01)
