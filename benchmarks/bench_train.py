"""Training speed of the bracket model: one optimiser step at the zoo recipe's batch size, and the
whole data pipeline. The end-to-end number (wall time to the 99.9% held-out target) is recorded in
each trained model's card (`python -m circuits card brackets`, field `wall_time`)."""

from __future__ import annotations

import pytest
import torch

from circuits.zoo import registry as zoo
from circuits.zoo.train import Split, batches, compute_loss

torch.set_num_threads(1)


@pytest.fixture
def _grad_enabled():  # benchmarks/conftest.py runs everything under inference_mode; training needs grad
    with torch.inference_mode(False), torch.enable_grad():
        yield


@pytest.mark.usefixtures("_grad_enabled")
@pytest.mark.parametrize("variant", ["aux_targets", "label_readout_path", "label_full_block_foreach"])
def test_bracket_training_step(benchmark, variant):
    """aux_targets: the zoo recipe (the label plus per-position suffix targets, so the whole last
    block; fused AdamW); label_readout_path: the label only, the last block at the read-out position
    only, fused AdamW (the recipe before the suffix targets); label_full_block_foreach: the label
    only, the whole last block and the foreach AdamW, as before those options."""
    entry = zoo.get_entry("brackets")
    split = entry.make_train_split(20_000, 1)  # targets [n, pos]: the label at position 0
    if variant != "aux_targets":
        split = Split(split.inputs, split.targets[:, 0], split.lengths)
    model = zoo.build_model(entry, 0).train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = variant != "label_full_block_foreach"
    opt = torch.optim.AdamW(params, lr=entry.recipe.lr, **({"fused": True} if fused else {"foreach": True}))
    gen = torch.Generator().manual_seed(0)
    stream = iter(())

    def step():
        nonlocal stream
        idx = next(stream, None)
        if idx is None:
            stream = batches(split, entry.recipe.batch_size, gen, bucket=True)
            idx = next(stream)
        loss, _ = compute_loss(model, split.batch(idx), "ce", readout_only=variant == "label_readout_path",
                               aux_weight=entry.recipe.aux_weight if variant == "aux_targets" else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()

    benchmark.group = "bracket training step"
    benchmark.extra_info.update(variant=variant, batch_size=entry.recipe.batch_size)
    benchmark.pedantic(step, rounds=300, warmup_rounds=20)


def test_bracket_training_data(benchmark):
    entry = zoo.get_entry("brackets")
    benchmark.pedantic(lambda: entry.make_train_split(100_000, 1), rounds=5)
