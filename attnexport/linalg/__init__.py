"""Numerical linear algebra for calibration and NystromAttention.

`sketch_solver` is the sketch-and-precondition least-squares solver of Song, Yin, Zhang,
"Solving Attention Kernel Regression Problem via Pre-conditioner" (arXiv 2308.14304): tall
regressions, the attention-kernel regression min ‖exp(A Aᵀ) x − b‖ and the power regressions
min ‖A (AᵀA)^j x − b‖, min ‖(AᵀA)^j x − b‖.
"""

from attnexport.linalg.sketch_solver import (
    SolveInfo,
    attention_kernel_lstsq,
    cgls,
    gram_power_solve,
    lstsq,
    power_lstsq,
    sparse_sign_embedding,
)

__all__ = [
    "SolveInfo",
    "attention_kernel_lstsq",
    "cgls",
    "gram_power_solve",
    "lstsq",
    "power_lstsq",
    "sparse_sign_embedding",
]
