"""The package's lazy public names."""

import dnnr_jax


def test_every_public_name_resolves():
  for name in dnnr_jax.__all__:
    assert getattr(dnnr_jax, name) is not None, name
  assert dnnr_jax.run_pipeline.__module__ == 'dnnr_jax.jobs.pipeline'
