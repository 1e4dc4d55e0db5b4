"""Load ``lplr export --factorized`` weights into a PyTorch model, a Linear becoming two of rank k.

A factorized export holds, for a compressed weight ``NAME`` (out × in), the tensors ``NAME.L``
(out × k) and ``NAME.R`` (k × in), with ``W ≈ L·R``. Since ``x·Wᵀ = (x·Rᵀ)·Lᵀ``, the Linear
whose weight is ``NAME`` is replaced by ``nn.Sequential(Linear(in, k, bias=False),
Linear(k, out))`` with weights ``R`` and ``L`` and the original bias: ``k·(in + out)``
multiply-adds per row instead of ``in·out``. Every other tensor is loaded as it is.

PyTorch is needed only here, and imported when a function runs (``pip install torch``).
"""

from __future__ import annotations

import os
from typing import Any

from lplr_dask.errors import LplrValueError
from lplr_dask.sources import INDEX_SUFFIX, shard_files

__all__ = ["load_factorized", "load_tensors"]


def load_tensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every tensor of a ``.safetensors`` file, or of all shards of a ``*.safetensors.index.json``,
    as torch tensors (``safetensors.torch.load_file``)."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    files = shard_files(path) if path.endswith(INDEX_SUFFIX) else [path]
    tensors: dict[str, Any] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def load_factorized(module: Any, tensors: Any, *, strict: bool = True) -> list[str]:
    """Load factorized weights into ``module``, replacing each factorized Linear by two.

    Parameters
    ----------
    module : torch.nn.Module
        The model, built as for its dense weights (e.g. ``AutoModel.from_config``). Changed in
        place.
    tensors : str, os.PathLike or dict of str to torch.Tensor
        The output of ``lplr export --factorized`` (a ``.safetensors`` file or the index of its
        shards, :func:`load_tensors`), or its tensors.
    strict : bool, default=True
        As for ``Module.load_state_dict``: every parameter and buffer of the model must be given,
        and nothing else.

    Returns
    -------
    list of str
        The names of the modules replaced (``"layers.0.mlp.up_proj"``, …).

    Raises
    ------
    LplrValueError
        If a factorized weight belongs to no ``nn.Linear``, its factors do not fit the layer's
        shape, or (``strict``) tensors are missing or left over.
    """
    import torch

    if isinstance(tensors, (str, os.PathLike)):
        tensors = load_tensors(tensors)
    tensors = dict(tensors)
    replaced = []
    for key in sorted(k for k in tensors if k.endswith(".L")):
        weight = key[: -len(".L")]
        if weight + ".R" not in tensors:
            raise LplrValueError(f"{key!r} has no {weight + '.R'!r} beside it: the factorized export is incomplete.")
        if not weight.endswith(".weight"):
            raise LplrValueError(f"Expected factors of a Linear's weight (NAME.weight.L). Got {key!r}.")
        name = weight[: -len(".weight")]
        L, R = tensors.pop(weight + ".L"), tensors.pop(weight + ".R")
        layer = _submodule(module, name)
        if not isinstance(layer, torch.nn.Linear):
            raise LplrValueError(
                f"{weight!r} is factorized but {name!r} is a {type(layer).__name__}, not a torch.nn.Linear."
            )
        if (L.shape[0], R.shape[1]) != (layer.out_features, layer.in_features) or L.shape[1] != R.shape[0]:
            raise LplrValueError(
                f"The factors of {weight!r} are {tuple(L.shape)} and {tuple(R.shape)}; the Linear {name!r} is "
                f"{layer.out_features}x{layer.in_features}. Export from the store of this model's weights."
            )
        first = torch.nn.Linear(R.shape[1], R.shape[0], bias=False, dtype=R.dtype, device=layer.weight.device)
        second = torch.nn.Linear(
            L.shape[1], L.shape[0], bias=layer.bias is not None, dtype=L.dtype, device=layer.weight.device
        )
        with torch.no_grad():
            first.weight.copy_(R)
            second.weight.copy_(L)
            if layer.bias is not None:
                second.bias.copy_(tensors.pop(name + ".bias", layer.bias).to(L.dtype))
        _replace(module, name, torch.nn.Sequential(first, second))
        replaced.append(name)
    result = module.load_state_dict(tensors, strict=False)
    done = {f"{name}.{i}.{p}" for name in replaced for i, p in ((0, "weight"), (1, "weight"), (1, "bias"))}
    missing = [k for k in result.missing_keys if k not in done]
    if strict and (missing or result.unexpected_keys):
        raise LplrValueError(
            f"The tensors do not match the model: missing {missing[:10]}, unexpected "
            f"{list(result.unexpected_keys)[:10]}. Build the model the weights came from, or pass strict=False."
        )
    return replaced


def _submodule(module: Any, name: str) -> Any:
    try:
        return module.get_submodule(name)
    except AttributeError:
        raise LplrValueError(f"The model has no module {name!r}, which the factorized weights name.") from None


def _replace(module: Any, name: str, new: Any) -> None:
    parent, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, child, new)
