"""lplr-dask: low-rank, low-precision factorization (LPLR) of matrices larger than memory.

``A ≈ L·R`` with L (n×k) at B1 bits and R (k×d) at B2 bits, computed in two reads (or one) of a
chunked Zarr matrix on Dask (Saha, Srivastava, Pilanci, NeurIPS 2023).
"""

from lplr_dask.api import compress, evaluate
from lplr_dask.append import append, finalize
from lplr_dask.baselines import dsvd, lplr_reference, lsvd, naive_quantize, relative_error
from lplr_dask.budget import fair_rank
from lplr_dask.convert import convert, convert_group
from lplr_dask.datasets import generate
from lplr_dask.errors import (
    LplrError,
    LplrTypeError,
    LplrValueError,
    NonFiniteError,
    OutputExistsError,
    OutputLockedError,
    SourceNotFoundError,
    StoreFormatError,
)
from lplr_dask.export import export_safetensors
from lplr_dask.factors import Factors, open_dataarray, open_factors
from lplr_dask.group import compress_group
from lplr_dask.job import package_version
from lplr_dask.quantize import QuantizerSpec, dequantize, quantize
from lplr_dask.verify import verify

#: The installed distribution's version ("unknown" when run from a source tree that is not installed).
__version__ = package_version()

__all__ = [
    "__version__",
    "compress",
    "append",
    "finalize",
    "compress_group",
    "convert",
    "convert_group",
    "export_safetensors",
    "evaluate",
    "open_factors",
    "open_dataarray",
    "verify",
    "Factors",
    "quantize",
    "dequantize",
    "QuantizerSpec",
    "fair_rank",
    "naive_quantize",
    "dsvd",
    "lsvd",
    "lplr_reference",
    "relative_error",
    "generate",
    "LplrError",
    "LplrValueError",
    "LplrTypeError",
    "SourceNotFoundError",
    "OutputExistsError",
    "OutputLockedError",
    "StoreFormatError",
    "NonFiniteError",
]
