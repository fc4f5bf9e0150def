"""Triton kernels of the LoRA linear (imported lazily by the ``"triton"`` backend; importing ``lora_fused`` never
imports Triton). One op per file, each launcher beside its kernel:

* ``lora_down``        forward 1: ``h = dropout(x) Aᵀ``, mask generated in-kernel;
* ``lora_linear_fwd``  forward 2: ``y = x Wᵀ + b + s·h_t B_tᵀ`` in one accumulator/epilogue;
* ``lora_bwd_dh_db``   backward 1: ``dh = s·g B`` and ``dB = s·gᵀ h`` from one read of g;
* ``lora_bwd_dx``      backward 2: ``dx = g W + mask/(1-p)∘(dh A)``;
* ``lora_bwd_da``      backward 3: ``dA = dhᵀ dropout(x)``;
* ``dropout_mask``     the keep mask materialized, for tests;
* ``lora_linear``      the forward/backward drivers used by the backend.
"""

from .dropout_mask import triton_dropout_keep_mask
from .lora_linear import triton_lora_backward, triton_lora_forward

__all__ = ["triton_dropout_keep_mask", "triton_lora_forward", "triton_lora_backward"]
