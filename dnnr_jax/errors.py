"""The one exception type a user of dnnr_jax can meet, and its one warning type."""


class DnnrError(Exception):
  """A bad input: the message names the input and the fix.

  The CLI catches it once, prints the message without a traceback and exits
  with status 2.
  """


class ConfigError(DnnrError):
  """A configuration key is unknown or its value is impossible."""


class DataError(DnnrError):
  """A data set is missing, truncated or malformed."""


class CheckpointError(DnnrError):
  """A checkpoint is missing, truncated, not ours, or would be overwritten."""


class IntegrityError(CheckpointError):
  """An artifact no longer matches the digest recorded when it was written."""


class QuantizationError(DnnrError):
  """A quantization rule, layer or params tree the quantizer cannot use."""


class AccuracyWarning(UserWarning):
  """A result that works but is worse than asked (e.g. over its accuracy budget).

  The message is one sentence naming the figure, the limit and what to do;
  the CLI prints it as `warning: ...` on stderr.
  """
