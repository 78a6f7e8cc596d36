"""Compression: pruning, quantization and their schedules, on params pytrees."""

from dnnr_jax.compress.gradual import cubic_sparsity_schedule as cubic_sparsity_schedule
from dnnr_jax.compress.gradual import final_masks as final_masks
from dnnr_jax.compress.gradual import keep_masked as keep_masked
from dnnr_jax.compress.gradual import pruning as pruning
from dnnr_jax.compress.linen_quant import calibrate_linen as calibrate_linen
from dnnr_jax.compress.linen_quant import quantize_linen as quantize_linen
from dnnr_jax.compress.linen_quant import quantized_apply as quantized_apply
from dnnr_jax.compress.nnx_quant import QuantizedLayer as QuantizedLayer
from dnnr_jax.compress.nnx_quant import calibrate_nnx as calibrate_nnx
from dnnr_jax.compress.nnx_quant import quantize_nnx as quantize_nnx
from dnnr_jax.compress.prune import apply_masks as apply_masks
from dnnr_jax.compress.prune import magnitude_masks as magnitude_masks
from dnnr_jax.compress.prune import nm_masks as nm_masks
from dnnr_jax.compress.prune import sparsity_report as sparsity_report
from dnnr_jax.compress.qat import convert as convert
from dnnr_jax.compress.qat import fake_quantize as fake_quantize
from dnnr_jax.compress.qat import fake_quantize_params as fake_quantize_params
from dnnr_jax.compress.quantize import QArray as QArray
from dnnr_jax.compress.quantize import calibrate as calibrate
from dnnr_jax.compress.quantize import dequantize as dequantize
from dnnr_jax.compress.quantize import dequantize_params as dequantize_params
from dnnr_jax.compress.quantize import int8_matmul as int8_matmul
from dnnr_jax.compress.quantize import quantize_params as quantize_params
from dnnr_jax.compress.rules import Rule as Rule
from dnnr_jax.compress.structured import prune_units as prune_units
