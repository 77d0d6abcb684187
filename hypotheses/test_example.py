"""Hypothesis: on strings starting with "(", head 2.0 of our bracket classifier attends from the
read-out position 0 to position 1 (the seed's count head)."""
import pytest


@pytest.mark.about("qk:L2H0")  # what the claim is about: its mutations must make the claim fail
def test_head_2_0_reads_position_1(brackets_model, bracket_data, claim):
    data = bracket_data.subset(bracket_data.starts_open)
    _, cache = brackets_model.run_with_cache(data.toks, names_filter="blocks.2.attn.hook_pattern")
    attention = cache["pattern", 2][:, 0, 0, 1]  # [batch]: head 0, query 0 -> key 1
    claim.at_least("attention q0->k1", claim.sample(attention.numpy()), 0.5)  # on the CI's lower bound
