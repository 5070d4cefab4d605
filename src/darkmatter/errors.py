"""One error type per failure class; the CLI prints their message as one paragraph and exits non-zero."""

from __future__ import annotations


class DarkMatterError(Exception):
    """Base class: a user-facing failure with a message saying what was expected, found, and what to do."""

    exit_code = 2


class ConfigError(DarkMatterError):
    """A setting is missing, unknown or contradicts another."""


class ModelLoadError(DarkMatterError):
    """A language model could not be found or loaded."""


class HookSiteError(DarkMatterError):
    """A hook site name is malformed, unknown for the architecture, or out of range."""


class TextError(DarkMatterError):
    """A corpus is missing, empty, malformed or too short for the requested contexts."""


class StoreError(DarkMatterError):
    """An activation store is missing, corrupt, or belongs to a different configuration."""


class SAEFormatError(DarkMatterError):
    """An SAE folder or file has an unknown layout, corrupt content, or tensors contradicting its config."""


class ShapeError(DarkMatterError):
    """Tensor shapes disagree (for example an SAE's d_in and the hook site's width)."""


class DataError(DarkMatterError):
    """Numerical data is unusable: NaN or inf values, constant targets, too few tokens in a split."""


class EndpointError(DarkMatterError):
    """A remote or local judge endpoint failed after retries or returned unusable answers."""


class StepIncompleteError(DarkMatterError):
    """A step stopped early and kept its partial result; the study finished every other step and the
    report first. Running the same command again resumes the step."""


class WriteError(DarkMatterError):
    """An output file could not be written (a full disk, missing permissions); nothing written is lost."""

    exit_code = 3


class RunLockedError(DarkMatterError):
    """Another run holds the output folder."""
