"""Jobs: one function per command (train, evaluate, prune, quantize, pipeline,
benchmark), each taking settings and paths and returning a typed result.

Jobs compose the pure library and the I/O modules; only `dnnr_jax.cli` sits
above them.
"""
