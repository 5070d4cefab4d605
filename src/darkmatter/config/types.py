"""Value types the configuration sections share: closed sets of names, safe file names, hook sites."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from darkmatter.errors import HookSiteError
from darkmatter.lm.sites import parse_site

Dtype = Literal["fp32", "bf16", "fp16"]
SAEKind = Literal["topk", "batchtopk", "jumprelu"]
SAEFormatName = Literal[
    "saelens",
    "llama_scope",
    "llamascopium",
    "gemma_scope_2",
    "gemma_scope",
    "sparsify",
    "dictionary_learning",
    "openai",
]
ErrorComponent = Literal["linear", "nonlinear", "error"]
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]+)?)$"
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"
"""A name that becomes a file name: letters, digits, '.', '_', '+', '-'; no separator, no leading dot."""

SafeName = Annotated[str, Field(pattern=SAFE_NAME)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]


def _check_site(value: str | None) -> str | None:
    if value is not None:
        try:
            parse_site(value)
        except HookSiteError as exc:
            raise ValueError(str(exc)) from None
    return value


SiteName = Annotated[str, AfterValidator(_check_site)]
