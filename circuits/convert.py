"""State-dict conversion: TransformerLens format both ways (our parameter names are TL's).

TL checkpoints carry buffers we do not keep (`blocks.*.attn.mask`, `blocks.*.attn.IGNORE`); they are
dropped on load. Every missing, unexpected or mis-shaped key is named in one `StateDictError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from .errors import StateDictError
from .model import HookedTransformer, TransformerConfig

TL_IGNORED_SUFFIXES = (".attn.mask", ".attn.IGNORE", ".attn.rotary_sin", ".attn.rotary_cos")


def check_state_dict(model: HookedTransformer, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise StateDictError naming every missing, unexpected and mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: v for k, v in state_dict.items() if not k.endswith(TL_IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = [
        f"{k}: expected {expected[k]}, got {tuple(given[k].shape)}"
        for k in sorted(set(expected) & set(given))
        if isinstance(given[k], torch.Tensor) and tuple(given[k].shape) != expected[k]
    ]
    not_tensors = sorted(k for k, v in given.items() if not isinstance(v, torch.Tensor))
    raise_key_problems("state dict does not fit this model", missing, unexpected, misshaped, not_tensors)


def raise_key_problems(what: str, missing, unexpected, misshaped, not_tensors=()) -> None:
    """One StateDictError naming every problem found, or nothing when there is none."""
    problems = []
    if missing:
        problems.append(f"missing keys: {sorted(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {sorted(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {misshaped}")
    if not_tensors:
        problems.append(f"values that are not tensors: {sorted(not_tensors)}")
    if problems:
        raise StateDictError(f"{what}: " + "; ".join(problems))


def load_tl_state_dict(model: HookedTransformer, state_dict: dict[str, torch.Tensor]) -> HookedTransformer:
    """Load a TransformerLens-format state dict into `model` (in place) after checking every key."""
    check_state_dict(model, state_dict)
    own = model.state_dict()
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state_dict[k].to(device=p.device, dtype=p.dtype))
    return model


def to_tl_state_dict(model: HookedTransformer) -> dict[str, torch.Tensor]:
    """The model's weights as a TL state dict (detached, contiguous CPU copies: W_Q etc. are views
    of the fused W_QKV, and safetensors refuses non-contiguous tensors)."""
    return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}


def load_tl_checkpoint(path: Union[str, Path], cfg: TransformerConfig) -> HookedTransformer:
    """Build a model from `cfg` and load a TL checkpoint file: safetensors, or a torch file read with
    `weights_only=True` (never unpickled)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt or pickled-object file: say which and why
            raise StateDictError(f"could not read {path} as a weights-only torch file: {e}") from None
    if not isinstance(sd, dict):
        raise StateDictError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    return load_tl_state_dict(HookedTransformer(cfg), sd)
