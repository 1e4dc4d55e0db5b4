"""Uniform scalar quantization: encode to integer codes with scales, decode back.

The reference semantics are those of Saha, Srivastava and Pilanci (2023) [1]_, ``lplr()`` in the
authors' ``src/lplr/compressors.py``: one min-max range for the whole matrix, ``2**B`` levels
including both endpoints (step ``(max - min) / (2**B - 1)``) and round-to-nearest.

This package adds the choices that :class:`QuantizerSpec` names: the scale granularity (whole
matrix, per channel, per group of entries along the long axis), symmetric (abs-max) ranges,
stochastic rounding, and error-feedback rounding of R against its basis (``gptq``: GPTQ [2]_,
the LDLQ of QuIP [3]_), which minimizes ``‖L̂·(W − R̂)‖_F`` rather than ``‖W − R̂‖_F``.
Everything here works on numpy, cupy and dask arrays alike: reductions are the array's own, so
on a dask array the scales come from a dask reduction.

Modules
-------
spec
    :class:`QuantizerSpec`, the names and presets of quantizers, the bit widths and code dtypes.
scalar
    One block's ranges, scales, codes (nearest or stochastic rounding) and decoding.
rng
    The counter-based (splitmix64) uniforms of stochastic rounding.
gptq
    Error-feedback rounding of R against its basis (GPTQ / LDLQ).
codec
    :func:`quantize` and :func:`dequantize` of a whole matrix (numpy, cupy or dask).

References
----------
.. [1] R. Saha, V. Srivastava, M. Pilanci. "Matrix Compression via Randomized Low Rank and Low
   Precision Factorization." NeurIPS 2023. arXiv:2310.11028.
.. [2] E. Frantar, S. Ashkboos, T. Hoefler, D. Alistarh. "GPTQ: Accurate Post-Training
   Quantization for Generative Pre-trained Transformers." ICLR 2023. arXiv:2210.17323.
.. [3] J. Chee, Y. Cai, V. Kuleshov, C. De Sa. "QuIP: 2-Bit Quantization of Large Language
   Models With Guarantees." NeurIPS 2023. arXiv:2307.13304.
"""

from __future__ import annotations

from lplr_dask.quantize.codec import Quantized, decode, dequantize, encode, encode_blocks, quantize
from lplr_dask.quantize.gptq import GPTQ_BATCH, GPTQ_DAMP, check_gptq, encode_gptq_block, gptq_factor
from lplr_dask.quantize.rng import rounding_key, rounding_uniforms
from lplr_dask.quantize.scalar import (
    block_scales,
    decode_block,
    encode_block,
    expand_groups,
    ranges,
    scale_from_range,
)
from lplr_dask.quantize.spec import (
    GRANULARITIES,
    PRESETS,
    ROUNDINGS,
    Granularity,
    QuantizerSpec,
    Rounding,
    check_bits,
    code_dtype,
    parse_quantizer,
    quantizer_pair,
)

__all__ = [
    # spec
    "Granularity",
    "Rounding",
    "GRANULARITIES",
    "ROUNDINGS",
    "PRESETS",
    "QuantizerSpec",
    "parse_quantizer",
    "quantizer_pair",
    "check_bits",
    "code_dtype",
    # scalar
    "ranges",
    "scale_from_range",
    "expand_groups",
    "block_scales",
    "encode_block",
    "decode_block",
    # rng
    "rounding_key",
    "rounding_uniforms",
    # gptq
    "GPTQ_DAMP",
    "GPTQ_BATCH",
    "gptq_factor",
    "encode_gptq_block",
    "check_gptq",
    # codec
    "Quantized",
    "quantize",
    "dequantize",
    "encode_blocks",
    "encode",
    "decode",
]
