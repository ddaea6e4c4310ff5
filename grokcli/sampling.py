"""The former name of `sampling_params.py`, kept so `from grokcli.sampling import SamplingParams` works."""

from .sampling_params import SamplingParams, sampling_params

__all__ = ["SamplingParams", "sampling_params"]
