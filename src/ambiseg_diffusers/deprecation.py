"""diffusers' `deprecate`, counted against this package's version."""

from __future__ import annotations

from diffusers.utils import deprecate as diffusers_deprecate
from packaging import version

from ._version import __version__

# diffusers' `deprecate` raises once *diffusers'* version reaches the removal version; it is handed one it never
# reaches, and the removal version of this package is worded into the message instead.
_NEVER = "9999.0.0"


def deprecate(attribute: str, removal_version: str, message: str) -> None:
    """Warns (`FutureWarning`, through diffusers' `deprecate`) that `attribute` goes in ambiseg-diffusers
    `removal_version`; raises `ValueError` once this package's version reaches it, so the shim cannot outlive its
    release unnoticed (the tests run every deprecated path)."""
    if version.parse(version.parse(__version__).base_version) >= version.parse(removal_version):
        raise ValueError(f"the deprecation of `{attribute}` should be removed: ambiseg-diffusers {__version__} >= "
                         f"{removal_version}.")
    diffusers_deprecate(attribute, _NEVER, f"`{attribute}` is deprecated and will be removed in ambiseg-diffusers "
                        f"{removal_version}. {message}", standard_warn=False, stacklevel=3)
