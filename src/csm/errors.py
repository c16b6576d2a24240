"""Errors whose message is meant for the user: the CLI prints them as one line."""


class CSMError(Exception):
    """Base of every error csm raises on purpose."""


class WeightsNotFoundError(CSMError):
    """Weights or other artifacts could not be found locally or on the hub."""


class CheckpointError(CSMError):
    """A checkpoint was found but cannot be used: corrupt, wrong keys or shapes."""


class GenerationError(CSMError):
    """A generation could not go on, e.g. the model's numbers went non-finite."""
