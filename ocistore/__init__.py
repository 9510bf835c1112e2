"""ocistore: a daemonless container-image store.

    from ocistore import Store
    image = Store("/tmp/store").pull("busybox:latest")

Heavy modules load lazily so that ``ocistore --help`` starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Reference", "Store", "__version__"]

if TYPE_CHECKING:
    from ocistore.api import Store
    from ocistore.reference import Reference


def __getattr__(name: str) -> Any:
    if name == "Store":
        from ocistore.api import Store

        return Store
    if name == "Reference":
        from ocistore.reference import Reference

        return Reference
    raise AttributeError(name)
